//! The tier's settings, as the command-line blocks the binary flattens where it needs
//! them (each flag declared once): `HttpServerArgs` (the listener and its bounds, shared
//! with the SQL server), `AuthArgs` (API keys and who may query), `TierArgs` (request
//! limits, tenancy, idempotency, the status view); and `IngestConfig`, the three together,
//! which is what the server is built from.
//!
//! It owns only the settings and their defaults. It must not check them against each
//! other (that happens where the state is assembled) nor act on them.

use std::net::SocketAddr;
use std::path::PathBuf;

const LISTEN: &str = "127.0.0.1:8080";
const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_RECORD_BYTES: usize = 64 * 1024;
/// The largest `--max-record-bytes`: a record the processors derive from one (a longer
/// key, more headers) stays well under the broker's 1,000,000-byte message limit.
pub(crate) const MAX_RECORD_BYTES_CEILING: usize = 512 * 1024;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
const MAX_BATCH_RECORDS: usize = 10_000;
const MAX_CONNECTIONS: usize = 10_000;
const HEADER_READ_TIMEOUT_SECS: u64 = 30;
const BODY_IDLE_TIMEOUT_SECS: u64 = 10;
const IDLE_TIMEOUT_SECS: u64 = 60;
const MIN_BODY_BYTES_PER_SEC: u64 = 8 * 1024;
const MAX_IN_FLIGHT: usize = 4096;
const DRAIN_SECS: u64 = 30;
const MAX_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
const TENANT_SHARE_PERCENT: u8 = 50;
const IDEMPOTENCY_WINDOW_SECS: u64 = 3600;
/// The tenant whose keys are fleet keys unless --telemetry-tenants says otherwise.
const DEFAULT_FLEET_TENANT: &str = "fleet";
const STATUS_MAX_DELIVERIES: usize = 1_000_000;
const IDEMPOTENCY_WINDOW_BYTES: usize = 64 * 1024 * 1024;
const SSE_MAX_SUBSCRIBERS: usize = 2_000;
const SSE_MAX_SUBSCRIBERS_PER_TENANT: usize = 200;
const SSE_REPLAY_BYTES: usize = 64 * 1024 * 1024;
const TRACKING_LINK_TTL_SECS: u64 = 7 * 24 * 3_600;
const MAX_WEBHOOKS_PER_TENANT: usize = 10;

/// The HTTP listener and its bounds: shared by the ingestion tier and the SQL server
/// (which lowers some defaults, see the binary's `sql-server`).
#[derive(Debug, Clone, clap::Args)]
pub struct HttpServerArgs {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "DRONEDELIVERY_LISTEN", default_value = LISTEN)]
    pub listen: SocketAddr,

    /// Most open client connections; further ones wait in the listen backlog until one
    /// closes.
    #[arg(long, env = "DRONEDELIVERY_MAX_CONNECTIONS", default_value_t = MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Longest time a client may take to send a request's headers, in seconds; then its
    /// connection is closed.
    #[arg(
        long,
        env = "DRONEDELIVERY_HEADER_READ_TIMEOUT_SECS",
        default_value_t = HEADER_READ_TIMEOUT_SECS
    )]
    pub header_read_timeout_secs: u64,

    /// Longest time a connection may stay idle (no request in progress, no byte either
    /// way: an HTTP/1 keep-alive, an HTTP/2 connection without streams, a stalled
    /// preface), in seconds; then it is closed.
    #[arg(long, env = "DRONEDELIVERY_IDLE_TIMEOUT_SECS", default_value_t = IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,

    /// Longest wait for the next bytes of a request body, in seconds; then the request
    /// gets 408 and its connection is closed.
    #[arg(
        long,
        env = "DRONEDELIVERY_BODY_IDLE_TIMEOUT_SECS",
        default_value_t = BODY_IDLE_TIMEOUT_SECS
    )]
    pub body_idle_timeout_secs: u64,

    /// Slowest average rate a request body may arrive at, in bytes per second, counted
    /// after the first --body-idle-timeout-secs; slower bodies get 408 (so that a slow
    /// upload cannot hold its place and its bytes for long). 0 for no minimum.
    #[arg(
        long,
        env = "DRONEDELIVERY_MIN_BODY_BYTES_PER_SEC",
        default_value_t = MIN_BODY_BYTES_PER_SEC
    )]
    pub min_body_bytes_per_sec: u64,

    /// Most requests handled at once; past it clients get 503 with Retry-After. On the
    /// SQL server this also bounds the memory of queries (with --sql-memory-mb).
    #[arg(long, env = "DRONEDELIVERY_MAX_IN_FLIGHT", default_value_t = MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// How long shutdown waits for in-flight requests (and running queries) to finish, in seconds.
    #[arg(long, env = "DRONEDELIVERY_DRAIN_SECS", default_value_t = DRAIN_SECS)]
    pub drain_secs: u64,
}

