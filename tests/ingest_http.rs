//! The ingestion tier over real HTTP on 127.0.0.1, in this process on an embedded broker
//! (`common::IngestOnly`): batches (JSON arrays, NDJSON, gzip and zstd bodies) and what
//! reaches Kafka byte for byte, batch limits and malformed bodies, the broker down, h2c
//! clients, drone telemetry, the in-flight body budget, a full producer queue, and idle
//! connections. Needs nothing outside this process.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bus::ProducerArgs;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use schemas::topics;

mod common;
use common::*;

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
        tier: ingest::TierArgs {
            max_batch_records: 3,
            max_batch_bytes: 4096,
            ..Default::default()
        },
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

/// Request bodies share a byte budget, taken as bytes arrive: clients that only declare
/// large bodies hold nothing of it (sixteen of them used to take it all); clients that sent
/// most of their bodies hold those bytes, and others get 503 with Retry-After instead of
/// growing memory; a body that stalls gets 408 after `--body-idle-timeout-secs` and gives
/// its bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_bytes_in_flight_are_bounded_and_taken_as_they_arrive() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The stalled uploads below must still hold their bytes when the budget is probed,
    // however busy the machine: an idle limit well past the probing's bound.
    let tier = IngestOnly::start(ingest::IngestConfig {
        http: ingest::HttpServerArgs {
            body_idle_timeout_secs: 15,
            min_body_bytes_per_sec: 0,
            ..Default::default()
        },
        tier: ingest::TierArgs {
            max_batch_bytes: 64 * 1024,
            max_in_flight_bytes: 128 * 1024,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let addr = tier.base.trim_start_matches("http://").to_owned();
    let head = b"POST /api/deliveryrequests/batch HTTP/1.1\r\nhost: x\r\n\
                 content-type: application/json\r\ncontent-length: 60000\r\n\r\n";
    let open = |sent: usize| {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await?;
            stream.write_all(head).await?;
            let mut body = vec![b' '; sent];
            body[0] = b'[';
            stream.write_all(&body).await?;
            anyhow::Ok(stream)
        }
    };
    let client = client();
    let url = format!("{}/api/deliveryrequests/batch", tier.base);
    let mut body = format!("[{}]", valid_request(0)).into_bytes();
    body.resize(60_000, b' ');

    // Sixteen uploads that declared 60 KB and sent one byte hold one byte each.
    let mut declared_only = Vec::new();
    for _ in 0..16 {
        declared_only.push(open(1).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, answer) = call(&client, "POST", &url, &[], body.clone()).await?;
    assert_eq!(status, 202, "declarations hold nothing: {answer}");
    drop(declared_only);

    // Two uploads that sent 59 KB hold it: a third body does not fit.
    let mut stalled = vec![open(59_000).await?, open(59_000).await?];
    // The server takes their bytes as it reads them, which on a busy machine may be a
    // while after they were sent: a bound on the wait (under the idle limit), not a
    // figure.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, headers, answer) = call(&client, "POST", &url, &[], body.clone()).await?;
        if status == 503 {
            assert!(headers.contains_key("retry-after"), "{answer}");
            assert!(
                answer["detail"].as_str().unwrap_or("").contains("bytes"),
                "{answer}"
            );
            break;
        }
        assert_eq!(status, 202, "{answer}");
        assert!(Instant::now() < deadline, "the budget was never full");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stalled past the idle limit: 408, and their bytes are given back.
    for stream in &mut stalled {
        let mut answer = vec![0u8; 512];
        let n = tokio::time::timeout(SETTLE, stream.read(&mut answer)).await??;
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let (status, _, answer) = call(&client, "POST", &url, &[], body).await?;
    assert_eq!(status, 202, "the budget was given back: {answer}");
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
        http: ingest::HttpServerArgs {
            max_connections: 1,
            header_read_timeout_secs: 1,
            ..Default::default()
        },
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

/// Every error answer has one shape, RFC 9457 problem details as
/// `application/problem+json`, and names the part of the request at fault: an invalid
/// `Idempotency-Key` names the header, an invalid drone id the path parameter; a batch
/// that accepted nothing carries its report as extension members; an unknown route too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_are_problem_details_naming_what_is_at_fault() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let is_problem = |status: u16, headers: &hyper::HeaderMap, answer: &serde_json::Value| {
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{answer}"
        );
        assert_eq!(answer["status"], status, "{answer}");
        assert!(
            answer["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:dronedelivery:problem:")),
            "{answer}"
        );
        assert!(
            answer["title"].is_string() && answer["detail"].is_string(),
            "{answer}"
        );
    };
    let batch = format!("{}/api/deliveryrequests/batch", tier.base);
    let body = format!("[{}]", valid_request(1)).into_bytes();
    let (status, headers, answer) = post_raw(
        &client,
        &batch,
        &[
            ("content-type", "application/json"),
            ("idempotency-key", "has a space"),
        ],
        body,
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    is_problem(status, &headers, &answer);
    assert_eq!(answer["field"], "Idempotency-Key", "{answer}");
    assert!(answer["reason"].as_str().is_some_and(|r| !r.is_empty()));

    let long_id = "d".repeat(65);
    let telemetry = format!("{}/api/drones/{long_id}/telemetry", tier.base);
    let fix = r#"{"latitude": 47.6, "longitude": -122.3, "timestamp": "2026-11-24T10:00:00Z"}"#;
    let (status, headers, answer) = post_raw(
        &client,
        &telemetry,
        &[("content-type", "application/json")],
        fix.as_bytes().to_vec(),
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    is_problem(status, &headers, &answer);
    assert_eq!(answer["field"], "droneId", "{answer}");
    assert!(
        !answer.to_string().contains("delivery request"),
        "a drone id is not a delivery request: {answer}"
    );

    let invalid = br#"[{"deliveryId": "x"}, 7]"#.to_vec();
    let (status, headers, answer) = post_raw(
        &client,
        &batch,
        &[("content-type", "application/json")],
        invalid,
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    is_problem(status, &headers, &answer);
    assert_eq!(answer["rejected"], 2, "the report's members too: {answer}");
    assert_eq!(answer["results"].as_array().map(Vec::len), Some(2));

    let (status, headers, answer) = call(
        &client,
        "GET",
        &format!("{}/api/nothing-here", tier.base),
        &[],
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 404, "{answer}");
    is_problem(status, &headers, &answer);
    tier.stop().await
}

/// Every write route caps each record at `--max-record-bytes`: a larger record of a batch
/// is rejected with its reason while the others go on (deliveries and telemetry), a larger
/// single request gets 413, and the tier refuses a cap that would let derived records
/// reach the broker's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_capped_in_bytes_on_every_write_route() -> Result<()> {
    let too_high = IngestOnly::start(ingest::IngestConfig {
        tier: ingest::TierArgs {
            max_record_bytes: 600_000,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let refused = too_high
        .err()
        .context("a cap near the broker's limit is refused")?;
    assert!(
        refused.to_string().contains("--max-record-bytes"),
        "{refused}"
    );

    let tier = IngestOnly::start(ingest::IngestConfig {
        tier: ingest::TierArgs {
            max_record_bytes: 2_000,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let json = [("content-type", "application/json")];
    let mut big = valid_request(1);
    big["deliveryId"] = serde_json::json!("big-1");
    big["padding"] = serde_json::json!("x".repeat(3_000));
    let mut small = valid_request(2);
    small["deliveryId"] = serde_json::json!("small-2");

    let batch = format!("{}/api/deliveryrequests/batch", tier.base);
    let body = format!("[{small},{big}]").into_bytes();
    let (status, _, report) = post_raw(&client, &batch, &json, body).await?;
    assert_eq!(status, 207, "{report}");
    assert_eq!(report["results"][0]["deliveryId"], "small-2", "{report}");
    assert!(
        report["results"][1]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--max-record-bytes")),
        "{report}"
    );

    let single = format!("{}/api/deliveryrequests", tier.base);
    let (status, _, answer) =
        post_raw(&client, &single, &json, big.to_string().into_bytes()).await?;
    assert_eq!(status, 413, "{answer}");

    // A reschedule is a record too.
    let patch = format!("{}/api/deliveryrequests/small-2", tier.base);
    let reschedule = serde_json::json!({
        "pickupTime": "2026-11-24T12:00:00Z",
        "padding": "z".repeat(3_000),
    });
    let (status, _, answer) = call(
        &client,
        "PATCH",
        &patch,
        &json,
        reschedule.to_string().into_bytes(),
    )
    .await?;
    assert_eq!(status, 413, "{answer}");

    let fix = r#"{"latitude": 47.6, "longitude": -122.3, "timestamp": "2026-11-24T10:00:00Z"}"#;
    let big_fix = format!(
        r#"{{"latitude": 47.6, "longitude": -122.3, "timestamp": "2026-11-24T10:00:01Z", "note": "{}"}}"#,
        "y".repeat(3_000)
    );
    let telemetry = format!("{}/api/drones/drone-9/telemetry", tier.base);
    let body = format!("[{fix},{big_fix}]").into_bytes();
    let (status, _, report) = post_raw(&client, &telemetry, &json, body).await?;
    assert_eq!(status, 207, "{report}");
    assert!(
        report["results"][1]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--max-record-bytes")),
        "{report}"
    );
    // Only the records within the cap reached the broker.
    let landed = tier.records(1).await?;
    assert_eq!(landed.len(), 1, "{landed:?}");
    assert_eq!(landed[0].0, "default/small-2");
    tier.stop().await
}

/// A connection idle past `--idle-timeout-secs` is closed, whatever holds it: an HTTP/1
/// keep-alive after its answer, or an HTTP/2 preface that stopped half-way; its place is
/// then free for another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alives_and_stalled_prefaces_are_closed() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tier = IngestOnly::start(ingest::IngestConfig {
        http: ingest::HttpServerArgs {
            max_connections: 1,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 1,
            ..Default::default()
        },
        ..ingest::IngestConfig::default()
    })
    .await?;
    let addr = tier.base.trim_start_matches("http://").to_owned();
    // Reads until the server closes the connection (or SETTLE passes): what it sent.
    let until_closed = |mut stream: tokio::net::TcpStream| async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = tokio::time::timeout(SETTLE, stream.read(&mut buf))
                .await
                .context("the connection was never closed")?
                .unwrap_or(0);
            if n == 0 {
                return anyhow::Ok(String::from_utf8_lossy(&seen).into_owned());
            }
            seen.extend_from_slice(&buf[..n]);
        }
    };
    // A keep-alive: one request answered, then nothing.
    let mut keep_alive = tokio::net::TcpStream::connect(&addr).await?;
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await?;
    let started = Instant::now();
    let seen = until_closed(keep_alive).await?;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "closed by the idle limit, not the header timeout"
    );
    // Half an HTTP/2 preface, then nothing.
    let mut preface = tokio::net::TcpStream::connect(&addr).await?;
    preface.write_all(b"PRI * HTTP/2.0\r\n").await?;
    let started = Instant::now();
    until_closed(preface).await?;
    assert!(started.elapsed() < Duration::from_secs(25));
    // The only place is free again.
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

/// An HTTP/2 connection is held only by requests: a peer that sends PINGs (or anything
/// else but a request) for ever loses it after the idle limit, like a silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_only_pings_is_closed_when_idle() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tier = IngestOnly::start(ingest::IngestConfig {
        http: ingest::HttpServerArgs {
            max_connections: 1,
            idle_timeout_secs: 1,
            ..Default::default()
        },
        ..ingest::IngestConfig::default()
    })
    .await?;
    let addr = tier.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    // The preface and an empty SETTINGS frame (prior knowledge, as h2c clients do).
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    // A PING every 200 ms (each answered by the server) until the connection closes.
    let ping = b"\0\0\x08\x06\0\0\0\0\0pingping";
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = loop {
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        if stream.write_all(ping).await.is_err() {
            break true;
        }
        let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            break true;
        }
    };
    assert!(
        closed,
        "PINGs held the connection for 20 s past a 1 s idle limit"
    );
    // The only place is free again.
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

