//! What the integration tests share: an ingestion tier on an embedded broker in this
//! process, an HTTP client, and generated requests. The binary as a child process is
//! `binary` (the harness), its services as deployed are `service`.
#![allow(dead_code, unreachable_pub)]

pub mod binary;
pub mod kafka;
pub mod service;
pub mod writer;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bus::{ClientSettings, Consumer, EmbeddedBroker, Producer, ProducerArgs};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use schemas::topics;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen.
pub const SETTLE: Duration = Duration::from_secs(60);

pub fn valid_request(i: usize) -> serde_json::Value {
    serde_json::json!({
        "ownerId": format!("tenant-{}", i % 3),
        "pickupLocation": format!("{},{}", 47.0 + (i as f64) / 100.0, -122.3),
        "dropOffLocation": {"latitude": 47.62, "longitude": -122.35},
        "pickupTime": "2026-11-24T10:00:00Z",
        "deadline": "2026-11-24T12:00:00+01:00",
        "expedited": i.is_multiple_of(2),
        "confirmationRequired": "Picture",
        "packageInfo": {"packageId": format!("pkg-{i}"), "size": "Medium", "weight": 0.5 + i as f64, "tag": "e2e"}
    })
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The ingestion tier alone, in this process, on an embedded broker.
pub struct IngestOnly {
    pub broker: EmbeddedBroker,
    pub base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<ingest::Result<()>>,
}

impl IngestOnly {
    pub async fn start(config: ingest::IngestConfig) -> Result<Self> {
        Self::start_with(config, ProducerArgs::default()).await
    }

    pub async fn start_with(config: ingest::IngestConfig, tuning: ProducerArgs) -> Result<Self> {
        let broker = EmbeddedBroker::start(1, &topics::ALL)?;
        let settings = ClientSettings::plain(broker.bootstrap_servers());
        let producer = Producer::new(&settings, &tuning)?;
        let server = ingest::Ingest::bind(
            ingest::IngestConfig {
                http: ingest::HttpServerArgs {
                    listen: "127.0.0.1:0".parse()?,
                    ..config.http
                },
                ..config
            },
            producer,
        )
        .await?;
        let base = format!("http://{}", server.local_addr()?);
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        Ok(Self {
            broker,
            base,
            stop,
            task,
        })
    }

    /// Every record on `delivery-requests`, read until `expected` arrived and then one
    /// quiet second more (so that extras would be seen): key to payload.
    pub async fn records(&self, expected: usize) -> Result<Vec<(String, Vec<u8>)>> {
        self.records_of(topics::DELIVERY_REQUESTS.name, expected)
            .await
    }

    /// The same for any topic.
    pub async fn records_of(&self, topic: &str, expected: usize) -> Result<Vec<(String, Vec<u8>)>> {
        let settings = ClientSettings::plain(self.broker.bootstrap_servers());
        let reader = Consumer::subscribe(
            &settings,
            &format!("reader-{}", uuid::Uuid::new_v4()),
            &[topic],
        )?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let wait = if out.len() >= expected {
                tokio::time::Instant::now() + Duration::from_secs(1)
            } else {
                deadline
            };
            match tokio::time::timeout_at(wait, reader.recv()).await {
                Ok(record) => {
                    let record = record?;
                    out.push((
                        String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned(),
                        record.payload().unwrap_or_default().to_vec(),
                    ));
                }
                Err(_) if out.len() >= expected => return Ok(out),
                Err(_) => bail!("only {} of {expected} records arrived", out.len()),
            }
        }
    }

    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        tokio::time::timeout(SETTLE, self.task).await???;
        Ok(())
    }
}

/// POSTs `body` as JSON; answers status, headers and the JSON answer (an error when the
/// answer is not JSON, unlike [`post_json`]).
pub async fn post(
    client: &HttpClient,
    url: &str,
    body: &serde_json::Value,
) -> Result<(u16, hyper::HeaderMap, serde_json::Value)> {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .context("request timed out")??;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, headers, serde_json::from_slice(&bytes)?))
}

/// Any request with a `content-type`; answers status and headers only.
pub async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, hyper::HeaderMap)> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .context("request timed out")??;
    Ok((response.status().as_u16(), response.headers().clone()))
}

/// A POST with `headers` and `body` (see [`call`]).
pub async fn post_raw(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(u16, hyper::HeaderMap, serde_json::Value)> {
    call(client, "POST", url, headers, body).await
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Any request: method, URL, headers and body; answers status, headers and JSON body
/// (`Null` when the body is not JSON).
pub async fn call(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(u16, hyper::HeaderMap, serde_json::Value)> {
    let (status, headers, bytes) = call_bytes(client, method, url, headers, body).await?;
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, headers, json))
}

/// Any request; answers status, headers and the body as bytes.
pub async fn call_bytes(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(u16, hyper::HeaderMap, Bytes)> {
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(request.body(Full::new(Bytes::from(body)))?),
    )
    .await
    .context("request timed out")??;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, headers, bytes))
}

/// An HTTP/1.1 client.
pub fn client() -> HttpClient {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// The first column of the first row of `sql` over the history in `data` (0 when there
/// is no row).
pub async fn history_scalar(data: &str, sql: &str) -> Result<i64> {
    use arrow::array::AsArray;
    let history =
        analytics::sql::History::open(data, &analytics::sql::QueryLimitsArgs::default()).await?;
    let result = history.query(sql).await.with_context(|| sql.to_owned())?;
    Ok(result
        .batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .map_or(0, |b| {
            b.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0)
        }))
}

