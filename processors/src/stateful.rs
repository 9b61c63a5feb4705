//! The engine of the stateful processors (scheduling, tracking, deliveries): a consumer
//! group member that keeps its state in memory, per input partition, and durable in a
//! changelog topic whose partition numbers match the input's.
//!
//! Records are handled in batches. For each batch: apply every record to the state (a
//! [`Machine`], pure apart from its own memory), produce what it said and wait for every
//! acknowledgement, then write the changed state and, per input partition, the offset of
//! the last record applied (a marker in the changelog, under
//! [`schemas::topics::changelog_marker_key`]), wait again, and only then store
//! the input offsets. So:
//!
//! - a crash before the changelog write re-reads the batch from old state: outputs may be
//!   repeated (downstream is idempotent), nothing is lost;
//! - a crash after it re-reads records the changelog already covers: they are skipped,
//!   so no effect is applied twice.
//!
//! A partition's state is restored from its changelog partition before its first record
//! is handled, again after it was revoked and came back, and whenever its offsets jump
//! (another member handled records of it in between). Records of a partition revoked
//! while a batch was being collected are dropped unhandled: the new owner handles them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bus::{ClientSettings, Consumer, Producer};
use schemas::topics;
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, Result};
use crate::output::{Output, produce_batch};

/// A record as received, owned.
#[derive(Debug, Clone)]
pub struct Record {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The key, if any.
    pub key: Option<Vec<u8>>,
    /// The payload, if any.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The key as text (empty when none or not UTF-8).
    pub fn key_text(&self) -> &str {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or_default()
    }

    /// `topic/partition/offset`, for dead letters and logs.
    pub fn source(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }

    /// A dead letter of this record: its key, payload and headers, with the reason.
    pub fn dead_letter(&self, reason: &str) -> Output {
        let mut headers = self.headers.clone();
        headers.push((
            schemas::headers::DEAD_LETTER_REASON.to_owned(),
            reason.as_bytes().to_vec(),
        ));
        headers.push((
            schemas::headers::DEAD_LETTER_SOURCE.to_owned(),
            self.source().into_bytes(),
        ));
        metrics::counter!("processor_dead_letters_total", "topic" => self.topic.clone())
            .increment(1);
        Output {
            topic: schemas::topics::DEAD_LETTERS.name,
            key: self.key.clone().unwrap_or_default(),
            payload: self.payload.clone().unwrap_or_default(),
            headers,
        }
    }
}

/// A state change: key and new value (empty for deleted).
pub type Change = (Vec<u8>, Vec<u8>);

/// What handling one record produced.
#[derive(Debug, Default)]
pub struct Effects {
    /// Records for other topics.
    pub outputs: Vec<Output>,
    /// State changes for the record's changelog partition: key and new value (empty for
    /// deleted).
    pub changes: Vec<Change>,
}

/// The state and decisions of one stateful processor.
pub trait Machine: Send + 'static {
    /// Forgets what it knew of `partition` and rebuilds it from the latest value of
    /// every key in its changelog (deleted keys are left out).
    fn restore(&mut self, partition: i32, entries: HashMap<Vec<u8>, Vec<u8>>);

    /// Handles one record of a restored partition at `now_ms`.
    fn handle(&mut self, record: &Record, now_ms: i64, effects: &mut Effects);

    /// Drops what it keeps of `partition` (revoked: another member owns it now).
    fn forget(&mut self, partition: i32);

    /// Time-driven decisions for a restored `partition` at `now_ms` (processing time):
    /// expiry, retention, eviction. The engine calls it after each batch for every
    /// partition the batch touched, and about once a second for every restored partition
    /// while no records arrive; its effects are written like a record's (in the same
    /// transaction under exactly-once). The default does nothing.
    fn tick(&mut self, partition: i32, now_ms: i64, effects: &mut Effects) {
        let _ = (partition, now_ms, effects);
    }
}

/// What a stateful processor reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// For logs, metrics and errors.
    pub name: &'static str,
    /// Its consumer group.
    pub group: &'static str,
    /// Its input topics (keyed alike, with the changelog's partition count).
    pub inputs: &'static [&'static str],
    /// Its changelog topic.
    pub changelog: &'static str,
}

/// Settings of the stateful processors.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most records handled in one batch.
    pub batch_records: usize,
    /// How long a batch waits for more records after its first.
    pub batch_wait: Duration,
    /// How long restoring one partition may take.
    pub restore_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_records: 2000,
            batch_wait: Duration::from_millis(5),
            restore_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default)]
