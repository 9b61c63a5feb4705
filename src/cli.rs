//! The command line: every subcommand and the flags it takes, as clap blocks. Blocks that
//! several services share are declared once (in the library that reads them, or here when
//! only the binary does) and flattened where they are needed. Values are parsed here into
//! their types (addresses, `off`, enums), so a command never re-reads text.
//!
//! Nothing here starts anything: `crate::commands` runs what was parsed.

use std::net::SocketAddr;
use std::str::FromStr;

use analytics::sink::SinkArgs;
use analytics::sql::{QueryLimitsArgs, SqlArgs};
use analytics::store::DataArgs;
use bus::{KafkaArgs, ProducerArgs};
use clap::{Parser, Subcommand};
use ingest::{AuthArgs, HttpServerArgs, TierArgs};
use processors::StatefulArgs;
use processors::guarantee::GuaranteeArgs;
use processors::notifier::NotifierArgs;
use processors::simulator::SimulatorArgs;
use processors::workflow::WorkflowArgs;

/// A high-throughput ingestion and stream-processing pipeline for drone deliveries:
/// HTTP in, Kafka in the middle, Parquet history out, SQL on top.
#[derive(Debug, Parser)]
#[command(name = "dronedelivery", version)]
pub(crate) struct Cli {
    /// Log filter, in `RUST_LOG` syntax (`info`, `debug`, `ingest=debug,info`, ...).
    #[arg(long, env = "DRONEDELIVERY_LOG", default_value = "info", global = true)]
    pub(crate) log: String,

    /// Log line format: `text` for people, `json` (one object per line, with the
    /// request's correlation id and tenant as fields) for log pipelines.
    #[arg(
        long,
        env = "DRONEDELIVERY_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub(crate) log_format: LogFormat,

    /// Parse the command line and the environment, say what is wrong, and exit without
    /// starting anything (deployment manifests are checked this way).
    #[arg(long, global = true, hide = true)]
    pub(crate) check_config: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the whole pipeline in one process: ingestion, processors and history sink.
    /// Without --brokers it starts an in-memory Kafka broker.
    Run(Box<RunArgs>),
    /// Run the HTTP ingestion tier alone against a Kafka cluster.
    Ingest(Box<IngestArgs>),
    /// Run the stream processors (workflow, scheduling, drone tracking, delivery state,
    /// notifier) against a Kafka cluster.
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
    Loadgen(Box<loadgen::LoadgenArgs>),
}

#[derive(Debug, clap::Args)]
pub(crate) struct SimulateArgs {
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    #[command(flatten)]
    pub(crate) simulator: SimulatorArgs,
    #[command(flatten)]
    pub(crate) health: HealthArgs,
}

/// The health listener: of a service without a public API, or of the ingestion tier, so
/// that probes do not wait behind clients for a connection.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HealthArgs {
    /// Address of the health listener: GET /healthz (alive), /readyz (a broker answers
    /// and the service is not stopping) and /metrics (Prometheus), for probes and
    /// scrapers; or `off`.
    #[arg(long, env = "DRONEDELIVERY_HEALTH_LISTEN", default_value = "off")]
    pub(crate) health_listen: Listen,
}

/// `dronedelivery sql-server`: the HTTP server's flags with lower defaults (a query
/// holds far more memory than a posted batch).
#[derive(Debug, clap::Args)]
#[command(
    mut_arg("listen", |a| a.default_value("127.0.0.1:8081")),
    mut_arg("max_connections", |a| a.default_value("1000")),
    mut_arg("max_in_flight", |a| a.default_value("16")),
)]
pub(crate) struct SqlServerArgs {
    #[command(flatten)]
    pub(crate) http: HttpServerArgs,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) sql: QueryLimitsArgs,
    #[command(flatten)]
    pub(crate) flight: FlightArgs,
    #[command(flatten)]
    pub(crate) health: HealthArgs,
}

