//! The history: every topic into its Delta table exactly once (also across injected
//! crashes), compaction that queries never notice, time travel, and read-only SQL with
//! limits.

#[path = "common/tools.rs"]
mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use analytics::compact::CompactionArgs;
use analytics::failpoint::FailPoint;
use analytics::history::HistoryConfig;
use analytics::sink::{OnShutdown, SinkArgs};
use analytics::sql::{AsOf, History, QueryLimitsArgs, QueryResult};
use analytics::store::{DataArgs, DataRoot};
use anyhow::{Context, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use bus::{ClientSettings, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
use schemas::headers as h;
use schemas::topics;
use schemas::tracking::{Assignment, DeliveryState, EventKind, Stage};
use tokio_util::sync::CancellationToken;

/// 2026-11-23T12:00:00Z and the next day, in milliseconds.
const DAY_ONE: i64 = 1_795_435_200_000;
const DAY_TWO: i64 = DAY_ONE + 86_400_000;

struct Fixture {
    broker: EmbeddedBroker,
    settings: ClientSettings,
    data: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Result<Self> {
        let broker = EmbeddedBroker::start(1, &topics::ALL)?;
        let settings = ClientSettings::plain(broker.bootstrap_servers());
        Ok(Self {
            broker,
            settings,
            data: tempfile::tempdir()?,
        })
    }

    fn data(&self) -> String {
        self.data.path().display().to_string()
    }

    fn sink_config(&self, roll_rows: usize, fail_at: Option<FailPoint>) -> HistoryConfig {
        HistoryConfig {
            data: DataArgs::new(self.data()),
            sink: SinkArgs {
                roll_rows,
                roll_bytes: 64 * 1024 * 1024,
                roll_interval_ms: 300,
                compaction: CompactionArgs {
                    compact_interval_secs: 0,
                    ..CompactionArgs::default()
                },
            },
            offsets_scope: String::new(),
            fail_at,
            health: analytics::sink::SinkHealth::default(),
        }
    }

    /// Runs the sink until it has read everything there is (or failed).
    async fn sink(&self, roll_rows: usize, fail_at: Option<FailPoint>) -> analytics::Result<()> {
        let stop = CancellationToken::new();
        stop.cancel();
        tokio::time::timeout(
            Duration::from_secs(120),
            analytics::history::run(
                self.sink_config(roll_rows, fail_at),
                self.settings.clone(),
                stop,
                OnShutdown::Drain(Duration::from_secs(60)),
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(analytics::AnalyticsError::Task {
                reason: "sink did not finish in time".into(),
            })
        })
    }

    async fn history(&self) -> Result<History> {
        Ok(History::open(&self.data(), &QueryLimitsArgs::default()).await?)
    }

    fn root(&self) -> Result<DataRoot> {
        Ok(DataRoot::open(&self.data(), Path::new("/"))?)
    }

    /// The newest version of `table` and its live files (none if it was never created).
    async fn table(&self, table: &str) -> Result<Option<(u64, usize)>> {
        let Some(delta) = analytics::tables::load(&self.root()?, table).await? else {
            return Ok(None);
        };
        let state = delta.snapshot()?;
        Ok(Some((state.version(), state.log_data().num_files())))
    }

    /// The live files of every table.
    async fn live_files(&self) -> Result<usize> {
        let mut live = 0;
        for table in schemas::history::TABLES {
            live += self.table(table.name).await?.map_or(0, |(_, files)| files);
        }
        Ok(live)
    }
}

/// Sends one record. Its ingest time (which decides the `date` partition) is the one in
/// `headers`, or day one: never the clock's, so that no test depends on the calendar.
async fn send(
    producer: &Producer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: &[(&str, &[u8])],
) -> Result<()> {
    let day_one = DAY_ONE.to_string();
    let mut headers = headers.to_vec();
    if !headers.iter().any(|(name, _)| *name == h::INGEST_TIME) {
        headers.push((h::INGEST_TIME, day_one.as_bytes()));
    }
    producer
        .send_and_wait(OutRecord {
            topic,
            key: key.as_bytes(),
            payload,
            headers: &headers,
        })
        .await
        .with_context(|| format!("producing to {topic}"))?;
    Ok(())
}

/// `n` delivery requests, the first half ingested on day one, the rest on day two, plus
/// a reschedule and an invalid record that give no row.
async fn produce_requests(producer: &Producer, n: usize) -> Result<()> {
    let mut generator = schemas::generate::Generator::new(42, 3);
    let sends = (0..n).map(|i| {
        let tenant = format!("tenant-{}", i % 3);
        let mut body = String::new();
        generator.request_into(&tenant, &mut body);
        let at = if i < n / 2 { DAY_ONE } else { DAY_TWO } + i as i64;
        async move {
            let at = at.to_string();
            send(
                producer,
                topics::DELIVERY_REQUESTS.name,
                &format!("{tenant}/d{i}"),
                body.as_bytes(),
                &[
                    (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
                    (h::INGEST_TIME, at.as_bytes()),
                ],
            )
            .await
        }
    });
    futures_util::future::try_join_all(sends).await?;
    let day = DAY_TWO.to_string();
    send(
        producer,
        topics::DELIVERY_REQUESTS.name,
        "tenant-0/d0",
        br#"{"deadline":"2026-11-25T10:00:00Z"}"#,
        &[
            (
                h::EVENT_TYPE,
                h::event_type::DELIVERY_RESCHEDULED.as_bytes(),
            ),
            (h::INGEST_TIME, day.as_bytes()),
        ],
    )
    .await?;
    send(
        producer,
        topics::DELIVERY_REQUESTS.name,
        "tenant-0/bad",
        b"{not json",
        &[(h::INGEST_TIME, day.as_bytes())],
    )
    .await
}

fn count(result: &QueryResult) -> i64 {
    result.batches[0]
        .column(0)
        .as_primitive::<Int64Type>()
        .value(0)
}

async fn scalar(history: &History, sql: &str) -> Result<i64> {
    Ok(count(&history.query(sql).await.context(sql.to_owned())?))
}

/// The Parquet data files under `dir` (not the tables' logs and checkpoints).
fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
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
                found.push(path);
            }
        }
    }
    found
}

