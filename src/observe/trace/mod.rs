//! W3C trace context (`traceparent`, `tracestate`) through OpenTelemetry
//! (feature `otel`).
//!
//! The crate's spans (`publish`, `consume`, and the `http.client` /
//! `http.server` spans of the two layers here) are `tracing` spans; with a
//! [`tracing_opentelemetry`] layer in the subscriber they are OpenTelemetry
//! spans too, and this module moves their context across processes:
//!
//! * [`EventBus`](crate::EventBus) writes the `publish` span's context into
//!   the **envelope headers** — inside the body, so it crosses every
//!   transport (memory, Redis Streams, Redis Pub/Sub, RabbitMQ, gRPC and
//!   HTTP push) unchanged — and the consume loop makes its `consume` span a
//!   child of it. An envelope that already carries a `traceparent` (a
//!   redrive, an outbox re-publishing a stored event) keeps it.
//! * [`InjectTraceContextLayer`] (clients) writes the context of an
//!   `http.client` span into the request headers, and
//!   [`ExtractTraceContextLayer`] (servers) opens an `http.server` span
//!   continuing it. Both work on `http::Request` — tonic channels and
//!   servers, axum routers — and the client layer also on
//!   `reqwest::Request` (with feature `http`), so `reqwest::Client` can be
//!   wrapped as a tower service.
//!
//! The W3C format is written by this module itself (version `00`), not by
//! the global propagator, which is a no-op unless the application sets one:
//! trace context is what the crate promises, whatever else the application
//! propagates.
//!
//! **The crate's spans may be filtered out** (`warn,myapp=info` turns
//! them off): injection then uses the caller's current context
//! ([`current_trace_headers`]), and the server and consumer sides attach the
//! remote context to the handler as an [`opentelemetry::Context`], so one
//! trace id still flows. Their names, levels and targets are in the table
//! under *Spans* in `docs/observability.md`; `examples/otel.rs` is a
//! complete set-up.
//!
//! **Without the feature** the crate neither writes nor reads trace headers
//! and the layers do not exist; a `traceparent` already in an envelope's
//! headers travels like any other header, so a downstream service built
//! with `otel` still continues the trace of whoever set it.

use std::sync::Once;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::Headers;

mod layer;

pub use layer::{
    ExtractTraceContext, ExtractTraceContextLayer, HttpRequest, InjectTraceContext,
    InjectTraceContextLayer,
};

/// The W3C `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// The `traceparent` (and `tracestate`, when not empty) of `span`'s
/// OpenTelemetry context; `None` when the span has no valid context (no
/// OpenTelemetry layer in the subscriber, or a disabled span). The crate
/// itself falls back to [`current_trace_headers`] when its own span is
/// filtered out.
pub fn trace_headers(span: &Span) -> Option<(String, Option<String>)> {
    headers_of(&span.context().span().span_context().clone())
}

/// The `traceparent` (and `tracestate`) of the *current* context: the
/// current `tracing` span's OpenTelemetry context, or else the attached
/// [`opentelemetry::Context`] (what the crate attaches around a handler
/// when its own `http.server` or `consume` span is filtered out); `None`
/// when neither is valid.
///
/// ```
/// use switchboard::observe::trace::current_trace_headers;
///
/// // No OpenTelemetry layer and no attached context: nothing to send.
/// assert!(current_trace_headers().is_none());
/// ```
pub fn current_trace_headers() -> Option<(String, Option<String>)> {
    headers_of(&current_span_context())
}

/// The current `tracing` span's span context if valid, else the attached
/// OpenTelemetry context's.
fn current_span_context() -> SpanContext {
    let traced = Span::current().context().span().span_context().clone();
    if traced.is_valid() {
        return traced;
    }
    opentelemetry::Context::current()
        .span()
        .span_context()
        .clone()
}

/// `span`'s own context if it has one (it is enabled and seen by an
/// OpenTelemetry layer), else the current one: the crate's spans may be
/// filtered out while the caller's are not.
fn headers_of_span_or_current(span: &Span) -> Option<(String, Option<String>)> {
    trace_headers(span).or_else(current_trace_headers)
}

fn headers_of(span_context: &SpanContext) -> Option<(String, Option<String>)> {
    if !span_context.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    let state = span_context.trace_state().header();
    Some((traceparent, (!state.is_empty()).then_some(state)))
}

