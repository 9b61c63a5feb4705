//! `dronedelivery run`: the whole pipeline in one process (ingestion, processors, history
//! sink, SQL and Flight SQL, optionally the drone simulator), on the embedded broker
//! unless `--brokers` names a cluster.
//!
//! Stop order: the front (HTTP API, Flight SQL, simulator) stops and drains first, then
//! the processors (so that they see every record the front acknowledged), then the
//! history sink (which, on the embedded broker, first reads what the front and the
//! processors wrote), the lag watch and the status view; then the producer is flushed and
//! the embedded broker goes last.

use std::sync::Arc;
use std::time::Duration;

use analytics::history::HistoryConfig;
use analytics::sink::{OnShutdown, SinkArgs};
use analytics::sql::{History, QueryLimitsArgs};
use anyhow::Result;
use bus::Producer;
use dronedelivery::announce;
use ingest::{Ingest, IngestConfig};
use processors::simulator::SimulatorArgs;

use crate::backpressure::watch_lag;
use crate::broker;
use crate::cli::RunArgs;
use crate::diagnostics::init_metrics;
use crate::history_sql::HistorySql;
use crate::listeners;
use crate::supervisor::{Supervisor, infallible, shutdown_signal};

/// The longest the history sink reads on at shutdown on the embedded broker. Stopping
/// takes at most 15 s under load; the front's drain and the processors come first.
const SINK_DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Runs the whole pipeline until the process is asked to stop or a service fails.
pub(crate) async fn run(args: RunArgs) -> Result<()> {
    let render = init_metrics()?;
    let (settings, embedded) = broker::connect(&args.kafka, true).await?;
    let producer = Producer::new(&settings, &args.producer)?;
    let durability = broker::durability(
        &args.kafka,
        embedded.is_some(),
        &args.guarantee,
        &settings,
        &args.producer,
        &producer,
    )?;
    let mut supervisor = Supervisor::new();
    let (front, stop_front) = supervisor.stage();
    let (processing, stop_processing) = supervisor.stage();
    let (back, stop_back) = supervisor.stage();
    let (last, stop_health) = supervisor.stage();
    supervisor.spawn_helper(
        back,
        "producer queue gauge",
        infallible(broker::report_producer_queue(
            producer.clone(),
            stop_back.clone(),
        )),
    );
    let view = ingest::StatusView::start(
        settings.clone(),
        args.tier.status_max_deliveries,
        args.tier.live_limits(),
        stop_back.clone(),
    );
    let webhooks = processors::notifier::follow_registrations(settings.clone(), stop_back.clone());
    check_retention(&args.sink, &args.sql)?;
    let history = History::open(&args.data.url, &args.sql).await?;
    let mut tier = args.tier;
    tier.webhooks_allow_private = args.webhook_guard.webhooks_allow_private;
    let config = IngestConfig {
        http: args.http,
        auth: args.auth,
        tier,
    };
    // While the history cannot be written, writes get 503 and /readyz fails: the sink
    // keeps what it read and tries again.
    let sink_health = analytics::sink::SinkHealth::default();
    let mut ingest = Ingest::bind(config, producer.clone())
        .await?
        .with_metrics(render.clone())
        .with_status(view)
        .with_webhooks((Arc::clone(&webhooks.0), webhooks.1.clone()))
        .with_sql(Arc::new(HistorySql(history.clone())))
        .with_backpressure(sink_health.stalled_flag())
        .with_readiness(listeners::both(
            listeners::sink_readiness(sink_health.clone()),
            listeners::output_readiness(durability.outputs.clone()),
        ));
    let lag_watch = watch_lag(
        &settings,
        &args.backpressure,
        embedded.is_some(),
        stop_back.clone(),
    )?;
    if let Some((behind, task)) = lag_watch {
        ingest = ingest.with_backpressure(behind);
        supervisor.spawn_helper(
            back,
            "lag watch",
            infallible(async move {
                let _ = task.await;
            }),
        );
    }
    // The probes' own listener (when asked for), so that they are answered when every
    // API connection is taken; up until the pipeline has stopped.
    if let Some(health) = listeners::health(
        args.health.health_listen,
        listeners::both(
            broker::readiness(&settings)?,
            listeners::both(
                listeners::sink_readiness(sink_health.clone()),
                listeners::output_readiness(durability.outputs.clone()),
            ),
        ),
        render.clone(),
        stop_front.clone(),
        stop_health,
    )
    .await?
    {
        supervisor.spawn_helper(last, "health listener", health);
    }
    let addr = ingest.local_addr()?;
    let unauthenticated = ingest.is_unauthenticated();
    if let Some(flight) = listeners::flight(
        args.flight.flight_listen,
        args.flight.limits(),
        history,
        ingest.sql_authenticator(),
        stop_front.clone(),
    )
    .await?
    {
        supervisor.spawn_helper(front, "flight sql", flight);
    }

    supervisor.spawn(front, "ingest", ingest.run(stop_front.clone()));
    supervisor.spawn(
        processing,
        "workflow",
        processors::workflow::run(
            args.workflow,
            settings.clone(),
            durability.clone(),
            stop_processing.clone(),
        ),
    );
    let mut notifier = args.notifier;
    notifier.allow_private = args.webhook_guard.webhooks_allow_private;
    supervisor.spawn(
        processing,
        "notifier",
        processors::notifier::run(
            notifier,
            settings.clone(),
            webhooks,
            producer.clone(),
            stop_processing.clone(),
        ),
    );
    supervisor.spawn(
        processing,
        "processors",
        processors::run_stateful(
            args.stateful,
            processors::Processor::ALL.to_vec(),
            settings.clone(),
            durability,
            stop_processing,
        ),
    );
    // An in-memory bus is gone when the process exits: on shutdown the sink first reads
    // everything the front end acknowledged (and the processors wrote), within the time a
    // stop may take under load.
    let on_shutdown = if embedded.is_some() {
        OnShutdown::Drain(SINK_DRAIN_LIMIT)
    } else {
        OnShutdown::Stop
    };
    // The embedded broker starts empty: its offsets must not be read against the ones an
    // earlier run left in the history's log.
    let mut sink = HistoryConfig::new(args.data, args.sink);
    sink.health = sink_health;
    if embedded.is_some() {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        sink.offsets_scope = format!("embedded-{}-{}/", started.as_millis(), std::process::id());
    }
    supervisor.spawn(
        back,
        "history sink",
        analytics::history::run(sink, settings.clone(), stop_back.clone(), on_shutdown),
    );
    if unauthenticated {
        println!(
            "no --api-keys: serving loopback clients only, without keys, as tenant \"default\""
        );
    }
    println!("{}", announce::line(announce::API, addr));
    tracing::info!(%addr, "dronedelivery listening on http://{addr}");
    if let Some(broker) = &embedded {
        println!(
            "{}",
            announce::line(announce::EMBEDDED_BROKER, broker.bootstrap_servers())
        );
    }
    if args.simulate_drones {
        let mut simulator = args.simulator.clone();
        if simulator.target == SimulatorArgs::default().target {
            simulator.target = format!("http://{addr}");
        }
        supervisor.spawn_helper(
            front,
            "simulator",
            processors::simulator::run(simulator, settings.clone(), stop_front.clone()),
        );
    }

    let result = supervisor.run_until(shutdown_signal()).await;
    broker::flush(producer).await;
    drop(embedded);
    tracing::info!("dronedelivery stopped");
    result
}

/// Files that compaction replaced are kept for queries that may still read them: longer
/// than a query may run; files no commit names, for the sink's commits.
fn check_retention(sink: &SinkArgs, limits: &QueryLimitsArgs) -> Result<()> {
    let retention = sink.compaction.vacuum_retention_secs;
    if retention <= limits.sql_timeout_secs {
        anyhow::bail!(
            "--vacuum-retention-secs ({retention}) must be longer than --sql-timeout-secs ({})",
            limits.sql_timeout_secs
        );
    }
    sink.compaction
        .check(analytics::compact::MIN_ORPHAN_SECS)
        .map_err(anyhow::Error::msg)
}
