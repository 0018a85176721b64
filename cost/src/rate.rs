//! `rate`: how fast a Redis Streams consumer with every setting at its
//! default (`concurrency` 1, prefetch 64, batch 128) empties a filled
//! stream, beside the raw consumer (`XREADGROUP COUNT 128`, `XACK` sent
//! with the next read). Rounds interleave the two sides; medians printed.

use std::time::Instant;

use crate::paths::{self, Path, Side};

pub async fn run(args: &[String]) {
    let mut n: u64 = 20_000;
    let mut rounds = 3;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--n" => n = args.next().expect("--n N").parse().expect("N"),
            "--rounds" => rounds = args.next().expect("--rounds R").parse().expect("R"),
            other => panic!("unknown argument {other:?}"),
        }
    }
    let mut rates = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (i, side) in [Side::Raw, Side::Switchboard].into_iter().enumerate() {
            let name = format!("sb-rate-{}", uuid::Uuid::new_v4().simple());
            paths::streams_group(side, &name).await;
            paths::feed(Path::StreamsConsume, side, n, &name).await;
            let started = Instant::now();
            paths::streams_consume_default(side, &name, n).await;
            let rate = n as f64 / started.elapsed().as_secs_f64();
            paths::forget(&name).await;
            println!("round {round} {:<11} {rate:>9.0} msg/s", side.name());
            rates[i].push(rate);
        }
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let raw = median(&mut rates[0]);
    let switchboard = median(&mut rates[1]);
    println!(
        "median of {rounds}, {n} entries, tokio current_thread: raw {raw:.0} msg/s, switchboard (default settings) {switchboard:.0} msg/s ({:.2} × raw)",
        switchboard / raw
    );
}
