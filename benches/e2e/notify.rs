//! The notifications run (`--notifications`): `dronedelivery run --simulate-drones` on its
//! own embedded broker, a webhook receiver and a Server-Sent Events client in this
//! process, and deliveries posted at a steady rate; it measures
//!
//! 1. **notification latency**: from a delivery's change (its `updatedAt`, the moment
//!    the delivery consumer made the change it writes to `delivery-state`) to the webhook
//!    POST received, and to the SSE event received (the tenant's feed), p50/p99/max;
//! 2. **SSE subscribers at bounded memory**: the resident memory of the tier before and
//!    after `SUBSCRIBERS` streams are opened and held (each gets its first bytes), and per
//!    subscriber.
//!
//! Everything runs on this machine's cores, on 127.0.0.1. The report goes to
//! `notifications.json` and `notifications.md` in the results folder.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::report::Machine;
use crate::service::{Service, mb};

/// Deliveries posted per second, and for how long.
const RATE: u64 = 50;
const POST_SECS: u64 = 20;
/// How long after the last post notifications are still counted (the drones fly).
const DRAIN_SECS: u64 = 40;
/// SSE streams opened and held at once for the memory figure.
const SUBSCRIBERS: usize = 5_000;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Latencies, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    pub(crate) samples: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if ms.is_empty() {
                f64::NAN
            } else {
                ms[((ms.len() - 1) as f64 * q).round() as usize]
            }
        };
        Self {
            samples: ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// What the run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NotificationsReport {
    pub(crate) started: String,
    pub(crate) machine: Machine,
    pub(crate) commit: String,
    pub(crate) command: String,
    pub(crate) deliveries_posted: u64,
    pub(crate) deliveries_per_sec: u64,
    pub(crate) webhook: Latency,
    pub(crate) sse: Latency,
    /// Whether the SSE feed stayed connected to the end (it is dropped if it falls
    /// behind).
    pub(crate) sse_feed_kept: bool,
    pub(crate) subscribers_held: usize,
    pub(crate) rss_before_mb: f64,
    pub(crate) rss_with_subscribers_mb: f64,
    pub(crate) kib_per_subscriber: f64,
}

/// Milliseconds from the change in `data.updatedAt` to now.
fn since_change(data: &serde_json::Value) -> Option<f64> {
    let at = chrono::DateTime::parse_from_rfc3339(data["updatedAt"].as_str()?).ok()?;
    let now = chrono::Utc::now();
    Some((now.timestamp_micros() - at.timestamp_micros()) as f64 / 1_000.0)
}

/// A webhook receiver on 127.0.0.1 that answers 204 and keeps each notification's
/// latency.
async fn receiver(latencies: Arc<Mutex<Vec<f64>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let latencies = Arc::clone(&latencies);
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let latencies = Arc::clone(&latencies);
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&body)
                            && let Some(ms) = since_change(&payload["data"])
                        {
                            latencies.lock().unwrap().push(ms);
                        }
                        let mut response = hyper::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = hyper::StatusCode::NO_CONTENT;
                        Ok::<_, Infallible>(response)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}/hook")
}

async fn request(client: &HttpClient, method: &str, url: &str, body: Vec<u8>) -> (u16, Bytes) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(30), client.request(request)).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, body)
        }
        _ => (0, Bytes::new()),
    }
}

/// Opens `url` as an event stream: the response, once its first bytes came.
async fn open_stream(client: &HttpClient, url: &str) -> Option<hyper::body::Incoming> {
    let request = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .ok()?
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let mut body = response.into_body();
    // The first bytes (`retry:` and a comment) say the stream is open.
    tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .ok()??
        .ok()?;
    Some(body)
}

/// The tenant's feed: each event's latency.
async fn feed(client: HttpClient, url: String, latencies: Arc<Mutex<Vec<f64>>>) {
    let Some(mut body) = open_stream(&client, &url).await else {
        panic!("the SSE feed did not open");
    };
    let mut buffer = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            for line in text.lines() {
                if let Some(json) = line.strip_prefix("data: ")
                    && let Ok(data) = serde_json::from_str::<serde_json::Value>(json)
                    && let Some(ms) = since_change(&data)
                {
                    latencies.lock().unwrap().push(ms);
                }
            }
        }
    }
}

/// A delivery request of the `default` tenant (the only one of a tier without keys),
/// picked up near the drones of one of 400 regions (eight drones each), so that every
/// delivery gets a drone at once and is flown.
fn delivery(i: u64) -> Vec<u8> {
    let lat = 30.49 + (i % 20) as f64;
    let lon = -110.49 + ((i / 20) % 20) as f64;
    serde_json::json!({
        "ownerId": "default",
        "pickupLocation": format!("{lat},{lon}"),
        "dropOffLocation": {"latitude": lat + 0.01, "longitude": lon + 0.02},
        "pickupTime": "2020-01-01T00:00:00Z",
        "deadline": "2099-01-01T00:00:00Z",
        "expedited": false,
        "confirmationRequired": "None",
        "packageInfo": {"packageId": format!("n-{i}"), "size": "Small", "weight": 1.0}
    })
    .to_string()
    .into_bytes()
}

