//! Who is calling and how much they may send: per-tenant API keys and rate limits.
//!
//! Keys come from a file of `tenant:key[:records_per_second]` lines; only their SHA-256
//! digests are kept. A presented key is hashed, the candidates sharing the first 8 bytes
//! of its digest are found in a map, and each candidate's whole digest is compared in
//! constant time. The map lookup can only reveal digest prefixes, which say nothing about
//! the key; the comparison that decides takes the same time however close a guess was.
//!
//! Without a key file, clients on loopback are the tenant `default` and everyone else is
//! refused: a development mode that cannot be left open by accident. A request that says
//! a proxy forwarded it ([`schemas::FORWARDING_HEADERS`]) is not from loopback, whatever its
//! connection's peer: behind a local reverse proxy, every client would look local.
//!
//! Rate limits are token buckets counted in records (a batch of 1,000 takes 1,000). The
//! bucket logic ([`Bucket`]) is pure and takes the time as an argument.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{IngestError, Result};
use crate::keyfile::MAX_KEY_FILE_BYTES;
pub use crate::keyfile::{KeyLine, MAX_KEY_LEN, MIN_KEY_LEN, MIN_RATE, parse_api_keys};
/// Where a call comes from: its connection's peer, and whether the request says a proxy
/// forwarded it (then the peer is the proxy, and the client is somewhere else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The peer of the connection.
    pub peer: SocketAddr,
    /// Whether the request carries one of [`schemas::FORWARDING_HEADERS`].
    pub forwarded: bool,
}

impl Origin {
    /// The origin of a request from `peer` whose headers include `has(name)` for each
    /// name that is present.
    pub fn of(peer: SocketAddr, has: impl Fn(&str) -> bool) -> Self {
        Self {
            peer,
            forwarded: schemas::FORWARDING_HEADERS.iter().any(|name| has(name)),
        }
    }

    /// A client on this machine: a loopback peer not forwarding for someone else.
    pub fn is_local(&self) -> bool {
        self.peer.ip().to_canonical().is_loopback() && !self.forwarded
    }
}

/// A token bucket counted in records. Pure: the caller passes the time.
///
/// A request of `n` records is admitted when the bucket holds `n` tokens, or when it is
/// full: a batch larger than the burst is let through and leaves the bucket in debt, so
/// it is never refused forever and the long-run rate still holds.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket refilled at `rate` per second up to `burst`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes `n` tokens, or says how long to wait until they would be there.
    pub fn try_take(&mut self, n: f64, now: Instant) -> std::result::Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
        let needed = n.min(self.burst);
        if self.tokens >= needed {
            self.tokens -= n;
            Ok(())
        } else {
            let wait = (needed - self.tokens) / self.rate;
            // Rounded up a little so that retrying after the wait is admitted.
            Err(Duration::try_from_secs_f64(wait * 1.000_001 + 1e-6).unwrap_or(Duration::MAX))
        }
    }
}

/// One tenant: its name, rate limit and metric handles.
#[derive(Debug)]
pub(crate) struct Tenant {
    pub(crate) name: Arc<str>,
    /// The loopback clients of a tier without keys.
    unauthenticated: bool,
    /// Whether it may post drone telemetry.
    pub(crate) telemetry: bool,
    limiter: Option<Mutex<Bucket>>,
    /// What it may hold of the shared budgets; none for the only tenant of a tier
    /// without keys.
    pub(crate) share: Option<Share>,
    pub(crate) accepted: metrics::Counter,
    pub(crate) rejected_invalid: metrics::Counter,
    pub(crate) rejected_unavailable: metrics::Counter,
    pub(crate) rate_limited: metrics::Counter,
    pub(crate) bytes: metrics::Counter,
}

/// What one tenant may hold at once of the tier's shared budgets
/// (`--tenant-share-percent` of `--max-in-flight` and of `--max-in-flight-bytes`), so that
/// a tenant sending much at once leaves room for the others.
#[derive(Debug)]
pub(crate) struct Share {
    /// Its requests in flight.
    pub(crate) in_flight: Arc<tokio::sync::Semaphore>,
    /// Its body bytes held, one permit per byte.
    pub(crate) body_bytes: Arc<tokio::sync::Semaphore>,
}

impl Share {
    fn new((in_flight, body_bytes): (usize, usize)) -> Self {
        let permits = |n: usize| n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            in_flight: Arc::new(tokio::sync::Semaphore::new(permits(in_flight))),
            body_bytes: Arc::new(tokio::sync::Semaphore::new(permits(body_bytes))),
        }
    }
}

