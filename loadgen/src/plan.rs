//! The pure parts of a load run: durations, bodies, pacing, targets and answers.
//! No I/O and no clock.

use std::io::Write as _;
use std::time::Duration;

use schemas::generate::Generator;

/// How a batch is framed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// `[ {..}, {..} ]` as `application/json`.
    Json,
    /// One object per line as `application/x-ndjson`.
    Ndjson,
}

impl Framing {
    /// The `Content-Type` of a body so framed.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Ndjson => "application/x-ndjson",
        }
    }
}

/// Body compression.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// As is.
    None,
    /// `Content-Encoding: gzip`.
    Gzip,
    /// `Content-Encoding: zstd`.
    Zstd,
}

impl Compression {
    /// The `Content-Encoding` header value, if any.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Gzip => Some("gzip"),
            Self::Zstd => Some("zstd"),
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` or a bare number of seconds (fractions allowed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 5s or 2m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || !(0.0..=86_400.0 * 7.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range (0 to 7 days)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// What a call posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Delivery requests.
    Deliveries,
    /// Drone position fixes.
    Telemetry,
}

/// One prepared call: its path, tenant index, body (framed and compressed) and the
/// number of records in it.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// What it posts.
    pub kind: Kind,
    /// The request path.
    pub path: String,
    /// Index of the tenant sending it.
    pub tenant: usize,
    /// The body as sent.
    pub body: bytes::Bytes,
    /// Records in the body.
    pub records: u32,
    /// One delivery request on its own (never compressed: the single-request route
    /// takes plain JSON).
    pub single: bool,
}

/// Generates `calls` bodies of `batch_size` records each, the share `telemetry_percent`
/// of them telemetry, for `tenants` named tenants. Telemetry goes as the tenant
/// [`FLEET_TENANT`] when it is one of them (the tier refuses telemetry from business
/// tenants' keys). Deterministic in `seed`.
pub fn prepare(
    seed: u64,
    tenants: &[String],
    batch_size: u32,
    calls: usize,
    telemetry_percent: u8,
    framing: Framing,
    compression: Compression,
) -> Vec<Prepared> {
    let mut generator = Generator::new(seed, tenants.len());
    let mut out = Vec::with_capacity(calls);
    let mut record = String::with_capacity(512);
    let fleet = tenants.iter().position(|t| t == FLEET_TENANT);
    for _ in 0..calls {
        let tenant = (generator.next_u64() % tenants.len().max(1) as u64) as usize;
        let telemetry = (generator.next_u64() % 100) < u64::from(telemetry_percent);
        let tenant = match fleet {
            Some(fleet) if telemetry => fleet,
            _ => tenant,
        };
        let mut raw = Vec::with_capacity(batch_size as usize * 400 + 2);
        let single = batch_size == 1 && !telemetry;
        if framing == Framing::Json && !single {
            raw.push(b'[');
        }
        let drone = generator.next_u64() % 10_000;
        for i in 0..batch_size {
            record.clear();
            if telemetry {
                fix_into(&mut generator, i, &mut record);
            } else {
                let name = tenants.get(tenant).map_or("tenant-0", String::as_str);
                generator.request_into(name, &mut record);
            }
            if i > 0 && !single {
                raw.push(if framing == Framing::Json {
                    b','
                } else {
                    b'\n'
                });
            }
            raw.extend_from_slice(record.as_bytes());
        }
        if !single {
            raw.push(if framing == Framing::Json {
                b']'
            } else {
                b'\n'
            });
        }
        let (kind, path) = if telemetry {
            (
                Kind::Telemetry,
                format!("/api/drones/drone-{drone}/telemetry"),
            )
        } else if single {
            (Kind::Deliveries, "/api/deliveryrequests".to_owned())
        } else {
            (Kind::Deliveries, "/api/deliveryrequests/batch".to_owned())
        };
        out.push(Prepared {
            kind,
            path,
            tenant,
            body: if single {
                raw.into()
            } else {
                compress(raw, compression).into()
            },
            records: batch_size,
            single,
        });
    }
    out
}

/// The tenant whose key posts telemetry, when the key file has it: the tier's default
/// fleet tenant (`--telemetry-tenants`).
pub const FLEET_TENANT: &str = "fleet";

/// One plausible position fix, `i` seconds into a flight.
fn fix_into(generator: &mut Generator, i: u32, out: &mut String) {
    use std::fmt::Write as _;
    let latitude = 47.5 + generator.next_f64() * 0.2;
    let longitude = -122.4 + generator.next_f64() * 0.2;
    // 2026-11-24T00:00:00Z plus a few hours.
    let at = 1_795_478_400 + i64::from(i) + (generator.next_u64() % 36_000) as i64;
    let timestamp = chrono::DateTime::from_timestamp(at, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ");
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        r#"{{"latitude":{latitude:.5},"longitude":{longitude:.5},"timestamp":"{timestamp}","altitude":{:.1},"speed":{:.1},"heading":{:.1},"battery":{:.1}}}"#,
        60.0 + generator.next_f64() * 60.0,
        generator.next_f64() * 20.0,
        generator.next_f64() * 360.0,
        20.0 + generator.next_f64() * 80.0,
    );
}

/// `raw` compressed as asked.
pub fn compress(raw: Vec<u8>, compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => raw,
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            // Writing to a Vec cannot fail.
            let _ = encoder.write_all(&raw);
            encoder.finish().unwrap_or_default()
        }
        Compression::Zstd => zstd::bulk::compress(&raw, 3).unwrap_or_default(),
    }
}

/// How many distinct calls to prepare: enough for `distinct_records`, at least one, at
/// most 100,000 (connections share them, so memory does not grow with connections).
pub fn calls_to_prepare(distinct_records: u32, batch_size: u32) -> usize {
    let calls = distinct_records.div_ceil(batch_size.max(1)) as usize;
    calls.clamp(1, 100_000)
}

/// In open loop, the time call number `slot` is due, from the start: calls are spread
/// evenly at `records_per_sec / batch_size` calls per second.
pub fn due(slot: u64, records_per_sec: f64, batch_size: u32) -> Duration {
    let calls_per_sec = records_per_sec / f64::from(batch_size.max(1));
    Duration::try_from_secs_f64(slot as f64 / calls_per_sec).unwrap_or(Duration::MAX)
}

/// `host:port` and the `Host` header of an `http://` base URL.
pub fn authority(target: &str) -> Result<String, String> {
    let rest = target
        .strip_prefix("http://")
        .ok_or_else(|| format!("{target:?}: only http:// targets are supported"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{target:?} has no host"));
    }
    if authority.contains('@') {
        return Err(format!(
            "{target:?}: credentials in the URL are not supported"
        ));
    }
    if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.ends_with(']') && port.parse::<u16>().is_err())
    {
        return Err(format!("{target:?} has a bad port"));
    }
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    Ok(if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

/// The records of a call that the server accepted, rejected (invalid) and failed
/// (retryable), read from its answer. A single request's 202 is one accepted record; a
/// batch answer (202 or 207) names its counts.
pub fn outcome(status: u16, records: u32, single: bool, body: &[u8]) -> (u64, u64, u64) {
    #[derive(serde::Deserialize)]
    struct Counts {
        accepted: u64,
        #[serde(default)]
        rejected: u64,
        #[serde(default)]
        failed: u64,
    }
    let records = u64::from(records);
    match status {
        200..=299 if single => (records, 0, 0),
        200..=299 => match serde_json::from_slice::<Counts>(body) {
            Ok(c) => (c.accepted, c.rejected, c.failed),
            // A 2xx that does not say: count nothing as accepted.
            Err(_) => (0, 0, records),
        },
        400 | 413 | 415 | 422 => (0, records, 0),
        _ => (0, 0, records),
    }
}

/// The tenants and their keys from a `tenant:key[:rate]` file's text.
pub fn parse_keys(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split(':');
        match (parts.next(), parts.next()) {
            (Some(tenant), Some(key)) if !tenant.is_empty() && !key.is_empty() => {
                keys.push((tenant.trim().to_owned(), key.trim().to_owned()));
            }
            _ => return Err(format!("line {}: expected tenant:key", number + 1)),
        }
    }
    if keys.is_empty() {
        return Err("no tenant:key line".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn absurd_rates_do_not_overflow() {
        assert_eq!(due(1, 1e-300, 1), Duration::MAX);
        assert_eq!(due(0, 1.0, 1), Duration::ZERO);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1000h").is_err());
    }

    #[test]
    fn telemetry_goes_as_the_fleet_tenant_when_there_is_one() {
        let tenants = vec!["a".to_owned(), FLEET_TENANT.to_owned(), "b".to_owned()];
        let calls = prepare(7, &tenants, 2, 200, 50, Framing::Json, Compression::None);
        assert!(calls.iter().any(|c| c.kind == Kind::Telemetry));
        for call in &calls {
            if call.kind == Kind::Telemetry {
                assert_eq!(call.tenant, 1);
            }
        }
        assert!(
            calls
                .iter()
                .any(|c| c.kind == Kind::Deliveries && c.tenant != 1),
            "deliveries still spread over the tenants"
        );
    }

    #[test]
    fn bodies_are_valid_framed_and_reproducible() {
        let tenants = vec!["a".to_owned(), "b".to_owned()];
        for (framing, compression) in [
            (Framing::Json, Compression::None),
            (Framing::Ndjson, Compression::Gzip),
            (Framing::Json, Compression::Zstd),
        ] {
            let calls = prepare(3, &tenants, 5, 20, 30, framing, compression);
            let again = prepare(3, &tenants, 5, 20, 30, framing, compression);
            assert_eq!(calls.len(), 20);
            assert!(calls.iter().zip(&again).all(|(x, y)| x.body == y.body));
            assert!(calls.iter().any(|c| c.kind == Kind::Telemetry));
            for call in &calls {
                let raw = match compression {
                    Compression::None => call.body.to_vec(),
                    Compression::Gzip => {
                        let mut out = Vec::new();
                        std::io::Read::read_to_end(
                            &mut flate2::read::GzDecoder::new(&call.body[..]),
                            &mut out,
                        )
                        .unwrap_or_default();
                        out
                    }
                    Compression::Zstd => {
                        zstd::bulk::decompress(&call.body, 1 << 20).unwrap_or_default()
                    }
                };
                let records: Vec<serde_json::Value> = match framing {
                    Framing::Json => serde_json::from_slice(&raw).unwrap_or_default(),
                    Framing::Ndjson => raw
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .filter_map(|l| serde_json::from_slice(l).ok())
                        .collect(),
                };
                assert_eq!(records.len(), 5);
                for record in &records {
                    let text = record.to_string();
                    match call.kind {
                        Kind::Deliveries => {
                            let request = schemas::parse_delivery_request(text.as_bytes());
                            assert!(request.is_ok(), "{text}");
                            assert_eq!(record["ownerId"], tenants[call.tenant].as_str());
                        }
                        Kind::Telemetry => {
                            assert!(
                                schemas::telemetry::parse_position_fix(text.as_bytes()).is_ok(),
                                "{text}"
                            );
                            assert!(call.path.ends_with("/telemetry"));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn single_requests_are_bare_objects() {
        let calls = prepare(
            1,
            &["t".to_owned()],
            1,
            3,
            0,
            Framing::Json,
            Compression::None,
        );
        for call in calls {
            assert_eq!(call.path, "/api/deliveryrequests");
            assert!(schemas::parse_delivery_request(&call.body).is_ok());
        }
    }

    #[test]
    fn targets() {
        assert_eq!(
            authority("http://127.0.0.1:8080"),
            Ok("127.0.0.1:8080".into())
        );
        assert_eq!(authority("http://localhost/"), Ok("localhost:80".into()));
        assert_eq!(authority("http://[::1]:9000/x"), Ok("[::1]:9000".into()));
        assert!(authority("https://example.invalid").is_err());
        assert!(authority("http://").is_err());
        assert!(authority("http://h:port").is_err());
        assert!(authority("http://u:p@h:1").is_err());
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(202, 1, true, b""), (1, 0, 0));
        let answer = br#"{"accepted":7,"failed":1,"rejected":2,"results":[{"index":0}]}"#;
        assert_eq!(outcome(207, 10, false, answer), (7, 2, 1));
        assert_eq!(outcome(202, 10, false, b"not json"), (0, 0, 10));
        assert_eq!(outcome(400, 10, false, b""), (0, 10, 0));
        assert_eq!(outcome(503, 10, false, b""), (0, 0, 10));
        assert_eq!(outcome(429, 1, true, b""), (0, 0, 1));
    }

    #[test]
    fn keys() {
        let keys = parse_keys("# comment\nacme:k1\nglobex:k2:500\n\n");
        assert_eq!(
            keys,
            Ok(vec![
                ("acme".into(), "k1".into()),
                ("globex".into(), "k2".into())
            ])
        );
        assert!(parse_keys("nokey\n").is_err());
        assert!(parse_keys("# only\n").is_err());
    }

    proptest! {
        #[test]
        fn open_loop_is_evenly_paced(rate in 1.0f64..1e7, batch in 1u32..20_000, slot in 0u64..1_000_000) {
            let a = due(slot, rate, batch);
            let b = due(slot + 1, rate, batch);
            prop_assert!(b >= a);
            let gap = (b - a).as_secs_f64();
            let expected = f64::from(batch) / rate;
            prop_assert!((gap - expected).abs() <= expected * 1e-6 + 2e-9);
        }

        #[test]
        fn enough_calls_are_prepared(records in 1u32..10_000_000, batch in 1u32..100_000) {
            let calls = calls_to_prepare(records, batch);
            prop_assert!((1..=100_000).contains(&calls));
            prop_assert!(calls as u64 * u64::from(batch) >= u64::from(records).min(100_000 * u64::from(batch)));
        }
    }
}
