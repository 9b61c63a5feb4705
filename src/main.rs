//! `dronedelivery`: parses the command line, initialises logging and metrics, and hands
//! over to the service libraries. Nothing here decides anything about deliveries.
#![allow(clippy::print_stdout)]

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use analytics::sink::{OnShutdown, SinkConfig};
use analytics::sql::{History, OutputFormat, QueryLimits, SqlArgs};
use anyhow::{Context, Result};
use bus::{ClientSettings, EmbeddedBroker, KafkaArgs, Producer, ProducerArgs};
use clap::{Parser, Subcommand};
use ingest::{Ingest, IngestConfig, MetricsRender};
use processors::StatefulConfig;
use processors::simulator::SimulatorConfig;
use processors::workflow::WorkflowConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// mimalloc: the pipeline allocates per record (headers, keys, JSON); glibc's allocator
// took about a third of the processors' CPU in a profile, and mimalloc made them 10-20%
// faster (`cargo bench --bench processors`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A high-throughput ingestion and stream-processing pipeline for drone deliveries:
/// HTTP in, Kafka in the middle, Parquet history out, SQL on top.
#[derive(Debug, Parser)]
#[command(name = "dronedelivery", version)]
struct Cli {
    /// Log filter, in `RUST_LOG` syntax (`info`, `debug`, `ingest=debug,info`, ...).
    #[arg(long, env = "DRONEDELIVERY_LOG", default_value = "info", global = true)]
    log: String,

    /// Log line format: `text` for people, `json` (one object per line, with the
    /// request's correlation id and tenant as fields) for log pipelines.
    #[arg(
        long,
        env = "DRONEDELIVERY_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    log_format: LogFormat,

    /// Parse the command line and the environment, say what is wrong, and exit without
    /// starting anything (deployment manifests are checked this way).
    #[arg(long, global = true, hide = true)]
    check_config: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole pipeline in one process: ingestion, processors and history sink.
    /// Without --brokers it starts an in-memory Kafka broker.
    Run(Box<RunArgs>),
    /// Run the HTTP ingestion tier alone against a Kafka cluster.
    Ingest(Box<IngestArgs>),
    /// Run the stream processors (workflow fan-out, scheduling, drone tracking, delivery
    /// state) against a Kafka cluster.
    Process(Box<ProcessArgs>),
    /// Run the history sink (Kafka to Parquet) against a Kafka cluster.
    History(Box<HistoryArgs>),
    /// Serve SQL over the history: POST /api/sql and Arrow Flight SQL, with health and
    /// metrics, and no ingestion routes. Needs no broker: it reads the object store only.
    SqlServer(Box<SqlServerArgs>),
    /// Run one SQL query over the history and print the result (or write it to a file).
    Sql(SqlArgs),
    /// Merge the small files of the history and delete files no longer needed, once.
    Compact(CompactArgs),
    /// Fly the assigned drones: read drone-assignments and post each drone's positions
    /// to the ingestion API, faster than real time.
    Simulate(Box<SimulateArgs>),
    /// Load the ingestion API like bulk business clients: N tenants, M connections,
    /// batches of B, open loop (--rate) or closed loop, for a fixed duration; prints
    /// throughput, latency percentiles and every answer by status.
    Loadgen(Box<loadgen::LoadgenConfig>),
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    simulator: SimulatorConfig,
    #[command(flatten)]
    health: HealthArgs,
}

/// The health listener of a service without a public API.
#[derive(Debug, Clone, clap::Args)]
struct HealthArgs {
    /// Address of the health listener: GET /healthz (alive), /readyz (a broker answers
    /// and the service is not stopping) and /metrics (Prometheus), for probes and
    /// scrapers; or `off`.
    #[arg(long, env = "DRONEDELIVERY_HEALTH_LISTEN", default_value = "off")]
    health_listen: String,
}

/// `dronedelivery sql-server`.
#[derive(Debug, clap::Args)]
struct SqlServerArgs {
    /// Address the HTTP API (POST /api/sql, /healthz, /readyz, /metrics) listens on.
    #[arg(long, env = "DRONEDELIVERY_LISTEN", default_value = "127.0.0.1:8081")]
    listen: std::net::SocketAddr,