impl Tenant {
    pub(crate) fn new(
        name: &str,
        rate: Option<f64>,
        burst: f64,
        telemetry: bool,
        share: Option<(usize, usize)>,
    ) -> Self {
        let label = name.to_owned();
        let limiter = rate.map(|rate| {
            let burst = if burst > 0.0 { burst } else { rate };
            Mutex::new(Bucket::new(rate, burst, Instant::now()))
        });
        Self {
            name: name.into(),
            unauthenticated: false,
            telemetry,
            limiter,
            share: share.map(Share::new),
            accepted: metrics::counter!("ingest_records_accepted_total", "tenant" => label.clone()),
            rejected_invalid: metrics::counter!(
                "ingest_records_rejected_total", "tenant" => label.clone(), "reason" => "invalid"
            ),
            rejected_unavailable: metrics::counter!(
                "ingest_records_rejected_total", "tenant" => label.clone(), "reason" => "unavailable"
            ),
            rate_limited: metrics::counter!("ingest_rate_limited_total", "tenant" => label.clone()),
            bytes: metrics::counter!("ingest_received_bytes_total", "tenant" => label),
        }
    }

    /// Whether this is the unauthenticated loopback tenant of a tier without keys.
    pub(crate) fn is_unauthenticated(&self) -> bool {
        self.unauthenticated
    }

    /// Takes `records` from the tenant's quota, or answers 429 with when to retry.
    pub(crate) fn take(&self, records: usize) -> Result<()> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let taken = limiter
            .lock()
            .map_err(|_| IngestError::Internal {
                reason: "rate limiter lock poisoned".into(),
            })?
            .try_take(records as f64, Instant::now());
        taken.map_err(|wait| {
            self.rate_limited.increment(1);
            IngestError::RateLimited {
                tenant: self.name.to_string(),
                retry_after: wait,
            }
        })
    }
}

/// Settings that apply to every tenant.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    /// Records per second for tenants without their own rate; 0 for no limit.
    pub(crate) rate: f64,
    /// Bucket size in records; 0 for one second's worth.
    pub(crate) burst: f64,
    /// The fleet tenants, which may post drone telemetry (`*`: every tenant); none when
    /// empty.
    pub(crate) telemetry_tenants: Vec<String>,
    /// What each tenant of the key file may hold at once: requests in flight and body
    /// bytes; none for no share.
    pub(crate) share: Option<(usize, usize)>,
}

impl Limits {
    fn telemetry(&self, tenant: &str) -> bool {
        self.telemetry_tenants
            .iter()
            .any(|t| t == "*" || t == tenant)
    }
}

/// Every tenant the tier knows, and how to tell which one is calling.
#[derive(Debug)]
pub(crate) struct Tenants {
    /// The first 8 bytes of each key's SHA-256 digest to the whole digests sharing them
    /// and their tenants' indexes.
    by_digest: HashMap<u64, Vec<([u8; 32], usize)>>,
    tenants: Vec<Tenant>,
    /// Without keys: loopback clients are the default tenant.
    open: bool,
}

