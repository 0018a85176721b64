//! Nothing secret reaches a log line, an error or a `Debug`: every
//! transport is connected with a password it cannot use (URLs that do not
//! parse, closed ports, a wrong password), while every tracing event of the
//! process is captured at TRACE; then every config, error and `source()`
//! chain is formatted with `{:?}` and `{}` and searched for the password.

#[path = "secrets/logs.rs"]
mod logs;
