//! A latency budget's last minutes as a small inline SVG: P50 and P99 per
//! check against the P99 target, drawn by hand (no chart library, no
//! script) so the page stays one server-rendered document.

use std::fmt::Write;

use super::view::BudgetView;

const WIDTH: f64 = 320.0;
const HEIGHT: f64 = 80.0;
const PAD: f64 = 4.0;

/// The chart of `budget`; an empty frame with the target line when it has
/// no samples yet.
pub(super) fn budget_chart(budget: &BudgetView) -> String {
    let highest = budget
        .samples
        .iter()
        .map(|sample| sample.p99_ms)
        .fold(budget.budget_ms * 1.5, f64::max)
        .max(0.001);
    let y = |ms: f64| HEIGHT - PAD - (ms / highest).min(1.0) * (HEIGHT - 2.0 * PAD);
    let count = budget.samples.len();
    let x = |index: usize| {
        if count <= 1 {
            WIDTH - PAD
        } else {
            PAD + index as f64 * (WIDTH - 2.0 * PAD) / (count - 1) as f64
        }
    };
    let line = |pick: fn(&super::view::SampleView) -> f64| {
        budget
            .samples
            .iter()
            .enumerate()
            .fold(String::new(), |mut points, (index, sample)| {
                let _ = write!(points, "{:.1},{:.1} ", x(index), y(pick(sample)));
                points
            })
    };
    let target = y(budget.budget_ms);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{path}: P50 and P99 over the last checks against a {budget:.0} ms P99 budget">"#,
        path = super::page::escape(&budget.path),
        budget = budget.budget_ms,
    );
    let _ = write!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" class="frame"/><line x1="0" x2="{WIDTH}" y1="{target:.1}" y2="{target:.1}" class="target"/>"#
    );
    if let Some(last) = budget.samples.last() {
        let _ = write!(
            svg,
            r#"<polyline class="p50" points="{}"/><polyline class="p99" points="{}"/>"#,
            line(|sample| sample.p50_ms),
            line(|sample| sample.p99_ms),
        );
        // The latest check as dots: a line of one sample would not show.
        let _ = write!(
            svg,
            r#"<circle class="p50" cx="{x:.1}" cy="{p50:.1}" r="2.5"/><circle class="p99" cx="{x:.1}" cy="{p99:.1}" r="2.5"/>"#,
            x = x(count - 1),
            p50 = y(last.p50_ms),
            p99 = y(last.p99_ms),
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::view::SampleView;

    #[test]
    fn the_chart_has_a_target_line_and_one_point_per_sample() {
        let sample = |p99_ms| SampleView {
            at: chrono::Utc::now(),
            count: 10,
            p50_ms: 1.0,
            p99_ms,
        };
        let budget = BudgetView {
            path: "trading_<market>".into(),
            budget_ms: 20.0,
            samples: vec![sample(5.0), sample(40.0), sample(8.0)],
        };
        let svg = budget_chart(&budget);
        assert!(svg.contains(r#"class="target""#), "{svg}");
        assert!(svg.contains("trading_&lt;market&gt;"), "{svg}");
        let p99 = svg.split(r#"class="p99" points=""#).nth(1).unwrap();
        assert_eq!(p99.split('"').next().unwrap().split_whitespace().count(), 3);
    }
}
