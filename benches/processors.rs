//! Throughput of the stream processors on the embedded broker: N delivery requests are
//! put on `delivery-requests`, then the workflow, scheduling, tracking and delivery
//! consumers are started, and the benchmark measures how long until
//!
//! - the delivery consumer has handled every request (`delivery-requests` -> delivery
//!   consumer -> `Created` on `delivery-state`, its changelog and its events: the offset
//!   markers it writes there cover all of `delivery-requests`), and
//! - the scheduling consumer has handled every request (its changelog's offset markers
//!   cover all of `drone-scheduling`).
//!
//! Then it says how many Kafka records the pipeline wrote per request, topic by topic.
//!
//! `cargo bench --bench processors` (N from `DRONEDELIVERY_BENCH_RECORDS`, default
//! 50,000; the stateful consumers' batch from `DRONEDELIVERY_PROCESSOR_BATCH_RECORDS`,
//! as `--processor-batch-records` sets it). Transparent huge pages are off, as in the
//! binary (`src/huge_pages.rs`); `DRONEDELIVERY_BENCH_HUGE_PAGES=on` leaves them on, to
//! compare. Requests spread over 400 regions; no drone flies, so most wait. Profiles of
//! it are in `benches/results/processors-profile.md`.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bus::{ClientSettings, Consumer, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
use schemas::headers as h;
use schemas::topics;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn request(i: usize) -> String {
    let lat = 30.5 + (i % 20) as f64;
    let lon = -119.5 + ((i / 20) % 20) as f64;
    format!(
        r#"{{"ownerId":"bench","pickupLocation":"{lat},{lon}","dropOffLocation":"{},{}","pickupTime":"2026-11-24T10:00:00Z","deadline":"2026-11-24T12:00:00Z","packageInfo":{{"packageId":"p{i}","size":"Small","weight":1}}}}"#,
        lat + 0.01,
        lon + 0.01
    )
}

fn main() {
    if std::env::var("DRONEDELIVERY_BENCH_HUGE_PAGES").as_deref() != Ok("on") {
        dronedelivery::huge_pages::turn_off();
    }
    let n: usize = std::env::var("DRONEDELIVERY_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(n));
}

async fn run(n: usize) {
    let broker = EmbeddedBroker::start(1, &topics::ALL).unwrap();
    let settings = ClientSettings::plain(broker.bootstrap_servers());
    let producer = Producer::new(&settings, &ProducerArgs::default()).unwrap();
    let started = Instant::now();
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("b-{i}");
        let key = schemas::delivery_key("bench", &id);
        let payload = request(i);
        let headers: [(&str, &[u8]); 3] = [
            (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
            (h::TENANT, b"bench"),
            (h::DELIVERY_ID, id.as_bytes()),
        ];
        loop {
            match producer.send(OutRecord {
                topic: topics::DELIVERY_REQUESTS.name,
                key: key.as_bytes(),
                payload: payload.as_bytes(),
                headers: &headers,
            }) {
                Ok(ack) => {
                    acks.push(ack);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for ack in futures_util::future::join_all(acks).await {
        ack.unwrap();
    }
    println!(
        "produced {n} requests in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let stop = CancellationToken::new();
    let workflow = tokio::spawn(processors::workflow::run(
        processors::workflow::WorkflowArgs::default(),
        settings.clone(),
        processors::guarantee::Durability::at_least_once(settings.clone(), producer.clone()),
        stop.clone(),
    ));
    // The stateful consumers' batch size, as `--processor-batch-records` sets it.
    let stateful_args = processors::StatefulArgs {
        processor_batch_records: std::env::var("DRONEDELIVERY_PROCESSOR_BATCH_RECORDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(processors::StatefulArgs::default().processor_batch_records),
        ..processors::StatefulArgs::default()
    };
    let stateful = tokio::spawn(processors::run_stateful(
        stateful_args,
        processors::Processor::ALL.to_vec(),
        settings.clone(),
        processors::guarantee::Durability::at_least_once(settings.clone(), producer.clone()),
        stop.clone(),
    ));
    let started = Instant::now();
    let events =
        Consumer::subscribe(&settings, "bench-events", &[topics::DELIVERY_STATE.name]).unwrap();
    let state =
        Consumer::subscribe(&settings, "bench-state", &[topics::SCHEDULING_STATE.name]).unwrap();
    // Each consumer writes, with each batch's state, the offset of the last input record
    // of each partition it handled (an offset marker in its changelog): done when the
    // markers cover every request. Only the markers' keys are looked at, so that this
    // observer takes little of the machine from the processors.
    let marker_of = |topic: &str| {
        let mut k = vec![0u8];
        k.extend_from_slice(topic.as_bytes());
        k
    };
    let (requests_marker, scheduling_marker) = (
        marker_of(topics::DELIVERY_REQUESTS.name),
        marker_of(topics::DRONE_SCHEDULING.name),
    );
    let covered =
        |markers: &HashMap<i32, i64>| -> usize { markers.values().map(|o| (o + 1) as usize).sum() };
    let offset_of = |payload: Option<&[u8]>| {
        std::str::from_utf8(payload.unwrap_or_default())
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let (mut created, mut scheduled) = (HashMap::<i32, i64>::new(), HashMap::<i32, i64>::new());
    let (mut created_at, mut scheduled_at) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(1800);
    while (created_at.is_none() || scheduled_at.is_none()) && Instant::now() < deadline {
        tokio::select! {
            Ok(record) = events.recv(), if created_at.is_none() => {
                if record.key() == Some(requests_marker.as_slice()) {
                    created.insert(record.partition(), offset_of(record.payload()));
                    if covered(&created) >= n {
                        created_at = Some(started.elapsed());
                    }
                }
            }
            Ok(record) = state.recv(), if scheduled_at.is_none() => {
                if record.key() == Some(scheduling_marker.as_slice()) {
                    scheduled.insert(record.partition(), offset_of(record.payload()));
                    if covered(&scheduled) >= n {
                        scheduled_at = Some(started.elapsed());
                    }
                }
            }
        }
    }
    stop.cancel();
    let _ = workflow.await;
    let _ = stateful.await;
    // Every record on every topic (the embedded broker keeps them all at this size).
    let mut per_topic = Vec::new();
    for topic in topics::ALL {
        let records: i64 = (0..topic.partitions)
            .map(|p| {
                let (low, high) = events
                    .watermarks(topic.name, p, Duration::from_secs(10))
                    .unwrap();
                high - low
            })
            .sum();
        per_topic.push((topic.name, records));
    }
    let total: i64 = per_topic.iter().map(|(_, r)| r).sum();
    println!(
        "Kafka records per request: {:.2} ({})",
        total as f64 / n as f64,
        per_topic
            .iter()
            .filter(|(_, r)| *r > 0)
            .map(|(t, r)| format!("{t} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let created_at = created_at.expect("every request reached Created");
    let scheduled_at = scheduled_at.expect("every request was scheduled");
    let whole = created_at.max(scheduled_at);
    println!(
        "delivery-requests -> delivery consumer: {n} requests to Created in {:.2} s = {:.0} records/s",
        created_at.as_secs_f64(),
        n as f64 / created_at.as_secs_f64()
    );
    println!(
        "workflow -> scheduling consumer: {n} requests scheduled in {:.2} s = {:.0} records/s",
        scheduled_at.as_secs_f64(),
        n as f64 / scheduled_at.as_secs_f64()
    );
    println!(
        "processors: {n} requests through the delivery consumer and workflow -> scheduler in {:.2} s = {:.0} requests/s",
        whole.as_secs_f64(),
        n as f64 / whole.as_secs_f64()
    );
}
