//! The clients: one task per keep-alive connection, all drawing calls from one shared
//! sequence, each with its own counters and histogram, merged at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::LoadgenArgs;
use crate::error::{LoadgenError, Result};
use crate::plan::{self, Kind, Prepared};
use crate::report::{Latency, Report};

/// Largest answer read; a batch answer of 10,000 records is about 700 KB.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Pause before reconnecting after a connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// What all connections share.
struct Shared {
    calls: Vec<Prepared>,
    /// `Authorization` per tenant index, when keys are used.
    auth: Vec<Option<HeaderValue>>,
    authority: String,
    host: HeaderValue,
    content_type: HeaderValue,
    content_encoding: Option<HeaderValue>,
    /// The next call number.
    next: AtomicU64,
    start: Instant,
    end: Instant,
    /// Open loop: records per second.
    rate: Option<f64>,
    batch_size: u32,
    timeout: Duration,
}

/// One connection's counts.
struct Tally {
    histogram: Histogram<u64>,
    by_status: BTreeMap<u16, u64>,
    calls: u64,
    transport_errors: u64,
    timeouts: u64,
    records_sent: u64,
    accepted: u64,
    telemetry_accepted: u64,
    rejected: u64,
    failed: u64,
    bytes_sent: u64,
    last_answer: Option<Instant>,
}

impl Tally {
    fn new() -> Self {
        Self {
            // 1 µs to 1 hour at 3 significant digits; the bounds are valid.
            histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("1 µs to 1 hour at 3 digits are valid histogram bounds"),
            by_status: BTreeMap::new(),
            calls: 0,
            transport_errors: 0,
            timeouts: 0,
            records_sent: 0,
            accepted: 0,
            telemetry_accepted: 0,
            rejected: 0,
            failed: 0,
            bytes_sent: 0,
            last_answer: None,
        }
    }

    fn merge(&mut self, other: Self) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        self.calls += other.calls;
        self.transport_errors += other.transport_errors;
        self.timeouts += other.timeouts;
        self.records_sent += other.records_sent;
        self.accepted += other.accepted;
        self.telemetry_accepted += other.telemetry_accepted;
        self.rejected += other.rejected;
        self.failed += other.failed;
        self.bytes_sent += other.bytes_sent;
        self.last_answer = self.last_answer.max(other.last_answer);
    }
}

/// Runs the load described by `config` until its duration is over (or `shutdown`),
/// waits for the calls in flight, and reports. Writes the JSON report when asked.
pub async fn run(config: LoadgenArgs, shutdown: CancellationToken) -> Result<Report> {
    let authority = plan::authority(&config.target).map_err(|reason| LoadgenError::Config {
        setting: "--target",
        reason,
    })?;
    if !config.rate.is_finite() || config.rate < 0.0 {
        return Err(LoadgenError::Config {
            setting: "--rate",
            reason: format!(
                "{} is not a rate (records per second, 0 for closed loop)",
                config.rate
            ),
        });
    }
    if config.rate > 0.0
        && plan::due(1, config.rate, config.batch_size) > Duration::from_secs(86_400)
    {
        return Err(LoadgenError::Config {
            setting: "--rate",
            reason: format!(
                "{} records/s with batches of {} is less than one call a day",
                config.rate, config.batch_size
            ),
        });
    }
    if config.timeout.is_zero() {
        return Err(LoadgenError::Config {
            setting: "--timeout",
            reason: "must be more than zero".into(),
        });
    }
    if config.duration.is_zero() {
        return Err(LoadgenError::Config {
            setting: "--duration",
            reason: "must be more than zero".into(),
        });
    }
    let (tenants, auth) = tenants(&config)?;
    let calls = plan::calls_to_prepare(config.distinct_records, config.batch_size);
    let (seed, batch, telemetry, framing, compression) = (
        config.seed,
        config.batch_size,
        config.telemetry_percent,
        config.format,
        config.compression,
    );
    let names = tenants.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        plan::prepare(seed, &names, batch, calls, telemetry, framing, compression)
    })
    .await
    .map_err(|e| LoadgenError::Config {
        setting: "--distinct-records",
        reason: format!("generating the bodies failed: {e}"),
    })?;
    // Fail fast when nothing listens.
    TcpStream::connect(&authority)
        .await
        .map_err(|source| LoadgenError::Connect {
            target: authority.clone(),
            source,
        })?;
    let host = HeaderValue::from_str(&authority).map_err(|e| LoadgenError::Config {
        setting: "--target",
        reason: e.to_string(),
    })?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        calls: prepared,
        auth,
        authority,
        host,
        content_type: HeaderValue::from_static(config.format.content_type()),
        content_encoding: config
            .compression
            .content_encoding()
            .map(HeaderValue::from_static),
        next: AtomicU64::new(0),
        start,
        end: start + config.duration,
        rate: (config.rate > 0.0).then_some(config.rate),
        batch_size: config.batch_size,
        timeout: config.timeout,
    });
    tracing::info!(
        target = %config.target,
        batch = config.batch_size,
        connections = config.connections,
        rate = config.rate,
        "load started"
    );
    let mut tasks = JoinSet::new();
    for _ in 0..config.connections {
        tasks.spawn(connection(shared.clone(), shutdown.clone()));
    }
    let mut total = Tally::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(tally) => total.merge(tally),
            Err(e) => tracing::error!(error = %e, "a load connection task failed"),
        }
    }
    let report = report(&config, &shared, total, tenants.len());
    if let Some(path) = &config.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|source| LoadgenError::File {
            action: "writing the report to",
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(report)
}