    /// Where the history lives: `file:///path`, a path, `s3://`, `az://` or `gs://`.
    #[arg(long, env = "DRONEDELIVERY_DATA", default_value = "file://./data")]
    data: String,

    /// File of API keys, one `tenant:key` per line (the ingestion tier's file). Only
    /// --sql-tenants may query. Without it, only loopback clients are served.
    #[arg(long, env = "DRONEDELIVERY_API_KEYS", value_name = "FILE")]
    api_keys: Option<std::path::PathBuf>,

    /// Tenants (from the key file) that may query (comma-separated). They see every
    /// tenant's history.
    #[arg(
        long,
        env = "DRONEDELIVERY_SQL_TENANTS",
        value_delimiter = ',',
        value_name = "TENANT,..."
    )]
    sql_tenants: Vec<String>,

    /// Most open client connections.
    #[arg(long, env = "DRONEDELIVERY_MAX_CONNECTIONS", default_value_t = 1_000)]
    max_connections: usize,

    /// Most HTTP requests handled at once; past it clients get 503 with Retry-After.
    /// With --sql-memory-mb this bounds the memory of queries.
    #[arg(long, env = "DRONEDELIVERY_MAX_IN_FLIGHT", default_value_t = 16)]
    max_in_flight: usize,

    /// Longest time a client may take to send a request's headers, in seconds.
    #[arg(
        long,
        env = "DRONEDELIVERY_HEADER_READ_TIMEOUT_SECS",
        default_value_t = 30
    )]
    header_read_timeout_secs: u64,

    /// How long shutdown waits for running queries to finish, in seconds.
    #[arg(long, env = "DRONEDELIVERY_DRAIN_SECS", default_value_t = 30)]
    drain_secs: u64,

    #[command(flatten)]
    sql: QueryLimits,

    #[command(flatten)]
    flight: FlightArgs,
}

/// Arrow Flight SQL over the history.
#[derive(Debug, Clone, clap::Args)]
struct FlightArgs {
    /// Address of the Arrow Flight SQL endpoint over the history (same keys and
    /// --sql-tenants as POST /api/sql), or `off`.
    #[arg(
        long,
        env = "DRONEDELIVERY_FLIGHT_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    flight_listen: String,
}

/// Backpressure from the consumers' lag.
#[derive(Debug, Clone, clap::Args)]
struct BackpressureArgs {
    /// Refuse writes (503 with Retry-After) while a partition of any of the pipeline's
    /// consumer groups is more than this many records behind; take them again at half of
    /// it or less. 0 turns it off. Default: 20,000 with the embedded broker (it keeps only
    /// about 45,000 requests per partition, so a consumer further behind loses records),
    /// off with --brokers.
    #[arg(long, env = "DRONEDELIVERY_MAX_CONSUMER_LAG", value_name = "RECORDS")]
    max_consumer_lag: Option<u64>,

    /// How often the consumers' lag is checked, in milliseconds.
    #[arg(long, env = "DRONEDELIVERY_LAG_CHECK_MS", default_value_t = 500)]
    lag_check_ms: u64,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    producer: ProducerArgs,
    #[command(flatten)]
    ingest: IngestConfig,
    #[command(flatten)]
    workflow: WorkflowConfig,
    #[command(flatten)]
    stateful: StatefulConfig,
    #[command(flatten)]
    sink: SinkConfig,
    #[command(flatten)]
    sql: QueryLimits,
    #[command(flatten)]
    flight: FlightArgs,
    /// Also fly the assigned drones in this process (a demo), reporting to this
    /// process's own API unless --simulate-target says otherwise.
    #[arg(long, env = "DRONEDELIVERY_SIMULATE_DRONES")]
    simulate_drones: bool,
    #[command(flatten)]
    simulator: SimulatorConfig,
    #[command(flatten)]
    backpressure: BackpressureArgs,
}

#[derive(Debug, clap::Args)]
struct IngestArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    producer: ProducerArgs,
    #[command(flatten)]
    ingest: IngestConfig,
    #[command(flatten)]
    backpressure: BackpressureArgs,
}

