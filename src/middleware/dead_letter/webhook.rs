//! A [`DeadLetterAlert`] that posts to a webhook, in the JSON Alertmanager
//! sends to its webhook receivers — or, pointed at Alertmanager itself, in
//! the JSON its `POST /api/v2/alerts` takes.

use std::fmt;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{DeadLetterAlert, DeadLetterFacts};
use crate::error::{Error, ErrorKind};
use crate::transport::redact::redact_url;

/// The `alertname` label of every alert a [`WebhookAlert`] sends.
pub const DEAD_LETTER_ALERT_NAME: &str = "SwitchboardDeadLetter";

/// Which JSON a [`WebhookAlert`] posts.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFormat {
    /// Alertmanager's webhook payload (`"version": "4"`, `status`,
    /// `alerts[]` with labels, annotations and `startsAt`): what a receiver
    /// written for Alertmanager's `webhook_configs` already reads.
    #[default]
    AlertmanagerWebhook,
    /// An array of alerts, as Alertmanager's `POST /api/v2/alerts` takes
    /// them: point the URL at Alertmanager, and its routes, silences and
    /// inhibitions apply to dead letters too.
    AlertmanagerApi,
}

/// Posts every dead letter to a webhook, from a task of its own: the
/// consumer that dead-lettered the message never waits for the webhook.
///
/// Each alert carries the labels `alertname` ([`DEAD_LETTER_ALERT_NAME`]),
/// `severity` (`warning`), `topic`, `group`, `event_type` and `event_id`, and
/// the annotations `summary`, `description`, `reason`, `last_error` and
/// `attempts`. Alerts raised while a post is on its way go together in the
/// next one (at most [`MAX_ALERTS_PER_POST`]). A post that fails for a
/// reason worth retrying (no connection, a timeout, 429 or 5xx) is sent
/// again with exponential backoff, up to [`with_attempts`](Self::with_attempts)
/// times in all; then, or on another 4xx, its alerts are dropped with an
/// `error!` log — the dead letters themselves stay in their queue. At most
/// [`with_capacity`](Self::with_capacity) alerts wait (1 024 by default);
/// past that an alert is dropped with a `warn!` and counted in
/// `switchboard_dropped_total{transport="webhook",reason="alert_queue_full"}`.
///
/// Create it inside a Tokio runtime; the task ends once every clone of the
/// alert has been dropped and what waited has been posted.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), switchboard::Error> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use switchboard::config::ResilienceConfig;
/// use switchboard::middleware::Resilience;
/// use switchboard::middleware::dead_letter::{WebhookAlert, WebhookFormat};
///
/// let alert = WebhookAlert::new("http://alertmanager:9093/api/v2/alerts")?
///     .with_format(WebhookFormat::AlertmanagerApi)
///     .with_header("authorization", "Bearer s3cret")?
///     .with_timeout(Duration::from_secs(2));
/// let resilience = Resilience::new(ResilienceConfig::default()).with_alert(Arc::new(alert));
/// # let _ = resilience;
/// # Ok(())
/// # }
/// ```
pub struct WebhookAlert {
    url: String,
    format: WebhookFormat,
    headers: reqwest::header::HeaderMap,
    timeout: Duration,
    attempts: usize,
    capacity: usize,
    queue: std::sync::OnceLock<mpsc::Sender<DeadLetterFacts>>,
}

/// The most alerts one post carries.
pub const MAX_ALERTS_PER_POST: usize = 64;

impl WebhookAlert {
    /// An alert that posts to `url` (`http://` or `https://`, the latter
    /// with feature `http-tls`). Refused ([`ErrorKind::Rejected`]) when the
    /// URL does not parse.
    pub fn new(url: impl Into<String>) -> Result<Self, Error> {
        let url = url.into();
        reqwest::Url::parse(&url).map_err(|error| {
            Error::new(
                ErrorKind::Rejected,
                format!("bad webhook URL {}: {error}", redact_url(&url)),
            )
        })?;
        Ok(Self {
            url,
            format: WebhookFormat::default(),
            headers: reqwest::header::HeaderMap::new(),
            timeout: Duration::from_secs(5),
            attempts: 3,
            capacity: 1_024,
            queue: std::sync::OnceLock::new(),
        })
    }

