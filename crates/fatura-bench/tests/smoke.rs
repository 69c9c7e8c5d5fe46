//! Smoke runs of the benchmarks: each must keep building and run to completion on a short
//! load (its own checks — e.g. rating-bench's ledger totals equal the engine's, every
//! event of the closed cycle is invoiced once — fail the run). The real figures come from
//! release builds (BENCHMARKS.md). As integration tests they are built by the workspace's
//! one test build, with its features, instead of a second build of their own.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::Command;

fn run(bin: &str, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("the benchmark starts");
    assert!(
        out.status.success(),
        "{bin} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ingest_bench_runs() {
    run(
        env!("CARGO_BIN_EXE_ingest-bench"),
        &["--seconds", "2", "--concurrency", "2", "--quiet"],
    );
}

#[test]
fn gateway_bench_runs() {
    run(
        env!("CARGO_BIN_EXE_gateway-bench"),
        &[
            "--rates",
            "200",
            "--seconds",
            "1",
            "--connections",
            "8",
            "--throughput-seconds",
            "1",
        ],
    );
}

#[test]
fn rating_bench_closes_its_cycle_on_any_date() {
    run(
        env!("CARGO_BIN_EXE_rating-bench"),
        &[
            "--customers",
            "20",
            "--events-per-customer",
            "200",
            "--store",
        ],
    );
}

#[test]
fn analytics_bench_runs() {
    run(
        env!("CARGO_BIN_EXE_analytics-bench"),
        &["--events", "20000", "--customers", "10", "--reps", "3"],
    );
}
