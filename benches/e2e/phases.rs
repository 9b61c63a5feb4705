//! The phases that load the ingestion side alone: the raw producer (generated requests
//! straight to the broker, the ceiling for the HTTP tier), the HTTP tier under the load
//! generator (closed loop by batch size, or open loop at a fixed rate), and the HTTP tier
//! under sustained overload with its resident memory over time; and the load generator
//! runs they share with the whole pipeline (`pipeline.rs`).
//!
//! Each phase is given a broker's bootstrap servers and returns its part of the report;
//! which broker, and in what order the phases run, is `main.rs`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{BusError, ClientSettings, OutRecord, Producer, ProducerArgs};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use loadgen::{LoadgenArgs, Report};
use schemas::headers as h;
use schemas::topics;
use tokio_util::sync::CancellationToken;

use crate::plan::{RAW_METHODS, RAW_TASKS};
use crate::report::{HttpTier, Overload, OverloadRss, RawProducer};
use crate::service::{RssSampler, Service, mb, rss_at};

/// A load generator run to its end.
pub(crate) async fn load(config: LoadgenArgs) -> Report {
    loadgen::run(config, CancellationToken::new())
        .await
        .unwrap()
}

/// Load on `base` for `seconds` from 50 tenants: closed loop unless its rate is set.
pub(crate) fn load_config(base: &str, batch: u32, connections: u32, seconds: f64) -> LoadgenArgs {
    LoadgenArgs {
        target: base.to_owned(),
        duration: Duration::from_secs_f64(seconds),
        batch_size: batch,
        connections,
        tenants: 50,
        ..LoadgenArgs::default()
    }
}

/// Phase 1: generated requests straight to the broker, each acknowledged, with the
/// tier's settings, keys and headers, in each way of driving librdkafka (see
/// [`RAW_METHODS`]), each after a second of warm-up (connections and producer), as the
/// HTTP tier gets. `when` says where in the pass it ran (`before` or `after` the tier).
pub(crate) async fn raw_producer(bootstrap: &str, seconds: f64, when: &str) -> Vec<RawProducer> {
    let records = generated_records();
    let mut runs = Vec::new();
    for &(method, producers) in RAW_METHODS {
        let run = match method {
            "callback" => {
                let bootstrap = bootstrap.to_owned();
                let records = records.clone();
                tokio::task::spawn_blocking(move || {
                    produce_with_callbacks(&bootstrap, &records, producers, 1.0, seconds)
                })
                .await
                .unwrap()
            }
            _ => {
                let producer = reachable_producer(bootstrap, topics::DELIVERY_REQUESTS.name);
                let _ = produce_for(&producer, &records, 1.0).await;
                produce_for(&producer, &records, seconds).await
            }
        };
        let (sent, acked, failed, bytes, secs) = run;
        let report = RawProducer {
            method: method.to_owned(),
            producers,
            tasks: if method == "callback" {
                producers
            } else {
                RAW_TASKS
            },
            when: when.to_owned(),
            records_sent: sent,
            records_acked: acked,
            records_failed: failed,
            elapsed_secs: secs,
            records_per_sec: acked as f64 / secs,
            mb_per_sec: bytes as f64 / 1e6 / secs,
        };
        println!(
            "raw producer ({}): {:.0} records/s",
            report.label(),
            report.records_per_sec
        );
        runs.push(report);
    }
    runs
}

/// Counts acknowledgements in librdkafka's delivery callback: no future, no channel per
/// record.
#[derive(Default)]
struct Counting {
    acked: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl rdkafka::ClientContext for Counting {}

impl rdkafka::producer::ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, (): ()) {
        use std::sync::atomic::Ordering::Relaxed;
        if result.is_ok() {
            self.acked.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }
}

/// A header of the raw producer's records.
fn header<'a>(key: &'a str, value: &'a str) -> rdkafka::message::Header<'a, &'a [u8]> {
    rdkafka::message::Header {
        key,
        value: Some(value.as_bytes()),
    }
}