    /// Which JSON to post (Alertmanager's webhook payload by default).
    pub fn with_format(mut self, format: WebhookFormat) -> Self {
        self.format = format;
        self
    }

    /// A header sent with every post, such as `authorization`. Refused
    /// ([`ErrorKind::Rejected`]) when the name or value is not valid in HTTP.
    pub fn with_header(mut self, name: &str, value: &str) -> Result<Self, Error> {
        let bad =
            |what: &str| Error::new(ErrorKind::Rejected, format!("bad webhook header {what}"));
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad(&format!("name {name:?}")))?;
        let mut value = reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| bad(&format!("value for {name}")))?;
        value.set_sensitive(true);
        self.headers.insert(name, value);
        Ok(self)
    }

    /// How long one post may take (5 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times a post is tried in all before its alerts are dropped
    /// (3 by default; at least 1).
    pub fn with_attempts(mut self, attempts: usize) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// How many alerts may wait to be posted (1 024 by default; at least 1).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The queue to the posting task, started on the first alert (so the
    /// builder methods above need no runtime).
    fn queue(&self) -> Option<&mpsc::Sender<DeadLetterFacts>> {
        if let Some(queue) = self.queue.get() {
            return Some(queue);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .default_headers(self.headers.clone())
            .build()
            .ok()?;
        let (sender, receiver) = mpsc::channel(self.capacity);
        let poster = Poster {
            client,
            url: self.url.clone(),
            format: self.format,
            attempts: self.attempts,
        };
        if self.queue.set(sender).is_ok() {
            runtime.spawn(poster.run(receiver));
        }
        self.queue.get()
    }
}

impl DeadLetterAlert for WebhookAlert {
    fn alert(&self, facts: &DeadLetterFacts) {
        let Some(queue) = self.queue() else {
            tracing::error!(
                url = %redact_url(&self.url),
                topic = %facts.topic,
                "dead-letter webhook: no Tokio runtime or HTTP client; alert dropped"
            );
            return;
        };
        if queue.try_send(facts.clone()).is_err() {
            tracing::warn!(
                url = %redact_url(&self.url),
                topic = %facts.topic,
                event_id = %facts.event_id,
                "dead-letter webhook: {} alerts already wait; alert dropped",
                self.capacity
            );
            crate::observe::metrics::dropped(
                "webhook",
                facts.topic.as_str().into(),
                "alert_queue_full",
            );
        }
    }
}

impl fmt::Debug for WebhookAlert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookAlert")
            .field("url", &redact_url(&self.url))
            .field("format", &self.format)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// The posting task's side.
struct Poster {
    client: reqwest::Client,
    url: String,
    format: WebhookFormat,
    attempts: usize,
}

impl Poster {
    async fn run(self, mut queue: mpsc::Receiver<DeadLetterFacts>) {
        let mut batch = Vec::with_capacity(MAX_ALERTS_PER_POST);
        while queue.recv_many(&mut batch, MAX_ALERTS_PER_POST).await > 0 {
            self.post(&batch).await;
            batch.clear();
        }
    }

