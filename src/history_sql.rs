//! `POST /api/sql` answered by the history: the adapter that lets the ingestion tier's
//! HTTP server (which knows only its `SqlEndpoint` seam) run queries of the analytics
//! crate, and maps the analytics errors onto the seam's failure kinds. It holds no state
//! of its own and decides nothing about who may query (the server does).

use analytics::sql::{History, OutputFormat};
use futures_util::future::BoxFuture;
use ingest::{SqlAnswer, SqlEndpoint, SqlFailure, SqlFailureKind as Kind};

/// The history as the HTTP server's SQL endpoint.
pub(crate) struct HistorySql(pub(crate) History);

impl SqlEndpoint for HistorySql {
    fn query(
        &self,
        sql: String,
        accept: Option<String>,
    ) -> BoxFuture<'static, Result<SqlAnswer, SqlFailure>> {
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
            let result = history.query(&sql).await.map_err(failure)?;
            let rows = result.rows();
            let body = tokio::task::spawn_blocking(move || analytics::sql::render(&result, format))
                .await
                .map_err(|e| SqlFailure {
                    kind: Kind::Internal,
                    message: e.to_string(),
                })?
                .map_err(failure)?;
            Ok(SqlAnswer {
                content_type: format.content_type(),
                body: body.into(),
                rows,
            })
        })
    }
}

/// An analytics error as the seam's failure: refused, over a limit, invalid, or ours.
fn failure(e: analytics::AnalyticsError) -> SqlFailure {
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
}