impl Default for HttpServerArgs {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: MAX_CONNECTIONS,
            header_read_timeout_secs: HEADER_READ_TIMEOUT_SECS,
            body_idle_timeout_secs: BODY_IDLE_TIMEOUT_SECS,
            idle_timeout_secs: IDLE_TIMEOUT_SECS,
            min_body_bytes_per_sec: MIN_BODY_BYTES_PER_SEC,
            max_in_flight: MAX_IN_FLIGHT,
            drain_secs: DRAIN_SECS,
        }
    }
}

/// Who may call: API keys, and the tenants that may query the history.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// File of API keys, one `tenant:key` per line (optionally `tenant:key:records_per_sec`
    /// for the tenant's own rate limit; `#` starts a comment). Clients send
    /// `Authorization: Bearer KEY`. Without it, only loopback clients are served, as the
    /// tenant `default`.
    #[arg(long, env = "DRONEDELIVERY_API_KEYS", value_name = "FILE")]
    pub api_keys: Option<PathBuf>,

    /// Tenants (from the key file) that may query the history with `POST /api/sql` and
    /// Arrow Flight SQL (comma-separated). They see every tenant's history. Without keys,
    /// loopback clients may.
    #[arg(
        long,
        env = "DRONEDELIVERY_SQL_TENANTS",
        value_delimiter = ',',
        value_name = "TENANT,..."
    )]
    pub sql_tenants: Vec<String>,
}

/// What the ingestion tier accepts: request limits, per-tenant rates, who may post
/// telemetry, idempotency and the status view.
#[derive(Debug, Clone, clap::Args)]
pub struct TierArgs {
    /// Largest accepted body of a single delivery request, in bytes; larger ones get 413.
    #[arg(long, env = "DRONEDELIVERY_MAX_REQUEST_BYTES", default_value_t = MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// Largest record, in bytes, on every write route: a larger record of a batch (or of
    /// a telemetry post, even of one fix: its answer is always the per-record report) is
    /// rejected with its reason (the others go on); a larger single delivery request or
    /// change gets 413.
    /// At most 524288, so that every record derived from it stays under the broker's
    /// limit.
    #[arg(long, env = "DRONEDELIVERY_MAX_RECORD_BYTES", default_value_t = MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,

    /// Largest accepted batch body, in bytes, both as sent and after decompression;
    /// larger ones get 413.
    #[arg(long, env = "DRONEDELIVERY_MAX_BATCH_BYTES", default_value_t = MAX_BATCH_BYTES)]
    pub max_batch_bytes: usize,

