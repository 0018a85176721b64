//! Latency report of SPEC §3's paths: P50 / P99 / P999 of each path through
//! switchboard beside the raw client, from HDR histograms, sequentially, with
//! 16 callers at once, and (Trading → Game) while a load generator publishes
//! 10 000 events/s into the same stream — on a current-thread and on a
//! two-worker multi-thread tokio runtime.
//!
//! `cargo bench --bench p99_paths` (Redis and RabbitMQ on 127.0.0.1)
//!
//! Raw and switchboard are interleaved so drift in a shared machine hits
//! both: sequentially call by call (raw, switchboard, switchboard, raw, …),
//! under load in alternating blocks. Each measurement is repeated
//! (`P99_REPEATS`, default 3); the report gives the percentiles of all
//! repeats together and the ratio's spread (min–max over the repeats).
//! Writes `target/p99_paths/report.json` and `p99_paths.svg`, and the
//! committed copies `docs/p99_paths.json` and `docs/p99_paths.svg`.
//!
//! `P99_SAMPLES` (calls per side per repeat, default 4000) and `P99_PATHS`
//! (names, comma-separated) narrow a run.
//!
//! Run by `cargo test` (without `--bench`), it calls every path a handful of
//! times, draws the plot in memory and writes nothing: a smoke test that
//! finishes in seconds.

mod common;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Path, Side};
use hdrhistogram::Histogram;
use serde::Serialize;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
struct Settings {
    /// Calls per side per repeat, sequentially.
    samples: usize,
    /// Callers at once in the concurrent mode.
    callers: usize,
    /// Calls per caller per side per repeat in the concurrent mode.
    calls_per_caller: usize,
    /// Blocks per side per repeat (concurrent and loaded modes).
    blocks: usize,
    repeats: usize,
    warmup: usize,
    /// Events per second of the background load.
    load_rate: u64,
}

impl Settings {
    fn from_args() -> (Self, bool) {
        let bench = std::env::args().any(|arg| arg == "--bench");
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(default)
        };
        let settings = if bench {
            Settings {
                samples: env("P99_SAMPLES", 4000),
                callers: 16,
                calls_per_caller: env("P99_SAMPLES", 4000) / 16,
                blocks: 4,
                repeats: env("P99_REPEATS", 3),
                warmup: 200,
                load_rate: 10_000,
            }
        } else {
            Settings {
                samples: 8,
                callers: 4,
                calls_per_caller: 2,
                blocks: 2,
                repeats: 1,
                warmup: 2,
                // Test mode only proves the bench runs: an unoptimised
                // consumer on a shared machine cannot keep up with the
                // bench's 10 000/s, and the measured event would queue
                // behind the backlog.
                load_rate: 1_000,
            }
        };
        (settings, bench)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sequential,
    Concurrent,
    Loaded,
}

