//! Webhook endpoints that tenants register to be told of their deliveries: the stored
//! registration, the rules for its id and URL, and the guard against endpoints that point
//! into the pipeline's own network.
//!
//! This module owns what a registration may hold and which targets are refused. It must
//! not resolve names, connect or read clocks: the sender resolves an endpoint's host, checks
//! every resolved address with [`is_forbidden_address`] and connects to a checked address
//! (never resolving again between the check and the connection), because DNS can point a
//! harmless-looking name anywhere, at any time.
//!
//! URLs are read by a small strict parser of its own rather than a general one, so that
//! what is checked is exactly what is connected to: only `http` and `https`, no user info,
//! no fragment, ASCII only, and host forms that different parsers read differently
//! (numeric hosts such as `2130706433`, `127.1` or `0x7f.1`) are refused as malformed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::delivery::{ValidationError, check_id, check_tenant};
use crate::signing::WebhookSecret;

/// The longest accepted webhook URL, in bytes.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// The longest accepted host name, in bytes.
const MAX_HOST_NAME_LEN: usize = 253;
/// The longest accepted label of a host name, in bytes.
const MAX_LABEL_LEN: usize = 63;

/// What an endpoint can subscribe to: the kinds of a delivery's changes.
pub use crate::tracking::EventKind;

/// A secret an endpoint's messages are signed with, and its lifetime. When a secret is
/// rotated, the old one is kept with an expiry and signs alongside the new one until then,
/// so the receiver can switch over without losing messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptSecret {
    /// The secret.
    pub secret: WebhookSecret,
    /// When it was made, in Unix milliseconds.
    pub created_at_ms: i64,
    /// When it stops signing, in Unix milliseconds; `None` while it is the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
}

impl KeptSecret {
    /// Whether it still signs at `now_ms`: it has no expiry, or `now_ms` is before it.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_none_or(|expiry| now_ms < expiry)
    }
}

/// A tenant's webhook endpoint, as stored. Deserializing does not check it: see
/// [`Registration::check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The endpoint's name, chosen by its tenant and unique within it: 1 to 64 characters
    /// of `A-Z a-z 0-9 - _ . :` (see [`check_webhook_id`]).
    pub id: String,
    /// The tenant whose deliveries it is told of.
    pub tenant: String,
    /// Where messages are posted: an `http` or `https` URL (see [`parse_webhook_url`]).
    pub url: String,
    /// What it subscribes to: not empty, no kind twice.
    pub events: Vec<EventKind>,
    /// Its secrets: the current one, and rotated-out ones until they expire.
    pub secrets: Vec<KeptSecret>,
    /// When it was registered, in Unix milliseconds.
    pub created_at_ms: i64,
    /// When it was last changed, in Unix milliseconds.
    pub updated_at_ms: i64,
}

impl Registration {
    /// The secrets that sign a message sent at `now_ms`: those not expired, newest first
    /// (ties keep their stored order).
    pub fn signing_secrets(&self, now_ms: i64) -> Vec<&WebhookSecret> {
        let mut live: Vec<&KeptSecret> =
            self.secrets.iter().filter(|s| s.is_live(now_ms)).collect();
        live.sort_by_key(|s| std::cmp::Reverse(s.created_at_ms));
        live.into_iter().map(|s| &s.secret).collect()
    }

    /// Whether it subscribes to `kind`.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }

