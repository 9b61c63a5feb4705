//! `dronedelivery process`: the stream processors named by `--processors` (each its own
//! consumer group), against a Kafka cluster, with a health listener that stays up until
//! they have stopped.

use anyhow::Result;
use bus::Producer;
use processors::Processor;

use crate::broker;
use crate::cli::ProcessArgs;
use crate::diagnostics::init_metrics;
use crate::listeners;
use crate::supervisor::{Supervisor, infallible, shutdown_signal};

/// Runs the chosen processors until the process is asked to stop or one fails.
pub(crate) async fn run(args: ProcessArgs) -> Result<()> {
    let stateful: Vec<Processor> = args
        .processors
        .iter()
        .copied()
        .filter(|p| p.is_stateful())
        .collect();
    let workflow = args.processors.contains(&Processor::Workflow);
    let notifier = args.processors.contains(&Processor::Notifier);
    if !workflow && !notifier && stateful.is_empty() {
        anyhow::bail!("--processors names no processor");
    }
    let render = init_metrics()?;
    let (settings, _) = broker::connect(&args.kafka, false).await?;
    let producer = Producer::new(&settings, &args.producer)?;
    let durability = broker::durability(
        &args.kafka,
        false,
        &args.guarantee,
        &settings,
        &args.producer,
        &producer,
    )?;
    let mut supervisor = Supervisor::new();
    let (services, stop) = supervisor.stage();
    // Once the processors have stopped, what they produced is flushed; the health
    // listener answers until then.
    let (flush, flushing) = supervisor.stage();
    let (last, stop_health) = supervisor.stage();
    let flushed = producer.clone();
    supervisor.spawn_helper(
        flush,
        "producer flush",
        infallible(async move {
            flushing.cancelled().await;
            broker::flush(flushed).await;
        }),
    );
    supervisor.spawn_helper(
        services,
        "producer queue gauge",
        infallible(broker::report_producer_queue(
            producer.clone(),
            stop.clone(),
        )),
    );
    if let Some(health) = listeners::health(
        args.health.health_listen,
        listeners::both(
            broker::readiness(&settings)?,
            listeners::output_readiness(durability.outputs.clone()),
        ),
        render,
        stop.clone(),
        stop_health,
    )
    .await?
    {
        supervisor.spawn_helper(last, "health listener", health);
    }
    if workflow {
        supervisor.spawn(
            services,
            "workflow",
            processors::workflow::run(
                args.workflow,
                settings.clone(),
                durability.clone(),
                stop.clone(),
            ),
        );
    }
    if notifier {
        let mut config = args.notifier;
        config.allow_private = args.webhook_guard.webhooks_allow_private;
        supervisor.spawn(
            services,
            "notifier",
            processors::notifier::run(
                config,
                settings.clone(),
                processors::notifier::follow_registrations(settings.clone(), stop.clone()),
                producer.clone(),
                stop.clone(),
            ),
        );
    }
    if !stateful.is_empty() {
        supervisor.spawn(
            services,
            "processors",
            processors::run_stateful(args.stateful, stateful, settings, durability, stop),
        );
    }
    supervisor.run_until(shutdown_signal()).await
}
