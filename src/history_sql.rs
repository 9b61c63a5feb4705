//! `POST /api/sql` answered by the history: the adapter that lets the ingestion tier's
//! HTTP server (which knows only its `SqlEndpoint` seam) run queries of the analytics
//! crate, renders each result batch as it streams, and maps the analytics errors onto the
//! seam's failure kinds. It holds no state of its own and decides nothing about who may
//! query (the server does).

use analytics::sql::{AsOf, History, OutputFormat, Renderer, ResultStream};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use ingest::{SqlAnswer, SqlEndpoint, SqlFailure, SqlFailureKind as Kind};

/// The history as the HTTP server's SQL endpoint.
pub(crate) struct HistorySql(pub(crate) History);

impl SqlEndpoint for HistorySql {
    fn query(
        &self,
        sql: String,
        as_of: Option<String>,
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
            let as_of = as_of
                .map(|text| AsOf::parse(&text))
                .transpose()
                .map_err(|reason| SqlFailure {
                    kind: Kind::Invalid,
                    message: format!("asOf: {reason}"),
                })?;
            let result = history
                .query_stream_as_of(&sql, as_of)
                .await
                .map_err(failure)?;
            let renderer = Renderer::new(result.schema(), format)
                .map_err(failure)?
                .bounded(result.max_result_mb());
            Ok(SqlAnswer {
                content_type: format.content_type(),
                body: rendered(result, renderer).boxed(),
            })
        })
    }
}

/// The rendered chunks of `result`, ending after the last one or the first failure. Each
/// batch is rendered off the async threads.
fn rendered(
    result: ResultStream,
    renderer: Renderer,
) -> impl futures_util::Stream<Item = Result<Bytes, SqlFailure>> + Send + 'static {
    futures_util::stream::unfold(Some((result, renderer)), |state| async move {
        let (mut result, mut renderer) = state?;
        loop {
            let Some(batch) = result.next().await else {
                let last = off_thread(move || renderer.finish()).await;
                return Some((last, None));
            };
            let chunk = match batch {
                Ok(batch) => {
                    let (back, chunk) =
                        off_thread_keeping(renderer, move |r| r.write(&batch)).await;
                    match back {
                        Some(back) => renderer = back,
                        None => return Some((chunk, None)),
                    }
                    chunk
                }
                Err(e) => return Some((Err(failure(e)), None)),
            };
            match chunk {
                Ok(bytes) if bytes.is_empty() => continue,
                Ok(bytes) => return Some((Ok(bytes), Some((result, renderer)))),
                Err(e) => return Some((Err(e), None)),
            }
        }
    })
}

/// Runs `work` on the blocking pool.
async fn off_thread(
    work: impl FnOnce() -> analytics::Result<Bytes> + Send + 'static,
) -> Result<Bytes, SqlFailure> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SqlFailure {
            kind: Kind::Internal,
            message: e.to_string(),
        })?
        .map_err(failure)
}

/// Runs `work` on `renderer` on the blocking pool, and gives the renderer back (none if
/// the task failed).
async fn off_thread_keeping(
    mut renderer: Renderer,
    work: impl FnOnce(&mut Renderer) -> analytics::Result<Bytes> + Send + 'static,
) -> (Option<Renderer>, Result<Bytes, SqlFailure>) {
    let done = tokio::task::spawn_blocking(move || {
        let out = work(&mut renderer);
        (renderer, out)
    })
    .await;
    match done {
        Ok((renderer, out)) => (Some(renderer), out.map_err(failure)),
        Err(e) => (
            None,
            Err(SqlFailure {
                kind: Kind::Internal,
                message: e.to_string(),
            }),
        ),
    }
}

/// An analytics error as the seam's failure: refused, over a limit, invalid, or ours.
fn failure(e: analytics::AnalyticsError) -> SqlFailure {
    use analytics::AnalyticsError as E;
    let kind = match &e {
        E::ReadOnly { .. } => Kind::Refused,
        _ if e.is_over_limit() => Kind::OverLimit,
        E::Query { .. } | E::NoSuchVersion { .. } => Kind::Invalid,
        _ => Kind::Internal,
    };
    SqlFailure {
        kind,
        message: e.to_string(),
    }
}
