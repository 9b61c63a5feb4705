//! Live tracking end to end, on `dronedelivery run` with its simulator (real HTTP on
//! 127.0.0.1, the embedded broker): the Server-Sent Events of a flown delivery (every
//! event once and in order, a resume with `Last-Event-ID` missing and repeating nothing,
//! another tenant's id 404, the subscriber bound), tracking links (the page, tampered,
//! wrong-tenant and expired tokens), signed webhooks (a receiver that verifies every
//! signature, one that fails three times then recovers, one that never answers and ends
//! in `dead-letters`), private addresses refused without the operator's flag, and the
//! tracking page in Debian's Chromium driven by Playwright (`tests/browser/track.mjs`),
//! which saves a screenshot.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use dronedelivery::announce;
use http_body_util::{BodyExt, Full};
use schemas::signing::{TrackingKey, WebhookSecret, verify_webhook};

mod common;
use common::binary::{Binary, Launch, Signal};
use common::*;

const SECRET: &str = "a-tracking-secret-of-the-live-tests-0123";
const CONTOSO: (&str, &str) = ("authorization", "Bearer key-contoso-0123456789");
const FABRIKAM: (&str, &str) = ("authorization", "Bearer key-fabrikam-0123456789");

/// `run` with keys for two tenants and the fleet, the simulator flying fast, webhooks to
/// loopback allowed, and short webhook retries.
fn start(dir: &std::path::Path, extra: &[&str]) -> Result<(Binary, String)> {
    let keys = dir.join("keys");
    std::fs::write(
        &keys,
        "contoso:key-contoso-0123456789\nfabrikam:key-fabrikam-0123456789\n\
         fleet:key-fleet-01234567890123\nanalysts:key-analysts-0123456789\n",
    )?;
    let binary = Launch::new("run")
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--flight-listen",
            "off",
            "--simulate-drones",
            "--simulate-api-key",
            "key-fleet-01234567890123",
            "--simulate-speedup",
            "150",
            "--simulate-tick-ms",
            "100",
            "--webhooks-allow-private",
            "--webhook-timeout-secs",
            "1",
            "--webhook-backoff-ms",
            "100",
            "--webhook-retry-for",
            "4s",
            "--tracking-secret",
            SECRET,
            "--sql-tenants",
            "analysts",
            "--roll-interval-ms",
            "300",
        ])
        .arg("--api-keys")
        .arg(&keys)
        .args(extra)
        .arg("--data")
        .arg(dir.join("history"))
        .start(&[announce::API])?;
    let base = format!("http://{}", binary.announced(announce::API)?);
    Ok((binary, base))
}

