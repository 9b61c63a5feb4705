//! The secondary listeners a command may open beside its services: Arrow Flight SQL over
//! the history, and the health listener (`/healthz`, `/readyz`, `/metrics`) of services
//! without a public API. Each is bound here, announced on stdout (`crate::announce`'s
//! lines), and handed back as a future for the command's supervisor to run; nothing here
//! spawns or stops a task.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use analytics::sql::History;
use anyhow::{Context, Result};
use dronedelivery::announce;
use ingest::MetricsRender;
use ingest::health::{HealthServer, Readiness};
use tokio_util::sync::CancellationToken;

use crate::cli::Listen;

/// Binds Arrow Flight SQL over `history` on `listen` (none when `off`), its connections
/// bounded by `limits`, checking callers as `POST /api/sql` does; it serves until `stop`
/// is cancelled.
pub(crate) async fn flight(
    listen: Listen,
    limits: analytics::ConnectionLimits,
    history: History,
    authenticator: ingest::SqlAuthenticator,
    stop: CancellationToken,
) -> Result<Option<impl Future<Output = analytics::Result<()>> + Send + 'static>> {
    let Some(listen) = listen.address() else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for Flight SQL"))?;
    let flight_addr = listener.local_addr()?;
    println!("{}", announce::line(announce::FLIGHT_SQL, flight_addr));
    tracing::info!(%flight_addr, "Arrow Flight SQL on grpc://{flight_addr}");
    let authenticate: analytics::flight::Authenticate = Arc::new(move |header, peer| {
        // A peer tonic cannot name (or a call a proxy forwarded: no peer is given then)
        // is not local.
        let origin = ingest::tenants::Origin {
            peer: peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            forwarded: false,
        };
        authenticator
            .check(header, origin)
            .map_err(|e| e.to_string())
    });
    Ok(Some(analytics::flight::serve(
        listener,
        history,
        authenticate,
        limits,
        stop,
    )))
}

/// Binds the health listener on `listen` (none when `off`): `/readyz` passes while
/// `ready` does and `stopping` is not cancelled. It serves until `stop` is cancelled,
/// which should come after its service stopped, so liveness holds while that drains.
pub(crate) async fn health(
    listen: Listen,
    ready: Readiness,
    render: MetricsRender,
    stopping: CancellationToken,
    stop: CancellationToken,
) -> Result<Option<impl Future<Output = ingest::Result<()>> + Send + 'static>> {
    let Some(listen) = listen.address() else {
        return Ok(None);
    };
    let check: Readiness = Arc::new(move || {
        if stopping.is_cancelled() {
            return Box::pin(async { Err("stopping".to_owned()) });
        }
        ready()
    });
    let server = HealthServer::bind(listen, check, Some(render)).await?;
    let addr = server.local_addr()?;
    println!("{}", announce::line(announce::HEALTH, addr));
    tracing::info!(%addr, "health checks and metrics on http://{addr}");
    Ok(Some(server.run(stop)))
}

/// Readiness of the history sink: fails, with the store's error, while the sink cannot
/// write the history (it keeps its rows and tries again).
pub(crate) fn sink_readiness(health: analytics::sink::SinkHealth) -> Readiness {
    Arc::new(move || {
        let stalled = health.stalled();
        Box::pin(async move { stalled.map_or(Ok(()), Err) })
    })
}

/// Readiness of the processors: fails, with the last failure, while any of them cannot
/// write its outputs and retries.
pub(crate) fn output_readiness(health: processors::OutputHealth) -> Readiness {
    Arc::new(move || {
        let stalled = health.stalled();
        Box::pin(async move { stalled.map_or(Ok(()), Err) })
    })
}

/// Readiness that passes when `first` and then `second` do.
pub(crate) fn both(first: Readiness, second: Readiness) -> Readiness {
    Arc::new(move || {
        let (first, second) = (first(), second());
        Box::pin(async move {
            first.await?;
            second.await
        })
    })
}