/// Rows per table and date.
type Counts = BTreeMap<String, BTreeMap<String, i64>>;

/// Rows per table and date as our SQL finds them, as of `as_of`.
async fn our_counts(history: &History, as_of: Option<AsOf>) -> Result<Counts> {
    let mut counts = Counts::new();
    for table in schemas::history::TABLES {
        let sql = format!("SELECT date, count(*) FROM {} GROUP BY date", table.name);
        let result = history.query_as_of(&sql, as_of).await?;
        let per_date = counts.entry(table.name.to_owned()).or_default();
        for batch in &result.batches {
            let dates = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
            let dates = dates.as_string::<i32>();
            let n = batch.column(1).as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                per_date.insert(dates.value(i).to_owned(), n.value(i));
            }
        }
    }
    Ok(counts)
}

/// What the Delta readers written elsewhere find (`tests/readers/delta_counts.py`): rows
/// per table and date for each reader, and the `txn` version of each app id.
#[derive(Debug, serde::Deserialize)]
struct Readers {
    deltalake: Counts,
    duckdb: Counts,
    txn: BTreeMap<String, BTreeMap<String, Option<i64>>>,
}

/// Runs the Delta readers over `root`, each table at the given version (`None`: its
/// newest), asking for the `txn` versions of every partition of its topic.
fn delta_readers(root: &Path, versions: &BTreeMap<&str, Option<u64>>) -> Result<Readers> {
    let app_ids: BTreeMap<&str, Vec<String>> = schemas::history::TABLES
        .iter()
        .map(|t| {
            let ids = (0..t.topic.partitions)
                .map(|p| analytics::tables::app_id("", t.topic.name, p))
                .collect();
            (t.name, ids)
        })
        .collect();
    let spec = serde_json::json!({ "tables": versions, "app_ids": app_ids });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/readers/delta_counts.py");
    let out = std::process::Command::new(tools::pinned_tools()?.join("python"))
        .arg(script)
        .arg(root)
        .arg(spec.to_string())
        .output()
        .context("running the Delta readers")?;
    anyhow::ensure!(
        out.status.success(),
        "the Delta readers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Delta Lake readers written elsewhere (delta-rs' Python package with pyarrow, and
/// DuckDB's delta extension) find exactly the rows our SQL finds, per table and date, at
/// the newest versions and as of version 1; and the `txn` versions are the offsets.
async fn readers_agree(f: &Fixture, history: &History) -> Result<()> {
    let mut newest: BTreeMap<&str, Option<u64>> = BTreeMap::new();
    let mut first: BTreeMap<&str, Option<u64>> = BTreeMap::new();
    for table in schemas::history::TABLES {
        let (version, _) = f.table(table.name).await?.context("every table is there")?;
        newest.insert(table.name, None);
        first.insert(table.name, Some(version.min(1)));
    }
    let ours = our_counts(history, None).await?;
    let theirs = delta_readers(f.data.path(), &newest)?;
    assert_eq!(theirs.deltalake, ours, "deltalake, newest");
    assert_eq!(theirs.duckdb, ours, "duckdb, newest");
    let ours_then = our_counts(history, Some(AsOf::Version(1))).await?;
    assert_ne!(ours_then, ours, "version 1 holds less than the newest");
    let then = delta_readers(f.data.path(), &first)?;
    assert_eq!(then.deltalake, ours_then, "deltalake, version 1");
    assert_eq!(then.duckdb, ours_then, "duckdb, version 1");
    // The txn versions are the last offsets read, at or past the last row's offset.
    let root = f.root()?;
    for table in schemas::history::TABLES {
        let delta = analytics::tables::load(&root, table.name)
            .await?
            .context("the table")?;
        let ours = analytics::tables::Table { table, delta };
        for partition in 0..table.topic.partitions {
            let app = analytics::tables::app_id("", table.topic.name, partition);
            let held = ours.next_offset("", partition).await?.map(|next| next - 1);
            assert_eq!(theirs.txn[table.name][&app], held, "{app}");
            let sql = format!(
                "SELECT max(kafka_offset) FROM {} WHERE kafka_partition = {partition}",
                table.name
            );
            let last_row = history.query(&sql).await?;
            let column = last_row.batches[0].column(0).as_primitive::<Int64Type>();
            if column.is_valid(0) {
                assert!(
                    held.is_some_and(|h| h >= column.value(0)),
                    "{app}: {held:?}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topic_lands_once_in_its_table_and_date() -> Result<()> {
    const N: usize = 300;
    let f = Fixture::new()?;
    let producer = Producer::new(&f.settings, &ProducerArgs::default())?;
    produce_requests(&producer, N).await?;
    // Three deliveries go all the way, one is cancelled.
    let location = schemas::Location {
        latitude: 47.6,
        longitude: -122.3,
    };
    let stages = [
        (Stage::Created, 1),
        (Stage::HeadedToPickup, 2),
        (Stage::HeadedToDropoff, 3),
        (Stage::Completed, 4),
    ];
    // As the delivery consumer writes them to its changelog: each change of a delivery,
    // whose stage changes are the events; a position change, an offset marker, a
    // waiting record and a tombstone on the same topic are not.
    let state = |i: usize, stage: Stage, seq: u32, change: EventKind| DeliveryState {
        delivery_id: format!("d{i}"),
        owner_id: format!("tenant-{i}"),
        stage,
        drone_id: (seq > 1).then(|| "drone-1".to_owned()),
        last_known_location: location,
        pickup_eta: None,
        delivery_eta: Some("2026-11-23T12:30:00Z".into()),
        pickup_location: location,
        drop_off_location: location,
        pickup_time: "2026-11-23T12:00:00Z".into(),
        deadline: "2026-11-23T13:00:00Z".into(),
        package_size: schemas::PackageSize::Small,
        package_weight: 1.0,
        drone_region: None,
        drone_speed_mps: None,
        seq,
        version: u64::from(seq) * 2,
        change: Some(change),
        updated_at: format!("2026-11-23T12:0{seq}:00Z"),
        cancel_reason: None,
        cancel_detail: None,
    };
    for i in 0..3 {
        let key = format!("tenant-{i}/d{i}");
        for (stage, seq) in stages {
            let value = serde_json::to_vec(&state(i, stage, seq, EventKind::Stage))?;
            send(&producer, topics::DELIVERY_STATE.name, &key, &value, &[]).await?;
            let position = serde_json::to_vec(&state(i, stage, seq, EventKind::Position))?;
            send(&producer, topics::DELIVERY_STATE.name, &key, &position, &[]).await?;
        }
    }
    for (key, value) in [
        ("\0delivery-requests", &b"41"[..]),
        ("\u{1}tenant-9/d9", b"{}"),
        ("tenant-2/d2", b""),
    ] {
        send(&producer, topics::DELIVERY_STATE.name, key, value, &[]).await?;
    }
    let assignment = Assignment {
        drone_id: "drone-1".into(),
        region: "47,-123".into(),
        delivery_key: "tenant-0/d0".into(),
        delivery_id: "d0".into(),
        from: location,
        pickup: location,
        drop_off: location,
        speed_mps: 15.0,
        assigned_at: DAY_ONE,
        pickup_eta: DAY_ONE + 60_000,
        delivery_eta: DAY_ONE + 600_000,
    };
    send(
        &producer,
        topics::DRONE_ASSIGNMENTS.name,
        "drone-1",
        &serde_json::to_vec(&assignment)?,
        &[(h::EVENT_TYPE, h::event_type::DRONE_ASSIGNED.as_bytes())],
    )
    .await?;
    for i in 0..5 {
        let fix = format!(
            r#"{{"latitude":47.6,"longitude":-122.3,"timestamp":"2026-11-23T12:00:0{i}Z","battery":80}}"#
        );
        send(
            &producer,
            topics::DRONE_TELEMETRY.name,
            "drone-1",
            fix.as_bytes(),
            &[(h::DRONE_ID, b"drone-1")],
        )
        .await?;
    }
    send(
        &producer,
        topics::DEAD_LETTERS.name,
        "tenant-0/x",
        b"\xff not a request",
        &[
            (h::DEAD_LETTER_REASON, b"not JSON"),
            (h::DEAD_LETTER_SOURCE, b"delivery-requests/0@7"),
        ],
    )
    .await?;

    f.sink(100, None).await.context("running the sink")?;

    let history = f.history().await?;
    let n = N as i64;
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
        n
    );
    assert_eq!(
        scalar(
            &history,
            "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM delivery_requests)"
        )
        .await?,
        n
    );
    // Partitions by ingest date, and pruning by them.
    assert_eq!(
        scalar(
            &history,
            "SELECT count(*) FROM delivery_requests WHERE date = '2026-11-23'"
        )
        .await?,
        n / 2
    );
    assert_eq!(
        scalar(
            &history,
            "SELECT count(*) FROM delivery_requests WHERE date = '2026-11-24'"
        )
        .await?,
        n - n / 2
    );
    for file in parquet_files(f.data.path()) {
        let relative = file.strip_prefix(f.data.path())?.display().to_string();
        assert!(
            relative.contains("/date=2026-11-23/") || relative.contains("/date=2026-11-24/"),
            "Hive-style folders: {relative}"
        );
    }
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_events").await?,
        12
    );
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM drone_assignments").await?,
        1
    );
    assert_eq!(scalar(&history, "SELECT count(*) FROM telemetry").await?, 5);
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM dead_letters").await?,
        1
    );
    let dead = history
        .query("SELECT reason, source, payload FROM dead_letters")
        .await?;
    assert_eq!(
        dead.batches[0].column(0).as_string::<i32>().value(0),
        "not JSON"
    );
    assert!(
        dead.batches[0]
            .column(2)
            .as_string::<i32>()
            .value(0)
            .ends_with("not a request")
    );

    // The delivery view: one row per delivery, with its timeline.
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM deliveries").await?,
        n
    );
    let done = history
        .query(
            "SELECT delivery_id, stage, seconds_in_flight, events FROM deliveries \
             WHERE completed_at IS NOT NULL ORDER BY delivery_id",
        )
        .await?;
    assert_eq!(done.rows(), 3);
    let batch = &done.batches[0];
    assert_eq!(batch.column(1).as_string::<i32>().value(0), "Completed");
    assert_eq!(
        batch
            .column(2)
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(0),
        120.0
    );
    assert_eq!(batch.column(3).as_primitive::<Int64Type>().value(0), 4);
    assert_eq!(
        scalar(
            &history,
            "SELECT count(*) FROM deliveries WHERE stage = 'Created'"
        )
        .await?,
        n - 3
    );

    readers_agree(&f, &history).await?;

    // Running the sink again reads nothing twice.
    f.sink(100, None).await?;
    let history = f.history().await?;
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
        n
    );
    drop(f.broker);
    Ok(())
}

