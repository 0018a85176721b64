//! Servers that can be stopped and started again on the same port (the
//! degradation tests take a dependency down and bring it back), and latency
//! histograms for the strategy §3 paths.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use switchboard::{Error, ErrorKind};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Binds `address`, or explains what to do when it is taken.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|error| {
        Error::new(
            ErrorKind::Config,
            format!("cannot listen on {address}: {error}; pick another --port (0 = any free port)"),
        )
    })
}

/// A running server task with a stop switch.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves the axum `router` on `listener` until stopped.
    pub fn http(listener: TcpListener, router: axum::Router) -> Self {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async {
                stopped.await.ok();
            });
            if let Err(error) = serve.await {
                tracing::warn!(%error, "HTTP server stopped");
            }
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Serves tonic `routes` (gRPC over h2c) on `listener` until stopped.
    pub fn grpc(listener: TcpListener, routes: tonic::service::Routes) -> Self {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        stopped.await.ok();
                    },
                );
            if let Err(error) = serve.await {
                tracing::warn!(%error, "gRPC server stopped");
            }
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Serves Market's history files over HTTP/2 until stopped.
    pub fn transfer(listener: TcpListener, server: switchboard::transfer::TransferServer) -> Self {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                stopped.await.ok();
            };
            if let Err(error) = server.serve(listener, shutdown).await {
                tracing::warn!(%error, "transfer server stopped");
            }
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes connections, and returns once the server task
    /// has ended, so the port is free again.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        // Graceful: idle keep-alive connections are closed too, so a client
        // holding one sees the server gone. A client holding a request open
        // past the deadline gets cut off.
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Stops every server given (a service's `Option<Server>` fields or a
/// drained `Vec`), each returning once its port is free.
pub async fn stop_all(servers: impl IntoIterator<Item = Server>) {
    for server in servers {
        server.stop().await;
    }
}

/// Shuts a service's consumers down, each waiting for its handlers in flight.
pub async fn shut_down(consumers: &mut Vec<switchboard::ConsumerHandle>) -> Result<(), Error> {
    for consumer in consumers.drain(..) {
        consumer.shutdown().await?;
    }
    Ok(())
}

/// The latency figures of one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathStats {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Latency histograms by path name, in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    paths: Arc<Mutex<BTreeMap<String, Histogram<u64>>>>,
    /// The same latencies by strategy §3 budget name, for the console's
    /// charts.
    budgets: Option<switchboard::observe::LatencyBudgets>,
}

/// The budget name (`BudgetConfig::spec`) of a path label.
fn budget_name(path: &str) -> Option<&'static str> {
    Some(match path {
        super::session::PATH_GATEWAY => "gateway_service",
        super::trading_service::PATH_TRADING_MARKET => "trading_market",
        super::game_service::PATH_TRADING_GAME => "trading_game",
        super::game_service::PATH_GAME_MARKET => "game_market",
        _ => return None,
    })
}

impl Latencies {
    /// Also records into `budgets`, by budget name.
    pub fn with_budgets(budgets: switchboard::observe::LatencyBudgets) -> Self {
        Self {
            budgets: Some(budgets),
            ..Self::default()
        }
    }

    /// Records one call on `path`.
    pub fn record(&self, path: &str, took: Duration) {
        if let Some(recorder) = budget_name(path)
            .zip(self.budgets.as_ref())
            .and_then(|(name, budgets)| budgets.recorder(name))
        {
            recorder.record(took);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut paths = self.paths.lock().expect("latency lock");
        let histogram = paths.entry(path.to_owned()).or_insert_with(|| {
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
        });
        histogram.saturating_record(micros);
    }

    /// P50 / P99 / max of every path so far.
    pub fn snapshot(&self) -> BTreeMap<String, PathStats> {
        let paths = self.paths.lock().expect("latency lock");
        paths
            .iter()
            .map(|(path, histogram)| {
                let stats = PathStats {
                    count: histogram.len(),
                    p50_us: histogram.value_at_quantile(0.5),
                    p99_us: histogram.value_at_quantile(0.99),
                    max_us: histogram.max(),
                };
                (path.clone(), stats)
            })
            .collect()
    }
}

/// Maps a reqwest failure to an `Error` that says whether to retry.
pub fn from_reqwest(error: reqwest::Error) -> Error {
    let kind = if error.is_timeout() {
        ErrorKind::Timeout
    } else if error.is_connect() || error.is_request() {
        ErrorKind::Connection
    } else {
        ErrorKind::Unavailable
    };
    Error::new(kind, format!("HTTP: {error}"))
}

/// Reads a JSON answer, or the typed error the server sent.
pub async fn json_answer<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, Error> {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.map_err(from_reqwest)?;
    if !status.is_success() {
        return Err(switchboard::transport::http::error_from_response(
            status, &headers, &bytes,
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|error| Error::new(ErrorKind::Decode, format!("unexpected answer: {error}")))
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(at: chrono::DateTime<chrono::Utc>) -> i64 {
    at.timestamp_millis()
}
