//! The publishing side: one `POST /events/{topic}` per attempt (the retry
//! loop is [`push::publish`](crate::transport::push)'s).

use std::fmt::Write as _;

use async_trait::async_trait;
use axum::http::{StatusCode, header};

use super::client::error_from_reqwest;
use super::{
    ATTEMPT, GROUP, HEADERS, HttpTransport, REFUSED, REFUSED_QUEUE_FULL, error_from_response,
};
use crate::envelope::Headers;
use crate::transport::push::{PushRequest, PushSender, SendError};

#[async_trait]
impl PushSender for HttpTransport {
    async fn send(&self, url: &str, request: PushRequest<'_>) -> Result<(), SendError> {
        let url = format!("{}/events/{}", url.trim_end_matches('/'), request.topic);
        let mut builder = self
            .inner
            .client
            .post(url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(ATTEMPT, request.attempt)
            .body(request.message.body.clone());
        if !request.message.headers.is_empty() {
            builder = builder.header(HEADERS, ascii_json(&request.message.headers));
        }
        if let Some(group) = request.group {
            builder = builder.header(GROUP, group);
        }
        if let Some(signing) = &self.inner.signing {
            // A new id and time on every attempt: the receiver refuses an
            // id it has seen, so a retry must not look like a replay.
            for (name, value) in signing.sign(&request.message.body) {
                builder = builder.header(name, value);
            }
        }
        let response = builder.send().await.map_err(error_from_reqwest)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let headers = response.headers().clone();
        // Error bodies are small; a broken one still leaves the status.
        let body = response.bytes().await.unwrap_or_default();
        let error = error_from_response(status, &headers, &body);
        let refused = status == StatusCode::SERVICE_UNAVAILABLE
            && headers
                .get(REFUSED)
                .is_some_and(|value| value == REFUSED_QUEUE_FULL);
        Err(if refused {
            SendError::Refused(error)
        } else {
            SendError::Failed(error)
        })
    }
}

/// JSON with every character outside printable ASCII escaped, which JSON
/// allows inside strings (and nowhere else is there any).
fn ascii_json(headers: &Headers) -> String {
    let json = serde_json::to_string(headers).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if (' '..='~').contains(&ch) {
            out.push(ch);
        } else {
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn header_json_is_ascii_and_round_trips_anything() {
        let headers: Headers = [
            (
                "Cf-Note".to_owned(),
                "spaces ;:,=/ \"quotes\" \\ ü✓ 😀 \t\n\u{7f}".to_owned(),
            ),
            ("lower".to_owned(), String::new()),
        ]
        .into_iter()
        .collect();
        let text = ascii_json(&headers);
        assert!(HeaderValue::from_str(&text).is_ok(), "{text}");
        assert!(text.bytes().all(|b| (b' '..=b'~').contains(&b)), "{text}");
        let back: Headers = serde_json::from_str(&text).unwrap();
        assert_eq!(back, headers);
    }
}
