//! Stopping: `dronedelivery run` on the embedded broker exits with status 0 within 5 s of
//! SIGINT or SIGTERM when idle, and within 15 s under load (a paced writer still
//! posting), with every record answered as accepted in the history afterwards. On the
//! real three-node cluster (`common::kafka`, one per test binary): each service of the
//! split topology (`ingest`, `process`, `history`, `sql-server`) exits within 5 s idle
//! and within 15 s under load, front first; and a consumer knows when it has caught up
//! with partitions that hold transaction markers, aborted records, an open transaction
//! or nothing at all (what the sink's drain relies on).
//!
//! The bounds are the specification's (a Kubernetes pod gets 30 s), not performance
//! figures: a stop that takes longer is a bug. Every process starts through the harness
//! (`common::binary`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use dronedelivery::announce;

mod common;
use common::binary::{Binary, Launch, Signal};
use common::kafka::{KafkaCluster, exclusive};
use common::service::eventually_contains;
use common::writer::Writer;
use common::*;

/// How long an idle process may take to exit after a stop signal.
const IDLE: Duration = Duration::from_secs(5);

/// How long a process under load may take to exit after a stop signal.
const UNDER_LOAD: Duration = Duration::from_secs(15);

/// `dronedelivery run` on the embedded broker, writing its history to `data`.
fn start_run(data: &std::path::Path) -> Result<Binary> {
    Launch::new("run")
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--flight-listen",
            "off",
            "--roll-interval-ms",
            "500",
        ])
        .arg("--data")
        .arg(data)
        .start(&[announce::API])
}

/// Sends `signal` and waits at most `bound` for the exit, which must be a success.
fn stops_within(binary: Binary, signal: Signal, bound: Duration) -> Result<Duration> {
    let label = binary.label().to_owned();
    let asked = Instant::now();
    let status = binary.terminate(signal, bound)?;
    let took = asked.elapsed();
    if !status.success() {
        bail!(
            "dronedelivery {label} exited with {status} after SIG{}",
            signal.name()
        );
    }
    Ok(took)
}

/// Idle, just started (its consumers not yet in their groups) and after the groups
/// formed: either signal ends `run` within 5 s, with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_run_exits_within_five_seconds_of_sigint_or_sigterm() -> Result<()> {
    let data = tempfile::tempdir()?;
    let run = start_run(&data.path().join("first"))?;
    stops_within(run, Signal::Term, IDLE)?;

    let run = start_run(&data.path().join("second"))?;
    // The embedded broker's groups form about 3 s after start-up.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stops_within(run, Signal::Int, IDLE)?;
    Ok(())
}

