//! The notifier: posts each change of a delivery to the webhooks its tenant registered.
//!
//! It reads `delivery-state` in its own consumer group (every new version of a delivery's
//! state is one notification: a stage change, or a position with the ETAs it moved) and
//! every registration on `webhooks` (each member reads all of it). For each endpoint of
//! the delivery's tenant that wants the kind, it queues the notification to the
//! endpoint's own worker, which POSTs it signed in the Standard Webhooks style
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature`) and retries with exponential
//! backoff until `--webhook-retry-for` has passed; then it goes to `dead-letters` with the
//! reason. An endpoint's notifications go out in order, one at a time, so a slow or
//! failing endpoint delays only itself; one whose queue is full has the overflow
//! dead-lettered at once instead of holding the others up.
//!
//! At-least-once: a record's offset is stored only once every notification it made was
//! answered 2xx or dead-lettered, so a restart sends again what was not; receivers
//! dedupe by `webhook-id` (`{deliveryId}.{version}`, the same on every retry).
//!
//! Outbound requests go only to the registered URL, without redirects or proxies, within
//! `--webhook-timeout-secs`, reading at most [`MAX_RESPONSE_BYTES`] of the answer; a URL
//! whose host is, or resolves to, a loopback, private or link-local address is refused
//! at send time too (DNS may have changed since registration) unless the operator
//! allows private addresses.
//!
//! It decides nothing about deliveries and keeps no state beyond what is in flight.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{ClientSettings, Consumer, Producer};
use bytes::Bytes;
use schemas::headers as h;
use schemas::signing::webhook_signatures;
use schemas::topics;
use schemas::tracking::{DeliveryState, EventKind};
use schemas::webhooks::{
    Host, Registration, Registry, is_forbidden_address, is_forbidden_host_name,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::error::{ProcessorError, Result};

/// For logs, metrics and errors.
pub const NAME: &str = "notifier";
/// Its consumer group.
pub const GROUP: &str = topics::groups::NOTIFIER;
/// What its group reads.
pub const INPUTS: &[&str] = &[topics::DELIVERY_STATE.name];
/// Notifications waiting for one endpoint; past it, new ones are dead-lettered.
pub const QUEUE_PER_ENDPOINT: usize = 1_000;
/// Most bytes of an endpoint's answer read (the rest is not waited for).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The longest `--webhook-retry-for`: below how long `delivery-state` keeps every change.
pub const MAX_RETRY_FOR: Duration = Duration::from_secs(5 * 3_600);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Deliveries whose last version is remembered to skip replays.
const SEEN_VERSIONS: usize = 200_000;

/// Settings of the notifier.
#[derive(Debug, Clone, clap::Args)]
pub struct NotifierArgs {
    /// Longest one webhook request may take, from connecting to the answer's last byte
    /// read; seconds.
    #[arg(
        long,
        env = "DRONEDELIVERY_WEBHOOK_TIMEOUT_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub webhook_timeout_secs: u64,

    /// How long a notification is retried after its first attempt failed; then it goes
    /// to `dead-letters`. Seconds, or with a unit: `90s`, `30m`, `5h`. At most 5 hours:
    /// the offsets wait for it, and `delivery-state` keeps every change for 6 hours
    /// before compaction, so a restart still finds what it sends again.
    #[arg(
        long,
        env = "DRONEDELIVERY_WEBHOOK_RETRY_FOR",
        default_value = "1h",
        value_parser = clock::parse_duration
    )]
    pub webhook_retry_for: Duration,

    /// Wait before the first retry, in milliseconds; it doubles after each failure, up
    /// to 5 minutes.
    #[arg(
        long,
        env = "DRONEDELIVERY_WEBHOOK_BACKOFF_MS",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(10..=300_000)
    )]
    pub webhook_backoff_ms: u64,

    /// Whether endpoints on loopback, private and link-local addresses are allowed (set
    /// by the binary from its `--webhooks-allow-private`).
    #[arg(skip)]
    pub allow_private: bool,
}

impl Default for NotifierArgs {
    fn default() -> Self {
        Self {
            webhook_timeout_secs: 10,
            webhook_retry_for: Duration::from_secs(3_600),
            webhook_backoff_ms: 1_000,
            allow_private: false,
        }
    }
}

/// The wait before attempt `attempt + 1` (after `attempt` failures, from 1), or `None`
/// when it would start past `retry_for` from the first attempt (`elapsed` ago).
pub fn next_attempt(
    attempt: u32,
    elapsed: Duration,
    first_backoff: Duration,
    retry_for: Duration,
) -> Option<Duration> {
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    let wait = first_backoff.saturating_mul(factor).min(MAX_BACKOFF);
    (elapsed.saturating_add(wait) <= retry_for).then_some(wait)
}

/// The body of a notification: `{"type", "timestamp", "data"}` (Standard Webhooks'
/// payload shape), `data` being the delivery's state.
pub fn payload_of(state: &DeliveryState, kind: EventKind) -> Bytes {
    let body = serde_json::json!({
        "type": format!("delivery.{}", kind.as_str()),
        "timestamp": state.updated_at,
        "data": state,
    });
    Bytes::from(body.to_string())
}

/// The `webhook-id` of a delivery's version: the same on every attempt and for every
/// endpoint, so receivers dedupe by it.
pub fn message_id(state: &DeliveryState) -> String {
    format!("{}.{}", state.delivery_id, state.version)
}

/// Every registration on `webhooks`, followed until `shutdown`, and whether what the
/// topic held at the start has been read.
pub type Registrations = (Arc<Registry>, tokio::sync::watch::Receiver<bool>);

/// Follows every registration on `webhooks` into a registry until `shutdown`.
pub fn follow_registrations(
    settings: ClientSettings,
    shutdown: CancellationToken,
) -> Registrations {
    let registry = Arc::new(Registry::default());
    let tail = Arc::clone(&registry);
    let ready = bus::spawn_tail(
        settings,
        topics::WEBHOOKS.name,
        topics::WEBHOOKS.partitions,
        NAME,
        shutdown,
        move |key, payload| {
            if let Ok(key) = std::str::from_utf8(key) {
                tail.apply(key, payload);
            }
        },
    );
    (registry, ready)
}

/// One notification for one endpoint.
#[derive(Debug)]
struct Job {
    tenant: String,
    endpoint: String,
    message_id: String,
    body: Bytes,
    /// The `delivery-state` record it came from, and the partition's generation then.
    partition: i32,
    offset: i64,
    generation: u64,
}

/// A job's end, for the offsets: partition, offset, generation.
type Done = (i32, i64, u64);

/// One partition's records whose notifications are not all done yet.
#[derive(Debug, Default)]
struct Pending {
    /// Offset → notifications left.
    left: BTreeMap<i64, usize>,
    /// The last offset read.
    last: i64,
    /// Which time this member holds the partition: a job of an earlier time (the
    /// partition was given away and came back) does not count.
    generation: u64,
}

/// Records of each partition whose notifications are not all done yet.
#[derive(Debug, Default)]
struct Offsets {
    partitions: HashMap<i32, Pending>,
    generations: u64,
}

impl Offsets {
    /// Record `offset` of `partition` was read and made `jobs` notifications; the
    /// partition's generation, for them.
    fn read(&mut self, partition: i32, offset: i64, jobs: usize) -> u64 {
        let generations = &mut self.generations;
        let part = self.partitions.entry(partition).or_insert_with(|| {
            *generations += 1;
            Pending {
                generation: *generations,
                ..Pending::default()
            }
        });
        part.last = offset;
        if jobs > 0 {
            *part.left.entry(offset).or_default() += jobs;
        }
        part.generation
    }

    /// One notification of that record is done.
    fn done(&mut self, partition: i32, offset: i64, generation: u64) {
        if let Some(part) = self.partitions.get_mut(&partition)
            && part.generation == generation
            && let Some(left) = part.left.get_mut(&offset)
        {
            *left -= 1;
            if *left == 0 {
                part.left.remove(&offset);
            }
        }
    }

    /// The last offset of `partition` whose record and every one before it are done.
    fn storable(&self, partition: i32) -> Option<i64> {
        let part = self.partitions.get(&partition)?;
        match part.left.first_key_value() {
            Some((first, _)) => (*first > 0).then(|| first - 1),
            None => Some(part.last),
        }
    }

    fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

/// The HTTP client of every worker: no redirects, no proxy, a resolver that refuses
/// forbidden addresses.
fn client(config: &NotifierArgs) -> Result<reqwest::Client> {
    let timeout = Duration::from_secs(config.webhook_timeout_secs.max(1));
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(2)
        .user_agent(concat!(
            "dronedelivery-webhooks/",
            env!("CARGO_PKG_VERSION")
        ))
        .dns_resolver(Arc::new(GuardedResolver {
            allow_private: config.allow_private,
        }))
        .build()
        .map_err(|e| ProcessorError::Config {
            reason: format!("webhook client: {e}"),
        })
}

/// Resolves names and drops forbidden addresses (unless private ones are allowed).
#[derive(Debug)]
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        let name = name.as_str().to_owned();
        Box::pin(async move {
            if !allow && is_forbidden_host_name(&name) {
                return Err(format!("{name} is not a public host name").into());
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| allow || !is_forbidden_address(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{name} resolves to no public address").into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Why one attempt failed.
#[derive(Debug)]
enum Attempt {
    /// Worth retrying.
    Retry(String),
    /// Never deliverable to this URL (refused address, malformed URL).
    Refused(String),
}

/// One POST of `job` to `registration`'s URL.
async fn attempt(
    client: &reqwest::Client,
    registration: &Registration,
    job: &Job,
    allow_private: bool,
) -> std::result::Result<(), Attempt> {
    let url = schemas::webhooks::parse_webhook_url(&registration.url)
        .map_err(|e| Attempt::Refused(format!("invalid URL: {e}")))?;
    if let Host::Ip(ip) = url.host
        && !allow_private
        && is_forbidden_address(ip)
    {
        return Err(Attempt::Refused(format!("address {ip} is not allowed")));
    }
    let now = chrono::Utc::now();
    let secrets = registration.signing_secrets(now.timestamp_millis());
    let timestamp = now.timestamp();
    let signature = webhook_signatures(&secrets, &job.message_id, timestamp, &job.body);
    let sent = client
        .post(&registration.url)
        .header("content-type", "application/json")
        .header("webhook-id", &job.message_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(job.body.clone())
        .send()
        .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(e) => {
            // The resolver's refusal is as permanent as the address's.
            let text = error_chain(&e);
            return Err(
                if text.contains("not a public host") || text.contains("no public address") {
                    Attempt::Refused(text)
                } else {
                    Attempt::Retry(text)
                },
            );
        }
    };
    let status = response.status();
    // Read a bounded part of the answer, so the connection can be reused; no more.
    let mut read = 0usize;
    while read < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => break,
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(Attempt::Retry(format!("answered {status}")))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What every worker shares.
struct Shared {
    config: NotifierArgs,
    client: reqwest::Client,
    registry: Arc<Registry>,
    producer: Producer,
    done: mpsc::Sender<Done>,
    shutdown: CancellationToken,
}

/// Sends `job` to `dead-letters` with `reason` (retrying until it is acknowledged or
/// the notifier stops), then reports it done.
async fn dead_letter(shared: &Shared, job: Job, reason: &str) {
    metrics::counter!("webhook_dead_letters_total").increment(1);
    tracing::warn!(
        tenant = %job.tenant,
        endpoint = %job.endpoint,
        id = %job.message_id,
        %reason,
        "{NAME}: notification dead-lettered"
    );
    let source = format!(
        "{}/{}/{}",
        topics::DELIVERY_STATE.name,
        job.partition,
        job.offset
    );
    let headers: [(&str, &[u8]); 5] = [
        (h::DEAD_LETTER_REASON, reason.as_bytes()),
        (h::DEAD_LETTER_SOURCE, source.as_bytes()),
        (h::TENANT, job.tenant.as_bytes()),
        (h::WEBHOOK_ENDPOINT, job.endpoint.as_bytes()),
        (h::WEBHOOK_ID, job.message_id.as_bytes()),
    ];
    let key = format!("{}/{}", job.tenant, job.endpoint);
    let mut wait = Duration::from_millis(100);
    loop {
        let record = bus::OutRecord {
            topic: topics::DEAD_LETTERS.name,
            key: key.as_bytes(),
            payload: &job.body,
            headers: &headers,
        };
        let sent = match shared.producer.send(record) {
            Ok(ack) => ack.await.map(|_| ()),
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "{NAME}: dead letter not written; retrying");
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    let _ = shared
        .done
        .send((job.partition, job.offset, job.generation))
        .await;
}

/// An endpoint's worker: its jobs in order, each until delivered or dead-lettered.
async fn worker(shared: Arc<Shared>, mut jobs: mpsc::Receiver<Job>) {
    let first_backoff = Duration::from_millis(shared.config.webhook_backoff_ms.max(1));
    loop {
        let job = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            job = jobs.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            // The registration as it is now: rotated secrets and a changed URL apply to
            // what is still queued; a deleted endpoint gets nothing more.
            let Some(registration) = shared.registry.get(&job.tenant, &job.endpoint) else {
                let _ = shared
                    .done
                    .send((job.partition, job.offset, job.generation))
                    .await;
                if jobs.is_empty() {
                    // Deleted: this worker ends (the notifier starts a new one if the
                    // endpoint comes back); what was queued meanwhile is done too.
                    jobs.close();
                    while let Ok(job) = jobs.try_recv() {
                        let _ = shared
                            .done
                            .send((job.partition, job.offset, job.generation))
                            .await;
                    }
                    return;
                }
                break;
            };
            attempts += 1;
            let result = tokio::select! {
                () = shared.shutdown.cancelled() => return,
                result = attempt(&shared.client, &registration, &job, shared.config.allow_private) => result,
            };
            let reason = match result {
                Ok(()) => {
                    metrics::counter!("webhook_deliveries_total", "outcome" => "delivered")
                        .increment(1);
                    let _ = shared
                        .done
                        .send((job.partition, job.offset, job.generation))
                        .await;
                    break;
                }
                Err(Attempt::Refused(reason)) => {
                    dead_letter(&shared, job, &format!("webhook refused: {reason}")).await;
                    break;
                }
                Err(Attempt::Retry(reason)) => reason,
            };
            metrics::counter!("webhook_deliveries_total", "outcome" => "failed").increment(1);
            match next_attempt(
                attempts,
                started.elapsed(),
                first_backoff,
                shared.config.webhook_retry_for,
            ) {
                Some(wait) => {
                    tracing::debug!(endpoint = %job.endpoint, %reason, ?wait, "{NAME}: retrying");
                    tokio::select! {
                        () = shared.shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                None => {
                    let reason = format!(
                        "webhook not delivered in {attempts} attempts over {:?}: {reason}",
                        started.elapsed()
                    );
                    dead_letter(&shared, job, &reason).await;
                    break;
                }
            }
        }
    }
}

/// Runs the notifier until `shutdown` is cancelled, with the endpoints of `registry`
/// (see [`follow_registrations`]). Dead letters go through `producer`.
pub async fn run(
    config: NotifierArgs,
    settings: ClientSettings,
    registrations: Registrations,
    producer: Producer,
    shutdown: CancellationToken,
) -> Result<()> {
    if config.webhook_retry_for > MAX_RETRY_FOR {
        return Err(ProcessorError::Config {
            reason: format!(
                "--webhook-retry-for must be at most {}h: delivery-state keeps every change \
                 for {}h before compaction",
                MAX_RETRY_FOR.as_secs() / 3_600,
                topics::DELIVERY_STATE.min_compaction_lag_ms / 3_600_000
            ),
        });
    }
    let (registry, mut loaded) = registrations;
    // Notifications are made only once every registration is known: a record read
    // before would be notified to nobody, and its offset stored.
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        loaded = loaded.wait_for(|ready| *ready) => {
            if loaded.is_err() {
                return Ok(());
            }
        }
    }
    let bus_err = |source| ProcessorError::Bus {
        processor: NAME,
        source: Box::new(source),
    };
    let stop = shutdown.child_token();
    let consumer = Consumer::subscribe(&settings, GROUP, INPUTS).map_err(bus_err)?;
    let _lag = consumer
        .lag_probe()
        .report(GROUP, Duration::from_secs(10), stop.clone());
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(4_096);
    let shared = Arc::new(Shared {
        client: client(&config)?,
        config,
        registry: Arc::clone(&registry),
        producer,
        done: done_tx,
        shutdown: stop.clone(),
    });
    let mut workers: HashMap<String, mpsc::Sender<Job>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut offsets = Offsets::default();
    let mut seen: HashMap<i32, HashMap<String, u64>> = HashMap::new();
    // Notifications dead-lettered because their endpoint's queue is full: one writer,
    // a bounded queue (when the writer cannot keep up, reading waits for it).
    let (overflow, mut overflowed) = mpsc::channel::<Job>(QUEUE_PER_ENDPOINT);
    let writer = Arc::clone(&shared);
    tasks.spawn(async move {
        while let Some(job) = overflowed.recv().await {
            dead_letter(&writer, job, "webhook endpoint's queue is full").await;
        }
    });
    let topic = topics::DELIVERY_STATE.name;
    let store = |offsets: &Offsets, partition: i32| {
        if let Some(offset) = offsets.storable(partition) {
            // A partition given away meanwhile: its new owner sends again.
            let _ = consumer.store(topic, partition, offset);
        }
    };
    // Partitions given away: what they had is forgotten (their jobs, if they finish,
    // no longer count: a partition that comes back is a new holding).
    let revoked = |offsets: &mut Offsets, seen: &mut HashMap<i32, HashMap<String, u64>>| {
        for (_, partition) in consumer.take_revoked() {
            offsets.forget(partition);
            seen.remove(&partition);
        }
    };
    loop {
        revoked(&mut offsets, &mut seen);
        // Finished workers and dead-letter tasks are reaped as they end.
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some((partition, offset, generation)) = done_rx.recv() => {
                offsets.done(partition, offset, generation);
                store(&offsets, partition);
            }
            received = consumer.recv() => {
                let record = match received {
                    Ok(record) => record,
                    Err(e) => {
                        tracing::warn!(error = %e, "{NAME}: receive failed");
                        continue;
                    }
                };
                // A rebalance served by this receive comes first.
                revoked(&mut offsets, &mut seen);
                let (partition, offset) = (record.partition(), record.offset());
                let mut jobs =
                    notifications(&record, &registry, seen.entry(partition).or_default());
                let generation = offsets.read(partition, offset, jobs.len());
                for job in &mut jobs {
                    job.generation = generation;
                }
                for job in jobs {
                    let key = format!("{}/{}", job.tenant, job.endpoint);
                    let job = match workers.get(&key) {
                        None => job,
                        Some(w) => match w.try_send(job) {
                            Ok(()) => continue,
                            Err(mpsc::error::TrySendError::Full(job)) => {
                                // Waiting for room in the overflow queue, the loop still
                                // takes what workers finish (the dead-letter writer
                                // reports to it too).
                                loop {
                                    tokio::select! {
                                        () = stop.cancelled() => break,
                                        permit = overflow.reserve() => {
                                            if let Ok(permit) = permit {
                                                permit.send(job);
                                            }
                                            break;
                                        }
                                        Some((p, o, g)) = done_rx.recv() => {
                                            offsets.done(p, o, g);
                                            store(&offsets, p);
                                        }
                                    }
                                }
                                continue;
                            }
                            Err(mpsc::error::TrySendError::Closed(job)) => job,
                        },
                    };
                    // No worker (or it ended): start one with this job first.
                    let (tx, rx) = mpsc::channel(QUEUE_PER_ENDPOINT);
                    let _ = tx.try_send(job);
                    workers.insert(key, tx);
                    tasks.spawn(worker(Arc::clone(&shared), rx));
                }
                store(&offsets, partition);
            }
        }
    }
    drop(workers);
    drop(overflow);
    tasks.shutdown().await;
    // What finished before the stop is stored, and goes to the group now rather than
    // with the next auto-commit.
    while let Ok((partition, offset, generation)) = done_rx.try_recv() {
        offsets.done(partition, offset, generation);
        store(&offsets, partition);
    }
    if let Err(e) = consumer.commit() {
        tracing::debug!(error = %e, "{NAME}: final commit");
    }
    tracing::info!("{NAME}: stopped");
    Ok(())
}

/// The notifications of one `delivery-state` record: one per endpoint of its tenant
/// that wants its kind of change. Markers, records waiting for a request, tombstones,
/// states from before versions and versions already seen make none.
fn notifications(
    record: &bus::Received<'_>,
    registry: &Registry,
    seen: &mut HashMap<String, u64>,
) -> Vec<Job> {
    let Some(key) = record.key().and_then(|k| std::str::from_utf8(k).ok()) else {
        return Vec::new();
    };
    let marker = char::from(topics::CHANGELOG_MARKER);
    if key.starts_with([marker, '\u{1}']) {
        return Vec::new();
    }
    let payload = record.payload().unwrap_or_default();
    if payload.is_empty() {
        seen.remove(key);
        return Vec::new();
    }
    let Ok(state) = serde_json::from_slice::<DeliveryState>(payload) else {
        return Vec::new();
    };
    if state.version == 0 || seen.get(key).is_some_and(|v| *v >= state.version) {
        return Vec::new();
    }
    if seen.len() >= SEEN_VERSIONS {
        // Only replays are skipped by it; past the bound it starts over.
        seen.clear();
    }
    seen.insert(key.to_owned(), state.version);
    let kind = state.change.unwrap_or(EventKind::Stage);
    let endpoints = registry.endpoints(&state.owner_id, kind);
    if endpoints.is_empty() {
        return Vec::new();
    }
    let body = payload_of(&state, kind);
    let message_id = message_id(&state);
    endpoints
        .iter()
        .map(|r| Job {
            tenant: state.owner_id.clone(),
            endpoint: r.id.clone(),
            message_id: message_id.clone(),
            body: body.clone(),
            partition: record.partition(),
            offset: record.offset(),
            generation: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_within_the_retry_time() {
        let first = Duration::from_secs(1);
        let retry_for = Duration::from_secs(60);
        let zero = Duration::ZERO;
        assert_eq!(next_attempt(1, zero, first, retry_for), Some(first));
        assert_eq!(
            next_attempt(3, zero, first, retry_for),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            next_attempt(40, zero, first, Duration::from_secs(3_600)),
            Some(MAX_BACKOFF),
            "capped, never overflowing"
        );
        assert_eq!(
            next_attempt(1, Duration::from_secs(59), first, retry_for),
            Some(first)
        );
        assert_eq!(
            next_attempt(2, Duration::from_secs(59), first, retry_for),
            None
        );
    }

    #[test]
    fn offsets_are_stored_only_up_to_the_first_record_not_done() {
        let mut o = Offsets::default();
        let g = o.read(0, 10, 0);
        assert_eq!(o.storable(0), Some(10));
        o.read(0, 11, 2);
        o.read(0, 12, 0);
        o.read(0, 13, 1);
        assert_eq!(o.storable(0), Some(10));
        o.done(0, 13, g);
        assert_eq!(o.storable(0), Some(10), "11 still waits");
        o.done(0, 11, g);
        assert_eq!(o.storable(0), Some(10));
        o.done(0, 11, g);
        assert_eq!(o.storable(0), Some(13));
        assert_eq!(o.storable(1), None);
        o.read(0, 0, 1);
        assert_eq!(o.storable(0), None, "nothing before offset 0");
        // Given away and back: the jobs of before do not count for the records of now.
        o.forget(0);
        let now = o.read(0, 20, 1);
        assert_ne!(now, g);
        o.done(0, 20, g);
        assert_eq!(o.storable(0), Some(19), "20 still waits");
        o.done(0, 20, now);
        assert_eq!(o.storable(0), Some(20));
    }
}
