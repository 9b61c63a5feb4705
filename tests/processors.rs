//! The stream processors end to end on the embedded broker, in this process: HTTP
//! ingestion with the status routes, the workflow, the scheduling, tracking and delivery
//! consumers, and the drone simulator flying the drones through the HTTP API.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bus::{ClientSettings, Consumer, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
use schemas::headers as h;
use schemas::topics;
use schemas::tracking::{Assignment, DeliveryEvent, Stage};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod common;
use common::*;

const STAGES: [Stage; 4] = [
    Stage::Created,
    Stage::HeadedToPickup,
    Stage::HeadedToDropoff,
    Stage::Completed,
];

/// The embedded broker, the ingestion tier with its status view, and the simulator.
struct Stack {
    broker: EmbeddedBroker,
    settings: ClientSettings,
    producer: Producer,
    base: String,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// One set of processors (workflow and the stateful consumers) that can be stopped.
struct Processors {
    stop: CancellationToken,
    workflow: JoinHandle<processors::Result<()>>,
    stateful: JoinHandle<processors::Result<()>>,
}

impl Processors {
    /// Stops them abruptly, mid-batch, as a crash would (no final commit).
    async fn abort(self) {
        self.workflow.abort();
        self.stateful.abort();
        let _ = self.workflow.await;
        let _ = self.stateful.await;
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        tokio::time::timeout(SETTLE, self.workflow).await???;
        tokio::time::timeout(SETTLE, self.stateful).await???;
        Ok(())
    }
}

impl Stack {
    async fn start() -> Result<Self> {
        let broker = EmbeddedBroker::start(1, &topics::ALL)?;
        let settings = ClientSettings::plain(broker.bootstrap_servers());
        let producer = Producer::new(&settings, &ProducerArgs::default())?;
        let stop = CancellationToken::new();
        let view = ingest::StatusView::start(
            settings.clone(),
            100_000,
            ingest::StatusLimits::default(),
            stop.clone(),
        );
        let server = ingest::Ingest::bind(
            ingest::IngestConfig {
                http: ingest::HttpServerArgs {
                    listen: "127.0.0.1:0".parse()?,
                    ..Default::default()
                },
                ..Default::default()
            },
            producer.clone(),
        )
        .await?
        .with_status(view);
        let base = format!("http://{}", server.local_addr()?);
        let mut tasks = Vec::new();
        let ingest_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let _ = server.run(ingest_stop).await;
        }));
        let simulator = processors::simulator::SimulatorArgs {
            target: base.clone(),
            speedup: 20_000.0,
            tick_ms: 20,
            ..Default::default()
        };
        let (sim_settings, sim_stop) = (settings.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let _ = processors::simulator::run(simulator, sim_settings, sim_stop).await;
        }));
        Ok(Self {
            broker,
            settings,
            producer,
            base,
            stop,
            tasks,
        })
    }

    fn processors(&self) -> Processors {
        self.processors_with(processors::StatefulArgs::default())
    }

    fn processors_with(&self, args: processors::StatefulArgs) -> Processors {
        let stop = CancellationToken::new();
        let workflow = tokio::spawn(processors::workflow::run(
            processors::workflow::WorkflowArgs::default(),
            self.settings.clone(),
            processors::guarantee::Durability::at_least_once(
                self.settings.clone(),
                self.producer.clone(),
            ),
            stop.clone(),
        ));
        let stateful = tokio::spawn(processors::run_stateful(
            args,
            processors::Processor::ALL.to_vec(),
            self.settings.clone(),
            processors::guarantee::Durability::at_least_once(
                self.settings.clone(),
                self.producer.clone(),
            ),
            stop.clone(),
        ));
        Processors {
            stop,
            workflow,
            stateful,
        }
    }

    /// Another set of the stateful consumers only (a second member of each group).
    fn stateful_only(&self) -> Processors {
        let stop = CancellationToken::new();
        let workflow = tokio::spawn(async { Ok(()) });
        let stateful = tokio::spawn(processors::run_stateful(
            processors::StatefulArgs::default(),
            processors::Processor::ALL.to_vec(),
            self.settings.clone(),
            processors::guarantee::Durability::at_least_once(
                self.settings.clone(),
                self.producer.clone(),
            ),
            stop.clone(),
        ));
        Processors {
            stop,
            workflow,
            stateful,
        }
    }

    /// Posts requests `ids` (as `deliveryId`s) in one batch.
    async fn post(&self, ids: &[String]) -> Result<()> {
        let records: Vec<String> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let mut r = valid_request(i % 20);
                r["deliveryId"] = serde_json::json!(id);
                r.to_string()
            })
            .collect();
        let (status, _, report) = call(
            &client(),
            "POST",
            &format!("{}/api/deliveryrequests/batch", self.base),
            &[("content-type", "application/json")],
            format!("[{}]", records.join(",")).into_bytes(),
        )
        .await?;
        if status != 202 {
            bail!("batch answered {status}: {report}");
        }
        Ok(())
    }

    /// Waits until every delivery in `ids` is at `stage` or past it on the status route
    /// (simulated flights are fast: a stage may last less than a poll).
    async fn wait_for(&self, ids: &[String], stage: Stage) -> Result<()> {
        let client = client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut pending: BTreeSet<&String> = ids.iter().collect();
        while !pending.is_empty() {
            let mut done = Vec::new();
            for id in &pending {
                let url = format!("{}/api/deliveries/{id}/status", self.base);
                let (status, _, body) = call(&client, "GET", &url, &[], Vec::new()).await?;
                let reached = serde_json::from_value::<Stage>(body["stage"].clone())
                    .is_ok_and(|at| rank(at) >= rank(stage));
                if status == 200 && reached {
                    done.push(*id);
                }
            }
            for id in done {
                pending.remove(id);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} deliveries never reached {stage:?}: {pending:?}",
                    pending.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Every record of `topic` until a quiet second after `until` says it has enough.
    async fn read(
        &self,
        topic: &str,
        until: impl Fn(&[(String, Vec<u8>, Vec<(String, Vec<u8>)>)]) -> bool,
    ) -> Result<Vec<(String, Vec<u8>, Vec<(String, Vec<u8>)>)>> {
        let reader = Consumer::subscribe(
            &self.settings,
            &format!("reader-{}", uuid::Uuid::new_v4()),
            &[topic],
        )?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let enough = until(&out);
            let wait = if enough {
                tokio::time::Instant::now() + Duration::from_secs(1)
            } else {
                deadline
            };
            match tokio::time::timeout_at(wait, reader.recv()).await {
                Ok(record) => {
                    let record = record?;
                    out.push((
                        String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned(),
                        record.payload().unwrap_or_default().to_vec(),
                        record
                            .headers()
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.to_vec()))
                            .collect(),
                    ));
                }
                Err(_) if enough => return Ok(out),
                Err(_) => bail!("{topic}: only {} records arrived", out.len()),
            }
        }
    }

    /// Each delivery's events (the stage changes on `delivery-state`), in the order they
    /// are on the topic.
    async fn events(&self, n: usize) -> Result<BTreeMap<String, Vec<DeliveryEvent>>> {
        let records = self
            .read(topics::DELIVERY_STATE.name, |got| {
                got.iter()
                    .filter(|(_, payload, _)| stage_event(payload).is_some())
                    .count()
                    >= n * STAGES.len()
            })
            .await?;
        let mut by_key: BTreeMap<String, Vec<DeliveryEvent>> = BTreeMap::new();
        for (key, payload, _) in records {
            if let Some(event) = stage_event(&payload) {
                by_key.entry(key).or_default().push(event);
            }
        }
        Ok(by_key)
    }

    /// How many assignments each delivery got.
    async fn assignments(&self, n: usize) -> Result<BTreeMap<String, usize>> {
        let records = self
            .read(topics::DRONE_ASSIGNMENTS.name, |got| got.len() >= n)
            .await?;
        let mut count = BTreeMap::new();
        for (_, payload, _) in records {
            let a: Assignment = serde_json::from_slice(&payload)?;
            *count.entry(a.delivery_key).or_insert(0) += 1;
        }
        Ok(count)
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(SETTLE, task).await??;
        }
        drop(self.broker);
        Ok(())
    }
}