/// A client that asks for an answer and then takes none of it (an HTTP/2 window of 0)
/// does not hold its connection by sending PINGs: the server's acknowledgements are not
/// activity, only the pieces of the answer the client takes are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_takes_no_answer_loses_its_connection_when_idle() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tier = IngestOnly::start(ingest::IngestConfig {
        http: ingest::HttpServerArgs {
            max_connections: 1,
            idle_timeout_secs: 1,
            ..Default::default()
        },
        ..ingest::IngestConfig::default()
    })
    .await?;
    let addr = tier.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: INITIAL_WINDOW_SIZE 0, so no byte of an answer can be sent.
    start.extend_from_slice(b"\0\0\x06\x04\0\0\0\0\0\0\x04\0\0\0\0");
    // HEADERS on stream 1, END_STREAM | END_HEADERS: GET http://x/healthz (HPACK: :method
    // GET and :scheme http indexed, :path and :authority literal).
    let block = b"\x82\x86\x44\x08/healthz\x41\x01x";
    start.extend_from_slice(&[0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, 1]);
    start.extend_from_slice(block);
    stream.write_all(&start).await?;
    let ping = b"\0\0\x08\x06\0\0\0\0\0pingping";
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = loop {
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        if stream.write_all(ping).await.is_err() {
            break true;
        }
        let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            break true;
        }
    };
    assert!(
        closed,
        "PINGs held a connection whose answer was never taken for 20 s past a 1 s idle limit"
    );
    tier.stop().await
}