#[derive(Debug, clap::Args)]
struct ProcessArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    producer: ProducerArgs,
    #[command(flatten)]
    workflow: WorkflowConfig,
    #[command(flatten)]
    stateful: StatefulConfig,
    #[command(flatten)]
    health: HealthArgs,
    /// The processors to run (comma-separated). Each is its own consumer group, so each
    /// can run as its own deployment and scale on its own lag.
    #[arg(
        long,
        env = "DRONEDELIVERY_PROCESSORS",
        value_enum,
        value_delimiter = ',',
        default_values_t = processors::Processor::ALL
    )]
    processors: Vec<processors::Processor>,
}

#[derive(Debug, clap::Args)]
struct CompactArgs {
    /// Where the history lives: `file:///path`, a path, `s3://`, `az://` or `gs://`.
    #[arg(long, env = "DRONEDELIVERY_DATA", default_value = "file://./data")]
    data: String,

    #[command(flatten)]
    compaction: analytics::compact::CompactionConfig,
}

#[derive(Debug, clap::Args)]
struct HistoryArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    sink: SinkConfig,
    #[command(flatten)]
    health: HealthArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check_config {
        return match check_config(&cli.command) {
            Ok(()) => {
                println!("configuration ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(&cli.log, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Ingest(args) => ingest_only(*args).await,
            Command::Process(args) => process_only(*args).await,
            Command::History(args) => history_only(*args).await,
            Command::SqlServer(args) => sql_server(*args).await,
            Command::Sql(args) => sql(args).await,
            Command::Compact(args) => compact(args).await,
            Command::Simulate(args) => simulate(*args).await,
            Command::Loadgen(config) => load(*config).await,
        }
    });
    // librdkafka and DataFusion may leave blocking threads behind; do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `--check-config` checks beyond clap's parsing: the settings given as text.
fn check_config(command: &Command) -> Result<()> {
    match command {
        Command::Run(args) => flight_address(&args.flight.flight_listen).map(drop),
        Command::SqlServer(args) => flight_address(&args.flight.flight_listen).map(drop),
        Command::Process(args) => health_address(&args.health).map(drop),
        Command::History(args) => health_address(&args.health).map(drop),
        Command::Simulate(args) => health_address(&args.health).map(drop),
        Command::Ingest(_) | Command::Sql(_) | Command::Compact(_) | Command::Loadgen(_) => Ok(()),
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Installs the Prometheus recorder and returns what renders it.
fn init_metrics() -> Result<MetricsRender> {
    // Latencies as histograms (not summaries), so that they add up across replicas.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ],
        )
        .context("metric buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("ingest_batch_records".into()),
            &[1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0],
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(Arc::new(move || handle.render()))
}

/// Resolves when the process is asked to stop (Ctrl-C / SIGINT or SIGTERM).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}

/// A service task's outcome, with its panic or error turned into this process's error.
fn outcome<E>(name: &str, joined: Result<Result<(), E>, tokio::task::JoinError>) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    joined
        .with_context(|| format!("{name} task panicked"))?
        .with_context(|| format!("{name} failed"))
}

/// Waits for a service task.
async fn join<E>(name: &str, task: JoinHandle<Result<(), E>>) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    outcome(name, task.await)
}

/// Brokers from the flags, or an embedded in-memory broker when none are given and
/// `allow_embedded`.
async fn connect(
    kafka: &KafkaArgs,
    allow_embedded: bool,
) -> Result<(ClientSettings, Option<EmbeddedBroker>)> {
    let wants_embedded = kafka.brokers.is_none() && kafka.eventhubs_connection_string.is_none();
    if wants_embedded && allow_embedded {
        let broker = EmbeddedBroker::start(1, &schemas::topics::ALL)
            .context("starting the embedded broker")?;
        tracing::warn!(
            bootstrap = broker.bootstrap_servers(),
            "the bus is IN MEMORY (embedded broker): records not yet in the history are lost \
             if the process dies; give --brokers for a durable Kafka cluster"
        );
        let settings = ClientSettings::from_args(kafka, Some(broker.bootstrap_servers()))?;
        return Ok((settings, Some(broker)));
    }
    let settings = ClientSettings::from_args(kafka, None)?;
    bus::ensure_topics(&settings, &schemas::topics::ALL)
        .await
        .context("creating the pipeline's topics")?;
    Ok((settings, None))
}

async fn run(args: RunArgs) -> Result<()> {
    let render = init_metrics()?;
    let (settings, embedded) = connect(&args.kafka, true).await?;
    let producer = Producer::new(&settings, &args.producer)?;
    let stop_front = CancellationToken::new();
    let stop_back = CancellationToken::new();
    report_producer_queue(producer.clone(), stop_back.clone());
    let view = ingest::StatusView::start(
        settings.clone(),
        args.ingest.status_max_deliveries,
        stop_back.clone(),
    );
    check_retention(&args.sink, &args.sql)?;
    let history = History::open(&args.sink.data, &args.sql).await?;
    let mut ingest = Ingest::bind(args.ingest, producer.clone())
        .await?
        .with_metrics(render)
        .with_status(view)
        .with_sql(Arc::new(HistorySql(history.clone())));
    let lag_watch = watch_lag(
        &settings,
        &args.backpressure,
        embedded.is_some(),
        stop_back.clone(),
    )?;
    if let Some((behind, _)) = &lag_watch {
        ingest = ingest.with_backpressure(behind.clone());
    }
    let addr = ingest.local_addr()?;
    let unauthenticated = ingest.is_unauthenticated();
    let flight_task = start_flight(
        &args.flight.flight_listen,
        history,
        ingest.sql_authenticator(),
        stop_front.clone(),
    )
    .await?;

    let mut ingest_task = tokio::spawn(ingest.run(stop_front.clone()));
    let mut workflow_task = tokio::spawn(processors::workflow::run(
        args.workflow,
        settings.clone(),
        producer.clone(),
        stop_back.clone(),
    ));
    let mut stateful_task = tokio::spawn(processors::run_stateful(
        args.stateful,
        processors::Processor::ALL.to_vec(),
        settings.clone(),
        producer.clone(),
        stop_back.clone(),
    ));
    // An in-memory bus is gone when the process exits: on shutdown the sink first reads
    // everything the front end acknowledged.
    let on_shutdown = if embedded.is_some() {
        OnShutdown::Drain(Duration::from_secs(30))
    } else {
        OnShutdown::Stop
    };
    // The embedded broker starts empty: its offsets must not be read against the ones an
    // earlier run left in the history's log.
    let mut sink = analytics::history::HistoryConfig::from(args.sink);
    if embedded.is_some() {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        sink.offsets_scope = format!("embedded-{}-{}/", started.as_millis(), std::process::id());
    }
    let mut sink_task = tokio::spawn(analytics::history::run(
        sink,
        settings.clone(),
        stop_back.clone(),
        on_shutdown,
    ));
    if unauthenticated {
        println!(
            "no --api-keys: serving loopback clients only, without keys, as tenant \"default\""
        );
    }
    println!("dronedelivery listening on http://{addr}");
    tracing::info!(%addr, "dronedelivery listening on http://{addr}");
    if let Some(broker) = &embedded {
        println!("embedded broker on {}", broker.bootstrap_servers());
    }
    let simulator_task = args.simulate_drones.then(|| {
        let mut simulator = args.simulator.clone();
        if simulator.target == SimulatorConfig::default().target {
            simulator.target = format!("http://{addr}");
        }
        tokio::spawn(processors::simulator::run(
            simulator,
            settings.clone(),
            stop_front.clone(),
        ))
    });

    // Run until asked to stop, or until a service stops on its own (an error).
    let early = tokio::select! {
        () = shutdown_signal() => None,
        r = &mut ingest_task => Some(("ingest", outcome("ingest", r))),
        r = &mut workflow_task => Some(("workflow", outcome("workflow", r))),
        r = &mut stateful_task => Some(("processors", outcome("processors", r))),
        r = &mut sink_task => Some(("history sink", outcome("history sink", r))),
    };
    // Front end first (stop accepting, drain in-flight requests, flush), then the back
    // ends, so that they see every record the front end acknowledged.
    let finished = early.as_ref().map(|(name, _)| *name);
    let mut result = match early {
        Some((_, Err(e))) => Err(e),
        Some((name, Ok(()))) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
        None => Ok(()),
    };
    stop_front.cancel();
    if let Some(task) = simulator_task {
        result = result.and(join("simulator", task).await);
    }
    if finished != Some("ingest") {
        result = result.and(join("ingest", ingest_task).await);
    }
    if let Some(task) = flight_task {
        result = result.and(join("flight sql", task).await);
    }
    stop_back.cancel();
    if finished != Some("workflow") {
        result = result.and(join("workflow", workflow_task).await);
    }
    if finished != Some("processors") {
        result = result.and(join("processors", stateful_task).await);
    }
    if finished != Some("history sink") {
        result = result.and(join("history sink", sink_task).await);
    }
    if let Some((_, task)) = lag_watch {
        let _ = task.await;
    }
    let flushed =
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "producer flush incomplete");
    }
    drop(embedded);
    tracing::info!("dronedelivery stopped");
    result
}

