//! The end-to-end throughput benchmark: one run on one machine measures
//!
//! 1. **the raw producer**: librdkafka producing generated delivery requests (same key,
//!    headers and producer settings as the ingestion tier, every record acknowledged)
//!    straight to the broker: the ceiling for the HTTP tier;
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
//! cluster, in memory, in this process) and on **Apache Kafka**, a three-node KRaft
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
//! the embedded broker and the load generator run in this one, the Kafka nodes are `java`
//! processes, all on the same cores.
//!
//! The report goes to `benches/results/` (or `--out DIR`): `e2e.json`, `e2e.md` (the two
//! passes side by side, then each in full) and `e2e.svg` (throughput and latency by
//! batch size, both passes).
//!
//! `cargo bench --bench e2e [-- --only embedded|kafka] [--brokers HOST:PORT] [--nodes N]
//! [--warm-up SECONDS] [--seconds N] [--out DIR]`; `--pipeline-rate` (records/s, default 100,000) and
//! `--single-rate` (requests/s, default 30,000) set the offered rates of the open-loop
//! phases. `--render FILE` measures nothing and writes `e2e.md` and `e2e.svg` again from
//! an `e2e.json`.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

/// The test harness's real Kafka cluster (`deploy/tools/kafka`), shared with this bench.
#[path = "../tests/common/kafka.rs"]
#[allow(dead_code, unreachable_pub)]
mod kafka;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use analytics::sql::{History, QueryLimits};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use bus::{BusError, ClientSettings, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use loadgen::{LoadgenConfig, Report};
use schemas::headers as h;
use schemas::topics;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BIN: &str = env!("CARGO_BIN_EXE_dronedelivery");

/// The whole pipeline's lag backpressure in both passes (`run`'s default with the embedded
/// broker; off by default with `--brokers`), so that the passes differ in the broker only.
const MAX_CONSUMER_LAG: &str = "20000";

/// Which broker a pass runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// librdkafka's mock cluster, a fresh one per phase.
    Embedded,
    /// Apache Kafka: one cluster for the pass, started by the bench, or `--brokers`.
    Kafka,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Kafka => "kafka",
        }
    }
}

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
    };
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
            // cargo bench passes --bench; filters are not used.
            _ => {}
        }
    }
    args
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(args));
}

/// The broker of a phase (embedded) or of a pass (Kafka).
enum Broker {
    Embedded(EmbeddedBroker),
    /// Started by the bench; stopped and removed when dropped.
    Cluster(kafka::KafkaCluster),
    External(String),
}

impl Broker {
    /// A new embedded broker or Kafka cluster, or the given one, with every topic.
    async fn fresh(args: &Args, pass: Pass) -> Self {
        let broker = match (pass, &args.brokers) {
            (Pass::Embedded, _) => {
                return Self::Embedded(EmbeddedBroker::start(1, &topics::ALL).unwrap());
            }
            (Pass::Kafka, Some(b)) => Self::External(b.clone()),
            (Pass::Kafka, None) => {
                let nodes = args.nodes;
                let cluster =
                    tokio::task::spawn_blocking(move || kafka::KafkaCluster::start(nodes))
                        .await
                        .unwrap()
                        .unwrap_or_else(|e| panic!("{e:#}"));
                Self::Cluster(cluster)
            }
        };
        bus::ensure_topics(&ClientSettings::plain(broker.bootstrap()), &topics::ALL)
            .await
            .unwrap();
        broker
    }

    fn bootstrap(&self) -> String {
        match self {
            Self::Embedded(b) => b.bootstrap_servers().to_owned(),
            Self::Cluster(c) => c.bootstrap().to_owned(),
            Self::External(b) => b.clone(),
        }
    }

    /// Deletes the pipeline's topics and consumer groups on a cluster the bench started,
    /// and creates the topics again (the groups come back with the next run's members): the next run of the whole pipeline starts from
    /// nothing (no state to restore, every drone free), as on a fresh embedded broker,
    /// while the cluster's JVMs stay warm. Does nothing to other brokers.
    async fn reset(&self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        use rdkafka::types::RDKafkaErrorCode;

        let Self::Cluster(cluster) = self else {
            return;
        };
        let bootstrap = cluster.bootstrap().to_owned();
        let config = || {
            let mut config = rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", &bootstrap);
            config
        };
        let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let deadline = Instant::now() + Duration::from_secs(60);
        // The last run has stopped and its members have left; a group that still has
        // members (a session not expired yet) is tried again.
        let groups = [
            topics::groups::WORKFLOW,
            topics::groups::HISTORY,
            topics::groups::SCHEDULING,
            topics::groups::TRACKING,
            topics::groups::DELIVERIES,
        ];
        loop {
            let failed: Vec<String> = admin
                .delete_groups(&groups, &options)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|result| match result {
                    Err((group, code)) if code != RDKafkaErrorCode::GroupIdNotFound => {
                        Some(format!("{group}: {code}"))
                    }
                    _ => None,
                })
                .collect();
            if failed.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "deleting the consumer groups: {failed:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let names: Vec<&str> = topics::ALL.iter().map(|t| t.name).collect();
        // A deletion that timed out may still complete: the metadata below decides.
        match admin.delete_topics(&names, &options).await {
            Ok(results) => {
                for result in results {
                    if let Err((topic, code)) = result {
                        assert!(
                            matches!(
                                code,
                                RDKafkaErrorCode::UnknownTopicOrPartition
                                    | RDKafkaErrorCode::RequestTimedOut
                            ),
                            "deleting {topic}: {code}"
                        );
                    }
                }
            }
            Err(e) => println!("deleting the pipeline's topics: {e}; waiting for the metadata"),
        }
        // Creating a topic that is still being deleted fails: wait until the cluster's
        // metadata lists none of them, then until it lists all of them again.
        let metadata: BaseConsumer = config().create().unwrap();
        let metadata = Arc::new(metadata);
        let listed = || {
            let client = metadata.clone();
            tokio::task::spawn_blocking(move || {
                client
                    .fetch_metadata(None, Duration::from_secs(10))
                    .ok()
                    .map(|m| {
                        m.topics()
                            .iter()
                            .filter(|t| {
                                topics::ALL.iter().any(|a| {
                                    a.name == t.name()
                                        && t.partitions().len() == a.partitions as usize
                                })
                            })
                            .count()
                    })
            })
        };
        while listed().await.unwrap() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "the pipeline's topics were not deleted within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            bus::ensure_topics(&ClientSettings::plain(&bootstrap), &topics::ALL)
                .await
                .unwrap();
            if listed().await.unwrap() == Some(topics::ALL.len()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the pipeline's topics did not come back within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops a cluster the bench started (off the async threads).
    async fn stop(self) {
        if let Self::Cluster(cluster) = self {
            tokio::task::spawn_blocking(move || drop(cluster))
                .await
                .unwrap();
        }
    }
}

/// What the broker of a pass is, for the report.
fn broker_label(args: &Args, pass: Pass) -> String {
    match (pass, &args.brokers) {
        (Pass::Embedded, _) => "embedded (librdkafka mock cluster)".to_owned(),
        (Pass::Kafka, Some(b)) => format!("Kafka-compatible cluster at {b}"),
        (Pass::Kafka, None) => format!(
            "Apache Kafka {}, {} KRaft node{} on 127.0.0.1{}",
            kafka_version(),
            args.nodes,
            if args.nodes == 1 { "" } else { "s" },
            if args.nodes == 3 {
                " (replication factor 3, min.insync.replicas=2)"
            } else {
                ""
            }
        ),
    }
}

/// The Kafka version `deploy/tools/kafka` pins.
fn kafka_version() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tools/kafka");
    std::fs::read_to_string(script)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("KAFKA_VERSION="))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

/// A service process; killed when dropped.
struct Service {
    child: Child,
    base: String,
}

impl Service {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .env("DRONEDELIVERY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("dronedelivery listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the service did not say where it listens");
        Self { child, base }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        proc_status_kb(self.pid(), "VmHWM:") * 1024
    }

