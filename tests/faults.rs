//! Faults under load on a real three-node Apache Kafka cluster: brokers killed, hung and
//! all stopped, processors and the history sink killed, while a writer posts batches
//! with ids of its own. Each test ends with exact counts over the history: every record
//! answered as accepted is there exactly once, and every delivery completes with its
//! events in order. The figures of each run (acknowledged, lost, duplicated, time to
//! recover) are printed; `cargo test --test faults -- --nocapture` shows them.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use schemas::topics;

mod common;
use common::kafka::{KafkaCluster, exclusive};
use common::service::Topology;
use common::writer::{Writer, WriterReport};
use common::*;

/// The writer's own limit for one call: ingest must answer (202 or 503) well within it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pipeline may take to complete every delivery after the load.
const SETTLE_HISTORY: Duration = Duration::from_secs(180);

/// One test's pipeline under load: the cluster, every service, the history's folder.
struct Run {
    topology: Topology,
    _dir: tempfile::TempDir,
    writer: Writer,
}

impl Run {
    /// Starts the pipeline and the load: deliveries of owner `name` in regions west of
    /// `lon`.
    async fn start(name: &'static str, lon: i32) -> Result<Self> {
        let cluster = KafkaCluster::shared();
        // Whatever an earlier test did to the nodes, all of them run again.
        cluster.start_all()?;
        let (dir, data) = history_folder()?;
        let topology = Topology::start(cluster.bootstrap(), &data, &[])?;
        let writer = Writer::start(
            &topology.api,
            name,
            lon,
            2,
            10,
            Duration::from_millis(200),
            CLIENT_TIMEOUT,
        );
        // The load runs for a while before the fault.
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(Self {
            topology,
            _dir: dir,
            writer,
        })
    }

    /// Stops the load, checks what clients saw, waits until the history holds every
    /// accepted delivery completed, checks it exactly, prints the figures and stops the
    /// services.
    async fn finish(self, fault: Instant, client_rules: bool) -> Result<Figures> {
        let report = self.writer.finish().await?;
        if client_rules {
            check_clients(&report)?;
        }
        let figures = settle(&report.ids, &self.topology.data, &report, fault).await?;
        self.topology.stop_all()?;
        Ok(figures)
    }
}

/// During a fault clients get 202 or 503 with Retry-After, never another 5xx, and never
/// wait past their own timeout.
fn check_clients(report: &WriterReport) -> Result<()> {
    if report.accepted.is_empty() {
        bail!("nothing was accepted: {report:?}");
    }
    if report.server_errors() > 0 || report.unavailable_without_retry_after > 0 {
        bail!("clients got errors other than 503 with Retry-After: {report:?}");
    }
    if report.timeouts > 0 || report.transport_errors > 0 {
        bail!("clients waited past their timeout or lost connections: {report:?}");
    }
    for status in report.by_status.keys() {
        if ![202, 207, 503].contains(status) {
            bail!("unexpected answer {status}: {report:?}");
        }
    }
    Ok(())
}

/// What one fault cost.
#[derive(Debug)]
struct Figures {
    accepted: usize,
    lost: usize,
    duplicate_rows: i64,
    repeated_events: i64,
    second_assignments: i64,
    recovered_after: Duration,
    settled_after: Duration,
}

impl Figures {
    fn summary(&self) -> String {
        format!(
            "{} acknowledged, {} lost, {} duplicate rows; {} repeated events, {} second \
             assignments; writes refused until {:.1} s after the fault; every delivery \
             completed {:.1} s after the load",
            self.accepted,
            self.lost,
            self.duplicate_rows,
            self.repeated_events,
            self.second_assignments,
            self.recovered_after.as_secs_f64(),
            self.settled_after.as_secs_f64()
        )
    }
}

fn rank(stage: &str) -> u8 {
    match stage {
        "Created" => 0,
        "Rescheduled" => 1,
        "HeadedToPickup" => 2,
        "HeadedToDropoff" => 3,
        "Completed" | "Cancelled" => 4,
        _ => u8::MAX,
    }
}

