//! `dronedelivery history`: the history sink (Kafka to Delta tables) alone, against a Kafka
//! cluster, with a health listener that stays up until it has stopped.

use analytics::history::HistoryConfig;
use analytics::sink::OnShutdown;
use anyhow::Result;

use crate::broker;
use crate::cli::HistoryArgs;
use crate::diagnostics::init_metrics;
use crate::listeners;
use crate::supervisor::{Supervisor, shutdown_signal};

/// Runs the sink until the process is asked to stop or the sink fails.
pub(crate) async fn run(args: HistoryArgs) -> Result<()> {
    args.sink
        .compaction
        .check(analytics::compact::MIN_ORPHAN_SECS)
        .map_err(anyhow::Error::msg)?;
    let render = init_metrics()?;
    let (settings, _) = broker::connect(&args.kafka, false).await?;
    let mut supervisor = Supervisor::new();
    let (service, stop) = supervisor.stage();
    let (last, stop_health) = supervisor.stage();
    let config = HistoryConfig::new(args.data, args.sink);
    // Not ready while the broker is unreachable or the history cannot be written.
    let ready = listeners::both(
        broker::readiness(&settings)?,
        listeners::sink_readiness(config.health.clone()),
    );
    if let Some(health) = listeners::health(
        args.health.health_listen,
        ready,
        render,
        stop.clone(),
        stop_health,
    )
    .await?
    {
        supervisor.spawn_helper(last, "health listener", health);
    }
    supervisor.spawn(
        service,
        "history sink",
        analytics::history::run(config, settings, stop, OnShutdown::Stop),
    );
    supervisor.run_until(shutdown_signal()).await
}