    /// Most records in one batch; more get 413.
    #[arg(
        long,
        env = "DRONEDELIVERY_MAX_BATCH_RECORDS",
        default_value_t = MAX_BATCH_RECORDS
    )]
    pub max_batch_records: usize,

    /// Most request body bytes held at once (as sent plus decoded), across all requests;
    /// past it clients get 503 with Retry-After.
    #[arg(
        long,
        env = "DRONEDELIVERY_MAX_IN_FLIGHT_BYTES",
        default_value_t = MAX_IN_FLIGHT_BYTES
    )]
    pub max_in_flight_bytes: usize,

    /// Records per second each tenant may send (a batch counts its records); past it
    /// clients get 429 with Retry-After. 0 means no limit.
    #[arg(long, env = "DRONEDELIVERY_TENANT_RATE_LIMIT", default_value_t = 0.0)]
    pub tenant_rate_limit: f64,

    /// Records a tenant may send at once above its rate; 0 means one second's worth.
    #[arg(long, env = "DRONEDELIVERY_TENANT_BURST", default_value_t = 0.0)]
    pub tenant_burst: f64,

    /// Most of --max-in-flight and of --max-in-flight-bytes one tenant may hold at once,
    /// in percent, so that a tenant sending much at once leaves room for the others; past
    /// it that tenant gets 503 with Retry-After. A share of bytes is never less than one
    /// largest body as sent and decoded. (The only tenant of a tier without keys has no
    /// share.)
    #[arg(
        long,
        env = "DRONEDELIVERY_TENANT_SHARE_PERCENT",
        default_value_t = TENANT_SHARE_PERCENT,
        value_parser = clap::value_parser!(u8).range(1..=100)
    )]
    pub tenant_share_percent: u8,

    /// Most deliveries the status routes keep in memory; past it, finished ones are
    /// forgotten first.
    #[arg(
        long,
        env = "DRONEDELIVERY_STATUS_MAX_DELIVERIES",
        default_value_t = STATUS_MAX_DELIVERIES
    )]
    pub status_max_deliveries: usize,

    /// The fleet tenants (comma-separated): their keys belong to the drones or the fleet
    /// operator and may post drone telemetry; any other tenant's key gets 403 there.
    /// `*` lets every tenant (not for a network). Without --api-keys, loopback clients
    /// may.
    #[arg(
        long,
        env = "DRONEDELIVERY_TELEMETRY_TENANTS",
        value_delimiter = ',',
        value_name = "TENANT,...",
        default_value = DEFAULT_FLEET_TENANT
    )]
    pub telemetry_tenants: Vec<String>,

    /// How long an Idempotency-Key's answer is kept for replay, in seconds.
    #[arg(
        long,
        env = "DRONEDELIVERY_IDEMPOTENCY_WINDOW_SECS",
        default_value_t = IDEMPOTENCY_WINDOW_SECS
    )]
    pub idempotency_window_secs: u64,

    /// Memory for kept Idempotency-Key answers, in bytes; the oldest go first. 0 turns
    /// the window off: no replays, 409s or 422s (retries still get the same delivery ids).
    #[arg(
        long,
        env = "DRONEDELIVERY_IDEMPOTENCY_WINDOW_BYTES",
        default_value_t = IDEMPOTENCY_WINDOW_BYTES
    )]
    pub idempotency_window_bytes: usize,

    /// Most Server-Sent Events subscribers (delivery streams, tenant feeds, tracking
    /// pages) the tier holds at once; past it, 503.
    #[arg(
        long,
        env = "DRONEDELIVERY_SSE_MAX_SUBSCRIBERS",
        default_value_t = SSE_MAX_SUBSCRIBERS
    )]
    pub sse_max_subscribers: usize,

    /// Most SSE subscribers of one tenant (its tracking pages count); past it, 429.
    #[arg(
        long,
        env = "DRONEDELIVERY_SSE_MAX_SUBSCRIBERS_PER_TENANT",
        default_value_t = SSE_MAX_SUBSCRIBERS_PER_TENANT
    )]
    pub sse_max_subscribers_per_tenant: usize,

    /// Memory for the recent events of deliveries, replayed to clients that reconnect
    /// with Last-Event-ID, in bytes; past it the oldest deliveries' events go (a client
    /// reconnecting to one of those gets its latest state).
    #[arg(
        long,
        env = "DRONEDELIVERY_SSE_REPLAY_BYTES",
        default_value_t = SSE_REPLAY_BYTES
    )]
    pub sse_replay_bytes: usize,

    /// The secret tracking links are signed with (at least 32 bytes), the same on every
    /// replica so that any of them verifies any link. Without it, each process makes
    /// one up: links then work only on the process that made them, until it restarts.
    #[arg(
        long,
        env = "DRONEDELIVERY_TRACKING_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub tracking_secret: Option<Secret>,

    /// How long a tracking link works, in seconds.
    #[arg(
        long,
        env = "DRONEDELIVERY_TRACKING_LINK_TTL_SECS",
        default_value_t = TRACKING_LINK_TTL_SECS
    )]
    pub tracking_link_ttl_secs: u64,

    /// Most webhook endpoints one tenant may register.
    #[arg(
        long,
        env = "DRONEDELIVERY_MAX_WEBHOOKS_PER_TENANT",
        default_value_t = MAX_WEBHOOKS_PER_TENANT
    )]
    pub max_webhooks_per_tenant: usize,

    /// Whether webhook endpoints on non-public addresses may be registered (set by the
    /// binary from `--webhooks-allow-private`).
    #[arg(skip)]
    pub webhooks_allow_private: bool,
}

