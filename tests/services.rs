//! The real binary end to end on the embedded broker: real HTTP on 127.0.0.1, real Kafka
//! protocol, real Parquet and real SQL. `dronedelivery run` (routes and limits, accepted
//! requests becoming history rows, SIGTERM and Ctrl-C, a second run on the same history,
//! the load generator, overload refused while consumers lag, SQL over HTTP and Flight SQL
//! agreeing), `dronedelivery process --processors`, the services split apart with their
//! health listeners, and the whole deployed topology, one process per service. Every
//! process starts through the harness (`common::binary`); needs the binary cargo builds
//! for the tests, nothing else.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use analytics::sql::{History, QueryLimitsArgs};
use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use bus::{ClientSettings, EmbeddedBroker};
use dronedelivery::announce;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use schemas::topics;

mod common;
use common::binary::{Binary, Launch, Signal};
use common::service::{Service, Topology, eventually_contains};
use common::*;

/// The `dronedelivery run` process, killed if a test fails half-way.
struct Pipeline {
    binary: Binary,
    base: String,
}

impl Pipeline {
    fn start(data: &std::path::Path) -> Result<Self> {
        Ok(Self::start_with(data, &[])?.0)
    }

    /// Starts `run` with `extra` flags; also returns the Flight SQL address.
    fn start_with(data: &std::path::Path, extra: &[&str]) -> Result<(Self, String)> {
        let binary = Launch::new("run")
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--flight-listen",
                "127.0.0.1:0",
                "--roll-interval-ms",
                "300",
            ])
            .args(extra)
            .arg("--data")
            .arg(data)
            .start(&[announce::FLIGHT_SQL, announce::API])?;
        let flight = format!("http://{}", binary.announced(announce::FLIGHT_SQL)?);
        let base = format!("http://{}", binary.announced(announce::API)?);
        Ok((Self { binary, base }, flight))
    }

    /// Sends `signal` (`TERM` or `INT`) and waits (bounded) for a clean exit.
    fn stop(self, signal: &str) -> Result<()> {
        let signal = match signal {
            "TERM" => Signal::Term,
            "INT" => Signal::Int,
            other => bail!("no signal {other} to stop with"),
        };
        let status = self.binary.terminate(signal, SETTLE)?;
        if !status.success() {
            bail!("dronedelivery run exited with {status}");
        }
        Ok(())
    }
}

/// Invalid requests, each with the field the answer must name.
fn invalid_requests() -> Vec<(serde_json::Value, &'static str)> {
    let mut out = Vec::new();
    let mut r = valid_request(0);
    r.as_object_mut().unwrap().remove("ownerId");
    out.push((r, "ownerId"));
    let mut r = valid_request(0);
    r["pickupLocation"] = serde_json::json!("95,0");
    out.push((r, "pickupLocation.latitude"));
    let mut r = valid_request(0);
    r["packageInfo"]["weight"] = serde_json::json!(0);
    out.push((r, "packageInfo.weight"));
    let mut r = valid_request(0);
    r["deadline"] = serde_json::json!("2026-11-24T09:00:00Z");
    out.push((r, "deadline"));
    let mut r = valid_request(0);
    r["packageInfo"]["size"] = serde_json::json!("Enormous");
    out.push((r, "packageInfo.size"));
    out
}

/// Routes, methods and limits answer with the right status.
async fn check_edges(base: &str) -> Result<()> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{base}/api/deliveryrequests");
    let json = "application/json";
    let (status, _) = send(&client, "GET", &format!("{base}/healthz"), json, Vec::new()).await?;
    assert_eq!(status, 200);
    let (status, _) = send(&client, "GET", &format!("{base}/nope"), json, Vec::new()).await?;
    assert_eq!(status, 404);
    let (status, headers) = send(&client, "GET", &url, json, Vec::new()).await?;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "POST");
    let body = valid_request(0).to_string().into_bytes();
    let (status, _) = send(&client, "POST", &url, "text/plain", body).await?;
    assert_eq!(status, 415);
    let mut huge = valid_request(0);
    huge["packageInfo"]["tag"] = serde_json::json!("x".repeat(70 * 1024));
    let (status, _) = send(&client, "POST", &url, json, huge.to_string().into_bytes()).await?;
    assert_eq!(status, 413);
    let (status, _) = send(&client, "POST", &url, json, b"{\"ownerId\": [".to_vec()).await?;
    assert_eq!(status, 400);
    let (status, _) = send(&client, "GET", &format!("{base}/metrics"), json, Vec::new()).await?;
    assert_eq!(status, 200);
    let (status, _) = send(
        &client,
        "GET",
        &format!("{base}/openapi.json"),
        json,
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 200);
    Ok(())
}

/// Posts `n` valid and every invalid request; returns the accepted ids.
async fn post_all(base: &str, n: usize) -> Result<BTreeSet<String>> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{base}/api/deliveryrequests");
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let (status, headers, body) = post(&client, &url, &valid_request(i)).await?;
        assert_eq!(status, 202, "{body}");
        let id = body["deliveryId"]
            .as_str()
            .context("no deliveryId")?
            .to_owned();
        assert_eq!(headers["location"], format!("/api/deliveries/{id}"));
        assert!(ids.insert(id), "ids must be distinct");
    }
    for (request, field) in invalid_requests() {
        let (status, _, body) = post(&client, &url, &request).await?;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["field"], field, "{body}");
        assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
    Ok(ids)
}

