//! The end-to-end throughput benchmark: one run on one machine measures
//!
//! 1. **the raw producer**: librdkafka producing generated delivery requests (same key,
//!    headers and producer settings as the ingestion tier, every record acknowledged)
//!    straight to the broker, each way in `plan::RAW_METHODS` (a future per record as the
//!    tier does, or a delivery callback with one or two producers), before and after the
//!    HTTP tier's phases: its fastest run is the ceiling for the HTTP tier, and the whole
//!    pipeline's rate is reported over it too;
//! 2. **the HTTP tier** (`dronedelivery ingest`) under the load generator at batch sizes
//!    1, 100 and 10,000 (closed loop), and single requests in open loop at a fixed rate
//!    for honest latency;
//! 3. **the whole pipeline** (`dronedelivery run`: ingest, processors, history sink) at a
//!    fixed offered rate: what it sustains, how long until every accepted request is a
//!    row of the history (and a `Created` event of the delivery consumer), and the
//!    freshness of the history (probe requests from ack until a query sees them);
//! 4. **memory**: the peak resident memory of each service process, and its resident
//!    memory over time under sustained overload (offered far more than it can take).
//!
//! It does so twice, in two passes: on the **embedded broker** (librdkafka's mock
//! cluster, in memory, in a process of its own) and on **Apache Kafka**, a three-node KRaft
//! cluster (`deploy/tools/kafka`, replication factor 3, `min.insync.replicas=2`) that the
//! bench starts on 127.0.0.1. On the embedded broker every phase gets a fresh one; on
//! Kafka the phases share the cluster, the whole pipeline first. The cluster is first
//! warmed up by a minute of the whole pipeline, reported apart (`--warm-up SECONDS`):
//! its JVMs start cold. Before each measured run of the pipeline its topics and groups
//! are deleted and created again, so that it starts from nothing, as on a fresh embedded
//! broker. `--brokers HOST:PORT` makes the Kafka pass use a cluster of your own instead,
//! with neither warm-up nor deletion (give it fresh topics for comparable figures).
//! `--only embedded|kafka` runs one pass.
//!
//! The services run as their own processes (the release binary built with this bench);
//! the embedded broker of the raw producer and HTTP tier phases runs in a process of its
//! own (this binary again), the load generator and the raw producer in this one, the
//! Kafka nodes are `java` processes, all on the same cores. (`run`, in the whole
//! pipeline's phases, holds its own embedded broker, as it does in use.)
//!
//! The report goes to `benches/results/` (or `--out DIR`): `e2e.json`, `e2e.md` (the two
//! passes side by side, then each in full) and `e2e.svg` (throughput and latency by
//! batch size, both passes).
//!
//! The modules: `main.rs` runs the passes and their phases in order; `plan.rs` fixes what
//! is measured; `cluster.rs` provides the brokers; `service.rs` starts the service
//! processes (with the test harness's starter, `tests/common/binary.rs`) and reads their
//! memory; `phases.rs` holds the raw producer, the HTTP tier and the overload,
//! `pipeline.rs` the whole pipeline; `machine.rs` the machine and commit; `report.rs`
//! the report's structs (`e2e.json`) and `e2e.md`; `chart.rs` `e2e.svg`.
//!
//! **The notifications run** (`--notifications`) measures none of the passes either:
//! `run --simulate-drones` with a webhook receiver and an SSE feed in this process, the
//! latency from a delivery's change to the webhook and to the SSE event (p50/p99), and the
//! tier's memory with 5,000 SSE streams held (`notify.rs`; `notifications.json`,
//! `notifications.md`).
//!
//! **The soak run** (`--soak DURATION`, e.g. `30m`) measures none of the above: it runs
//! `dronedelivery run --simulate-drones` on its own embedded broker under a sustained
//! load below its saturation (`--soak-rate RECORDS/S`, or half of the end-to-end rate of
//! phase 3's saturated run, `--soak-calibration SECONDS` long, 30 by default), samples the
//! resident memory of each process every few seconds, and gives the verdict: over the
//! second half, resident memory may grow by at most 10% (the median of the last tenth
//! against the median of the tenth centred on the half). After the load it reads each
//! state changelog end to end as a restore does, and times it. `--soak-run-arg ARG`
//! (repeated) passes more flags to `run`. It writes `soak.json`, `soak.csv` (every
//! sample), `soak.md` and `soak.svg` (memory over time) to the results folder. The
//! modules: `soak.rs` runs it, `memory.rs` holds the verdict's arithmetic,
//! `changelog.rs` the restore times, `soak_report.rs` the files.
//!
//! `cargo test --bench e2e` runs the bench's unit checks (the pure parts: the growth
//! verdict, reading `/proc` status text, the changelog fold) instead of measuring: a
//! bench without libtest's harness collects no `#[test]`, so `checks` below runs them.
//!
//! `cargo bench --bench e2e [-- --only embedded|kafka] [--brokers HOST:PORT] [--nodes N]
//! [--warm-up SECONDS] [--seconds N] [--out DIR]`; `--pipeline-rate` (records/s, default 100,000) and
//! `--single-rate` (requests/s, default 30,000) set the offered rates of the open-loop
//! phases. `--render FILE` measures nothing and writes `e2e.md` and `e2e.svg` again from
//! an `e2e.json`.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

