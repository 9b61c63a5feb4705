//! `dronedelivery sql`: one query over the history, printed on stdout or written to a
//! file. It reads the object store only and starts no service.

use std::io::Write as _;

use analytics::sql::{History, OutputFormat, SqlArgs};
use anyhow::{Context, Result};

/// Runs the query and writes its result.
pub(crate) async fn run(args: SqlArgs) -> Result<()> {
    if args.output.is_none() && matches!(args.format, OutputFormat::Parquet | OutputFormat::Arrow) {
        anyhow::bail!("--format parquet and --format arrow write binary data: give --output FILE");
    }
    let history = History::open(&args.data.url, &args.limits).await?;
    let result = history.query_as_of(&args.query, args.as_of).await?;
    let bytes = analytics::sql::render(&result, args.format, args.limits.sql_max_result_mb)?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("{} rows written to {}", result.rows(), path.display());
        }
        None => std::io::stdout()
            .write_all(&bytes)
            .context("writing the result")?,
    }
    Ok(())
}