impl Tenants {
    /// Reads the key file, or sets up the loopback-only default tenant without one.
    pub(crate) fn load(path: Option<&Path>, limits: &Limits) -> Result<Self> {
        let default_rate = (limits.rate > 0.0).then_some(limits.rate);
        let Some(path) = path else {
            let mut tenant = Tenant::new(
                schemas::DEFAULT_TENANT,
                default_rate,
                limits.burst,
                true,
                None,
            );
            tenant.unauthenticated = true;
            return Ok(Self {
                by_digest: HashMap::new(),
                tenants: vec![tenant],
                open: true,
            });
        };
        let config_err = |reason: String| IngestError::Config {
            reason: format!("API key file {}: {reason}", path.display()),
        };
        let meta = std::fs::metadata(path).map_err(|e| config_err(e.to_string()))?;
        if meta.len() > MAX_KEY_FILE_BYTES {
            return Err(config_err(format!(
                "larger than {MAX_KEY_FILE_BYTES} bytes"
            )));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o004 != 0 {
                tracing::warn!(path = %path.display(), "the API key file is readable by every user of this machine");
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| config_err(e.to_string()))?;
        let lines = parse_api_keys(&text).map_err(config_err)?;
        Ok(Self::from_lines(&lines, limits))
    }

    pub(crate) fn from_lines(lines: &[KeyLine<'_>], limits: &Limits) -> Self {
        let own_rates: HashMap<&str, f64> = lines
            .iter()
            .filter_map(|l| Some((l.tenant, l.rate?)))
            .collect();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut tenants = Vec::new();
        let mut by_digest: HashMap<u64, Vec<([u8; 32], usize)>> = HashMap::new();
        for line in lines {
            let i = *index.entry(line.tenant).or_insert_with(|| {
                let rate = own_rates
                    .get(line.tenant)
                    .copied()
                    .or((limits.rate > 0.0).then_some(limits.rate));
                let telemetry = limits.telemetry(line.tenant);
                tenants.push(Tenant::new(
                    line.tenant,
                    rate,
                    limits.burst,
                    telemetry,
                    limits.share,
                ));
                tenants.len() - 1
            });
            let digest = digest(line.key);
            by_digest
                .entry(prefix(&digest))
                .or_default()
                .push((digest, i));
        }
        Self {
            by_digest,
            tenants,
            open: false,
        }
    }

    /// Whether requests are taken without keys (from loopback only).
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// How many tenants there are.
    pub(crate) fn len(&self) -> usize {
        self.tenants.len()
    }

    /// How many of them may post drone telemetry.
    pub(crate) fn fleet_tenants(&self) -> usize {
        self.tenants.iter().filter(|t| t.telemetry).count()
    }

    /// The tenant calling with `authorization` from `origin`, or 401.
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        origin: Origin,
    ) -> Result<&Tenant> {
        let unauthorized = |reason: &str| IngestError::Unauthorized {
            reason: reason.to_owned(),
        };
        if self.open {
            return if origin.is_local() {
                self.tenants
                    .first()
                    .ok_or_else(|| unauthorized("no tenant"))
            } else if origin.forwarded {
                Err(unauthorized(
                    "this server has no API keys configured and serves loopback clients only; \
                     a request forwarded by a proxy (Forwarded, X-Forwarded-For, \
                     X-Forwarded-Host or X-Real-IP) is not one: give the server --api-keys",
                ))
            } else {
                Err(unauthorized(
                    "this server has no API keys configured and serves loopback clients only",
                ))
            };
        }
        let Some(value) = authorization else {
            return Err(unauthorized("send Authorization: Bearer <API key>"));
        };
        let token = bearer_token(value)
            .ok_or_else(|| unauthorized("the Authorization header is not Bearer <API key>"))?;
        let presented = digest(token);
        let mut found = None;
        for (known, i) in self
            .by_digest
            .get(&prefix(&presented))
            .into_iter()
            .flatten()
        {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(*i);
            }
        }
        found
            .and_then(|i| self.tenants.get(i))
            .ok_or_else(|| unauthorized("unknown API key"))
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn prefix(digest: &[u8; 32]) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(head)
}

/// The token of `Bearer <token>` (scheme case-insensitive), if the value has that form.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_KEY_LEN)
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbb";
    const KEY_A2: &str = "cccccccccccccccccccc";

    fn peer(ip: [u8; 4]) -> Origin {
        Origin {
            peer: SocketAddr::from((ip, 40000)),
            forwarded: false,
        }
    }

    #[test]
    fn only_fleet_tenants_post_telemetry_and_star_lets_everyone() {
        let text = format!("fabrikam:{KEY_A}\nfleet:{KEY_B}\n");
        let lines = parse_api_keys(&text).unwrap();
        let fleet = |telemetry_tenants: &[&str]| {
            let tenants = Tenants::from_lines(
                &lines,
                &Limits {
                    telemetry_tenants: telemetry_tenants.iter().map(|t| (*t).to_owned()).collect(),
                    ..Limits::default()
                },
            );
            let may = |key: &str| {
                tenants
                    .authenticate(
                        Some(format!("Bearer {key}").as_bytes()),
                        peer([10, 0, 0, 1]),
                    )
                    .unwrap()
                    .telemetry
            };
            (may(KEY_A), may(KEY_B), tenants.fleet_tenants())
        };
        assert_eq!(fleet(&["fleet"]), (false, true, 1), "the default");
        assert_eq!(fleet(&[]), (false, false, 0), "none");
        assert_eq!(fleet(&["*"]), (true, true, 2), "every tenant");
    }