/// Watches the lag of every consumer group of the pipeline and sets `behind` while the
/// worst partition is more than `max` records behind (until it is at most half of that).
/// `None` when off.
fn watch_lag(
    settings: &ClientSettings,
    args: &BackpressureArgs,
    embedded: bool,
    shutdown: CancellationToken,
) -> Result<Option<(Arc<std::sync::atomic::AtomicBool>, JoinHandle<()>)>> {
    let max = args
        .max_consumer_lag
        .unwrap_or(if embedded { 20_000 } else { 0 });
    if max == 0 {
        return Ok(None);
    }
    let history: Vec<&str> = schemas::history::TABLES
        .iter()
        .map(|t| t.topic.name)
        .collect();
    let mut groups: Vec<(&str, &[&str])> = processors::Processor::ALL
        .iter()
        .map(|p| (p.group(), p.inputs()))
        .collect();
    groups.push((schemas::topics::groups::HISTORY, history.as_slice()));
    let watch = bus::LagWatch::new(settings, &groups)?;
    let every = Duration::from_millis(args.lag_check_ms.max(50));
    Ok(Some(bus::spawn_lag_watch(watch, max, every, shutdown)))
}

/// Starts Arrow Flight SQL over `history` on `listen` (unless it is `off`), checking
/// callers as `POST /api/sql` does.
async fn start_flight(
    listen: &str,
    history: History,
    authenticator: ingest::SqlAuthenticator,
    stop: CancellationToken,
) -> Result<Option<JoinHandle<analytics::Result<()>>>> {
    let Some(listen) = flight_address(listen)? else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for Flight SQL"))?;
    let flight_addr = listener.local_addr()?;
    println!("flight sql on grpc://{flight_addr}");
    tracing::info!(%flight_addr, "Arrow Flight SQL on grpc://{flight_addr}");
    let authenticate: analytics::flight::Authenticate = Arc::new(move |header, peer| {
        // A peer tonic cannot name is treated as remote.
        let peer = peer.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        authenticator.check(header, peer).map_err(|e| e.to_string())
    });
    Ok(Some(tokio::spawn(analytics::flight::serve(
        listener,
        history,
        authenticate,
        stop,
    ))))
}