/// Waits until every accepted delivery of `owner` has completed in the history, then
/// checks the history exactly: every accepted request once, nothing lost, and each
/// delivery's events in order.
async fn settle(owner: &str, data: &str, report: &WriterReport, fault: Instant) -> Result<Figures> {
    let accepted = &report.accepted;
    let started = Instant::now();
    let completed_sql = format!(
        "SELECT DISTINCT delivery_id FROM delivery_events \
         WHERE delivery_id LIKE '{owner}-%' AND stage = 'Completed'"
    );
    let deadline = started + SETTLE_HISTORY;
    loop {
        let completed: BTreeSet<String> = history_strings(data, &completed_sql)
            .await?
            .into_iter()
            .collect();
        let ids: BTreeSet<String> = history_strings(
            data,
            &format!(
                "SELECT delivery_id FROM delivery_requests WHERE delivery_id LIKE '{owner}-%'"
            ),
        )
        .await?
        .into_iter()
        .collect();
        if accepted.is_subset(&completed) && accepted.is_subset(&ids) {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = accepted.difference(&ids).take(10).collect();
            bail!(
                "{owner}: after {SETTLE_HISTORY:?} the history has {} of {} accepted requests \
                 (missing e.g. {missing:?}) and {} of them completed; {}",
                accepted.intersection(&ids).count(),
                accepted.len(),
                accepted.intersection(&completed).count(),
                unfinished_deliveries(data, owner, 10).await?
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let settled_after = started.elapsed();

    let rows = history_strings(
        data,
        &format!("SELECT delivery_id FROM delivery_requests WHERE delivery_id LIKE '{owner}-%'"),
    )
    .await?;
    let distinct: BTreeSet<&String> = rows.iter().collect();
    let duplicate_rows = i64::try_from(rows.len() - distinct.len())?;
    let lost = accepted.iter().filter(|id| !distinct.contains(id)).count();

    // Each delivery's stages, by sequence number, never go back.
    let events = history_strings(
        data,
        &format!(
            "SELECT concat(delivery_id, ' ', CAST(seq AS VARCHAR), ' ', stage) FROM delivery_events \
             WHERE delivery_id LIKE '{owner}-%'"
        ),
    )
    .await?;
    let mut by_delivery: BTreeMap<String, BTreeMap<i64, BTreeSet<String>>> = BTreeMap::new();
    let mut repeated_events = 0i64;
    for line in &events {
        let mut parts = line.split(' ');
        let (id, seq, stage) = (
            parts.next().context("id")?,
            parts.next().context("seq")?.parse::<i64>()?,
            parts.next().context("stage")?,
        );
        let stages = by_delivery
            .entry(id.to_owned())
            .or_default()
            .entry(seq)
            .or_default();
        if !stages.insert(stage.to_owned()) || stages.len() > 1 {
            repeated_events += 1;
        }
    }
    for id in accepted {
        let seqs = by_delivery
            .get(id)
            .with_context(|| format!("{id} has no events"))?;
        let order: Vec<u8> = seqs
            .values()
            .map(|stages| stages.iter().map(|s| rank(s)).max().unwrap_or(0))
            .collect();
        if order.first() != Some(&0) || order.last() != Some(&4) || !order.is_sorted() {
            bail!("{id}: events out of order or incomplete: {seqs:?}");
        }
    }
    let second_assignments = history_scalar(
        data,
        &format!(
            "SELECT count(*) - count(DISTINCT delivery_id) FROM drone_assignments \
             WHERE delivery_id LIKE '{owner}-%'"
        ),
    )
    .await?;
    let figures = Figures {
        accepted: accepted.len(),
        lost,
        duplicate_rows,
        repeated_events,
        second_assignments,
        recovered_after: report.recovered_after(fault),
        settled_after,
    };
    eprintln!(
        "{owner}: {}; clients: {:?}",
        figures.summary(),
        report.by_status
    );
    if figures.lost > 0 || figures.duplicate_rows > 0 {
        bail!("{owner}: the history is not exactly the accepted records: {figures:?}");
    }
    Ok(figures)
}

/// Sets a topic's configs, trying again for a while: right after brokers came back the
/// cluster may not take AlterConfigs yet.
async fn alter_soon(
    settings: &bus::ClientSettings,
    topic: &str,
    configs: &[(&str, &str)],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match bus::alter_topic(settings, topic, configs).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("altering {topic}: {e}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The node leading most partitions of `delivery-requests`.
async fn leader_of_most_requests(cluster: &KafkaCluster) -> Result<usize> {
    let described =
        bus::describe_topics(&cluster.settings(), &[topics::DELIVERY_REQUESTS.name]).await?;
    let mut leads: BTreeMap<i32, usize> = BTreeMap::new();
    for p in &described[0].partitions {
        *leads.entry(p.leader).or_default() += 1;
    }
    let (leader, _) = leads
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .context("no partition has a leader")?;
    cluster.node_of_broker(leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_of_most_request_partitions_loses_no_acknowledged_record() -> Result<()>
{
    let _turn = exclusive().await;
    let run = Run::start("leaderkill", -80).await?;
    let cluster = KafkaCluster::shared();
    let node = leader_of_most_requests(cluster).await?;
    let fault = Instant::now();
    cluster.kill(node)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.restart(node)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.finish(fault, true).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_broker_loses_no_acknowledged_record() -> Result<()> {
    let _turn = exclusive().await;
    let run = Run::start("leaderpause", -85).await?;
    let cluster = KafkaCluster::shared();
    let node = leader_of_most_requests(cluster).await?;
    let fault = Instant::now();
    cluster.pause(node)?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    cluster.resume(node)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.finish(fault, true).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_brokers_down_for_ten_seconds_means_503_and_recovery_without_restarts() -> Result<()> {
    let _turn = exclusive().await;
    let run = Run::start("alldown", -90).await?;
    let cluster = KafkaCluster::shared();
    let http = client();
    let fault = Instant::now();
    for node in 1..=cluster.nodes() {
        cluster.kill(node)?;
    }
    // While they are down: writes get 503 with Retry-After, and the tier is not ready.
    let ready_url = format!("{}/readyz", run.topology.api);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = call_bytes(&http, "GET", &ready_url, &[], Vec::new()).await?;
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still answers {status}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let url = format!("{}/api/deliveryrequests", run.topology.api);
    let request = request_in(0, "probe-alldown", "probe-alldown", -90);
    let (status, headers, body) = post_json(&http, &url, &request).await?;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    let down_for = fault.elapsed();
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_for)).await;
    cluster.start_all()?;
    // Everything recovers by itself: readiness, writes, and the whole pipeline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, _) = call_bytes(&http, "GET", &ready_url, &[], Vec::new()).await?;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never recovered");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.finish(fault, true).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_processors_restart_and_every_delivery_completes() -> Result<()> {
    let _turn = exclusive().await;
    // The restarted processors restore from changelogs that the cleaner compacts while
    // the test runs (segments roll every second), not from their whole history.
    let cluster = KafkaCluster::shared();
    cluster.start_all()?;
    let settings = cluster.settings();
    bus::ensure_topics(&settings, &topics::ALL).await?;
    let changelogs = [
        topics::DELIVERY_STATE.name,
        topics::SCHEDULING_STATE.name,
        topics::TRACKING_STATE.name,
    ];
    for changelog in changelogs {
        alter_soon(
            &settings,
            changelog,
            &[
                ("cleanup.policy", "compact"),
                ("segment.ms", "1000"),
                ("min.cleanable.dirty.ratio", "0.01"),
            ],
        )
        .await?;
    }
    let outcome = async {
        let mut run = Run::start("processorkill", -95).await?;
        let fault = Instant::now();
        for processor in ["workflow", "scheduling", "tracking", "deliveries"] {
            run.topology.kill(processor)?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            run.topology.add(processor)?;
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        run.finish(fault, true).await
    }
    .await;
    // The changelogs get their settings back whatever happened.
    for changelog in changelogs {
        alter_soon(&settings, changelog, &[("cleanup.policy", "compact")]).await?;
    }
    let figures = outcome?;
    // At-least-once processing: kills may repeat work. The figure is the point here.
    eprintln!(
        "processor kills: {} second assignments, {} repeated events",
        figures.second_assignments, figures.repeated_events
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_sink_killed_five_times_ends_with_exactly_the_accepted_rows() -> Result<()> {
    let _turn = exclusive().await;
    let mut run = Run::start("sinkkill", -100).await?;
    // Random moments, from a seed that is printed so that a failure can be replayed.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos() as u64;
    eprintln!("sink kill moments: seed {seed}");
    let mut state = seed | 1;
    let fault = Instant::now();
    for _ in 0..5 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        tokio::time::sleep(Duration::from_millis(500 + state % 3_000)).await;
        run.topology.kill("history")?;
        run.topology.add("history")?;
    }
    run.finish(fault, true).await?;
    Ok(())
}