/// A crash after the files are written (before the log commit) and one after the log
/// commit (before the Kafka commit): the next run leaves exactly N rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_each_step_leaves_exactly_n_rows() -> Result<()> {
    const N: usize = 400;
    for fail_at in [FailPoint::AfterFileWrite, FailPoint::AfterLogCommit] {
        let f = Fixture::new()?;
        let producer = Producer::new(&f.settings, &ProducerArgs::default())?;
        produce_requests(&producer, N).await?;
        let crashed = f.sink(150, Some(fail_at)).await;
        assert!(
            matches!(crashed, Err(analytics::AnalyticsError::Injected(at)) if at == fail_at),
            "{fail_at:?}: {crashed:?}"
        );
        let after_crash = f.table("delivery_requests").await?;
        let on_disk = parquet_files(f.data.path()).len();
        let history = f.history().await?;
        let committed = scalar(&history, "SELECT count(*) FROM delivery_requests").await?;
        match fail_at {
            FailPoint::AfterFileWrite => {
                // Created (version 0) at most; no rows committed.
                assert!(
                    after_crash.is_none_or(|(v, files)| v == 0 && files == 0),
                    "{after_crash:?}"
                );
                assert_eq!(committed, 0);
                assert!(on_disk > 0, "the crashed roll left files");
            }
            FailPoint::AfterLogCommit => {
                assert!(after_crash.is_some_and(|(v, _)| v >= 1), "{after_crash:?}");
                assert!(committed > 0);
            }
        }
        // Queries between the crash and the restart see only committed rows (above).

        f.sink(150, None).await.context("restarting the sink")?;
        let history = f.history().await?;
        let n = N as i64;
        assert_eq!(
            scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
            n,
            "{fail_at:?}"
        );
        assert_eq!(
            scalar(
                &history,
                "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM delivery_requests)"
            )
            .await?,
            n,
            "{fail_at:?}: no duplicates"
        );
        // Vacuum removes the crashed roll's orphan files; nothing else changes.
        let report = analytics::compact::compact_once(
            &f.root()?,
            &CompactionArgs {
                compact_min_files: 1_000,
                vacuum_retention_secs: 0,
                vacuum_orphan_secs: 0,
                ..CompactionArgs::default()
            },
            &CancellationToken::new(),
        )
        .await?;
        let live = f.live_files().await?;
        assert_eq!(parquet_files(f.data.path()).len(), live, "{report:?}");
        if fail_at == FailPoint::AfterFileWrite {
            assert!(report.deleted > 0);
        }
        assert_eq!(
            scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
            n
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_concurrent_queries_never_changes_a_count() -> Result<()> {
    const N: usize = 600;
    let f = Fixture::new()?;
    let producer = Producer::new(&f.settings, &ProducerArgs::default())?;
    produce_requests(&producer, N).await?;
    f.sink(25, None).await?;
    let root = f.root()?;
    let before = f.live_files().await?;
    assert!(before >= 20, "{before} files");

    let history = f.history().await?;
    let stop = CancellationToken::new();
    let reader = {
        let history = history.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut counts = BTreeSet::new();
            let mut queries = 0;
            while !stop.is_cancelled() || queries < 5 {
                let n = scalar(
                    &history,
                    "SELECT count(*) FROM delivery_requests WHERE kafka_offset >= 0",
                )
                .await?;
                counts.insert(n);
                queries += 1;
            }
            anyhow::Ok((counts, queries))
        })
    };
    let config = CompactionArgs {
        compact_min_files: 2,
        vacuum_retention_secs: 3_600,
        ..CompactionArgs::default()
    };
    let mut merged = 0;
    for _ in 0..3 {
        let report =
            analytics::compact::compact_once(&root, &config, &CancellationToken::new()).await?;
        merged += report.merged;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let (counts, queries) = reader.await??;
    assert_eq!(counts, BTreeSet::from([N as i64]), "over {queries} queries");
    assert!(merged >= 2, "one merge per date at least");
    let after = f.live_files().await?;
    assert!(after <= 2, "{after} files");
    // Until the retention passes, the replaced files stay for queries that may read them;
    // then vacuum deletes them.
    assert_eq!(parquet_files(f.data.path()).len(), before + after);
    analytics::compact::compact_once(
        &root,
        &CompactionArgs {
            vacuum_retention_secs: 0,
            vacuum_orphan_secs: 0,
            ..config
        },
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(parquet_files(f.data.path()).len(), after);
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
        N as i64
    );
    Ok(())
}

/// Two compactions at once (two `history` services, or `dronedelivery compact` beside
/// one) merge each file once: one commits, the other is refused, and no row is there
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_compactions_merge_each_file_once() -> Result<()> {
    const N: usize = 400;
    let f = Fixture::new()?;
    let producer = Producer::new(&f.settings, &ProducerArgs::default())?;
    produce_requests(&producer, N).await?;
    f.sink(25, None).await?;
    let root = f.root()?;
    let config = CompactionArgs {
        compact_min_files: 2,
        ..CompactionArgs::default()
    };
    let stop = CancellationToken::new();
    let (a, b) = tokio::join!(
        analytics::compact::compact_once(&root, &config, &stop),
        analytics::compact::compact_once(&root, &config, &stop)
    );
    let (a, b) = (a?, b?);
    assert!(a.merged + b.merged >= 1, "{a:?} {b:?}");
    let history = f.history().await?;
    let n = N as i64;
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
        n
    );
    assert_eq!(
        scalar(
            &history,
            "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM delivery_requests)"
        )
        .await?,
        n
    );
    // A later pass finishes what a refused one left; still every row once.
    analytics::compact::compact_once(&root, &config, &stop).await?;
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
        n
    );
    Ok(())
}