/// Starts the health listener (unless `off`): `/readyz` passes while `ready` does and
/// `stopping` is not cancelled. It serves until `shutdown` is cancelled, which should
/// come after the service stopped, so liveness holds while it drains.
async fn start_health(
    args: &HealthArgs,
    ready: ingest::ops::Readiness,
    render: MetricsRender,
    stopping: CancellationToken,
    shutdown: CancellationToken,
) -> Result<Option<JoinHandle<ingest::Result<()>>>> {
    let Some(listen) = health_address(args)? else {
        return Ok(None);
    };
    let check: ingest::ops::Readiness = Arc::new(move || {
        if stopping.is_cancelled() {
            return Box::pin(async { Err("stopping".to_owned()) });
        }
        ready()
    });
    let server = ingest::ops::HealthServer::bind(listen, check, Some(render)).await?;
    let addr = server.local_addr()?;
    println!("health on http://{addr}");
    tracing::info!(%addr, "health checks and metrics on http://{addr}");
    Ok(Some(tokio::spawn(server.run(shutdown))))
}

/// Readiness: a broker answers a metadata request within two seconds.
fn broker_readiness(settings: &ClientSettings) -> Result<ingest::ops::Readiness> {
    let probe = Arc::new(bus::Reachability::new(settings)?);
    Ok(Arc::new(move || {
        let probe = Arc::clone(&probe);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                probe.check(
                    schemas::topics::DELIVERY_REQUESTS.name,
                    Duration::from_secs(2),
                )
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the broker is not reachable: {e}"))
        })
    }))
}