async fn history_ids(data: &std::path::Path) -> Result<Vec<String>> {
    let history =
        History::open(data.to_str().context("path")?, &QueryLimitsArgs::default()).await?;
    let batches = history
        .query("SELECT delivery_id FROM delivery_requests ORDER BY delivery_id")
        .await?;
    let mut ids = Vec::new();
    for batch in &batches.batches {
        let column = batch.column(0).as_string::<i32>();
        ids.extend((0..column.len()).map(|i| column.value(i).to_owned()));
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_requests_become_history_rows_while_running_and_after_sigterm() -> Result<()> {
    let data = tempfile::tempdir()?;
    let pipeline = Pipeline::start(data.path())?;
    check_edges(&pipeline.base)
        .await
        .context("checking routes and limits")?;
    let ids = post_all(&pipeline.base, 25)
        .await
        .context("posting requests")?;

    // The history catches up while the pipeline runs.
    let deadline = Instant::now() + SETTLE;
    loop {
        let found = history_ids(data.path())
            .await
            .context("querying the history while running")?;
        if found.len() >= ids.len() {
            assert_eq!(found.iter().cloned().collect::<BTreeSet<_>>(), ids);
            assert_eq!(found.len(), ids.len(), "no duplicates");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history has {} of {} rows",
            found.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A clean stop writes nothing twice.
    pipeline.stop("TERM").context("stopping")?;
    let found = history_ids(data.path())
        .await
        .context("querying the history after the stop")?;
    assert_eq!(found.len(), ids.len());
    assert_eq!(found.into_iter().collect::<BTreeSet<_>>(), ids);

    // The date partition column is there and SQL aggregates work on it.
    let history = History::open(
        data.path().to_str().context("path")?,
        &QueryLimitsArgs::default(),
    )
    .await?;
    let batches = history
        .query("SELECT count(*) AS n, count(DISTINCT date) AS days FROM delivery_requests")
        .await?;
    assert_eq!(
        batches.batches[0]
            .column(0)
            .as_primitive::<Int64Type>()
            .value(0),
        25
    );
    assert_eq!(
        batches.batches[0]
            .column(1)
            .as_primitive::<Int64Type>()
            .value(0),
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_right_after_the_acks_loses_nothing_from_the_in_memory_bus() -> Result<()> {
    let data = tempfile::tempdir()?;
    let pipeline = Pipeline::start(data.path())?;
    let ids = post_all(&pipeline.base, 10).await?;
    pipeline.stop("INT")?;
    let found = history_ids(data.path()).await?;
    assert_eq!(
        found.len(),
        ids.len(),
        "exactly one row per accepted request"
    );
    assert_eq!(found.into_iter().collect::<BTreeSet<_>>(), ids);
    Ok(())
}

/// `POST /api/sql` and Arrow Flight SQL over the same history: the same rows, the same
/// keys, the same refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_and_flight_sql_agree() -> Result<()> {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures_util::TryStreamExt;

    let data = tempfile::tempdir()?;
    let keys = data.path().join("keys");
    std::fs::write(
        &keys,
        "analysts:key-analysts-0123456789\ncontoso:key-contoso-0123456789\n",
    )?;
    let history = data.path().join("history");
    let (pipeline, flight) = Pipeline::start_with(
        &history,
        &[
            "--api-keys",
            keys.to_str().context("path")?,
            "--sql-tenants",
            "analysts",
            "--sql-memory-mb",
            "16",
            "--sql-max-result-mb",
            "4",
        ],
    )?;
    let client = client();
    let batch: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            let mut r = valid_request(i);
            r["ownerId"] = "contoso".into();
            r
        })
        .collect();
    let (status, _, report) = post_raw(
        &client,
        &format!("{}/api/deliveryrequests/batch", pipeline.base),
        &[("authorization", "Bearer key-contoso-0123456789")],
        serde_json::to_vec(&batch)?,
    )
    .await?;
    assert_eq!(status, 202, "{report}");

    let url = format!("{}/api/sql", pipeline.base);
    let sql = |query: &str| serde_json::to_vec(&serde_json::json!({ "sql": query }));
    let analyst = ("authorization", "Bearer key-analysts-0123456789");
    let ids_query = "SELECT delivery_id, owner_id FROM delivery_requests ORDER BY delivery_id";
    // Wait for the history.
    let deadline = Instant::now() + SETTLE;
    let rows = loop {
        let (status, _, body) = call(&client, "POST", &url, &[analyst], sql(ids_query)?).await?;
        assert_eq!(status, 200, "{body}");
        let rows = body.as_array().cloned().unwrap_or_default();
        if rows.len() >= 20 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "history has {} of 20 rows",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|r| r["owner_id"] == "contoso"), "{rows:?}");

    // Who may query.
    let (status, _, _) = call(&client, "POST", &url, &[], sql(ids_query)?).await?;
    assert_eq!(status, 401);
    let (status, _, body) = call(
        &client,
        "POST",
        &url,
        &[("authorization", "Bearer key-contoso-0123456789")],
        sql(ids_query)?,
    )
    .await?;
    assert_eq!(status, 403, "{body}");

    // Formats by Accept.
    let count = "SELECT count(*) AS n FROM delivery_requests";
    let (status, headers, csv) = call_bytes(
        &client,
        "POST",
        &url,
        &[analyst, ("accept", "text/csv")],
        sql(count)?,
    )
    .await?;
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str()?.starts_with("text/csv"));
    assert_eq!(std::str::from_utf8(&csv)?, "n\n20\n");
    let (status, _, ndjson) = call_bytes(
        &client,
        "POST",
        &url,
        &[analyst, ("accept", "application/x-ndjson")],
        sql(count)?,
    )
    .await?;
    assert_eq!(
        (status, std::str::from_utf8(&ndjson)?),
        (200, "{\"n\":20}\n")
    );
    let (status, headers, ipc) = call_bytes(
        &client,
        "POST",
        &url,
        &[analyst, ("accept", "application/vnd.apache.arrow.stream")],
        sql(ids_query)?,
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)?;
    let mut http_ids = Vec::new();
    for batch in reader {
        let batch = batch?;
        let column = batch.column(0).as_string::<i32>();
        http_ids.extend((0..column.len()).map(|i| column.value(i).to_owned()));
    }
    assert_eq!(http_ids.len(), 20);
    let (status, _, body) = call(
        &client,
        "POST",
        &url,
        &[analyst, ("accept", "image/png")],
        sql(count)?,
    )
    .await?;
    assert_eq!(status, 406, "{body}");

    // Refusals, errors and limits.
    for (query, expected) in [
        ("DROP TABLE delivery_requests", 400),
        (
            "INSERT INTO delivery_requests SELECT * FROM delivery_requests",
            400,
        ),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", 400),
        ("SELECT * FROM '/etc/passwd'", 400),
        ("SELEKT 1", 400),
        // About 10 MB of text: past the result bound.
        ("SELECT repeat('x', 1000) AS s FROM range(10000)", 422),
        (
            "SELECT (v * 7919) % 3000017 AS k, count(*) AS n \
             FROM generate_series(1, 3000000) AS t(v) GROUP BY k ORDER BY n DESC LIMIT 1",
            422,
        ),
    ] {
        let (status, _, body) = call(&client, "POST", &url, &[analyst], sql(query)?).await?;
        assert_eq!(status, expected, "{query}: {body}");
        assert!(
            body["detail"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
        assert_eq!(body["status"], expected, "problem details: {body}");
    }
    // A result larger than the part answered whole streams, batch by batch...
    let large = "SELECT repeat('x', 100) AS s FROM range(20000)";
    let (status, _, ndjson) = call_bytes(
        &client,
        "POST",
        &url,
        &[analyst, ("accept", "application/x-ndjson")],
        sql(large)?,
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        ndjson
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        20_000
    );
    // ...and one that passes the result bound part way (about 10 MB of text in batches
    // of under 1 MB, past the 4 MiB bound) ends early: its status was sent, so the body
    // is cut, which the client sees as an error, never as a whole answer.
    let cut = "SELECT repeat('x', 100) AS s FROM range(100000)";
    let request = hyper::Request::post(&url)
        .header(analyst.0, analyst.1)
        .body(http_body_util::Full::new(bytes::Bytes::from(sql(cut)?)))?;
    let response = tokio::time::timeout(SETTLE, client.request(request)).await??;
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(
        SETTLE,
        http_body_util::BodyExt::collect(response.into_body()),
    )
    .await?;
    assert!(body.is_err(), "a cut answer reads as an error");

    let (status, _, _) = call(&client, "POST", &url, &[analyst], b"{\"query\":1}".to_vec()).await?;
    assert_eq!(status, 400);
    let (status, headers, _) = call(&client, "GET", &url, &[analyst], Vec::new()).await?;
    assert_eq!(
        (status, &headers["allow"]),
        (405, &"POST".parse::<hyper::header::HeaderValue>()?)
    );

    // Flight SQL: without a key, refused; with one, the same rows.
    let channel = tonic::transport::Channel::from_shared(flight.clone())?
        .connect()
        .await
        .context("connecting to Flight SQL")?;
    let mut anonymous = FlightSqlServiceClient::new(channel.clone());
    assert!(anonymous.execute(ids_query.to_owned(), None).await.is_err());
    let mut flight_client = FlightSqlServiceClient::new(channel);
    flight_client
        .handshake("analysts", "key-analysts-0123456789")
        .await
        .context("Flight SQL handshake")?;
    let info = flight_client.execute(ids_query.to_owned(), None).await?;
    let mut flight_ids = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.context("no ticket")?;
        let batches: Vec<arrow::record_batch::RecordBatch> =
            flight_client.do_get(ticket).await?.try_collect().await?;
        for batch in batches {
            let column = batch.column(0).as_string::<i32>();
            flight_ids.extend((0..column.len()).map(|i| column.value(i).to_owned()));
        }
    }
    assert_eq!(flight_ids, http_ids);
    // Past the result bound part way, the stream ends with the bound's status.
    let info = flight_client.execute(cut.to_owned(), None).await?;
    let ticket = info.endpoint[0].ticket.clone().context("no ticket")?;
    let over = match flight_client.do_get(ticket).await {
        Ok(stream) => stream
            .try_collect::<Vec<arrow::record_batch::RecordBatch>>()
            .await
            .err(),
        Err(e) => Some(e),
    };
    let over = over.context("a result past the bound over Flight SQL")?;
    assert!(over.to_string().contains("--sql-max-result-mb"), "{over}");
    // A prepared statement (what JDBC drivers use) gives the same.
    let mut prepared = flight_client.prepare(count.to_owned(), None).await?;
    let info = prepared.execute().await?;
    let ticket = info.endpoint[0].ticket.clone().context("no ticket")?;
    let batches: Vec<arrow::record_batch::RecordBatch> =
        flight_client.do_get(ticket).await?.try_collect().await?;
    assert_eq!(
        batches[0].column(0).as_primitive::<Int64Type>().value(0),
        20
    );
    // Tools list the tables; writes are refused.
    let info = flight_client
        .get_tables(arrow_flight::sql::CommandGetTables {
            include_schema: true,
            ..Default::default()
        })
        .await?;
    let ticket = info.endpoint[0].ticket.clone().context("no ticket")?;
    let batches: Vec<arrow::record_batch::RecordBatch> =
        flight_client.do_get(ticket).await?.try_collect().await?;
    let names = batches[0]
        .column_by_name("table_name")
        .context("table_name")?
        .as_string::<i32>();
    let names: BTreeSet<&str> = (0..names.len()).map(|i| names.value(i)).collect();
    assert!(
        names.contains("delivery_requests") && names.contains("deliveries"),
        "{names:?}"
    );
    // Tools ask who the server is: read-only.
    let info = flight_client
        .get_sql_info(vec![
            arrow_flight::sql::SqlInfo::FlightSqlServerName,
            arrow_flight::sql::SqlInfo::FlightSqlServerReadOnly,
        ])
        .await?;
    let ticket = info.endpoint[0].ticket.clone().context("no ticket")?;
    let batches: Vec<arrow::record_batch::RecordBatch> =
        flight_client.do_get(ticket).await?.try_collect().await?;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    let refused = flight_client
        .execute("DROP TABLE delivery_requests".to_owned(), None)
        .await
        .expect_err("DDL over Flight SQL");
    assert!(refused.to_string().contains("read-only"), "{refused}");

    pipeline.stop("TERM")?;
    Ok(())
}

/// Flight SQL's connections are bounded: a connection that sends nothing is closed, and
/// one that only PINGs gets a GOAWAY at its age and is closed, so neither holds a place
/// for ever; with every place held by silent connections, a client is served once they
/// go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_connections_are_bounded_and_none_is_held_for_ever() -> Result<()> {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let data = tempfile::tempdir()?;
    let (pipeline, flight) = Pipeline::start_with(
        &data.path().join("history"),
        &[
            "--flight-max-connections",
            "2",
            "--flight-max-connection-age-secs",
            "3",
            "--sql-timeout-secs",
            "1",
        ],
    )?;
    let addr = flight.trim_start_matches("http://").to_owned();
    // Reads until the server closes the connection: how long that took, and what it sent.
    let closed = |mut stream: tokio::net::TcpStream, ping: bool| async move {
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while started.elapsed() < Duration::from_secs(40) {
            if ping
                && stream
                    .write_all(b"\0\0\x08\x06\0\0\0\0\0pingping")
                    .await
                    .is_err()
            {
                return Some((started.elapsed(), seen));
            }
            match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return Some((started.elapsed(), seen)),
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        None
    };
    let silent = [
        tokio::net::TcpStream::connect(&addr).await?,
        tokio::net::TcpStream::connect(&addr).await?,
    ];
    let silent: Vec<_> = silent
        .into_iter()
        .map(|s| tokio::spawn(closed(s, false)))
        .collect();
    // Both places are held: a client waits for one, then is served.
    let channel = tonic::transport::Channel::from_shared(flight.clone())?
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .context("connecting to Flight SQL")?;
    let mut client = FlightSqlServiceClient::new(channel.clone());
    client
        .execute("SELECT 1".to_owned(), None)
        .await
        .context("a client once the silent connections went")?;
    // Without keys only loopback clients may query: a call a local proxy forwarded (it
    // says so in its metadata) is not one.
    let mut forwarded = FlightSqlServiceClient::new(channel);
    forwarded.set_header("x-forwarded-for", "203.0.113.9");
    let refused = forwarded.execute("SELECT 1".to_owned(), None).await;
    assert!(refused.is_err(), "a forwarded call was served: {refused:?}");
    for held in silent {
        let (took, _) = held
            .await?
            .context("a silent connection was never closed")?;
        assert!(took < Duration::from_secs(20), "{took:?}");
    }
    // An HTTP/2 connection that only PINGs gets a GOAWAY at its age (3 s) and is closed,
    // at the latest once its calls' grace (the 1 s SQL time limit and 10 s) is over too.
    let mut pinging = tokio::net::TcpStream::connect(&addr).await?;
    pinging
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let (took, frames) = closed(pinging, true)
        .await
        .context("PINGs held a Flight SQL connection for 40 s")?;
    assert!(
        took >= Duration::from_secs(2),
        "closed before its age: {took:?}"
    );
    // The server's frames: 9-byte headers (length, type, flags, stream) and payloads.
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= frames.len() {
        let length = usize::from(frames[at]) << 16
            | usize::from(frames[at + 1]) << 8
            | usize::from(frames[at + 2]);
        types.push(frames[at + 3]);
        at += 9 + length;
    }
    assert!(types.contains(&7), "no GOAWAY before the close: {types:?}");
    pipeline.stop("TERM")
}

/// The embedded broker starts empty on every run while the history stays: the second
/// run's records (at offsets the first run's also had) are not taken for written ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_history_keeps_every_row() -> Result<()> {
    let data = tempfile::tempdir()?;
    let mut all = BTreeSet::new();
    for _ in 0..2 {
        let pipeline = Pipeline::start(data.path())?;
        all.extend(post_all(&pipeline.base, 12).await?);
        pipeline.stop("TERM")?;
    }
    let found = history_ids(data.path()).await?;
    assert_eq!(found.len(), 24, "both runs' rows, once each");
    assert_eq!(found.into_iter().collect::<BTreeSet<_>>(), all);
    Ok(())
}

/// `count(*)`-style query over the history: the first column of the first row.
async fn history_count(data: &std::path::Path, sql: &str) -> Result<i64> {
    let history =
        History::open(data.to_str().context("path")?, &QueryLimitsArgs::default()).await?;
    let result = history.query(sql).await?;
    Ok(result
        .batches
        .first()
        .map_or(0, |b| b.column(0).as_primitive::<Int64Type>().value(0)))
}

/// Runs `dronedelivery loadgen` with `args` against `base`; its JSON report.
fn loadgen(base: &str, args: &[&str], dir: &std::path::Path) -> Result<loadgen::Report> {
    let json = dir.join(format!("loadgen-{}.json", uuid::Uuid::new_v4()));
    let output = Launch::new("loadgen")
        .args(["loadgen", "--target", base])
        .args(args)
        .arg("--json")
        .arg(&json)
        .output(2 * SETTLE)
        .context("running dronedelivery loadgen")?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("records/s") && text.contains("p99.9"),
        "{text}"
    );
    let report: loadgen::Report = serde_json::from_slice(&std::fs::read(&json)?)?;

    // The counters and the histogram tell one story.
    let l = &report.latency_ms;
    assert_eq!(l.count, report.answered(), "one latency per answer");
    assert_eq!(
        report.calls,
        report.answered() + report.transport_errors + report.timeouts
    );
    assert_eq!(
        report.records_sent,
        report.accepted + report.telemetry_accepted + report.rejected + report.failed,
        "every record sent has one outcome"
    );
    assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max);
    assert!(l.p50 > 0.0 && l.mean <= l.max);
    assert!(report.elapsed_secs > 0.0);
    let rate = (report.accepted + report.telemetry_accepted) as f64 / report.elapsed_secs;
    assert!((report.records_per_sec - rate).abs() < 1e-6 * rate.max(1.0));
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_the_load_generator_counts_as_accepted_is_in_the_history() -> Result<()> {
    let data = tempfile::tempdir()?;
    let pipeline = Pipeline::start(data.path())?;

    // Open loop: batches of 50 at 2,000 records/s, a tenth of the calls telemetry.
    let open = loadgen(
        &pipeline.base,
        &[
            "--duration",
            "3s",
            "--batch-size",
            "50",
            "--connections",
            "3",
            "--rate",
            "2000",
            "--telemetry-percent",
            "10",
            "--format",
            "ndjson",
            "--compression",
            "zstd",
        ],
        data.path(),
    )?;
    assert_eq!(open.mode, "open");
    assert_eq!(open.by_status.get(&202), Some(&open.calls), "{open:?}");
    assert_eq!(open.records_sent, open.calls * 50);
    assert!(open.telemetry_accepted > 0 && open.accepted > 0, "{open:?}");
    // Paced: about 2,000 records/s for 3 s (loose bounds: the machine is shared).
    assert!(open.records_sent <= 6_000, "{open:?}");
    assert!(open.records_sent + open.not_sent * 50 >= 5_950, "{open:?}");

    // Closed loop: single requests over keep-alive connections.
    let single = loadgen(
        &pipeline.base,
        &[
            "--duration",
            "1s",
            "--batch-size",
            "1",
            "--connections",
            "4",
            "--tenants",
            "3",
        ],
        data.path(),
    )?;
    assert_eq!(single.mode, "closed");
    assert!(single.accepted > 0, "{single:?}");
    assert_eq!(single.non_2xx(), 0, "{single:?}");

    // Every accepted record reaches the history, once.
    let accepted = (open.accepted + single.accepted) as i64;
    let fixes = open.telemetry_accepted as i64;
    let deadline = Instant::now() + SETTLE;
    loop {
        let rows = history_count(data.path(), "SELECT count(*) FROM delivery_requests").await?;
        let fixes_found = history_count(data.path(), "SELECT count(*) FROM telemetry").await?;
        if rows >= accepted && fixes_found >= fixes {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history has {rows} of {accepted} requests, {fixes_found} of {fixes} fixes"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    pipeline.stop("TERM")?;
    let distinct = history_count(
        data.path(),
        "SELECT count(DISTINCT delivery_id) FROM delivery_requests",
    )
    .await?;
    let rows = history_count(data.path(), "SELECT count(*) FROM delivery_requests").await?;
    assert_eq!(
        (rows, distinct),
        (accepted, accepted),
        "exactly the accepted, once each"
    );
    let tenants = history_count(
        data.path(),
        "SELECT count(DISTINCT owner_id) FROM delivery_requests",
    )
    .await?;
    assert_eq!(
        tenants, 10,
        "the open-loop run's ten tenants (the closed one's three among them)"
    );
    assert_eq!(
        history_count(data.path(), "SELECT count(*) FROM telemetry").await?,
        fixes
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_503_while_consumers_lag_and_nothing_accepted_is_lost()
-> Result<()> {
    let data = tempfile::tempdir()?;
    // A small lag bound, so that a few seconds of batches exceed it.
    let (pipeline, _) = Pipeline::start_with(data.path(), &["--max-consumer-lag", "300"])?;
    // Lag counts only where a group has committed: wait until the consumers have joined
    // and handled a first request.
    let http = client();
    let url = format!("{}/api/deliveryrequests", pipeline.base);
    let (status, _, body) = post(&http, &url, &valid_request(0)).await?;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + SETTLE;
    while history_count(data.path(), "SELECT count(*) FROM delivery_events").await? < 1 {
        assert!(
            Instant::now() < deadline,
            "the pipeline never handled a request"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let report = loadgen(
        &pipeline.base,
        &[
            "--duration",
            "4s",
            "--batch-size",
            "500",
            "--connections",
            "4",
        ],
        data.path(),
    )?;
    assert!(report.accepted > 0, "{report:?}");
    assert!(
        report.by_status.get(&503).copied().unwrap_or(0) > 0,
        "the tier pushed back: {report:?}"
    );
    let (_, _, metrics) = call_bytes(
        &client(),
        "GET",
        &format!("{}/metrics", pipeline.base),
        &[],
        Vec::new(),
    )
    .await?;
    assert!(
        String::from_utf8_lossy(&metrics).contains("ingest_backpressure_refusals_total"),
        "refusals are counted"
    );
    // The warm-up request, and what the load got in.
    let accepted = report.accepted as i64 + 1;
    let deadline = Instant::now() + SETTLE;
    while history_count(data.path(), "SELECT count(*) FROM delivery_requests").await? < accepted {
        assert!(Instant::now() < deadline, "the history did not catch up");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // After the load, the consumers catch up and writes are taken again.
    loop {
        let (status, _, body) = post(&http, &url, &valid_request(1)).await?;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "writes were never taken again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    pipeline.stop("TERM")?;
    assert_eq!(
        history_count(data.path(), "SELECT count(*) FROM delivery_requests").await?,
        accepted + 1,
        "every accepted record, once"
    );
    Ok(())
}

/// Starts `dronedelivery process` against `brokers` with `--processors which`.
fn start_processors(brokers: &str, which: &str) -> Result<Binary> {
    Launch::new("process")
        .args(["process", "--brokers", brokers, "--processors", which])
        .start(&[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_runs_only_the_processors_it_is_given() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let http = client();
    let url = format!("{}/api/deliveryrequests", tier.base);
    for i in 0..3 {
        let (status, _, body) = post(&http, &url, &valid_request(i)).await?;
        assert_eq!(status, 202, "{body}");
    }
    let brokers = tier.broker.bootstrap_servers().to_owned();

    // The workflow alone sends each request to its region, and nothing else runs.
    let workflow = start_processors(&brokers, "workflow")?;
    tier.records_of(topics::DRONE_SCHEDULING.name, 3).await?;
    let settings = ClientSettings::plain(&brokers);
    // Partitions a group has committed: none for a processor that never ran.
    let committed = |group: &'static str, topic: &'static str| -> Result<usize> {
        let watch = bus::LagWatch::new(&settings, &[(group, &[topic])])?;
        Ok(watch
            .lags(Duration::from_secs(10))?
            .iter()
            .filter(|l| l.committed)
            .count())
    };
    assert_eq!(
        committed(
            schemas::topics::groups::DELIVERIES,
            topics::DELIVERY_REQUESTS.name
        )?,
        0,
        "the delivery consumer did not run"
    );

    // The delivery consumer alone reads the requests (a group of its own on their topic).
    let deliveries = start_processors(&brokers, "deliveries")?;
    let changes = tier.records_of(topics::DELIVERY_STATE.name, 3).await?;
    let created = changes
        .iter()
        .filter(|(key, payload)| {
            !key.starts_with(['\0', '\u{1}'])
                && serde_json::from_slice::<schemas::tracking::DeliveryState>(payload)
                    .is_ok_and(|s| s.stage == schemas::tracking::Stage::Created)
        })
        .count();
    assert_eq!(created, 3, "one Created change per request: {changes:?}");
    assert_eq!(
        committed(
            schemas::topics::groups::SCHEDULING,
            topics::DRONE_SCHEDULING.name
        )?,
        0,
        "the scheduler did not run"
    );

    // A name that is not a processor is refused.
    let refused = Launch::new("process")
        .args(["process", "--brokers", &brokers, "--processors", "bogus"])
        .output(SETTLE)?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bogus"));

    for child in [workflow, deliveries] {
        let status = child
            .terminate(Signal::Term, Duration::from_secs(30))
            .context("process did not stop")?;
        assert!(status.success(), "a clean stop");
    }
    tier.stop().await
}

/// The services as they are deployed apart: the processors and the history sink each
/// with a health listener, and the SQL server over the history the sink wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_services_answer_probes_metrics_and_sql() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let http = client();
    let brokers = tier.broker.bootstrap_servers().to_owned();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("history");
    let data = data.to_str().context("path")?;

    let (workflow, found) = Service::start(
        "process",
        &[
            "process",
            "--brokers",
            &brokers,
            "--processors",
            "workflow",
            "--health-listen",
            "127.0.0.1:0",
        ],
        &[announce::HEALTH],
    )?;
    let workflow_health = format!("http://{}", found[0]);
    let (sink, sink_health) = Service::history(&brokers, data)?;

    for i in 0..5 {
        let url = format!("{}/api/deliveryrequests", tier.base);
        let (status, _, body) = post(&http, &url, &valid_request(i)).await?;
        assert_eq!(status, 202, "{body}");
    }
    tier.records_of(topics::DRONE_SCHEDULING.name, 5).await?;

    for (base, metric) in [
        (&workflow_health, "producer_queue_records"),
        (&sink_health, "history_rows_written_total"),
    ] {
        let (status, _, body) =
            call_bytes(&http, "GET", &format!("{base}/healthz"), &[], Vec::new()).await?;
        assert_eq!(status, 200, "{body:?}");
        eventually_contains(&http, &format!("{base}/readyz"), "ready").await?;
        eventually_contains(&http, &format!("{base}/metrics"), metric).await?;
        // Each member reports its group's lag per partition.
        eventually_contains(&http, &format!("{base}/metrics"), "kafka_consumer_lag{").await?;
        let (status, headers, _) =
            call_bytes(&http, "POST", &format!("{base}/readyz"), &[], Vec::new()).await?;
        assert_eq!(status, 405);
        assert!(headers.contains_key("allow"));
        let (status, _, _) = call_bytes(
            &http,
            "GET",
            &format!("{base}/api/deliveryrequests"),
            &[],
            Vec::new(),
        )
        .await?;
        assert_eq!(status, 404, "a health listener serves nothing else");
    }

    // The SQL server reads what the sink wrote, and takes no writes.
    let (sql, found) = Service::start(
        "sql-server",
        &[
            "sql-server",
            "--data",
            data,
            "--listen",
            "127.0.0.1:0",
            "--flight-listen",
            "127.0.0.1:0",
        ],
        &[announce::SQL_SERVER, announce::FLIGHT_SQL],
    )?;
    let base = format!("http://{}", found[0]);
    let query = serde_json::to_vec(&serde_json::json!({
        "sql": "SELECT count(DISTINCT delivery_id) AS n FROM delivery_requests"
    }))?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, _, body) = call(
            &http,
            "POST",
            &format!("{base}/api/sql"),
            &[],
            query.clone(),
        )
        .await?;
        assert_eq!(status, 200, "{body}");
        if body[0]["n"] == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "history: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let flight = found[1].clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{flight}"))?
        .connect()
        .await?;
    let mut flight_sql = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    let info = flight_sql
        .execute("SELECT count(*) AS n FROM delivery_requests".into(), None)
        .await?;
    assert_eq!(info.endpoint.len(), 1, "one ticket");

    let (status, _, body) = post(
        &http,
        &format!("{base}/api/deliveryrequests"),
        &valid_request(9),
    )
    .await?;
    assert_eq!(status, 404, "the SQL server takes no writes: {body}");
    eventually_contains(&http, &format!("{base}/readyz"), "ready").await?;
    eventually_contains(&http, &format!("{base}/metrics"), "sql_queries_total").await?;

    sql.stop()?;
    workflow.stop()?;
    sink.stop()?;
    tier.stop().await
}

/// The pipeline as the compose file and the Kubernetes manifests run it: every service
/// its own process of the binary (ingest, one `process` per processor, the history sink,
/// the simulator, the SQL server), meeting only through the broker and the object store.
/// Deliveries go from the HTTP API to `Completed`, are seen by the status route, and
/// their whole history is answered by the SQL server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_topology_completes_deliveries_end_to_end() -> Result<()> {
    let broker = EmbeddedBroker::start(1, &topics::ALL)?;
    let brokers = broker.bootstrap_servers().to_owned();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("history");
    let data = data.to_str().context("path")?;
    let http = client();
    let topology = Topology::start(&brokers, data, &[])?;
    let (api, sql_base) = (topology.api.clone(), topology.sql.clone());

    let mut ids = Vec::new();
    for i in 0..3 {
        let url = format!("{api}/api/deliveryrequests");
        let (status, _, body) = post(&http, &url, &valid_request(i)).await?;
        assert_eq!(status, 202, "{body}");
        ids.push(body["deliveryId"].as_str().context("an id")?.to_owned());
    }

    // The status route of ingest follows each delivery to its end.
    for id in &ids {
        eventually_contains(
            &http,
            &format!("{api}/api/deliveries/{id}/status"),
            "\"Completed\"",
        )
        .await?;
    }
    // The SQL server answers the whole history of each: requested, assigned, picked up,
    // completed.
    let query = serde_json::to_vec(&serde_json::json!({
        "sql": "SELECT delivery_id, events FROM deliveries \
                WHERE assigned_at IS NOT NULL AND picked_up_at IS NOT NULL \
                AND completed_at IS NOT NULL ORDER BY delivery_id"
    }))?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let url = format!("{sql_base}/api/sql");
        let (status, _, body) = call(&http, "POST", &url, &[], query.clone()).await?;
        assert_eq!(status, 200, "{body}");
        let mut found: Vec<String> = body
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["delivery_id"].as_str().map(str::to_owned))
            .collect();
        found.sort();
        let mut expected = ids.clone();
        expected.sort();
        if found == expected {
            break;
        }
        if Instant::now() > deadline {
            let what = serde_json::to_vec(&serde_json::json!({
                "sql": "SELECT 'requests' AS t, owner_id AS k, count(*) AS n                         FROM delivery_requests GROUP BY owner_id                         UNION ALL SELECT 'events', concat(owner_id, ' ', tenant, ' ', stage),                         count(*) FROM delivery_events GROUP BY owner_id, tenant, stage"
            }))?;
            let (_, _, tables) = call(&http, "POST", &url, &[], what).await?;
            bail!("the history has {found:?} complete, not {expected:?}: {body}; {tables}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Every service stops cleanly on SIGTERM.
    topology.stop_all()?;
    drop(broker);
    Ok(())
}

/// `run` with a store that refuses writes (a file where the `delivery_requests` folder
/// goes): the records already accepted stay in the sink's hands, writes get 503 and
/// `/readyz` fails while it is stalled, and once the store takes writes again everything
/// accepted is in the history exactly once, and writes are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_writes_means_503_and_no_lost_record() -> Result<()> {
    let data = tempfile::tempdir()?;
    let blocker = data.path().join("delivery_requests");
    std::fs::write(&blocker, b"not a folder")?;
    let pipeline = Pipeline::start(data.path())?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/api/deliveryrequests", pipeline.base);
    let ready = format!("{}/readyz", pipeline.base);
    let mut accepted = BTreeSet::new();
    // Accepted until the sink finds it cannot write; then 503 and not ready.
    let deadline = Instant::now() + SETTLE;
    let mut i = 0;
    loop {
        let (status, _, body) = post(&client, &url, &valid_request(i)).await?;
        i += 1;
        match status {
            202 => {
                accepted.insert(body["deliveryId"].as_str().context("id")?.to_owned());
            }
            503 => {
                assert!(
                    body["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("behind")),
                    "{body}"
                );
                break;
            }
            other => bail!("unexpected {other}: {body}"),
        }
        assert!(Instant::now() < deadline, "writes never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!accepted.is_empty());
    let (status, _, body) = call(&client, "GET", &ready, &[], Vec::new()).await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("cannot be written"), "{body}");

    std::fs::remove_file(&blocker)?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, _, body) = post(&client, &url, &valid_request(i)).await?;
        i += 1;
        if status == 202 {
            accepted.insert(body["deliveryId"].as_str().context("id")?.to_owned());
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "writes never taken again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _, _) = call(&client, "GET", &ready, &[], Vec::new()).await?;
    assert_eq!(status, 200);
    pipeline.stop("TERM")?;
    let found = history_ids(data.path()).await?;
    assert_eq!(
        found.len(),
        accepted.len(),
        "exactly one row per accepted request"
    );
    assert_eq!(found.into_iter().collect::<BTreeSet<_>>(), accepted);
    Ok(())
}

/// The probes have a listener of their own (`--health-listen`), in `ingest`, `run` and
/// `sql-server`: while clients hold every connection of the API without finishing a
/// request, `/healthz` and `/readyz` still answer there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_clients_hold_every_connection() -> Result<()> {
    let broker = EmbeddedBroker::start(1, &topics::ALL)?;
    let common = [
        "--listen",
        "127.0.0.1:0",
        "--max-connections",
        "2",
        "--health-listen",
        "127.0.0.1:0",
    ];
    let mut ingest = vec!["ingest", "--brokers", broker.bootstrap_servers()];
    ingest.extend(common);
    probes_answer_beside_a_full_api("ingest", announce::API, &ingest).await?;
    let data = tempfile::tempdir()?;
    let mut run = vec![
        "run",
        "--flight-listen",
        "off",
        "--data",
        data.path().to_str().context("path")?,
    ];
    run.extend(common);
    probes_answer_beside_a_full_api("run", announce::API, &run).await?;
    let history = tempfile::tempdir()?;
    let mut sql_server = vec![
        "sql-server",
        "--flight-listen",
        "off",
        "--data",
        history.path().to_str().context("path")?,
    ];
    sql_server.extend(common);
    probes_answer_beside_a_full_api("sql-server", announce::SQL_SERVER, &sql_server).await
}

async fn probes_answer_beside_a_full_api(
    label: &'static str,
    api: &'static str,
    args: &[&str],
) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (tier, found) = Service::start(label, args, &[api, announce::HEALTH])?;
    let (api, health) = (found[0].clone(), format!("http://{}", found[1]));
    // Two clients take both places and never finish their headers.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&api).await?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\n").await?;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let http = client();
    // The API has no place left: a probe there waits.
    let waiting = tokio::time::timeout(
        Duration::from_secs(1),
        call_bytes(
            &http,
            "GET",
            &format!("http://{api}/healthz"),
            &[],
            Vec::new(),
        ),
    )
    .await;
    assert!(
        waiting.is_err(),
        "{label}: the API still had a place: {waiting:?}"
    );
    let (status, _, body) =
        call_bytes(&http, "GET", &format!("{health}/healthz"), &[], Vec::new()).await?;
    assert_eq!(status, 200, "{label}: {body:?}");
    eventually_contains(&http, &format!("{health}/readyz"), "ready").await?;
    drop(held);
    tier.stop()?;
    Ok(())
}
