//! `dronedelivery compact`: one pass of the history's maintenance (Delta `OPTIMIZE` of
//! the dates with many small files, then `VACUUM`), then exit; safe beside running
//! writers.

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::cli::CompactArgs;

/// Runs one compaction pass and reports what it did on stderr.
pub(crate) async fn run(args: CompactArgs) -> Result<()> {
    args.compaction
        .check(analytics::compact::MIN_ORPHAN_SECS)
        .map_err(anyhow::Error::msg)?;
    let cwd = std::env::current_dir().context("reading the working directory")?;
    let root = analytics::store::DataRoot::open(&args.data.url, &cwd)?;
    let report =
        analytics::compact::compact_once(&root, &args.compaction, &CancellationToken::new())
            .await?;
    eprintln!(
        "merged {} files into {}, {} lost a race, {} deleted",
        report.replaced, report.merged, report.conflicts, report.deleted
    );
    Ok(())
}