/// Waits (up to `limit`) until `sql` over the history in `data` answers `expected`.
pub async fn history_reaches(data: &str, sql: &str, expected: i64, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let found = history_scalar(data, sql).await?;
        if found == expected {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{sql}: {found}, not {expected}, after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// POSTs `body` as JSON; answers status, headers and the JSON answer.
pub async fn post_json(
    client: &HttpClient,
    url: &str,
    body: &serde_json::Value,
) -> Result<(u16, hyper::HeaderMap, serde_json::Value)> {
    let headers = [("content-type", "application/json")];
    call(client, "POST", url, &headers, body.to_string().into_bytes()).await
}

/// The first column (text) of every row of `sql` over the history in `data`.
pub async fn history_strings(data: &str, sql: &str) -> Result<Vec<String>> {
    use arrow::array::AsArray;
    let history =
        analytics::sql::History::open(data, &analytics::sql::QueryLimitsArgs::default()).await?;
    let result = history.query(sql).await.with_context(|| sql.to_owned())?;
    let mut out = Vec::new();
    for batch in &result.batches {
        let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
        out.extend(
            column
                .as_string::<i32>()
                .iter()
                .map(|v| v.unwrap_or_default().to_owned()),
        );
    }
    Ok(out)
}

/// A valid request with id `id` and owner `owner`, picked up in one of 32 one-degree
/// regions west of longitude `lon` (latitudes 40 to 47, longitudes `lon-1` to `lon-4`) and
/// dropped off nearby, with a deadline far in the future. Tests that share a cluster give each its own `lon`, so that no
/// test's deliveries wait for drones behind another's.
pub fn request_in(i: usize, id: &str, owner: &str, lon: i32) -> serde_json::Value {
    let lat = 40.5 + (i % 8) as f64;
    let lon = f64::from(lon) - 0.5 - ((i / 8) % 4) as f64;
    let mut r = valid_request(i);
    r["deliveryId"] = id.into();
    r["ownerId"] = owner.into();
    r["pickupLocation"] = format!("{lat},{lon}").into();
    r["dropOffLocation"] = serde_json::json!({"latitude": lat + 0.02, "longitude": lon - 0.03});
    // A deadline that never passes while a test runs: a request still waiting for a
    // drone past its deadline is cancelled, and these must all complete.
    r["deadline"] = "2099-01-01T00:00:00Z".into();
    // A package every drone can carry, whatever `i` (valid_request's weight grows with it).
    r["packageInfo"]["size"] = "Small".into();
    r["packageInfo"]["weight"] = serde_json::json!(1.0 + (i % 3) as f64 * 0.5);
    r
}

/// Of the deliveries with ids starting `prefix-`, those in `delivery_requests` that have
/// not completed in `delivery_events`, each with the stages it has (at most `limit`): what
/// a test that waited in vain shows.
pub async fn unfinished_deliveries(data: &str, prefix: &str, limit: usize) -> Result<String> {
    let requested = history_strings(
        data,
        &format!(
            "SELECT DISTINCT delivery_id FROM delivery_requests WHERE delivery_id LIKE '{prefix}-%'"
        ),
    )
    .await?;
    let events = history_strings(
        data,
        &format!(
            "SELECT concat(delivery_id, ' ', CAST(seq AS VARCHAR), ':', stage) FROM delivery_events \
             WHERE delivery_id LIKE '{prefix}-%'"
        ),
    )
    .await?;
    let mut stages: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for line in &events {
        if let Some((id, stage)) = line.split_once(' ') {
            stages.entry(id).or_default().push(stage);
        }
    }
    let unfinished: Vec<String> = requested
        .iter()
        .filter(|id| {
            !stages
                .get(id.as_str())
                .is_some_and(|s| s.iter().any(|s| s.ends_with(":Completed")))
        })
        .map(|id| {
            format!(
                "{id}: {:?}",
                stages.get(id.as_str()).cloned().unwrap_or_default()
            )
        })
        .collect();
    Ok(format!(
        "{} of {} requested not completed, e.g. {:?}",
        unfinished.len(),
        requested.len(),
        &unfinished[..unfinished.len().min(limit)]
    ))
}

/// Waits (up to `limit`) until `delivery_requests` holds every id of `accepted`, then
/// checks that it holds each exactly once and no other id starting `ids-`.
pub async fn history_holds_exactly(
    data: &str,
    ids: &str,
    accepted: &std::collections::BTreeSet<String>,
    limit: Duration,
) -> Result<()> {
    let owner = ids;
    let sql = format!("SELECT delivery_id FROM delivery_requests WHERE delivery_id LIKE '{ids}-%'");
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let rows = history_strings(data, &sql).await?;
        let found: std::collections::BTreeSet<String> = rows.iter().cloned().collect();
        if accepted.is_subset(&found) {
            if rows.len() != found.len() || found != *accepted {
                bail!(
                    "{owner}: {} rows, {} distinct ids, {} accepted: not exactly the accepted records",
                    rows.len(),
                    found.len(),
                    accepted.len()
                );
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let missing: Vec<_> = accepted.difference(&found).take(10).collect();
            bail!(
                "{owner}: after {limit:?} the history lacks {} of {} accepted ids, e.g. {missing:?}",
                accepted.difference(&found).count(),
                accepted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A temporary folder for a test's history: the folder (removed when dropped) and the
/// history root inside it.
pub fn history_folder() -> Result<(tempfile::TempDir, String)> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("history");
    let data = data.to_str().context("a UTF-8 temporary path")?.to_owned();
    Ok((dir, data))
}
