//! End-to-end tests of the whole pipeline on the embedded broker: the real binary, real
//! HTTP on 127.0.0.1, real Kafka protocol, real Parquet and real SQL.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use analytics::sql::{History, QueryLimits};
use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use bus::{ClientSettings, Consumer, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use schemas::topics;
use tokio_util::sync::CancellationToken;

mod common;
use common::service::{Service, Topology, eventually_contains};
use common::*;

const STARTUP: Duration = Duration::from_secs(60);

/// The `dronedelivery run` process, killed if a test fails half-way.
struct Pipeline {
    child: Child,
    base: String,
}

impl Pipeline {
    fn start(data: &std::path::Path) -> Result<Self> {
        Ok(Self::start_with(data, &[])?.0)
    }

    /// Starts `run` with `extra` flags; also returns the Flight SQL address.
    fn start_with(data: &std::path::Path, extra: &[&str]) -> Result<(Self, String)> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dronedelivery"))
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
            .env("DRONEDELIVERY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting dronedelivery run")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        let (flight_tx, flight_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("dronedelivery listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
                if let Some(addr) = line.strip_prefix("flight sql on grpc://") {
                    let _ = flight_tx.send(format!("http://{addr}"));
                }
            }
        });
        let mut pipeline = Self {
            child,
            base: String::new(),
        };
        let flight = flight_rx
            .recv_timeout(STARTUP)
            .context("the pipeline did not say where Flight SQL listens")?;
        pipeline.base = rx
            .recv_timeout(STARTUP)
            .context("the pipeline did not say where it listens")?;
        Ok((pipeline, flight))
    }

    /// Sends `signal` (`TERM` or `INT`) and waits (bounded) for a clean exit.
    fn stop(mut self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        assert!(status.success());
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("dronedelivery run exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dronedelivery run did not stop within {SETTLE:?} of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

async fn post(
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

async fn send(
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
    let history = History::open(data.to_str().context("path")?, &QueryLimits::default()).await?;
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
        &QueryLimits::default(),
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

/// The workflow processor fans each request out to `deliveries` (keyed by delivery id)
/// and `drone-scheduling` (keyed by region), and a poison record to `dead-letters`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_fans_out_and_dead_letters_poison() -> Result<()> {
    let broker = EmbeddedBroker::start(1, &topics::ALL)?;
    let settings = ClientSettings::plain(broker.bootstrap_servers());
    let producer = Producer::new(&settings, &ProducerArgs::default())?;
    let stop = CancellationToken::new();
    let workflow = tokio::spawn(processors::workflow::run(
        processors::workflow::WorkflowConfig::default(),
        settings.clone(),
        producer.clone(),
        stop.clone(),
    ));

    let requested: [(&str, &[u8]); 1] = [(
        schemas::headers::EVENT_TYPE,
        schemas::headers::event_type::DELIVERY_REQUESTED.as_bytes(),
    )];
    let n = 20;
    for i in 0..n {
        let payload = valid_request(i).to_string();
        let key = format!("d-{i}");
        producer
            .send_and_wait(OutRecord {
                topic: topics::DELIVERY_REQUESTS.name,
                key: key.as_bytes(),
                payload: payload.as_bytes(),
                headers: &requested,
            })
            .await?;
    }
    producer
        .send_and_wait(OutRecord {
            topic: topics::DELIVERY_REQUESTS.name,
            key: b"poison",
            payload: b"{not json",
            headers: &requested,
        })
        .await?;

    let reader = Consumer::subscribe(
        &settings,
        "test-reader",
        &[
            topics::DELIVERIES.name,
            topics::DRONE_SCHEDULING.name,
            topics::DEAD_LETTERS.name,
        ],
    )?;
    let mut deliveries = BTreeSet::new();
    let mut scheduled = BTreeSet::new();
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while deliveries.len() < n || scheduled.len() < n || dead.is_empty() {
        let record = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .context("fan-out did not arrive in time")??;
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        match record.topic() {
            t if t == topics::DELIVERIES.name => {
                assert!(deliveries.insert(key), "delivered once");
            }
            t if t == topics::DRONE_SCHEDULING.name => {
                assert!(key.contains(':'), "keyed by region, got {key}");
                let id = record
                    .header(schemas::headers::DELIVERY_ID)
                    .context("scheduling record without delivery id")?;
                assert!(scheduled.insert(String::from_utf8_lossy(id).into_owned()));
            }
            _ => {
                assert_eq!(record.payload(), Some(&b"{not json"[..]));
                let reason = record
                    .header(schemas::headers::DEAD_LETTER_REASON)
                    .context("dead letter without reason")?;
                assert!(String::from_utf8_lossy(reason).contains("invalid delivery request"));
                dead.push(key);
            }
        }
    }
    let expected: BTreeSet<String> = (0..n).map(|i| format!("d-{i}")).collect();
    assert_eq!(deliveries, expected);
    assert_eq!(scheduled, expected);
    assert_eq!(dead, ["poison"]);

    stop.cancel();
    tokio::time::timeout(SETTLE, workflow).await???;
    Ok(())
}

/// The consumer helper moves the group only past records the application stored: a new
/// member of the group starts right after the last stored record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resumes_after_the_last_stored_offset() -> Result<()> {
    let topic = schemas::Topic {
        name: "offsets-test",
        keyed_by: schemas::topics::KeyedBy::OriginalKey,
        partitions: 1,
        compacted: false,
    };
    let broker = EmbeddedBroker::start(1, &[topic])?;
    let settings = ClientSettings::plain(broker.bootstrap_servers());
    let producer = Producer::new(&settings, &ProducerArgs::default())?;
    for i in 0..10u8 {
        producer
            .send_and_wait(OutRecord {
                topic: topic.name,
                key: b"k",
                payload: &[i],
                headers: &[],
            })
            .await?;
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    {
        let first = Consumer::subscribe(&settings, "resume", &[topic.name])?;
        for i in 0..10u8 {
            let record = tokio::time::timeout_at(deadline, first.recv()).await??;
            assert_eq!(record.payload(), Some(&[i][..]));
            // Handled only the first five.
            if i < 5 {
                first.store(topic.name, record.partition(), record.offset())?;
            }
        }
        tokio::task::spawn_blocking(move || first.commit()).await??;
    }
    let second = Consumer::subscribe(&settings, "resume", &[topic.name])?;
    let record = tokio::time::timeout_at(deadline, second.recv()).await??;
    assert_eq!(
        record.payload(),
        Some(&[5u8][..]),
        "resumes at the first unstored record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_report_each_record_and_produce_exactly_the_valid_bytes() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/api/deliveryrequests/batch", tier.base);
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();

    // A JSON array mixing valid and invalid records, with odd spacing and escapes: the
    // valid records must reach Kafka byte for byte as they stand in the body.
    let valid0 = valid_request(0).to_string();
    let valid2 = r#"{ "ownerId" : "fabri\"kam",  "pickupLocation":"1,2","dropOffLocation":"1.5,2",
        "pickupTime":"2026-11-24T10:00:00Z","deadline":"2026-11-24T11:00:00Z",
        "packageInfo":{"packageId":"p\u00e9","size":"Large","weight":4}}"#;
    let mut no_owner = valid_request(1);
    no_owner.as_object_mut().unwrap().remove("ownerId");
    let mut weightless = valid_request(3);
    weightless["packageInfo"]["weight"] = serde_json::json!(-1);
    let body = format!("[\n  {valid0},\n  {no_owner} ,{valid2},\n{weightless}\n]\n");
    let (status, _, report) = post_raw(
        &client,
        &url,
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await?;
    assert_eq!(status, 207, "{report}");
    assert_eq!(report["accepted"], 2);
    assert_eq!(report["rejected"], 2);
    assert_eq!(report["failed"], 0);
    let results = report["results"].as_array().context("results")?;
    assert_eq!(results.len(), 4);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i);
    }
    assert_eq!(results[1]["field"], "ownerId");
    assert_eq!(results[3]["field"], "packageInfo.weight");
    let id = |i: usize| results[i]["deliveryId"].as_str().unwrap().to_owned();
    expected.push((id(0), valid0.into_bytes()));
    expected.push((id(2), valid2.as_bytes().to_vec()));

    // NDJSON, gzip-compressed, all valid: 202 with an id for every record.
    let lines: Vec<String> = (10..13).map(|i| valid_request(i).to_string()).collect();
    let body = gzip(format!("{}\n", lines.join("\n")).as_bytes());
    let headers = [
        ("content-type", "application/x-ndjson"),
        ("content-encoding", "gzip"),
    ];
    let (status, _, report) = post_raw(&client, &url, &headers, body).await?;
    assert_eq!(status, 202, "{report}");
    assert_eq!(report["accepted"], 3);
    for (i, line) in lines.iter().enumerate() {
        let id = report["results"][i]["deliveryId"]
            .as_str()
            .unwrap()
            .to_owned();
        expected.push((id, line.clone().into_bytes()));
    }

    // A zstd JSON array, one record carrying the client's own delivery id.
    let mut own = valid_request(20);
    own["deliveryId"] = serde_json::json!("client-chosen-1");
    let text = own.to_string();
    let body = zstd::stream::encode_all(format!("[{text}]").as_bytes(), 1)?;
    let headers = [
        ("content-type", "application/json"),
        ("content-encoding", "zstd"),
    ];
    let (status, _, report) = post_raw(&client, &url, &headers, body).await?;
    assert_eq!(status, 202, "{report}");
    assert_eq!(report["results"][0]["deliveryId"], "client-chosen-1");
    expected.push(("client-chosen-1".into(), text.into_bytes()));

    // Every record invalid: 400 with the report.
    let (status, _, report) = post_raw(
        &client,
        &url,
        &[("content-type", "application/json")],
        b"[{}, {\"ownerId\": 1}]".to_vec(),
    )
    .await?;
    assert_eq!(status, 400, "{report}");
    assert_eq!(report["rejected"], 2);

    let mut got = tier.records(expected.len()).await?;
    for (key, _) in &mut expected {
        *key = format!("default/{key}");
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "exactly the valid records, byte for byte");
    tier.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_limits_and_malformed_bodies_are_refused_whole() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig {
        max_batch_records: 3,
        max_batch_bytes: 4096,
        ..ingest::IngestConfig::default()
    })
    .await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/api/deliveryrequests/batch", tier.base);
    let json = [("content-type", "application/json")];
    let record = valid_request(0).to_string();

    let four = format!("[{record},{record},{record},{record}]");
    let (status, _, body) = post_raw(&client, &url, &json, four.into_bytes()).await?;
    assert_eq!(status, 413, "too many records: {body}");

    // One record, padded with white space past the byte limit.
    let big = format!("[{record}{}]", " ".repeat(5000));
    assert!(big.len() > 4096);
    let (status, _, body) = post_raw(&client, &url, &json, big.into_bytes()).await?;
    assert_eq!(status, 413, "too many bytes: {body}");

    // A small gzip body that inflates past the byte limit.
    let bomb = gzip(&vec![b' '; 100_000]);
    let gz = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    let (status, _, body) = post_raw(&client, &url, &gz, bomb).await?;
    assert_eq!(status, 413, "inflates too far: {body}");

    let whole = gzip(format!("[{record}]").as_bytes());
    let truncated = whole[..whole.len() - 10].to_vec();
    let (status, _, body) = post_raw(&client, &url, &gz, truncated).await?;
    assert_eq!(status, 400, "truncated gzip: {body}");

    let (status, _, body) =
        post_raw(&client, &url, &json, format!("[{record},").into_bytes()).await?;
    assert_eq!(status, 400, "malformed array: {body}");

    let csv = [("content-type", "text/csv")];
    let (status, _, _) = post_raw(&client, &url, &csv, b"a,b".to_vec()).await?;
    assert_eq!(status, 415);
    let br = [
        ("content-type", "application/json"),
        ("content-encoding", "br"),
    ];
    let (status, _, _) = post_raw(&client, &url, &br, b"[]".to_vec()).await?;
    assert_eq!(status, 415);

    assert!(
        tier.records(0).await?.is_empty(),
        "nothing from a refused batch"
    );
    tier.stop().await
}