    async fn post(&self, batch: &[DeadLetterFacts]) {
        let body = match self.format {
            WebhookFormat::AlertmanagerWebhook => webhook_payload(batch),
            WebhookFormat::AlertmanagerApi => Value::Array(batch.iter().map(alert_of).collect()),
        }
        .to_string();
        // Shared by every attempt, not copied for each.
        let body = bytes::Bytes::from(body);
        let mut pauses = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        for attempt in 1..=self.attempts {
            let sent = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            let (retry, why) = match sent {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => {
                    let status = response.status();
                    (
                        status.is_server_error()
                            || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
                        format!("answered {status}"),
                    )
                }
                Err(error) => (true, error.without_url().to_string()),
            };
            if !retry || attempt == self.attempts {
                tracing::error!(
                    url = %redact_url(&self.url),
                    alerts = batch.len(),
                    attempts = attempt,
                    "dead-letter webhook {why}; alerts dropped (the dead letters stay in their queue)"
                );
                return;
            }
            tracing::warn!(url = %redact_url(&self.url), attempt, "dead-letter webhook {why}; posting again");
            tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(5))).await;
        }
    }
}

/// Alertmanager's webhook payload for `batch`, as its `webhook_configs`
/// receivers get it.
fn webhook_payload(batch: &[DeadLetterFacts]) -> Value {
    let group_labels = json!({ "alertname": DEAD_LETTER_ALERT_NAME });
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{DEAD_LETTER_ALERT_NAME}\"}}"),
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "switchboard",
        "groupLabels": group_labels,
        "commonLabels": { "alertname": DEAD_LETTER_ALERT_NAME, "severity": "warning" },
        "commonAnnotations": {},
        "externalURL": "",
        "alerts": batch.iter().map(|facts| {
            let mut alert = alert_of(facts);
            alert["status"] = json!("firing");
            alert["endsAt"] = json!("0001-01-01T00:00:00Z");
            alert["fingerprint"] = json!(facts.event_id.simple().to_string());
            alert
        }).collect::<Vec<_>>(),
    })
}

/// One alert: labels, annotations and when it started.
fn alert_of(facts: &DeadLetterFacts) -> Value {
    json!({
        "labels": {
            "alertname": DEAD_LETTER_ALERT_NAME,
            "severity": "warning",
            "topic": facts.topic,
            "group": facts.group,
            "event_type": facts.event_type,
            "event_id": facts.event_id.to_string(),
        },
        "annotations": {
            "summary": format!("Dead letter on {} (group {})", facts.topic, facts.group),
            "description": format!(
                "{} {} was dead-lettered after {} attempts: {}. Inspect and redrive it once the cause is fixed.",
                facts.event_type, facts.event_id, facts.attempts, facts.reason
            ),
            "reason": facts.reason,
            "last_error": facts.last_error,
            "attempts": facts.attempts.to_string(),
        },
        "startsAt": facts.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "generatorURL": "",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> DeadLetterFacts {
        DeadLetterFacts {
            topic: "trade.executed".into(),
            group: "game".into(),
            event_id: uuid::Uuid::nil(),
            event_type: "trade.executed".into(),
            reason: "rejected".into(),
            attempts: 3,
            last_error: "no such user".into(),
            at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_webhook_payload_is_alertmanagers() {
        let payload = webhook_payload(&[facts()]);
        assert_eq!(payload["version"], "4");
        assert_eq!(payload["status"], "firing");
        let alert = &payload["alerts"][0];
        assert_eq!(alert["status"], "firing");
        assert_eq!(alert["labels"]["alertname"], DEAD_LETTER_ALERT_NAME);
        assert_eq!(alert["labels"]["topic"], "trade.executed");
        assert_eq!(alert["annotations"]["last_error"], "no such user");
        assert_eq!(alert["startsAt"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn bad_urls_and_headers_are_refused_without_their_secrets() {
        let error = WebhookAlert::new("http://u:s3cret@[::1").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        assert!(!error.to_string().contains("s3cret"), "{error}");
        let alert = WebhookAlert::new("http://u:s3cret@127.0.0.1:1/hook").unwrap();
        assert!(!format!("{alert:?}").contains("s3cret"));
        let error = alert.with_header("bad name", "x").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
    }

    #[test]
    fn without_a_runtime_an_alert_is_dropped_not_a_panic() {
        WebhookAlert::new("http://127.0.0.1:1/hook")
            .unwrap()
            .alert(&facts());
    }
}
