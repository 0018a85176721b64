//! sqlx errors as the crate's [`Error`], with the right retryability.

use crate::error::{Effect, Error, ErrorKind};

/// PostgreSQL SQLSTATE classes and codes that pass on their own: a
/// serialization failure or deadlock (the transaction is to be run again),
/// a server shutting down or out of resources, a lost connection.
fn postgres_kind(code: &str) -> ErrorKind {
    match code {
        // serialization_failure, deadlock_detected, lock_not_available
        "40001" | "40P01" | "55P03" => ErrorKind::Unavailable,
        // query_canceled (statement_timeout)
        "57014" => ErrorKind::Timeout,
        // admin_shutdown, crash_shutdown, cannot_connect_now
        "57P01" | "57P02" | "57P03" => ErrorKind::Connection,
        _ if code.starts_with("08") => ErrorKind::Connection,
        // insufficient_resources (too many connections, disk full)
        _ if code.starts_with("53") => ErrorKind::Unavailable,
        // undefined_table and friends: migrate() was not run
        "42P01" | "42703" => ErrorKind::Config,
        _ => ErrorKind::Rejected,
    }
}

/// SQLite's primary result codes (the low byte of the extended code):
/// `SQLITE_BUSY` (5) and `SQLITE_LOCKED` (6) pass once the other writer is
/// done; others are the statement's or the file's problem.
fn sqlite_kind(code: &str) -> ErrorKind {
    let primary = code.parse::<i64>().map(|code| code & 0xff).unwrap_or(-1);
    match primary {
        5 | 6 => ErrorKind::Unavailable,
        // SQLITE_IOERR, SQLITE_CANTOPEN
        10 | 14 => ErrorKind::Connection,
        _ => ErrorKind::Rejected,
    }
}

/// Maps a sqlx error to an [`Error`]: lost connections, pool time-outs,
/// deadlocks and busy databases are retryable; bad statements, constraint
/// violations and missing tables (kind `Config`: run `migrate()`) are not.
pub(crate) fn from_sqlx(context: &'static str, error: sqlx::Error) -> Error {
    let kind = match &error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
            ErrorKind::Connection
        }
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::PoolClosed => ErrorKind::Closed,
        sqlx::Error::WorkerCrashed => ErrorKind::Connection,
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        sqlx::Error::RowNotFound => ErrorKind::NotFound,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => ErrorKind::Decode,
        sqlx::Error::Database(database) => match database.code() {
            Some(code)
                if database
                    .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                    .is_some() =>
            {
                sqlite_kind(&code)
            }
            Some(code) => postgres_kind(&code),
            None => ErrorKind::Rejected,
        },
        _ => ErrorKind::Unavailable,
    };
    // A statement whose connection failed may or may not have run; inside a
    // transaction nothing of it commits, so only the kind matters to callers.
    let effect = match kind {
        ErrorKind::Connection | ErrorKind::Timeout => Effect::Unknown,
        _ => Effect::NotApplied,
    };
    Error::new(kind, format!("{context}: {error}"))
        .with_effect(effect)
        .with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_codes_say_whether_to_retry() {
        assert!(postgres_kind("40001").is_retryable());
        assert!(postgres_kind("40P01").is_retryable());
        assert!(postgres_kind("08006").is_retryable());
        assert!(postgres_kind("57P01").is_retryable());
        assert!(!postgres_kind("23505").is_retryable());
        assert_eq!(postgres_kind("42P01"), ErrorKind::Config);
    }

    #[test]
    fn sqlite_busy_is_retryable() {
        assert!(sqlite_kind("5").is_retryable());
        assert!(sqlite_kind("517").is_retryable()); // SQLITE_BUSY_SNAPSHOT
        assert!(!sqlite_kind("19").is_retryable()); // SQLITE_CONSTRAINT
    }

    #[test]
    fn pool_errors_map_to_kinds() {
        assert_eq!(
            from_sqlx("x", sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Timeout
        );
        assert_eq!(
            from_sqlx("x", sqlx::Error::PoolClosed).kind(),
            ErrorKind::Closed
        );
    }
}