/// Parses a W3C `traceparent` (and optional `tracestate`) into a remote span
/// context; `None` for anything malformed (wrong lengths, upper-case hex,
/// all-zero ids, version `ff`).
///
/// ```
/// use switchboard::observe::trace::parse_traceparent;
///
/// let parent = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
/// assert_eq!(parent.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(parent.is_sampled() && parent.is_remote());
/// assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None).is_none());
/// ```
pub fn parse_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |text: &str, len: usize| {
        text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    // Version 00 has exactly four fields; a later version may append more.
    if !lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !lower_hex(trace_id, 32) || !lower_hex(span_id, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate
        .and_then(|state| state.parse::<TraceState>().ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        state,
    );
    context.is_valid().then_some(context)
}

/// Makes `span` a child of the remote context in `traceparent` /
/// `tracestate`; returns whether it did (a missing or malformed header
/// leaves the span where it was). Call before the span is first entered.
pub fn continue_trace(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) -> bool {
    let Some(remote) = traceparent.and_then(|parent| parse_traceparent(parent, tracestate)) else {
        return false;
    };
    let parent = opentelemetry::Context::new().with_remote_span_context(remote);
    span.set_parent(parent).is_ok()
}

/// The envelope headers with the current context added (see
/// [`current_trace_headers`]), or `None` when there is nothing to add (no
/// valid context, or a `traceparent` already there).
pub(crate) fn with_current(headers: &Headers) -> Option<Headers> {
    if headers.contains_key(TRACEPARENT) {
        return None;
    }
    let (parent, state) = current_trace_headers()?;
    let mut headers = headers.clone();
    headers.insert(TRACEPARENT.to_owned(), parent);
    if let Some(state) = state {
        headers.insert(TRACESTATE.to_owned(), state);
    }
    Some(headers)
}

/// Continues, in the consumer's `span`, the trace whose context is in
/// envelope headers; returns the OpenTelemetry context to attach around the
/// handler (see [`handler_context`]).
pub(crate) fn continue_from_headers(span: &Span, headers: &Headers) -> opentelemetry::Context {
    let remote = headers
        .get(TRACEPARENT)
        .and_then(|parent| parse_traceparent(parent, headers.get(TRACESTATE).map(String::as_str)));
    handler_context(
        span,
        remote,
        &CONSUME_FILTERED,
        "consume",
        "switchboard::bus::consume",
    )
}

/// Makes `span` (the crate's `consume` or `http.server` span) a child of
/// `remote`, and returns the OpenTelemetry context the handler runs in:
/// the span's own when it has one; when the span is filtered out, the
/// remote context itself, so the handler's spans and what it publishes or
/// calls still continue the caller's trace. The first time a remote
/// context meets a filtered-out span, a warning says which target to
/// enable for `tracing::Span::current()` in the handler to carry it too.
fn handler_context(
    span: &Span,
    remote: Option<SpanContext>,
    warned: &'static Once,
    name: &'static str,
    target: &'static str,
) -> opentelemetry::Context {
    if let Some(remote) = &remote {
        let parent = opentelemetry::Context::new().with_remote_span_context(remote.clone());
        // Fails only for a span no OpenTelemetry layer sees.
        let _ = span.set_parent(parent);
    }
    let own = span.context();
    if own.span().span_context().is_valid() {
        return own;
    }
    match remote {
        Some(remote) => {
            if span.is_disabled() {
                warned.call_once(|| {
                    tracing::warn!(
                        "switchboard's `{name}` span (target `{target}`, level INFO) is filtered \
                         out: the handler's own spans and what it publishes still continue the \
                         caller's trace, but `tracing::Span::current()` in the handler carries \
                         no trace context; enable `{target}=info` (or `switchboard=info`) to \
                         have the span (see docs/observability.md, \"Spans\")"
                    );
                });
            }
            opentelemetry::Context::current().with_remote_span_context(remote)
        }
        None => opentelemetry::Context::current(),
    }
}

static CONSUME_FILTERED: Once = Once::new();
static SERVER_FILTERED: Once = Once::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_parse() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = parse_traceparent(good, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(parsed.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(parsed.trace_state().header(), "congo=t61rcWkgMzE");
        let unsampled = parse_traceparent(&good.replace("-01", "-00"), None).unwrap();
        assert!(!unsampled.is_sampled());
        // A later version may append fields; version 00 may not.
        assert!(parse_traceparent(&format!("01{}-extra", &good[2..]), None).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
    }
}