/// What schemathesis found where the answers and the OpenAPI document disagreed, each
/// answered as documented now (tests/api_conformance.rs runs schemathesis itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_agree_with_the_openapi_document() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let json = [("content-type", "application/json")];

    // A batch of no records is a bad request (the body is required), on both batch routes.
    let batch = format!("{}/api/deliveryrequests/batch", tier.base);
    let telemetry = format!("{}/api/drones/d1/telemetry", tier.base);
    for (url, body) in [
        (&batch, &b""[..]),
        (&batch, b"[]"),
        (&telemetry, b""),
        (&telemetry, b"\n\n"),
    ] {
        let (status, _, answer) = post_raw(&client, url, &json, body.to_vec()).await?;
        assert_eq!(status, 400, "{url} {body:?}: {answer}");
    }

    // A time cannot be cleared: null is refused, not taken as absent.
    let (status, _, answer) = call(
        &client,
        "PATCH",
        &format!("{}/api/deliveryrequests/d1", tier.base),
        &json,
        br#"{"deadline": null, "pickupTime": "2026-11-24T10:00:00Z"}"#.to_vec(),
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "deadline", "{answer}");

    // A JSON string with escapes is the string it stands for, in telemetry too.
    let fix = br#"{"latitude":1,"longitude":2,"timestamp":"2026-01-01T00:00:00\u005a"}"#;
    let (status, _, answer) = post_raw(&client, &telemetry, &json, fix.to_vec()).await?;
    assert_eq!(status, 202, "{answer}");

    // A percent-escape in an id is the character it stands for.
    let (status, _, answer) = call(
        &client,
        "DELETE",
        &format!("{}/api/deliveryrequests/ord%3A42", tier.base),
        &[],
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["deliveryId"], "ord:42", "{answer}");
    let records = tier.records(1).await?;
    assert!(
        records.iter().any(|(key, _)| key.ends_with("/ord:42")),
        "{records:?}"
    );

    // A route that decodes no Content-Encoding refuses one rather than reading it as JSON.
    let gzip = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    let single = format!("{}/api/deliveryrequests", tier.base);
    let body = valid_request(7).to_string().into_bytes();
    let (status, _, answer) = post_raw(&client, &single, &gzip, body).await?;
    assert_eq!(status, 415, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.contains("identity")),
        "{answer}"
    );
    tier.stop().await
}
