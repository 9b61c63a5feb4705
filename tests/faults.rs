//! Faults under load on a real three-node Apache Kafka cluster: brokers killed, hung and
//! all stopped, processors and the history sink killed, a member of a group killed again
//! and again, a paused processor replaced while it hangs (a zombie), while a writer posts
//! batches with ids of its own. Each test ends with exact counts over the history: every
//! record answered as accepted is there exactly once, every delivery completes with its
//! events in order, and, processing being exactly-once on a cluster (Kafka transactions),
//! no event is repeated and no drone assigned twice. The figures of each run
//! (acknowledged, lost, duplicated, repeated, time to recover) are printed;
//! `cargo test --test faults -- --nocapture` shows them.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use schemas::topics;

mod common;
use common::kafka::{KafkaCluster, exclusive};
use common::service::{Guarantee, Options, Service, Topology};
use common::writer::{Writer, WriterReport};
use common::*;

/// The writer's own limit for one call: ingest must answer (202 or 503) well within it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pipeline may take to complete every delivery after the load.
const SETTLE_HISTORY: Duration = Duration::from_secs(180);
/// The processors, each its own consumer group.
const PROCESSORS: [&str; 4] = ["workflow", "scheduling", "tracking", "deliveries"];

/// One test's pipeline under load: the cluster, every service, the history's folder.
struct Run {
    topology: Topology,
    _dir: tempfile::TempDir,
    writer: Writer,
    guarantee: Guarantee,
}

impl Run {
    /// Starts the pipeline and the load: deliveries of owner `name` in regions west of
    /// `lon`, with the binary's default guarantee (exactly-once on a cluster).
    async fn start(name: &'static str, lon: i32) -> Result<Self> {
        Self::start_with(name, lon, Guarantee::Default, false).await
    }

    /// [`Run::start`] with `guarantee`; with `logs`, each service's stderr goes to a file
    /// of its own in the run's folder (see [`Service::log_text`]).
    async fn start_with(
        name: &'static str,
        lon: i32,
        guarantee: Guarantee,
        logs: bool,
    ) -> Result<Self> {
        let cluster = KafkaCluster::shared();
        // Whatever an earlier test did to the nodes, all of them run again.
        cluster.start_all()?;
        let (dir, data) = history_folder()?;
        let logs = if logs {
            let folder = dir.path().join("logs");
            std::fs::create_dir_all(&folder)?;
            Some(folder)
        } else {
            None
        };
        let topology =
            Topology::start_with(cluster.bootstrap(), &data, &[], Options { guarantee, logs })?;
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
            guarantee,
        })
    }

    /// Stops the load, checks what clients saw, waits until the history holds every
    /// accepted delivery completed, checks it exactly, prints the figures and stops the
    /// services. Exactly-once processing (the default) must also have repeated no event
    /// and assigned no drone twice.
    async fn finish(self, fault: Instant, client_rules: bool) -> Result<Figures> {
        let report = self.writer.finish().await?;
        if client_rules {
            check_clients(&report)?;
        }
        let figures = settle(&report.ids, &self.topology.data, &report, fault).await?;
        self.topology.stop_all()?;
        if self.guarantee.exactly_once_on_a_cluster() {
            figures.check_exactly_once(&report.ids)?;
        }
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
    /// Rows of `delivery_events` beyond the first for a `(delivery_id, seq)` (or a second
    /// stage at one `seq`).
    repeated_events: i64,
    /// Rows of `drone_assignments` beyond the first for a delivery.
    second_assignments: i64,
    /// Assignments of a drone made before the delivery it was assigned to just before
    /// had finished.
    double_booked_drones: i64,
    recovered_after: Duration,
    settled_after: Duration,
}

impl Figures {
    fn summary(&self) -> String {
        format!(
            "{} acknowledged, {} lost, {} duplicate rows; {} repeated events, {} second \
             assignments, {} drones assigned while busy; writes refused until {:.1} s after \
             the fault; every delivery completed {:.1} s after the load",
            self.accepted,
            self.lost,
            self.duplicate_rows,
            self.repeated_events,
            self.second_assignments,
            self.double_booked_drones,
            self.recovered_after.as_secs_f64(),
            self.settled_after.as_secs_f64()
        )
    }