/// Reports the producer's queue (records enqueued and not yet acknowledged) as the gauge
/// `producer_queue_records` every second, until `stop` is cancelled.
fn report_producer_queue(producer: Producer, stop: CancellationToken) {
    tokio::spawn(async move {
        let gauge = metrics::gauge!("producer_queue_records");
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => gauge.set(f64::from(producer.in_flight())),
            }
        }
    });
}

/// `--health-listen`: an address, or `off`.
fn health_address(args: &HealthArgs) -> Result<Option<std::net::SocketAddr>> {
    let text = &args.health_listen;
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .with_context(|| format!("--health-listen {text:?} is neither an address nor `off`"))
}

/// Waits until the process is asked to stop or `task` ends on its own (an error: a
/// service stops only when told to), cancels `stop`, and returns the task's outcome.
async fn until_stopped<E>(
    name: &str,
    mut task: JoinHandle<Result<(), E>>,
    stop: &CancellationToken,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let early = tokio::select! {
        () = shutdown_signal() => None,
        r = &mut task => Some(outcome(name, r)),
    };
    stop.cancel();
    match early {
        Some(Err(e)) => Err(e),
        Some(Ok(())) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
        None => join(name, task).await,
    }
}

/// Stops the health listener (after its service stopped) and waits for it.
async fn stop_health(
    stop: CancellationToken,
    task: Option<JoinHandle<ingest::Result<()>>>,
) -> Result<()> {
    stop.cancel();
    match task {
        Some(task) => join("health listener", task).await,
        None => Ok(()),
    }
}

/// `--flight-listen`: an address, or `off`.
fn flight_address(text: &str) -> Result<Option<std::net::SocketAddr>> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .with_context(|| format!("--flight-listen {text:?} is neither an address nor `off`"))
}

/// Files that compaction replaced are kept for queries that may still read them: longer
/// than a query may run.
fn check_retention(sink: &SinkConfig, limits: &QueryLimits) -> Result<()> {
    let retention = sink.compaction.vacuum_retention_secs;
    if retention <= limits.sql_timeout_secs {
        anyhow::bail!(
            "--vacuum-retention-secs ({retention}) must be longer than --sql-timeout-secs ({})",
            limits.sql_timeout_secs
        );
    }
    Ok(())
}

/// `POST /api/sql` answered by the history.
struct HistorySql(History);

impl ingest::SqlEndpoint for HistorySql {
    fn query(
        &self,
        sql: String,
        accept: Option<String>,
    ) -> futures_util::future::BoxFuture<'static, Result<ingest::SqlAnswer, ingest::SqlFailure>>
    {
        use ingest::{SqlFailure, SqlFailureKind as Kind};
        let history = self.0.clone();
        Box::pin(async move {
            let Some(format) = OutputFormat::from_accept(accept.as_deref()) else {
                return Err(SqlFailure {
                    kind: Kind::NotAcceptable,
                    message: "Accept names no format this server renders: use application/json, \
                              application/x-ndjson, text/csv, text/plain, \
                              application/vnd.apache.arrow.stream or application/vnd.apache.parquet"
                        .into(),
                });
            };
            let failure = |e: analytics::AnalyticsError| {
                use analytics::AnalyticsError as E;
                let kind = match &e {
                    E::ReadOnly { .. } => Kind::Refused,
                    _ if e.is_over_limit() => Kind::OverLimit,
                    E::Query { .. } => Kind::Invalid,
                    _ => Kind::Internal,
                };
                SqlFailure {
                    kind,
                    message: e.to_string(),
                }
            };
            let result = history.query(&sql).await.map_err(failure)?;
            let rows = result.rows();
            let body = tokio::task::spawn_blocking(move || analytics::sql::render(&result, format))
                .await
                .map_err(|e| SqlFailure {
                    kind: Kind::Internal,
                    message: e.to_string(),
                })?
                .map_err(failure)?;
            Ok(ingest::SqlAnswer {
                content_type: format.content_type(),
                body: body.into(),
                rows,
            })
        })
    }
}

