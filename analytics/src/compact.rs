//! Compaction and vacuum of the history.
//!
//! - **Compaction** merges the small files of one table and date into one file and swaps
//!   them in one log commit: a query sees either the small files or the merged one, never
//!   both and never neither. Two compactors racing on the same files: one commit wins,
//!   the other is refused and deletes its merged file.
//! - **Vacuum** deletes files that left the tables more than `--vacuum-retention-secs`
//!   ago (a query that started before they left may still read them until then), and
//!   files no commit names (a crash between writing a file and committing it) once they
//!   are `--vacuum-orphan-secs` old.
//!
//! The `history` module runs both every `--compact-interval-secs` beside the sink;
//! `dronedelivery compact` runs them once. Files are encoded and put by
//! `parquet_files`; this module must not know the sink.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use futures_util::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio_util::sync::CancellationToken;

use crate::error::{AnalyticsError, Result};
use crate::log::{Commit, DataFile, Log};
use crate::parquet_files;
use crate::store::DataRoot;

/// Settings of compaction and vacuum.
#[derive(Debug, Clone, clap::Args)]
pub struct CompactionArgs {
    /// How often the sink compacts and vacuums, in seconds; 0 turns it off (then run
    /// `dronedelivery compact` on a schedule).
    #[arg(
        long,
        env = "DRONEDELIVERY_COMPACT_INTERVAL_SECS",
        default_value_t = 60
    )]
    pub compact_interval_secs: u64,

    /// A table and date is compacted once it has at least this many small files.
    #[arg(long, env = "DRONEDELIVERY_COMPACT_MIN_FILES", default_value_t = 8)]
    pub compact_min_files: usize,

    /// The size a merged file aims for, in MiB; files under half of it count as small.
    #[arg(long, env = "DRONEDELIVERY_COMPACT_TARGET_MB", default_value_t = 128)]
    pub compact_target_mb: u64,

    /// How long a file that left the tables is kept for queries that still read it, in
    /// seconds; must be longer than the SQL time limit.
    #[arg(
        long,
        env = "DRONEDELIVERY_VACUUM_RETENTION_SECS",
        default_value_t = 600
    )]
    pub vacuum_retention_secs: u64,

    /// How old a file no commit names must be before vacuum deletes it, in seconds. A sink
    /// gives up a roll whose files are half this old before its commit, so a slow roll's
    /// files are never deleted under it.
    #[arg(long, env = "DRONEDELIVERY_VACUUM_ORPHAN_SECS", default_value_t = 3600)]
    pub vacuum_orphan_secs: u64,
}

impl Default for CompactionArgs {
    fn default() -> Self {
        Self {
            compact_interval_secs: 60,
            compact_min_files: 8,
            compact_target_mb: 128,
            vacuum_retention_secs: 600,
            vacuum_orphan_secs: 3600,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Merged files written and committed.
    pub merged: usize,
    /// Small files they replaced.
    pub replaced: usize,
    /// Merges refused because another writer changed the files first.
    pub conflicts: usize,
    /// Files physically deleted.
    pub deleted: usize,
}

/// Which files of one table and date to merge: the oldest small ones (under half the
/// target) up to about the target size, if there are at least `min_files` of them.
/// Pure.
pub fn plan<'a>(files: &[&'a DataFile], min_files: usize, target_bytes: u64) -> Vec<&'a DataFile> {
    let mut small: Vec<&DataFile> = files
        .iter()
        .copied()
        .filter(|f| f.size < target_bytes / 2)
        .collect();
    if small.len() < min_files.max(2) {
        return Vec::new();
    }
    small.sort_by(|a, b| (a.added_ms, &a.path).cmp(&(b.added_ms, &b.path)));
    let mut total = 0;
    let mut chosen = Vec::new();
    for file in small {
        if total >= target_bytes && chosen.len() >= 2 {
            break;
        }
        total += file.size;
        chosen.push(file);
    }
    chosen
}

/// Runs compaction and vacuum every `compact_interval_secs` until `stop`.
pub async fn run_periodically(
    root: DataRoot,
    config: CompactionArgs,
    stop: CancellationToken,
) -> Result<()> {
    let log = Log::open(root).await?;
    let every = Duration::from_secs(config.compact_interval_secs.max(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        match compact_once(&log, &config, &stop).await {
            Ok(report) if report != Report::default() => {
                tracing::info!(?report, "history: compaction pass");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "history: compaction pass failed; next pass retries")
            }
        }
    }
}

/// One pass of compaction, then vacuum.
pub async fn compact_once(
    log: &Log,
    config: &CompactionArgs,
    stop: &CancellationToken,
) -> Result<Report> {
    let mut report = Report::default();
    let snapshot = log.snapshot().await?;
    let mut groups: BTreeMap<(&str, &str), Vec<&DataFile>> = BTreeMap::new();
    for file in snapshot.files.values() {
        groups
            .entry((file.table.as_str(), file.date.as_str()))
            .or_default()
            .push(file);
    }
    let target = config.compact_target_mb.max(1) * 1024 * 1024;
    for ((table, date), files) in groups {
        if stop.is_cancelled() {
            break;
        }
        let chosen = plan(&files, config.compact_min_files, target);
        if chosen.is_empty() {
            continue;
        }
        let merged = merge(log.root(), table, date, &chosen).await?;
        let commit = Commit {
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            writer: "compaction".into(),
            add: vec![merged.clone()],
            remove: chosen.iter().map(|f| f.path.clone()).collect(),
            ..Commit::default()
        };
        match log.commit(commit).await? {
            Ok(_) => {
                report.merged += 1;
                report.replaced += chosen.len();
                metrics::counter!("history_compactions_total").increment(1);
            }
            Err(conflict) => {
                tracing::info!(%conflict, "history: compaction lost a race; dropping its file");
                report.conflicts += 1;
                let root = log.root();
                if let Err(e) = root.store.delete(&root.path(&merged.path)).await {
                    tracing::debug!(error = %e, "history: dropped merged file not deleted; vacuum removes it");
                }
            }
        }
    }
    report.deleted = vacuum(log, config).await?;
    Ok(report)
}