/// With the broker down, a request gets 503 with Retry-After once the ack timeout passes,
/// `/readyz` says not ready, and the refused record never shows up later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_means_503_and_nothing_accepted_later() -> Result<()> {
    let tier = IngestOnly::start_with(
        ingest::IngestConfig::default(),
        ProducerArgs {
            ack_timeout_ms: 2_000,
            ..ProducerArgs::default()
        },
    )
    .await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/api/deliveryrequests", tier.base);
    let ready = format!("{}/readyz", tier.base);
    let json = "application/json";
    let (status, _) = send(&client, "GET", &ready, json, Vec::new()).await?;
    assert_eq!(status, 200);

    tier.broker.broker_down(1)?;
    let mut refused = valid_request(1);
    refused["deliveryId"] = serde_json::json!("refused-1");
    let (status, headers, body) = post(&client, &url, &refused).await?;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"));
    let (status, _) = send(&client, "GET", &ready, json, Vec::new()).await?;
    assert_eq!(status, 503);

    tier.broker.broker_up(1)?;
    let mut later = valid_request(2);
    later["deliveryId"] = serde_json::json!("accepted-2");
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, _, body) = post(&client, &url, &later).await?;
        if status == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not come back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let keys: BTreeSet<String> = tier.records(1).await?.into_iter().map(|(k, _)| k).collect();
    assert!(
        !keys.contains("default/refused-1"),
        "a 503'd record must not land"
    );
    assert!(keys.contains("default/accepted-2"));
    tier.stop().await
}

