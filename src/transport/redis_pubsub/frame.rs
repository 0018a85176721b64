//! The wire format: a message's body alone, or a frame with its headers —
//! `\0SB1` (headers as JSON) or `\0SB2` (headers length-prefixed, no JSON);
//! see the module docs, "Wire format".

use bytes::{Buf, BufMut, Bytes};

use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};
use crate::transport::RawMessage;

/// The first bytes of a version 1 frame: headers as a JSON object (see the
/// [module docs](super)).
pub const FRAME_MAGIC: &[u8; 4] = b"\0SB1";
/// The first bytes of a version 2 frame: headers length-prefixed, no JSON
/// (see the [module docs](super)).
pub const FRAME_MAGIC_V2: &[u8; 4] = b"\0SB2";
/// What every frame starts with; a headerless body that starts so is framed
/// too, so no reader takes it for a frame.
const FRAME_PREFIX: &[u8; 3] = b"\0SB";

/// Which frame a publisher writes for a message with headers. Readers take
/// both, whatever they write.
///
/// Version 2 spares the JSON encoding and decoding of every message's
/// headers. A reader of an earlier release knows only version 1 and would
/// take a version 2 frame whole as the body: switch writers to `V2` only
/// once every subscriber runs a release that reads it (this one or later).
/// The default stays `V1` for this release and becomes `V2` in the next.
///
/// ```
/// use switchboard::RawMessage;
/// use switchboard::transport::redis_pubsub::{
///     decode_payload, encode_payload_with, FrameVersion, FRAME_MAGIC_V2,
/// };
///
/// let message = RawMessage::new("body").with_header("correlation-id", "7");
/// let framed = encode_payload_with(&message, FrameVersion::V2)?;
/// assert!(framed.starts_with(FRAME_MAGIC_V2));
/// assert_eq!(decode_payload(framed), message);
/// # Ok::<(), switchboard::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FrameVersion {
    /// `\0SB1`: headers as a JSON object; every release reads it.
    #[default]
    V1,
    /// `\0SB2`: headers length-prefixed; read by this release and later.
    V2,
}

/// Turns a message into the bytes to PUBLISH: the body alone when there are
/// no headers, otherwise the version 1 frame described in the
/// [module docs](super) ([`encode_payload_with`] chooses the version).
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
    encode_payload_with(message, FrameVersion::V1)
}

/// [`encode_payload`] with the frame `version` for a message with headers.
///
/// Version 2 refuses (with [`ErrorKind::Encode`]) a header name longer than
/// 65 535 bytes, as version 1 refuses a header block over 4 GiB.
pub fn encode_payload_with(message: &RawMessage, version: FrameVersion) -> Result<Bytes, Error> {
    if message.headers.is_empty() && !message.body.starts_with(FRAME_PREFIX) {
        return Ok(message.body.clone());
    }
    match version {
        FrameVersion::V1 => encode_v1(message),
        FrameVersion::V2 => encode_v2(message),
    }
}

