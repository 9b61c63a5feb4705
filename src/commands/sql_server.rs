//! `dronedelivery sql-server`: SQL over the history (`POST /api/sql` and Arrow Flight
//! SQL) with health and metrics (on the API listener, and on `--health-listen`), and no
//! ingestion routes. It needs no broker: it reads the
//! object store only, and is ready while the history can be read.

use std::sync::Arc;

use analytics::sql::History;
use anyhow::{Context, Result};
use dronedelivery::announce;
use ingest::health::Readiness;
use ingest::{Ingest, IngestConfig, TierArgs};

use crate::cli::SqlServerArgs;
use crate::diagnostics::init_metrics;
use crate::history_sql::HistorySql;
use crate::listeners;
use crate::supervisor::{Supervisor, shutdown_signal};

/// Serves SQL until the process is asked to stop or the server fails.
pub(crate) async fn run(args: SqlServerArgs) -> Result<()> {
    let render = init_metrics()?;
    if args.sql.sql_timeout_secs == 0 {
        anyhow::bail!("--sql-timeout-secs must be at least 1");
    }
    let history = History::open(&args.data.url, &args.sql).await?;
    history
        .check()
        .await
        .with_context(|| format!("reading the history at {}", args.data.url))?;
    let config = IngestConfig {
        http: args.http,
        auth: args.auth,
        tier: TierArgs {
            // Nothing is ingested here: no idempotency window to keep.
            idempotency_window_bytes: 0,
            ..TierArgs::default()
        },
    };
    let readable = history.clone();
    let ready: Readiness = Arc::new(move || {
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
        .with_metrics(render.clone())
        .with_readiness(Arc::clone(&ready))
        .with_sql(Arc::new(HistorySql(history.clone())));
    let mut supervisor = Supervisor::new();
    let (stage, stop) = supervisor.stage();
    let (last, stop_health) = supervisor.stage();
    // The probes' own listener (when asked for), answered while clients hold every
    // connection of the API; up until the server has stopped.
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
    if let Some(flight) = listeners::flight(
        args.flight.flight_listen,
        args.flight.limits(),
        history,
        server.sql_authenticator(),
        stop.clone(),
    )
    .await?
    {
        supervisor.spawn_helper(stage, "flight sql", flight);
    }
    let addr = server.local_addr()?;
    if server.is_unauthenticated() {
        println!("no --api-keys: serving loopback clients only, without keys");
    }
    println!("{}", announce::line(announce::SQL_SERVER, addr));
    tracing::info!(%addr, "sql server listening on http://{addr}");
    supervisor.spawn(stage, "sql server", server.run(stop));
    supervisor.run_until(shutdown_signal()).await
}