/// Under load (a writer posting batches until the tier goes away), SIGTERM ends `run`
/// within 15 s, with status 0, and every record answered as accepted is in the history
/// afterwards: the front stops first, and the sink reads everything before the
/// in-memory broker goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_under_load_exits_within_fifteen_seconds_and_keeps_every_accepted_record() -> Result<()>
{
    let data = tempfile::tempdir()?;
    let history = data.path().join("history");
    let run = start_run(&history)?;
    let api = format!("http://{}", run.announced(announce::API)?);
    let writer = Writer::start(
        &api,
        "stop",
        -10,
        3,
        50,
        Duration::from_millis(20),
        Duration::from_secs(10),
    );
    // Long enough for the consumers to join and the sink to write some rolls.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let took = stops_within(run, Signal::Term, UNDER_LOAD)?;
    let report = writer.finish().await?;
    assert!(
        report.accepted.len() >= 100,
        "the writer was not under way: {report:?}"
    );
    let found: BTreeSet<String> = history_strings(
        &history.display().to_string(),
        &format!(
            "SELECT DISTINCT delivery_id FROM delivery_requests WHERE delivery_id LIKE '{}-%'",
            report.ids
        ),
    )
    .await?
    .into_iter()
    .collect();
    let missing: Vec<&String> = report.accepted.difference(&found).collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted records are not in the history (stopped in {took:?}), such as {:?}",
        missing.len(),
        report.accepted.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// On the real cluster, a group member is caught up exactly when it has read every
/// committed record: transaction markers (which it never receives) and aborted records do
/// not hold it back, an open transaction is not readable yet, an empty partition is
/// caught up, and before it read anything it is not (records are waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_knows_it_caught_up_past_transaction_markers() -> Result<()> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let settings = cluster.settings();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let name: &'static str = Box::leak(format!("stop-markers-{run}").into_boxed_str());
    let topic = schemas::Topic {
        name,
        keyed_by: schemas::topics::KeyedBy::OriginalKey,
        partitions: 3,
        compacted: false,
        min_compaction_lag_ms: 0,
    };
    bus::ensure_topics(&settings, &[topic]).await?;
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .set("transactional.id", format!("stop-markers-{run}"))
        .create()?;
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout)?;
    let send = |partition: i32, n: usize| -> Result<()> {
        for i in 0..n {
            let key = format!("k{i}");
            producer
                .send(
                    BaseRecord::to(name)
                        .partition(partition)
                        .key(key.as_str())
                        .payload("v"),
                )
                .map_err(|(e, _)| e)?;
        }
        Ok(())
    };
    // Partition 0: ten committed, then five aborted (two markers); partition 1: three
    // committed (a marker last); partition 2: nothing.
    producer.begin_transaction()?;
    send(0, 10)?;
    producer.commit_transaction(timeout)?;
    producer.begin_transaction()?;
    send(0, 5)?;
    producer.flush(timeout)?;
    producer.abort_transaction(timeout)?;
    producer.begin_transaction()?;
    send(1, 3)?;
    producer.commit_transaction(timeout)?;

    let consumer = bus::Consumer::subscribe(&settings, &format!("stop-markers-{run}"), &[name])?;
    // A new group's coordinator may answer NOT_COORDINATOR (or that it is loading) for a
    // moment; like the history sink's drain, the check asks again, for up to 20 s.
    let check = |consumer: &bus::Consumer| {
        tokio::task::block_in_place(|| {
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                match consumer.caught_up(Duration::from_secs(5)) {
                    Err(e) if e.to_string().contains("Coordinator") && Instant::now() < until => {
                        eprintln!("cannot tell yet whether caught up: {e}");
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    answer => return answer,
                }
            }
        })
    };
    // The transaction markers are written just after a commit returns: once they are,
    // the records are readable and a member that has read nothing is not caught up.
    let deadline = Instant::now() + SETTLE;
    while check(&consumer)? {
        assert!(Instant::now() < deadline, "records are waiting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = read_until_caught_up(&consumer, check, 13).await?;
    assert_eq!(
        received.iter().filter(|(p, _)| *p == 0).count(),
        10,
        "{received:?}"
    );
    assert_eq!(
        received.iter().filter(|(p, _)| *p == 1).count(),
        3,
        "no aborted record: {received:?}"
    );

    // An open transaction is not readable yet: still caught up.
    producer.begin_transaction()?;
    send(2, 4)?;
    producer.flush(timeout)?;
    assert!(
        check(&consumer)?,
        "an open transaction holds nothing readable"
    );
    // Once committed, it is read, and the member is caught up again.
    producer.commit_transaction(timeout)?;
    let received = read_until_caught_up(&consumer, check, 4).await?;
    assert!(received.iter().all(|(p, _)| *p == 2), "{received:?}");
    Ok(())
}

/// Reads until `check` says `consumer` caught up, having received at least `expected`
/// records (a commit's records become readable a moment after it returns), then
/// answers what it received: exactly `expected`, or it fails.
async fn read_until_caught_up(
    consumer: &bus::Consumer,
    check: impl Fn(&bus::Consumer) -> bus::Result<bool>,
    expected: usize,
) -> Result<Vec<(i32, i64)>> {
    let deadline = Instant::now() + SETTLE;
    let mut received = Vec::new();
    loop {
        if let Ok(record) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        {
            let record = record?;
            received.push((record.partition(), record.offset()));
            continue;
        }
        if received.len() >= expected && check(consumer)? {
            break;
        }
        if Instant::now() > deadline {
            bail!("not caught up after {SETTLE:?}; received {received:?}");
        }
    }
    assert_eq!(received.len(), expected, "{received:?}");
    Ok(received)
}

/// A service of the split topology on the real cluster.
fn start_service(label: &'static str, args: &[&str], announce: &'static str) -> Result<Binary> {
    Launch::new(label).args(args).start(&[announce])
}

/// The split topology on the real cluster: idle, each service exits within 5 s of
/// SIGTERM; under load (a writer posting), the ingestion tier, then the processors, then
/// the history sink each exit within 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_split_service_stops_within_the_bounds_on_a_real_cluster() -> Result<()> {
    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let brokers = cluster.bootstrap().to_owned();
    let data = tempfile::tempdir()?;
    let history = data.path().display().to_string();
    let http = client();
    let start_all = || -> Result<Vec<Binary>> {
        Ok(vec![
            start_service(
                "ingest",
                &["ingest", "--brokers", &brokers, "--listen", "127.0.0.1:0"],
                announce::API,
            )?,
            start_service(
                "process",
                &[
                    "process",
                    "--brokers",
                    &brokers,
                    "--processors",
                    "workflow,deliveries,scheduling,tracking",
                    "--health-listen",
                    "127.0.0.1:0",
                ],
                announce::HEALTH,
            )?,
            start_service(
                "history",
                &[
                    "history",
                    "--brokers",
                    &brokers,
                    "--data",
                    &history,
                    "--health-listen",
                    "127.0.0.1:0",
                ],
                announce::HEALTH,
            )?,
        ])
    };
    let ready = |binary: &Binary, announce: &str| -> Result<String> {
        Ok(format!("http://{}/readyz", binary.announced(announce)?))
    };

    // Idle.
    let services = start_all()?;
    let sql = start_service(
        "sql-server",
        &[
            "sql-server",
            "--data",
            &history,
            "--listen",
            "127.0.0.1:0",
            "--flight-listen",
            "off",
        ],
        announce::SQL_SERVER,
    )?;
    for (binary, announce) in
        services
            .iter()
            .zip([announce::API, announce::HEALTH, announce::HEALTH])
    {
        eventually_contains(&http, &ready(binary, announce)?, "ready").await?;
    }
    // Long enough for the consumers to join their groups.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for binary in services.into_iter().chain([sql]) {
        stops_within(binary, Signal::Term, IDLE)?;
    }

    // Under load: the front first.
    let services = start_all()?;
    let api = format!("http://{}", services[0].announced(announce::API)?);
    let writer = Writer::start(
        &api,
        "stop-split",
        -20,
        3,
        50,
        Duration::from_millis(20),
        Duration::from_secs(10),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    for binary in services {
        stops_within(binary, Signal::Term, UNDER_LOAD)?;
    }
    let report = writer.finish().await?;
    assert!(
        report.accepted.len() >= 100,
        "the writer was not under way: {report:?}"
    );
    Ok(())
}