    /// Checks the rules a stored registration keeps: its id and tenant, its URL (which must
    /// parse and must not name a forbidden address or host, see
    /// [`WebhookUrl::host_is_forbidden`]), at least one event and none twice, and at least
    /// one secret.
    pub fn check(&self) -> Result<(), ValidationError> {
        check_webhook_id(&self.id)?;
        check_tenant(&self.tenant)?;
        let url = parse_webhook_url(&self.url)?;
        if url.host_is_forbidden() {
            return Err(invalid(
                "url",
                "must not point to a local, private or reserved address",
            ));
        }
        if self.events.is_empty() {
            return Err(invalid("events", "must name at least one event"));
        }
        if normalize_events(&self.events)?.len() != self.events.len() {
            return Err(invalid("events", "must not name an event twice"));
        }
        if self.secrets.is_empty() {
            return Err(invalid("secrets", "must hold at least one secret"));
        }
        Ok(())
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Every endpoint registered, by tenant: what `webhooks` holds, read as a table (the
/// reading is the caller's).
#[derive(Debug, Default)]
pub struct Registry {
    by_tenant:
        std::sync::RwLock<std::collections::HashMap<String, Vec<std::sync::Arc<Registration>>>>,
}

impl Registry {
    /// Takes the record under `key` (`tenant/id`): a registration, or its deletion when
    /// `payload` is empty. A payload that does not parse, or names another key, is
    /// ignored.
    pub fn apply(&self, key: &str, payload: &[u8]) {
        let Some((tenant, id)) = key.split_once('/') else {
            return;
        };
        let registration = if payload.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Registration>(payload) {
                Ok(r) if r.tenant == tenant && r.id == id => Some(std::sync::Arc::new(r)),
                _ => return,
            }
        };
        self.put(tenant, id, registration);
    }

    /// Sets (or with `None` deletes) `tenant`'s endpoint `id`.
    pub fn put(&self, tenant: &str, id: &str, registration: Option<std::sync::Arc<Registration>>) {
        let Ok(mut map) = self.by_tenant.write() else {
            return;
        };
        let list = map.entry(tenant.to_owned()).or_default();
        list.retain(|r| r.id != id);
        list.extend(registration);
        list.sort_by(|a, b| a.id.cmp(&b.id));
        if list.is_empty() {
            map.remove(tenant);
        }
    }

    /// `tenant`'s endpoints, by id.
    pub fn list(&self, tenant: &str) -> Vec<std::sync::Arc<Registration>> {
        self.by_tenant
            .read()
            .ok()
            .and_then(|m| m.get(tenant).cloned())
            .unwrap_or_default()
    }

    /// `tenant`'s endpoints that want `kind`.
    pub fn endpoints(&self, tenant: &str, kind: EventKind) -> Vec<std::sync::Arc<Registration>> {
        let mut list = self.list(tenant);
        list.retain(|r| r.wants(kind));
        list
    }

    /// `tenant`'s endpoint `id`.
    pub fn get(&self, tenant: &str, id: &str) -> Option<std::sync::Arc<Registration>> {
        self.list(tenant).into_iter().find(|r| r.id == id)
    }
}

/// Checks an endpoint's name: 1 to 64 characters of `A-Z a-z 0-9 - _ . :`, the rule of
/// every id in the pipeline, so it is safe in a URL path and a key.
pub fn check_webhook_id(id: &str) -> Result<(), ValidationError> {
    check_id(id, "id")
}

/// The subscribed kinds as a registration keeps them: each once, in [`EventKind::ALL`]'s
/// order. Refuses an empty list.
pub fn normalize_events(events: &[EventKind]) -> Result<Vec<EventKind>, ValidationError> {
    if events.is_empty() {
        return Err(invalid("events", "must name at least one event"));
    }
    Ok(EventKind::ALL
        .into_iter()
        .filter(|kind| events.contains(kind))
        .collect())
}

/// The host of a [`WebhookUrl`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 literal, or a bracketed IPv6 literal.
    Ip(IpAddr),
    /// A host name, lowercased: labels of letters, digits and `-`.
    Name(String),
}

impl fmt::Display for Host {
    /// As in a URL: IPv6 literals in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// A webhook URL taken apart by [`parse_webhook_url`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WebhookUrl {
    /// `https` rather than `http`.
    pub scheme_https: bool,
    /// The host.
    pub host: Host,
    /// The port: as written, or 443 for `https` and 80 for `http`.
    pub port: u16,
    /// The path and the query, as written; `/` when the URL has no path, and starting with
    /// `/` always.
    pub path_and_query: String,
}

impl WebhookUrl {
    /// Whether its host is refused by the address guard before any resolution: an IP
    /// literal [`is_forbidden_address`] refuses, or a name [`is_forbidden_host_name`]
    /// refuses. A name that passes must still have every address it resolves to checked.
    pub fn host_is_forbidden(&self) -> bool {
        match &self.host {
            Host::Ip(ip) => is_forbidden_address(*ip),
            Host::Name(name) => is_forbidden_host_name(name),
        }
    }

