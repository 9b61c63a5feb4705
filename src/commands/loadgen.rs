//! `dronedelivery loadgen`: loads an ingestion API like bulk business clients and prints
//! the report. A client, not a service: Ctrl-C ends the load early and still reports.

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::supervisor::shutdown_signal;

/// Runs the load and prints its report; fails when no call was answered.
pub(crate) async fn run(config: loadgen::LoadgenArgs) -> Result<()> {
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let watcher = tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    let report = loadgen::run(config, stop).await;
    watcher.abort();
    let report = report?;
    print!("{report}");
    if report.answered() == 0 {
        anyhow::bail!("no call was answered");
    }
    Ok(())
}