/// Time travel: each table as of an earlier version, or an earlier time, is what it held
/// then; the newest is the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_reads_what_each_version_held() -> Result<()> {
    const N: usize = 300;
    let f = Fixture::new()?;
    let producer = Producer::new(&f.settings, &ProducerArgs::default())?;
    produce_requests(&producer, N).await?;
    let before = chrono::Utc::now();
    f.sink(100, None).await?;
    let after = chrono::Utc::now();
    let (newest, _) = f
        .table("delivery_requests")
        .await?
        .context("the table exists")?;
    assert!(newest >= 3, "one version per roll: {newest}");
    let history = f.history().await?;
    let count_as_of = |as_of: AsOf| {
        let history = history.clone();
        async move {
            let result = history
                .query_as_of("SELECT count(*) FROM delivery_requests", Some(as_of))
                .await
                .with_context(|| format!("as of {as_of}"))?;
            anyhow::Ok(count(&result))
        }
    };
    let n = N as i64;
    // Version 0 created the table; the first roll added rows, and later ones added rows
    // or only offsets (records that give no row).
    assert_eq!(count_as_of(AsOf::Version(0)).await?, 0);
    let first = count_as_of(AsOf::Version(1)).await?;
    assert!(first > 0 && first < n, "{first}");
    let mut last = first;
    for version in 2..=newest {
        let rows = count_as_of(AsOf::Version(i64::try_from(version)?)).await?;
        assert!(rows >= last, "version {version}: {rows} after {last}");
        last = rows;
    }
    assert_eq!(last, n);
    // Past the newest version, each table is read at its newest.
    assert_eq!(count_as_of(AsOf::Version(1_000_000)).await?, n);
    // As of the time of version 1's commit, the table is version 1.
    let log = f.data.path().join("delivery_requests/_delta_log");
    let committed = |v: u64| -> Result<chrono::DateTime<chrono::Utc>> {
        Ok(std::fs::metadata(log.join(format!("{v:020}.json")))?
            .modified()?
            .into())
    };
    if committed(2)? > committed(1)? {
        assert_eq!(count_as_of(AsOf::Time(committed(1)?)).await?, first);
    }
    // Before the tables existed they were empty; after the last commit, whole.
    assert_eq!(count_as_of(AsOf::Time(before)).await?, 0);
    assert_eq!(count_as_of(AsOf::Time(after)).await?, n);
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
        n
    );
    // The view reads the same versions.
    let early = history
        .query_as_of("SELECT count(*) FROM deliveries", Some(AsOf::Version(1)))
        .await?;
    assert!(count(&early) > 0 && count(&early) < n);
    for bad in ["yesterday", "-1", "2026-13-01T00:00:00Z"] {
        assert!(AsOf::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(AsOf::parse(" 7 "), Ok(AsOf::Version(7)));
    Ok(())
}

/// A hash aggregation of 3 M groups (an ordered input would stream instead).
const HASH_AGGREGATE: &str = "SELECT (v * 7919) % 3000017 AS k, count(*) AS n \
    FROM generate_series(1, 3000000) AS t(v) GROUP BY k ORDER BY n DESC LIMIT 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_read_only_and_bounded() -> Result<()> {
    let data = tempfile::tempdir()?;
    let path = data.path().display().to_string();
    let history = History::open(&path, &QueryLimitsArgs::default()).await?;
    // An empty history is empty tables, not an error.
    for table in schemas::history::TABLES {
        let sql = format!("SELECT count(*) FROM {}", table.name);
        assert_eq!(scalar(&history, &sql).await?, 0, "{sql}");
    }
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM deliveries").await?,
        0
    );
    for statement in [
        "CREATE TABLE t (a INT)",
        "CREATE VIEW v AS SELECT 1",
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc/'",
        "DROP TABLE delivery_requests",
        "INSERT INTO delivery_requests SELECT * FROM delivery_requests",
        "DELETE FROM delivery_requests",
        "COPY (SELECT 1) TO '/tmp/out.csv'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let err = history.query(statement).await.expect_err(statement);
        assert!(
            matches!(err, analytics::AnalyticsError::ReadOnly { .. }),
            "{statement}: {err}"
        );
    }
    // Files outside the history cannot be named.
    for statement in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM 'file:///etc/hostname'",
        "SELECT * FROM read_parquet('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd')",
    ] {
        let err = history.query(statement).await.expect_err(statement);
        assert!(
            matches!(err, analytics::AnalyticsError::Query { .. }),
            "{statement}: {err}"
        );
    }

    // Over the memory limit: a clean error, not an abort.
    let small = History::open(
        &path,
        &QueryLimitsArgs {
            sql_memory_mb: 1,
            ..QueryLimitsArgs::default()
        },
    )
    .await?;
    let err = small
        .query(HASH_AGGREGATE)
        .await
        .expect_err("over the memory limit");
    assert!(err.to_string().contains("Resources exhausted"), "{err}");
    // The same query within the default limit works.
    assert_eq!(history.query(HASH_AGGREGATE).await?.rows(), 1);

    // More rows than allowed.
    let few = History::open(
        &path,
        &QueryLimitsArgs {
            sql_max_rows: 10,
            ..QueryLimitsArgs::default()
        },
    )
    .await?;
    assert_eq!(
        few.query("SELECT * FROM generate_series(1, 10)")
            .await
            .map(|r| r.rows())?,
        10
    );
    let err = few
        .query("SELECT * FROM generate_series(1, 11)")
        .await
        .expect_err("too many rows");
    assert!(
        matches!(err, analytics::AnalyticsError::TooManyRows { limit: 10 }),
        "{err}"
    );

    // A result larger in bytes than allowed (10 MB of text past 1 MiB): a clean error
    // once the bound is passed, never the whole answer held in memory.
    let narrow = History::open(
        &path,
        &QueryLimitsArgs {
            sql_max_result_mb: 1,
            ..QueryLimitsArgs::default()
        },
    )
    .await?;
    let err = narrow
        .query("SELECT repeat('x', 1000) AS s FROM range(10000)")
        .await
        .expect_err("a result past the byte bound");
    assert!(
        matches!(
            err,
            analytics::AnalyticsError::ResultTooLarge { limit_mb: 1 }
        ),
        "{err}"
    );
    assert!(err.is_over_limit());
    assert_eq!(
        narrow
            .query("SELECT repeat('x', 10) AS s FROM range(100)")
            .await?
            .rows(),
        100
    );

    // One query at a time: the others wait their turn and all finish.
    let one = History::open(
        &path,
        &QueryLimitsArgs {
            sql_max_concurrent: 1,
            ..QueryLimitsArgs::default()
        },
    )
    .await?;
    let queries = (1..=4).map(|n| {
        let one = one.clone();
        async move {
            one.query(&format!("SELECT * FROM generate_series(1, {n})"))
                .await
                .map(|r| r.rows())
        }
    });
    let rows = futures_util::future::join_all(queries).await;
    let rows: Vec<usize> = rows.into_iter().collect::<Result<_, _>>()?;
    assert_eq!(rows, [1, 2, 3, 4]);
    Ok(())
}

