//! The wire format: a message's body alone, or the `\0SB1` frame with its
//! headers (see the module docs, "Wire format").

use bytes::Bytes;

use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};
use crate::transport::RawMessage;

/// The first bytes of a framed payload (see the [module docs](super)).
pub const FRAME_MAGIC: &[u8; 4] = b"\0SB1";

/// Turns a message into the bytes to PUBLISH: the body alone when there are
/// no headers, otherwise the frame described in the [module docs](super).
///
/// ```
/// use switchboard::RawMessage;
/// use switchboard::transport::redis_pubsub::{decode_payload, encode_payload, FRAME_MAGIC};
///
/// let plain = encode_payload(&RawMessage::new(r#"{"event_id":"1"}"#))?;
/// assert_eq!(plain.as_ref(), br#"{"event_id":"1"}"#);
///
/// let message = RawMessage::new("body").with_header("correlation-id", "7");
/// let framed = encode_payload(&message)?;
/// assert!(framed.starts_with(FRAME_MAGIC));
/// assert_eq!(decode_payload(framed), message);
/// # Ok::<(), switchboard::Error>(())
/// ```
pub fn encode_payload(message: &RawMessage) -> Result<Bytes, Error> {
    if message.headers.is_empty() && !message.body.starts_with(FRAME_MAGIC) {
        return Ok(message.body.clone());
    }
    let headers = serde_json::to_vec(&message.headers).map_err(|error| {
        Error::new(ErrorKind::Encode, "headers of a pub/sub message").with_source(error)
    })?;
    let length = u32::try_from(headers.len()).map_err(|_| {
        Error::new(
            ErrorKind::Encode,
            format!("headers of {} bytes do not fit a frame", headers.len()),
        )
    })?;
    let mut frame = Vec::with_capacity(FRAME_MAGIC.len() + 4 + headers.len() + message.body.len());
    frame.extend_from_slice(FRAME_MAGIC);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&headers);
    frame.extend_from_slice(&message.body);
    Ok(frame.into())
}

/// Turns received bytes back into a message. A payload without
/// [`FRAME_MAGIC`] — such as strategy §5.1 JSON sent by `redis-cli PUBLISH` — is
/// the body, with no headers; so is a frame whose header block is damaged
/// (logged as a warning), so the consumer still sees it.
///
/// ```
/// use switchboard::transport::redis_pubsub::decode_payload;
///
/// let message = decode_payload(r#"{"event_type":"price.updated"}"#.into());
/// assert!(message.headers.is_empty());
/// assert_eq!(message.body.as_ref(), br#"{"event_type":"price.updated"}"#);
/// ```
pub fn decode_payload(payload: Bytes) -> RawMessage {
    let Some(rest) = payload.strip_prefix(FRAME_MAGIC.as_slice()) else {
        return RawMessage::new(payload);
    };
    let unframed = rest.split_first_chunk::<4>().and_then(|(length, rest)| {
        let length = u32::from_be_bytes(*length) as usize;
        let headers = serde_json::from_slice::<Headers>(rest.get(..length)?).ok()?;
        Some((headers, FRAME_MAGIC.len() + 4 + length))
    });
    match unframed {
        Some((headers, body_start)) => RawMessage {
            headers,
            body: payload.slice(body_start..),
        },
        None => {
            tracing::warn!(
                bytes = payload.len(),
                "pub/sub frame with a damaged header block; delivered whole as the body"
            );
            RawMessage::new(payload)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_plain_payloads_are_bodies() {
        let message = RawMessage::new("ü body").with_header("a", "1 \"q\"");
        assert_eq!(decode_payload(encode_payload(&message).unwrap()), message);

        let plain = RawMessage::new(r#"{"event_id":"x"}"#);
        let encoded = encode_payload(&plain).unwrap();
        assert_eq!(encoded, plain.body, "no headers: the body alone");
        assert_eq!(decode_payload(encoded), plain);
    }

    #[test]
    fn a_headerless_body_that_looks_framed_is_framed_to_survive() {
        let tricky = RawMessage::new(Bytes::from_static(b"\0SB1 not a frame"));
        let encoded = encode_payload(&tricky).unwrap();
        assert_ne!(encoded, tricky.body);
        assert_eq!(decode_payload(encoded), tricky);
    }

    #[test]
    fn damaged_frames_are_delivered_whole() {
        for damaged in [&b"\0SB1"[..], b"\0SB1\0\0\0\x09{}", b"\0SB1\0\0\0\x02[]x"] {
            let message = decode_payload(Bytes::copy_from_slice(damaged));
            assert!(message.headers.is_empty());
            assert_eq!(message.body.as_ref(), damaged);
        }
    }
}
