//! Compaction (Delta `OPTIMIZE`) and `VACUUM` of the history's tables.
//!
//! - **Compaction** merges the oldest small files of one table and date into one file of
//!   up to about `--compact-target-mb`, and commits it as an `OPTIMIZE`: the merged file
//!   added and the small ones removed, both with `dataChange=false`, in one version, so a
//!   query reads either the small files or the merged one and a streaming reader sees no
//!   new data. The sink's appends (blind) never conflict with it. Every compaction of a
//!   table carries the table's compaction `txn` app id, so of two compactions racing on
//!   a table one commits and the other is refused (delta-rs alone would let both remove
//!   the same files with `dataChange=false` and keep both merged copies); the loser's
//!   file is left to vacuum. [`plan`] (pure) picks the files. Files are read one at a
//!   time and their rows streamed into the merged file.
//! - **Vacuum** deletes files that left a table more than `--vacuum-retention-secs` ago
//!   (a query that started before they left may still read them until then; longer than
//!   the SQL time limit), and files no commit names (a crash between a file's write and
//!   its commit, a refused commit) once they are `--vacuum-orphan-secs` old; the sink
//!   gives up a commit whose files are half that old.
//!
//! The `history` module runs both every `--compact-interval-secs` beside the sink;
//! `dronedelivery compact` runs them once. This module must not know the sink.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use deltalake::kernel::Remove;
use deltalake::operations::vacuum::VacuumMode;
use deltalake::writer::DeltaWriter as _;
use futures_util::TryStreamExt as _;
use object_store::ObjectStoreExt as _;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio_util::sync::CancellationToken;

use crate::error::{AnalyticsError, Result};
use crate::store::DataRoot;
use crate::tables::{self, Table, delta_err};

/// The least orphan age the commands accept: a running sink's files may wait this long
/// for their commit (it gives up at half of the age).
pub const MIN_ORPHAN_SECS: u64 = 600;

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

    /// How long a file that left the tables is kept, in seconds, for queries that still
    /// read it (also time travel to the versions that had it); must be longer than the
    /// SQL time limit.
    #[arg(
        long,
        env = "DRONEDELIVERY_VACUUM_RETENTION_SECS",
        default_value_t = 600
    )]
    pub vacuum_retention_secs: u64,

    /// How old a file no commit names must be before vacuum deletes it, in seconds (at
    /// least the retention). A sink gives up a commit whose files are half this old.
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

