//! Phase 3, the whole pipeline (`dronedelivery run`: ingest, processors, history sink) at
//! a fixed offered rate: what it accepts, how long until every accepted request is a row
//! of the history and has its `Created` event, the records it wrote to each topic, the
//! freshness of the history (probe requests from ack until a query sees them) and the
//! service's resident memory.
//!
//! It is given a broker's bootstrap servers; resetting the broker's topics between runs
//! is `cluster.rs`'s, choosing the rate `main.rs`'s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use analytics::sql::{History, QueryLimitsArgs};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use bus::ClientSettings;
use schemas::topics;

use crate::phases::{load, load_config};
use crate::plan::{MAX_CONSUMER_LAG, MAX_WAITING_PER_REGION};
use crate::report::{Freshness, Pipeline};
use crate::service::{RssSampler, Service, mb, rss_at};

/// The count a `SELECT count(*)` query gives; 0 when it fails.
async fn count(history: &History, sql: &str) -> i64 {
    match history.query(sql).await {
        Ok(result) => result
            .batches
            .first()
            .map_or(0, |b| b.column(0).as_primitive::<Int64Type>().value(0)),
        Err(_) => 0,
    }
}

/// Phase 3: the whole pipeline at a fixed offered rate for `seconds`, with freshness
/// probes. No drone flies here, so every request waits for one: the scheduler's queues
/// are sized (`MAX_WAITING_PER_REGION`) so that none is refused for a full queue, and each
/// delivery costs what a request does (a refused one costs one more record each way).
pub(crate) async fn whole_pipeline(bootstrap: &str, rate: f64, seconds: f64) -> Pipeline {
    let data = tempfile::tempdir().unwrap();
    let data_path = data.path().to_str().unwrap().to_owned();
    let flags = [
        "run",
        "--brokers",
        bootstrap,
        "--listen",
        "127.0.0.1:0",
        "--flight-listen",
        "off",
        "--data",
        &data_path,
        "--max-consumer-lag",
        MAX_CONSUMER_LAG,
        "--max-waiting-per-region",
        MAX_WAITING_PER_REGION,
    ];
    let service = Service::start(&flags);
    let history = History::open(&data_path, &QueryLimitsArgs::default())
        .await
        .unwrap();
    // Each run names its own tenants and probes (a shared broker may still hold the
    // previous run's records).
    let run = format!("bench{}r{rate:.0}", std::process::id());

    // Wait until the workflow and the sink run: one probe in the history.
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

    // Counted before the probe task posts its first probe.
    let records_before = topic_records(bootstrap).await;
    // Probes: one request every 250 ms, each watched until a query sees it.
    let stop_probes = Arc::new(AtomicBool::new(false));
    let probe_task = {
        let stop = stop_probes.clone();
        let history = history.clone();
        let client = client.clone();
        let run = run.clone();
        tokio::spawn(async move { probes(client, history, run, stop).await })
    };

    let mut config = load_config(&service.base, 1000, 8, seconds);
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
    // total (this run's history is fresh; with `--brokers` its sink begins where the
    // previous run's left off, and a late event of that run may count) and then
    // exactly, by a join.
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
        // The cheap count may include another run's events (a shared broker): the
        // exact one decides.
        if rows >= accepted
            && events >= accepted + probes
            && count(&history, &exact_events_sql).await >= accepted
        {
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
    // Records this run added to each topic (as retained: the embedded broker drops the
    // oldest past 5 MiB per partition), per delivery.
    let mut per_topic = BTreeMap::new();
    let mut total = 0i64;
    for (topic, after) in topic_records(bootstrap).await {
        let added = after - records_before.get(&topic).copied().unwrap_or(0);
        total += added;
        per_topic.insert(topic, added);
    }
    // The first probe's records were there before the load.
    let probes_total = count(&history, &probes_sql).await;
    let per_delivery = total as f64 / (accepted + probes_total - 1).max(1) as f64;
    let peak = service.peak_rss();
    service.stop();
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
        "whole pipeline at {rate:.0} records/s offered:\n{report}  history: {rows} of {accepted} requests, {events} Created events; all in {all_in:.1} s after the load started ({end_to_end:.0} deliveries/s end to end); freshness {}",
        freshness_json(&freshness),
    );
    Pipeline {
        offered_records_per_sec: rate,
        report,
        load_secs,
        history_rows: rows,
        created_events: events,
        lost: (accepted - rows.min(events)).max(0),
        all_queryable_after_secs: all_in,
        drain_secs: all_in - load_secs,
        end_to_end_deliveries_per_sec: end_to_end,
        kept_up,
        freshness_secs: freshness,
        peak_rss_mb: mb(peak),
        kafka_records: per_topic,
        kafka_records_per_delivery: per_delivery,
        rss_mb_at_half_load: rss_at(&samples, load_secs / 2.0),
        rss_mb_at_end_of_load: rss_at(&samples, load_secs),
    }
}

/// The freshness as the progress line shows it: its JSON (keys sorted, as in `e2e.json`).
fn freshness_json(freshness: &Freshness) -> String {
    serde_json::to_value(freshness)
        .map(|v| v.to_string())
        .unwrap_or_default()
}

/// Records retained on each of the pipeline's topics.
async fn topic_records(bootstrap: &str) -> BTreeMap<String, i64> {
    let names: Vec<&str> = topics::ALL.iter().map(|t| t.name).collect();
    // A group that never commits: its lag is every retained record.
    let counter = bus::LagWatch::new(
        &ClientSettings::plain(bootstrap),
        &[("dronedelivery-bench-counter", &names)],
    )
    .unwrap();
    let mut per_topic = BTreeMap::new();
    for lag in tokio::task::spawn_blocking(move || counter.lags(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap()
    {
        *per_topic.entry(lag.topic).or_insert(0) += lag.lag;
    }
    per_topic
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
async fn probes(client: Probe, history: History, run: String, stop: Arc<AtomicBool>) -> Freshness {
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
    Freshness {
        probes: seen.len() + pending.len(),
        seen: seen.len(),
        p50: pick(0.50),
        p99: pick(0.99),
        max: seen.last().copied().unwrap_or(f64::NAN),
    }
}