/// The run; `started`, `machine`, `commit` for the report.
pub(crate) async fn notifications(
    started: String,
    machine: Machine,
    commit: String,
) -> NotificationsReport {
    let data = tempfile::tempdir().unwrap();
    let data_path = data.path().join("history");
    let subscribers = (SUBSCRIBERS + 100).to_string();
    let run = Service::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--flight-listen",
        "off",
        "--data",
        data_path.to_str().unwrap(),
        "--simulate-drones",
        "--webhooks-allow-private",
        "--sse-max-subscribers",
        &subscribers,
        "--sse-max-subscribers-per-tenant",
        &subscribers,
    ]);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let webhook_latencies = Arc::new(Mutex::new(Vec::new()));
    let sse_latencies = Arc::new(Mutex::new(Vec::new()));
    let hook = receiver(Arc::clone(&webhook_latencies)).await;
    let register = serde_json::json!({ "url": hook, "events": ["stage", "position"] });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = request(
            &client,
            "PUT",
            &format!("{}/api/webhooks/bench", run.base),
            register.to_string().into_bytes(),
        )
        .await;
        if status == 201 || status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registering the webhook: {status} {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let feed_task = tokio::spawn(feed(
        client.clone(),
        format!("{}/api/deliveries/events", run.base),
        Arc::clone(&sse_latencies),
    ));
    // Let the consumers join their groups before the first delivery.
    tokio::time::sleep(Duration::from_secs(5)).await;

    println!("notifications: posting {RATE} deliveries/s for {POST_SECS} s");
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut posted = 0u64;
    let url = format!("{}/api/deliveryrequests", run.base);
    let mut acks = tokio::task::JoinSet::new();
    for i in 0..RATE * POST_SECS {
        tick.tick().await;
        let client = client.clone();
        let url = url.clone();
        acks.spawn(async move { request(&client, "POST", &url, delivery(i)).await.0 });
    }
    while let Some(status) = acks.join_next().await {
        if status.unwrap_or(0) == 202 {
            posted += 1;
        }
    }
    println!("notifications: {posted} accepted; draining {DRAIN_SECS} s");
    tokio::time::sleep(Duration::from_secs(DRAIN_SECS)).await;
    // The feed ends early only if the tier dropped it (it fell behind): then its figures
    // miss what came after.
    let feed_kept = !feed_task.is_finished();
    feed_task.abort();
    let webhook = Latency::of(webhook_latencies.lock().unwrap().clone());
    let sse = Latency::of(sse_latencies.lock().unwrap().clone());

    // Subscribers: the tier's memory with many streams held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = run.rss();
    let feed_url = format!("{}/api/deliveries/events", run.base);
    let mut opened = tokio::task::JoinSet::new();
    let streams_client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    for _ in 0..SUBSCRIBERS {
        let client = streams_client.clone();
        let url = feed_url.clone();
        opened.spawn(async move { open_stream(&client, &url).await });
    }
    let mut held = Vec::new();
    while let Some(stream) = opened.join_next().await {
        if let Ok(Some(stream)) = stream {
            held.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let with = run.rss();
    let count = held.len();
    println!("notifications: {count} streams held");
    drop(held);
    run.stop();
    let kib = if count > 0 {
        (with.saturating_sub(before)) as f64 / 1024.0 / count as f64
    } else {
        f64::NAN
    };
    NotificationsReport {
        started,
        machine,
        commit,
        command: "cargo bench --bench e2e -- --notifications".into(),
        deliveries_posted: posted,
        deliveries_per_sec: RATE,
        webhook,
        sse,
        sse_feed_kept: feed_kept,
        subscribers_held: count,
        rss_before_mb: mb(before),
        rss_with_subscribers_mb: mb(with),
        kib_per_subscriber: kib,
    }
}

/// `notifications.md`.
pub(crate) fn markdown(r: &NotificationsReport) -> String {
    let row = |name: &str, l: &Latency| {
        format!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} |\n",
            l.samples, l.p50_ms, l.p99_ms, l.max_ms
        )
    };
    format!(
        "# Notifications\n\n\
         `{}` on {} ({} cores), commit {}, started {}.\n\n\
         `dronedelivery run --simulate-drones` on its embedded broker; {} deliveries posted at \
         {}/s, flown by the simulator; one webhook endpoint (stage and position changes) and \
         one SSE feed of the tenant, both in the bench's process on 127.0.0.1.\n\n\
         ## Notification latency\n\n\
         From a delivery's change (`updatedAt`: when the delivery consumer made it, just \
         before it is written to `delivery-state`) to its arrival.\n\n\
         | to | notifications | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n{}{}\n\
         The SSE feed {}. On the embedded broker a consumer group's fetch that finds \
         nothing new waits librdkafka's `fetch.wait.max.ms` (500 ms) in full; the tier's \
         readers wait at most 50 ms, the notifier's group the default, which is most of \
         the webhook's p99.\n\n\
         ## SSE subscribers\n\n\
         {} streams of the tenant's feed opened and held at once (each got its first bytes): \
         the tier's resident memory went from {:.0} MB to {:.0} MB, {:.1} KiB per subscriber.\n",
        r.command,
        r.machine.cpu,
        r.machine.cores,
        r.commit,
        r.started,
        r.deliveries_posted,
        r.deliveries_per_sec,
        row("webhook", &r.webhook),
        row("SSE", &r.sse),
        if r.sse_feed_kept {
            "stayed connected to the end"
        } else {
            "was dropped before the end (it fell behind): its figures miss the rest"
        },
        r.subscribers_held,
        r.rss_before_mb,
        r.rss_with_subscribers_mb,
        r.kib_per_subscriber,
    )
}