/// A secret given on the command line or in the environment: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Its text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl TierArgs {
    /// The bounds of the live events (SSE).
    pub fn live_limits(&self) -> crate::status::LiveLimits {
        crate::status::LiveLimits {
            max_subscribers: self.sse_max_subscribers,
            max_subscribers_per_tenant: self.sse_max_subscribers_per_tenant,
            replay_bytes: self.sse_replay_bytes,
        }
    }
}

impl Default for TierArgs {
    fn default() -> Self {
        Self {
            max_request_bytes: MAX_REQUEST_BYTES,
            max_record_bytes: MAX_RECORD_BYTES,
            max_batch_bytes: MAX_BATCH_BYTES,
            max_batch_records: MAX_BATCH_RECORDS,
            max_in_flight_bytes: MAX_IN_FLIGHT_BYTES,
            tenant_rate_limit: 0.0,
            tenant_burst: 0.0,
            tenant_share_percent: TENANT_SHARE_PERCENT,
            telemetry_tenants: vec![DEFAULT_FLEET_TENANT.to_owned()],
            status_max_deliveries: STATUS_MAX_DELIVERIES,
            idempotency_window_secs: IDEMPOTENCY_WINDOW_SECS,
            idempotency_window_bytes: IDEMPOTENCY_WINDOW_BYTES,
            sse_max_subscribers: SSE_MAX_SUBSCRIBERS,
            sse_max_subscribers_per_tenant: SSE_MAX_SUBSCRIBERS_PER_TENANT,
            sse_replay_bytes: SSE_REPLAY_BYTES,
            tracking_secret: None,
            tracking_link_ttl_secs: TRACKING_LINK_TTL_SECS,
            max_webhooks_per_tenant: MAX_WEBHOOKS_PER_TENANT,
            webhooks_allow_private: false,
        }
    }
}

/// Everything the HTTP server is built from (`Ingest::bind`, `Ingest::bind_read_only`).
#[derive(Debug, Clone, Default)]
pub struct IngestConfig {
    /// The listener and its bounds.
    pub http: HttpServerArgs,
    /// Who may call.
    pub auth: AuthArgs,
    /// What the tier accepts.
    pub tier: TierArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        http: HttpServerArgs,
        #[command(flatten)]
        auth: AuthArgs,
        #[command(flatten)]
        tier: TierArgs,
    }

    #[test]
    fn default_config_matches_the_flag_defaults() {
        use clap::Parser as _;
        let parsed = Flags::try_parse_from(["ingest"]).unwrap();
        let default = IngestConfig::default();
        assert_eq!(format!("{:?}", parsed.http), format!("{:?}", default.http));
        assert_eq!(format!("{:?}", parsed.auth), format!("{:?}", default.auth));
        assert_eq!(format!("{:?}", parsed.tier), format!("{:?}", default.tier));
        assert_eq!(default.http.listen.to_string(), LISTEN);
    }
}