impl Mode {
    fn name(self, settings: &Settings) -> String {
        match self {
            Mode::Sequential => "sequential".into(),
            Mode::Concurrent => format!("{} callers", settings.callers),
            Mode::Loaded => format!("+{}/s load", settings.load_rate),
        }
    }
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 60 s, three significant digits; a longer call
    // counts as 60 s rather than ending the run.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// The sides in the order of round `i`: alternating which goes first.
fn order(i: usize) -> [Side; 2] {
    if i.is_multiple_of(2) {
        [Side::Raw, Side::Switchboard]
    } else {
        [Side::Switchboard, Side::Raw]
    }
}

fn index(side: Side) -> usize {
    match side {
        Side::Raw => 0,
        Side::Switchboard => 1,
    }
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn next() -> u64 {
    SEQUENCE.fetch_add(1, Ordering::Relaxed)
}

async fn timed(path: &Path, side: Side) -> u64 {
    let call = path.call(side)(next());
    let started = Instant::now();
    call.await;
    started.elapsed().as_nanos() as u64
}

/// One call after the other, raw and switchboard alternating call by call.
async fn sequential(path: &Path, samples: usize) -> [Histogram<u64>; 2] {
    let mut histograms = [histogram(), histogram()];
    for i in 0..samples {
        for side in order(i) {
            let nanos = timed(path, side).await;
            histograms[index(side)].saturating_record(nanos);
        }
    }
    histograms
}

/// `callers` tasks calling at once, raw and switchboard in alternating
/// blocks.
async fn concurrent(path: &Arc<Path>, settings: &Settings) -> [Histogram<u64>; 2] {
    let mut histograms = [histogram(), histogram()];
    let per_block = settings.calls_per_caller.div_ceil(settings.blocks).max(1);
    for block in 0..settings.blocks {
        for side in order(block) {
            let tasks: Vec<_> = (0..settings.callers)
                .map(|_| {
                    let path = path.clone();
                    tokio::spawn(async move {
                        let mut nanos = Vec::with_capacity(per_block);
                        for _ in 0..per_block {
                            nanos.push(timed(&path, side).await);
                        }
                        nanos
                    })
                })
                .collect();
            for task in tasks {
                for nanos in task.await.expect("caller") {
                    histograms[index(side)].saturating_record(nanos);
                }
            }
        }
    }
    histograms
}

/// Sequential calls while a generator publishes `load_rate` events/s into
/// the same stream, with the same client as the measured side (raw load
/// for raw, switchboard's for switchboard), in alternating blocks. Returns
/// the histograms and the load rate reached per side.
async fn loaded(path: &Path, settings: &Settings) -> ([Histogram<u64>; 2], [f64; 2]) {
    let mut histograms = [histogram(), histogram()];
    let mut rates = [0.0; 2];
    let per_block = settings.samples.div_ceil(settings.blocks).max(1);
    for block in 0..settings.blocks {
        for side in order(block) {
            let load = path.load(side).expect("a path with a load").clone();
            let stop = Arc::new(AtomicBool::new(false));
            let generator = tokio::spawn(generate(load, settings.load_rate, stop.clone()));
            // Let the load reach its pace before measuring.
            tokio::time::sleep(Duration::from_millis(20)).await;
            for _ in 0..per_block {
                let nanos = timed(path, side).await;
                histograms[index(side)].saturating_record(nanos);
            }
            stop.store(true, Ordering::Relaxed);
            let rate = generator.await.expect("load generator");
            rates[index(side)] += rate / settings.blocks as f64;
        }
    }
    (histograms, rates)
}

/// Publishes batches of 10 (at most 8 batches in flight) at `rate` events/s
/// until stopped — every millisecond from 10 000/s up, less often below;
/// returns the events per second it reached.
async fn generate(load: common::Call, rate: u64, stop: Arc<AtomicBool>) -> f64 {
    let rate = rate.max(10);
    let batches_per_ms = (rate / 10_000).max(1);
    let period = Duration::from_micros((10_000_000 / rate).max(1_000));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tick = tokio::time::interval(period);
    let started = Instant::now();
    let mut published = 0u64;
    let mut batch = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for _ in 0..batches_per_ms {
            let permit = in_flight.clone().acquire_owned().await.expect("open");
            let publish = load(batch);
            batch += 1;
            tokio::spawn(async move {
                publish.await;
                drop(permit);
            });
            published += 10;
        }
    }
    let _ = in_flight.acquire_many(8).await;
    published as f64 / started.elapsed().as_secs_f64()
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Percentiles {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
        }
    }

    fn ratio(switchboard: &Self, raw: &Self) -> Self {
        Self {
            p50_us: switchboard.p50_us / raw.p50_us,
            p99_us: switchboard.p99_us / raw.p99_us,
            p999_us: switchboard.p999_us / raw.p999_us,
        }
    }
}

/// Switchboard over raw at each percentile (named `*_us` only for sharing
/// the struct; these are plain ratios).
#[derive(Debug, Clone, Copy, Serialize)]
struct Ratios {
    p50: f64,
    p99: f64,
    p999: f64,
}