    /// Resident memory now (VmRSS), in bytes.
    fn rss(&self) -> u64 {
        proc_status_kb(self.pid(), "VmRSS:") * 1024
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn load(config: LoadgenConfig) -> Report {
    loadgen::run(config, CancellationToken::new())
        .await
        .unwrap()
}

fn load_config(base: &str, batch: u32, connections: u32, seconds: f64) -> LoadgenConfig {
    LoadgenConfig {
        target: base.to_owned(),
        duration: Duration::from_secs_f64(seconds),
        batch_size: batch,
        connections,
        tenants: 50,
        ..LoadgenConfig::default()
    }
}

async fn bench(args: Args) {
    let started = chrono::Utc::now();
    std::fs::create_dir_all(&args.out).unwrap();
    if let Some(json) = &args.render {
        let results: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        write_summary(&args.out, &results);
        return;
    }
    println!("end-to-end benchmark, {} s per phase", args.seconds);
    if args.passes.contains(&Pass::Kafka) && args.brokers.is_none() {
        // Java and the jars are checked (and fetched) before any pass runs.
        kafka::KafkaCluster::fetch().unwrap_or_else(|e| panic!("{e:#}"));
    }
    // Before the report files (tracked) are written.
    let commit = commit();
    let mut passes = Vec::new();
    for &pass in &args.passes {
        passes.push(run_pass(&args, pass).await);
        // Written after each pass, so that a failed later pass keeps the earlier ones.
        let results = json!({
            "started": started.to_rfc3339(),
            "machine": machine(),
            "commit": commit,
            "seconds_per_phase": args.seconds,
            "max_consumer_lag": MAX_CONSUMER_LAG.parse::<u64>().unwrap(),
            "command": command(&args),
            "passes": passes,
        });
        write_report(&args.out, &results);
    }
}

/// `e2e.json`, `e2e.svg` and `e2e.md` in `out`; prints the summary.
fn write_report(out: &Path, results: &Value) {
    std::fs::write(
        out.join("e2e.json"),
        serde_json::to_string_pretty(results).unwrap() + "\n",
    )
    .unwrap();
    write_summary(out, results);
}

/// `e2e.svg` and `e2e.md` in `out`; prints the summary.
fn write_summary(out: &Path, results: &Value) {
    std::fs::write(out.join("e2e.svg"), chart(results)).unwrap();
    let summary = markdown(results);
    std::fs::write(out.join("e2e.md"), &summary).unwrap();
    println!("\n{summary}");
    println!("report written to {}", out.display());
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

/// The HTTP tier's closed-loop phases: (batch size, connections).
const HTTP_TIERS: [(u32, u32); 3] = [(1, 256), (100, 16), (10_000, 4)];

/// Runs `phase` on `shared` (the Kafka pass's cluster), or on a fresh broker of its own
/// (an embedded one).
async fn on_broker<F, Fut>(args: &Args, pass: Pass, shared: Option<&Broker>, phase: F) -> Value
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    if let Some(broker) = shared {
        return phase(broker.bootstrap()).await;
    }
    let broker = Broker::fresh(args, pass).await;
    let result = phase(broker.bootstrap()).await;
    broker.stop().await;
    result
}

/// Records/s offered while a Kafka cluster warms up.
const WARM_UP_RATE: f64 = 5_000.0;

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
async fn run_pass(args: &Args, pass: Pass) -> Value {
    let broker = broker_label(args, pass);
    println!("\n== {broker} ==");
    let shared = match pass {
        Pass::Kafka => Some(Broker::fresh(args, pass).await),
        Pass::Embedded => None,
    };
    let warm_up = match &shared {
        Some(cluster @ Broker::Cluster(_)) if args.warm_up > 0.0 => {
            println!(
                "warming the cluster up: the whole pipeline for {:.0} s",
                args.warm_up
            );
            Some(whole_pipeline(&cluster.bootstrap(), WARM_UP_RATE, args.warm_up).await)
        }
        _ => None,
    };

    // The whole pipeline: saturated (offered more than it takes), then at 80% of the
    // end-to-end rate that gave, to see that it keeps up and how fresh the history is.
    if let Some(cluster) = &shared {
        cluster.reset().await;
    }
    let saturated = on_broker(args, pass, shared.as_ref(), |b| async move {
        whole_pipeline(&b, args.pipeline_rate, args.seconds).await
    })
    .await;
    let capacity = saturated["end_to_end_deliveries_per_sec"]
        .as_f64()
        .unwrap_or(10_000.0);
    let sustained_rate = (capacity * 0.8 / 1000.0).round().max(1.0) * 1000.0;
    if let Some(cluster) = &shared {
        cluster.reset().await;
    }
    let sustained = on_broker(args, pass, shared.as_ref(), |b| async move {
        whole_pipeline(&b, sustained_rate, args.seconds).await
    })
    .await;

    // The raw producer: the ceiling for the HTTP tier.
    let raw = on_broker(args, pass, shared.as_ref(), |b| async move {
        raw_producer(&b, args.seconds).await
    })
    .await;
    println!(
        "raw producer: {:.0} records/s ({:.1} MB/s)",
        raw["records_per_sec"].as_f64().unwrap_or_default(),
        raw["mb_per_sec"].as_f64().unwrap_or_default()
    );

    // The HTTP tier by batch size (closed loop), then single requests at a fixed rate.
    let mut http = Vec::new();
    for (batch, connections) in HTTP_TIERS {
        http.push(
            on_broker(args, pass, shared.as_ref(), |b| async move {
                http_tier(args, &b, batch, connections, None).await
            })
            .await,
        );
    }
    let single_open = on_broker(args, pass, shared.as_ref(), |b| async move {
        http_tier(args, &b, 1, 256, Some(args.single_rate)).await
    })
    .await;

    // Memory under sustained overload.
    let overload = on_broker(args, pass, shared.as_ref(), |b| async move {
        overload(args, &b).await
    })
    .await;
    if let Some(shared) = shared {
        shared.stop().await;
    }

    let raw_rate = raw["records_per_sec"].as_f64().unwrap_or(1.0).max(1.0);
    let bulk_rate = http
        .last()
        .and_then(|r| r["report"]["records_per_sec"].as_f64())
        .unwrap_or_default();
    json!({
        "pass": pass.name(),
        "broker": broker,
        "warm_up": warm_up,
        "raw_producer": raw,
        "http_tier": http,
        "single_open_loop": single_open,
        "http_tier_efficiency": bulk_rate / raw_rate,
        "pipeline": saturated,
        "pipeline_sustained": sustained,
        "overload": overload,
    })
}

/// Tasks producing at once in the raw producer phase (the tier, too, produces from
/// several connections' tasks through one producer).
const RAW_TASKS: usize = 4;

/// Phase 1: generated requests straight to the broker, each acknowledged, from
/// `RAW_TASKS` tasks sharing one producer, after a second of warm-up (connections and
/// producer), as the HTTP tier gets.
async fn raw_producer(bootstrap: &str, seconds: f64) -> Value {
    let producer = reachable_producer(bootstrap, topics::DELIVERY_REQUESTS.name);
    let records = generated_records();
    let _ = produce_for(&producer, &records, 1.0).await;
    let (sent, acked, failed, bytes, secs) = produce_for(&producer, &records, seconds).await;
    json!({
        "tasks": RAW_TASKS,
        "records_sent": sent,
        "records_acked": acked,
        "records_failed": failed,
        "elapsed_secs": secs,
        "records_per_sec": acked as f64 / secs,
        "mb_per_sec": bytes as f64 / 1e6 / secs,
    })
}

/// An acknowledged producer (the tier's settings) that has reached `topic`.
fn reachable_producer(bootstrap: &str, topic: &str) -> Producer {
    let settings = ClientSettings::plain(bootstrap);
    let producer = Producer::new(&settings, &ProducerArgs::default()).unwrap();
    producer
        .check_reachable(topic, Duration::from_secs(10))
        .unwrap();
    producer
}

/// 50,000 generated requests: (key, tenant, body).
fn generated_records() -> Arc<Vec<(String, String, String)>> {
    let mut generator = schemas::generate::Generator::new(1, 50);
    Arc::new(
        (0..50_000)
            .map(|i| {
                let (tenant, body) = generator.request();
                let id = format!("raw-{i}");
                (schemas::delivery_key(&tenant, &id), tenant, body)
            })
            .collect(),
    )
}

/// `RAW_TASKS` tasks producing for `seconds`: (sent, acked, failed, bytes, seconds from
/// the start until the last acknowledgement).
async fn produce_for(
    producer: &Producer,
    records: &Arc<Vec<(String, String, String)>>,
    seconds: f64,
) -> (u64, u64, u64, u64, f64) {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..RAW_TASKS {
        let producer = producer.clone();
        let records = records.clone();
        tasks.spawn(async move { raw_task(&producer, &records, task, end).await });
    }
    let (mut sent, mut acked, mut failed, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut last_ack = start;
    while let Some(done) = tasks.join_next().await {
        let (s, a, f, b, last) = done.unwrap();
        sent += s;
        acked += a;
        failed += f;
        bytes += b;
        last_ack = last_ack.max(last);
    }
    let secs = last_ack.duration_since(start).as_secs_f64().max(1e-3);
    (sent, acked, failed, bytes, secs)
}

/// One producing task: sends until `end`, at most 100,000 records awaiting their ack;
/// (sent, acked, failed, bytes, last ack).
async fn raw_task(
    producer: &Producer,
    records: &[(String, String, String)],
    task: usize,
    end: Instant,
) -> (u64, u64, u64, u64, Instant) {
    let correlation = uuid::Uuid::new_v4().to_string();
    let mut acks = FuturesUnordered::new();
    let (mut sent, mut acked, mut failed, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut last_ack = Instant::now();
    let mut i = task * records.len() / RAW_TASKS;
    let mut ingest_time = String::new();
    let mut tally = |result: bus::Result<bus::Delivered>, acked: &mut u64, failed: &mut u64| {
        if result.is_ok() {
            *acked += 1;
        } else {
            *failed += 1;
        }
        last_ack = Instant::now();
    };
    while Instant::now() < end {
        if sent % 1024 == 0 {
            ingest_time = chrono::Utc::now().timestamp_millis().to_string();
            tokio::task::yield_now().await;
        }
        let (key, tenant, body) = &records[i % records.len()];
        let headers: [(&str, &[u8]); 6] = [
            (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
            (h::TENANT, tenant.as_bytes()),
            (h::SCHEMA_VERSION, h::SCHEMA_VERSION_V1.as_bytes()),
            (h::CONTENT_TYPE, h::CONTENT_TYPE_JSON.as_bytes()),
            (h::INGEST_TIME, ingest_time.as_bytes()),
            (h::CORRELATION_ID, correlation.as_bytes()),
        ];
        let record = OutRecord {
            topic: topics::DELIVERY_REQUESTS.name,
            key: key.as_bytes(),
            payload: body.as_bytes(),
            headers: &headers,
        };
        match producer.send(record) {
            Ok(ack) => {
                acks.push(ack);
                sent += 1;
                bytes += body.len() as u64;
                i += 1;
            }
            // The producer's queue is full: wait for an acknowledgement to make room.
            Err(BusError::QueueFull) => {
                if let Some(result) = acks.next().await {
                    tally(result, &mut acked, &mut failed);
                }
            }
            Err(e) => panic!("producing: {e}"),
        }
        while acks.len() >= 100_000 {
            if let Some(result) = acks.next().await {
                tally(result, &mut acked, &mut failed);
            }
        }
    }
    while let Some(result) = acks.next().await {
        tally(result, &mut acked, &mut failed);
    }
    (sent, acked, failed, bytes, last_ack)
}

/// Phase 2: the ingestion tier alone.
async fn http_tier(
    args: &Args,
    bootstrap: &str,
    batch: u32,
    connections: u32,
    rate: Option<f64>,
) -> Value {
    let service = Service::start(&["ingest", "--brokers", bootstrap, "--listen", "127.0.0.1:0"]);
    // Warm up: connections, producer, broker.
    let _ = load(load_config(&service.base, batch, connections, 1.0)).await;
    let mut config = load_config(&service.base, batch, connections, args.seconds);
    if let Some(rate) = rate {
        config.rate = rate * f64::from(batch);
    }
    let report = load(config).await;
    let peak = service.peak_rss();
    service.stop();
    println!(
        "http tier, batch {batch}, {connections} connections{}:\n{report}",
        rate.map(|r| format!(", open loop at {r:.0} calls/s"))
            .unwrap_or_default()
    );
    json!({
        "batch_size": batch,
        "connections": connections,
        "report": report,
        "peak_rss_mb": mb(peak),
    })
}

async fn count(history: &History, sql: &str) -> i64 {
    match history.query(sql).await {
        Ok(result) => result
            .batches
            .first()
            .map_or(0, |b| b.column(0).as_primitive::<Int64Type>().value(0)),
        Err(_) => 0,
    }
}

/// Phase 3: the whole pipeline at a fixed offered rate for `seconds`, with freshness
/// probes.
async fn whole_pipeline(bootstrap: &str, rate: f64, seconds: f64) -> Value {
    let data = tempfile::tempdir().unwrap();
    let data_path = data.path().to_str().unwrap().to_owned();
    let flags = [
        "run",
        "--brokers",
        bootstrap,
        "--listen",
        "127.0.0.1:0",
        "--flight-listen",
        "off",
        "--data",
        &data_path,
        "--max-consumer-lag",
        MAX_CONSUMER_LAG,
    ];
    let service = Service::start(&flags);
    let history = History::open(&data_path, &QueryLimits::default())
        .await
        .unwrap();
    // Each run names its own tenants and probes (a shared broker may still hold the
    // previous run's records).
    let run = format!("bench{}r{rate:.0}", std::process::id());

    // Wait until the workflow and the sink run: one probe in the history.
    let client = Probe::new(&service.base, &run);
    let ready = Instant::now();
    let first = client.post(0).await;
    assert!(first, "the first probe was not accepted");
    loop {
        let seen = count(
            &history,
            &format!("SELECT count(*) FROM delivery_requests WHERE owner_id = '{run}-probe'"),
        )
        .await;
        if seen > 0 {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "the pipeline never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "pipeline ready after {:.1} s",
        ready.elapsed().as_secs_f64()
    );

    // Counted before the probe task posts its first probe.
    let records_before = topic_records(bootstrap).await;
    // Probes: one request every 250 ms, each watched until a query sees it.
    let stop_probes = Arc::new(AtomicBool::new(false));
    let probe_task = {
        let stop = stop_probes.clone();
        let history = history.clone();
        let client = client.clone();
        let run = run.clone();
        tokio::spawn(async move { probes(client, history, run, stop).await })
    };

    let mut config = load_config(&service.base, 1000, 8, seconds);
    config.rate = rate;
    config.tenant_prefix = format!("{run}-tenant-");
    let sampler = RssSampler::start(service.pid());
    let load_start = Instant::now();
    let report = load(config).await;
    let load_secs = load_start.elapsed().as_secs_f64();
    let samples = sampler.stop().await;
    let accepted = report.accepted as i64;
    stop_probes.store(true, Ordering::Relaxed);

    // Drain: until every accepted request is a row and has its `Created` event. Events
    // carry the caller's tenant, not the body's owner, so they are counted cheaply in
    // total (this run's history is fresh; with `--brokers` its sink begins where the
    // previous run's left off, and a late event of that run may count) and then
    // exactly, by a join.
    let requests_sql =
        format!("SELECT count(*) FROM delivery_requests WHERE owner_id LIKE '{run}-tenant-%'");
    let probes_sql =
        format!("SELECT count(*) FROM delivery_requests WHERE owner_id = '{run}-probe'");
    let events_sql = "SELECT count(*) FROM delivery_events WHERE seq = 1";
    let exact_events_sql = format!(
        "SELECT count(DISTINCT e.delivery_id) FROM delivery_events e JOIN delivery_requests r \
         ON e.delivery_id = r.delivery_id WHERE e.seq = 1 AND r.owner_id LIKE '{run}-tenant-%'"
    );
    // Gives up after 20 s without progress (records lost by the broker never come).
    let mut rows;
    let (mut progress, mut last) = (Instant::now(), (-1, -1));
    let complete = loop {
        rows = count(&history, &requests_sql).await;
        let events = count(&history, events_sql).await;
        let probes = count(&history, &probes_sql).await;
        // The cheap count may include another run's events (a shared broker): the
        // exact one decides.
        if rows >= accepted
            && events >= accepted + probes
            && count(&history, &exact_events_sql).await >= accepted
        {
            break true;
        }
        if (rows, events) != last {
            (progress, last) = (Instant::now(), (rows, events));
        } else if progress.elapsed() > Duration::from_secs(20) {
            println!(
                "the history stopped growing at {rows} of {accepted} requests, {events} events"
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // When the history stopped growing, the last progress is when it was all in.
    let all_in = if complete {
        load_start.elapsed()
    } else {
        progress.duration_since(load_start)
    }
    .as_secs_f64();
    let freshness = probe_task.await.unwrap();
    let events = count(&history, &exact_events_sql).await;
    // Records this run added to each topic (as retained: the embedded broker drops the
    // oldest past 5 MiB per partition), per delivery.
    let mut per_topic = serde_json::Map::new();
    let mut total = 0i64;
    for (topic, after) in topic_records(bootstrap).await {
        let added = after - records_before.get(&topic).copied().unwrap_or(0);
        total += added;
        per_topic.insert(topic, json!(added));
    }
    // The first probe's records were there before the load.
    let probes_total = count(&history, &probes_sql).await;
    let per_delivery = total as f64 / (accepted + probes_total - 1).max(1) as f64;
    let peak = service.peak_rss();
    service.stop();
    let end_to_end = rows.min(events) as f64 / all_in;
    // Kept up: took everything offered (no refusal, nothing left unsent), lost nothing,
    // and had it all queryable within 5 s of the load's end.
    let kept_up = report.non_2xx() == 0
        && report.not_sent == 0
        && report.transport_errors == 0
        && report.timeouts == 0
        && report.failed == 0
        && rows >= accepted
        && events >= accepted
        && all_in - load_secs <= 5.0;
    println!(
        "whole pipeline at {rate:.0} records/s offered:\n{report}  history: {rows} of {accepted} requests, {events} Created events; all in {all_in:.1} s after the load started ({end_to_end:.0} deliveries/s end to end); freshness {freshness}",
    );
    json!({
        "offered_records_per_sec": rate,
        "report": report,
        "load_secs": load_secs,
        "history_rows": rows,
        "created_events": events,
        "lost": (accepted - rows.min(events)).max(0),
        "all_queryable_after_secs": all_in,
        "drain_secs": all_in - load_secs,
        "end_to_end_deliveries_per_sec": end_to_end,
        "kept_up": kept_up,
        "freshness_secs": freshness,
        "peak_rss_mb": mb(peak),
        "kafka_records": per_topic,
        "kafka_records_per_delivery": per_delivery,
        "rss_mb_at_half_load": rss_at(&samples, load_secs / 2.0),
        "rss_mb_at_end_of_load": rss_at(&samples, load_secs),
    })
}

/// Records retained on each of the pipeline's topics.
async fn topic_records(bootstrap: &str) -> std::collections::BTreeMap<String, i64> {
    let names: Vec<&str> = topics::ALL.iter().map(|t| t.name).collect();
    // A group that never commits: its lag is every retained record.
    let counter = bus::LagWatch::new(
        &ClientSettings::plain(bootstrap),
        &[("dronedelivery-bench-counter", &names)],
    )
    .unwrap();
    let mut per_topic = std::collections::BTreeMap::new();
    for lag in tokio::task::spawn_blocking(move || counter.lags(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap()
    {
        *per_topic.entry(lag.topic).or_insert(0) += lag.lag;
    }
    per_topic
}

/// Posts single probe requests of the owner `RUN-probe`.
#[derive(Clone)]
struct Probe {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    url: String,
    owner: String,
}

impl Probe {
    fn new(base: &str, run: &str) -> Self {
        Self {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            url: format!("{base}/api/deliveryrequests"),
            owner: format!("{run}-probe"),
        }
    }

    /// Posts probe `n`; whether it was accepted.
    async fn post(&self, n: usize) -> bool {
        let mut generator = schemas::generate::Generator::new(n as u64, 1);
        let mut body = String::new();
        generator.request_into(&self.owner, &mut body);
        let body = body.replacen("\"pkg-", &format!("\"probe-{n}-"), 1);
        let request = hyper::Request::post(&self.url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.client.request(request)).await,
            Ok(Ok(response)) if response.status() == 202
        )
    }
}

/// Posts a probe every 250 ms until `stop`, and watches the history until each one is
/// queryable; the seconds from each ack until a query saw it, summarised.
async fn probes(client: Probe, history: History, run: String, stop: Arc<AtomicBool>) -> Value {
    let sql = format!(
        "SELECT package_id FROM delivery_requests WHERE owner_id = '{run}-probe' AND package_id LIKE 'probe-%'"
    );
    // Probes acknowledged and not yet seen: (number, when acknowledged).
    let mut pending: Vec<(usize, Instant)> = Vec::new();
    let mut seen: Vec<f64> = Vec::new();
    let mut next = 1usize;
    let mut last_post: Option<Instant> = None;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        match stopped_at {
            None if last_post.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) => {
                last_post = Some(Instant::now());
                if client.post(next).await {
                    pending.push((next, Instant::now()));
                }
                next += 1;
            }
            Some(_) if pending.is_empty() => break,
            Some(t) if t.elapsed() > Duration::from_secs(120) => break,
            _ => {}
        }
        if let Ok(result) = history.query(&sql).await {
            let now = Instant::now();
            for batch in &result.batches {
                let ids = batch.column(0).as_string::<i32>();
                for i in 0..ids.len() {
                    let n: Option<usize> =
                        ids.value(i).split('-').nth(1).and_then(|v| v.parse().ok());
                    if let Some(pos) = pending.iter().position(|(m, _)| Some(*m) == n) {
                        let (_, at) = pending.swap_remove(pos);
                        seen.push(now.duration_since(at).as_secs_f64());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen.sort_by(f64::total_cmp);
    let pick = |q: f64| -> f64 {
        if seen.is_empty() {
            return f64::NAN;
        }
        let index = ((seen.len() as f64 * q).ceil() as usize).clamp(1, seen.len()) - 1;
        seen[index]
    };
    json!({
        "probes": seen.len() + pending.len(),
        "seen": seen.len(),
        "p50": pick(0.50),
        "p99": pick(0.99),
        "max": seen.last().copied().unwrap_or(f64::NAN),
    })
}

/// Phase 4: far more offered than the tier can take, for a while; its resident memory
/// over time.
async fn overload(args: &Args, bootstrap: &str) -> Value {
    let service = Service::start(&["ingest", "--brokers", bootstrap, "--listen", "127.0.0.1:0"]);
    let pid = service.pid();
    let seconds = args.seconds * 2.0;
    let sampler = RssSampler::start(pid);
    // 1,000 connections with batches of 100, open loop at 2,000,000 records/s.
    let mut config = load_config(&service.base, 100, 1000, seconds);
    config.rate = 2_000_000.0;
    config.timeout = Duration::from_secs(10);
    let report = load(config).await;
    let samples = sampler.stop().await;
    let peak = service.peak_rss();
    let at = |fraction: f64| rss_at(&samples, seconds * fraction);
    let rss_now = mb(service.rss());
    service.stop();
    let (half, end) = (at(0.5), at(1.0));
    println!(
        "overload (1,000 connections, 2M records/s offered, {seconds:.0} s):\n{report}  resident MB at 25/50/75/100%: {:.0} {:.0} {:.0} {:.0}; peak {:.0}",
        at(0.25),
        half,
        at(0.75),
        end,
        mb(peak)
    );
    json!({
        "seconds": seconds,
        "report": report,
        "rss_mb": {"p25": at(0.25), "p50": half, "p75": at(0.75), "end": end, "after": rss_now},
        "growth_second_half_mb": end - half,
        "peak_rss_mb": mb(peak),
        "samples": samples.iter().map(|(t, m)| json!([t, m])).collect::<Vec<_>>(),
    })
}

/// Samples a process's resident memory every 250 ms: (seconds, MB).
struct RssSampler {
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(f64, f64)>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut samples = Vec::new();
            while flag.load(Ordering::Relaxed) {
                samples.push((
                    start.elapsed().as_secs_f64(),
                    mb(proc_status_kb(pid, "VmRSS:") * 1024),
                ));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            samples
        });
        Self { running, task }
    }

    async fn stop(self) -> Vec<(f64, f64)> {
        self.running.store(false, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The sample nearest `t` seconds.
fn rss_at(samples: &[(f64, f64)], t: f64) -> f64 {
    samples
        .iter()
        .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
        .map_or(0.0, |s| s.1)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (memory as f64 / 1024.0 / 1024.0).round(),
        "os": std::env::consts::OS,
    })
}

/// The commit measured, with `+changes` when the working tree differs from it.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{head}+changes"),
        _ => head,
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn markdown(r: &Value) -> String {
    let mut out = String::new();
    let m = &r["machine"];
    let _ = writeln!(out, "# End-to-end benchmark\n");
    let _ = writeln!(
        out,
        "{} · {} cores · {} GiB · commit {} · {} s per phase · `run` with lag backpressure at {} records\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        r["commit"].as_str().unwrap_or("?"),
        r["seconds_per_phase"],
        r["max_consumer_lag"],
    );
    let _ = writeln!(
        out,
        "Reproduce: `{}`\n",
        r["command"].as_str().unwrap_or("cargo bench --bench e2e")
    );
    let passes: Vec<&Value> = r["passes"].as_array().into_iter().flatten().collect();
    side_by_side(&mut out, &passes);
    for pass in &passes {
        pass_markdown(&mut out, pass);
    }
    let _ = writeln!(out, "![throughput and latency by batch size](e2e.svg)");
    out
}

/// The headline figures of every pass, one column each.
fn side_by_side(out: &mut String, passes: &[&Value]) {
    let _ = writeln!(out, "## The passes side by side\n");
    let mut header = String::from("| figure |");
    let mut rule = String::from("| --- |");
    for pass in passes {
        let _ = write!(header, " {} |", short_label(pass));
        rule.push_str(" ---: |");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    // Calls an open-loop run could not send (the service fell behind): their wait is not
    // in the latencies.
    let not_sent = |e: &Value| match e["report"]["not_sent"].as_u64().unwrap_or(0) {
        0 => String::new(),
        n => format!(" · {} calls not sent", thousands(n as f64)),
    };
    let latency = |e: &Value| {
        let l = &e["report"]["latency_ms"];
        format!(
            "{} · p50 {} / p99 {} ms{}",
            thousands(f(&e["report"]["records_per_sec"])),
            num(f(&l["p50"]), 1),
            num(f(&l["p99"]), 1),
            not_sent(e)
        )
    };
    let mut line = |what: &str, cell: &dyn Fn(&Value) -> String| {
        let mut row = format!("| {what} |");
        for pass in passes {
            let _ = write!(row, " {} |", cell(pass));
        }
        let _ = writeln!(out, "{row}");
    };
    line(
        &format!("raw producer, records/s ({RAW_TASKS} tasks, one producer)"),
        &|p| thousands(f(&p["raw_producer"]["records_per_sec"])),
    );
    for (i, (batch, connections)) in HTTP_TIERS.into_iter().enumerate() {
        line(
            &format!("HTTP, batch {batch} ({connections} connections, closed loop), records/s"),
            &|p| latency(&p["http_tier"][i]),
        );
    }
    line("HTTP, single requests in open loop, records/s", &|p| {
        latency(&p["single_open_loop"])
    });
    line(
        "HTTP tier efficiency (batch 10,000 over the raw producer)",
        &|p| num(f(&p["http_tier_efficiency"]), 2),
    );
    line("whole pipeline, saturated: accepted records/s", &|p| {
        let e = &p["pipeline"];
        format!(
            "{} of {} offered · {} answers 503{}",
            thousands(f(&e["report"]["records_per_sec"])),
            thousands(f(&e["offered_records_per_sec"])),
            e["report"]["by_status"]["503"].as_u64().unwrap_or(0),
            not_sent(e)
        )
    });
    line("whole pipeline, saturated: deliveries/s end to end", &|p| {
        let e = &p["pipeline"];
        format!(
            "{} · {} lost",
            thousands(f(&e["end_to_end_deliveries_per_sec"])),
            e["lost"]
        )
    });
    line(
        "whole pipeline, sustained (80% of its own end-to-end rate)",
        &|p| {
            let e = &p["pipeline_sustained"];
            format!(
                "{}/s offered · kept up: {} · all in {} s after the load",
                thousands(f(&e["offered_records_per_sec"])),
                if e["kept_up"].as_bool().unwrap_or(false) {
                    "yes"
                } else {
                    "no"
                },
                num(f(&e["drain_secs"]), 1)
            )
        },
    );
    line("history freshness, sustained (ack until queryable)", &|p| {
        let fresh = &p["pipeline_sustained"]["freshness_secs"];
        format!(
            "p50 {} / p99 {} s",
            num(f(&fresh["p50"]), 2),
            num(f(&fresh["p99"]), 2)
        )
    });
    line("Kafka records per delivery", &|p| {
        num(f(&p["pipeline_sustained"]["kafka_records_per_delivery"]), 2)
    });
    line("`run` peak resident MB (saturated / sustained)", &|p| {
        format!(
            "{} / {}",
            num(f(&p["pipeline"]["peak_rss_mb"]), 0),
            num(f(&p["pipeline_sustained"]["peak_rss_mb"]), 0)
        )
    });
    line("`ingest` resident MB under overload (end / peak)", &|p| {
        format!(
            "{} / {}",
            num(f(&p["overload"]["rss_mb"]["end"]), 0),
            num(f(&p["overload"]["peak_rss_mb"]), 0)
        )
    });
    let _ = writeln!(out);
}

/// `v` with `digits` decimals, or `?` when it is missing.
fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "?".to_owned()
    }
}

/// A pass's name for a column or a legend.
fn short_label(pass: &Value) -> String {
    match pass["pass"].as_str() {
        Some("embedded") => "embedded broker".to_owned(),
        _ => {
            let broker = pass["broker"].as_str().unwrap_or("Apache Kafka");
            broker
                .split(" on ")
                .next()
                .unwrap_or(broker)
                .split(" at ")
                .next()
                .unwrap_or(broker)
                .to_owned()
        }
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "?".to_owned();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < -0.5 {
        out.insert(0, '-');
    }
    out
}

/// One pass in full: every phase's row, then the pipeline, records and memory.
fn pass_markdown(out: &mut String, r: &Value) {
    let _ = writeln!(out, "## {}\n", r["broker"].as_str().unwrap_or("?"));
    let warm_up = &r["warm_up"];
    if warm_up.is_object() {
        let _ = writeln!(
            out,
            "Warmed up first by the whole pipeline, not counted below: {} s at {} records/s offered, {} accepted, {} of them in the history {} s after the load started. Before each run below, the pipeline's topics and consumer groups were deleted and the topics created again.\n",
            num(f(&warm_up["load_secs"]), 0),
            thousands(f(&warm_up["offered_records_per_sec"])),
            thousands(f(&warm_up["report"]["accepted"])),
            thousands(f(&warm_up["history_rows"])),
            num(f(&warm_up["all_queryable_after_secs"]), 1),
        );
    }
    let raw = &r["raw_producer"];
    let _ = writeln!(
        out,
        "| phase | records/s | calls/s | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | non-2xx | calls not sent | peak RSS MB |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let _ = writeln!(
        out,
        "| raw producer (ceiling) | {:.0} | | {:.1} | | | | | | | |",
        f(&raw["records_per_sec"]),
        f(&raw["mb_per_sec"])
    );
    let row = |out: &mut String, name: String, entry: &Value| {
        let rep = &entry["report"];
        let l = &rep["latency_ms"];
        let non_2xx: u64 = rep["by_status"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| !k.starts_with('2'))
                    .filter_map(|(_, v)| v.as_u64())
                    .sum()
            })
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {non_2xx} | {} | {:.0} |",
            f(&rep["records_per_sec"]),
            f(&rep["calls_per_sec"]),
            f(&rep["mb_per_sec"]),
            f(&l["p50"]),
            f(&l["p99"]),
            f(&l["p999"]),
            f(&l["max"]),
            rep["not_sent"].as_u64().unwrap_or(0),
            f(&entry["peak_rss_mb"]),
        );
    };
    for entry in r["http_tier"].as_array().into_iter().flatten() {
        row(
            out,
            format!(
                "HTTP, batch {} ({} connections, closed loop)",
                entry["batch_size"], entry["connections"]
            ),
            entry,
        );
    }
    let single = &r["single_open_loop"];
    row(
        out,
        format!(
            "HTTP, single requests, open loop at {:.0}/s ({} connections)",
            f(&single["report"]["rate"]),
            single["connections"]
        ),
        single,
    );
    let p = &r["pipeline"];
    let sustained = &r["pipeline_sustained"];
    for (what, entry) in [("saturated", p), ("sustained", sustained)] {
        row(
            out,
            format!(
                "whole pipeline, {what}: batch 1000, open loop at {:.0}/s",
                f(&entry["offered_records_per_sec"])
            ),
            entry,
        );
    }
    let o = &r["overload"];
    row(
        out,
        format!(
            "HTTP under overload (1,000 connections, 2M/s offered; {} calls due were never sent, their wait is not in the latencies)",
            o["report"]["not_sent"]
        ),
        o,
    );
    let _ = writeln!(
        out,
        "\n**HTTP tier efficiency** (batch 10,000 over the raw producer): {:.2}\n",
        f(&r["http_tier_efficiency"])
    );
    for (what, entry) in [("saturated", p), ("sustained", sustained)] {
        let fresh = &entry["freshness_secs"];
        let _ = writeln!(
            out,
            "**Whole pipeline, {what}** ({:.0} records/s offered; kept up: {}): {} of {} accepted requests in the history ({} with their `Created` event), all queryable {:.1} s after the load started ({:.1} s after it ended): {:.0} deliveries/s end to end. Freshness (ack until a query sees it) over {} probes: p50 {:.2} s, p99 {:.2} s, max {:.2} s. Resident memory {:.0} MB half-way through the load, {:.0} MB at its end, peak {:.0} MB.\n",
            f(&entry["offered_records_per_sec"]),
            if entry["kept_up"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            entry["history_rows"],
            entry["report"]["accepted"],
            entry["created_events"],
            f(&entry["all_queryable_after_secs"]),
            f(&entry["drain_secs"]),
            f(&entry["end_to_end_deliveries_per_sec"]),
            fresh["probes"],
            f(&fresh["p50"]),
            f(&fresh["p99"]),
            f(&fresh["max"]),
            f(&entry["rss_mb_at_half_load"]),
            f(&entry["rss_mb_at_end_of_load"]),
            f(&entry["peak_rss_mb"]),
        );
    }
    let topics: Vec<String> = sustained["kafka_records"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, n)| n.as_i64().unwrap_or(0) > 0)
                .map(|(t, n)| format!("{t} {n}"))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "**Kafka records per delivery** (sustained run, every topic, as retained): {:.2} ({}).\n",
        f(&sustained["kafka_records_per_delivery"]),
        topics.join(", ")
    );
    let rss = &o["rss_mb"];
    let _ = writeln!(
        out,
        "**Memory under overload** ({:.0} s): resident {:.0} / {:.0} / {:.0} / {:.0} MB at 25 / 50 / 75 / 100 % of the run (growth over the second half {:+.0} MB), peak {:.0} MB.\n",
        f(&o["seconds"]),
        f(&rss["p25"]),
        f(&rss["p50"]),
        f(&rss["p75"]),
        f(&rss["end"]),
        f(&o["growth_second_half_mb"]),
        f(&o["peak_rss_mb"]),
    );
}

/// Two panels, one colour per pass: accepted records/s by batch size (each pass's raw
/// producer as a dashed line, its figure in the legend), and p50 (solid) and p99 (dashed) latency by batch size
/// on a log scale.
fn chart(r: &Value) -> String {
    const COLORS: [&str; 2] = ["#4878a8", "#d35400"];
    let passes: Vec<&Value> = r["passes"].as_array().into_iter().flatten().collect();
    let tiers =
        |pass: &Value| -> Vec<Value> { pass["http_tier"].as_array().cloned().unwrap_or_default() };
    let labels: Vec<String> = passes
        .first()
        .map(|p| tiers(p))
        .unwrap_or_default()
        .iter()
        .map(|e| format!("batch {}", e["batch_size"]))
        .collect();
    let raws: Vec<f64> = passes
        .iter()
        .map(|p| f(&p["raw_producer"]["records_per_sec"]))
        .collect();
    let top = passes
        .iter()
        .flat_map(|p| tiers(p))
        .map(|e| f(&e["report"]["records_per_sec"]))
        .chain(raws.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.15;
    let (w, h, pad) = (900.0, 420.0, 60.0);
    let panel = (w - 3.0 * pad) / 2.0;
    let plot_h = h - 2.5 * pad;
    let y0 = h - 1.5 * pad;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="14" text-anchor="middle">Accepted records/s by batch size</text>
<text x="{}" y="24" font-size="14" text-anchor="middle">Latency by batch size (ms, log scale)</text>
"##,
        pad + panel / 2.0,
        2.0 * pad + panel * 1.5
    );
    // Left panel: bars, one per pass in each batch size's slot.
    let x0 = pad;
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/>"##,
        x0 + panel
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="black"/>"##,
        y0 - plot_h
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let y = y0 - plot_h * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            x0 - 4.0,
            y + 4.0,
            human(v),
            x0 + panel
        );
    }
    let slot = panel / labels.len().max(1) as f64;
    let bar = slot * 0.7 / passes.len().max(1) as f64;
    for (k, pass) in passes.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        for (i, e) in tiers(pass).iter().enumerate() {
            let rate = f(&e["report"]["records_per_sec"]);
            if !rate.is_finite() {
                continue;
            }
            let bh = plot_h * rate / top;
            let x = x0 + slot * i as f64 + slot * 0.15 + bar * k as f64;
            let _ = writeln!(
                svg,
                r##"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{bh:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"##,
                y0 - bh,
                x + bar / 2.0,
                y0 - bh - 4.0,
                human(rate),
            );
        }
        let raw = raws[k];
        if raw.is_finite() {
            let ry = y0 - plot_h * raw / top;
            let _ = writeln!(
                svg,
                r##"<line x1="{x0}" y1="{ry:.1}" x2="{}" y2="{ry:.1}" stroke="{color}" stroke-dasharray="6 4"/>"##,
                x0 + panel,
            );
        }
    }
    for (i, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            x0 + slot * (i as f64 + 0.5),
            y0 + 16.0
        );
    }
    // Right panel: p50 and p99 on a log scale from 0.1 ms to 10 s.
    let x1 = 2.0 * pad + panel;
    let _ = writeln!(
        svg,
        r##"<line x1="{x1}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/>"##,
        x1 + panel
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x1}" y1="{y0}" x2="{x1}" y2="{}" stroke="black"/>"##,
        y0 - plot_h
    );
    let (lo, hi) = (-1.0_f64, 4.0_f64);
    let ly = |ms: f64| y0 - plot_h * ((ms.max(0.1).log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
    for e in -1..=4 {
        let ms = 10f64.powi(e);
        let y = ly(ms);
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{x1}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            x1 - 4.0,
            y + 4.0,
            if ms < 1.0 {
                format!("{ms}")
            } else {
                format!("{ms:.0}")
            },
            x1 + panel
        );
    }
    for (k, pass) in passes.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let entries = tiers(pass);
        // The passes' points side by side in each slot, the first one's labels on its
        // left, the others' on their right.
        let shift = (k as f64 - (passes.len() as f64 - 1.0) / 2.0) * 14.0;
        let (anchor, dx) = if k == 0 && passes.len() > 1 {
            ("end", -6.0)
        } else {
            ("start", 6.0)
        };
        for (key, dash) in [("p50", ""), ("p99", r#" stroke-dasharray="6 4""#)] {
            let points: Vec<(f64, f64, f64)> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let ms = f(&e["report"]["latency_ms"][key]);
                    (x1 + slot * (i as f64 + 0.5) + shift, ly(ms), ms)
                })
                .filter(|p| p.2.is_finite())
                .collect();
            let path: Vec<String> = points
                .iter()
                .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"##,
                path.join(" ")
            );
            for (x, y, ms) in &points {
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="{color}" font-size="10" text-anchor="{anchor}">{key} {ms:.1}</text>"##,
                    x + dx,
                    y + if key == "p99" { -6.0 } else { 12.0 },
                );
            }
        }
    }
    for (i, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            x1 + slot * (i as f64 + 0.5),
            y0 + 16.0
        );
    }
    // Legend: one swatch per pass.
    for (k, pass) in passes.iter().enumerate() {
        let x = pad + 400.0 * k as f64;
        let _ = writeln!(
            svg,
            r##"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{} (raw producer {}, dashed)</text>"##,
            h - 50.0,
            COLORS[k % COLORS.len()],
            x + 18.0,
            h - 40.0,
            short_label(pass),
            human(raws[k]),
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{} · {} cores · closed loop · p99 dashed · commit {}</text>"##,
        w / 2.0,
        h - 12.0,
        r["machine"]["cpu"].as_str().unwrap_or(""),
        r["machine"]["cores"],
        r["commit"].as_str().unwrap_or("")
    );
    svg.push_str("</svg>\n");
    svg
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