/// A delivery of `tenant`, picked up near its region's drones and dropped off a few
/// kilometres away.
fn request(tenant: &str, id: &str) -> serde_json::Value {
    let mut r = valid_request(0);
    r["ownerId"] = tenant.into();
    r["deliveryId"] = id.into();
    r["pickupLocation"] = "47.51,-122.49".into();
    r["dropOffLocation"] = serde_json::json!({"latitude": 47.53, "longitude": -122.46});
    r["pickupTime"] = "2020-01-01T00:00:00Z".into();
    r["deadline"] = "2099-01-01T00:00:00Z".into();
    r
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Event {
    id: Option<u64>,
    kind: String,
    data: serde_json::Value,
}

/// A Server-Sent Events stream being read.
struct Stream {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl Stream {
    /// Opens `url` (retrying a 404 while the delivery is not known yet, up to `SETTLE`).
    async fn open(url: &str, headers: &[(&str, &str)]) -> Result<(u16, Option<Self>)> {
        let client = client();
        let deadline = Instant::now() + SETTLE;
        loop {
            let mut request = hyper::Request::get(url);
            for (k, v) in headers {
                request = request.header(*k, *v);
            }
            let response = tokio::time::timeout(
                Duration::from_secs(10),
                client.request(request.body(Full::new(Bytes::new()))?),
            )
            .await
            .context("no answer")??;
            let status = response.status().as_u16();
            if status == 200 {
                let kind = response.headers()["content-type"].to_str()?.to_owned();
                assert_eq!(kind, "text/event-stream");
                return Ok((
                    status,
                    Some(Self {
                        body: response.into_body(),
                        buffer: Vec::new(),
                    }),
                ));
            }
            if status != 404 || Instant::now() > deadline {
                return Ok((status, None));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The next event (comments skipped), within `limit`.
    async fn next(&mut self, limit: Duration) -> Result<Option<Event>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(block)?;
                let (mut id, mut kind, mut data) = (None, String::new(), None);
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse()?);
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        kind = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v)?);
                    }
                }
                if let Some(data) = data {
                    return Ok(Some(Event { id, kind, data }));
                }
                continue;
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .context("no event in time")?;
            match frame {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Events until the delivery's `Completed` stage event (inclusive).
    async fn until_completed(&mut self, events: &mut Vec<Event>) -> Result<()> {
        while let Some(event) = self.next(SETTLE).await? {
            let done = event.kind == "stage" && event.data["stage"] == "Completed";
            events.push(event);
            if done {
                return Ok(());
            }
        }
        bail!("the stream ended before Completed: {events:?}")
    }
}

fn stages(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == "stage")
        .map(|e| e.data["stage"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A webhook receiver on 127.0.0.1: `/ok` answers 204, `/flaky` answers 500 three times
/// then 200, `/hang` never answers.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(String, hyper::HeaderMap, Bytes)>>>,
    flaky_failures: Arc<Mutex<u32>>,
}

impl Receiver {
    async fn start(self) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let me = self.clone();
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let headers = req.headers().clone();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let status = match path.as_str() {
                                "/hang" => {
                                    tokio::time::sleep(Duration::from_secs(3_600)).await;
                                    200
                                }
                                "/flaky" => {
                                    let mut failures = me.flaky_failures.lock().unwrap();
                                    if *failures < 3 {
                                        *failures += 1;
                                        500
                                    } else {
                                        200
                                    }
                                }
                                _ => 204,
                            };
                            if status < 300 {
                                me.got.lock().unwrap().push((path, headers, body));
                            }
                            let mut response =
                                hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(format!("http://{addr}"))
    }

    /// What `path` received, in order.
    fn received(&self, path: &str) -> Vec<(hyper::HeaderMap, Bytes)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, h, b)| (h.clone(), b.clone()))
            .collect()
    }
}