/// The tenant names, and each one's `Authorization` when keys are used.
fn tenants(config: &LoadgenArgs) -> Result<(Vec<String>, Vec<Option<HeaderValue>>)> {
    let Some(path) = &config.api_keys else {
        let names: Vec<String> = (0..config.tenants)
            .map(|i| format!("{}{i}", config.tenant_prefix))
            .collect();
        let auth = vec![None; names.len()];
        return Ok((names, auth));
    };
    let text = std::fs::read_to_string(path).map_err(|source| LoadgenError::File {
        action: "reading the keys in",
        path: path.display().to_string(),
        source,
    })?;
    let keys = plan::parse_keys(&text).map_err(|reason| LoadgenError::Config {
        setting: "--api-keys",
        reason,
    })?;
    let mut names = Vec::with_capacity(keys.len());
    let mut auth = Vec::with_capacity(keys.len());
    for (tenant, key) in keys {
        let value =
            HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| LoadgenError::Config {
                setting: "--api-keys",
                reason: format!("the key of {tenant} is not a valid header value"),
            })?;
        names.push(tenant);
        auth.push(Some(value));
    }
    Ok((names, auth))
}

fn report(config: &LoadgenArgs, shared: &Shared, total: Tally, tenants: usize) -> Report {
    let elapsed = total
        .last_answer
        .map_or(config.duration, |last| {
            last.saturating_duration_since(shared.start)
        })
        .max(Duration::from_millis(1))
        .as_secs_f64();
    let not_sent = shared.rate.map_or(0, |rate| {
        let due = (config.duration.as_secs_f64() * rate / f64::from(config.batch_size)).ceil();
        (due as u64).saturating_sub(total.calls)
    });
    let answered: u64 = total.by_status.values().sum();
    Report {
        target: config.target.clone(),
        mode: if shared.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        rate: shared.rate,
        batch_size: config.batch_size,
        connections: config.connections,
        tenants: tenants as u32,
        format: config.format,
        compression: config.compression,
        telemetry_percent: config.telemetry_percent,
        elapsed_secs: elapsed,
        calls: total.calls,
        by_status: total.by_status,
        transport_errors: total.transport_errors,
        timeouts: total.timeouts,
        not_sent,
        records_sent: total.records_sent,
        accepted: total.accepted,
        telemetry_accepted: total.telemetry_accepted,
        rejected: total.rejected,
        failed: total.failed,
        bytes_sent: total.bytes_sent,
        records_per_sec: (total.accepted + total.telemetry_accepted) as f64 / elapsed,
        calls_per_sec: answered as f64 / elapsed,
        mb_per_sec: total.bytes_sent as f64 / 1e6 / elapsed,
        latency_ms: Latency::of(&total.histogram),
    }
}

