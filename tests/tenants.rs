//! Tenants, quotas, idempotent retries, reschedules and cancels at the ingestion tier,
//! on an embedded broker, over real HTTP on 127.0.0.1.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use anyhow::{Context, Result};

mod common;
use common::*;

const FABRIKAM_KEY: &str = "fabrikam-key-0123456789";
const CONTOSO_KEY: &str = "contoso-key-0123456789ab";
const SLOW_KEY: &str = "slow-tenant-key-0123456789";
const FLEET_KEY: &str = "fleet-key-0123456789abcdef";

/// A key file in a temporary folder (kept alive by the returned guard).
fn key_file(lines: &str) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("api-keys");
    std::fs::write(&path, lines)?;
    Ok((dir, path))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn request_of(owner: &str, i: usize) -> serde_json::Value {
    let mut r = valid_request(i);
    r["ownerId"] = serde_json::json!(owner);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_name_the_tenant_and_everyone_else_gets_401() -> Result<()> {
    let (_dir, keys) = key_file(&format!(
        "# tenants of the test\nfabrikam:{FABRIKAM_KEY}\ncontoso:{CONTOSO_KEY} # comment\n\
         fleet:{FLEET_KEY}\n"
    ))?;
    let tier = IngestOnly::start(ingest::IngestConfig {
        auth: ingest::AuthArgs {
            api_keys: Some(keys),
            ..Default::default()
        },
        // The default --telemetry-tenants: only the tenant `fleet` posts telemetry.
        ..Default::default()
    })
    .await?;
    let client = client();
    let single = format!("{}/api/deliveryrequests", tier.base);
    let batch = format!("{}/api/deliveryrequests/batch", tier.base);
    let body = |owner: &str, i| request_of(owner, i).to_string().into_bytes();
    let fabrikam = bearer(FABRIKAM_KEY);
    let contoso = bearer(CONTOSO_KEY);

    // No key, an unknown key, a key in the wrong scheme: 401, nothing produced.
    for headers in [
        vec![],
        vec![("authorization", "Bearer not-a-known-key-at-all")],
        vec![("authorization", FABRIKAM_KEY)],
    ] {
        let (status, answer_headers, answer) =
            call(&client, "POST", &single, &headers, body("fabrikam", 0)).await?;
        assert_eq!(status, 401, "{headers:?}: {answer}");
        assert!(answer_headers.contains_key("www-authenticate"));
    }
    let telemetry = format!("{}/api/drones/d-1/telemetry", tier.base);
    let fix = br#"{"latitude": 47.6, "longitude": -122.3, "timestamp": "2026-11-24T10:00:00Z"}"#;
    let (status, _, _) = call(&client, "POST", &telemetry, &[], fix.to_vec()).await?;
    assert_eq!(status, 401, "telemetry needs a key too");
    // Only the fleet's own key may report drone positions.
    let (status, _, answer) = call(
        &client,
        "POST",
        &telemetry,
        &[("authorization", &bearer(FABRIKAM_KEY))],
        fix.to_vec(),
    )
    .await?;
    assert_eq!(status, 403, "{answer}");
    let (status, _, answer) = call(
        &client,
        "POST",
        &telemetry,
        &[("authorization", &bearer(FLEET_KEY))],
        fix.to_vec(),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");
    // Operations routes need none.
    let (status, _, _) = call(
        &client,
        "GET",
        &format!("{}/healthz", tier.base),
        &[],
        vec![],
    )
    .await?;
    assert_eq!(status, 200);

    // The tenant's own requests go through, keyed by tenant and delivery id.
    let mut own = request_of("fabrikam", 1);
    own["deliveryId"] = serde_json::json!("order-1");
    let auth = [("authorization", fabrikam.as_str())];
    let (status, _, answer) = call(
        &client,
        "POST",
        &single,
        &auth,
        own.to_string().into_bytes(),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["deliveryId"], "order-1");
    // Another tenant may use the same delivery id: it is a different delivery.
    let mut theirs = request_of("contoso", 2);
    theirs["deliveryId"] = serde_json::json!("order-1");
    let auth_c = [("authorization", contoso.as_str())];
    let (status, _, answer) = call(
        &client,
        "POST",
        &single,
        &auth_c,
        theirs.to_string().into_bytes(),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");

    // A request for another owner is refused, alone or inside a batch.
    let (status, _, answer) = call(&client, "POST", &single, &auth, body("contoso", 3)).await?;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "ownerId");
    let mixed = format!(
        "[{},{}]",
        request_of("contoso", 4),
        request_of("fabrikam", 5)
    );
    let (status, _, report) = call(&client, "POST", &batch, &auth_c, mixed.into_bytes()).await?;
    assert_eq!(status, 207, "{report}");
    assert_eq!(report["results"][1]["field"], "ownerId");
    let batch_id = report["results"][0]["deliveryId"]
        .as_str()
        .context("id")?
        .to_owned();

    // Reschedules and cancels act on the caller's own delivery of that id.
    let order_1 = format!("{}/api/deliveryrequests/order-1", tier.base);
    let (status, _, answer) = call(
        &client,
        "PATCH",
        &order_1,
        &auth,
        br#"{"deadline": "2026-11-25T10:00:00Z"}"#.to_vec(),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");
    let (status, _, _) = call(&client, "DELETE", &order_1, &[], Vec::new()).await?;
    assert_eq!(status, 401);

    let mut keys: Vec<String> = tier.records(4).await?.into_iter().map(|(k, _)| k).collect();
    keys.sort();
    let mut expected = vec![
        "fabrikam/order-1".to_owned(),
        "contoso/order-1".to_owned(),
        format!("contoso/{batch_id}"),
        "fabrikam/order-1".to_owned(),
    ];
    expected.sort();
    assert_eq!(keys, expected);
    tier.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_quota_tenant_gets_429_and_nothing_of_it_lands() -> Result<()> {
    // `slow` may send 0.01 records per second after a burst of 10; `fabrikam` has no limit.
    let (_dir, keys) = key_file(&format!("slow:{SLOW_KEY}:0.01\nfabrikam:{FABRIKAM_KEY}\n"))?;
    let tier = IngestOnly::start(ingest::IngestConfig {
        auth: ingest::AuthArgs {
            api_keys: Some(keys),
            ..Default::default()
        },
        tier: ingest::TierArgs {
            tenant_burst: 10.0,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let client = client();
    let single = format!("{}/api/deliveryrequests", tier.base);
    let batch = format!("{}/api/deliveryrequests/batch", tier.base);
    let slow = bearer(SLOW_KEY);
    let auth = [("authorization", slow.as_str())];
    let batch_of = |owner: &str, n: usize, from: usize| {
        let records: Vec<String> = (from..from + n)
            .map(|i| request_of(owner, i).to_string())
            .collect();
        format!("[{}]", records.join(",")).into_bytes()
    };

    let (status, _, report) = call(&client, "POST", &batch, &auth, batch_of("slow", 10, 0)).await?;
    assert_eq!(status, 202, "the burst: {report}");
    let (status, headers, answer) =
        call(&client, "POST", &batch, &auth, batch_of("slow", 3, 10)).await?;
    assert_eq!(status, 429, "{answer}");
    let retry_after: u64 = headers
        .get("retry-after")
        .context("429 without Retry-After")?
        .to_str()?
        .parse()?;
    assert!(
        retry_after >= 60,
        "at 0.01/s a record takes 100 s: {retry_after}"
    );
    let (status, _, _) = call(
        &client,
        "POST",
        &single,
        &auth,
        request_of("slow", 20).to_string().into_bytes(),
    )
    .await?;
    assert_eq!(status, 429, "a single request counts too");

    // Another tenant is not held back by it.
    let fabrikam = bearer(FABRIKAM_KEY);
    let (status, _, report) = call(
        &client,
        "POST",
        &batch,
        &[("authorization", fabrikam.as_str())],
        batch_of("fabrikam", 50, 100),
    )
    .await?;
    assert_eq!(status, 202, "{report}");

    let records = tier.records(60).await?;
    assert_eq!(
        records.len(),
        60,
        "the burst and the other tenant, nothing refused"
    );
    let slow_records = records
        .iter()
        .filter(|(k, _)| k.starts_with("slow/"))
        .count();
    assert_eq!(slow_records, 10);
    tier.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_with_the_same_idempotency_key_yields_no_duplicates() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client = client();
    let batch = format!("{}/api/deliveryrequests/batch", tier.base);
    let single = format!("{}/api/deliveryrequests", tier.base);
    let body = format!(
        "[{},{},{}]",
        valid_request(0),
        valid_request(1),
        valid_request(2)
    );
    let with_key = |key: &'static str| [("idempotency-key", key)];

    let (status, first_headers, first) = call(
        &client,
        "POST",
        &batch,
        &with_key("retry-1"),
        body.clone().into_bytes(),
    )
    .await?;
    assert_eq!(status, 202, "{first}");
    assert!(!first_headers.contains_key("idempotent-replayed"));
    let (status, headers, again) = call(
        &client,
        "POST",
        &batch,
        &with_key("retry-1"),
        body.clone().into_bytes(),
    )
    .await?;
    assert_eq!(status, 202);
    assert_eq!(again, first, "the same answer, the same ids");
    assert_eq!(headers["idempotent-replayed"], "true");
    // The same key with another body is a client bug, not a retry.
    let other = format!("[{}]", valid_request(3));
    let (status, _, answer) = call(
        &client,
        "POST",
        &batch,
        &with_key("retry-1"),
        other.into_bytes(),
    )
    .await?;
    assert_eq!(status, 422, "{answer}");
    // The same key on another route is another request under a used key.
    let (status, _, answer) = call(
        &client,
        "POST",
        &single,
        &with_key("retry-1"),
        valid_request(0).to_string().into_bytes(),
    )
    .await?;
    assert_eq!(status, 422, "{answer}");
    // A malformed key is refused.
    let (status, _, _) = call(
        &client,
        "POST",
        &batch,
        &[("idempotency-key", "has spaces")],
        body.clone().into_bytes(),
    )
    .await?;
    assert_eq!(status, 400);
    // A single request replays its id and Location.
    let one = valid_request(4).to_string().into_bytes();
    let (status, headers_1, single_1) =
        call(&client, "POST", &single, &with_key("one-1"), one.clone()).await?;
    assert_eq!(status, 202);
    let (status, headers_2, single_2) =
        call(&client, "POST", &single, &with_key("one-1"), one).await?;
    assert_eq!(status, 202);
    assert_eq!(single_1, single_2);
    assert_eq!(headers_1["location"], headers_2["location"]);

    let records = tier.records(4).await?;
    assert_eq!(records.len(), 4, "each record once: {records:?}");
    let ids: BTreeSet<String> = first["results"]
        .as_array()
        .context("results")?
        .iter()
        .map(|r| format!("default/{}", r["deliveryId"].as_str().unwrap()))
        .collect();
    let keys: BTreeSet<String> = records.iter().map(|(k, _)| k.clone()).collect();
    assert!(ids.is_subset(&keys));
    tier.stop().await?;

    // Past the window (here: no window at all, as after a restart or on another replica)
    // a retry is produced again, but under the same keys, so consumers dedupe by key.
    let tier = IngestOnly::start(ingest::IngestConfig {
        tier: ingest::TierArgs {
            idempotency_window_bytes: 0,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let batch = format!("{}/api/deliveryrequests/batch", tier.base);
    let (status, _, first_again) = call(
        &client,
        "POST",
        &batch,
        &with_key("retry-1"),
        body.clone().into_bytes(),
    )
    .await?;
    assert_eq!(status, 202);
    // The same ids; tracking links are made anew (each with its own expiry and, on
    // another process without a shared secret, its own key).
    let delivery_ids = |answer: &serde_json::Value| -> Vec<serde_json::Value> {
        answer["results"]
            .as_array()
            .map(|r| r.iter().map(|r| r["deliveryId"].clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        delivery_ids(&first_again),
        delivery_ids(&first),
        "the ids derive from the tenant, key and index"
    );
    assert_eq!(first_again["accepted"], first["accepted"]);
    let (status, _, _) = call(
        &client,
        "POST",
        &batch,
        &with_key("retry-1"),
        body.into_bytes(),
    )
    .await?;
    assert_eq!(status, 202);
    let records = tier.records(6).await?;
    let keys: BTreeSet<String> = records.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, ids, "six records, three deliveries");
    tier.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reschedule_and_cancel_are_events_on_the_delivery_key() -> Result<()> {
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client = client();
    let mut request = valid_request(0);
    request["deliveryId"] = serde_json::json!("d-1");
    let request = request.to_string();
    let (status, _, answer) = call(
        &client,
        "POST",
        &format!("{}/api/deliveryrequests", tier.base),
        &[],
        request.clone().into_bytes(),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");

    let url = format!("{}/api/deliveryrequests/d-1", tier.base);
    let json = [("content-type", "application/json")];
    let reschedule =
        r#"{"pickupTime": "2026-11-24T11:00:00Z", "deadline": "2026-11-24T13:00:00Z"}"#;
    let (status, headers, answer) = call(
        &client,
        "PATCH",
        &url,
        &json,
        reschedule.as_bytes().to_vec(),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["event"], "DeliveryRescheduled");
    assert_eq!(headers["location"], "/api/deliveries/d-1");
    let (status, _, answer) = call(&client, "DELETE", &url, &[], Vec::new()).await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["event"], "DeliveryCancelled");

    // Refused: an empty reschedule, a field that cannot change, a bad id, another method.
    for (body, field) in [("{}", ""), (r#"{"ownerId": "x"}"#, "ownerId")] {
        let (status, _, answer) = call(&client, "PATCH", &url, &json, body.into()).await?;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["field"], field);
    }
    let (status, _, answer) = call(
        &client,
        "PATCH",
        &format!("{}/api/deliveryrequests/bad%20id", tier.base),
        &json,
        reschedule.into(),
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "deliveryId");
    let (status, headers, _) = call(&client, "PUT", &url, &json, reschedule.into()).await?;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "PATCH, DELETE");
    let (status, _, _) = call(
        &client,
        "PATCH",
        &url,
        &[("content-type", "text/plain")],
        reschedule.into(),
    )
    .await?;
    assert_eq!(status, 415);

    // All three on the delivery's key, so on one partition, in order.
    let records = tier.records(3).await?;
    let expected = vec![
        ("default/d-1".to_owned(), request.into_bytes()),
        ("default/d-1".to_owned(), reschedule.as_bytes().to_vec()),
        (
            "default/d-1".to_owned(),
            br#"{"deliveryId":"d-1"}"#.to_vec(),
        ),
    ];
    assert_eq!(records, expected);
    tier.stop().await
}

/// Without API keys the tier serves loopback clients only. Behind a reverse proxy on the
/// same machine every connection comes from loopback, so a request that says a proxy
/// forwarded it (`Forwarded`, `X-Forwarded-For`, `X-Forwarded-Host`, `X-Real-IP`) gets
/// 401 with the reason, on writes, reads and SQL alike, and nothing of it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_a_request_forwarded_by_a_local_proxy_is_not_a_loopback_client() -> Result<()>
{
    let tier = IngestOnly::start(ingest::IngestConfig::default()).await?;
    let client = client();
    let url = format!("{}/api/deliveryrequests", tier.base);
    let json = [("content-type", "application/json")];
    let forwarded = [
        ("forwarded", "for=203.0.113.7;proto=https"),
        ("x-forwarded-for", "203.0.113.7"),
        ("X-Forwarded-Host", "drones.example"),
        ("x-real-ip", "203.0.113.7"),
    ];
    for (i, header) in forwarded.into_iter().enumerate() {
        let headers = [json[0], header];
        let body = request_of("default", i).to_string().into_bytes();
        let (status, _, answer) = post_raw(&client, &url, &headers, body).await?;
        assert_eq!(status, 401, "{header:?}: {answer}");
        assert!(
            answer.to_string().contains("forwarded by a proxy"),
            "{header:?}: {answer}"
        );
        let status_url = format!("{}/api/deliveries/anything/status", tier.base);
        let (status, _, _) = call(&client, "GET", &status_url, &[header], Vec::new()).await?;
        assert_eq!(status, 401, "{header:?} on a read");
        let sql = format!("{}/api/sql", tier.base);
        let (status, _, _) = post_raw(
            &client,
            &sql,
            &[json[0], header],
            br#"{"sql":"SELECT 1"}"#.to_vec(),
        )
        .await?;
        assert_eq!(status, 401, "{header:?} on SQL");
    }
    // The same request straight from loopback is the default tenant's.
    let body = request_of("default", 99).to_string().into_bytes();
    let (status, _, answer) = post_raw(&client, &url, &json, body).await?;
    assert_eq!(status, 202, "{answer}");
    let landed = tier.records(1).await?;
    assert_eq!(landed.len(), 1, "only the direct request lands: {landed:?}");
    tier.stop().await
}

/// A batch answered 207 with records that failed for a transient reason (here: past a
/// producer queue of 5 records) is not final: each retry with the same Idempotency-Key
/// sends those records again, and only those, until every record is in. The topic then
/// holds each record exactly once, under the ids of the first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_partly_failed_batch_sends_only_its_failed_records() -> Result<()> {
    const N: usize = 20;
    let tier = IngestOnly::start_with(
        ingest::IngestConfig::default(),
        bus::ProducerArgs {
            producer_queue_records: 5,
            ..bus::ProducerArgs::default()
        },
    )
    .await?;
    let client = client();
    let url = format!("{}/api/deliveryrequests/batch", tier.base);
    let body: Vec<String> = (0..N)
        .map(|i| {
            let mut r = request_of("default", i);
            r.as_object_mut().context("object")?.remove("deliveryId");
            Ok(r.to_string())
        })
        .collect::<Result<_>>()?;
    let body = format!("[{}]", body.join(",")).into_bytes();
    let headers = [
        ("content-type", "application/json"),
        ("idempotency-key", "partly-failed-1"),
    ];
    let ids_of = |report: &serde_json::Value| -> BTreeSet<String> {
        report["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["deliveryId"].as_str().map(str::to_owned))
            .collect()
    };
    let (status, _, first) = post_raw(&client, &url, &headers, body.clone()).await?;
    assert_eq!(status, 207, "records past the queue fail at once: {first}");
    let failed = first["failed"].as_u64().context("failed")?;
    assert!(failed > 0, "{first}");
    let mut accepted = ids_of(&first);
    let mut attempts = 1;
    let last = loop {
        let (status, headers_back, report) =
            post_raw(&client, &url, &headers, body.clone()).await?;
        attempts += 1;
        assert!(
            !headers_back.contains_key("idempotent-replayed"),
            "a retry with failed records is not a replay: {report}"
        );
        assert_eq!(
            report["results"].as_array().map(Vec::len),
            Some(N),
            "every record is listed: {report}"
        );
        let now = ids_of(&report);
        assert!(
            now.is_superset(&accepted),
            "accepted records stay: {report}"
        );
        accepted = now;
        if status == 202 {
            break report;
        }
        assert_eq!(status, 207, "{report}");
        assert!(
            attempts < 20,
            "still not every record after {attempts} attempts: {report}"
        );
    };
    assert_eq!(last["accepted"], N, "{last}");
    assert_eq!(accepted.len(), N);
    // Final now: replayed as it is.
    let (status, headers_back, replayed) = post_raw(&client, &url, &headers, body).await?;
    assert_eq!(status, 202);
    assert!(headers_back.contains_key("idempotent-replayed"));
    assert_eq!(replayed, last);
    // Each record once on the topic, under the ids the answers gave.
    let landed = tier.records(N).await?;
    let keys: BTreeSet<String> = landed.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(landed.len(), N, "no record sent twice: {keys:?}");
    let expected: BTreeSet<String> = accepted.iter().map(|id| format!("default/{id}")).collect();
    assert_eq!(keys, expected);
    tier.stop().await
}

/// One tenant holding its share (`--tenant-share-percent`) of the body bytes in flight
/// gets 503 for more, while another tenant is still served: no tenant can take the whole
/// budget by sending much at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holds_no_more_than_its_share_of_the_bytes_in_flight() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (_dir, keys) = key_file(&format!("fabrikam:{FABRIKAM_KEY}\ncontoso:{CONTOSO_KEY}\n"))?;
    let tier = IngestOnly::start(ingest::IngestConfig {
        auth: ingest::AuthArgs {
            api_keys: Some(keys),
            ..Default::default()
        },
        http: ingest::HttpServerArgs {
            min_body_bytes_per_sec: 0,
            ..Default::default()
        },
        tier: ingest::TierArgs {
            max_batch_bytes: 64 * 1024,
            max_in_flight_bytes: 512 * 1024,
            tenant_share_percent: 50,
            ..Default::default()
        },
    })
    .await?;
    let addr = tier.base.trim_start_matches("http://").to_owned();
    // Five fabrikam uploads that sent 59 KB of 60 KB each: about 295 KB held, past its
    // 256 KiB share, though the tier's budget has room.
    let head = format!(
        "POST /api/deliveryrequests/batch HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: 60000\r\n\r\n",
        bearer(FABRIKAM_KEY)
    );
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        stream.write_all(head.as_bytes()).await?;
        let mut body = vec![b' '; 59_000];
        body[0] = b'[';
        stream.write_all(&body).await?;
        held.push(stream);
    }
    let client = client();
    let url = format!("{}/api/deliveryrequests/batch", tier.base);
    let batch = |owner: &str| {
        let mut body = format!("[{}]", request_of(owner, 1)).into_bytes();
        body.resize(60_000, b' ');
        body
    };
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (status, headers, answer) = call(
            &client,
            "POST",
            &url,
            &[("authorization", &bearer(FABRIKAM_KEY))],
            batch("fabrikam"),
        )
        .await?;
        if status == 503 {
            assert!(headers.contains_key("retry-after"), "{answer}");
            assert!(
                answer["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("--tenant-share-percent")),
                "{answer}"
            );
            break;
        }
        assert_eq!(status, 202, "{answer}");
        assert!(
            std::time::Instant::now() < deadline,
            "fabrikam's share was never full"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, _, answer) = call(
        &client,
        "POST",
        &url,
        &[("authorization", &bearer(CONTOSO_KEY))],
        batch("contoso"),
    )
    .await?;
    assert_eq!(status, 202, "contoso is served beside it: {answer}");
    drop(held);
    tier.stop().await
}
