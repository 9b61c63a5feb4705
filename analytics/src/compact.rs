//! Compaction (Delta `OPTIMIZE`) and `VACUUM` of the history's tables.
//!
//! - **Compaction** merges the small files of one table and date into files of about
//!   `--compact-target-mb` with delta-rs's `OPTIMIZE`: one commit that adds the merged
//!   files and removes the small ones with `dataChange=false`, so a query reads either
//!   the small files or the merged ones, and a streaming reader sees no new data. A
//!   racing writer is safe: the sink's appends commute with it, and of two compactions of
//!   the same files one commits and the other is refused (its files are left to vacuum).
//!   [`plan`] (pure) picks the dates worth it.
//! - **Vacuum** deletes files that left a table more than `--vacuum-retention-secs` ago
//!   (a query that started before they left may still read them until then), and files
//!   no commit names (a crash between a file's write and its commit) once they are that
//!   old. The retention must be longer than the SQL time limit, and the sink gives up a
//!   roll whose files are half of it old before their commit.
//!
//! The `history` module runs both every `--compact-interval-secs` beside the sink;
//! `dronedelivery compact` runs them once. This module must not know the sink.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::time::Duration;

use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::vacuum::VacuumMode;
use deltalake::{DeltaTableError, FilterOp, FilterValue};
use tokio_util::sync::CancellationToken;

use crate::error::{AnalyticsError, Result};
use crate::store::DataRoot;
use crate::tables::{self, delta_err};

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

    /// How long a file that left the tables (or that no commit names) is kept, in
    /// seconds, for queries that still read it; must be longer than the SQL time limit.
    /// A sink gives up a roll whose files are half this old before their commit.
    #[arg(
        long,
        env = "DRONEDELIVERY_VACUUM_RETENTION_SECS",
        default_value_t = 600
    )]
    pub vacuum_retention_secs: u64,
}

impl Default for CompactionArgs {
    fn default() -> Self {
        Self {
            compact_interval_secs: 60,
            compact_min_files: 8,
            compact_target_mb: 128,
            vacuum_retention_secs: 600,
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
    /// Compactions refused because another writer changed the files first.
    pub conflicts: usize,
    /// Files physically deleted.
    pub deleted: usize,
}

/// The dates of one table worth compacting: those with at least `min_files` (and at least
/// two) files under half of `target_bytes`. `files` holds each live file's date and
/// size. Pure.
pub fn plan<'a>(
    files: impl IntoIterator<Item = (&'a str, u64)>,
    min_files: usize,
    target_bytes: u64,
) -> Vec<&'a str> {
    let mut small: BTreeMap<&str, usize> = BTreeMap::new();
    for (date, size) in files {
        if size < target_bytes / 2 {
            *small.entry(date).or_default() += 1;
        }
    }
    small
        .into_iter()
        .filter(|&(_, n)| n >= min_files.max(2))
        .map(|(date, _)| date)
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

/// One pass over every table: compaction of the dates [`plan`] picks, then vacuum.
pub async fn compact_once(
    root: &DataRoot,
    config: &CompactionArgs,
    stop: &CancellationToken,
) -> Result<Report> {
    let mut report = Report::default();
    let target = config.compact_target_mb.max(1) * 1024 * 1024;
    for table in schemas::history::TABLES {
        if stop.is_cancelled() {
            break;
        }
        let Some(mut delta) = tables::load(root, table.name).await? else {
            continue;
        };
        let files: Vec<(String, u64)> = delta
            .snapshot()
            .map_err(delta_err("listing a table's files"))?
            .log_data()
            .iter()
            .map(|f| {
                let date = f
                    .partition_values_map()
                    .remove(schemas::history::DATE_PARTITION)
                    .flatten()
                    .unwrap_or_default();
                (date, u64::try_from(f.size()).unwrap_or(0))
            })
            .collect();
        let dates = plan(
            files.iter().map(|(d, s)| (d.as_str(), *s)),
            config.compact_min_files,
            target,
        );
        for date in dates {
            if stop.is_cancelled() {
                break;
            }
            let filters = [(
                schemas::history::DATE_PARTITION,
                FilterOp::Eq,
                FilterValue::Scalar(date),
            )];
            let optimized = delta
                .clone()
                .optimize()
                .with_filters(&filters)
                .with_target_size(NonZeroU64::new(target).unwrap_or(NonZeroU64::MIN))
                .with_writer_properties(crate::parquet_files::properties())
                .with_max_concurrent_tasks(1)
                .with_commit_properties(
                    CommitProperties::default()
                        .with_metadata([("dronedelivery.writer".to_owned(), "compaction".into())]),
                )
                .await;
            match optimized {
                Ok((after, metrics)) => {
                    delta = after;
                    report.merged += usize::try_from(metrics.num_files_added).unwrap_or(0);
                    report.replaced += usize::try_from(metrics.num_files_removed).unwrap_or(0);
                    metrics::counter!("history_compactions_total").increment(1);
                }
                Err(DeltaTableError::Transaction { source }) => {
                    tracing::info!(table = table.name, date, error = %source, "history: compaction lost a race; its files are left to vacuum");
                    report.conflicts += 1;
                    delta
                        .update_state()
                        .await
                        .map_err(delta_err("reading a table's log"))?;
                }
                Err(e) => return Err(delta_err("compacting a table")(e)),
            }
        }
        report.deleted += vacuum(delta, config).await?;
    }
    Ok(report)
}

/// Deletes the files of `delta` that left it, or that no commit names, more than the
/// retention ago. Returns how many were deleted.
async fn vacuum(delta: deltalake::DeltaTable, config: &CompactionArgs) -> Result<usize> {
    let retention = chrono::Duration::seconds(
        i64::try_from(config.vacuum_retention_secs).unwrap_or(i64::MAX / 1000),
    );
    let (_, metrics) = delta
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Full)
        .with_commit_properties(
            CommitProperties::default()
                .with_metadata([("dronedelivery.writer".to_owned(), "vacuum".into())]),
        )
        .await
        .map_err(|e| match e {
            DeltaTableError::ObjectStore { source } => AnalyticsError::Store {
                action: "vacuuming a table",
                source,
            },
            source => AnalyticsError::Delta {
                action: "vacuuming a table",
                source: Box::new(source),
            },
        })?;
    Ok(metrics.files_deleted.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_pick_the_dates_with_enough_small_files() {
        let mut files: Vec<(&str, u64)> = (0..10).map(|_| ("2026-11-23", 30)).collect();
        files.push(("2026-11-23", 1_000));
        files.extend((0..3).map(|_| ("2026-11-24", 30)));
        // Too few small files anywhere.
        assert!(plan(files.iter().copied(), 11, 1_000).is_empty());
        assert_eq!(plan(files.iter().copied(), 4, 1_000), ["2026-11-23"]);
        assert_eq!(
            plan(files.iter().copied(), 3, 1_000),
            ["2026-11-23", "2026-11-24"]
        );
        // Big files do not count: with a small target none is small.
        assert!(plan(files.iter().copied(), 2, 40).is_empty());
        // One small file alone is never worth a merge.
        assert!(plan([("d", 1)], 1, 1_000).is_empty());
    }
}