impl CompactionArgs {
    /// The settings that keep files a running writer or reader may still need: orphans
    /// kept at least `minimum_secs` and at least as long as replaced files.
    pub fn check(&self, minimum_secs: u64) -> std::result::Result<(), String> {
        if self.vacuum_orphan_secs < self.vacuum_retention_secs {
            return Err(format!(
                "--vacuum-orphan-secs ({}) must be at least --vacuum-retention-secs ({})",
                self.vacuum_orphan_secs, self.vacuum_retention_secs
            ));
        }
        if self.vacuum_orphan_secs < minimum_secs {
            return Err(format!(
                "--vacuum-orphan-secs ({}) must be at least {minimum_secs}: a running sink's \
                 files wait that long for their commit",
                self.vacuum_orphan_secs
            ));
        }
        Ok(())
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Merged files written and committed.
    pub merged: usize,
    /// Small files they replaced.
    pub replaced: usize,
    /// Compactions refused because another writer changed the files first.
    pub conflicts: usize,
    /// Files physically deleted.
    pub deleted: usize,
}

/// A live file of a table, as compaction plans with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveFile {
    /// Its `date` partition.
    pub date: String,
    /// Its path in the table's log.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was written, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// What to merge: per date with at least `min_files` (and two) files under half of
/// `target_bytes`, its oldest small files up to about the target. Pure.
pub fn plan(files: &[LiveFile], min_files: usize, target_bytes: u64) -> Vec<Vec<&LiveFile>> {
    let mut small: BTreeMap<&str, Vec<&LiveFile>> = BTreeMap::new();
    for file in files.iter().filter(|f| f.size < target_bytes / 2) {
        small.entry(file.date.as_str()).or_default().push(file);
    }
    small
        .into_values()
        .filter(|files| files.len() >= min_files.max(2))
        .map(|mut files| {
            files.sort_by(|a, b| (a.modified_ms, &a.path).cmp(&(b.modified_ms, &b.path)));
            let mut total = 0;
            let mut chosen = Vec::new();
            for file in files {
                if total >= target_bytes && chosen.len() >= 2 {
                    break;
                }
                total += file.size;
                chosen.push(file);
            }
            chosen
        })
        .collect()
}

/// Runs compaction and vacuum every `compact_interval_secs` until `stop`.
pub async fn run_periodically(
    root: DataRoot,
    config: CompactionArgs,
    stop: CancellationToken,
) -> Result<()> {
    let every = Duration::from_secs(config.compact_interval_secs.max(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        match compact_once(&root, &config, &stop).await {
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

/// Most merges of one table in one pass.
const MAX_MERGES_PER_PASS: usize = 64;

/// One pass over every table: compaction of what [`plan`] picks, then vacuum.
pub async fn compact_once(
    root: &DataRoot,
    config: &CompactionArgs,
    stop: &CancellationToken,
) -> Result<Report> {
    let mut report = Report::default();
    let target = config.compact_target_mb.max(1) * 1024 * 1024;
    // A merged file waits for its commit at most this long: vacuum (of any process,
    // each keeping orphans at least MIN_ORPHAN_SECS) may delete it as an orphan later.
    let safe_for = Duration::from_secs(config.vacuum_orphan_secs.min(MIN_ORPHAN_SECS)) / 2;
    for history_table in schemas::history::TABLES {
        if stop.is_cancelled() {
            break;
        }
        let Some(delta) = tables::load(root, history_table.name).await? else {
            continue;
        };
        let mut table = Table {
            table: history_table,
            delta,
        };
        // One merge at a time, each planned on the version it commits on (a commit
        // refreshes the table), so that no merge removes files another already replaced.
        for _ in 0..MAX_MERGES_PER_PASS {
            if stop.is_cancelled() {
                break;
            }
            let (live, views) = live_files(&table)?;
            let Some(group) = plan(&live, config.compact_min_files, target)
                .into_iter()
                .next()
            else {
                break;
            };
            let removes: Vec<Remove> = group
                .iter()
                .filter_map(|f| views.get(f.path.as_str()).cloned())
                .collect();
            let deadline = std::time::Instant::now() + safe_for;
            let adds = merge(root, &table, &group).await?;
            let replaced = removes.len();
            let size = i64::try_from(target).unwrap_or(i64::MAX);
            let committed = table
                .commit_compaction(adds.clone(), removes, size, deadline)
                .await?;
            match committed {
                Ok(_) => {
                    report.merged += 1;
                    report.replaced += replaced;
                    metrics::counter!("history_compactions_total").increment(1);
                }
                Err(conflict) => {
                    tracing::info!(table = history_table.name, %conflict, "history: compaction refused; its file is left to vacuum");
                    report.conflicts += 1;
                    // The rest of this table waits for the next pass (its files may have
                    // moved).
                    break;
                }
            }
        }
        table.refresh().await?;
        report.deleted += vacuum(&table, config).await?;
    }
    Ok(report)
}

/// The live files of the loaded version, and the `remove` action of each by path.
fn live_files(table: &Table) -> Result<(Vec<LiveFile>, BTreeMap<String, Remove>)> {
    let state = table
        .delta
        .snapshot()
        .map_err(delta_err("listing a table's files"))?;
    let mut live = Vec::new();
    let mut removes = BTreeMap::new();
    for view in state.log_data().iter() {
        let path = view.path().into_owned();
        live.push(LiveFile {
            date: view
                .partition_values_map()
                .remove(schemas::history::DATE_PARTITION)
                .flatten()
                .unwrap_or_default(),
            path: path.clone(),
            size: u64::try_from(view.size()).unwrap_or(0),
            modified_ms: view.modification_time(),
        });
        removes.insert(path, view.remove_action(false));
    }
    Ok((live, removes))
}

/// Reads `files` (one table and date) one at a time and streams their rows into one new
/// file of the table; returns its `add` action (not committed).
async fn merge(
    root: &DataRoot,
    table: &Table,
    files: &[&LiveFile],
) -> Result<Vec<deltalake::kernel::Add>> {
    let Some(first) = files.first() else {
        return Ok(Vec::new());
    };
    let date = chrono::NaiveDate::parse_from_str(&first.date, "%Y-%m-%d").map_err(|e| {
        AnalyticsError::Location {
            location: first.path.clone(),
            reason: format!("bad date partition: {e}"),
        }
    })?;
    let mut writer = table.writer(crate::parquet_files::properties())?;
    for file in files {
        let path = tables::file_path(root, table.table.name, &file.path)?;
        let bytes = root
            .store
            .get(&path)
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
        let parquet_err = |source| AnalyticsError::Parquet {
            action: "reading a file to compact",
            source,
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(parquet_err)?
            .with_batch_size(65_536)
            .build()
            .map_err(parquet_err)?;
        for batch in reader {
            let batch = batch.map_err(|source| AnalyticsError::Arrow {
                action: "reading a file to compact",
                source,
            })?;
            tables::write_batch(&mut writer, &batch, date).await?;
        }
    }
    writer
        .flush()
        .await
        .map_err(delta_err("writing a compacted file"))
}

/// Deletes the files of `table` (as of its loaded version) that left it more than the
/// retention ago, and the files no commit names more than the orphan age ago. delta-rs
/// plans it (both modes, without running them: its run would also delete, again, the
/// files of every tombstone still in the log and commit twice per pass); only files that
/// are there are deleted, and nothing is committed. Returns how many were deleted.
async fn vacuum(table: &Table, config: &CompactionArgs) -> Result<usize> {
    let secs = |s: u64| chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
    let mut candidates = BTreeSet::new();
    for (mode, retention) in [
        (VacuumMode::Lite, secs(config.vacuum_retention_secs)),
        (
            VacuumMode::Full,
            secs(config.vacuum_orphan_secs.max(config.vacuum_retention_secs)),
        ),
    ] {
        let (_, planned) = table
            .delta
            .clone()
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .with_mode(mode)
            .with_dry_run(true)
            .await
            .map_err(delta_err("planning a vacuum"))?;
        candidates.extend(planned.files_deleted);
    }
    if candidates.is_empty() {
        return Ok(0);
    }
    let store = table.delta.object_store();
    let present: BTreeSet<String> = store
        .list(None)
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .map_err(|source| AnalyticsError::Store {
            action: "listing a table to vacuum",
            source,
        })?;
    let mut deleted = 0;
    for path in candidates.intersection(&present) {
        let Ok(location) = object_store::path::Path::parse(path) else {
            continue;
        };
        match store.delete(&location).await {
            Ok(()) => deleted += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::debug!(table = table.table.name, path, error = %e, "vacuum: not deleted")
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(date: &str, path: &str, size: u64, modified_ms: i64) -> LiveFile {
        LiveFile {
            date: date.into(),
            path: path.into(),
            size,
            modified_ms,
        }
    }

    #[test]
    fn plans_merge_the_oldest_small_files_of_a_date_up_to_the_target() {
        let mut files: Vec<LiveFile> = (0..10)
            .map(|i| file("2026-11-23", &format!("f{i}"), 30, 100 - i))
            .collect();
        files.push(file("2026-11-23", "big", 1_000, 0));
        files.extend((0..3).map(|i| file("2026-11-24", &format!("g{i}"), 30, i)));
        let names = |groups: Vec<Vec<&LiveFile>>| -> Vec<Vec<String>> {
            groups
                .into_iter()
                .map(|g| g.into_iter().map(|f| f.path.clone()).collect())
                .collect()
        };
        // Too few small files anywhere.
        assert!(plan(&files, 11, 1_000).is_empty());
        // Oldest first, stop once the target is reached, the big file never.
        assert_eq!(names(plan(&files, 4, 100)), [["f9", "f8", "f7", "f6"]]);
        let all = names(plan(&files, 3, 1_000));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].len(), 10);
        assert_eq!(all[1], ["g0", "g1", "g2"]);
        // With a small target none is small; one small file alone is never merged.
        assert!(plan(&files, 2, 40).is_empty());
        assert!(plan(&[file("d", "x", 1, 0)], 1, 1_000).is_empty());
    }
}
