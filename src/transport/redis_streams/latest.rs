//! Reading a stream's newest entry without a group, for
//! [`Transport::read_latest`](crate::Transport::read_latest).

use redis::streams::StreamRangeReply;

use super::FIELD_REDRIVE_GROUP;
use super::connection::Conn;
use super::fields::message_from_fields;
use super::reply::StreamEntry;
use crate::error::Error;
use crate::transport::RawMessage;
use crate::transport::redis_support::redis_error;

/// Entries looked at from the end: a redrive appends copies marked for one
/// group, which are not the stream's newest announcement; past this many in
/// a row the newest of them is taken rather than reading the whole stream.
const LOOK_BACK: usize = 16;

/// The newest entry of `stream` that is not a redriven copy (or the newest
/// redriven one when the last [`LOOK_BACK`] all are).
pub(super) async fn read_latest(mut conn: Conn, stream: &str) -> Result<Option<RawMessage>, Error> {
    let reply: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(LOOK_BACK)
        .query_async(&mut conn)
        .await
        .map_err(|error| redis_error("XREVRANGE latest", error))?;
    let newest_original = reply
        .ids
        .iter()
        .position(|entry| !entry.map.contains_key(FIELD_REDRIVE_GROUP))
        .unwrap_or(0);
    Ok(reply
        .ids
        .into_iter()
        .nth(newest_original)
        .map(|entry| message_from_fields(StreamEntry::from(entry).fields).0))
}