/// Arrow Flight SQL over the history.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FlightArgs {
    /// Address of the Arrow Flight SQL endpoint over the history (same keys and
    /// --sql-tenants as POST /api/sql), or `off`.
    #[arg(
        long,
        env = "DRONEDELIVERY_FLIGHT_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub(crate) flight_listen: Listen,

    /// Most Flight SQL connections open at once; further ones wait in the listen
    /// backlog. A connection that sends nothing in its first 10 seconds is closed.
    #[arg(
        long,
        env = "DRONEDELIVERY_FLIGHT_MAX_CONNECTIONS",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) flight_max_connections: u32,

    /// A Flight SQL connection this old is asked to close (an HTTP/2 GOAWAY; gRPC clients
    /// open a new one), whatever it sends, so that none holds its place for ever; it is
    /// closed --sql-timeout-secs and 10 seconds later, whatever its peer does.
    #[arg(
        long,
        env = "DRONEDELIVERY_FLIGHT_MAX_CONNECTION_AGE_SECS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) flight_max_connection_age_secs: u64,
}

impl FlightArgs {
    /// The bounds on Flight SQL's connections.
    pub(crate) fn limits(&self) -> analytics::ConnectionLimits {
        let max_age = std::time::Duration::from_secs(self.flight_max_connection_age_secs);
        analytics::ConnectionLimits {
            max_connections: usize::try_from(self.flight_max_connections).unwrap_or(usize::MAX),
            first_bytes_timeout: max_age.min(std::time::Duration::from_secs(10)),
            max_age,
        }
    }
}

/// Backpressure from the consumers' lag.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BackpressureArgs {
    /// Refuse writes (503 with Retry-After) while a partition of any of the pipeline's
    /// consumer groups is more than this many records behind; take them again at half of
    /// it or less. 0 turns it off. Default: 20,000 with the embedded broker (it keeps only
    /// about 45,000 requests per partition, so a consumer further behind loses records),
    /// off with --brokers.
    #[arg(long, env = "DRONEDELIVERY_MAX_CONSUMER_LAG", value_name = "RECORDS")]
    pub(crate) max_consumer_lag: Option<u64>,

    /// How often the consumers' lag is checked, in milliseconds.
    #[arg(long, env = "DRONEDELIVERY_LAG_CHECK_MS", default_value_t = 500)]
    pub(crate) lag_check_ms: u64,
}

/// Who webhooks may be registered for and sent to; read by the tier (registrations) and
/// the notifier (each send).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WebhookGuardArgs {
    /// Allow webhook endpoints on loopback, private, link-local and other non-public
    /// addresses (a test or a private network). Without it they are refused at
    /// registration and at every send.
    #[arg(long, env = "DRONEDELIVERY_WEBHOOKS_ALLOW_PRIVATE")]
    pub(crate) webhooks_allow_private: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    #[command(flatten)]
    pub(crate) producer: ProducerArgs,
    #[command(flatten)]
    pub(crate) http: HttpServerArgs,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
    #[command(flatten)]
    pub(crate) tier: TierArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) workflow: WorkflowArgs,
    #[command(flatten)]
    pub(crate) stateful: StatefulArgs,
    #[command(flatten)]
    pub(crate) notifier: NotifierArgs,
    #[command(flatten)]
    pub(crate) webhook_guard: WebhookGuardArgs,
    #[command(flatten)]
    pub(crate) guarantee: GuaranteeArgs,
    #[command(flatten)]
    pub(crate) sink: SinkArgs,
    #[command(flatten)]
    pub(crate) sql: QueryLimitsArgs,
    #[command(flatten)]
    pub(crate) flight: FlightArgs,
    /// Also fly the assigned drones in this process (a demo), reporting to this
    /// process's own API unless --simulate-target says otherwise.
    #[arg(long, env = "DRONEDELIVERY_SIMULATE_DRONES")]
    pub(crate) simulate_drones: bool,
    #[command(flatten)]
    pub(crate) simulator: SimulatorArgs,
    #[command(flatten)]
    pub(crate) backpressure: BackpressureArgs,
    #[command(flatten)]
    pub(crate) health: HealthArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct IngestArgs {
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    #[command(flatten)]
    pub(crate) producer: ProducerArgs,
    #[command(flatten)]
    pub(crate) http: HttpServerArgs,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
    #[command(flatten)]
    pub(crate) tier: TierArgs,
    #[command(flatten)]
    pub(crate) webhook_guard: WebhookGuardArgs,
    #[command(flatten)]
    pub(crate) backpressure: BackpressureArgs,
    /// Probes on a listener of their own, with its own few connections: they are
    /// answered even while clients hold every connection of the API.
    #[command(flatten)]
    pub(crate) health: HealthArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ProcessArgs {
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    #[command(flatten)]
    pub(crate) producer: ProducerArgs,
    #[command(flatten)]
    pub(crate) workflow: WorkflowArgs,
    #[command(flatten)]
    pub(crate) stateful: StatefulArgs,
    #[command(flatten)]
    pub(crate) notifier: NotifierArgs,
    #[command(flatten)]
    pub(crate) webhook_guard: WebhookGuardArgs,
    #[command(flatten)]
    pub(crate) guarantee: GuaranteeArgs,
    #[command(flatten)]
    pub(crate) health: HealthArgs,
    /// The processors to run (comma-separated). Each is its own consumer group, so each
    /// can run as its own deployment and scale on its own lag.
    #[arg(
        long,
        env = "DRONEDELIVERY_PROCESSORS",
        value_enum,
        value_delimiter = ',',
        default_values_t = processors::Processor::ALL
    )]
    pub(crate) processors: Vec<processors::Processor>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CompactArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,

    #[command(flatten)]
    pub(crate) compaction: analytics::compact::CompactionArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct HistoryArgs {
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) sink: SinkArgs,
    #[command(flatten)]
    pub(crate) health: HealthArgs,
}