/// The test harness's real Kafka cluster (`deploy/tools/kafka`), shared with this bench.
#[path = "../../tests/common/kafka.rs"]
#[allow(dead_code, unreachable_pub)]
mod kafka;

/// The test harness's starter of the package's binary, shared with this bench.
#[path = "../../tests/common/binary.rs"]
mod binary;

mod changelog;
mod chart;
mod cluster;
mod machine;
mod memory;
mod notify;
mod phases;
mod pipeline;
mod plan;
mod report;
mod service;
mod soak;
mod soak_report;

use std::path::{Path, PathBuf};

use cluster::Broker;
use plan::{HTTP_TIERS, MAX_CONSUMER_LAG, Pass, WARM_UP_RATE};
use report::{E2eReport, PassReport};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone)]
struct Args {
    /// The Kafka pass's cluster, instead of one the bench starts.
    brokers: Option<String>,
    passes: Vec<Pass>,
    /// Nodes of the cluster the bench starts (1 or 3).
    nodes: usize,
    /// Seconds of load that warm a new Kafka cluster up before it is measured.
    warm_up: f64,
    /// Measure nothing: write `e2e.md` and `e2e.svg` again from this `e2e.json`.
    render: Option<PathBuf>,
    seconds: f64,
    out: PathBuf,
    pipeline_rate: f64,
    single_rate: f64,
    /// The soak run instead of the passes, with this much load.
    soak: Option<soak::SoakArgs>,
    /// The notifications run instead of the passes.
    notifications: bool,
}

fn args() -> Args {
    let mut args = Args {
        brokers: None,
        passes: vec![Pass::Embedded, Pass::Kafka],
        nodes: 3,
        warm_up: 60.0,
        render: None,
        seconds: 10.0,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results"),
        pipeline_rate: 100_000.0,
        single_rate: 30_000.0,
        soak: None,
        notifications: false,
    };
    let mut soak_rate = None;
    let mut soak_calibration = 30.0;
    let mut soak_run_args = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        let mut value = || {
            given
                .next()
                .unwrap_or_else(|| panic!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--brokers" => args.brokers = Some(value()),
            "--only" => {
                args.passes = match value().as_str() {
                    "embedded" => vec![Pass::Embedded],
                    "kafka" => vec![Pass::Kafka],
                    other => panic!("--only embedded|kafka, not {other}"),
                }
            }
            "--nodes" => {
                args.nodes = value().parse().expect("--nodes 1|3");
                assert!(matches!(args.nodes, 1 | 3), "--nodes 1|3");
            }
            "--render" => args.render = Some(PathBuf::from(value())),
            "--warm-up" => args.warm_up = value().parse().expect("--warm-up SECONDS"),
            "--seconds" => args.seconds = value().parse().expect("--seconds N"),
            "--out" => args.out = PathBuf::from(value()),
            "--pipeline-rate" => args.pipeline_rate = value().parse().expect("records/s"),
            "--single-rate" => args.single_rate = value().parse().expect("requests/s"),
            "--soak" => {
                let secs = loadgen::plan::parse_duration(&value())
                    .unwrap_or_else(|e| panic!("--soak DURATION (30m, 90s): {e}"))
                    .as_secs_f64();
                assert!(secs >= 10.0, "--soak: at least 10 s");
                args.soak = Some(soak::SoakArgs {
                    secs,
                    rate: None,
                    calibration_secs: 0.0,
                    run_args: Vec::new(),
                });
            }
            "--soak-rate" => soak_rate = Some(value().parse().expect("--soak-rate RECORDS/S")),
            "--soak-calibration" => {
                soak_calibration = value().parse().expect("--soak-calibration SECONDS");
            }
            "--soak-run-arg" => soak_run_args.push(value()),
            "--notifications" => args.notifications = true,
            // cargo bench passes --bench; filters are not used.
            _ => {}
        }
    }
    if let Some(soak) = &mut args.soak {
        soak.rate = soak_rate;
        soak.calibration_secs = soak_calibration;
        soak.run_args = soak_run_args;
    }
    args
}