    /// The port a URL of its scheme has when none is written.
    pub fn default_port(&self) -> u16 {
        if self.scheme_https { 443 } else { 80 }
    }
}

impl fmt::Display for WebhookUrl {
    /// The normalized URL: lowercase scheme and host, the port only when not the default.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.scheme_https { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.host)?;
        if self.port != self.default_port() {
            write!(f, ":{}", self.port)?;
        }
        f.write_str(&self.path_and_query)
    }
}

/// Reads a webhook URL strictly: at most 2048 bytes of printable ASCII; scheme `http` or
/// `https` (any case) followed by `//`; a host; no user info (`user:pass@`); an optional
/// port of 1 to 65535; no fragment; a path and query of RFC 3986 characters with
/// well-formed `%` escapes.
///
/// The host is a bracketed IPv6 literal (no zone), a dotted-quad IPv4 literal, or a host
/// name of letters, digits and `-` in dot-separated labels of 1 to 63 characters (253 in
/// all, no trailing dot), which is lowercased. Host names that some resolvers or URL
/// parsers read as IPv4 addresses are refused as malformed rather than guessed at: a last
/// label of digits only (`2130706433`, `127.1`, `0177.0.0.1`) and any label that is `0x`
/// followed by hex digits (`0x7f.1`). Otherwise this check and the connection could
/// disagree on the address.
///
/// It does not apply the address guard: see [`WebhookUrl::host_is_forbidden`].
pub fn parse_webhook_url(url: &str) -> Result<WebhookUrl, ValidationError> {
    let err = |reason: &str| invalid("url", reason);
    if url.len() > MAX_WEBHOOK_URL_LEN {
        return Err(err("must be at most 2048 bytes"));
    }
    if !url.is_ascii() {
        return Err(err(
            "must be ASCII (percent-encode the path, punycode the host)",
        ));
    }
    if url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(err("must not contain whitespace or control characters"));
    }
    if url.contains('#') {
        return Err(err("must not have a fragment"));
    }
    let Some((scheme, rest)) = url.split_once(':') else {
        return Err(err("must start with http:// or https://"));
    };
    let scheme_https = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return Err(err("must start with http:// or https://"));
    };
    let Some(rest) = rest.strip_prefix("//") else {
        return Err(err("must start with http:// or https://"));
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(authority_end);
    if authority.contains('@') {
        return Err(err("must not contain user info"));
    }
    let (host, port) = split_host_port(authority).map_err(err)?;
    let port = match port {
        None => {
            if scheme_https {
                443
            } else {
                80
            }
        }
        Some(port) => parse_port(port).map_err(err)?,
    };
    check_path_and_query(path_and_query).map_err(err)?;
    let path_and_query = if path_and_query.starts_with('/') {
        path_and_query.to_owned()
    } else {
        format!("/{path_and_query}")
    };
    Ok(WebhookUrl {
        scheme_https,
        host,
        port,
        path_and_query,
    })
}

/// The host and the port text of an authority (without user info).
fn split_host_port(authority: &str) -> Result<(Host, Option<&str>), &'static str> {
    if authority.is_empty() {
        return Err("must have a host");
    }
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (literal, after) = bracketed
            .split_once(']')
            .ok_or("has an unclosed [ in its host")?;
        let ip: Ipv6Addr = literal
            .parse()
            .map_err(|_| "has a malformed IPv6 address")?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("has junk after its IPv6 host")?,
            ),
        };
        return Ok((Host::Ip(IpAddr::V6(ip)), port));
    }
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    Ok((parse_host(host)?, port))
}