    #[test]
    fn keys_authenticate_their_tenant_and_nothing_else() {
        let text = format!("fabrikam:{KEY_A}\ncontoso:{KEY_B}\nfabrikam:{KEY_A2}\n");
        let tenants = Tenants::from_lines(
            &parse_api_keys(&text).unwrap(),
            &Limits {
                telemetry_tenants: vec!["contoso".into()],
                ..Limits::default()
            },
        );
        assert_eq!(tenants.len(), 2);
        let remote = peer([10, 0, 0, 1]);
        let who = |value: &str| {
            tenants
                .authenticate(Some(value.as_bytes()), remote)
                .map(|t| t.name.to_string())
        };
        assert_eq!(who(&format!("Bearer {KEY_A}")).unwrap(), "fabrikam");
        assert_eq!(who(&format!("bearer  {KEY_A2} ")).unwrap(), "fabrikam");
        assert_eq!(who(&format!("Bearer {KEY_B}")).unwrap(), "contoso");
        let telemetry = |key: &str| {
            tenants
                .authenticate(Some(format!("Bearer {key}").as_bytes()), remote)
                .unwrap()
                .telemetry
        };
        assert!(
            telemetry(KEY_B) && !telemetry(KEY_A),
            "only the listed tenants"
        );
        assert!(
            !tenants
                .authenticate(Some(format!("Bearer {KEY_A}").as_bytes()), remote)
                .unwrap()
                .is_unauthenticated()
        );
        for bad in [
            "Bearer dddddddddddddddddddd".to_owned(),
            format!("Basic {KEY_A}"),
            KEY_A.to_owned(),
            "Bearer ".to_owned(),
            format!("Bearer {}", &KEY_A[1..]),
        ] {
            let e = who(&bad).unwrap_err();
            assert_eq!(e.status(), hyper::StatusCode::UNAUTHORIZED, "{bad}");
        }
        let e = tenants.authenticate(None, remote).unwrap_err();
        assert_eq!(e.status(), hyper::StatusCode::UNAUTHORIZED);
        // Keys are required on loopback too.
        assert!(tenants.authenticate(None, peer([127, 0, 0, 1])).is_err());
    }

    #[test]
    fn without_keys_only_loopback_clients_get_in_as_default() {
        let tenants = Tenants::load(None, &Limits::default()).unwrap();
        assert!(tenants.is_open());
        let t = tenants.authenticate(None, peer([127, 0, 0, 1])).unwrap();
        assert!(t.is_unauthenticated());
        assert_eq!(&*t.name, schemas::DEFAULT_TENANT);
        let v6 = Origin {
            peer: SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 1)),
            forwarded: false,
        };
        assert!(tenants.authenticate(None, v6).is_ok());
        // A local proxy forwarding for someone else is not a local client.
        for header in schemas::FORWARDING_HEADERS {
            let proxied = Origin::of(v6.peer, |name| name == header);
            assert!(proxied.forwarded, "{header}");
            let e = tenants.authenticate(None, proxied).unwrap_err();
            assert!(
                e.to_string().contains("forwarded by a proxy"),
                "{header}: {e}"
            );
        }
        let e = tenants
            .authenticate(Some(b"Bearer whatever-key-at-all"), peer([192, 168, 1, 2]))
            .unwrap_err();
        assert!(e.to_string().contains("loopback"));
    }

    #[test]
    fn a_bucket_admits_its_burst_then_paces_and_says_when() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100.0, 10.0, t0);
        for _ in 0..10 {
            b.try_take(1.0, t0).unwrap();
        }
        let wait = b.try_take(1.0, t0).unwrap_err();
        assert!(wait > Duration::from_millis(9) && wait < Duration::from_millis(11));
        b.try_take(1.0, t0 + wait).unwrap();
        // A batch larger than the burst goes through when the bucket is full, then the
        // debt is paid before anything else is admitted.
        let t1 = t0 + Duration::from_secs(10);
        b.try_take(50.0, t1).unwrap();
        let wait = b.try_take(1.0, t1).unwrap_err();
        assert!(wait >= Duration::from_millis(400), "{wait:?}");
        // A wait too long for a Duration is the longest one, not a panic.
        let mut tiny = Bucket::new(1e-300, 1.0, t0);
        tiny.try_take(1.0, t0).unwrap();
        assert_eq!(tiny.try_take(1.0, t0).unwrap_err(), Duration::MAX);
    }

    proptest! {
        /// Over any run, admitted records never exceed the burst plus the rate times the
        /// time elapsed plus one oversized request; and waiting the answered time always
        /// gets the same request in.
        #[test]
        fn a_bucket_holds_its_rate(
            rate in 1.0f64..10_000.0,
            burst in 1.0f64..10_000.0,
            steps in proptest::collection::vec((0u64..50_000, 1u32..20_000), 1..200),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = Bucket::new(rate, burst, t0);
            let mut admitted = 0.0;
            let mut largest: f64 = 0.0;
            for (micros, n) in steps {
                now += Duration::from_micros(micros);
                let n = f64::from(n);
                match b.try_take(n, now) {
                    Ok(()) => admitted += n,
                    Err(wait) => {
                        prop_assert!(b.try_take(n, now + wait).is_ok());
                        now += wait;
                        admitted += n;
                    }
                }
                largest = largest.max(n);
                let elapsed = now.duration_since(t0).as_secs_f64();
                prop_assert!(admitted <= burst.max(1.0) + rate * elapsed + largest + 1e-6);
            }
        }
    }
}
