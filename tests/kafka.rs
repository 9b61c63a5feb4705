//! The pipeline on a real Apache Kafka cluster: three KRaft nodes started by
//! `deploy/tools/kafka` on 127.0.0.1 and shared by the tests of this file, which take turns
//! (the pipeline's topics and consumer groups have fixed names) and tell their records
//! apart by owner and delivery ids of their own.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bus::{OutRecord, Producer, ProducerArgs};
use schemas::topics;

mod common;
use common::kafka::{KafkaCluster, exclusive};
use common::service::{Service, Topology, eventually_contains};
use common::writer::Writer;
use common::*;

/// How long the history may take to hold what was accepted.
const HISTORY: Duration = Duration::from_secs(120);

/// `ensure_topics` creates every topic with its partition count, three replicas (the
/// cluster's default), `min.insync.replicas=2`, and `cleanup.policy=compact` for the state
/// changelogs, as DescribeConfigs reports them; and a changelog really is compacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_get_their_partitions_replicas_and_policies_and_changelogs_compact() -> Result<()> {
    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let settings = cluster.settings();
    bus::ensure_topics(&settings, &topics::ALL).await?;
    // Safe to repeat: existing topics are left as they are.
    bus::ensure_topics(&settings, &topics::ALL).await?;
    let names: Vec<&str> = topics::ALL.iter().map(|t| t.name).collect();
    let described = bus::describe_topics(&settings, &names).await?;
    for (topic, info) in topics::ALL.iter().zip(&described) {
        assert_eq!(info.name, topic.name);
        assert_eq!(
            info.partitions.len(),
            usize::try_from(topic.partitions)?,
            "{}",
            topic.name
        );
        for p in &info.partitions {
            assert_eq!(p.replicas.len(), 3, "{}: {p:?}", topic.name);
            assert!(p.leader >= 1, "{}: {p:?}", topic.name);
        }
        let policy = info.configs.get("cleanup.policy").map(String::as_str);
        let expected = if topic.compacted { "compact" } else { "delete" };
        assert_eq!(policy, Some(expected), "{}", topic.name);
        if topic.min_compaction_lag_ms > 0 {
            // delivery-state keeps every change long enough for the notifier.
            assert_eq!(
                info.configs.get("min.compaction.lag.ms"),
                Some(&topic.min_compaction_lag_ms.to_string()),
                "{}",
                topic.name
            );
        }
        assert_eq!(
            info.configs.get("min.insync.replicas").map(String::as_str),
            Some("2"),
            "{}",
            topic.name
        );
    }

    // Compaction: a changelog created as the pipeline creates its own (one of its own,
    // so that the settings below touch no other test) gets many versions of a few keys,
    // in segments that roll every 100 ms, and keeps the latest version of each key (and
    // little else) once the cleaner has run.
    let name: &'static str =
        Box::leak(format!("compaction-{}-state", uuid::Uuid::new_v4().simple()).into_boxed_str());
    let changelog_topic = schemas::Topic {
        name,
        partitions: 1,
        ..topics::TRACKING_STATE
    };
    bus::ensure_topics(&settings, &[changelog_topic]).await?;
    let changelog = changelog_topic.name;
    let described = bus::describe_topics(&settings, &[changelog]).await?;
    assert_eq!(
        described[0]
            .configs
            .get("cleanup.policy")
            .map(String::as_str),
        Some("compact")
    );
    bus::alter_topic(
        &settings,
        changelog,
        &[
            ("cleanup.policy", "compact"),
            ("segment.ms", "100"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("min.compaction.lag.ms", "0"),
        ],
    )
    .await?;
    let producer = Producer::new(&settings, &ProducerArgs::default())?;
    const KEYS: usize = 4;
    const VERSIONS: usize = 50;
    let partition = 0;
    for version in 0..VERSIONS {
        for key in 0..KEYS {
            let payload = format!("compaction-k{key}-v{version}");
            producer
                .send_to(
                    OutRecord {
                        topic: changelog,
                        key: format!("compaction-k{key}").as_bytes(),
                        payload: payload.as_bytes(),
                        headers: &[],
                    },
                    Some(partition),
                )?
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = KEYS * VERSIONS;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        // A segment rolls only when a record arrives after segment.ms; the active one is
        // never cleaned.
        producer
            .send_to(
                OutRecord {
                    topic: changelog,
                    key: b"compaction-roll",
                    payload: b"roll",
                    headers: &[],
                },
                Some(partition),
            )?
            .await?;
        let s = settings.clone();
        let records = tokio::task::spawn_blocking(move || {
            bus::read_partition(&s, changelog, partition, Duration::from_secs(10))
        })
        .await??;
        let ours: Vec<_> = records
            .iter()
            .filter(|r| r.key.starts_with(b"compaction-k"))
            .collect();
        let latest: std::collections::BTreeSet<Vec<u8>> = ours
            .iter()
            .filter(|r| {
                String::from_utf8_lossy(&r.payload).ends_with(&format!("-v{}", VERSIONS - 1))
            })
            .map(|r| r.key.clone())
            .collect();
        assert_eq!(latest.len(), KEYS, "the latest version of every key stays");
        if ours.len() <= KEYS * 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{changelog} partition {partition} still holds {} of {written} versions",
                ours.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Every service its own process on the three-node cluster: deliveries go from the HTTP
/// API to `Completed` and their whole history is answered by the SQL server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_topology_completes_deliveries_on_three_brokers() -> Result<()> {
    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let (_dir, data) = history_folder()?;
    let data = data.as_str();
    let topology = Topology::start(cluster.bootstrap(), data, &[])?;
    let http = client();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = format!("topology-{}-{i}", &run[..8]);
        let request = request_in(i, &id, &format!("tenant-{i}"), -60);
        let url = format!("{}/api/deliveryrequests", topology.api);
        let (status, _, body) = post_json(&http, &url, &request).await?;
        assert_eq!(status, 202, "{body}");
        ids.push(body["deliveryId"].as_str().context("an id")?.to_owned());
    }
    for id in &ids {
        eventually_contains(
            &http,
            &format!("{}/api/deliveries/{id}/status", topology.api),
            "\"Completed\"",
        )
        .await?;
    }
    let query = serde_json::to_vec(&serde_json::json!({
        "sql": format!("SELECT count(*) AS n FROM deliveries WHERE delivery_id LIKE 'topology-{}-%' \
                AND assigned_at IS NOT NULL AND picked_up_at IS NOT NULL \
                AND completed_at IS NOT NULL", &run[..8])
    }))?;
    let deadline = Instant::now() + HISTORY;
    loop {
        let url = format!("{}/api/sql", topology.sql);
        let (status, _, body) = call(&http, "POST", &url, &[], query.clone()).await?;
        assert_eq!(status, 200, "{body}");
        if body[0]["n"] == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "the history: {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    topology.stop_all()
}

/// The history sink killed (SIGKILL) and stopped (SIGTERM) while batches flow: the history
/// ends with every accepted record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_stays_exactly_once_across_sink_restarts() -> Result<()> {
    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let brokers = cluster.bootstrap();
    let (_dir, data) = history_folder()?;
    let data = data.as_str();
    let (ingest, found) = Service::start(
        "ingest",
        &["ingest", "--brokers", brokers, "--listen", "127.0.0.1:0"],
        &[dronedelivery::announce::API],
    )?;
    let api = format!("http://{}", found[0]);
    let writer = Writer::start(
        &api,
        "sinkrestart",
        -65,
        2,
        50,
        Duration::from_millis(50),
        Duration::from_secs(30),
    );
    for round in 0..4 {
        let (sink, _) = Service::history(brokers, data)?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        if round % 2 == 0 {
            sink.kill()?;
        } else {
            sink.stop()?;
        }
    }
    let report = writer.finish().await?;
    let (sink, _) = Service::history(brokers, data)?;
    assert!(!report.accepted.is_empty(), "{report:?}");
    assert_eq!(
        report.by_status.keys().copied().collect::<Vec<_>>(),
        [202],
        "{report:?}"
    );
    assert_eq!(
        (report.timeouts, report.transport_errors),
        (0, 0),
        "{report:?}"
    );
    history_holds_exactly(data, &report.ids, &report.accepted, HISTORY).await?;
    sink.stop()?;
    // Still exactly so once the last sink has stopped.
    history_holds_exactly(data, &report.ids, &report.accepted, HISTORY).await?;
    ingest.stop()
}

/// `ingest --max-consumer-lag`: writes are refused with 503 and Retry-After while a
/// consumer group is further behind, and taken again once it caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_refuses_writes_while_a_group_lags_and_takes_them_once_it_caught_up() -> Result<()> {
    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let brokers = cluster.bootstrap();
    let (_dir, data) = history_folder()?;
    let data = data.as_str();
    // Every group that earlier tests committed catches up first: the lag watch counts
    // each group that has committed offsets.
    let mut topology = Topology::start(brokers, data, &["--max-consumer-lag", "20"])?;
    let http = client();
    let url = format!("{}/api/deliveryrequests", topology.api);
    let batch_url = format!("{url}/batch");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let batch = |prefix: &str, n: usize| {
        let records: Vec<serde_json::Value> = (0..n)
            .map(|i| request_in(i, &format!("{prefix}-{}-{i}", &run[..8]), "lag", -70))
            .collect();
        serde_json::to_vec(&records).unwrap()
    };
    // Lag counts only where a group has committed: the workflow handles a first batch,
    // on most partitions (its events reach the history), before it stops.
    let deadline = Instant::now() + HISTORY;
    loop {
        let (status, _, body) = call(
            &http,
            "POST",
            &batch_url,
            &[("content-type", "application/json")],
            batch("lag-first", 48),
        )
        .await?;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "writes never taken: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    history_reaches(
        data,
        &format!(
            "SELECT count(*) FROM delivery_events WHERE delivery_id LIKE 'lag-first-{}-%' \
             AND stage = 'Created'",
            &run[..8]
        ),
        48,
        HISTORY,
    )
    .await?;
    // Auto-commits run every second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The workflow stops (after its final commit): its lag grows with every write.
    topology.stop("workflow")?;
    let mut refused = None;
    for round in 0..40 {
        let (status, headers, body) = call(
            &http,
            "POST",
            &batch_url,
            &[("content-type", "application/json")],
            batch(&format!("lag-{round}"), 50),
        )
        .await?;
        if status == 503 {
            refused = Some((headers, body));
            break;
        }
        assert_eq!(status, 202, "{body}");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let (headers, body) = refused.context("writes were never refused while the workflow lagged")?;
    assert!(headers.contains_key("retry-after"), "{headers:?} {body}");
    eventually_contains(
        &http,
        &format!("{}/metrics", topology.api),
        "ingest_backpressure_refusals_total",
    )
    .await?;
    // The workflow is back: it catches up and writes are taken again.
    topology.add("workflow")?;
    let deadline = Instant::now() + HISTORY;
    loop {
        let (status, _, body) = post_json(
            &http,
            &url,
            &request_in(1, &format!("lag-after-{}", &run[..8]), "lag", -70),
        )
        .await?;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "writes were never taken again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    topology.stop_all()
}

/// Each consumer group grows from one member to three and back to one while batches
/// flow; every accepted delivery completes and is in the history once, no drone is
/// assigned twice and no event repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_grows_to_three_members_and_shrinks_back_under_traffic() -> Result<()> {
    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let (_dir, data) = history_folder()?;
    let data = data.as_str();
    let mut topology = Topology::start(cluster.bootstrap(), data, &[])?;
    let writer = Writer::start(
        &topology.api,
        "scaling",
        -75,
        2,
        10,
        Duration::from_millis(250),
        Duration::from_secs(30),
    );
    let roles = [
        "workflow",
        "deliveries",
        "scheduling",
        "tracking",
        "history",
    ];
    for member in ["#2", "#3"] {
        for role in roles {
            topology.add(&format!("{role}{member}"))?;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    for member in ["#3", "#2"] {
        for role in roles {
            topology.stop(&format!("{role}{member}"))?;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let report = writer.finish().await?;
    let n = i64::try_from(report.accepted.len())?;
    assert!(n > 0, "{report:?}");
    assert_eq!(
        report.by_status.keys().copied().collect::<Vec<_>>(),
        [202],
        "{report:?}"
    );
    assert_eq!(
        (report.timeouts, report.transport_errors),
        (0, 0),
        "{report:?}"
    );
    let ids = &report.ids;
    history_holds_exactly(data, ids, &report.accepted, HISTORY).await?;
    if let Err(e) = history_reaches(
        data,
        &format!(
            "SELECT count(DISTINCT delivery_id) FROM delivery_events \
             WHERE delivery_id LIKE '{ids}-%' AND stage = 'Completed'"
        ),
        n,
        HISTORY,
    )
    .await
    {
        bail!("{e:#}; {}", unfinished_deliveries(data, ids, 10).await?);
    }
    assert_eq!(
        history_scalar(
            data,
            &format!(
                "SELECT count(DISTINCT delivery_id) FROM drone_assignments \
                 WHERE delivery_id LIKE '{ids}-%'"
            )
        )
        .await?,
        n,
        "every delivery was assigned"
    );
    // Processing is exactly-once on a cluster (Kafka transactions): members joining and
    // leaving repeat no work.
    let repeated_assignments = history_scalar(
        data,
        &format!(
            "SELECT count(*) - count(DISTINCT delivery_id) FROM drone_assignments \
             WHERE delivery_id LIKE '{ids}-%'"
        ),
    )
    .await?;
    let repeated_events = history_scalar(
        data,
        &format!(
            "SELECT count(*) - count(DISTINCT concat(delivery_id, '/', CAST(seq AS VARCHAR))) \
             FROM delivery_events WHERE delivery_id LIKE '{ids}-%'"
        ),
    )
    .await?;
    eprintln!(
        "scaling 1 -> 3 -> 1 members: {n} deliveries accepted and completed; \
         {repeated_assignments} second assignments, {repeated_events} repeated events"
    );
    topology.stop_all()?;
    assert_eq!(
        (repeated_assignments, repeated_events),
        (0, 0),
        "second assignments and repeated events"
    );
    // Still exactly the accepted requests once every sink has stopped.
    history_holds_exactly(data, ids, &report.accepted, HISTORY).await
}

/// Under exactly-once on the cluster, an output the broker refuses for what it is (here
/// larger than its topic's `max.message.bytes`, which only the broker knows) aborts its
/// transaction, which is sent again, from a new registration, with the output's dead
/// letter in its place: the letter keeps the record, and the partition moves on (the
/// drone's next assignment, after it on the same partition, is forwarded). The drone
/// tracker is the processor that sends it: it forwards each assignment to its delivery's
/// key on `deliveries` as it was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_the_broker_refuses_becomes_a_dead_letter_under_exactly_once() -> Result<()> {
    let _turn = exclusive().await;
    let cluster = KafkaCluster::shared();
    let settings = cluster.settings();
    bus::ensure_topics(&settings, &topics::ALL).await?;
    let topic = topics::DELIVERIES.name;
    // The topic sets nothing of its own: giving back no setting restores it.
    let _restore = RestoreTopic(settings.clone(), topic);
    bus::alter_topic(&settings, topic, &[("max.message.bytes", "2048")]).await?;
    let brokers = cluster.bootstrap();
    let (tracking, _) = Service::start(
        "process",
        &[
            "process",
            "--brokers",
            brokers,
            "--processors",
            "tracking",
            "--health-listen",
            "127.0.0.1:0",
        ],
        &[dronedelivery::announce::HEALTH],
    )?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let drone = format!("40:-71-refused-{}", &run[..8]);
    let (big, small) = (
        format!("refused-{}", &run[..8]),
        format!("after-{}", &run[..8]),
    );
    let here = schemas::Location {
        latitude: 40.5,
        longitude: -70.5,
    };
    let now = chrono::Utc::now().timestamp_millis();
    let assignment = |id: &str, at: i64| schemas::tracking::Assignment {
        drone_id: drone.clone(),
        region: "40:-71".into(),
        delivery_key: format!("default/{id}"),
        delivery_id: id.to_owned(),
        from: here,
        pickup: here,
        drop_off: here,
        speed_mps: 10.0,
        assigned_at: at,
        pickup_eta: at + 60_000,
        delivery_eta: at + 120_000,
    };
    // 8 KB of random hex in a field the tracker ignores: its forward on `deliveries` is
    // past the topic's limit even compressed.
    let mut first = serde_json::to_value(assignment(&big, now))?;
    first["padding"] = (0..250)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect::<String>()
        .into();
    let second = serde_json::to_value(assignment(&small, now + 1))?;
    let producer = bus::Producer::new(&settings, &bus::ProducerArgs::default())?;
    for value in [&first, &second] {
        producer
            .send_and_wait(bus::OutRecord {
                topic: topics::DRONE_ASSIGNMENTS.name,
                key: drone.as_bytes(),
                payload: &serde_json::to_vec(value)?,
                headers: &[(
                    schemas::headers::EVENT_TYPE,
                    schemas::headers::event_type::DRONE_ASSIGNED.as_bytes(),
                )],
            })
            .await?;
    }

    let key = format!("default/{big}");
    let letters = keyed(&settings, topics::DEAD_LETTERS.name, &key, 1).await?;
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    let letter: serde_json::Value = serde_json::from_slice(&letters[0])
        .context("the letter keeps the record (whole, under 16 KiB)")?;
    assert_eq!(letter["deliveryId"], big.as_str());
    let forwarded = keyed(&settings, topic, &format!("default/{small}"), 1).await?;
    assert_eq!(forwarded.len(), 1, "the next assignment: {forwarded:?}");
    assert!(
        String::from_utf8_lossy(&forwarded[0]).contains(&small),
        "the partition moved on past the refused record"
    );
    // (The topic has records, the one above at least: this ends 3 s after the last.)
    assert!(
        keyed(&settings, topic, &key, 0).await?.is_empty(),
        "never written"
    );
    tracking.stop()
}

/// Gives topic `.1` back its defaults when dropped (also when a test fails), in a
/// runtime of its own.
struct RestoreTopic(bus::ClientSettings, &'static str);

impl Drop for RestoreTopic {
    fn drop(&mut self) {
        let (settings, topic) = (self.0.clone(), self.1);
        let restored = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(bus::alter_topic(&settings, topic, &[]))?;
            anyhow::Ok(())
        })
        .join();
        if !matches!(restored, Ok(Ok(()))) {
            eprintln!("topic {topic} keeps a setting of a test: {restored:?}");
        }
    }
}

/// The payloads of the records of `topic` with `key`, read from the start until at least
/// `expected` arrived and 3 s passed with no more record of the topic (or 90 s in all).
async fn keyed(
    settings: &bus::ClientSettings,
    topic: &str,
    key: &str,
    expected: usize,
) -> Result<Vec<Vec<u8>>> {
    let reader = bus::Consumer::subscribe(
        settings,
        &format!("reader-{}", uuid::Uuid::new_v4()),
        &[topic],
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut found = Vec::new();
    let mut quiet_from = None;
    loop {
        if tokio::time::Instant::now() >= deadline {
            if found.len() >= expected {
                return Ok(found);
            }
            bail!("{topic}: {} of {expected} records keyed {key}", found.len());
        }
        let wait = quiet_from.map_or(deadline, |at: tokio::time::Instant| at.min(deadline));
        match tokio::time::timeout_at(wait, reader.recv()).await {
            Ok(record) => {
                let record = record?;
                if record.key() == Some(key.as_bytes()) {
                    found.push(record.payload().unwrap_or_default().to_vec());
                }
                if found.len() >= expected {
                    quiet_from = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                }
            }
            Err(_) if found.len() >= expected => return Ok(found),
            Err(_) => bail!("{topic}: {} of {expected} records keyed {key}", found.len()),
        }
    }
}