fn parse_port(text: &str) -> Result<u16, &'static str> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("has a malformed port");
    }
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err("must have a port from 1 to 65535"),
    }
}

/// A host that is not bracketed: a dotted-quad IPv4 literal or a host name.
fn parse_host(host: &str) -> Result<Host, &'static str> {
    if host.is_empty() {
        return Err("must have a host");
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if host.len() > MAX_HOST_NAME_LEN {
        return Err("has a host name longer than 253 bytes");
    }
    let labels: Vec<&str> = host.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err("has an empty label in its host name");
        }
        if label.len() > MAX_LABEL_LEN {
            return Err("has a host name label longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("has a host name with characters other than letters, digits, - and .");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("has a host name label starting or ending with -");
        }
        if is_hex_number(label) {
            return Err("has a numeric host that is not a dotted-quad IPv4 address");
        }
    }
    if labels
        .last()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("has a numeric host that is not a dotted-quad IPv4 address");
    }
    Ok(Host::Name(host.to_ascii_lowercase()))
}

/// `0x` or `0X` followed by hex digits only (or nothing): what `inet_aton` and the WHATWG
/// URL parser read as a number.
fn is_hex_number(label: &str) -> bool {
    label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
        .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// RFC 3986 path and query: `pchar / "/" / "?"`, with `%` followed by two hex digits.
fn check_path_and_query(text: &str) -> Result<(), &'static str> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let escape = bytes.get(i + 1..i + 3);
            if !escape.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                return Err("has a malformed % escape");
            }
            i += 3;
            continue;
        }
        let allowed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b);
        if !allowed {
            return Err("has a character that must be percent-encoded in its path or query");
        }
        i += 1;
    }
    Ok(())
}