async fn ingest_only(args: IngestArgs) -> Result<()> {
    let render = init_metrics()?;
    let (settings, _) = connect(&args.kafka, false).await?;
    let producer = Producer::new(&settings, &args.producer)?;
    let stop = CancellationToken::new();
    report_producer_queue(producer.clone(), stop.clone());
    let view = ingest::StatusView::start(
        settings.clone(),
        args.ingest.status_max_deliveries,
        stop.clone(),
    );
    let mut ingest = Ingest::bind(args.ingest, producer)
        .await?
        .with_metrics(render)
        .with_status(view);
    let lag_watch = watch_lag(&settings, &args.backpressure, false, stop.clone())?;
    if let Some((behind, _)) = &lag_watch {
        ingest = ingest.with_backpressure(behind.clone());
    }
    let addr = ingest.local_addr()?;
    println!("dronedelivery listening on http://{addr}");
    tracing::info!(%addr, "ingest listening");
    let task = tokio::spawn(ingest.run(stop.clone()));
    let result = until_stopped("ingest", task, &stop).await;
    if let Some((_, watch)) = lag_watch {
        let _ = watch.await;
    }
    result
}

async fn sql_server(args: SqlServerArgs) -> Result<()> {
    let render = init_metrics()?;
    if args.sql.sql_timeout_secs == 0 {
        anyhow::bail!("--sql-timeout-secs must be at least 1");
    }
    let history = History::open(&args.data, &args.sql).await?;
    history
        .check()
        .await
        .with_context(|| format!("reading the history at {}", args.data))?;
    let config = IngestConfig {
        listen: args.listen,
        api_keys: args.api_keys,
        sql_tenants: args.sql_tenants,
        max_connections: args.max_connections,
        max_in_flight: args.max_in_flight,
        header_read_timeout_secs: args.header_read_timeout_secs,
        drain_secs: args.drain_secs,
        // Nothing is ingested here: no idempotency window to keep.
        idempotency_window_bytes: 0,
        ..IngestConfig::default()
    };
    let readable = history.clone();
    let ready: ingest::ops::Readiness = Arc::new(move || {
        let history = readable.clone();
        Box::pin(async move {
            history
                .check()
                .await
                .map_err(|e| format!("the history cannot be read: {e}"))
        })
    });
    let server = Ingest::bind_read_only(config)
        .await?
        .with_metrics(render)
        .with_readiness(ready)
        .with_sql(Arc::new(HistorySql(history.clone())));
    let stop = CancellationToken::new();
    let flight_task = start_flight(
        &args.flight.flight_listen,
        history,
        server.sql_authenticator(),
        stop.clone(),
    )
    .await?;
    let addr = server.local_addr()?;
    if server.is_unauthenticated() {
        println!("no --api-keys: serving loopback clients only, without keys");
    }
    println!("sql server listening on http://{addr}");
    tracing::info!(%addr, "sql server listening on http://{addr}");
    let task = tokio::spawn(server.run(stop.clone()));
    let mut result = until_stopped("sql server", task, &stop).await;
    if let Some(task) = flight_task {
        result = result.and(join("flight sql", task).await);
    }
    result
}