/// A listener's address, or `off` for none: `--health-listen`, `--flight-listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listen {
    /// No listener.
    Off,
    /// Listen on this address (port 0 picks a free port).
    At(SocketAddr),
}

impl Listen {
    /// The address, unless `off`.
    pub(crate) fn address(self) -> Option<SocketAddr> {
        match self {
            Self::Off => None,
            Self::At(address) => Some(address),
        }
    }
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        text.parse()
            .map(Self::At)
            .map_err(|_| format!("{text:?} is neither an address (HOST:PORT) nor `off`"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::At(address) => address.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches clashing flag names across the flattened blocks.
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_to_loopback_and_the_local_history() {
        let cli = Cli::try_parse_from(["dronedelivery", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.data.url, "file://./data");
        assert!(args.kafka.brokers.is_none());
        assert_eq!(
            args.flight.flight_listen,
            Listen::At(SocketAddr::from(([127, 0, 0, 1], 50051)))
        );
    }

    #[test]
    fn listen_addresses_parse_at_the_command_line() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen::Off));
        assert_eq!("OFF".parse::<Listen>(), Ok(Listen::Off));
        assert_eq!(
            "127.0.0.1:0".parse::<Listen>(),
            Ok(Listen::At(SocketAddr::from(([127, 0, 0, 1], 0))))
        );
        assert!("localhost".parse::<Listen>().is_err());
        let refused =
            Cli::try_parse_from(["dronedelivery", "history", "--health-listen", "nowhere"])
                .unwrap_err()
                .to_string();
        assert!(refused.contains("--health-listen"), "{refused}");
        assert!(refused.contains("neither an address"), "{refused}");
        let cli =
            Cli::try_parse_from(["dronedelivery", "process", "--health-listen", "off"]).unwrap();
        let Command::Process(args) = cli.command else {
            panic!("not process");
        };
        assert_eq!(args.health.health_listen.address(), None);
    }

    #[test]
    fn the_sql_server_shares_the_http_flags_with_its_own_defaults() {
        let cli = Cli::try_parse_from(["dronedelivery", "sql-server"]).unwrap();
        let Command::SqlServer(args) = cli.command else {
            panic!("not sql-server");
        };
        assert_eq!(args.http.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(args.http.max_connections, 1_000);
        assert_eq!(args.http.max_in_flight, 16);
        assert_eq!(args.http.header_read_timeout_secs, 30);
        assert_eq!(args.http.drain_secs, 30);
        assert_eq!(args.data.url, "file://./data");
        let cli = Cli::try_parse_from([
            "dronedelivery",
            "sql-server",
            "--listen",
            "127.0.0.1:0",
            "--max-in-flight",
            "4",
        ])
        .unwrap();
        let Command::SqlServer(args) = cli.command else {
            panic!("not sql-server");
        };
        assert_eq!(args.http.listen.port(), 0);
        assert_eq!(args.http.max_in_flight, 4);
        // The ingestion tier keeps the block's own defaults.
        let cli = Cli::try_parse_from(["dronedelivery", "ingest"]).unwrap();
        let Command::Ingest(args) = cli.command else {
            panic!("not ingest");
        };
        assert_eq!(args.http.max_connections, 10_000);
        assert_eq!(args.http.max_in_flight, 4096);
    }
}