    /// Exactly-once processing: no event repeated, no delivery assigned twice, no drone
    /// assigned while busy.
    fn check_exactly_once(&self, owner: &str) -> Result<()> {
        if self.repeated_events > 0 || self.second_assignments > 0 || self.double_booked_drones > 0
        {
            bail!(
                "{owner}: processing was not exactly-once: {} repeated events, {} second \
                 assignments, {} drones assigned while busy",
                self.repeated_events,
                self.second_assignments,
                self.double_booked_drones
            );
        }
        Ok(())
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
    // A drone assigned again before the delivery it had finished: the release that frees
    // a drone is written with its delivery's last event (Completed or Cancelled) and read
    // by the scheduler after it, both stamped by this machine's clock, so a later
    // assignment of the drone is never earlier than that event. A drone's assignments
    // share one partition (keyed by drone), in the order the scheduler made them.
    let double_booked_drones = history_scalar(
        data,
        &format!(
            "WITH assigned AS ( \
               SELECT delivery_id, assigned_at, \
                 lag(delivery_id) OVER (PARTITION BY drone_id \
                   ORDER BY kafka_partition, kafka_offset) AS previous \
               FROM drone_assignments WHERE delivery_id LIKE '{owner}-%'), \
             finished AS ( \
               SELECT delivery_id, min(at) AS at FROM delivery_events \
               WHERE delivery_id LIKE '{owner}-%' AND stage IN ('Completed', 'Cancelled') \
               GROUP BY delivery_id) \
             SELECT count(*) FROM assigned \
             LEFT JOIN finished ON finished.delivery_id = assigned.previous \
             WHERE assigned.previous IS NOT NULL \
               AND (finished.at IS NULL OR finished.at > assigned.assigned_at)"
        ),
    )
    .await?;
    let figures = Figures {
        accepted: accepted.len(),
        lost,
        duplicate_rows,
        repeated_events,
        second_assignments,
        double_booked_drones,
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

/// Each processor killed (SIGKILL) under load and started again with its instance id:
/// every delivery completes, and the history shows no repeated event and no second
/// assignment (the killed process's open transaction is aborted, its work done once by
/// its successor).
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
        for processor in PROCESSORS {
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
    outcome.map(drop)
}

/// Every processor runs as two members of its group; under load, the second member of
/// one group after another is killed (SIGKILL) and started again at once with its
/// instance id, every 2.5 s, so that each group loses a member three times (about once
/// per session timeout, so that each rebalance completes). Every delivery completes; no
/// drone is assigned twice and no event repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_members_killed_again_and_again_assigns_no_drone_twice() -> Result<()> {
    let _turn = exclusive().await;
    let mut run = Run::start("memberkill", -105).await?;
    for processor in PROCESSORS {
        run.topology.add(&format!("{processor}#2"))?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fault = Instant::now();
    for round in 0..12 {
        run.topology
            .restart(&format!("{}#2", PROCESSORS[round % PROCESSORS.len()]))?;
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
    run.finish(fault, true).await.map(drop)
}

/// The scheduler hangs (SIGSTOP) under load; a new process with the same instance id
/// starts and, once the hung member's session has timed out (10 s), holds its partitions.
/// Then the old process goes on (SIGCONT), a zombie: its writes are refused (its
/// transactional id was fenced), so it logs `fenced` and exits with a failure, within a
/// minute; and the history shows no repeated event and no second assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_scheduler_resumed_after_its_replacement_took_over_is_fenced() -> Result<()> {
    let _turn = exclusive().await;
    let mut run = Run::start_with("zombie", -110, Guarantee::Default, true).await?;
    let http = client();
    let mut zombie = run.topology.detach("scheduling")?;
    let fault = Instant::now();
    zombie.pause()?;
    run.topology.add("scheduling")?;
    let replacement = run.topology.service("scheduling")?;
    let metrics = format!("http://{}/metrics", replacement.addresses()[0]);
    // The replacement holds a partition of the group once it reports its lag (every 10 s).
    let holds = format!("group=\"{}\"", topics::groups::SCHEDULING);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, body) = call_bytes(&http, "GET", &metrics, &[], Vec::new()).await?;
        let body = String::from_utf8_lossy(&body);
        if body
            .lines()
            .any(|l| l.starts_with("kafka_consumer_lag{") && l.contains(&holds))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the replacement holds no partition of its group after 60 s: {body}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "zombie: the replacement took over {:.1} s after the pause",
        fault.elapsed().as_secs_f64()
    );
    // It works for a while before the zombie goes on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    zombie.resume()?;
    let resumed = Instant::now();
    let verdict =
        tokio::task::block_in_place(|| zombie_is_fenced(&mut zombie, Duration::from_secs(60)));
    eprintln!(
        "zombie, {:.1} s after it was resumed: {}",
        resumed.elapsed().as_secs_f64(),
        match &verdict {
            Ok(()) => "fenced, and exited".to_owned(),
            Err(e) => format!("{e:#}"),
        }
    );
    if verdict.is_err() {
        let log = zombie.log_text()?;
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("zombie's log, last lines first: {tail:#?}");
        // Still running: it is not left to share the work.
        zombie.kill()?;
    }
    let finished = run.finish(fault, true).await;
    match (verdict, finished) {
        (Ok(()), Ok(_)) => Ok(()),
        (Err(zombie), Ok(_)) => Err(zombie),
        (Ok(()), Err(history)) => Err(history),
        (Err(zombie), Err(history)) => bail!("{zombie:#}; and {history:#}"),
    }
}

/// The zombie exits within `limit`, with a failure, having logged `fenced`.
fn zombie_is_fenced(zombie: &mut Service, limit: Duration) -> Result<()> {
    let Some(status) = zombie.exited_within(limit)? else {
        bail!("the zombie still runs {limit:?} after it was resumed");
    };
    let log = zombie.log_text()?;
    if status.success() {
        bail!("the zombie exited successfully ({status}), not fenced");
    }
    if !log.contains("fenced") {
        bail!("the zombie exited ({status}) without logging `fenced`: {log}");
    }
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