/// A store that refuses writes (here: a file where a table's folder goes, which stops
/// root too) stalls the sink instead of ending it: it says so (readiness, write
/// backpressure), keeps every row it read, and once the store takes writes again the
/// history holds each record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_writes_stalls_the_sink_and_loses_no_row() -> Result<()> {
    const N: usize = 50;
    let f = Fixture::new()?;
    // The folder of the `delivery_requests` table under the history's root.
    let blocker = f.data.path().join("delivery_requests");
    std::fs::write(&blocker, b"not a folder")?;
    let producer = Producer::new(&f.settings, &ProducerArgs::default())?;
    produce_requests(&producer, N).await?;

    let health = analytics::sink::SinkHealth::default();
    let mut config = f.sink_config(10, None);
    config.health = health.clone();
    let stop = CancellationToken::new();
    let sink = tokio::spawn(analytics::history::run(
        config,
        f.settings.clone(),
        stop.clone(),
        OnShutdown::Drain(Duration::from_secs(60)),
    ));
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let reason = loop {
        if let Some(reason) = health.stalled() {
            break reason;
        }
        assert!(!sink.is_finished(), "the sink ended: {:?}", sink.await);
        assert!(
            std::time::Instant::now() < until,
            "the sink never said it stalled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains("cannot be written"), "{reason}");
    assert!(
        health
            .stalled_flag()
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    // A while later it still runs, still stalled, holding the rows.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!sink.is_finished(), "a store error does not end the sink");
    assert!(health.stalled().is_some());

    std::fs::remove_file(&blocker)?;
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while health.stalled().is_some() {
        assert!(
            std::time::Instant::now() < until,
            "the sink never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    sink.await.context("sink task")??;
    let history = f.history().await?;
    assert_eq!(
        scalar(&history, "SELECT count(*) FROM delivery_requests").await?,
        N as i64
    );
    assert_eq!(
        scalar(
            &history,
            "SELECT count(*) FROM (SELECT DISTINCT kafka_partition, kafka_offset FROM delivery_requests)"
        )
        .await?,
        N as i64
    );
    Ok(())
}