/// A keep-alive connection's sender, or none after a failure.
type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(authority: &str, timeout: Duration) -> std::io::Result<Sender> {
    tokio::time::timeout(timeout, handshake(authority))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))?
}

async fn handshake(authority: &str) -> std::io::Result<Sender> {
    let stream = TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    // The driver ends when the sender is dropped or the peer closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One connection's loop: take the next call, wait until it is due (open loop), send
/// it, count the answer.
async fn connection(shared: Arc<Shared>, shutdown: CancellationToken) -> Tally {
    let mut tally = Tally::new();
    let mut sender: Option<Sender> = None;
    loop {
        if shutdown.is_cancelled() || Instant::now() >= shared.end {
            break;
        }
        let slot = shared.next.fetch_add(1, Ordering::Relaxed);
        let due = match shared.rate {
            Some(rate) => {
                let Some(due) = shared
                    .start
                    .checked_add(plan::due(slot, rate, shared.batch_size))
                    .filter(|due| *due < shared.end)
                else {
                    break;
                };
                tokio::select! {
                    () = tokio::time::sleep_until(due.into()) => {}
                    () = shutdown.cancelled() => break,
                }
                due
            }
            None => Instant::now(),
        };
        let index = (slot % shared.calls.len().max(1) as u64) as usize;
        let Some(call) = shared.calls.get(index) else {
            break;
        };
        // A connection the server closed after its last answer is replaced before the
        // call counts: nothing was sent on it.
        if let Some(s) = sender.as_mut() {
            let ready = tokio::time::timeout(shared.timeout, s.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                sender = None;
            }
        }
        if sender.is_none() {
            let connected = tokio::select! {
                c = connect(&shared.authority, shared.timeout) => c,
                () = shutdown.cancelled() => break,
            };
            match connected {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    tracing::debug!(error = %e, "connecting failed");
                    tally.calls += 1;
                    tally.transport_errors += 1;
                    tally.records_sent += u64::from(call.records);
                    tally.failed += u64::from(call.records);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        tally.calls += 1;
        tally.records_sent += u64::from(call.records);
        tally.bytes_sent += call.body.len() as u64;
        let answer = tokio::time::timeout(shared.timeout, send(s, &shared, call)).await;
        let now = Instant::now();
        match answer {
            Ok(Ok((status, body, close))) => {
                if close {
                    sender = None;
                }
                let micros = now.saturating_duration_since(due).as_micros();
                tally
                    .histogram
                    .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX).max(1));
                *tally.by_status.entry(status).or_default() += 1;
                let (accepted, rejected, failed) =
                    plan::outcome(status, call.records, call.single, &body);
                match call.kind {
                    Kind::Deliveries => tally.accepted += accepted,
                    Kind::Telemetry => tally.telemetry_accepted += accepted,
                }
                tally.rejected += rejected;
                tally.failed += failed;
                tally.last_answer = Some(now);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "call failed");
                tally.transport_errors += 1;
                tally.failed += u64::from(call.records);
                sender = None;
            }
            Err(_) => {
                tally.timeouts += 1;
                tally.failed += u64::from(call.records);
                sender = None;
            }
        }
    }
    tally
}

async fn send(
    sender: &mut Sender,
    shared: &Shared,
    call: &Prepared,
) -> std::result::Result<(u16, Bytes, bool), Box<dyn std::error::Error + Send + Sync>> {
    sender.ready().await?;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(call.path.as_str())
        .header(header::HOST, shared.host.clone())
        .header(
            header::CONTENT_TYPE,
            if call.single {
                HeaderValue::from_static("application/json")
            } else {
                shared.content_type.clone()
            },
        )
        .body(Full::new(call.body.clone()))?;
    let headers = request.headers_mut();
    if let (Some(encoding), false) = (&shared.content_encoding, call.single) {
        headers.insert(header::CONTENT_ENCODING, encoding.clone());
    }
    if let Some(Some(auth)) = shared.auth.get(call.tenant) {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let close = response
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok((status, body, close))
}