/// `PUT /api/webhooks/{id}` with `body`, waiting out the 503 of a tier still reading the
/// registrations.
async fn put_webhook(
    base: &str,
    auth: &[(&str, &str)],
    id: &str,
    body: &serde_json::Value,
) -> Result<(u16, serde_json::Value)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut headers = auth.to_vec();
        headers.push(("content-type", "application/json"));
        let (status, _, answer) = call(
            &client(),
            "PUT",
            &format!("{base}/api/webhooks/{id}"),
            &headers,
            serde_json::to_vec(body)?,
        )
        .await?;
        if status != 503 || Instant::now() > deadline {
            return Ok((status, answer));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn register(base: &str, auth: (&str, &str), id: &str, url: &str) -> Result<WebhookSecret> {
    let (status, body) = put_webhook(base, &[auth], id, &serde_json::json!({ "url": url })).await?;
    assert_eq!(status, 201, "{body}");
    assert!(body.get("secrets").is_some() && body["url"] == url);
    Ok(WebhookSecret::parse(
        body["secret"].as_str().context("secret shown once")?,
    )?)
}

/// The delivery ids whose `Completed` notification `path` got, each verified.
fn check_signed(
    got: &[(hyper::HeaderMap, Bytes)],
    secret: &WebhookSecret,
) -> BTreeMap<String, Vec<String>> {
    let mut by_delivery: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let now = chrono::Utc::now().timestamp();
    for (headers, body) in got {
        let id = headers["webhook-id"].to_str().unwrap();
        let ts: i64 = headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let signature = headers["webhook-signature"].to_str().unwrap();
        assert!(
            verify_webhook(secret, id, ts, body, signature, now, 600),
            "signature of {id} verifies"
        );
        let payload: serde_json::Value = serde_json::from_slice(body).unwrap();
        let data = &payload["data"];
        assert_eq!(
            format!(
                "{}.{}",
                data["deliveryId"].as_str().unwrap(),
                data["version"]
            ),
            id
        );
        if payload["type"] == "delivery.stage" {
            if data["stage"] == "HeadedToPickup" {
                // The first notification after the assignment: the drone, both ETAs.
                for field in ["droneId", "pickupETA", "deliveryETA"] {
                    assert!(data.get(field).is_some(), "{field} in {data}");
                }
            }
            by_delivery
                .entry(data["deliveryId"].as_str().unwrap().to_owned())
                .or_default()
                .push(data["stage"].as_str().unwrap().to_owned());
        }
    }
    by_delivery
}

async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() > deadline {
            bail!("{what}: not in {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flown_delivery_streams_notifies_and_tracks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (binary, base) = start(dir.path(), &["--sse-max-subscribers-per-tenant", "3"])?;
    let receiver = Receiver::default();
    let hooks = receiver.clone().start().await?;
    let old_secret = register(&base, CONTOSO, "ok", &format!("{hooks}/ok")).await?;
    // Rotation: a new secret, shown once; the old one signs beside it for a while.
    let (status, rotated) = put_webhook(
        &base,
        &[CONTOSO],
        "ok",
        &serde_json::json!({ "url": format!("{hooks}/ok"), "rotateSecret": true }),
    )
    .await?;
    assert_eq!(status, 200, "{rotated}");
    let ok_secret = WebhookSecret::parse(rotated["secret"].as_str().context("new secret")?)?;
    assert_ne!(ok_secret, old_secret);
    assert_eq!(
        rotated["secrets"].as_array().map(Vec::len),
        Some(2),
        "{rotated}"
    );
    let flaky_secret = register(&base, CONTOSO, "flaky", &format!("{hooks}/flaky")).await?;
    register(&base, FABRIKAM, "hang", &format!("{hooks}/hang")).await?;
    let (status, _, list) = call(
        &client(),
        "GET",
        &format!("{base}/api/webhooks"),
        &[CONTOSO],
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        list["webhooks"].as_array().unwrap().len(),
        2,
        "a tenant sees its own: {list}"
    );
    assert!(!list.to_string().contains("whsec_"), "never a secret again");

    // A delivery of each tenant.
    let (status, _, accepted) = post_raw(
        &client(),
        &format!("{base}/api/deliveryrequests"),
        &[CONTOSO],
        serde_json::to_vec(&request("contoso", "live-1"))?,
    )
    .await?;
    assert_eq!(status, 202, "{accepted}");
    let tracking = accepted["trackingUrl"]
        .as_str()
        .context("trackingUrl")?
        .to_owned();
    assert!(tracking.starts_with("/track/"));
    let (status, _, report) = post_raw(
        &client(),
        &format!("{base}/api/deliveryrequests/batch"),
        &[FABRIKAM],
        serde_json::to_vec(&vec![request("fabrikam", "live-2")])?,
    )
    .await?;
    assert_eq!(status, 202, "{report}");
    assert!(
        report["results"][0]["trackingUrl"]
            .as_str()
            .unwrap()
            .starts_with("/track/")
    );

    // The stream: a few events, then a reconnect after the last id seen.
    let url = format!("{base}/api/deliveries/live-1/events");
    let (_, first) = Stream::open(&url, &[CONTOSO]).await?;
    let mut first = first.context("stream")?;
    let mut events = Vec::new();
    for _ in 0..2 {
        events.push(first.next(SETTLE).await?.context("event")?);
    }
    drop(first);
    let last = events.last().unwrap().id.unwrap().to_string();
    let (_, second) = Stream::open(&url, &[CONTOSO, ("last-event-id", &last)]).await?;
    second
        .context("resumed")?
        .until_completed(&mut events)
        .await?;
    let ids: Vec<u64> = events.iter().map(|e| e.id.unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice: {ids:?}"
    );
    assert_eq!(
        stages(&events),
        ["Created", "HeadedToPickup", "HeadedToDropoff", "Completed"]
    );
    assert!(
        events.iter().any(|e| e.kind == "position"),
        "positions stream too"
    );
    // A new stream replays what it keeps, in order: every stage of it.
    let (_, replay) = Stream::open(&url, &[CONTOSO]).await?;
    let mut replayed = Vec::new();
    replay
        .context("replay")?
        .until_completed(&mut replayed)
        .await?;
    assert_eq!(stages(&replayed), stages(&events));
    // The stream ended after Completed; resuming after it: 204, no more reconnects.
    let end = replayed.last().unwrap().id.unwrap().to_string();
    let (status, _) = Stream::open(&url, &[CONTOSO, ("last-event-id", &end)]).await?;
    assert_eq!(status, 204, "a finished delivery has nothing more");
    let assigned = replayed
        .iter()
        .find(|e| e.data["stage"] == "HeadedToPickup")
        .unwrap();
    for field in ["droneId", "pickupETA", "deliveryETA"] {
        assert!(assigned.data.get(field).is_some(), "{field} on assignment");
    }

    // Another tenant's delivery is not found; the subscriber bound holds.
    let (status, _) =
        Stream::open(&format!("{base}/api/deliveries/live-2/events"), &[CONTOSO]).await?;
    assert_eq!(status, 404);
    let mut held = Vec::new();
    for _ in 0..3 {
        let (status, stream) =
            Stream::open(&format!("{base}/api/deliveries/events"), &[CONTOSO]).await?;
        assert_eq!(status, 200);
        held.push(stream);
    }
    let (status, _) = Stream::open(&format!("{base}/api/deliveries/events"), &[CONTOSO]).await?;
    assert_eq!(status, 429, "past the tenant's bound");
    let (status, _) = Stream::open(&format!("{base}/api/deliveries/events"), &[FABRIKAM]).await?;
    assert_eq!(status, 200, "another tenant still has room");
    drop(held);

    // Webhooks: every stage to both of contoso's endpoints, signed; the flaky one got
    // them after its failures; fabrikam's endpoint that never answers ends in
    // dead-letters and delayed nobody.
    eventually("webhooks", SETTLE, || {
        check_signed(&receiver.received("/ok"), &ok_secret)
            .get("live-1")
            .is_some_and(|s| s.contains(&"Completed".to_owned()))
            && check_signed(&receiver.received("/flaky"), &flaky_secret)
                .get("live-1")
                .is_some_and(|s| s.contains(&"Completed".to_owned()))
    })
    .await?;
    // Signed with both of the rotated endpoint's secrets.
    check_signed(&receiver.received("/ok"), &old_secret);
    for (path, secret) in [("/ok", &ok_secret), ("/flaky", &flaky_secret)] {
        let mut got = check_signed(&receiver.received(path), secret);
        let mut stages = got.remove("live-1").unwrap();
        stages.dedup();
        assert_eq!(
            stages,
            ["Created", "HeadedToPickup", "HeadedToDropoff", "Completed"],
            "{path}"
        );
        assert!(got.is_empty(), "{path} got only its tenant's: {got:?}");
    }
    assert!(receiver.received("/hang").is_empty());
    let dead = "SELECT count(*) AS n FROM dead_letters WHERE reason LIKE 'webhook not delivered%'";
    let sql = |query: &str| serde_json::to_vec(&serde_json::json!({ "sql": query })).unwrap();
    let deadline = Instant::now() + SETTLE;
    loop {
        let analyst = ("authorization", "Bearer key-analysts-0123456789");
        let (status, _, body) = call(
            &client(),
            "POST",
            &format!("{base}/api/sql"),
            &[analyst, ("content-type", "application/json")],
            sql(dead),
        )
        .await?;
        if status == 200 && body[0]["n"].as_i64().unwrap_or(0) > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("no dead letter of the endpoint that never answers: {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Tracking links: the page, the state; tampered, wrong-tenant and expired tokens.
    let (status, headers, page) = call_bytes(
        &client(),
        "GET",
        &format!("{base}{tracking}"),
        &[],
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str()?.starts_with("text/html"));
    assert!(headers.contains_key("content-security-policy"));
    assert!(std::str::from_utf8(&page)?.contains("assets/track.js"));
    let (status, _, state) = call(
        &client(),
        "GET",
        &format!("{base}{tracking}/state"),
        &[],
        Vec::new(),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(state["deliveryId"], "live-1");
    let mut tampered = tracking.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let key = TrackingKey::new(SECRET.as_bytes().to_vec())?;
    let far = chrono::Utc::now().timestamp() + 3_600;
    let wrong_tenant = format!("/track/{}", key.token("fabrikam", "live-1", far)?);
    let expired = format!(
        "/track/{}",
        key.token("contoso", "live-1", chrono::Utc::now().timestamp() - 1)?
    );
    let other_key = TrackingKey::new(b"another-secret-another-secret-another".to_vec())?;
    let forged = format!("/track/{}", other_key.token("contoso", "live-1", far)?);
    for (path, want) in [
        (&tampered, 404),
        (&wrong_tenant, 404),
        (&forged, 404),
        (&expired, 410),
    ] {
        for what in ["/state", "/events"] {
            let (status, _, _) = call(
                &client(),
                "GET",
                &format!("{base}{path}{what}"),
                &[],
                Vec::new(),
            )
            .await?;
            assert_eq!(status, want, "{path}{what}");
        }
    }

    // The page in a real browser, on a delivery flown from now on.
    browser_sees_a_delivery_fly(&base).await?;

    let status = binary.terminate(Signal::Term, SETTLE)?;
    assert!(status.success(), "run exited with {status}");
    Ok(())
}

/// Posts a delivery and runs `tests/browser/track.mjs` on its tracking page: the stage
/// must reach `Completed` and the drone marker move. The screenshot is kept in the test
/// target's temporary folder.
async fn browser_sees_a_delivery_fly(base: &str) -> Result<()> {
    let browser = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !browser.join("node_modules/playwright-core").exists() {
        let installed = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&browser)
            .status()
            .context("npm (Node.js) is needed for the browser test")?;
        assert!(installed.success(), "npm ci in tests/browser");
    }
    let (status, _, accepted) = post_raw(
        &client(),
        &format!("{base}/api/deliveryrequests"),
        &[CONTOSO],
        serde_json::to_vec(&request("contoso", "live-browser"))?,
    )
    .await?;
    assert_eq!(status, 202, "{accepted}");
    let url = format!(
        "{base}{}",
        accepted["trackingUrl"].as_str().context("trackingUrl")?
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("track-page.png");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(browser.join("track.mjs"))
            .arg(&url)
            .arg(&shot)
            .arg("90000")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap_or("{}"))?;
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["markerMoves"].as_u64().unwrap_or(0) > 0, "{result}");
    assert_eq!(
        result["stages"].as_array().unwrap().last().unwrap(),
        "Completed"
    );
    Ok(())
}

/// Without the operator's flag, webhooks to non-public addresses are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_private_addresses_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let binary = Launch::new("run-private")
        .args(["run", "--listen", "127.0.0.1:0", "--flight-listen", "off"])
        .arg("--data")
        .arg(dir.path().join("history"))
        .start(&[announce::API])?;
    let base = format!("http://{}", binary.announced(announce::API)?);
    for url in [
        "http://127.0.0.1:9/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://localhost:8080/hook",
        "http://[::ffff:127.0.0.1]/",
        "ftp://example.com/hook",
    ] {
        let (status, body) =
            put_webhook(&base, &[], "w", &serde_json::json!({ "url": url })).await?;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["field"], "url", "{body}");
    }
    let (status, _, list) = call(
        &client(),
        "GET",
        &format!("{base}/api/webhooks"),
        &[],
        Vec::new(),
    )
    .await?;
    assert_eq!(
        (status, list["webhooks"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    binary.stop(SETTLE)?;
    Ok(())
}