impl From<Percentiles> for Ratios {
    fn from(p: Percentiles) -> Self {
        Self {
            p50: p.p50_us,
            p99: p.p99_us,
            p999: p.p999_us,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    runtime: &'static str,
    mode: String,
    path: &'static str,
    label: &'static str,
    target_p99_us: f64,
    samples_per_side: u64,
    raw: Percentiles,
    switchboard: Percentiles,
    /// Switchboard ÷ raw over all repeats together.
    ratio: Ratios,
    /// The lowest and highest ratio of a single repeat.
    ratio_min: Ratios,
    ratio_max: Ratios,
    /// Events/s the background load reached (raw, switchboard), if any.
    load_per_s: Option<[f64; 2]>,
}

#[derive(Debug, Serialize)]
struct Report {
    date: String,
    command: &'static str,
    cpus: usize,
    cpu_model: String,
    repeats: usize,
    rows: Vec<Row>,
}

async fn measure(runtime: &'static str, settings: Settings, verbose: bool) -> Vec<Row> {
    // `P99_PATHS=trading_to_game,pubsub_broadcast` measures only those.
    let only = std::env::var("P99_PATHS").ok();
    let paths: Vec<Arc<Path>> = common::all()
        .await
        .into_iter()
        .filter(|path| {
            only.as_deref()
                .is_none_or(|only| only.split(',').any(|name| name == path.name))
        })
        .map(Arc::new)
        .collect();
    let mut rows = Vec::new();
    for path in &paths {
        for side in [Side::Raw, Side::Switchboard] {
            for _ in 0..settings.warmup {
                timed(path, side).await;
            }
        }
        let mut modes = vec![Mode::Sequential, Mode::Concurrent];
        if path.load.is_some() {
            modes.push(Mode::Loaded);
        }
        for mode in modes {
            let mut total = [histogram(), histogram()];
            let mut ratios = Vec::new();
            let mut load = None;
            for _ in 0..settings.repeats {
                let histograms = match mode {
                    Mode::Sequential => sequential(path, settings.samples).await,
                    Mode::Concurrent => concurrent(path, &settings).await,
                    Mode::Loaded => {
                        let (histograms, rates) = loaded(path, &settings).await;
                        load = Some(rates);
                        histograms
                    }
                };
                ratios.push(Percentiles::ratio(
                    &Percentiles::of(&histograms[1]),
                    &Percentiles::of(&histograms[0]),
                ));
                for (total, histogram) in total.iter_mut().zip(&histograms) {
                    total.add(histogram).expect("same bounds");
                }
            }
            let (raw, switchboard) = (Percentiles::of(&total[0]), Percentiles::of(&total[1]));
            let fold = |pick: fn(&Percentiles) -> f64, min: bool| {
                ratios
                    .iter()
                    .map(pick)
                    .fold(if min { f64::MAX } else { f64::MIN }, |a, b| {
                        if min { a.min(b) } else { a.max(b) }
                    })
            };
            let spread = |min| Ratios {
                p50: fold(|p| p.p50_us, min),
                p99: fold(|p| p.p99_us, min),
                p999: fold(|p| p.p999_us, min),
            };
            let row = Row {
                runtime,
                mode: mode.name(&settings),
                path: path.name,
                label: path.label,
                target_p99_us: path.target.as_secs_f64() * 1e6,
                samples_per_side: total[0].len(),
                raw,
                switchboard,
                ratio: Percentiles::ratio(&switchboard, &raw).into(),
                ratio_min: spread(true),
                ratio_max: spread(false),
                load_per_s: load,
            };
            if verbose {
                eprintln!("{}", line(&row));
            }
            rows.push(row);
        }
    }
    drop(paths);
    rows
}

fn header() -> String {
    format!(
        "{:<14} {:<16} {:<36} | {:>23} | {:>23} | {:>17} {:>17} {:>7} | {:>6}",
        "runtime",
        "mode",
        "path",
        "raw p50/p99/p999 µs",
        "sb p50/p99/p999 µs",
        "p50 × (min–max)",
        "p99 × (min–max)",
        "p999 ×",
        "target"
    )
}

fn line(row: &Row) -> String {
    let p = |p: &Percentiles| format!("{:.0}/{:.0}/{:.0}", p.p50_us, p.p99_us, p.p999_us);
    let mut line = format!(
        "{:<14} {:<16} {:<36} | {:>23} | {:>23} | {:>4.2} ({:.2}–{:.2}) {:>4.2} ({:.2}–{:.2}) {:>7.2} | {:>4.0}ms",
        row.runtime,
        row.mode,
        row.label,
        p(&row.raw),
        p(&row.switchboard),
        row.ratio.p50,
        row.ratio_min.p50,
        row.ratio_max.p50,
        row.ratio.p99,
        row.ratio_min.p99,
        row.ratio_max.p99,
        row.ratio.p999,
        row.target_p99_us / 1000.0,
    );
    if let Some([raw, switchboard]) = row.load_per_s {
        let _ = write!(line, " (load reached {raw:.0}/{switchboard:.0} events/s)");
    }
    line
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Horizontal bars per row: raw (grey) and switchboard (blue), P99 light and
/// P50 dark, on a log scale, with SPEC's P99 target as a red tick.
fn plot(report: &Report) -> String {
    use plotters::prelude::*;

    let rows = &report.rows;
    let mut svg = String::new();
    {
        let height = 140 + rows.len() as u32 * 30;
        let root = SVGBackend::with_string(&mut svg, (1100, height)).into_drawing_area();
        root.fill(&WHITE).expect("fill");
        let max = rows
            .iter()
            .flat_map(|row| [row.raw.p99_us, row.switchboard.p99_us, row.target_p99_us])
            .fold(100.0, f64::max)
            * 1.5;
        let n = rows.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "P50 (dark) and P99 (light), log scale: raw (grey) vs switchboard (blue), ratio switchboard/raw; red: SPEC P99 target — {} CPUs, {}",
                    report.cpus, report.date
                ),
                ("sans-serif", 15),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(420)
            .build_cartesian_2d((10.0..max).log_scale(), -0.5..n - 0.5)
            .expect("chart");
        let labels: Vec<String> = rows
            .iter()
            .map(|row| format!("{} · {} · {}", row.label, row.mode, row.runtime))
            .collect();
        chart
            .configure_mesh()
            .y_labels(rows.len())
            .y_label_formatter(&|y| {
                let i = y.round();
                if (y - i).abs() < 0.01 && i >= 0.0 && (i as usize) < labels.len() {
                    labels[labels.len() - 1 - i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("latency (µs)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .disable_y_mesh()
            .draw()
            .expect("mesh");
        let grey = (RGBColor(170, 170, 170), RGBColor(90, 90, 90));
        let blue = (RGBColor(150, 190, 240), RGBColor(30, 90, 200));
        for (i, row) in rows.iter().enumerate() {
            let y = n - 1.0 - i as f64;
            for (offset, p, (light, dark)) in
                [(0.18, &row.raw, grey), (-0.18, &row.switchboard, blue)]
            {
                let (top, bottom) = (y + offset + 0.15, y + offset - 0.15);
                chart
                    .draw_series([
                        Rectangle::new([(10.0, bottom), (p.p99_us, top)], light.filled()),
                        Rectangle::new([(10.0, bottom), (p.p50_us, top)], dark.filled()),
                    ])
                    .expect("bars");
            }
            chart
                .draw_series([PathElement::new(
                    [(row.target_p99_us, y - 0.4), (row.target_p99_us, y + 0.4)],
                    RED.stroke_width(2),
                )])
                .expect("target");
            chart
                .draw_series([Text::new(
                    format!("×{:.2} p50, ×{:.2} p99", row.ratio.p50, row.ratio.p99),
                    (row.raw.p99_us.max(row.switchboard.p99_us) * 1.08, y + 0.25),
                    ("sans-serif", 11),
                )])
                .expect("ratio");
        }
        root.present().expect("svg");
    }
    svg
}

fn main() {
    let (settings, bench) = Settings::from_args();
    let started = Instant::now();
    let mut rows = Vec::new();
    if bench {
        eprintln!("{}", header());
    }
    for name in ["current_thread", "multi_thread"] {
        let runtime = match name {
            "current_thread" => tokio::runtime::Builder::new_current_thread(),
            _ => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(2);
                builder
            }
        }
        .enable_all()
        .build()
        .expect("runtime");
        rows.extend(runtime.block_on(measure(name, settings, bench)));
    }
    let report = Report {
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        command: "cargo bench --bench p99_paths",
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpu_model(),
        repeats: settings.repeats,
        rows,
    };
    let svg = plot(&report);
    assert!(
        svg.contains("<svg") && svg.contains("<text"),
        "an SVG with text"
    );
    if !bench {
        println!(
            "p99_paths: {} rows in {:.1?} (test mode, nothing written)",
            report.rows.len(),
            started.elapsed()
        );
        return;
    }
    println!("\n{}", header());
    for row in &report.rows {
        println!("{}", line(row));
    }
    let json = serde_json::to_string_pretty(&report).expect("JSON");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from)
        .join("p99_paths");
    std::fs::create_dir_all(&target).expect("target/p99_paths");
    for dir in [target.as_path(), &root.join("docs")] {
        std::fs::create_dir_all(dir).expect("directory");
        let (json_name, svg_name) = if dir == target {
            ("report.json", "p99_paths.svg")
        } else {
            ("p99_paths.json", "p99_paths.svg")
        };
        std::fs::write(dir.join(json_name), &json).expect("write the report");
        std::fs::write(dir.join(svg_name), &svg).expect("write the plot");
        println!("wrote {}", dir.join(json_name).display());
    }
    println!("in {:.1?}", started.elapsed());
}
