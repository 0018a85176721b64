//! Auth: registers users, publishes `user.registered`, issues tokens signed
//! with its own Ed25519 private key, rotates that key and announces its
//! public keys on the bus, and answers user lookups over gRPC.
//!
//! strategy §2 row and column: nobody calls Auth synchronously except Game's
//! user lookup (📞 Game → Auth); everyone else trusts its tokens by checking
//! the signature locally with the public keys (✉ Auth → Game), so Auth being
//! down stops new logins but not existing sessions (§4.2). The keys reach
//! Trading and Game as `auth.keys_rotated` events signed by the key-signing
//! key they pin (`switchboard::auth`, "Key rotation"): at Auth's start, and
//! at every rotation ([`AuthService::rotate_keys`], or every
//! `AuthConfig::rotate_every`).
//!
//! Tokens name their key (`kid`) and their audiences: Trading and Game.
//!
//! HTTP: `POST /v1/users`, `POST /v1/tokens`, `GET /v1/public-key` (the
//! current key), `GET /v1/keys` (the last announcement), `GET /health`.
//! gRPC: `auth.v1.Users/GetUser`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::auth::KeysRotated;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use jsonwebtoken::{Algorithm, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use switchboard::auth::TokenVerifier;
use switchboard::outbox::RelayHandle;
use switchboard::transport::grpc::status_from_error;
use switchboard::transport::http::{ErrorResponse, JsonBody};
use switchboard::{Error, ErrorKind, EventBus};
use tonic::{Request, Response, Status};

use super::auth_keys::{AuthKeys, DEFAULT_KEY_OVERLAP, KeySource};
use super::auth_store::{AuthStore, User};
use super::brokers::Brokers;
use super::console::ServiceConsole;
use super::database::{Database, close_relays, outbox_sources, spawn_relays};
use super::domain::UserRegistered;
use super::net::{Server, bind, stop_all};
use super::proto::auth as pb;

/// The `iss` of every token Auth signs.
pub const ISSUER: &str = "auth-service";
/// How long a token is good for.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The `aud` Trading requires.
pub const TRADING_AUDIENCE: &str = "trading-service";
/// The `aud` Game requires.
pub const GAME_AUDIENCE: &str = "game-service";
/// The audiences of every token: one login serves both.
const AUDIENCES: [&str; 2] = [TRADING_AUDIENCE, GAME_AUDIENCE];

/// What Auth needs to start.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Where the HTTP API listens (gRPC on another free port).
    pub http: SocketAddr,
    /// Where its signing keys live.
    pub keys: KeySource,
    /// How long a rotated-out key keeps verifying.
    pub overlap: Duration,
    /// Rotate the signing key this often (`None`: only when asked).
    pub rotate_every: Option<Duration>,
}