struct PartitionInfo {
    restored: bool,
    /// Per input topic: the last offset whose effects are in the state.
    applied: HashMap<String, i64>,
    /// Per input topic: the offset expected next (a jump means someone else handled
    /// records of this partition meanwhile).
    next: HashMap<String, i64>,
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How often a consumer's lag is reported.
const LAG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `machine` until `shutdown` is cancelled.
pub async fn run<M: Machine>(
    spec: Spec,
    config: EngineConfig,
    mut machine: M,
    settings: ClientSettings,
    producer: Producer,
    shutdown: CancellationToken,
) -> Result<()> {
    let bus_err = |source| ProcessorError::Bus {
        processor: spec.name,
        source,
    };
    let consumer =
        Consumer::subscribe_copartitioned(&settings, spec.group, spec.inputs).map_err(bus_err)?;
    let _lag = consumer
        .lag_probe()
        .report(spec.group, LAG_EVERY, shutdown.clone());
    let mut partitions: HashMap<i32, PartitionInfo> = HashMap::new();
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            received = consumer.recv() => received,
        };
        let mut batch = Vec::new();
        // Partitions revoked during a `recv` lose the records received before it (their
        // new owner handles them; a partition given back restarts from its committed
        // offset); the record that `recv` returned is from the new assignment.
        let mut forgotten: HashSet<i32> = HashSet::new();
        let mut collect = |batch: &mut Vec<Record>,
                           partitions: &mut HashMap<i32, PartitionInfo>,
                           received: bus::Result<bus::Received<'_>>|
         -> bool {
            let revoked = consumer.take_revoked();
            if !revoked.is_empty() {
                let gone: HashSet<i32> = revoked.iter().map(|(_, p)| *p).collect();
                let before = batch.len();
                batch.retain(|r| !gone.contains(&r.partition));
                for p in &gone {
                    partitions.remove(p);
                    forgotten.insert(*p);
                }
                tracing::info!(processor = spec.name, partitions = ?gone, dropped = before - batch.len(), "partitions revoked");
            }
            match received {
                Ok(record) => {
                    batch.push(own(&record));
                    true
                }
                Err(e) => {
                    tracing::warn!(processor = spec.name, error = %e, "receive failed");
                    false
                }
            }
        };
        if !collect(&mut batch, &mut partitions, first) {
            continue;
        }
        while batch.len() < config.batch_records.max(1) {
            match tokio::time::timeout(config.batch_wait, consumer.recv()).await {
                Ok(received) => {
                    if !collect(&mut batch, &mut partitions, received) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        for p in forgotten {
            machine.forget(p);
        }
        let mut effects = Effects::default();
        // Per changelog partition: state changes in order, and the markers.
        let mut changes: BTreeMap<i32, Vec<Change>> = BTreeMap::new();
        let mut markers: BTreeMap<(i32, String), i64> = BTreeMap::new();
        let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let now = now_millis();
        let mut handled = 0u64;
        let mut skipped = 0u64;
        for record in &batch {
            let info = partitions.entry(record.partition).or_default();
            let jumped = info
                .next
                .get(&record.topic)
                .is_some_and(|next| record.offset > *next);
            if !info.restored || jumped {
                let Some(entries) =
                    restore(&settings, spec, config, record.partition, &shutdown).await
                else {
                    break;
                };
                info.applied = entries.markers;
                info.restored = true;
                machine.restore(record.partition, entries.state);
            }
            info.next.insert(record.topic.clone(), record.offset + 1);
            last.insert((record.topic.clone(), record.partition), record.offset);
            if info
                .applied
                .get(&record.topic)
                .is_some_and(|applied| record.offset <= *applied)
            {
                skipped += 1;
                continue;
            }
            info.applied.insert(record.topic.clone(), record.offset);
            let mut own_effects = Effects::default();
            machine.handle(record, now, &mut own_effects);
            effects.outputs.append(&mut own_effects.outputs);
            changes
                .entry(record.partition)
                .or_default()
                .append(&mut own_effects.changes);
            markers.insert((record.partition, record.topic.clone()), record.offset);
            handled += 1;
        }
        if shutdown.is_cancelled() && handled == 0 {
            break;
        }
        metrics::counter!("processor_records_total", "processor" => spec.name, "outcome" => "handled")
            .increment(handled);
        metrics::counter!("processor_records_total", "processor" => spec.name, "outcome" => "skipped_replay")
            .increment(skipped);
        // Outputs, then state, then markers, each acknowledged before the next: a marker
        // is never durable before the state it covers (see the module docs).
        let outputs = effects.outputs.into_iter().map(|o| (o, None)).collect();
        if !produce_batch(&producer, outputs, &shutdown, spec.name).await {
            break;
        }
        let mut state_writes = Vec::new();
        for (partition, list) in changes {
            for (key, value) in latest_per_key(list) {
                state_writes.push((changelog_record(spec, key, value), Some(partition)));
            }
        }
        if !produce_batch(&producer, state_writes, &shutdown, spec.name).await {
            break;
        }
        let marker_writes = markers
            .into_iter()
            .map(|((partition, topic), offset)| {
                (
                    changelog_record(
                        spec,
                        topics::changelog_marker_key(&topic),
                        offset.to_string().into_bytes(),
                    ),
                    Some(partition),
                )
            })
            .collect();
        if !produce_batch(&producer, marker_writes, &shutdown, spec.name).await {
            break;
        }
        for ((topic, partition), offset) in last {
            if let Err(e) = consumer.store(&topic, partition, offset) {
                tracing::debug!(processor = spec.name, %topic, partition, error = %e, "offset not stored (revoked?)");
            }
        }
    }
    let committed = tokio::task::spawn_blocking(move || consumer.commit())
        .await
        .map_err(|e| ProcessorError::Task {
            processor: spec.name,
            reason: e.to_string(),
        })?;
    if let Err(e) = committed {
        tracing::warn!(processor = spec.name, error = %e, "final commit failed; the last records will be re-read");
    }
    tracing::info!(processor = spec.name, "stopped");
    Ok(())
}

/// The last value of each key, in the order the keys first changed.
fn latest_per_key(list: Vec<Change>) -> Vec<Change> {
    let mut latest: Vec<Change> = Vec::with_capacity(list.len());
    let mut at: HashMap<Vec<u8>, usize> = HashMap::new();
    for (key, value) in list {
        match at.get(&key) {
            Some(&i) => latest[i].1 = value,
            None => {
                at.insert(key.clone(), latest.len());
                latest.push((key, value));
            }
        }
    }
    latest
}

fn changelog_record(spec: Spec, key: Vec<u8>, value: Vec<u8>) -> Output {
    Output {
        topic: spec.changelog,
        key,
        payload: value,
        headers: Vec::new(),
    }
}

fn own(record: &bus::Received<'_>) -> Record {
    Record {
        topic: record.topic().to_owned(),
        partition: record.partition(),
        offset: record.offset(),
        key: record.key().map(<[u8]>::to_vec),
        payload: record.payload().map(<[u8]>::to_vec),
        headers: record
            .headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect(),
    }
}

/// A partition's changelog, folded: the latest state per key and the offset markers.
struct Restored {
    state: HashMap<Vec<u8>, Vec<u8>>,
    markers: HashMap<String, i64>,
}

/// Restores `partition`, retrying (with backoff) until it succeeds or `shutdown` is
/// cancelled (then `None`).
async fn restore(
    settings: &ClientSettings,
    spec: Spec,
    config: EngineConfig,
    partition: i32,
    shutdown: &CancellationToken,
) -> Option<Restored> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match restore_once(settings, spec, config, partition).await {
            Ok(restored) => return Some(restored),
            Err(e) => {
                tracing::warn!(processor = spec.name, partition, error = %e, ?backoff, "restore failed; retrying");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn restore_once(
    settings: &ClientSettings,
    spec: Spec,
    config: EngineConfig,
    partition: i32,
) -> Result<Restored> {
    let started = std::time::Instant::now();
    let settings = settings.clone();
    let records = tokio::task::spawn_blocking(move || {
        bus::read_partition(&settings, spec.changelog, partition, config.restore_timeout)
    })
    .await
    .map_err(|e| ProcessorError::Task {
        processor: spec.name,
        reason: e.to_string(),
    })?
    .map_err(|source| ProcessorError::Bus {
        processor: spec.name,
        source,
    })?;
    let read = records.len();
    let mut state = HashMap::new();
    let mut markers = HashMap::new();
    for record in records {
        if let Some((&topics::CHANGELOG_MARKER, topic)) = record.key.split_first() {
            let topic = String::from_utf8_lossy(topic).into_owned();
            if let Some(offset) = std::str::from_utf8(&record.payload)
                .ok()
                .and_then(|t| t.parse().ok())
            {
                markers.insert(topic, offset);
            }
        } else if record.payload.is_empty() {
            state.remove(&record.key);
        } else {
            state.insert(record.key, record.payload);
        }
    }
    tracing::info!(
        processor = spec.name,
        partition,
        records = read,
        keys = state.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "state restored"
    );
    Ok(Restored { state, markers })
}
