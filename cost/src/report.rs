//! `report`: every path on both sides, each once with `n` and once with
//! `2n` messages in a process of its own (under callgrind unless `--short`);
//! per message is the difference divided by `n`, so connecting, declaring
//! and starting the runtime drop out. Each side is measured `--repeats`
//! times (3 unless `--short`) and the repeat with the median instruction
//! count stands: a client's I/O thread wakes a varying number of times per
//! message, so one run can differ from the next by a few percent (the
//! RabbitMQ paths the most). Writes `cost.json` and `cost.md`.

use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::paths::{Counted, Path, Side};

/// The goals: instructions per message at most this many times the raw
/// client's; allocations at most the raw client's plus these.
const INSTRUCTION_RATIO_GOAL: f64 = 1.10;
const EXTRA_ALLOCATIONS_PUBLISH: f64 = 4.0;
const EXTRA_ALLOCATIONS_CONSUME: f64 = 8.0;

/// The longest one measured process may take (callgrind slows a client
/// down some 50 times).
const RUN_DEADLINE: Duration = Duration::from_secs(600);

struct Options {
    short: bool,
    n: u64,
    repeats: usize,
    out: Option<PathBuf>,
    paths: Vec<Path>,
}

fn options(args: &[String]) -> Options {
    let mut options = Options {
        short: false,
        n: 0,
        repeats: 0,
        out: None,
        paths: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--short" => options.short = true,
            "--n" => options.n = args.next().expect("--n N").parse().expect("N"),
            "--repeats" => {
                options.repeats = args
                    .next()
                    .expect("--repeats R")
                    .parse()
                    .expect("R, a number")
            }
            "--out" => options.out = Some(args.next().expect("--out DIR").into()),
            "--path" => options
                .paths
                .push(args.next().expect("--path NAME").parse().expect("path")),
            other => panic!("unknown argument {other:?}"),
        }
    }
    if options.n == 0 {
        options.n = if options.short { 100 } else { 1000 };
    }
    if options.repeats == 0 {
        options.repeats = if options.short { 1 } else { 3 };
    }
    if options.paths.is_empty() {
        options.paths = Path::ALL.to_vec();
    }
    options
}