impl AuthConfig {
    /// Keys in memory, rotated only when asked: the in-process platform.
    pub fn in_memory(http: SocketAddr) -> Self {
        Self {
            http,
            keys: KeySource::Memory,
            overlap: DEFAULT_KEY_OVERLAP,
            rotate_every: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Registered {
    pub user_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Token {
    pub token: String,
    pub expires_in_s: u64,
}

#[derive(Serialize)]
struct TokenClaims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: [&'a str; 2],
    iat: u64,
    exp: u64,
    name: &'a str,
}

struct AuthState {
    store: AuthStore,
    keys: Mutex<AuthKeys>,
    /// The last announcement published, for `GET /v1/keys`.
    announced: Mutex<Option<KeysRotated>>,
    /// One rotation at a time: prepared, announced, installed.
    rotating: tokio::sync::Mutex<()>,
    overlap: Duration,
    bus: EventBus,
}

fn password_hash(user_id: &str, password: &str) -> String {
    // Salted with the user id; a real Auth uses argon2. Enough for the demo.
    let digest: [u8; 32] = Sha256::new()
        .chain_update(user_id.as_bytes())
        .chain_update([0])
        .chain_update(password.as_bytes())
        .finalize()
        .into();
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl AuthState {
    async fn register(&self, credentials: Credentials) -> Result<Registered, Error> {
        if credentials.username.is_empty() || credentials.password.len() < 8 {
            return Err(Error::new(
                ErrorKind::Rejected,
                "a username and a password of at least 8 characters are required",
            ));
        }
        let user_id = uuid::Uuid::new_v4().to_string();
        let now = Utc::now();
        let user = User {
            password_sha256: password_hash(&user_id, &credentials.password),
            user_id: user_id.clone(),
            username: credentials.username.clone(),
            registered_unix_ms: now.timestamp_millis(),
        };
        // The user and user.registered commit together (a taken name
        // refuses both).
        let event = UserRegistered {
            user_id: user_id.clone(),
            username: credentials.username,
            registered_at: now,
        };
        self.store.register(&user, event, false).await?;
        Ok(Registered { user_id })
    }

    async fn issue(&self, credentials: &Credentials) -> Result<Token, Error> {
        let refused = || Error::new(ErrorKind::Unauthorized, "wrong username or password");
        let user = self
            .store
            .by_name(&credentials.username)
            .await?
            .ok_or_else(refused)?;
        if user.password_sha256 != password_hash(&user.user_id, &credentials.password) {
            return Err(refused());
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = TokenClaims {
            sub: &user.user_id,
            iss: ISSUER,
            aud: AUDIENCES,
            iat: now,
            exp: now + TOKEN_LIFETIME.as_secs(),
            name: &user.username,
        };
        let key = self.keys.lock().expect("keys lock").current().clone();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid);
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|error| Error::new(ErrorKind::Encode, format!("signing: {error}")))?;
        Ok(Token {
            token,
            expires_in_s: TOKEN_LIFETIME.as_secs(),
        })
    }

    async fn lookup(&self, user_id: &str) -> Result<pb::User, Error> {
        let user = self
            .store
            .by_id(user_id)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no user {user_id}")))?;
        Ok(pb::User {
            user_id: user.user_id,
            username: user.username,
            registered_unix_ms: user.registered_unix_ms,
        })
    }
}

impl AuthState {
    /// Saves `rotation`, announces it on the bus and, once the bus has it,
    /// makes it the key set: tokens are signed with a new key only after
    /// verifiers can learn it.
    async fn announce(&self, rotation: super::auth_keys::Rotation) -> Result<(), Error> {
        self.keys.lock().expect("keys lock").save(&rotation)?;
        let announcement = rotation.announcement.clone();
        self.bus.publish(announcement.clone()).await?;
        self.keys.lock().expect("keys lock").install(rotation)?;
        *self.announced.lock().expect("announced lock") = Some(announcement);
        Ok(())
    }

    async fn rotate(&self) -> Result<(), Error> {
        let _one_at_a_time = self.rotating.lock().await;
        let rotation = self
            .keys
            .lock()
            .expect("keys lock")
            .rotation(self.overlap)?;
        self.announce(rotation).await?;
        tracing::info!(kid = %self.keys.lock().expect("keys lock").current().kid, "signing key rotated");
        Ok(())
    }
}

/// Where Auth listens.
#[derive(Debug, Clone, Copy)]
pub struct AuthAddrs {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// A running Auth service.
pub struct AuthService {
    state: Arc<AuthState>,
    http: Option<Server>,
    grpc: Option<Server>,
    addrs: AuthAddrs,
    rotator: Option<tokio::task::JoinHandle<()>>,
    relays: Vec<RelayHandle>,
    console: ServiceConsole,
}

impl Drop for AuthService {
    fn drop(&mut self) {
        if let Some(rotator) = self.rotator.take() {
            rotator.abort();
        }
    }
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService")
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl AuthService {
    /// Starts Auth on `database` (its tables created if missing): loads
    /// (or, the first time, makes) its keys, announces them on the bus, then
    /// serves HTTP on `config.http` and gRPC on any free port, and relays
    /// its `user.registered` events.
    pub async fn start(
        brokers: &Brokers,
        database: &Database,
        config: AuthConfig,
    ) -> Result<Self, Error> {
        let keys = AuthKeys::load(config.keys.clone())?;
        let store = AuthStore::open(database, brokers).await?;
        // Building a verifier installs jsonwebtoken's crypto provider, which
        // signing needs too; it also proves the current key is usable.
        TokenVerifier::ed25519_pem(keys.current().public_key_pem.as_bytes(), ISSUER)?;
        let reannouncement = keys.reannouncement()?;
        let state = Arc::new(AuthState {
            store: store.clone(),
            keys: Mutex::new(keys),
            announced: Mutex::default(),
            rotating: tokio::sync::Mutex::default(),
            overlap: config.overlap,
            bus: brokers.events("auth-service"),
        });
        // The bus holds the current key set before the first token is out.
        state.announce(reannouncement).await?;
        let http = config.http;
        let http_listener = bind(http).await?;
        let grpc_listener = bind(SocketAddr::new(http.ip(), 0)).await?;
        let addrs = AuthAddrs {
            http: http_listener.local_addr().map_err(io)?,
            grpc: grpc_listener.local_addr().map_err(io)?,
        };
        let rotator = config.rotate_every.map(|every| {
            let state = Arc::downgrade(&state);
            tokio::spawn(async move {
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    ticks.tick().await;
                    let Some(state) = state.upgrade() else { return };
                    if let Err(error) = state.rotate().await {
                        // The old key keeps signing; the next tick tries again.
                        tracing::warn!(%error, "key rotation failed");
                    }
                }
            })
        });
        let relays = spawn_relays(store.store(), brokers.events.clone(), None);
        let console = super::console::service_console(
            "auth-service",
            brokers,
            &[],
            &[],
            None,
            &[],
            outbox_sources(store.store(), &relays),
        );
        let mut service = Self {
            state,
            http: None,
            grpc: None,
            addrs,
            rotator,
            relays,
            console,
        };
        service.serve(http_listener, grpc_listener);
        Ok(service)
    }

    /// Rotates the signing key now: a new key signs from here on, the old
    /// one verifies for the configured overlap, and the new key set is
    /// announced on the bus before the new key signs anything.
    pub async fn rotate_keys(&self) -> Result<(), Error> {
        self.state.rotate().await
    }

    /// The operator console's URL.
    pub fn console_url(&self) -> String {
        format!("http://{}{}", self.addrs.http, super::console::MOUNT)
    }

    /// The token the console's actions need.
    pub fn console_token(&self) -> &str {
        &self.console.token
    }

    /// The `kid` tokens are signed with now.
    pub fn current_kid(&self) -> String {
        self.state
            .keys
            .lock()
            .expect("keys lock")
            .current()
            .kid
            .clone()
    }

    /// The key-signing key's public half (PEM), which Trading and Game pin.
    pub fn trust_anchor_pem(&self) -> String {
        self.state
            .keys
            .lock()
            .expect("keys lock")
            .trust_anchor_pem()
            .to_owned()
    }

    fn serve(&mut self, http: tokio::net::TcpListener, grpc: tokio::net::TcpListener) {
        let router = router(self.state.clone(), self.addrs)
            .nest(super::console::MOUNT, self.console.console.router());
        self.http = Some(Server::http(http, router));
        let users = pb::users_server::UsersServer::new(UsersGrpc(self.state.clone()));
        self.grpc = Some(Server::grpc(grpc, tonic::service::Routes::new(users)));
    }

    /// Restores a user under a known id (an operator's repair, as from a
    /// backup) and publishes `user.registered` for it.
    pub async fn restore_user(&self, user_id: &str, username: &str) -> Result<(), Error> {
        let now = Utc::now();
        let user = User {
            user_id: user_id.to_owned(),
            username: username.to_owned(),
            // No password matches: the user must reset it.
            password_sha256: String::new(),
            registered_unix_ms: now.timestamp_millis(),
        };
        let event = UserRegistered {
            user_id: user_id.to_owned(),
            username: username.to_owned(),
            registered_at: now,
        };
        self.state.store.register(&user, event, true).await
    }

    /// Where it listens.
    pub fn addrs(&self) -> AuthAddrs {
        self.addrs
    }

    /// The public key of the current signing key.
    pub fn public_key_pem(&self) -> String {
        self.state
            .keys
            .lock()
            .expect("keys lock")
            .current()
            .public_key_pem
            .clone()
    }

    /// Takes both servers down (the users stay in the database, the relay
    /// keeps sending).
    pub async fn stop(&mut self) {
        stop_all(self.http.take().into_iter().chain(self.grpc.take())).await;
    }

    /// Serves again on the same ports.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.stop().await;
        let http = bind(self.addrs.http).await?;
        let grpc = bind(self.addrs.grpc).await?;
        self.serve(http, grpc);
        Ok(())
    }

    /// Stops the servers and the relay.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop().await;
        close_relays(&mut self.relays).await
    }
}

fn io(error: std::io::Error) -> Error {
    Error::new(ErrorKind::Connection, error.to_string())
}

fn router(state: Arc<AuthState>, addrs: AuthAddrs) -> Router {
    Router::new()
        .route(
            "/health",
            get(|State(state): State<Arc<AuthState>>| async move {
                super::brokers::health_response(&[&state.bus])
            }),
        )
        .route(
            "/v1/endpoints",
            get(move || async move { Json(serde_json::json!({ "grpc": addrs.grpc.to_string() })) }),
        )
        .route(
            "/v1/public-key",
            get(|State(state): State<Arc<AuthState>>| async move {
                state
                    .keys
                    .lock()
                    .expect("keys lock")
                    .current()
                    .public_key_pem
                    .clone()
            }),
        )
        .route(
            "/v1/keys",
            get(|State(state): State<Arc<AuthState>>| async move {
                Json(state.announced.lock().expect("announced lock").clone())
            }),
        )
        .route(
            "/v1/users",
            post(
                |State(state): State<Arc<AuthState>>,
                 JsonBody(credentials): JsonBody<Credentials>| async move {
                    state
                        .register(credentials)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .route(
            "/v1/tokens",
            post(
                |State(state): State<Arc<AuthState>>,
                 JsonBody(credentials): JsonBody<Credentials>| async move {
                    state
                        .issue(&credentials)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .with_state(state)
}

struct UsersGrpc(Arc<AuthState>);

#[tonic::async_trait]
impl pb::users_server::Users for UsersGrpc {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.0
            .lookup(&request.into_inner().user_id)
            .await
            .map(Response::new)
            .map_err(|error| status_from_error(&error))
    }
}