/// `producers` producers, each with the tier's settings and driven by a thread of its
/// own: each sends for `warm_up` seconds and flushes; then all start together and send
/// for `seconds` (waiting briefly when a producer's queue is full), and flush: (sent,
/// acked, failed, bytes, seconds from the start until the last producer's flush ended,
/// every record acknowledged by then).
fn produce_with_callbacks(
    bootstrap: &str,
    records: &Arc<Vec<(String, String, String)>>,
    producers: usize,
    warm_up: f64,
    seconds: f64,
) -> (u64, u64, u64, u64, f64) {
    use rdkafka::config::FromClientConfigAndContext;
    use rdkafka::message::OwnedHeaders;
    use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};
    use std::sync::atomic::Ordering::Relaxed;

    let config = ClientSettings::plain(bootstrap).producer_config(&ProducerArgs::default());
    let ready = Arc::new(std::sync::Barrier::new(producers.max(1)));
    let threads: Vec<_> = (0..producers.max(1))
        .map(|n| {
            let (config, records, ready) = (config.clone(), records.clone(), ready.clone());
            std::thread::spawn(move || {
                let producer: ThreadedProducer<Counting> =
                    match ThreadedProducer::from_config_and_context(&config, Counting::default()) {
                        Ok(producer) => producer,
                        Err(e) => {
                            ready.wait();
                            panic!("creating a producer: {e}");
                        }
                    };
                let correlation = uuid::Uuid::new_v4().to_string();
                let mut i = n * records.len() / producers.max(1);
                let mut ingest_time = String::new();
                // Sends until `end`: (sent, bytes).
                let mut send_until = |end: Instant| {
                    let (mut sent, mut bytes) = (0u64, 0u64);
                    while Instant::now() < end {
                        if sent % 1024 == 0 {
                            ingest_time = chrono::Utc::now().timestamp_millis().to_string();
                        }
                        let (key, tenant, body) = &records[i % records.len()];
                        let id = key.split_once('/').map_or("", |(_, id)| id);
                        let headers = OwnedHeaders::new_with_capacity(5)
                            .insert(header(h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED))
                            .insert(header(h::TENANT, tenant))
                            .insert(header(h::INGEST_TIME, &ingest_time))
                            .insert(header(h::CORRELATION_ID, &correlation))
                            .insert(header(h::DELIVERY_ID, id));
                        let record = BaseRecord::to(topics::DELIVERY_REQUESTS.name)
                            .key(key.as_str())
                            .payload(body.as_str())
                            .headers(headers);
                        match producer.send(record) {
                            Ok(()) => {
                                sent += 1;
                                bytes += body.len() as u64;
                                i += 1;
                            }
                            // The queue is full: the polling thread makes room.
                            Err((e, _))
                                if e.rdkafka_error_code()
                                    == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                            {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            Err((e, _)) => panic!("producing: {e}"),
                        }
                    }
                    (sent, bytes)
                };
                // Warm up: connections, metadata, the producer's buffers. Every thread
                // reaches the barrier, a failed one too (then it fails after it), so that
                // none waits there for ever.
                let warmed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _ = send_until(Instant::now() + Duration::from_secs_f64(warm_up));
                    producer.flush(Duration::from_secs(60))
                }));
                ready.wait();
                match warmed {
                    Ok(flushed) => flushed.unwrap(),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
                let (acked_before, failed_before) = (
                    producer.context().acked.load(Relaxed),
                    producer.context().failed.load(Relaxed),
                );
                let start = Instant::now();
                let (sent, bytes) = send_until(start + Duration::from_secs_f64(seconds));
                producer.flush(Duration::from_secs(60)).unwrap();
                let c = producer.context();
                (
                    sent,
                    c.acked.load(Relaxed) - acked_before,
                    c.failed.load(Relaxed) - failed_before,
                    bytes,
                    start.elapsed().as_secs_f64(),
                )
            })
        })
        .collect();
    let (mut sent, mut acked, mut failed, mut bytes, mut secs) = (0, 0, 0, 0, 0f64);
    for thread in threads {
        let (s, a, f, b, e) = thread.join().unwrap();
        sent += s;
        acked += a;
        failed += f;
        bytes += b;
        secs = secs.max(e);
    }
    (sent, acked, failed, bytes, secs.max(1e-3))
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
        let id = key.split_once('/').map_or("", |(_, id)| id);
        let headers: [(&str, &[u8]); 5] = [
            (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
            (h::TENANT, tenant.as_bytes()),
            (h::INGEST_TIME, ingest_time.as_bytes()),
            (h::CORRELATION_ID, correlation.as_bytes()),
            (h::DELIVERY_ID, id.as_bytes()),
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

/// Phase 2: the ingestion tier alone, for `seconds` after a second of warm-up; closed
/// loop, or open loop at `rate` calls/s.
pub(crate) async fn http_tier(
    bootstrap: &str,
    seconds: f64,
    batch: u32,
    connections: u32,
    rate: Option<f64>,
) -> HttpTier {
    let service = Service::start(&["ingest", "--brokers", bootstrap, "--listen", "127.0.0.1:0"]);
    // Warm up: connections, producer, broker.
    let _ = load(load_config(&service.base, batch, connections, 1.0)).await;
    let mut config = load_config(&service.base, batch, connections, seconds);
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
    HttpTier {
        batch_size: batch,
        connections,
        report,
        peak_rss_mb: mb(peak),
    }
}

/// Phase 4: far more offered than the tier can take, for twice `seconds_per_phase`; its
/// resident memory over time.
pub(crate) async fn overload(bootstrap: &str, seconds_per_phase: f64) -> Overload {
    let service = Service::start(&["ingest", "--brokers", bootstrap, "--listen", "127.0.0.1:0"]);
    let pid = service.pid();
    let seconds = seconds_per_phase * 2.0;
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
    Overload {
        seconds,
        report,
        rss_mb: OverloadRss {
            p25: at(0.25),
            p50: half,
            p75: at(0.75),
            end,
            after: rss_now,
        },
        growth_second_half_mb: end - half,
        peak_rss_mb: mb(peak),
        samples,
    }
}