/// HTTP/2 without TLS (prior knowledge) works as well as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (status, _, body) = post(
        &client,
        &format!("{}/api/deliveryrequests", tier.base),
        &valid_request(0),
    )
    .await?;
    assert_eq!(status, 202, "{body}");
    tier.stop().await
}

/// Drone telemetry: a single fix or a batch, validated per fix, keyed by drone id, bytes
/// as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_fixes_land_keyed_by_drone() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let json = [("content-type", "application/json")];
    let fix = |i: u32| {
        format!(
            r#"{{"latitude": 47.{i}, "longitude": -122.3, "timestamp": "2026-11-24T10:00:0{i}Z", "battery": 90}}"#
        )
    };
    // A single, pretty-printed fix.
    let single = "{\n  \"latitude\": 47.6,\n  \"longitude\": -122.3,\n  \"timestamp\": \"2026-11-24T10:00:00Z\"\n}".to_owned();
    let url = format!("{}/api/drones/drone-7/telemetry", tier.base);
    let (status, _, report) = post_raw(&client, &url, &json, single.clone().into_bytes()).await?;
    assert_eq!(status, 202, "{report}");
    assert_eq!(report["accepted"], 1);

    // A batch with one bad fix.
    let bad = r#"{"latitude": 95, "longitude": 0, "timestamp": "2026-11-24T10:00:00Z"}"#;
    let body = format!("[{}, {bad}, {}]", fix(1), fix(2));
    let url = format!("{}/api/drones/drone-8/telemetry", tier.base);
    let (status, _, report) = post_raw(&client, &url, &json, body.into_bytes()).await?;
    assert_eq!(status, 207, "{report}");
    assert_eq!(report["results"][1]["field"], "latitude");

    // A drone id that is not a safe token.
    let url = format!("{}/api/drones/bad%20id/telemetry", tier.base);
    let (status, _, _) = post_raw(&client, &url, &json, fix(3).into_bytes()).await?;
    assert_eq!(status, 400);

    let mut got = tier.records_of(topics::DRONE_TELEMETRY.name, 3).await?;
    got.sort();
    let mut expected = vec![
        ("drone-7".to_owned(), single.trim().as_bytes().to_vec()),
        ("drone-8".to_owned(), fix(1).into_bytes()),
        ("drone-8".to_owned(), fix(2).into_bytes()),
    ];
    expected.sort();
    assert_eq!(got, expected);
    tier.stop().await
}