async fn process_only(args: ProcessArgs) -> Result<()> {
    use processors::Processor;
    let render = init_metrics()?;
    let (settings, _) = connect(&args.kafka, false).await?;
    let producer = Producer::new(&settings, &args.producer)?;
    let stop = CancellationToken::new();
    let stop_health_token = CancellationToken::new();
    report_producer_queue(producer.clone(), stop.clone());
    let health = start_health(
        &args.health,
        broker_readiness(&settings)?,
        render,
        stop.clone(),
        stop_health_token.clone(),
    )
    .await?;
    let mut tasks: Vec<(&'static str, JoinHandle<processors::Result<()>>)> = Vec::new();
    if args.processors.contains(&Processor::Workflow) {
        tasks.push((
            "workflow",
            tokio::spawn(processors::workflow::run(
                args.workflow,
                settings.clone(),
                producer.clone(),
                stop.clone(),
            )),
        ));
    }
    let stateful: Vec<Processor> = args
        .processors
        .iter()
        .copied()
        .filter(|p| p.is_stateful())
        .collect();
    if !stateful.is_empty() {
        tasks.push((
            "processors",
            tokio::spawn(processors::run_stateful(
                args.stateful,
                stateful,
                settings,
                producer.clone(),
                stop.clone(),
            )),
        ));
    }
    if tasks.is_empty() {
        anyhow::bail!("--processors names no processor");
    }
    // Until asked to stop, or until one of them stops on its own (an error).
    let early = tokio::select! {
        () = shutdown_signal() => None,
        (r, index, _) = futures_util::future::select_all(tasks.iter_mut().map(|(_, t)| t)) => {
            let name = tasks[index].0;
            Some((index, name, outcome(name, r)))
        }
    };
    stop.cancel();
    let finished = early.as_ref().map(|(index, _, _)| *index);
    let mut result = match early {
        Some((_, _, Err(e))) => Err(e),
        Some((_, name, Ok(()))) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
        None => Ok(()),
    };
    for (index, (name, task)) in tasks.into_iter().enumerate() {
        if finished != Some(index) {
            result = result.and(join(name, task).await);
        }
    }
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
    result.and(stop_health(stop_health_token, health).await)
}

async fn history_only(args: HistoryArgs) -> Result<()> {
    let render = init_metrics()?;
    let (settings, _) = connect(&args.kafka, false).await?;
    let stop = CancellationToken::new();
    let stop_health_token = CancellationToken::new();
    let health = start_health(
        &args.health,
        broker_readiness(&settings)?,
        render,
        stop.clone(),
        stop_health_token.clone(),
    )
    .await?;
    let task = tokio::spawn(analytics::history::run(
        args.sink.into(),
        settings,
        stop.clone(),
        OnShutdown::Stop,
    ));
    let result = until_stopped("history sink", task, &stop).await;
    result.and(stop_health(stop_health_token, health).await)
}

async fn simulate(args: SimulateArgs) -> Result<()> {
    let render = init_metrics()?;
    let (settings, _) = connect(&args.kafka, false).await?;
    let stop = CancellationToken::new();
    let stop_health_token = CancellationToken::new();
    let health = start_health(
        &args.health,
        broker_readiness(&settings)?,
        render,
        stop.clone(),
        stop_health_token.clone(),
    )
    .await?;
    let task = tokio::spawn(processors::simulator::run(
        args.simulator,
        settings,
        stop.clone(),
    ));
    let result = until_stopped("simulator", task, &stop).await;
    result.and(stop_health(stop_health_token, health).await)
}

async fn sql(args: SqlArgs) -> Result<()> {
    use analytics::sql::OutputFormat;
    use std::io::Write as _;
    if args.output.is_none() && matches!(args.format, OutputFormat::Parquet | OutputFormat::Arrow) {
        anyhow::bail!("--format parquet and --format arrow write binary data: give --output FILE");
    }
    let history = History::open(&args.data, &args.limits).await?;
    let result = history.query(&args.query).await?;
    let bytes = analytics::sql::render(&result, args.format)?;
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

async fn load(config: loadgen::LoadgenConfig) -> Result<()> {
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    let report = loadgen::run(config, stop).await?;
    print!("{report}");
    if report.answered() == 0 {
        anyhow::bail!("no call was answered");
    }
    Ok(())
}

async fn compact(args: CompactArgs) -> Result<()> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    let root = analytics::store::DataRoot::open(&args.data, &cwd)?;
    let log = analytics::log::Log::open(root).await?;
    let report =
        analytics::compact::compact_once(&log, &args.compaction, &CancellationToken::new()).await?;
    eprintln!(
        "merged {} files into {}, {} lost a race, {} deleted",
        report.replaced, report.merged, report.conflicts, report.deleted
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches clashing flag names across the flattened service configs.
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_to_loopback_and_the_local_history() {
        let cli = Cli::try_parse_from(["dronedelivery", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.ingest.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.sink.data, "file://./data");
        assert!(args.kafka.brokers.is_none());
    }
}