/// One side of one path, per message.
#[derive(Debug, Serialize)]
struct PerMessage {
    /// Instructions (callgrind); absent in a short run.
    instructions: Option<f64>,
    allocations: f64,
    bytes: f64,
    /// `XREADGROUP` calls per message (Redis Streams consume).
    reads: Option<f64>,
    /// Commands the broker saw per message (Redis paths).
    commands: Option<f64>,
    /// The same, by command.
    by_command: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct PathCost {
    path: &'static str,
    label: &'static str,
    switchboard: PerMessage,
    raw: PerMessage,
    instructions_ratio: Option<f64>,
    allocations_ratio: f64,
    extra_allocations: f64,
    bytes_ratio: f64,
    instructions_goal_met: Option<bool>,
    allocations_goal_met: bool,
}

/// Totals of one measured process.
struct Totals {
    instructions: Option<u64>,
    counted: Counted,
}

pub fn run(args: &[String]) {
    let options = options(args);
    let exe = std::env::current_exe().expect("own path");
    let callgrind = !options.short;
    if callgrind {
        let found = Command::new("valgrind").arg("--version").output();
        if !found.is_ok_and(|output| output.status.success()) {
            eprintln!(
                "valgrind is not installed: the instruction counts need it (apt-get install valgrind)"
            );
            std::process::exit(1);
        }
    }
    let scratch = std::env::temp_dir().join(format!("switchboard-cost-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let n = options.n;
    let mut costs = Vec::new();
    for &path in &options.paths {
        let mut sides = Vec::new();
        for side in [Side::Raw, Side::Switchboard] {
            let mut repeats: Vec<PerMessage> = (0..options.repeats)
                .map(|_| per_message(&exe, &scratch, callgrind, path, side, n))
                .collect();
            repeats.sort_by(|a, b| {
                a.instructions
                    .partial_cmp(&b.instructions)
                    .expect("numbers")
            });
            let spread = match (repeats.first(), repeats.last()) {
                (
                    Some(PerMessage {
                        instructions: Some(low),
                        ..
                    }),
                    Some(PerMessage {
                        instructions: Some(high),
                        ..
                    }),
                ) => {
                    format!(" (repeats {low:.0}–{high:.0})")
                }
                _ => String::new(),
            };
            let cost = repeats.swap_remove(repeats.len() / 2);
            eprintln!(
                "  {:<24} {:<11} instructions {:>9}{spread} allocations {:>6.1} bytes {:>8.0}",
                path.name(),
                side.name(),
                cost.instructions
                    .map_or("-".to_owned(), |i| format!("{i:.0}")),
                cost.allocations,
                cost.bytes
            );
            sides.push(cost);
        }
        let switchboard = sides.pop().expect("switchboard");
        let raw = sides.pop().expect("raw");
        let instructions_ratio = switchboard
            .instructions
            .zip(raw.instructions)
            .map(|(s, r)| s / r);
        let extra_allocations = switchboard.allocations - raw.allocations;
        let allowed = if path.publishes() {
            EXTRA_ALLOCATIONS_PUBLISH
        } else {
            EXTRA_ALLOCATIONS_CONSUME
        };
        costs.push(PathCost {
            path: path.name(),
            label: path.label(),
            instructions_ratio,
            allocations_ratio: switchboard.allocations / raw.allocations,
            extra_allocations,
            bytes_ratio: switchboard.bytes / raw.bytes,
            instructions_goal_met: instructions_ratio.map(|r| r <= INSTRUCTION_RATIO_GOAL),
            allocations_goal_met: extra_allocations <= allowed,
            switchboard,
            raw,
        });
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let report = serde_json::json!({
        "machine": machine(),
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "command": std::env::var("COST_COMMAND").unwrap_or_else(|_| "scripts/cost".to_owned()),
        "note": std::env::var("COST_NOTE").ok(),
        "n": n,
        "repeats": options.repeats,
        "short": options.short,
        "batch": crate::paths::BATCH,
        "runtime": "tokio current_thread",
        "goals": {
            "instructions_ratio": INSTRUCTION_RATIO_GOAL,
            "extra_allocations_publish": EXTRA_ALLOCATIONS_PUBLISH,
            "extra_allocations_consume": EXTRA_ALLOCATIONS_CONSUME,
        },
        "paths": costs,
    });
    let table = markdown(&report);
    println!("{table}");
    if let Some(out) = &options.out {
        std::fs::create_dir_all(out).expect("output directory");
        let json = serde_json::to_string_pretty(&report).expect("JSON") + "\n";
        std::fs::write(out.join("cost.json"), json).expect("cost.json");
        std::fs::write(out.join("cost.md"), table).expect("cost.md");
        eprintln!("wrote {0}/cost.json and {0}/cost.md", out.display());
    }
}

/// One side of one path per message: a process with `n` messages and one
/// with `2n`, the difference divided by `n`.
fn per_message(
    exe: &FsPath,
    scratch: &FsPath,
    callgrind: bool,
    path: Path,
    side: Side,
    n: u64,
) -> PerMessage {
    let once = measure(exe, scratch, callgrind, path, side, n);
    let twice = measure(exe, scratch, callgrind, path, side, 2 * n);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
    let per_option = |a: Option<u64>, b: Option<u64>| Some(per(a?, b?));
    PerMessage {
        instructions: per_option(once.instructions, twice.instructions),
        allocations: per(once.counted.allocations, twice.counted.allocations),
        bytes: per(once.counted.bytes, twice.counted.bytes),
        reads: per_option(once.counted.reads, twice.counted.reads),
        commands: per_option(once.counted.commands, twice.counted.commands),
        by_command: twice
            .counted
            .by_command
            .iter()
            .map(|(command, &calls)| {
                let before = once.counted.by_command.get(command).copied().unwrap_or(0);
                (command.clone(), per(before, calls))
            })
            .collect(),
    }
}

/// Runs one measured process and returns its totals.
fn measure(
    exe: &FsPath,
    scratch: &FsPath,
    callgrind: bool,
    path: Path,
    side: Side,
    n: u64,
) -> Totals {
    let name = format!("sb-cost-{}-{}", path.name(), uuid::Uuid::new_v4().simple());
    let out_file = scratch.join(format!("{name}.callgrind"));
    let mut command = if callgrind {
        let mut command = Command::new("valgrind");
        command
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out_file.display()))
            .arg(exe);
        command
    } else {
        Command::new(exe)
    };
    command
        .args(["measure", path.name(), side.name(), &n.to_string(), &name])
        .env("COST_EXE", exe)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("start a measured process");
    // Polled, so a run that hangs (a broker gone) fails with a message.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {} with {n} messages took over {RUN_DEADLINE:?}",
                path.name(),
                side.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !status.success() {
        panic!(
            "{} {} with {n} messages failed ({status}):\n{}\n{}",
            path.name(),
            side.name(),
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let counted: Counted = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no counts from {} {}: {stdout}", path.name(), side.name()));
    let instructions = callgrind.then(|| {
        let text = std::fs::read_to_string(&out_file).expect("callgrind output");
        let _ = std::fs::remove_file(&out_file);
        text.lines()
            .find_map(|line| {
                line.strip_prefix("summary:")
                    .or_else(|| line.strip_prefix("totals:"))
            })
            .and_then(|total| total.split_whitespace().next()?.parse().ok())
            .expect("a callgrind total")
    });
    Totals {
        instructions,
        counted,
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|line| {
                line.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let version = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "rustc": std::env::var("COST_RUSTC").ok(),
        "valgrind": version("valgrind", "--version"),
        "redis": std::env::var("COST_REDIS").ok(),
        "rabbitmq": std::env::var("COST_RABBITMQ").ok(),
    })
}

fn markdown(report: &Value) -> String {
    let machine = &report["machine"];
    let mut out = String::new();
    out.push_str("# Cost per message\n\n");
    out.push_str(&format!(
        "Client-side work per message, switchboard beside the raw client doing the same by hand \
         (the same SPEC envelope built and parsed with serde_json), {} and {} messages per \
         process, the difference divided by {} so set-up drops out; each side measured {} \
         times, the median kept. Instructions from \
         `valgrind --tool=callgrind` (client process only), allocations from a counting global \
         allocator. COUNT and prefetch {} on both sides, a `{}` runtime.\n\n",
        report["n"],
        report["n"].as_u64().unwrap_or(0) * 2,
        report["n"],
        report["repeats"],
        report["batch"],
        report["runtime"].as_str().unwrap_or("")
    ));
    out.push_str(&format!(
        "- machine: {}, {} cores; {}; {}; Redis {}; RabbitMQ {}\n- date: {}\n- command: `{}`\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["rustc"].as_str().unwrap_or("rustc ?"),
        machine["valgrind"].as_str().unwrap_or("no valgrind"),
        machine["redis"].as_str().unwrap_or("?"),
        machine["rabbitmq"].as_str().unwrap_or("?"),
        report["date"].as_str().unwrap_or(""),
        report["command"].as_str().unwrap_or(""),
    ));
    if let Some(note) = report["note"].as_str() {
        out.push_str(&format!("- note: {note}\n"));
    }
    out.push_str(
        "\n| path | instructions / msg: switchboard / raw (ratio) | allocations / msg: switchboard / raw (+) | bytes / msg: switchboard / raw | reads / msg | Redis commands / msg (those a script runs included) |\n|---|---|---|---|---|---|\n",
    );
    let number = |value: &Value, digits: usize| {
        value
            .as_f64()
            .map_or("–".to_owned(), |v| format!("{v:.digits$}"))
    };
    for path in report["paths"].as_array().into_iter().flatten() {
        let (s, r) = (&path["switchboard"], &path["raw"]);
        let pair = |field: &str, digits: usize| {
            if s[field].is_null() && r[field].is_null() {
                "–".to_owned()
            } else {
                format!(
                    "{} / {}",
                    number(&s[field], digits),
                    number(&r[field], digits)
                )
            }
        };
        let mark = |met: &Value| match met.as_bool() {
            Some(true) => "",
            Some(false) => " ✗",
            None => "",
        };
        out.push_str(&format!(
            "| {} | {} ({}×{}) | {} ({}{}) | {} | {} | {} |\n",
            path["label"].as_str().unwrap_or(""),
            pair("instructions", 0),
            number(&path["instructions_ratio"], 2),
            mark(&path["instructions_goal_met"]),
            pair("allocations", 1),
            signed(&path["extra_allocations"]),
            mark(&path["allocations_goal_met"]),
            pair("bytes", 0),
            pair("reads", 3),
            pair("commands", 3),
        ));
    }
    out.push_str(
        "\nGoals: instructions ≤ 1.10 × raw; allocations ≤ raw + 4 (publish), + 8 (consume); ✗ marks a miss.\n",
    );
    out
}

/// `value` with its sign, to one digit: `+5.0`, `−4.8`.
fn signed(value: &Value) -> String {
    match value.as_f64() {
        Some(v) if v < 0.0 => format!("−{:.1}", -v),
        Some(v) => format!("+{v:.1}"),
        None => "–".to_owned(),
    }
}

/// `compare A B`: the largest relative difference between two reports'
/// per-message figures; fails above 1 %.
pub fn compare(args: &[String]) {
    let [a, b] = args else {
        panic!("compare A.json B.json");
    };
    let read = |file: &String| -> Value {
        serde_json::from_str(&std::fs::read_to_string(file).expect("report")).expect("JSON")
    };
    let (a, b) = (read(a), read(b));
    let mut worst: f64 = 0.0;
    for (pa, pb) in a["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(b["paths"].as_array().into_iter().flatten())
    {
        for side in ["switchboard", "raw"] {
            for field in ["instructions", "allocations", "bytes"] {
                let (Some(x), Some(y)) = (pa[side][field].as_f64(), pb[side][field].as_f64())
                else {
                    continue;
                };
                let difference = (x - y).abs() / x.abs().max(y.abs()).max(1e-9);
                worst = worst.max(difference);
                println!(
                    "{:<24} {:<11} {:<12} {:>12.1} {:>12.1} {:>6.2} %",
                    pa["path"].as_str().unwrap_or(""),
                    side,
                    field,
                    x,
                    y,
                    difference * 100.0
                );
            }
        }
    }
    println!("largest difference: {:.2} %", worst * 100.0);
    if worst > 0.01 {
        std::process::exit(1);
    }
}
