//! The history, end to end on the embedded broker:
//!
//! 1. **Sink throughput**: N generated delivery requests (ingest dates spread over ten
//!    days) and two stage changes (`delivery-state`) for every tenth of them are put on their topics;
//!    then the history sink reads them all into Delta tables (records/s, rows/s, MB written).
//! 2. **Query latency** of a few analyst queries over the result (N rows of
//!    `delivery_requests`), each run three times; then the same queries in DuckDB over
//!    the same Delta tables (`benches/duckdb_queries.py`, with the pinned tools of
//!    `deploy/tools/install`), and the geometric mean of the ratios.
//! 3. **Freshness**: with the sink running at its default roll interval, single records
//!    are produced one after another and the time from the broker's ack until a query
//!    sees the row is measured.
//!
//! `cargo bench --bench history` (N from `DRONEDELIVERY_BENCH_HISTORY_ROWS`, default
//! 10,000,000; the embedded broker holds every record in memory, about 0.5 KB each).

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use analytics::history::HistoryConfig;
use analytics::sink::{OnShutdown, SinkArgs};
use analytics::sql::{History, QueryLimitsArgs};
use analytics::store::DataArgs;
use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use bus::{ClientSettings, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
use schemas::headers as h;
use schemas::topics;
use schemas::tracking::{DeliveryState, EventKind, Stage};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// 2026-11-10T00:00:00Z in milliseconds: the first of the ten ingest days.
const FIRST_DAY: i64 = 1_794_268_800_000;
const DAY: i64 = 86_400_000;

fn main() {
    // As the binary does.
    dronedelivery::huge_pages::turn_off();
    let n: usize = std::env::var("DRONEDELIVERY_BENCH_HISTORY_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(n));
}

/// Generated requests, and two delivery events for every tenth of them.
struct Source {
    generator: schemas::generate::Generator,
    next: usize,
}

impl Source {
    /// Produces the next `count` requests (and their events); returns the records
    /// produced, once every one is acknowledged.
    async fn produce(&mut self, producer: &Producer, count: usize) -> usize {
        let location = schemas::Location {
            latitude: 47.6,
            longitude: -122.3,
        };
        let mut acks = Vec::with_capacity(count * 2);
        let mut body = String::with_capacity(512);
        for i in self.next..self.next + count {
            let tenant = self.generator.tenant();
            body.clear();
            self.generator.request_into(&tenant, &mut body);
            let id = format!("h{i}");
            let key = schemas::delivery_key(&tenant, &id);
            let at = FIRST_DAY + (i as i64 % 10) * DAY + (i as i64 / 10) % DAY;
            let at_text = at.to_string();
            let headers: [(&str, &[u8]); 2] = [
                (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
                (h::INGEST_TIME, at_text.as_bytes()),
            ];
            let mut outgoing = vec![(topics::DELIVERY_REQUESTS.name, body.clone())];
            if i % 10 == 0 {
                for (stage, seq, minutes) in
                    [(Stage::HeadedToPickup, 2, 5), (Stage::Completed, 4, 40)]
                {
                    // A stage change as the delivery consumer writes it to its
                    // changelog, which the history's `delivery_events` reads.
                    let time = chrono::DateTime::from_timestamp_millis(at + minutes * 60_000)
                        .unwrap()
                        .to_rfc3339();
                    let state = DeliveryState {
                        delivery_id: id.clone(),
                        owner_id: tenant.clone(),
                        stage,
                        drone_id: Some(format!("drone-{}", i % 997)),
                        last_known_location: location,
                        pickup_eta: None,
                        delivery_eta: None,
                        pickup_location: location,
                        drop_off_location: location,
                        pickup_time: time.clone(),
                        deadline: time.clone(),
                        package_size: schemas::PackageSize::Small,
                        package_weight: 1.0,
                        drone_region: None,
                        drone_speed_mps: None,
                        seq,
                        version: u64::from(seq),
                        change: Some(EventKind::Stage),
                        updated_at: time,
                        cancel_reason: None,
                        cancel_detail: None,
                    };
                    outgoing.push((
                        topics::DELIVERY_STATE.name,
                        serde_json::to_string(&state).unwrap(),
                    ));
                }
            }
            for (topic, payload) in &outgoing {
                loop {
                    match producer.send(OutRecord {
                        topic,
                        key: key.as_bytes(),
                        payload: payload.as_bytes(),
                        headers: &headers,
                    }) {
                        Ok(ack) => {
                            acks.push(ack);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                    }
                }
            }
        }
        self.next += count;
        let records = acks.len();
        for ack in futures_util::future::join_all(acks).await {
            ack.unwrap();
        }
        records
    }
}

/// What the history holds of the two bench topics, read from their tables' `txn`
/// versions (each table re-read incrementally).
struct Covered {
    root: analytics::store::DataRoot,
    tables: Vec<(schemas::topics::Topic, Option<analytics::tables::Table>)>,
}

impl Covered {
    fn new(root: analytics::store::DataRoot) -> Self {
        Self {
            root,
            tables: vec![
                (topics::DELIVERY_REQUESTS, None),
                (topics::DELIVERY_STATE, None),
            ],
        }
    }

    /// Records of the bench topics the history holds.
    async fn records(&mut self) -> i64 {
        let mut total = 0;
        for (topic, table) in &mut self.tables {
            match table {
                Some(t) => t.refresh().await.unwrap(),
                None => {
                    let history = schemas::history::table_of(topic.name).unwrap();
                    if let Some(delta) = analytics::tables::load(&self.root, history.name)
                        .await
                        .unwrap()
                    {
                        *table = Some(analytics::tables::Table {
                            table: history,
                            delta,
                        });
                    }
                }
            }
            if let Some(t) = table {
                for partition in 0..topic.partitions {
                    total += t.next_offset("", partition).await.unwrap().unwrap_or(0);
                }
            }
        }
        total
    }

    /// Waits until the history holds `records` records of the bench topics.
    async fn wait_for(&mut self, records: usize) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.records().await < records as i64 {
            assert!(Instant::now() < deadline, "the sink stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The best of three runs of each query in DuckDB (`benches/duckdb_queries.py`, with the
/// pinned tools of `deploy/tools/install`), in milliseconds.
fn duckdb_times(
    root: &std::path::Path,
    queries: &[(&str, &str)],
) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tools = std::process::Command::new(here.join("deploy/tools/install"))
        .output()
        .map_err(|e| e.to_string())?;
    if !tools.status.success() {
        return Err("deploy/tools/install failed".into());
    }
    let bin = String::from_utf8_lossy(&tools.stdout).trim().to_owned();
    let out = std::process::Command::new(std::path::Path::new(&bin).join("python"))
        .arg(here.join("benches/duckdb_queries.py"))
        .arg(root)
        .arg(serde_json::to_string(queries).map_err(|e| e.to_string())?)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let runs: std::collections::BTreeMap<String, Vec<f64>> =
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(runs
        .into_iter()
        .map(|(name, times)| (name, times.into_iter().fold(f64::INFINITY, f64::min)))
        .collect())
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.file_name().is_some_and(|n| n == "_delta_log") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

fn sink_config() -> SinkArgs {
    SinkArgs {
        roll_rows: 200_000,
        roll_bytes: 256 * 1024 * 1024,
        roll_interval_ms: 2_000,
        compaction: analytics::compact::CompactionArgs {
            compact_interval_secs: 0,
            ..Default::default()
        },
    }
}

async fn run(n: usize) {
    let broker = EmbeddedBroker::start(1, &topics::ALL).unwrap();
    let settings = ClientSettings::plain(broker.bootstrap_servers());
    let producer = Producer::new(&settings, &ProducerArgs::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();

    // 1. Sink throughput. The embedded broker keeps only the newest 5 MiB of each
    // partition, so requests go in chunks that fit, each once the sink has the last.
    let stop = CancellationToken::new();
    let sink = tokio::spawn(analytics::history::run(
        HistoryConfig::new(
            DataArgs::new(&data),
            SinkArgs {
                roll_interval_ms: 200,
                ..sink_config()
            },
        ),
        settings.clone(),
        stop.clone(),
        OnShutdown::Stop,
    ));
    let mut covered =
        Covered::new(analytics::store::DataRoot::open(&data, std::path::Path::new("/")).unwrap());
    let mut source = Source {
        generator: schemas::generate::Generator::new(2026, 50),
        next: 0,
    };
    // One request first, so that the group has formed before the clock starts.
    let mut records = source.produce(&producer, 1).await;
    covered.wait_for(records).await;
    const CHUNK: usize = 100_000;
    let (mut producing, mut waiting) = (0.0, 0.0);
    let started = Instant::now();
    while source.next < n {
        let t = Instant::now();
        records += source.produce(&producer, CHUNK.min(n - source.next)).await;
        producing += t.elapsed().as_secs_f64();
        let t = Instant::now();
        covered.wait_for(records).await;
        waiting += t.elapsed().as_secs_f64();
    }
    let took = started.elapsed().as_secs_f64();
    stop.cancel();
    sink.await.unwrap().unwrap();
    let bytes = dir_bytes(dir.path());
    println!(
        "sink: {records} records ({n} requests, {} events) in {took:.1} s: {:.0} records/s \
         end to end ({producing:.1} s producing, {waiting:.1} s waiting for the sink after \
         each chunk); {:.0} MB of Parquet ({:.1} bytes/record)",
        records - n,
        records as f64 / took,
        bytes as f64 / 1e6,
        bytes as f64 / records as f64
    );

    // 2. Query latency.
    let history = History::open(
        &data,
        &QueryLimitsArgs {
            sql_memory_mb: 8192,
            sql_timeout_secs: 600,
            ..QueryLimitsArgs::default()
        },
    )
    .await
    .unwrap();
    let count = history
        .query("SELECT count(*) FROM delivery_requests")
        .await
        .unwrap();
    let rows = count.batches[0]
        .column(0)
        .as_primitive::<Int64Type>()
        .value(0);
    if rows as usize != n {
        println!("the tables cover {} records", covered.records().await);
    }
    assert_eq!(rows as usize, n, "every request is one row");
    let queries = [
        ("count", "SELECT count(*) FROM delivery_requests"),
        (
            "per day",
            "SELECT date, count(*) AS n, avg(package_weight) AS kg FROM delivery_requests \
             GROUP BY date ORDER BY date",
        ),
        (
            "one day, top tenants",
            "SELECT owner_id, count(*) AS n FROM delivery_requests WHERE date = '2026-11-15' \
             GROUP BY owner_id ORDER BY n DESC LIMIT 10",
        ),
        (
            "size mix",
            "SELECT package_size, expedited, count(*) AS n, max(package_weight) AS heaviest \
             FROM delivery_requests GROUP BY package_size, expedited ORDER BY n DESC",
        ),
        (
            "one delivery",
            "SELECT * FROM delivery_requests WHERE delivery_id = 'h4242'",
        ),
        (
            "deliveries view",
            "SELECT stage, count(*) AS n, avg(seconds_to_complete) AS s FROM deliveries \
             GROUP BY stage ORDER BY n DESC",
        ),
    ];
    println!("queries over {rows} rows (best / median of 3):");
    let mut ours = Vec::new();
    for (name, sql) in queries {
        let mut times = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            history.query(sql).await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!("  {name:<22} {:>8.0} ms / {:>8.0} ms", times[0], times[1]);
        ours.push((name, times[0]));
    }
    // The same queries (not the view, whose SQL is DataFusion's) in DuckDB over the same
    // Delta tables.
    let shared: Vec<(&str, &str)> = queries
        .iter()
        .copied()
        .filter(|(name, _)| *name != "deliveries view")
        .collect();
    match duckdb_times(dir.path(), &shared) {
        Ok(theirs) => {
            println!("the same queries in DuckDB (best of 3), and ours / DuckDB:");
            let mut log_sum = 0.0;
            for (name, best) in ours.iter().filter(|(name, _)| theirs.contains_key(*name)) {
                let duck = theirs[*name];
                println!("  {name:<22} {duck:>8.0} ms   {:>6.2}", best / duck);
                log_sum += (best / duck).ln();
            }
            println!(
                "  geometric mean of ours / DuckDB: {:.2}",
                (log_sum / theirs.len() as f64).exp()
            );
        }
        Err(e) => println!("DuckDB comparison skipped: {e}"),
    }

    // 3. Freshness at the default roll interval.
    let stop = CancellationToken::new();
    let sink = tokio::spawn(analytics::history::run(
        HistoryConfig::new(
            DataArgs::new(&data),
            SinkArgs {
                roll_rows: 200_000,
                ..sink_config()
            },
        ),
        settings.clone(),
        stop.clone(),
        OnShutdown::Stop,
    ));
    let mut lags = Vec::new();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    // The first record also waits for the sink's group join; it is not counted.
    for i in 0..21 {
        let (tenant, body) = schemas::generate::Generator::new(i, 1).request();
        let id = format!("fresh-{i}");
        let now = chrono::Utc::now().timestamp_millis().to_string();
        producer
            .send_and_wait(OutRecord {
                topic: topics::DELIVERY_REQUESTS.name,
                key: schemas::delivery_key(&tenant, &id).as_bytes(),
                payload: body.as_bytes(),
                headers: &[
                    (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
                    (h::INGEST_TIME, now.as_bytes()),
                ],
            })
            .await
            .unwrap();
        let acked = Instant::now();
        let sql = format!(
            "SELECT count(*) FROM delivery_requests WHERE date = '{today}' AND delivery_id = '{id}'"
        );
        loop {
            let found = history.query(&sql).await.unwrap();
            if found.batches[0]
                .column(0)
                .as_primitive::<Int64Type>()
                .value(0)
                == 1
            {
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(60),
                "{id} never showed up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if i > 0 {
            lags.push(acked.elapsed().as_secs_f64());
        }
    }
    stop.cancel();
    sink.await.unwrap().unwrap();
    lags.sort_by(f64::total_cmp);
    println!(
        "freshness (ack to queryable, roll interval 2 s, 20 records): p50 {:.2} s, \
         p99 (the max of 20) {:.2} s",
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
}