fn main() {
    // `cargo test --bench e2e` (no `--bench` argument): the unit checks, not the bench.
    #[cfg(test)]
    if !std::env::args().any(|a| a == "--bench") {
        checks::run();
        return;
    }
    // As the services do: the raw producer and the embedded broker run as they would.
    // The Kafka nodes this process starts inherit it; the JVM asks for no huge pages
    // unless told to (`-XX:+UseTransparentHugePages`), so where the machine's setting is
    // `madvise` (the default of most distributions) it changes nothing for them.
    dronedelivery::huge_pages::turn_off();
    if std::env::args().any(|a| a == cluster::SERVE_EMBEDDED_BROKER) {
        cluster::serve_embedded_broker();
        return;
    }
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(args));
}

async fn bench(args: Args) {
    let started = chrono::Utc::now();
    std::fs::create_dir_all(&args.out).unwrap();
    if let Some(json) = &args.render {
        let text = std::fs::read_to_string(json)
            .unwrap_or_else(|e| panic!("reading {}: {e}", json.display()));
        let results: E2eReport = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("reading {}: {e}", json.display()));
        write_summary(&args.out, &results);
        return;
    }
    if let Some(soak_args) = &args.soak {
        let facts = soak::Facts {
            started: started.to_rfc3339(),
            machine: machine::machine(),
            // Before the report files (tracked) are written.
            commit: machine::commit(),
            command: soak_command(soak_args),
        };
        let report = soak::soak(soak_args, facts).await;
        write_soak(&args.out, &report);
        return;
    }
    if args.notifications {
        let report =
            notify::notifications(started.to_rfc3339(), machine::machine(), machine::commit())
                .await;
        let json = serde_json::to_value(&report).unwrap();
        std::fs::write(
            args.out.join("notifications.json"),
            serde_json::to_string_pretty(&json).unwrap() + "\n",
        )
        .unwrap();
        let summary = notify::markdown(&report);
        std::fs::write(args.out.join("notifications.md"), &summary).unwrap();
        println!("\n{summary}");
        return;
    }
    println!("end-to-end benchmark, {} s per phase", args.seconds);
    if args.passes.contains(&Pass::Kafka) && args.brokers.is_none() {
        // Java and the jars are checked (and fetched) before any pass runs.
        kafka::KafkaCluster::fetch().unwrap_or_else(|e| panic!("{e:#}"));
    }
    let mut results = E2eReport {
        started: started.to_rfc3339(),
        machine: machine::machine(),
        // Before the report files (tracked) are written.
        commit: machine::commit(),
        seconds_per_phase: args.seconds,
        max_consumer_lag: MAX_CONSUMER_LAG.parse::<u64>().unwrap(),
        command: command(&args),
        passes: Vec::new(),
    };
    for &pass in &args.passes {
        results.passes.push(run_pass(&args, pass).await);
        // Written after each pass, so that a failed later pass keeps the earlier ones.
        write_report(&args.out, &results);
    }
}

/// `e2e.json`, `e2e.svg` and `e2e.md` in `out`; prints the summary.
fn write_report(out: &Path, results: &E2eReport) {
    // Through a `Value`, whose maps sort their keys: the file lists its fields in the
    // order the reports written before it do, so that they compare line by line.
    let json = serde_json::to_value(results).unwrap();
    std::fs::write(
        out.join("e2e.json"),
        serde_json::to_string_pretty(&json).unwrap() + "\n",
    )
    .unwrap();
    write_summary(out, results);
}

