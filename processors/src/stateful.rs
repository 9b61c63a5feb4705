//! The engine of the stateful processors (scheduling, tracking, deliveries): a consumer
//! group member that keeps its state in memory, per input partition, and durable in a
//! changelog topic whose partition numbers match the input's.
//!
//! Records are handled in [batches](crate::batch). For each batch: apply every record to
//! the state (a [`Machine`], pure apart from its own memory), let the machine's
//! [`tick`](Machine::tick) decide what time alone changes, then make it all durable
//! through the [committer](crate::commit), under the guarantee in force:
//!
//! - exactly-once: the outputs, the changed state and the input offsets commit in one
//!   transaction. A failed one is aborted: the batch's partitions are restored from the
//!   changelog (read committed) and their input is read again from the committed
//!   offsets, so no effect is applied twice and none is lost;
//! - at-least-once: outputs, then the changed state with, per input partition, the offset
//!   of the last record applied (a marker in the changelog, under
//!   [`schemas::topics::changelog_marker_key`]), each acknowledged before the next, and
//!   only then the input offsets are stored. A crash before the changelog write re-reads
//!   the batch from old state (outputs may be repeated); a crash after it re-reads
//!   records the changelog already covers, which are skipped.
//!
//! A partition's state is restored from its changelog partition once it is assigned
//! (at the next tick, about once a second, once its committed offsets are stable; or
//! before its first record is handled if that comes first), again after it was revoked and came back, after an aborted transaction, and
//! (at-least-once) whenever its offsets jump (another member handled records of it in
//! between; under exactly-once, offsets have gaps where transaction markers are). So
//! every assigned partition is ticked, with or without traffic. A batch never holds
//! records of a partition revoked while it was collected: the new owner handles them.
//!
//! Under exactly-once, every transaction carries input offsets, also one that holds only
//! the effects of ticks (the offsets the ticked partitions are at): the group refuses
//! them from a member that lost its partitions in a rebalance, so a paused member that
//! goes on cannot commit what it decided for partitions it no longer owns.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use std::sync::Arc;

use bus::{ClientSettings, Consumer};
use schemas::topics;
use tokio_util::sync::CancellationToken;

use crate::batch::Batch;
pub use crate::batch::Record;
use crate::commit::{Committed, Committer, Stages};
use crate::error::{ProcessorError, Result};
use crate::guarantee::{Durability, Guarantee};
use crate::output::Output;

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
    /// Whether a batch writes only the latest value of each changed key (fewer records),
    /// or every change in order (the changelog is then also the stream of changes that
    /// live notifications read).
    pub coalesce: bool,
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

impl EngineConfig {
    /// The defaults under `guarantee`: under exactly-once a batch waits longer for more
    /// records (100 ms, Kafka Streams' commit interval under exactly-once), since each
    /// batch is a transaction.
    pub fn for_guarantee(guarantee: Guarantee) -> Self {
        match guarantee {
            Guarantee::AtLeastOnce => Self::default(),
            Guarantee::ExactlyOnce => Self {
                batch_wait: Duration::from_millis(100),
                ..Self::default()
            },
        }
    }
}

/// Most records in one batch, by default: large enough that a batch's acknowledged
/// stages are paid for by many records.
pub const BATCH_RECORDS: usize = 10_000;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_records: BATCH_RECORDS,
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

/// How long one partition's starting offsets may take to read during an eager restore
/// (a later tick tries again).
const START_LOOKUP: Duration = Duration::from_secs(1);

/// How often every restored partition is ticked while no records arrive.
const TICK_EVERY: Duration = Duration::from_secs(1);