/// The event of a `delivery-state` record that is a stage change (not a position, a
/// tombstone, an offset marker or a waiting record).
fn stage_event(payload: &[u8]) -> Option<DeliveryEvent> {
    let state: schemas::tracking::DeliveryState = serde_json::from_slice(payload).ok()?;
    (state.change == Some(schemas::tracking::EventKind::Stage)).then(|| DeliveryEvent::of(&state))
}

/// A stage's place on the way to completion.
fn rank(stage: Stage) -> u8 {
    match stage {
        Stage::Created => 0,
        Stage::Rescheduled => 1,
        Stage::HeadedToPickup => 2,
        Stage::HeadedToDropoff => 3,
        Stage::Completed | Stage::Cancelled => 4,
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Every delivery's events are the four stages, with seq 1 to 4, in order, once.
fn check_stages(events: &BTreeMap<String, Vec<DeliveryEvent>>, ids: &[String]) -> Result<()> {
    check_stages_with(events, ids, false)
}

/// The same, allowing repeats of an event (same seq, same stage) after a crash.
fn check_stages_with(
    events: &BTreeMap<String, Vec<DeliveryEvent>>,
    ids: &[String],
    allow_repeats: bool,
) -> Result<()> {
    for id in ids {
        let key = format!("default/{id}");
        let list = events
            .get(&key)
            .with_context(|| format!("no events for {key}"))?;
        let mut stages: Vec<(u32, Stage)> = list.iter().map(|e| (e.seq, e.stage)).collect();
        if allow_repeats {
            stages.sort_by_key(|(seq, _)| *seq);
            stages.dedup();
        }
        let expected: Vec<(u32, Stage)> = (1..).zip(STAGES).collect();
        if stages != expected {
            bail!("{key}: {stages:?}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_reaches_completed_with_every_transition_in_order() -> Result<()> {
    let stack = Stack::start().await?;
    let processors = stack.processors();
    let ids = ids("e2e", 24);
    stack.post(&ids).await?;
    stack.wait_for(&ids, Stage::Completed).await?;
    let events = stack.events(ids.len()).await?;
    check_stages(&events, &ids)?;
    // The delivery route shows the drone; another tenant's id is a 404.
    let (status, _, body) = call(
        &client(),
        "GET",
        &format!("{}/api/deliveries/{}", stack.base, ids[0]),
        &[],
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 200);
    assert!(body["droneId"].as_str().is_some(), "{body}");
    assert!(body["pickupETA"].as_str().is_some() && body["deliveryETA"].as_str().is_some());
    let (status, _, _) = call(
        &client(),
        "GET",
        &format!("{}/api/deliveries/nobody/status", stack.base),
        &[],
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 404);
    processors.stop().await?;
    stack.stop().await
}

/// Members that take over partitions restore and tick them even when no record of them
/// comes: a delivery completed before the restart is forgotten once its retention
/// passed, with no later record on its partition. The retention is half of `SETTLE`:
/// long enough that a loaded machine still finds the delivery kept at the restart,
/// short enough that its end comes well within the wait after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_without_traffic_are_restored_and_ticked_after_an_assignment() -> Result<()> {
    let stack = Stack::start().await?;
    let args = processors::StatefulArgs {
        finished_retention: SETTLE / 2,
        ..processors::StatefulArgs::default()
    };
    let first = stack.processors_with(args.clone());
    let ids = ids("quiet", 1);
    stack.post(&ids).await?;
    stack.wait_for(&ids, Stage::Completed).await?;
    // The drone's last fixes after the drop-off reach the delivery consumer within
    // milliseconds: handled (and committed) here, they bring no record to the next one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.stop().await?;
    let url = format!("{}/api/deliveries/{}/status", stack.base, ids[0]);
    let (status, _, body) = call(&client(), "GET", &url, &[], Vec::new()).await?;
    assert_eq!(status, 200, "kept for its retention: {body}");
    let second = stack.processors_with(args);
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let (status, _, _) = call(&client(), "GET", &url, &[], Vec::new()).await?;
        if status == 404 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the completed delivery is still kept {SETTLE:?} after the restart");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    second.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_stopped_mid_stream_and_replaced_lose_nothing_and_schedule_nothing_twice()
-> Result<()> {
    let stack = Stack::start().await?;
    let first = stack.processors();
    let before = ids("before", 16);
    stack.post(&before).await?;
    // Some deliveries are under way when the processors go.
    stack.wait_for(&before[..1], Stage::HeadedToPickup).await?;
    first.stop().await?;
    let after = ids("after", 16);
    stack.post(&after).await?;
    let second = stack.processors();
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    stack.wait_for(&all, Stage::Completed).await?;
    let events = stack.events(all.len()).await?;
    check_stages(&events, &all)?;
    let assignments = stack.assignments(all.len()).await?;
    assert_eq!(assignments.len(), all.len());
    assert!(
        assignments.values().all(|n| *n == 1),
        "scheduled twice: {assignments:?}"
    );
    second.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_of_each_group_share_the_partitions_and_process_everything_once() -> Result<()>
{
    let stack = Stack::start().await?;
    let one = stack.processors();
    let first = ids("shared-a", 12);
    stack.post(&first).await?;
    stack.wait_for(&first[..1], Stage::HeadedToPickup).await?;
    // The second member joins while the first is busy: partitions move under traffic.
    let two = stack.stateful_only();
    let second = ids("shared-b", 12);
    stack.post(&second).await?;
    let ids: Vec<String> = first.iter().chain(&second).cloned().collect();
    stack.wait_for(&ids, Stage::Completed).await?;
    let events = stack.events(ids.len()).await?;
    check_stages(&events, &ids)?;
    let assignments = stack.assignments(ids.len()).await?;
    assert!(assignments.values().all(|n| *n == 1), "{assignments:?}");
    one.stop().await?;
    two.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_become_dead_letters_and_their_partitions_keep_flowing() -> Result<()> {
    let stack = Stack::start().await?;
    let processors = stack.processors();
    let requested = [(h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes())];
    // On the same keys as a good delivery that follows: the same partitions.
    // A poison request on `delivery-requests` (the tier would refuse it): the workflow
    // skips it and the delivery consumer dead-letters it, once.
    for (topic, key, payload, headers) in [
        (
            topics::DELIVERY_REQUESTS.name,
            "default/good-1",
            &b"{not json"[..],
            &requested[..],
        ),
        (
            topics::DELIVERIES.name,
            "default/good-1",
            &b"{}"[..],
            &[(h::EVENT_TYPE, &b"Teleported"[..])][..],
        ),
        (
            topics::DRONE_SCHEDULING.name,
            "47:-123",
            &b"{not json"[..],
            &requested[..],
        ),
    ] {
        stack
            .producer
            .send_and_wait(OutRecord {
                topic,
                key: key.as_bytes(),
                payload,
                headers,
            })
            .await?;
    }
    let good = vec!["good-1".to_owned()];
    stack.post(&good).await?;
    stack.wait_for(&good, Stage::Completed).await?;
    let dead = stack
        .read(topics::DEAD_LETTERS.name, |got| got.len() >= 3)
        .await?;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reasons: Vec<String> = dead
        .iter()
        .map(|(_, _, headers)| {
            headers
                .iter()
                .find(|(k, _)| k == h::DEAD_LETTER_REASON)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("invalid delivery request")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown event type Teleported")),
        "{reasons:?}"
    );
    assert!(
        dead.iter()
            .all(|(_, payload, _)| payload == b"{not json" || payload == b"{}")
    );
    processors.stop().await?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_killed_mid_batch_lose_no_delivery() -> Result<()> {
    let stack = Stack::start().await?;
    let first = stack.processors();
    let ids = ids("crash", 24);
    stack.post(&ids).await?;
    stack.wait_for(&ids[..1], Stage::HeadedToPickup).await?;
    first.abort().await;
    let second = stack.processors();
    stack.wait_for(&ids, Stage::Completed).await?;
    // A crash may repeat an event (same seq), never lose or reorder one.
    let events = stack.events(ids.len()).await?;
    check_stages_with(&events, &ids, true)?;
    second.stop().await?;
    stack.stop().await
}

/// `dronedelivery run` on its embedded broker (no simulated drones) with a short
/// finished retention and a one-request queue per region.
struct Run {
    binary: common::binary::Binary,
    base: String,
    brokers: String,
    _data: tempfile::TempDir,
}

impl Run {
    fn start(extra: &[&str]) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let binary = common::binary::Launch::new("run")
            .args(["run", "--listen", "127.0.0.1:0", "--flight-listen", "off"])
            .args(["--roll-interval-ms", "300"])
            .args(extra)
            .arg("--data")
            .arg(data.path())
            .start(&[
                dronedelivery::announce::API,
                dronedelivery::announce::EMBEDDED_BROKER,
            ])?;
        let base = format!("http://{}", binary.announced(dronedelivery::announce::API)?);
        let brokers = binary
            .announced(dronedelivery::announce::EMBEDDED_BROKER)?
            .to_owned();
        Ok(Self {
            binary,
            base,
            brokers,
            _data: data,
        })
    }

    /// Posts one request: `weight` kg of a `size` package picked up at `pickup`, due by
    /// `deadline`.
    async fn request(
        &self,
        id: &str,
        pickup: &str,
        size: &str,
        weight: f64,
        deadline: &str,
    ) -> Result<()> {
        let mut r = valid_request(0);
        r["deliveryId"] = serde_json::json!(id);
        r["pickupLocation"] = serde_json::json!(pickup);
        r["dropOffLocation"] = serde_json::json!(pickup);
        r["pickupTime"] = serde_json::json!(chrono::Utc::now().to_rfc3339());
        r["deadline"] = serde_json::json!(deadline);
        r["packageInfo"]["size"] = serde_json::json!(size);
        r["packageInfo"]["weight"] = serde_json::json!(weight);
        let url = format!("{}/api/deliveryrequests", self.base);
        let (status, _, body) = post(&client(), &url, &r).await?;
        if status != 202 {
            bail!("{id}: {status} {body}");
        }
        Ok(())
    }

    /// The status of `id`: HTTP status and body.
    async fn status(&self, id: &str) -> Result<(u16, serde_json::Value)> {
        let url = format!("{}/api/deliveries/{id}/status", self.base);
        let (status, _, body) = call(&client(), "GET", &url, &[], Vec::new()).await?;
        Ok((status, body))
    }

    /// Polls the status of `id` until `done` says so.
    async fn wait_status(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let (status, body) = self.status(id).await?;
            if done(status, &body) {
                return Ok(body);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{id} never {what}: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rows of `query` from the history, once `enough` says they are all there.
    async fn sql(
        &self,
        query: &str,
        enough: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<Vec<serde_json::Value>> {
        let url = format!("{}/api/sql", self.base);
        let body = serde_json::to_vec(&serde_json::json!({ "sql": query }))?;
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let (status, _, answer) = call(&client(), "POST", &url, &[], body.clone()).await?;
            if status != 200 {
                bail!("{query}: {status} {answer}");
            }
            let rows = answer.as_array().cloned().unwrap_or_default();
            if enough(&rows) {
                return Ok(rows);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{query}: only {rows:?}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn cancelled_with(reason: &'static str) -> impl Fn(u16, &serde_json::Value) -> bool {
    move |status, body| {
        status == 200 && body["stage"] == "Cancelled" && body["cancelReason"] == reason
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_deliveries_go_after_the_retention_and_full_or_late_requests_are_cancelled()
-> Result<()> {
    // The retention is long enough that a loaded machine, whose consumers can fall
    // seconds behind (a cancel handled past its retention in event time is forgotten at
    // once), still shows the cancelled state before it goes.
    let run = Run::start(&[
        "--finished-retention",
        "20s",
        "--max-waiting-per-region",
        "1",
    ])?;
    let later = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    // A delivery cancelled by its tenant: kept for the retention, then 404.
    run.request("kept-1", "20.5,20.5", "Small", 1.0, &later)
        .await?;
    run.wait_status("kept-1", "created", |s, b| {
        s == 200 && b["stage"] == "Created"
    })
    .await?;
    let url = format!("{}/api/deliveryrequests/kept-1", run.base);
    let (status, _, _) = call(&client(), "DELETE", &url, &[], Vec::new()).await?;
    assert_eq!(status, 202);
    let started = tokio::time::Instant::now();
    run.wait_status("kept-1", "cancelled", cancelled_with("ByTenant"))
        .await?;
    run.wait_status("kept-1", "forgotten", |s, _| s == 404)
        .await?;
    assert!(
        started.elapsed() >= Duration::from_secs(15),
        "kept for its retention"
    );
    // Its history stays.
    let rows = run
        .sql(
            "SELECT stage, seq FROM delivery_events WHERE delivery_id = 'kept-1' ORDER BY seq",
            |rows| rows.len() >= 2,
        )
        .await?;
    let stages: Vec<&str> = rows.iter().filter_map(|r| r["stage"].as_str()).collect();
    assert_eq!(stages, ["Created", "Cancelled"]);

    // Region 10:10 has two large drones and room for one waiting request; no drone flies.
    // Requests of different deliveries reach the scheduler in any order: each waits for
    // the one before.
    for id in ["big-1", "big-2"] {
        run.request(id, "10.5,10.5", "Large", 20.0, &later).await?;
        run.wait_status(id, "assigned", |s, b| {
            s == 200 && b["stage"] == "HeadedToPickup"
        })
        .await?;
    }
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(8)).to_rfc3339();
    run.request("big-late", "10.5,10.5", "Large", 20.0, &soon)
        .await?;
    // It waits (nothing tells it apart from one not scheduled yet: give it the time).
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.request("big-full", "10.5,10.5", "Large", 20.0, &later)
        .await?;
    let full = run
        .wait_status("big-full", "refused", cancelled_with("QueueFull"))
        .await?;
    assert!(
        full["cancelDetail"]
            .as_str()
            .is_some_and(|d| d.contains("10:10")),
        "{full}"
    );
    run.wait_status("big-late", "expired", cancelled_with("DeadlinePassed"))
        .await?;
    for id in ["big-1", "big-2"] {
        let (status, body) = run.status(id).await?;
        assert_eq!(
            (status, &body["stage"]),
            (200, &serde_json::json!("HeadedToPickup"))
        );
    }
    // The reasons are on the events (the stage changes on delivery-state) too.
    let reader = Consumer::subscribe(
        &ClientSettings::plain(&run.brokers),
        &format!("reader-{}", uuid::Uuid::new_v4()),
        &[topics::DELIVERY_STATE.name],
    )?;
    let mut reasons = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while reasons.len() < 3 {
        let record = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .context("delivery-state: cancels missing")??;
        let Some(event) = stage_event(record.payload().unwrap_or_default()) else {
            continue;
        };
        if let Some(reason) = event.cancel_reason {
            reasons.insert(event.delivery_id, reason.as_str());
        }
    }
    assert_eq!(
        reasons,
        BTreeMap::from([
            ("big-full".to_owned(), "QueueFull"),
            ("big-late".to_owned(), "DeadlinePassed"),
            ("kept-1".to_owned(), "ByTenant"),
        ])
    );
    drop(reader);
    run.binary.stop(SETTLE)
}