/// `e2e.svg` and `e2e.md` in `out`; prints the summary.
fn write_summary(out: &Path, results: &E2eReport) {
    std::fs::write(out.join("e2e.svg"), chart::chart(results)).unwrap();
    let summary = report::markdown(results);
    std::fs::write(out.join("e2e.md"), &summary).unwrap();
    println!("\n{summary}");
    println!("report written to {}", out.display());
}

/// `soak.json`, `soak.csv`, `soak.svg` and `soak.md` in `out`; prints the summary.
fn write_soak(out: &Path, report: &soak_report::SoakReport) {
    let json = serde_json::to_value(report).unwrap();
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&json).unwrap() + "\n",
    )
    .unwrap();
    std::fs::write(out.join("soak.csv"), soak_report::csv(report)).unwrap();
    std::fs::write(out.join("soak.svg"), soak_report::chart(report)).unwrap();
    let summary = soak_report::markdown(report);
    std::fs::write(out.join("soak.md"), &summary).unwrap();
    println!("\n{summary}");
    println!("report written to {}", out.display());
}

/// The command that reproduces a soak run.
fn soak_command(soak: &soak::SoakArgs) -> String {
    let secs = soak.secs.round() as u64;
    let duration = if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    };
    let mut command = format!("cargo bench --bench e2e -- --soak {duration}");
    match soak.rate {
        Some(rate) => command.push_str(&format!(" --soak-rate {rate}")),
        None if (soak.calibration_secs - 30.0).abs() > f64::EPSILON => {
            command.push_str(&format!(" --soak-calibration {}", soak.calibration_secs));
        }
        None => {}
    }
    for arg in &soak.run_args {
        command.push_str(&format!(" --soak-run-arg {arg}"));
    }
    command
}

/// The command that reproduces this run (its options that differ from the defaults).
fn command(args: &Args) -> String {
    let mut command = String::from("cargo bench --bench e2e");
    let mut options = Vec::new();
    if args.passes.len() == 1 {
        options.push(format!("--only {}", args.passes[0].name()));
    }
    if let Some(brokers) = &args.brokers {
        options.push(format!("--brokers {brokers}"));
    }
    for (flag, value, default) in [
        ("--nodes", args.nodes as f64, 3.0),
        ("--warm-up", args.warm_up, 60.0),
        ("--seconds", args.seconds, 10.0),
        ("--pipeline-rate", args.pipeline_rate, 100_000.0),
        ("--single-rate", args.single_rate, 30_000.0),
    ] {
        if (value - default).abs() > f64::EPSILON {
            options.push(format!("{flag} {value}"));
        }
    }
    if !options.is_empty() {
        command.push_str(" -- ");
        command.push_str(&options.join(" "));
    }
    command
}

/// Runs `phase` on `shared` (the Kafka pass's cluster), or on a fresh embedded broker of
/// its own.
async fn on_broker<T, F, Fut>(shared: Option<&Broker>, phase: F) -> T
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    if let Some(broker) = shared {
        return phase(broker.bootstrap()).await;
    }
    let broker = Broker::embedded();
    let result = phase(broker.bootstrap()).await;
    broker.stop().await;
    result
}

/// A figure of the report, or `default` when it is not a number (written as `null`).
fn finite_or(v: f64, default: f64) -> f64 {
    if v.is_finite() { v } else { default }
}