/// Whether a webhook must not be sent to `ip`: any address that is not a public unicast
/// address on the internet.
///
/// Refused IPv4: `0.0.0.0/8` (with the unspecified address), `10/8`, `100.64/10` (shared,
/// CGNAT), `127/8` (loopback), `169.254/16` (link-local, with the cloud metadata address
/// `169.254.169.254`), `172.16/12`, `192.0.0/24` (IETF protocol assignments), `192.0.2/24`,
/// `198.51.100/24` and `203.0.113/24` (documentation), `192.88.99/24` (6to4 relay),
/// `192.168/16`, `198.18/15` (benchmarking), `224/4` (multicast) and `240/4` (reserved,
/// with the broadcast address).
///
/// IPv6 addresses that carry an IPv4 address are judged by it: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, which covers `::` and `::1`),
/// IPv4-translated (`::ffff:0:a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
/// Every other IPv6 address outside global unicast `2000::/3` is refused (unique-local
/// `fc00::/7`, link-local `fe80::/10`, multicast `ff00::/8`, discard `100::/64`, local NAT64
/// `64:ff9b:1::/48` and the rest), and inside it `2001::/23` (IETF protocol assignments:
/// Teredo, benchmarking, ORCHID), `2001:db8::/32` and `3fff::/20` (documentation).
pub fn is_forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_forbidden_v4(ip),
        IpAddr::V6(ip) => is_forbidden_v6(ip),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0
        || a == 10
        || (a == 100 && (b & 0xC0) == 64)
        || a == 127
        || (a == 169 && b == 254)
        || (a == 172 && (b & 0xF0) == 16)
        || (a == 192 && b == 0 && c == 0)
        || (a == 192 && b == 0 && c == 2)
        || (a == 192 && b == 88 && c == 99)
        || (a == 192 && b == 168)
        || (a == 198 && (b & 0xFE) == 18)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    // ::a.b.c.d (compatible), ::ffff:a.b.c.d (mapped), ::ffff:0:a.b.c.d (translated).
    if s[..4] == [0; 4]
        && ((s[4] == 0 && (s[5] == 0 || s[5] == 0xffff)) || (s[4] == 0xffff && s[5] == 0))
    {
        return is_forbidden_v4(embedded(s[6], s[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_forbidden_v4(embedded(s[6], s[7]));
    }
    // 6to4 2002:a.b.c.d::/48.
    if s[0] == 0x2002 {
        return is_forbidden_v4(embedded(s[1], s[2]));
    }
    // Outside global unicast 2000::/3.
    if s[0] & 0xe000 != 0x2000 {
        return true;
    }
    // 2001::/23 (IETF protocol assignments), 2001:db8::/32, 3fff::/20 (documentation).
    (s[0] == 0x2001 && (s[1] < 0x0200 || s[1] == 0x0db8)) || (s[0] == 0x3fff && s[1] < 0x1000)
}

/// Whether a webhook must not be sent to the host `name`, before resolving it: `localhost`
/// and `*.localhost`, `localhost.localdomain` and `*.localdomain`, names under `.internal`,
/// `.local` and `.home.arpa`, names of a single label (intranet names, resolved through the
/// local search domains), an empty name, and a name that is an IP literal
/// [`is_forbidden_address`] refuses. Case and one trailing dot are ignored.
///
/// A name that passes can still resolve to any address: the caller must check every
/// resolved address with [`is_forbidden_address`] and connect only to a checked one.
pub fn is_forbidden_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']'));
    if let Ok(ip) = bare.unwrap_or(&name).parse::<IpAddr>() {
        return is_forbidden_address(ip);
    }
    if name.is_empty() || !name.contains('.') {
        return true;
    }
    name == "localhost"
        || [
            ".localhost",
            ".localdomain",
            ".internal",
            ".local",
            ".home.arpa",
        ]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn event_kinds_are_lowercase_in_json() {
        for kind in EventKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), kind);
        }
        assert!(serde_json::from_str::<EventKind>("\"Stage\"").is_err());
        assert_eq!(
            normalize_events(&[EventKind::Position, EventKind::Stage, EventKind::Position])
                .unwrap(),
            vec![EventKind::Stage, EventKind::Position]
        );
        assert_eq!(normalize_events(&[]).unwrap_err().field, "events");
    }

    fn registration() -> Registration {
        Registration {
            id: "orders-hook".into(),
            tenant: "fabrikam".into(),
            url: "https://hooks.example.com/drones?x=1".into(),
            events: vec![EventKind::Stage],
            secrets: vec![
                KeptSecret {
                    secret: WebhookSecret::from_random([1; 32]),
                    created_at_ms: 1_000,
                    expires_at_ms: Some(5_000),
                },
                KeptSecret {
                    secret: WebhookSecret::from_random([3; 32]),
                    created_at_ms: 3_000,
                    expires_at_ms: None,
                },
                KeptSecret {
                    secret: WebhookSecret::from_random([2; 32]),
                    created_at_ms: 2_000,
                    expires_at_ms: Some(4_000),
                },
            ],
            created_at_ms: 1_000,
            updated_at_ms: 3_000,
        }
    }

    #[test]
    fn registrations_sign_with_live_secrets_newest_first() {
        let r = registration();
        let secret = |fill: u8| WebhookSecret::from_random([fill; 32]);
        assert_eq!(
            r.signing_secrets(3_999),
            vec![&secret(3), &secret(2), &secret(1)]
        );
        assert_eq!(r.signing_secrets(4_000), vec![&secret(3), &secret(1)]);
        assert_eq!(r.signing_secrets(5_000), vec![&secret(3)]);
        assert!(r.wants(EventKind::Stage));
        assert!(!r.wants(EventKind::Position));
        r.check().unwrap();
    }

    #[test]
    fn registrations_serialize_in_camel_case_and_round_trip() {
        let r = registration();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["createdAtMs"], 1_000);
        assert_eq!(json["updatedAtMs"], 3_000);
        assert_eq!(json["events"], serde_json::json!(["stage"]));
        assert_eq!(json["secrets"][0]["createdAtMs"], 1_000);
        assert_eq!(json["secrets"][0]["expiresAtMs"], 5_000);
        assert!(json["secrets"][1].get("expiresAtMs").is_none());
        assert!(
            json["secrets"][0]["secret"]
                .as_str()
                .unwrap()
                .starts_with("whsec_")
        );
        let back: Registration = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        assert!(!format!("{r:?}").contains("whsec_"));
    }

    #[test]
    fn registration_checks_name_the_field() {
        let field = |change: fn(&mut Registration)| {
            let mut r = registration();
            change(&mut r);
            r.check().unwrap_err().field
        };
        assert_eq!(field(|r| r.id = String::new()), "id");
        assert_eq!(field(|r| r.id = "a/b".into()), "id");
        assert_eq!(field(|r| r.id = "x".repeat(65)), "id");
        assert_eq!(field(|r| r.tenant = "a b".into()), "tenant");
        assert_eq!(field(|r| r.url = "ftp://example.com/".into()), "url");
        assert_eq!(field(|r| r.url = "http://127.0.0.1/".into()), "url");
        assert_eq!(field(|r| r.url = "http://metadata.internal/".into()), "url");
        assert_eq!(field(|r| r.events.clear()), "events");
        assert_eq!(
            field(|r| r.events = vec![EventKind::Stage, EventKind::Stage]),
            "events"
        );
        assert_eq!(field(|r| r.secrets.clear()), "secrets");
        check_webhook_id("a-Z_0.9:x").unwrap();
        check_webhook_id(&"x".repeat(64)).unwrap();
        assert!(check_webhook_id("é").is_err());
    }

    #[test]
    fn webhook_urls_parse_or_are_refused() {
        let name = |n: &str| Host::Name(n.into());
        let at = |text: &str| Host::Ip(ip(text));
        // url, host, port, https, path and query
        let good: &[(&str, Host, u16, bool, &str)] = &[
            (
                "https://example.com:8443/hook?x=1",
                name("example.com"),
                8443,
                true,
                "/hook?x=1",
            ),
            ("https://example.com", name("example.com"), 443, true, "/"),
            ("http://example.com", name("example.com"), 80, false, "/"),
            (
                "HTTPS://Hooks.Example.COM/A/b",
                name("hooks.example.com"),
                443,
                true,
                "/A/b",
            ),
            (
                "hTTp://example.com?q",
                name("example.com"),
                80,
                false,
                "/?q",
            ),
            (
                "http://example.com:65535/",
                name("example.com"),
                65535,
                false,
                "/",
            ),
            (
                "https://a-b.c-d.example/x%20y?a=%2F&b=c:d@e!$'()*+,;~",
                name("a-b.c-d.example"),
                443,
                true,
                "/x%20y?a=%2F&b=c:d@e!$'()*+,;~",
            ),
            ("http://93.184.216.34/", at("93.184.216.34"), 80, false, "/"),
            ("http://127.0.0.1:8080/", at("127.0.0.1"), 8080, false, "/"),
            ("http://[::1]:8080/x", at("::1"), 8080, false, "/x"),
            (
                "http://[::ffff:127.0.0.1]/",
                at("::ffff:127.0.0.1"),
                80,
                false,
                "/",
            ),
            (
                "https://[2606:4700:4700::1111]",
                at("2606:4700:4700::1111"),
                443,
                true,
                "/",
            ),
            (
                "http://xn--bcher-kva.example/",
                name("xn--bcher-kva.example"),
                80,
                false,
                "/",
            ),
            (
                "http://123.example.com/",
                name("123.example.com"),
                80,
                false,
                "/",
            ),
            ("http://localhost/", name("localhost"), 80, false, "/"),
        ];
        for (url, host, port, https, path) in good {
            let parsed = parse_webhook_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(&parsed.host, host, "{url}");
            assert_eq!(parsed.port, *port, "{url}");
            assert_eq!(parsed.scheme_https, *https, "{url}");
            assert_eq!(parsed.path_and_query, *path, "{url}");
            // The normalized form reads back the same.
            assert_eq!(
                parse_webhook_url(&parsed.to_string()).unwrap(),
                parsed,
                "{url}"
            );
        }
        assert_eq!(
            parse_webhook_url("HTTPS://Example.com:443?x")
                .unwrap()
                .to_string(),
            "https://example.com/?x"
        );
        assert_eq!(
            parse_webhook_url("http://[::1]:8080").unwrap().to_string(),
            "http://[::1]:8080/"
        );

        let long_label = format!("http://{}.com/", "a".repeat(64));
        let long_name = format!("http://{}.com/", vec!["a".repeat(60); 5].join("."));
        let long_url = format!("https://example.com/{}", "a".repeat(2048));
        let bad = [
            "",
            "example.com",
            "//example.com/",
            "ftp://example.com/",
            "file:///etc/passwd",
            "gopher://127.0.0.1:6379/_",
            "javascript:alert(1)",
            "https:example.com",
            "https:/example.com",
            "https://",
            "https:///path",
            "https://?x",
            "https://:443/",
            "https://user:pass@example.com/",
            "https://user@example.com/",
            "https://@example.com/",
            "https://example.com@127.0.0.1/",
            "https://example.com#frag",
            "https://example.com/#",
            "https://example.com/a b",
            "https://example.com/\t",
            "https://exa\nmple.com/",
            " https://example.com/",
            "https://example.com/\u{7f}",
            "https://exämple.com/",
            "https://example.com/é",
            "https://example.com\\@127.0.0.1/",
            "https://example.com/a\\b",
            "https://example.com/<script>",
            "https://example.com/%",
            "https://example.com/%2",
            "https://example.com/%zz",
            "https://example.com/[x]",
            "https://example.com:/",
            "https://example.com:0/",
            "https://example.com:65536/",
            "https://example.com:123456/",
            "https://example.com:+80/",
            "https://example.com:8o/",
            "https://example.com:80:80/",
            "https://exa_mple.com/",
            "https://example..com/",
            "https://.example.com/",
            "https://example.com./",
            "https://-example.com/",
            "https://example-.com/",
            "https://exa%6dple.com/",
            &long_label,
            &long_name,
            &long_url,
            // Numeric hosts that are not dotted quads: read as IPv4 by some parsers.
            "http://2130706433/",
            "http://127.1/",
            "http://127.0.1/",
            "http://0177.0.0.1/",
            "http://127.000.000.001/",
            "http://0x7f.1/",
            "http://0x7f000001/",
            "http://0X7F.0.0.1/",
            "http://0x7f.example.com/",
            "http://0x.example/",
            "http://1.2.3.4.5/",
            "http://256.0.0.1/",
            "http://example.123/",
            // IPv6 literals.
            "http://[::1/",
            "http://[::1]x/",
            "http://[::1]:/",
            "http://[::1%25eth0]/",
            "http://[fe80::1%eth0]/",
            "http://[127.0.0.1]/",
            "http://[v1.fe]/",
            "http://[]/",
            "http://::1/",
            "http://[::1]]/",
            "http://[[::1]/",
        ];
        for url in bad {
            let err = parse_webhook_url(url).err();
            assert_eq!(
                err.as_ref().map(|e| e.field.as_str()),
                Some("url"),
                "{url} should be refused"
            );
        }
        let longest = format!("https://example.com/{}", "a".repeat(2048 - 20));
        assert_eq!(longest.len(), 2048);
        parse_webhook_url(&longest).unwrap();
    }

    #[test]
    fn addresses_inside_the_network_are_forbidden() {
        let forbidden = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0:127.0.0.1",
            "::ffff:0:0",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1.2.3.4",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2002:a9fe:a9fe::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "100::1",
            "::2",
            "1::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:10::1",
            "2001:1ff::1",
            "2001:db8::1",
            "2001:db8:ffff::1",
            "3fff::1",
            "3fff:fff::1",
            "4000::1",
            "e000::1",
        ];
        for text in forbidden {
            assert!(is_forbidden_address(ip(text)), "{text} should be forbidden");
        }
        let allowed = [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.1",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "126.255.255.255",
            "128.0.0.1",
            "169.253.1.1",
            "169.255.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.1.1",
            "192.0.3.1",
            "192.167.1.1",
            "192.169.1.1",
            "198.17.255.255",
            "198.20.0.1",
            "198.51.101.1",
            "203.0.114.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2001:200::1",
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "3fff:1000::1",
            "3ffe::1",
        ];
        for text in allowed {
            assert!(!is_forbidden_address(ip(text)), "{text} should be allowed");
        }
    }

    #[test]
    fn local_host_names_are_forbidden() {
        for name in [
            "",
            ".",
            "localhost",
            "LOCALHOST",
            "localhost.",
            "api.localhost",
            "localhost.localdomain",
            "box.localdomain",
            "metadata.google.internal",
            "internal",
            "printer.local",
            "nas.home.arpa",
            "intranet",
            "db",
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "[::1]",
            "[::ffff:10.0.0.1]",
        ] {
            assert!(is_forbidden_host_name(name), "{name:?} should be forbidden");
        }
        for name in [
            "example.com",
            "hooks.example.com",
            "localhost.example.com",
            "internal.example.com",
            "local.example",
            "notlocalhost.com",
            "93.184.216.34",
            "[2606:4700:4700::1111]",
        ] {
            assert!(!is_forbidden_host_name(name), "{name:?} should be allowed");
        }
    }

    #[test]
    fn forbidden_urls_are_caught_before_resolution() {
        for url in [
            "http://[::ffff:127.0.0.1]/",
            "http://127.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00::1]:8080/",
            "http://localhost:8080/",
            "http://foo.localhost/",
            "http://metadata.google.internal/",
            "http://intranet/",
            "http://[64:ff9b::7f00:1]/",
        ] {
            assert!(
                parse_webhook_url(url).unwrap().host_is_forbidden(),
                "{url} should be forbidden"
            );
        }
        for url in [
            "https://example.com:8443/hook?x=1",
            "http://93.184.216.34/",
            "https://[2606:4700:4700::1111]/",
        ] {
            assert!(
                !parse_webhook_url(url).unwrap().host_is_forbidden(),
                "{url} should be allowed"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(url in ".{0,300}") {
            let _ = parse_webhook_url(&url);
            let _ = is_forbidden_host_name(&url);
        }

        #[test]
        fn url_shaped_strings_never_panic_and_normalize_stably(
            url in "(?i:https?)://[a-z0-9.:@\\[\\]%_-]{0,40}(/[a-zA-Z0-9%/?=&#.-]{0,30})?"
        ) {
            if let Ok(parsed) = parse_webhook_url(&url) {
                let again = parse_webhook_url(&parsed.to_string()).unwrap();
                prop_assert_eq!(again, parsed);
            }
        }

        #[test]
        fn embedded_ipv4_is_judged_like_ipv4(a in any::<u32>()) {
            let v4 = Ipv4Addr::from(a);
            let expected = is_forbidden_address(IpAddr::V4(v4));
            prop_assert_eq!(is_forbidden_address(IpAddr::V6(v4.to_ipv6_mapped())), expected);
            let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(a));
            prop_assert_eq!(is_forbidden_address(IpAddr::V6(nat64)), expected);
            let six_to_four = Ipv6Addr::from((0x2002_u128 << 112) | (u128::from(a) << 80) | 1);
            prop_assert_eq!(is_forbidden_address(IpAddr::V6(six_to_four)), expected);
        }
    }
}
