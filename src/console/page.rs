//! The console as HTML, rendered on the server: the page's frame, the
//! sections the page's script refreshes (`fragment`), and one dead letter.
//! Every value from a broker or a handler is escaped.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use super::chart::budget_chart;
use super::inspect::LetterDetail;
use super::view::{Overview, TopicLetters};

/// `text` safe in HTML text and in a quoted attribute.
pub(super) fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds().max(0);
    let text = match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        _ => format!("{} h ago", seconds / 3600),
    };
    format!(
        r#"<time datetime="{iso}" title="{iso}">{text}</time>"#,
        iso = at.to_rfc3339()
    )
}

fn or_dash(text: Option<&str>) -> String {
    text.map_or_else(|| "—".to_owned(), escape)
}

/// The document around the sections: `base` is where the console is
/// mounted (`/console`), for its links and its script's requests.
pub(super) fn page(base: &str, overview: &Overview) -> String {
    let base = escape(base);
    let service = escape(&overview.service);
    let token = if overview.actions_enabled {
        r#"<label>Operator token <input id="token" type="password" autocomplete="off"></label>"#
    } else if overview.read_only {
        r#"<span class="badge">read-only</span>"#
    } else {
        r#"<span class="badge">no operator credentials configured: actions are off</span>"#
    };
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{service} · console</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{base}/assets/console.css">
</head>
<body data-base="{base}">
<header><h1>{service}</h1><span id="updated">live</span>{token}<span id="status" role="status"></span></header>
<main id="content">{content}</main>
<script src="{base}/assets/console.js"></script>
</body></html>
"#,
        content = fragment(&base, overview),
    )
}