/// Every phase on one kind of broker.
///
/// On the embedded broker every phase gets a fresh one. On Kafka the phases share one
/// cluster, as they would share a long-running one, and the whole pipeline runs first
/// (with `--brokers`, its consumers would otherwise begin by reading what the other
/// phases produced).
/// A cluster the bench started is first warmed up by a run of the whole pipeline, kept
/// apart in the report (its JVMs start cold: the first minute of load was several times
/// slower per request here), and its pipeline topics and groups are deleted and created
/// again before each measured run, so that every run starts from nothing. With
/// `--brokers`, nothing is deleted: the runs share the topics, and a later run restores
/// the state of the earlier ones.
async fn run_pass(args: &Args, pass: Pass) -> PassReport {
    let broker = cluster::label(pass, args.brokers.as_deref(), args.nodes);
    println!("\n== {broker} ==");
    let shared = match pass {
        Pass::Kafka => Some(Broker::kafka(args.brokers.as_deref(), args.nodes).await),
        Pass::Embedded => None,
    };
    let warm_up = match &shared {
        Some(cluster @ Broker::Cluster(_)) if args.warm_up > 0.0 => {
            println!(
                "warming the cluster up: the whole pipeline for {:.0} s",
                args.warm_up
            );
            Some(pipeline::whole_pipeline(&cluster.bootstrap(), WARM_UP_RATE, args.warm_up).await)
        }
        _ => None,
    };

    // The whole pipeline: saturated (offered more than it takes), then at 80% of the
    // end-to-end rate that gave, to see that it keeps up and how fresh the history is.
    if let Some(cluster) = &shared {
        cluster.reset().await;
    }
    let saturated = on_broker(shared.as_ref(), |b| async move {
        pipeline::whole_pipeline(&b, args.pipeline_rate, args.seconds).await
    })
    .await;
    let capacity = finite_or(saturated.end_to_end_deliveries_per_sec, 10_000.0);
    let sustained_rate = (capacity * 0.8 / 1000.0).round().max(1.0) * 1000.0;
    if let Some(cluster) = &shared {
        cluster.reset().await;
    }
    let sustained = on_broker(shared.as_ref(), |b| async move {
        pipeline::whole_pipeline(&b, sustained_rate, args.seconds).await
    })
    .await;

    // The raw producer: the ceiling for the HTTP tier.
    // The raw producer before and after the tier's phases: its fastest run is the
    // ceiling, and the two show whether the machine changed in between.
    let mut raw_runs = on_broker(shared.as_ref(), |b| async move {
        phases::raw_producer(&b, args.seconds, "before").await
    })
    .await;
    let mut http = Vec::new();
    for (batch, connections) in HTTP_TIERS {
        http.push(
            on_broker(shared.as_ref(), |b| async move {
                phases::http_tier(&b, args.seconds, batch, connections, None).await
            })
            .await,
        );
    }
    let single_open = on_broker(shared.as_ref(), |b| async move {
        phases::http_tier(&b, args.seconds, 1, 256, Some(args.single_rate)).await
    })
    .await;
    raw_runs.extend(
        on_broker(shared.as_ref(), |b| async move {
            phases::raw_producer(&b, args.seconds, "after").await
        })
        .await,
    );
    let raw = raw_runs
        .iter()
        .max_by(|a, b| {
            finite_or(a.records_per_sec, 0.0).total_cmp(&finite_or(b.records_per_sec, 0.0))
        })
        .cloned()
        .unwrap();

    // Memory under sustained overload.
    let overload = on_broker(shared.as_ref(), |b| async move {
        phases::overload(&b, args.seconds).await
    })
    .await;
    if let Some(shared) = shared {
        shared.stop().await;
    }

    let raw_rate = finite_or(raw.records_per_sec, 1.0).max(1.0);
    let bulk_rate = http
        .last()
        .map_or(0.0, |r| finite_or(r.report.records_per_sec, 0.0));
    PassReport {
        pass,
        broker,
        warm_up,
        raw_producer: raw,
        raw_runs,
        http_tier: http,
        single_open_loop: single_open,
        http_tier_efficiency: bulk_rate / raw_rate,
        pipeline: saturated,
        pipeline_sustained: sustained,
        overload,
    }
}

/// The bench's unit checks, run by `cargo test --bench e2e`: each module's list, each
/// check caught if it panics; exits with a failure if one did.
#[cfg(test)]
mod checks {
    pub(super) fn run() {
        let all = [
            crate::memory::tests::TESTS,
            crate::changelog::tests::TESTS,
            crate::soak::tests::TESTS,
        ];
        let mut failed = Vec::new();
        let mut passed = 0;
        for (name, check) in all.into_iter().flatten() {
            match std::panic::catch_unwind(check) {
                Ok(()) => {
                    passed += 1;
                    println!("check {name} ... ok");
                }
                Err(_) => {
                    println!("check {name} ... FAILED");
                    failed.push(*name);
                }
            }
        }
        println!("\n{passed} passed, {} failed", failed.len());
        if !failed.is_empty() {
            println!("failed: {}", failed.join(", "));
            std::process::exit(1);
        }
    }
}
