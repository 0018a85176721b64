//! Cost per message, switchboard beside the raw clients: instructions
//! (callgrind) and heap allocations (a counting allocator) per message on
//! every broker path, the set-up measured and subtracted. `scripts/cost`
//! builds and runs it; see `docs/cost.md`.
//!
//! ```text
//! switchboard-cost report [--short] [--n N] [--out DIR] [--path NAME]...
//! switchboard-cost measure PATH SIDE N NAME   (one measured process)
//! switchboard-cost feed PATH SIDE N NAME      (its feeder)
//! switchboard-cost compare A.json B.json      (largest difference of two reports)
//! switchboard-cost rate [--n N]               (default-settings Redis consumer rate)
//! switchboard-cost dedupe [--n N] [--held H] [--capacity C]  (in-process dedupe store per message)
//! ```

mod count;
mod dedupe;
mod event;
mod paths;
mod rate;
mod report;

#[global_allocator]
static COUNTING: count::Counting = count::Counting;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args.first().map(String::as_str) {
        Some("measure") => {
            let (path, side, n, name) = path_args(&args[1..]);
            let counted = runtime.block_on(paths::measure(path, side, n, &name));
            println!("{}", serde_json::to_string(&counted).expect("JSON"));
        }
        Some("feed") => {
            let (path, side, n, name) = path_args(&args[1..]);
            runtime.block_on(paths::feed(path, side, n, &name));
        }
        Some("report") => report::run(&args[1..]),
        Some("compare") => report::compare(&args[1..]),
        Some("rate") => runtime.block_on(rate::run(&args[1..])),
        Some("dedupe") => runtime.block_on(dedupe::run(&args[1..])),
        _ => {
            eprintln!("usage: switchboard-cost report|measure|feed|compare|rate …");
            std::process::exit(2);
        }
    }
}

fn path_args(args: &[String]) -> (paths::Path, paths::Side, u64, String) {
    let [path, side, n, name] = args else {
        panic!("expected PATH SIDE N NAME, got {args:?}");
    };
    (
        path.parse().expect("path"),
        side.parse().expect("side"),
        n.parse().expect("N"),
        name.clone(),
    )
}