fn encode_v1(message: &RawMessage) -> Result<Bytes, Error> {
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

/// `\0SB2 | count: u16 | (name length: u16 | name | value length: u32 |
/// value) × count | body`, big-endian: one allocation, no JSON.
fn encode_v2(message: &RawMessage) -> Result<Bytes, Error> {
    let too_many = || {
        Error::new(
            ErrorKind::Encode,
            format!(
                "{} headers do not fit a frame (at most 65 535)",
                message.headers.len()
            ),
        )
    };
    let count = u16::try_from(message.headers.len()).map_err(|_| too_many())?;
    let size = message
        .headers
        .iter()
        .map(|(name, value)| 2 + name.len() + 4 + value.len())
        .sum::<usize>();
    let mut frame = Vec::with_capacity(FRAME_MAGIC_V2.len() + 2 + size + message.body.len());
    frame.extend_from_slice(FRAME_MAGIC_V2);
    frame.put_u16(count);
    for (name, value) in &message.headers {
        let name_length = u16::try_from(name.len()).map_err(|_| {
            Error::new(
                ErrorKind::Encode,
                format!("a header name of {} bytes does not fit a frame", name.len()),
            )
        })?;
        let value_length = u32::try_from(value.len()).map_err(|_| {
            Error::new(
                ErrorKind::Encode,
                format!(
                    "a header value of {} bytes does not fit a frame",
                    value.len()
                ),
            )
        })?;
        frame.put_u16(name_length);
        frame.extend_from_slice(name.as_bytes());
        frame.put_u32(value_length);
        frame.extend_from_slice(value.as_bytes());
    }
    frame.extend_from_slice(&message.body);
    Ok(frame.into())
}

/// Turns received bytes back into a message, whichever frame version it
/// is. A payload without a frame's magic — such as strategy §5.1 JSON sent
/// by `redis-cli PUBLISH` — is the body, with no headers; so is a frame
/// whose header block is damaged (logged as a warning), so the consumer
/// still sees it.
///
/// ```
/// use switchboard::transport::redis_pubsub::decode_payload;
///
/// let message = decode_payload(r#"{"event_type":"price.updated"}"#.into());
/// assert!(message.headers.is_empty());
/// assert_eq!(message.body.as_ref(), br#"{"event_type":"price.updated"}"#);
/// ```
pub fn decode_payload(payload: Bytes) -> RawMessage {
    match unframe(&payload) {
        Some((headers, head)) => RawMessage {
            headers,
            body: payload.slice(head..),
        },
        None => RawMessage::new(payload),
    }
}

/// [`decode_payload`] of a payload received into a buffer of its own (as
/// redis-rs hands it over): the body is that buffer with its start moved
/// past the frame's head. `Bytes::slice` would allocate a shared header
/// per message.
pub(super) fn decode_owned(payload: Vec<u8>) -> RawMessage {
    let mut body = Bytes::from(payload);
    match unframe(&body) {
        Some((headers, head)) => {
            body.advance(head);
            RawMessage { headers, body }
        }
        None => RawMessage::new(body),
    }
}

/// The headers of a framed payload and the length of its head (magic and
/// header block); `None` for a payload without a frame, or with a damaged
/// header block (logged), whose bytes are the body whole.
fn unframe(payload: &[u8]) -> Option<(Headers, usize)> {
    let unframed = if let Some(rest) = payload.strip_prefix(FRAME_MAGIC.as_slice()) {
        decode_v1(rest)
    } else if let Some(rest) = payload.strip_prefix(FRAME_MAGIC_V2.as_slice()) {
        decode_v2(rest)
    } else {
        return None;
    };
    if unframed.is_none() {
        tracing::warn!(
            bytes = payload.len(),
            "pub/sub frame with a damaged header block; delivered whole as the body"
        );
    }
    // Both magics are as long as each other.
    unframed.map(|(headers, header_block)| (headers, FRAME_MAGIC.len() + header_block))
}

/// The headers of a version 1 frame and the length of its header block.
fn decode_v1(rest: &[u8]) -> Option<(Headers, usize)> {
    let (length, rest) = rest.split_first_chunk::<4>()?;
    let length = u32::from_be_bytes(*length) as usize;
    let headers = serde_json::from_slice::<Headers>(rest.get(..length)?).ok()?;
    Some((headers, 4 + length))
}

/// The headers of a version 2 frame and the length of its header block.
fn decode_v2(block: &[u8]) -> Option<(Headers, usize)> {
    let (count, mut rest) = block.split_first_chunk::<2>()?;
    let mut headers = Headers::new();
    for _ in 0..u16::from_be_bytes(*count) {
        let (name, after_name) = take(rest, 2)?;
        let (value, after_value) = take(after_name, 4)?;
        headers.insert(
            std::str::from_utf8(name).ok()?.to_owned(),
            std::str::from_utf8(value).ok()?.to_owned(),
        );
        rest = after_value;
    }
    Some((headers, block.len() - rest.len()))
}

/// A field of `prefix` (2 or 4) length bytes, big-endian, then as many bytes.
fn take(bytes: &[u8], prefix: usize) -> Option<(&[u8], &[u8])> {
    let (length, rest) = bytes.split_at_checked(prefix)?;
    let length = length
        .iter()
        .fold(0_usize, |length, byte| length << 8 | usize::from(*byte));
    rest.split_at_checked(length)
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
    fn version_2_frames_round_trip_and_read_beside_version_1() {
        let message = RawMessage::new("ü body")
            .with_header("a", "1 \"q\"")
            .with_header("event-id", "")
            .with_header("ü", "ß");
        let v2 = encode_payload_with(&message, FrameVersion::V2).unwrap();
        assert!(v2.starts_with(FRAME_MAGIC_V2));
        assert_eq!(decode_payload(v2.clone()), message);
        let v1 = encode_payload_with(&message, FrameVersion::V1).unwrap();
        assert!(v2.len() < v1.len(), "no JSON quoting");
        assert_eq!(decode_payload(v1), message);

        let plain = RawMessage::new("x");
        assert_eq!(
            encode_payload_with(&plain, FrameVersion::V2).unwrap(),
            plain.body
        );
        let tricky = RawMessage::new(Bytes::from_static(b"\0SB2 not a frame"));
        for version in [FrameVersion::V1, FrameVersion::V2] {
            let encoded = encode_payload_with(&tricky, version).unwrap();
            assert_ne!(encoded, tricky.body, "a body that looks framed is framed");
            assert_eq!(decode_payload(encoded), tricky);
        }
    }

    #[test]
    fn a_header_name_too_long_for_version_2_is_refused() {
        let message = RawMessage::new("x").with_header("n".repeat(70_000), "v");
        let error = encode_payload_with(&message, FrameVersion::V2).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Encode);
    }

    #[test]
    fn damaged_frames_are_delivered_whole() {
        for damaged in [
            &b"\0SB1"[..],
            b"\0SB1\0\0\0\x09{}",
            b"\0SB1\0\0\0\x02[]x",
            b"\0SB2",
            b"\0SB2\0\x01\0\x01a\0\0\0\x05b",
            b"\0SB2\0\x01\0\x01\xff\0\0\0\x01b",
        ] {
            let message = decode_payload(Bytes::copy_from_slice(damaged));
            assert!(message.headers.is_empty());
            assert_eq!(message.body.as_ref(), damaged);
            assert_eq!(decode_owned(damaged.to_vec()), message);
        }
    }

    #[test]
    fn an_owned_buffer_reads_as_every_frame_and_plain_payload_does() {
        let message = RawMessage::new("ü body").with_header("a", "1 \"q\"");
        for payload in [
            encode_payload(&message).unwrap(),
            encode_payload_with(&message, FrameVersion::V2).unwrap(),
            Bytes::from_static(br#"{"event_type":"price.updated"}"#),
            Bytes::new(),
        ] {
            let owned = decode_owned(payload.to_vec());
            assert_eq!(owned, decode_payload(payload));
        }
        assert_eq!(
            decode_owned(encode_payload(&message).unwrap().to_vec()),
            message
        );
    }
}
