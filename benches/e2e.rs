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
//! The services run as their own processes (the release binary built with this bench);
//! the broker and the load generator run in this one. Each phase gets a fresh embedded
//! broker (librdkafka's mock cluster, in memory) unless `--brokers HOST:PORT` names a
//! real one, which all phases then share (give it fresh topics for comparable figures).
//!
//! The report goes to `benches/results/` (or `--out DIR`): `e2e.json`, `e2e.md` and
//! `e2e.svg` (throughput and latency by batch size).
//!
//! `cargo bench --bench e2e [-- --brokers HOST:PORT] [--seconds N] [--out DIR]`;
//! `--pipeline-rate` (records/s, default 100,000) and `--single-rate` (requests/s,
//! default 30,000) set the offered rates of the open-loop phases.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

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

#[derive(Debug, Clone)]
struct Args {
    brokers: Option<String>,
    seconds: f64,
    out: PathBuf,
    pipeline_rate: f64,
    single_rate: f64,
}

fn args() -> Args {
    let mut args = Args {
        brokers: None,
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

/// The broker of a phase.
enum Broker {
    Embedded(EmbeddedBroker),
    External(String),
}

impl Broker {
    /// A new embedded broker, or the given one (its topics created if missing).
    async fn fresh(args: &Args) -> Self {
        match &args.brokers {
            Some(b) => {
                bus::ensure_topics(&ClientSettings::plain(b), &topics::ALL)
                    .await
                    .unwrap();
                Self::External(b.clone())
            }
            None => Self::Embedded(EmbeddedBroker::start(1, &topics::ALL).unwrap()),
        }
    }

    fn bootstrap(&self) -> String {
        match self {
            Self::Embedded(b) => b.bootstrap_servers().to_owned(),
            Self::External(b) => b.clone(),
        }
    }
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
    println!("end-to-end benchmark, {} s per phase", args.seconds);

    // The whole pipeline first: with a shared (external) broker its consumers would
    // otherwise begin by reading everything the other phases produced. Saturated
    // (offered more than it takes), then at 80% of the end-to-end rate that gave, to see
    // that it keeps up and how fresh the history is.
    let saturated = whole_pipeline(&args, args.pipeline_rate).await;
    let capacity = saturated["end_to_end_deliveries_per_sec"]
        .as_f64()
        .unwrap_or(10_000.0);
    let sustained =
        whole_pipeline(&args, (capacity * 0.8 / 1000.0).round().max(1.0) * 1000.0).await;

    // The raw producer: the ceiling for the HTTP tier.
    let raw = {
        let broker = Broker::fresh(&args).await;
        raw_producer(&broker.bootstrap(), args.seconds).await
    };
    println!(
        "raw producer: {:.0} records/s ({:.1} MB/s)",
        raw["records_per_sec"].as_f64().unwrap_or_default(),
        raw["mb_per_sec"].as_f64().unwrap_or_default()
    );

    // The HTTP tier by batch size (closed loop), then single requests at a fixed rate.
    let mut http = Vec::new();
    for (batch, connections) in [(1, 256), (100, 16), (10_000, 4)] {
        http.push(http_tier(&args, batch, connections, None).await);
    }
    let single_open = http_tier(&args, 1, 256, Some(args.single_rate)).await;

    // Memory under sustained overload.
    let overload = overload(&args).await;

    let raw_rate = raw["records_per_sec"].as_f64().unwrap_or(1.0).max(1.0);
    let bulk_rate = http
        .last()
        .and_then(|r| r["report"]["records_per_sec"].as_f64())
        .unwrap_or_default();
    let results = json!({
        "started": started.to_rfc3339(),
        "machine": machine(),
        "commit": commit(),
        "broker": args.brokers.clone().unwrap_or_else(|| "embedded (librdkafka mock cluster)".into()),
        "seconds_per_phase": args.seconds,
        "raw_producer": raw,
        "http_tier": http,
        "single_open_loop": single_open,
        "http_tier_efficiency": bulk_rate / raw_rate,
        "pipeline": saturated,
        "pipeline_sustained": sustained,
        "overload": overload,
    });
    std::fs::write(
        args.out.join("e2e.json"),
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .unwrap();
    std::fs::write(args.out.join("e2e.svg"), chart(&results)).unwrap();
    let summary = markdown(&results);
    std::fs::write(args.out.join("e2e.md"), &summary).unwrap();
    println!("\n{summary}");
    println!("report written to {}", args.out.display());
}

/// Tasks producing at once in the raw producer phase (the tier, too, produces from
/// several connections' tasks through one producer).
const RAW_TASKS: usize = 4;

/// Phase 1: generated requests straight to the broker, each acknowledged, from
/// `RAW_TASKS` tasks sharing one producer.
async fn raw_producer(bootstrap: &str, seconds: f64) -> Value {
    let settings = ClientSettings::plain(bootstrap);
    let producer = Producer::new(&settings, &ProducerArgs::default()).unwrap();
    producer
        .check_reachable(topics::DELIVERY_REQUESTS.name, Duration::from_secs(10))
        .unwrap();
    let mut generator = schemas::generate::Generator::new(1, 50);
    let records: Arc<Vec<(String, String, String)>> = Arc::new(
        (0..50_000)
            .map(|i| {
                let (tenant, body) = generator.request();
                let id = format!("raw-{i}");
                (schemas::delivery_key(&tenant, &id), tenant, body)
            })
            .collect(),
    );
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

/// Phase 2: the ingestion tier alone, on a fresh broker.
async fn http_tier(args: &Args, batch: u32, connections: u32, rate: Option<f64>) -> Value {
    let broker = Broker::fresh(args).await;
    let bootstrap = broker.bootstrap();
    let service = Service::start(&["ingest", "--brokers", &bootstrap, "--listen", "127.0.0.1:0"]);
    // Warm up: connections, producer, broker.
    let _ = load(load_config(&service.base, batch, connections, 1.0)).await;
    let mut config = load_config(&service.base, batch, connections, args.seconds);
    if let Some(rate) = rate {
        config.rate = rate * f64::from(batch);
    }
    let report = load(config).await;
    let peak = service.peak_rss();
    service.stop();
    drop(broker);
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

/// Phase 3: the whole pipeline at a fixed offered rate, with freshness probes.
async fn whole_pipeline(args: &Args, rate: f64) -> Value {
    let broker = Broker::fresh(args).await;
    let bootstrap = broker.bootstrap();
    let data = tempfile::tempdir().unwrap();
    let data_path = data.path().to_str().unwrap().to_owned();
    let mut flags = vec![
        "run",
        "--brokers",
        &bootstrap,
        "--listen",
        "127.0.0.1:0",
        "--flight-listen",
        "off",
        "--data",
        &data_path,
    ];
    if args.brokers.is_none() {
        // The broker is this process's embedded one: the same backpressure as `run`
        // gives itself with its own.
        flags.extend(["--max-consumer-lag", "20000"]);
    }
    let service = Service::start(&flags);
    let history = History::open(&data_path, &QueryLimits::default())
        .await
        .unwrap();
    // Each pass names its own tenants and probes (a shared broker may still hold the
    // previous pass's records).
    let run = format!("bench{}r{rate:.0}", std::process::id());

    // Wait until the consumers have joined and the sink writes: one probe seen.
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

    // Probes: one request every 250 ms, each watched until a query sees it.
    let stop_probes = Arc::new(AtomicBool::new(false));
    let probe_task = {
        let stop = stop_probes.clone();
        let history = history.clone();
        let client = client.clone();
        let run = run.clone();
        tokio::spawn(async move { probes(client, history, run, stop).await })
    };

    let mut config = load_config(&service.base, 1000, 8, args.seconds);
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
    // total (this phase's broker and history are fresh) and then exactly, by a join.
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
        if rows >= accepted && events >= accepted + probes {
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
    // Records on each topic (as retained: the embedded broker drops the oldest past
    // 5 MiB per partition), per delivery.
    let names: Vec<&str> = topics::ALL.iter().map(|t| t.name).collect();
    let counter = bus::LagWatch::new(
        &ClientSettings::plain(&bootstrap),
        &[("dronedelivery-bench-counter", &names)],
    )
    .unwrap();
    let mut per_topic = serde_json::Map::new();
    let mut total = 0i64;
    for lag in tokio::task::spawn_blocking(move || counter.lags(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap()
    {
        total += lag.lag;
        let entry = per_topic.entry(lag.topic).or_insert(json!(0));
        *entry = json!(entry.as_i64().unwrap_or(0) + lag.lag);
    }
    let probes_total = count(&history, &probes_sql).await;
    let per_delivery = total as f64 / (accepted + probes_total).max(1) as f64;
    let peak = service.peak_rss();
    service.stop();
    drop(broker);
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
async fn overload(args: &Args) -> Value {
    let broker = Broker::fresh(args).await;
    let bootstrap = broker.bootstrap();
    let service = Service::start(&["ingest", "--brokers", &bootstrap, "--listen", "127.0.0.1:0"]);
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
    drop(broker);
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

fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
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
        "{} · {} cores · {} GiB · broker: {} · commit {} · {} s per phase\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        r["broker"].as_str().unwrap_or("?"),
        r["commit"].as_str().unwrap_or("?"),
        r["seconds_per_phase"],
    );
    let _ = writeln!(out, "Reproduce: `cargo bench --bench e2e`\n");
    let raw = &r["raw_producer"];
    let _ = writeln!(
        out,
        "| phase | records/s | calls/s | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | non-2xx | peak RSS MB |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let _ = writeln!(
        out,
        "| raw producer (ceiling) | {:.0} | | {:.1} | | | | | | |",
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
            "| {name} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {non_2xx} | {:.0} |",
            f(&rep["records_per_sec"]),
            f(&rep["calls_per_sec"]),
            f(&rep["mb_per_sec"]),
            f(&l["p50"]),
            f(&l["p99"]),
            f(&l["p999"]),
            f(&l["max"]),
            f(&entry["peak_rss_mb"]),
        );
    };
    for entry in r["http_tier"].as_array().into_iter().flatten() {
        row(
            &mut out,
            format!(
                "HTTP, batch {} ({} connections, closed loop)",
                entry["batch_size"], entry["connections"]
            ),
            entry,
        );
    }
    let single = &r["single_open_loop"];
    row(
        &mut out,
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
            &mut out,
            format!(
                "whole pipeline, {what}: batch 1000, open loop at {:.0}/s",
                f(&entry["offered_records_per_sec"])
            ),
            entry,
        );
    }
    let o = &r["overload"];
    row(
        &mut out,
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
        "**Kafka records per delivery** (sustained pass, every topic): {:.2} ({}).\n",
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
    let _ = writeln!(out, "![throughput and latency by batch size](e2e.svg)");
    out
}

/// Two panels: accepted records/s by batch size (with the raw producer as a line), and
/// p50/p99 latency by batch size (log scale).
fn chart(r: &Value) -> String {
    let entries: Vec<&Value> = r["http_tier"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let raw = f(&r["raw_producer"]["records_per_sec"]);
    let rates: Vec<f64> = entries
        .iter()
        .map(|e| f(&e["report"]["records_per_sec"]))
        .collect();
    let labels: Vec<String> = entries
        .iter()
        .map(|e| format!("batch {}", e["batch_size"]))
        .collect();
    let top = rates.iter().copied().chain([raw]).fold(1.0, f64::max) * 1.15;
    let (w, h, pad) = (900.0, 380.0, 60.0);
    let panel = (w - 3.0 * pad) / 2.0;
    let plot_h = h - 2.0 * pad;
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
    // Left panel: bars.
    let x0 = pad;
    let y0 = h - pad;
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/>"##,
        x0 + panel
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{pad}" stroke="black"/>"##
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
    let slot = panel / rates.len().max(1) as f64;
    for (i, (rate, label)) in rates.iter().zip(&labels).enumerate() {
        let bh = plot_h * rate / top;
        let x = x0 + slot * i as f64 + slot * 0.2;
        let _ = writeln!(
            svg,
            r##"<rect x="{x}" y="{}" width="{}" height="{bh}" fill="#4878a8"/><text x="{}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="middle">{label}</text>"##,
            y0 - bh,
            slot * 0.6,
            x + slot * 0.3,
            y0 - bh - 4.0,
            human(*rate),
            x + slot * 0.3,
            y0 + 16.0
        );
    }
    let ry = y0 - plot_h * raw / top;
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{ry}" x2="{}" y2="{ry}" stroke="#c0392b" stroke-dasharray="6 4"/><text x="{}" y="{}" fill="#c0392b">raw producer {}</text>"##,
        x0 + panel,
        x0 + 4.0,
        ry - 4.0,
        human(raw)
    );
    // Right panel: p50 and p99 on a log scale from 0.1 ms to 10 s.
    let x1 = 2.0 * pad + panel;
    let _ = writeln!(
        svg,
        r##"<line x1="{x1}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/>"##,
        x1 + panel
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{x1}" y1="{y0}" x2="{x1}" y2="{pad}" stroke="black"/>"##
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
    for (series, color, key) in [("p50", "#4878a8", "p50"), ("p99", "#e67e22", "p99")] {
        let points: Vec<(f64, f64)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    x1 + slot * (i as f64 + 0.5),
                    ly(f(&e["report"]["latency_ms"][key])),
                )
            })
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##,
            path.join(" ")
        );
        // p99 labels above their points, p50 below.
        let dy = if key == "p99" { -8.0 } else { 16.0 };
        for (i, (x, y)) in points.iter().enumerate() {
            let _ = writeln!(
                svg,
                r##"<circle cx="{x}" cy="{y}" r="4" fill="{color}"/><text x="{}" y="{}" fill="{color}">{series} {:.1}</text>"##,
                x + 6.0,
                y + dy,
                f(&entries[i]["report"]["latency_ms"][key])
            );
        }
    }
    for (i, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle">{label}</text>"##,
            x1 + slot * (i as f64 + 0.5),
            y0 + 16.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{} · {} cores · closed loop · commit {}</text>"##,
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
