//! `dronedelivery simulate`: flies the assigned drones, reading `drone-assignments` and
//! posting each drone's positions to the ingestion API, with a health listener that stays
//! up until it has stopped.

use anyhow::Result;

use crate::broker;
use crate::cli::SimulateArgs;
use crate::diagnostics::init_metrics;
use crate::listeners;
use crate::supervisor::{Supervisor, shutdown_signal};

/// Runs the simulator until the process is asked to stop or it fails.
pub(crate) async fn run(args: SimulateArgs) -> Result<()> {
    let render = init_metrics()?;
    let (settings, _) = broker::connect(&args.kafka, false).await?;
    let mut supervisor = Supervisor::new();
    let (service, stop) = supervisor.stage();
    let (last, stop_health) = supervisor.stage();
    if let Some(health) = listeners::health(
        args.health.health_listen,
        broker::readiness(&settings)?,
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
        "simulator",
        processors::simulator::run(args.simulator, settings, stop),
    );
    supervisor.run_until(shutdown_signal()).await
}