/// Request bodies share a byte budget: while slow clients hold it, others get 503 with
/// Retry-After instead of growing memory, and get in once the budget is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_bytes_in_flight_are_bounded() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let tier = IngestOnly::start(ingest::IngestConfig {
        max_batch_bytes: 64 * 1024,
        max_in_flight_bytes: 128 * 1024,
        ..Default::default()
    })
    .await?;
    let addr = tier.base.trim_start_matches("http://").to_owned();
    // Two clients declare 60 KB bodies and send one byte of each.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        stream
            .write_all(
                b"POST /api/deliveryrequests/batch HTTP/1.1\r\nhost: x\r\n\
                  content-type: application/json\r\ncontent-length: 60000\r\n\r\n[",
            )
            .await?;
        slow.push(stream);
    }
    // Let the tier reserve both declared bodies before the first full-size probe: a probe
    // that got in first would take the budget, the second slow request would be refused
    // (and wait for a body that never comes), and every later probe would fit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = client();
    let url = format!("{}/api/deliveryrequests/batch", tier.base);
    let mut body = format!("[{}]", valid_request(0)).into_bytes();
    body.resize(60_000, b' ');
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, headers, answer) = call(&client, "POST", &url, &[], body.clone()).await?;
        if status == 503 {
            assert!(headers.contains_key("retry-after"), "{answer}");
            assert!(
                answer["error"].as_str().unwrap_or("").contains("bytes"),
                "{answer}"
            );
            break;
        }
        assert_eq!(status, 202, "{answer}");
        assert!(Instant::now() < deadline, "the budget was never full");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(slow);
    loop {
        let (status, _, answer) = call(&client, "POST", &url, &[], body.clone()).await?;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "the budget was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tier.stop().await
}