/// Runs `machine` until `shutdown` is cancelled, or until its producer is fenced (an
/// error: a newer member with this member's instance id took over).
pub async fn run<M: Machine>(
    spec: Spec,
    config: EngineConfig,
    mut machine: M,
    settings: ClientSettings,
    durability: Durability,
    shutdown: CancellationToken,
) -> Result<()> {
    let bus_err = |source| ProcessorError::Bus {
        processor: spec.name,
        source: Box::new(source),
    };
    let Some(mut committer) = Committer::open(spec.name, &durability, &shutdown).await? else {
        return Ok(());
    };
    let exactly_once = committer.guarantee() == Guarantee::ExactlyOnce;
    let consumer = Arc::new(
        committer
            .subscribe(&settings, spec.group, spec.inputs, true)
            .map_err(bus_err)?,
    );
    let _lag = consumer
        .lag_probe()
        .report(spec.group, LAG_EVERY, shutdown.clone());
    let mut partitions: HashMap<i32, PartitionInfo> = HashMap::new();
    let mut ticked_all = std::time::Instant::now();
    let mut ticks = tokio::time::interval(TICK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (batch, tick) = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => (Batch::revocations(&consumer, spec.name), true),
            received = consumer.recv() => {
                let batch = Batch::collect(&consumer, received, config.batch_records, config.batch_wait, spec.name).await;
                (batch, false)
            }
        };
        for p in &batch.revoked {
            partitions.remove(p);
            machine.forget(*p);
        }
        if tick {
            let restored = restore_assigned(
                &consumer,
                &mut partitions,
                &mut machine,
                &settings,
                spec,
                config,
                &shutdown,
            )
            .await;
            if !restored {
                break;
            }
        }
        let mut outputs = Vec::new();
        // Per changelog partition: state changes in order, and the markers.
        let mut changes: BTreeMap<i32, Vec<Change>> = BTreeMap::new();
        let mut markers: BTreeMap<(i32, String), i64> = BTreeMap::new();
        let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut now = now_millis();
        let mut handled = 0u64;
        let mut skipped = 0u64;
        let mut restored_all = true;
        for record in &batch.records {
            let info = partitions.entry(record.partition).or_default();
            let jumped = !exactly_once
                && info
                    .next
                    .get(&record.topic)
                    .is_some_and(|next| record.offset > *next);
            if !info.restored || jumped {
                if shutdown.is_cancelled() {
                    // Stopping: no new restores; this batch is read again after a restart.
                    restored_all = false;
                    break;
                }
                let Some(entries) =
                    restore(&settings, spec, config, record.partition, &shutdown).await
                else {
                    restored_all = false;
                    break;
                };
                info.applied = entries.markers;
                info.restored = true;
                machine.restore(record.partition, entries.state);
                now = now_millis();
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
            let mut effects = Effects::default();
            machine.handle(record, now, &mut effects);
            outputs.append(&mut effects.outputs);
            changes
                .entry(record.partition)
                .or_default()
                .append(&mut effects.changes);
            markers.insert((record.partition, record.topic.clone()), record.offset);
            handled += 1;
        }
        if !restored_all {
            // Stopping while a restore waited: nothing of this batch is written.
            break;
        }
        // Time-driven decisions: for the partitions this batch touched, and about once a
        // second for every restored partition.
        let all = ticked_all.elapsed() >= TICK_EVERY;
        if all {
            ticked_all = std::time::Instant::now();
        }
        let mut ticked: Vec<i32> = partitions
            .iter()
            .filter(|(p, info)| info.restored && (all || changes.contains_key(p)))
            .map(|(p, _)| *p)
            .collect();
        ticked.sort_unstable();
        for partition in &ticked {
            let mut effects = Effects::default();
            machine.tick(*partition, now, &mut effects);
            if exactly_once && !(effects.outputs.is_empty() && effects.changes.is_empty()) {
                // The transaction carries this partition's offsets (where it is), so that
                // the group refuses it from a member that no longer owns the partition.
                if let Some(info) = partitions.get(partition) {
                    for (topic, next) in &info.next {
                        last.entry((topic.clone(), *partition)).or_insert(next - 1);
                    }
                }
            }
            outputs.append(&mut effects.outputs);
            if !effects.changes.is_empty() {
                changes
                    .entry(*partition)
                    .or_default()
                    .append(&mut effects.changes);
            }
        }
        if shutdown.is_cancelled() && handled == 0 {
            break;
        }
        if outputs.is_empty() && changes.is_empty() && last.is_empty() {
            continue;
        }
        metrics::counter!("processor_records_total", "processor" => spec.name, "outcome" => "handled")
            .increment(handled);
        metrics::counter!("processor_records_total", "processor" => spec.name, "outcome" => "skipped_replay")
            .increment(skipped);
        let touched: Vec<i32> = changes
            .keys()
            .copied()
            .chain(last.keys().map(|(_, p)| *p))
            .collect();
        let stages = stages(spec, outputs, changes, markers, exactly_once);
        match committer
            .commit(&consumer, stages, &last, &shutdown)
            .await?
        {
            Committed::Done => {}
            Committed::Stopped => break,
            Committed::Aborted => {
                // The state of these partitions has effects that were never committed:
                // restore it, and read their input again from the committed offsets.
                for p in &touched {
                    partitions.remove(p);
                    machine.forget(*p);
                }
                let read: Vec<(String, i32)> = last.into_keys().collect();
                if !rewind(&consumer, read, spec.name, &shutdown).await {
                    break;
                }
                let restored = restore_assigned(
                    &consumer,
                    &mut partitions,
                    &mut machine,
                    &settings,
                    spec,
                    config,
                    &shutdown,
                )
                .await;
                if !restored {
                    break;
                }
            }
        }
    }
    if exactly_once {
        // Nothing is stored: offsets move only with transactions.
        tracing::info!(processor = spec.name, "stopped");
        return Ok(());
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

/// What a batch writes, stage by stage: its outputs; the latest value of each changed
/// key per changelog partition (or every change, when the spec does not coalesce); and, at-least-once only, the offset markers (under
/// exactly-once the offsets commit with the transaction).
fn stages(
    spec: Spec,
    outputs: Vec<Output>,
    changes: BTreeMap<i32, Vec<Change>>,
    markers: BTreeMap<(i32, String), i64>,
    exactly_once: bool,
) -> Stages {
    let outputs = outputs.into_iter().map(|o| (o, None)).collect();
    let mut state_writes = Vec::new();
    for (partition, list) in changes {
        let list = if spec.coalesce {
            latest_per_key(list)
        } else {
            list
        };
        for (key, value) in list {
            state_writes.push((changelog_record(spec, key, value), Some(partition)));
        }
    }
    let marker_writes = if exactly_once {
        Vec::new()
    } else {
        markers
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
            .collect()
    };
    vec![outputs, state_writes, marker_writes]
}

/// Restores each partition assigned to this member that is not restored yet (newly
/// assigned, or forgotten after an aborted transaction), so that time-driven decisions
/// reach partitions without traffic. Where each starts is read first (the group's
/// committed offsets; under `read_committed` given only once no transaction committing
/// them is pending), then the changelog: the state then holds every effect of those
/// offsets, a transaction of ticks alone can carry them, and (at-least-once) a first
/// record past them is a jump. `false` when stopping.
async fn restore_assigned<M: Machine>(
    consumer: &Arc<Consumer>,
    partitions: &mut HashMap<i32, PartitionInfo>,
    machine: &mut M,
    settings: &ClientSettings,
    spec: Spec,
    config: EngineConfig,
    shutdown: &CancellationToken,
) -> bool {
    let c = Arc::clone(consumer);
    let assigned = tokio::select! {
        () = shutdown.cancelled() => return false,
        read = tokio::task::spawn_blocking(move || c.assigned()) => read,
    };
    let assigned = match assigned {
        Ok(Ok(assigned)) => assigned,
        Ok(Err(e)) => {
            tracing::warn!(processor = spec.name, error = %e, "reading the assignment failed");
            return true;
        }
        Err(e) => {
            tracing::warn!(processor = spec.name, error = %e, "reading the assignment failed");
            return true;
        }
    };
    let mut waiting: Vec<i32> = assigned
        .iter()
        .filter(|(topic, _)| spec.inputs.contains(&topic.as_str()))
        .map(|(_, p)| *p)
        .filter(|p| !partitions.get(p).is_some_and(|info| info.restored))
        .collect();
    waiting.sort_unstable();
    waiting.dedup();
    if waiting.is_empty() {
        return true;
    }
    // One tick tries until the first partition it cannot restore yet (offsets held by a
    // pending transaction, a leader failing over), starting each time somewhere else, so
    // that the batches in between keep flowing and no partition waits behind another.
    let turn = usize::try_from(now_millis() / 1000).unwrap_or_default() % waiting.len();
    waiting.rotate_left(turn);
    for partition in waiting {
        // Where its input starts, one partition at a time and briefly: one whose offsets
        // a pending transaction holds (a dead member's, until it times out) waits for a
        // later tick without holding back the others.
        let list: Vec<(String, i32)> = spec
            .inputs
            .iter()
            .map(|t| ((*t).to_owned(), partition))
            .collect();
        let c = Arc::clone(consumer);
        let read = tokio::select! {
            () = shutdown.cancelled() => return false,
            read = tokio::task::spawn_blocking(move || c.starting_offsets(&list, START_LOOKUP)) => read,
        };
        let next: HashMap<String, i64> = match read {
            Ok(Ok(offsets)) => offsets.into_iter().map(|(t, _, at)| (t, at)).collect(),
            Ok(Err(e)) => {
                tracing::debug!(processor = spec.name, partition, error = %e, "where the partition starts is not known yet; trying again later");
                break;
            }
            Err(e) => {
                tracing::warn!(processor = spec.name, partition, error = %e, "reading where the partition starts failed");
                break;
            }
        };
        let entries = tokio::select! {
            () = shutdown.cancelled() => return false,
            once = restore_once(settings, spec, config, partition) => once,
        };
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(processor = spec.name, partition, error = %e, "restore failed; trying again later");
                break;
            }
        };
        let info = partitions.entry(partition).or_default();
        info.applied = entries.markers;
        info.restored = true;
        info.next = next;
        machine.restore(partition, entries.state);
    }
    true
}

/// Moves the consumer back to the committed offsets of `read`, retrying with backoff
/// until it succeeds or `shutdown` is cancelled (then `false`): going on without it
/// would skip the aborted records.
async fn rewind(
    consumer: &Arc<Consumer>,
    read: Vec<(String, i32)>,
    name: &'static str,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (c, list) = (Arc::clone(consumer), read.clone());
        match tokio::task::spawn_blocking(move || c.rewind(&list, Duration::from_secs(10))).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => {
                tracing::warn!(processor = name, error = %e, ?backoff, "rewinding to the committed offsets failed; retrying");
            }
            Err(e) => tracing::warn!(processor = name, error = %e, "rewind task failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
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
        let once = tokio::select! {
            () = shutdown.cancelled() => return None,
            once = restore_once(settings, spec, config, partition) => once,
        };
        match once {
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
        source: Box::new(source),
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
