//! `dronedelivery ingest`: the HTTP ingestion tier alone, against a Kafka cluster, with
//! the status view it answers status routes from and, when configured, backpressure from
//! the consumers' lag.

use anyhow::Result;
use bus::Producer;
use dronedelivery::announce;
use ingest::{Ingest, IngestConfig};

use crate::backpressure::watch_lag;
use crate::broker;
use crate::cli::IngestArgs;
use crate::diagnostics::init_metrics;
use crate::listeners;
use crate::supervisor::{Supervisor, infallible, shutdown_signal};

/// Runs the tier until the process is asked to stop or the tier fails.
pub(crate) async fn run(args: IngestArgs) -> Result<()> {
    let render = init_metrics()?;
    let (settings, _) = broker::connect(&args.kafka, false).await?;
    let producer = Producer::new(&settings, &args.producer)?;
    let mut supervisor = Supervisor::new();
    let (stage, stop) = supervisor.stage();
    let (last, stop_health) = supervisor.stage();
    supervisor.spawn_helper(
        stage,
        "producer queue gauge",
        infallible(broker::report_producer_queue(
            producer.clone(),
            stop.clone(),
        )),
    );
    let view = ingest::StatusView::start(
        settings.clone(),
        args.tier.status_max_deliveries,
        args.tier.live_limits(),
        stop.clone(),
    );
    let webhooks = processors::notifier::follow_registrations(settings.clone(), stop.clone());
    let mut tier = args.tier;
    tier.webhooks_allow_private = args.webhook_guard.webhooks_allow_private;
    let config = IngestConfig {
        http: args.http,
        auth: args.auth,
        tier,
    };
    let mut ingest = Ingest::bind(config, producer)
        .await?
        .with_metrics(render.clone())
        .with_status(view)
        .with_webhooks(webhooks);
    // The probes' own listener, up until the tier has drained.
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
    if let Some((behind, task)) = watch_lag(&settings, &args.backpressure, false, stop.clone())? {
        ingest = ingest.with_backpressure(behind);
        supervisor.spawn_helper(
            stage,
            "lag watch",
            infallible(async move {
                let _ = task.await;
            }),
        );
    }
    let addr = ingest.local_addr()?;
    println!("{}", announce::line(announce::API, addr));
    tracing::info!(%addr, "ingest listening");
    supervisor.spawn(stage, "ingest", ingest.run(stop));
    supervisor.run_until(shutdown_signal()).await
}