/// A full producer queue is backpressure: records that do not fit are failed at once as
/// retryable, never queued without bound, and none of a 503'd batch lands later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_is_a_retryable_503() -> Result<()> {
    let tier = IngestOnly::start_with(
        ingest::IngestConfig::default(),
        ProducerArgs {
            ack_timeout_ms: 2_000,
            producer_queue_records: 5,
            ..ProducerArgs::default()
        },
    )
    .await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/api/deliveryrequests/batch", tier.base);
    tier.broker.broker_down(1)?;
    let records: Vec<String> = (0..20)
        .map(|i| {
            let mut r = valid_request(i);
            r["deliveryId"] = serde_json::json!(format!("queued-{i}"));
            r.to_string()
        })
        .collect();
    let body = format!("[{}]", records.join(","));
    let (status, headers, report) = post_raw(
        &client,
        &url,
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await?;
    assert_eq!(status, 503, "{report}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(report["failed"], 20);
    let results = report["results"].as_array().context("results")?;
    assert!(results.iter().all(|r| r["retryable"] == true), "{report}");
    assert!(
        results
            .iter()
            .any(|r| r["error"].as_str().unwrap_or("").contains("queue is full")),
        "records past the queue bound fail at once: {report}"
    );

    tier.broker.broker_up(1)?;
    let mut marker = valid_request(99);
    marker["deliveryId"] = serde_json::json!("after-recovery");
    let single = format!("{}/api/deliveryrequests", tier.base);
    let deadline = Instant::now() + SETTLE;
    while post(&client, &single, &marker).await?.0 != 202 {
        assert!(Instant::now() < deadline, "the broker did not come back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let keys: BTreeSet<String> = tier.records(1).await?.into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, BTreeSet::from(["default/after-recovery".to_owned()]));
    tier.stop().await
}

/// Connections are bounded, and one that never sends its headers is closed after the
/// header read timeout, so it cannot hold its place forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_bounded_and_timed_out() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig {
        max_connections: 1,
        header_read_timeout_secs: 1,
        ..ingest::IngestConfig::default()
    })
    .await?;
    let addr = tier.base.trim_start_matches("http://").to_owned();
    // Takes the only place and sends nothing.
    let mut idle = tokio::net::TcpStream::connect(&addr).await?;
    // The server closes it once the header read timeout passes.
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(SETTLE, tokio::io::AsyncReadExt::read(&mut idle, &mut buf))
        .await
        .context("the idle connection was never closed")?;
    assert!(matches!(read, Ok(_) | Err(_)));
    // Then the place is free again for a real client.
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (status, _) = tokio::time::timeout(
        SETTLE,
        send(
            &client,
            "GET",
            &format!("{}/healthz", tier.base),
            "text/plain",
            Vec::new(),
        ),
    )
    .await
    .context("no place freed")??;
    assert_eq!(status, 200);
    tier.stop().await
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
        (
            "SELECT (v * 7919) % 3000017 AS k, count(*) AS n \
             FROM generate_series(1, 3000000) AS t(v) GROUP BY k ORDER BY n DESC LIMIT 1",
            422,
        ),
    ] {
        let (status, _, body) = call(&client, "POST", &url, &[analyst], sql(query)?).await?;
        assert_eq!(status, expected, "{query}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
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
    let history = History::open(data.to_str().context("path")?, &QueryLimits::default()).await?;
    let result = history.query(sql).await?;
    Ok(result
        .batches
        .first()
        .map_or(0, |b| b.column(0).as_primitive::<Int64Type>().value(0)))
}

/// Runs `dronedelivery loadgen` with `args` against `base`; its JSON report.
fn loadgen(base: &str, args: &[&str], dir: &std::path::Path) -> Result<loadgen::Report> {
    let json = dir.join(format!("loadgen-{}.json", uuid::Uuid::new_v4()));
    let output = Command::new(env!("CARGO_BIN_EXE_dronedelivery"))
        .args(["loadgen", "--target", base])
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("DRONEDELIVERY_LOG", "warn")
        .output()
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
fn start_processors(brokers: &str, which: &str) -> Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_dronedelivery"))
        .args(["process", "--brokers", brokers, "--processors", which])
        .env("DRONEDELIVERY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting dronedelivery process")
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

    // The workflow alone fans out, and nothing else runs.
    let mut workflow = start_processors(&brokers, "workflow")?;
    tier.records_of(topics::DELIVERIES.name, 3).await?;
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
        committed(schemas::topics::groups::DELIVERIES, topics::DELIVERIES.name)?,
        0,
        "the delivery consumer did not run"
    );

    // The delivery consumer alone picks up what the workflow wrote.
    let mut deliveries = start_processors(&brokers, "deliveries")?;
    let events = tier.records_of(topics::DELIVERY_EVENTS.name, 3).await?;
    assert_eq!(events.len(), 3, "one Created event per request");
    assert_eq!(
        committed(
            schemas::topics::groups::SCHEDULING,
            topics::DRONE_SCHEDULING.name
        )?,
        0,
        "the scheduler did not run"
    );

    // A name that is not a processor is refused.
    let refused = Command::new(env!("CARGO_BIN_EXE_dronedelivery"))
        .args(["process", "--brokers", &brokers, "--processors", "bogus"])
        .output()?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bogus"));

    for child in [&mut workflow, &mut deliveries] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                assert!(status.success(), "a clean stop");
                break;
            }
            assert!(Instant::now() < deadline, "process did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
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
        &["health on "],
    )?;
    let workflow_health = found[0].clone();
    let (sink, sink_health) = Service::history(&brokers, data)?;

    for i in 0..5 {
        let url = format!("{}/api/deliveryrequests", tier.base);
        let (status, _, body) = post(&http, &url, &valid_request(i)).await?;
        assert_eq!(status, 202, "{body}");
    }
    tier.records_of(topics::DELIVERIES.name, 5).await?;

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
        &["sql server listening on ", "flight sql on grpc://"],
    )?;
    let base = found[0].clone();
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