/// Reads `files` (one table and date) and writes them as one file.
async fn merge(root: &DataRoot, table: &str, date: &str, files: &[&DataFile]) -> Result<DataFile> {
    let mut contents = Vec::with_capacity(files.len());
    for file in files {
        let bytes = root
            .store
            .get(&root.path(&file.path))
            .await
            .map_err(|source| AnalyticsError::Store {
                action: "reading a file to compact",
                source,
            })?
            .bytes()
            .await
            .map_err(|source| AnalyticsError::Store {
                action: "reading a file to compact",
                source,
            })?;
        contents.push(bytes);
    }
    let encoded = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, u64)> {
        let parquet_err = |source| AnalyticsError::Parquet {
            action: "reading a file to compact",
            source,
        };
        let mut batches: Vec<RecordBatch> = Vec::new();
        for bytes in contents {
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .map_err(parquet_err)?
                .with_batch_size(65_536)
                .build()
                .map_err(parquet_err)?;
            for batch in reader {
                batches.push(batch.map_err(|source| AnalyticsError::Arrow {
                    action: "reading a file to compact",
                    source,
                })?);
            }
        }
        let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
        Ok((parquet_files::encode(&batches, None)?, rows))
    })
    .await
    .map_err(|e| AnalyticsError::Task {
        reason: e.to_string(),
    })??;
    let (bytes, rows) = encoded;
    let date = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|e| {
        AnalyticsError::Corrupt {
            object: files[0].path.clone(),
            reason: format!("bad date partition: {e}"),
        }
    })?;
    parquet_files::put_new_file(root, table, date, bytes, rows, "writing a compacted file").await
}

/// Deletes removed files past the retention, and files no commit names past the orphan
/// age.
/// Returns how many were deleted.
async fn vacuum(log: &Log, config: &CompactionArgs) -> Result<usize> {
    let root = log.root();
    let retention_ms =
        i64::try_from(config.vacuum_retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let cutoff = chrono::Utc::now()
        .timestamp_millis()
        .saturating_sub(retention_ms);
    let orphan_ms =
        i64::try_from(config.vacuum_orphan_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let orphan_cutoff = chrono::Utc::now()
        .timestamp_millis()
        .saturating_sub(orphan_ms);
    let snapshot = log.snapshot().await?;
    let mut deleted = 0;
    let mut forget = Vec::new();
    for removed in snapshot.removed.iter().filter(|r| r.removed_ms < cutoff) {
        match root.store.delete(&root.path(&removed.path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                deleted += 1;
                forget.push(removed.path.clone());
            }
            Err(e) => tracing::debug!(path = %removed.path, error = %e, "vacuum: not deleted"),
        }
    }
    let known: BTreeSet<&str> = snapshot
        .files
        .keys()
        .map(String::as_str)
        .chain(snapshot.removed.iter().map(|r| r.path.as_str()))
        .collect();
    for table in schemas::history::TABLES {
        let prefix = root.path(table.name);
        let listed: Vec<object_store::ObjectMeta> = root
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|source| AnalyticsError::Store {
                action: "listing files to vacuum",
                source,
            })?;
        for meta in listed {
            let Some(relative) = root.relative(&meta.location) else {
                continue;
            };
            if known.contains(relative.as_str())
                || !relative.ends_with(".parquet")
                || meta.last_modified.timestamp_millis() >= orphan_cutoff
            {
                continue;
            }
            match root.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => {
                    tracing::debug!(path = %meta.location, error = %e, "vacuum: orphan not deleted")
                }
            }
        }
    }
    if !forget.is_empty() {
        let commit = Commit {
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            writer: "vacuum".into(),
            forget,
            ..Commit::default()
        };
        // A conflict cannot happen (no offsets, no removes); a failure leaves the
        // entries for the next pass.
        if let Err(e) = log.commit(commit).await {
            tracing::debug!(error = %e, "vacuum: commit failed");
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, added_ms: i64) -> DataFile {
        DataFile {
            table: "t".into(),
            date: "2026-11-24".into(),
            path: path.into(),
            size,
            rows: 1,
            added_ms,
        }
    }

    #[test]
    fn plans_merge_the_oldest_small_files_up_to_the_target() {
        let files: Vec<DataFile> = (0..10)
            .map(|i| file(&format!("f{i}"), 30, 100 - i))
            .chain([file("big", 1_000, 0)])
            .collect();
        let refs: Vec<&DataFile> = files.iter().collect();
        // Too few small files.
        assert!(plan(&refs, 11, 1_000).is_empty());
        let chosen = plan(&refs, 4, 100);
        // Oldest first, stop once the target is reached, the big file never.
        let names: Vec<&str> = chosen.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["f9", "f8", "f7", "f6"]);
        let all = plan(&refs, 4, 1_000);
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|f| f.path != "big"));
    }
}
