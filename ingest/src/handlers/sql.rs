//! `POST /api/sql`: queries over the history, and who may send them ([`may_query`],
//! [`SqlAuthenticator`] for the other SQL interfaces).
//!
//! It owns the request's shape (`{"sql": "..."}`), the access rule (`--sql-tenants`) and
//! the hand-over to the [`SqlEndpoint`](crate::SqlEndpoint) the binary plugged in, whose
//! answer it passes on as it streams. It must not run queries itself, and must not import
//! the routes or the server.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response, header};

use super::check_json_content_type;
use crate::admission::read_body;
use crate::body::{Body, full, streamed};
use crate::error::{IngestError, Result};
use crate::produce::Caller;
use crate::sql::{SqlFailure, SqlFailureKind};
use crate::state::App;
use crate::tenants::Origin;
use crate::tenants::{Tenant, Tenants};

/// Largest `POST /api/sql` body.
const MAX_SQL_BODY: usize = 256 * 1024;

/// `POST /api/sql` with `{"sql": "SELECT ...", "asOf": ...}`: the result as JSON (an array of
/// objects), NDJSON, CSV, text, Arrow IPC or Parquet, by `Accept`. For tenants named in
/// `--sql-tenants` (and loopback clients of a tier without keys).
pub(crate) async fn post_sql(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
) -> Result<Response<Body>> {
    let Some(engine) = app.sql.clone() else {
        return Err(IngestError::NotFound {
            path: "/api/sql".into(),
        });
    };
    may_query(&app.config.auth.sql_tenants, caller.tenant)?;
    check_json_content_type(&req)?;
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut admission = app.budgets.admit_read(caller.tenant)?;
    let body = read_body(req, MAX_SQL_BODY, &mut admission).await?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SqlRequest {
        sql: String,
        /// Time travel: a version number or an RFC 3339 time (never `null`).
        #[serde(
            default,
            rename = "asOf",
            deserialize_with = "schemas::delivery::present"
        )]
        as_of: Option<AsOf>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum AsOf {
        Version(u64),
        Time(String),
    }
    let request: SqlRequest = serde_json::from_slice(&body).map_err(|e| IngestError::Sql {
        kind: SqlFailureKind::Invalid,
        message: format!(
            "the body must be {{\"sql\": \"SELECT ...\"}}, with an optional \"asOf\" (a version \
             number or an RFC 3339 time): {e}"
        ),
    })?;
    let as_of = request.as_of.map(|a| match a {
        AsOf::Version(v) => v.to_string(),
        AsOf::Time(t) => t,
    });
    let answer = engine
        .query(request.sql, as_of, accept)
        .await
        .map_err(sql_error)?;
    let body = head_or_stream(answer.body).await?;
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(answer.content_type),
    );
    Ok(response)
}

/// Results up to this many bytes are answered whole, so that a failure within them (a
/// limit passed) still gets its own status; a larger result streams, and a failure past
/// this point ends the answer early (see `body`).
const WHOLE_ANSWER_BYTES: usize = 256 * 1024;

/// The body of a result: whole when it ends within [`WHOLE_ANSWER_BYTES`], else the
/// chunks read so far followed by the rest as it comes.
async fn head_or_stream(
    mut chunks: BoxStream<'static, std::result::Result<Bytes, SqlFailure>>,
) -> Result<Body> {
    let mut head = Vec::new();
    let mut held = 0;
    while held < WHOLE_ANSWER_BYTES {
        match chunks.next().await {
            None => return Ok(full(head.concat())),
            Some(chunk) => {
                let chunk = chunk.map_err(sql_error)?;
                held += chunk.len();
                head.push(chunk);
            }
        }
    }
    let rest = chunks.inspect_err(|failure| {
        metrics::counter!("ingest_sql_answers_cut_total").increment(1);
        tracing::debug!(reason = %failure.message, "sql answer ended early");
    });
    Ok(streamed(
        futures_util::stream::iter(head.into_iter().map(Ok)).chain(rest),
    ))
}

fn sql_error(failure: SqlFailure) -> IngestError {
    IngestError::Sql {
        kind: failure.kind,
        message: failure.message,
    }
}

/// Whether `tenant` may query the history: it is named in `sql_tenants`
/// (`--sql-tenants`), or it is the loopback tenant of a tier without keys.
fn may_query(sql_tenants: &[String], tenant: &Tenant) -> Result<()> {
    if tenant.is_unauthenticated() || sql_tenants.iter().any(|t| **t == *tenant.name) {
        Ok(())
    } else {
        Err(IngestError::Forbidden {
            reason: format!(
                "tenant {} may not query the history (see --sql-tenants)",
                &*tenant.name
            ),
        })
    }
}

/// Checks callers of other SQL interfaces (Arrow Flight SQL) the way `POST /api/sql`
/// does: the same keys, the same `--sql-tenants`.
#[derive(Clone)]
pub struct SqlAuthenticator {
    tenants: Arc<Tenants>,
    sql_tenants: Arc<[String]>,
}

impl std::fmt::Debug for SqlAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlAuthenticator").finish_non_exhaustive()
    }
}

impl SqlAuthenticator {
    /// Checks callers against `tenants` (the server's own, shared) and `sql_tenants`.
    pub(crate) fn new(tenants: Arc<Tenants>, sql_tenants: &[String]) -> Self {
        Self {
            tenants,
            sql_tenants: sql_tenants.into(),
        }
    }

    /// The calling tenant's name, if the `Authorization` value (`Bearer KEY`) from
    /// `origin` may query the history.
    pub fn check(&self, authorization: Option<&[u8]>, origin: Origin) -> Result<String> {
        let tenant = self.tenants.authenticate(authorization, origin)?;
        may_query(&self.sql_tenants, tenant)?;
        Ok(tenant.name.to_string())
    }
}