/// The sections the page refreshes in place.
pub(super) fn fragment(base: &str, overview: &Overview) -> String {
    let now = overview.generated_at;
    let mut html = String::new();

    html.push_str(r#"<section id="transports"><h2>Transports</h2><table><tr><th>Bus</th><th>Transport</th><th>State</th><th>Why</th></tr>"#);
    for transport in &overview.transports {
        let _ = write!(
            html,
            r#"<tr data-transport="{name}"><td>{name}</td><td>{kind}</td><td class="state {state}">{state}</td><td>{reason}</td></tr>"#,
            name = escape(&transport.name),
            kind = transport.transport,
            state = transport.state,
            reason = or_dash(transport.reason.as_deref()),
        );
    }
    html.push_str("</table></section>");

    html.push_str(r#"<section id="consumers"><h2>Consumers</h2><table><tr><th>Topic</th><th>Group</th><th>State</th><th>In flight</th><th>Lag</th><th>Handled</th><th>Failed</th><th>Last error</th></tr>"#);
    for consumer in &overview.consumers {
        let state = match &consumer.error {
            Some(error) => format!("{}: {}", consumer.state, escape(error)),
            None => consumer.state.to_owned(),
        };
        let last_error = match (&consumer.last_error, consumer.last_error_at) {
            (Some(error), Some(at)) => format!("{} ({})", escape(error), ago(at, now)),
            _ => "—".to_owned(),
        };
        let _ = write!(
            html,
            r#"<tr data-consumer="{topic}/{group}"><td>{topic}</td><td>{group}</td><td class="state {class}">{state}</td><td>{in_flight}</td><td>{lag}</td><td>{handled}</td><td>{failed}</td><td>{last_error}</td></tr>"#,
            topic = escape(&consumer.topic),
            group = escape(&consumer.group),
            class = consumer.state,
            in_flight = consumer.in_flight,
            lag = consumer
                .lag
                .map_or_else(|| "unknown".to_owned(), |lag| lag.to_string()),
            handled = consumer.handled,
            failed = consumer.failed,
        );
    }
    html.push_str("</table></section>");

    html.push_str(r#"<section id="breakers"><h2>Circuit breakers</h2><table><tr><th>Breaker</th><th>State</th><th>Since</th><th>Failures</th><th>Opened</th><th>Reset timeout</th></tr>"#);
    for breaker in &overview.breakers {
        let _ = write!(
            html,
            r#"<tr data-breaker="{name}"><td>{name}</td><td class="state {state}">{state}</td><td>{since}</td><td>{failures} / {threshold}</td><td>{opened}×</td><td>{reset} ms</td></tr>"#,
            name = escape(&breaker.name),
            state = escape(&breaker.state),
            since = ago(breaker.changed_at, now),
            failures = breaker.consecutive_failures,
            threshold = breaker.failure_threshold,
            opened = breaker.opened_total,
            reset = breaker.reset_timeout_ms,
        );
    }
    html.push_str("</table></section>");

    html.push_str(r#"<section id="budgets"><h2>Latency budgets <small class="legend"><span class="p50">— P50</span> <span class="p99">— P99</span> <span class="target">- - P99 budget</span></small></h2>"#);
    if overview.budgets.is_empty() {
        html.push_str(r#"<p class="empty">No latency budgets configured.</p>"#);
    }
    for budget in &overview.budgets {
        let last = budget.samples.last();
        let figures = last.map_or_else(
            || "no latency recorded yet".to_owned(),
            |sample| {
                format!(
                    "P50 {:.1} ms · P99 {:.1} ms ({} calls)",
                    sample.p50_ms, sample.p99_ms, sample.count
                )
            },
        );
        let breached = last.is_some_and(|sample| sample.p99_ms > budget.budget_ms);
        let _ = write!(
            html,
            r#"<figure class="budget{over}" data-path="{path}"><figcaption><b>{path}</b> — {figures}, P99 budget {target:.0} ms</figcaption>{chart}</figure>"#,
            over = if breached { " breached" } else { "" },
            path = escape(&budget.path),
            target = budget.budget_ms,
            chart = budget_chart(budget),
        );
    }
    html.push_str("</section>");

    html.push_str(r#"<section id="dead-letters"><h2>Dead letters</h2>"#);
    if overview.dead_letters.is_empty() {
        html.push_str(r#"<p class="empty">No dead-letter queues configured.</p>"#);
    }
    for topic in &overview.dead_letters {
        dead_letters(&mut html, base, topic, overview.actions_enabled, now);
    }
    html.push_str("</section>");

    if !overview.outboxes.is_empty() {
        html.push_str(r#"<section id="outboxes"><h2>Outbox</h2><table><tr><th>Outbox</th><th>Pending</th><th>Lag</th><th>Sent</th><th>Parked</th><th>Failed rounds</th></tr>"#);
        for outbox in &overview.outboxes {
            let pending = match (&outbox.error, outbox.pending) {
                (Some(error), _) => escape(error),
                (None, Some(pending)) => pending.to_string(),
                (None, None) => "unknown".to_owned(),
            };
            let _ = write!(
                html,
                r#"<tr data-outbox="{name}"><td>{name}</td><td>{pending}</td><td>{lag}</td><td>{sent}</td><td>{parked}</td><td>{failures}</td></tr>"#,
                name = escape(&outbox.name),
                lag = outbox
                    .lag_ms
                    .map_or_else(|| "—".to_owned(), |ms| format!("{ms} ms")),
                sent = outbox.sent,
                parked = outbox.parked,
                failures = outbox.failures,
            );
        }
        html.push_str("</table></section>");
    }
    html
}

fn dead_letters(
    html: &mut String,
    base: &str,
    topic: &TopicLetters,
    actions: bool,
    now: DateTime<Utc>,
) {
    let name = escape(&topic.topic);
    let count = if topic.more {
        format!("{}+", topic.letters.len())
    } else {
        topic.letters.len().to_string()
    };
    let _ = write!(
        html,
        r#"<div class="topic" data-topic="{name}"><h3>{name} <span class="count">{count}</span></h3>"#
    );
    if let Some(error) = &topic.error {
        let _ = write!(html, r#"<p class="error">{}</p>"#, escape(error));
    } else if topic.letters.is_empty() {
        html.push_str(r#"<p class="empty">No dead letters.</p>"#);
    } else {
        if actions {
            let _ = write!(
                html,
                r#"<button class="redrive-all" data-topic="{name}">Redrive all</button>"#
            );
        }
        html.push_str("<table><tr><th>Id</th><th>Group</th><th>Reason</th><th>Attempts</th><th>Last error</th><th>Dead-lettered</th><th></th></tr>");
        for letter in &topic.letters {
            let id = escape(&letter.id);
            let link = format!(
                "{base}/dead-letters/{}/{}",
                escape(&url_segment(&topic.topic)),
                escape(&url_segment(&letter.id))
            );
            let button = if actions {
                format!(
                    r#"<button class="redrive" data-topic="{name}" data-id="{id}">Redrive</button>"#
                )
            } else {
                String::new()
            };
            let _ = write!(
                html,
                r#"<tr data-letter="{id}"><td><a href="{link}">{id}</a></td><td>{group}</td><td>{reason}</td><td>{attempts}</td><td>{last_error}</td><td>{when}</td><td>{button}</td></tr>"#,
                group = escape(&letter.group),
                reason = escape(&letter.reason),
                attempts = letter.attempts,
                last_error = or_dash(letter.last_error.as_deref()),
                when = ago(letter.dead_lettered_at, now),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</div>");
}

/// `text` percent-encoded for one path segment.
pub(super) fn url_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// One dead letter, inspected.
pub(super) fn letter_page(base: &str, service: &str, detail: &LetterDetail) -> String {
    let base = escape(base);
    let letter = &detail.letter;
    let envelope = serde_json::to_string_pretty(&detail.envelope).unwrap_or_default();
    let mut headers = String::new();
    for (name, value) in &detail.headers {
        let _ = write!(
            headers,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(name),
            escape(value)
        );
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{service} · dead letter {id}</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="{base}/assets/console.css"></head>
<body data-base="{base}"><header><h1><a href="{base}">{service}</a> · dead letter</h1></header><main>
<table class="facts" id="letter" data-letter="{id}">
<tr><th>Id</th><td>{id}</td></tr><tr><th>Topic</th><td>{topic}</td></tr><tr><th>Group</th><td>{group}</td></tr>
<tr><th>Type</th><td>{event_type}</td></tr><tr><th>Reason</th><td>{reason}</td></tr><tr><th>Attempts</th><td>{attempts}</td></tr>
<tr><th>Last error</th><td>{last_error}</td></tr><tr><th>Dead-lettered</th><td>{when}</td></tr><tr><th>Body</th><td>{bytes} bytes</td></tr></table>
<h2>Headers</h2><table>{headers}</table>
<h2>Envelope <small>(long values cut)</small></h2><pre id="envelope">{envelope}</pre>
</main></body></html>
"#,
        service = escape(service),
        id = escape(&letter.id),
        topic = escape(&letter.topic),
        group = escape(&letter.group),
        event_type = or_dash(letter.event_type.as_deref()),
        reason = escape(&letter.reason),
        attempts = letter.attempts,
        last_error = or_dash(letter.last_error.as_deref()),
        when = escape(&letter.dead_lettered_at.to_rfc3339()),
        bytes = detail.body_bytes,
        envelope = escape(&envelope),
    )
}
