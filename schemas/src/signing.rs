//! Message authentication: HMAC-SHA256, the signatures of outgoing webhooks (the Standard
//! Webhooks scheme) and the signed, expiring tokens of public tracking links.
//!
//! This module owns the formats: what is signed, how a secret and a signature are written
//! and how a token is laid out. It must not read clocks, generate randomness or do I/O:
//! the time and the random bytes of a new secret are arguments, so every function here is
//! pure and gives the same answer for the same input.
//!
//! Webhooks follow <https://www.standardwebhooks.com/>: the signed content is
//! `{webhook-id}.{webhook-timestamp}.{body}`, a signature is written `v1,<base64>` (standard
//! alphabet, padded) and a secret `whsec_<base64 of its bytes>`, the bytes being the HMAC
//! key. While a secret is being rotated, a message carries one signature per secret,
//! separated by spaces, so a receiver holding either secret accepts it.
//!
//! A tracking token is `base64url(payload) "." base64url(tag)` (URL-safe alphabet, no
//! padding), where the payload is `tenant NUL delivery_id NUL expires_at_secs` and the tag
//! is the first 16 bytes of HMAC-SHA256 under the server's [`TrackingKey`] of
//! `"dronedelivery-track-v1" NUL payload`. It holds only `A-Z a-z 0-9 - _ .`, so it needs no
//! escaping in a URL path or query.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::delivery::ValidationError;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a webhook secret's text form.
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";
/// The fewest bytes a parsed webhook secret may have.
pub const MIN_WEBHOOK_SECRET_LEN: usize = 24;
/// The most bytes a parsed webhook secret may have.
pub const MAX_WEBHOOK_SECRET_LEN: usize = 64;
/// The version prefix of a webhook signature (`v1,<base64>`).
pub const WEBHOOK_SIGNATURE_PREFIX: &str = "v1,";
/// The fewest bytes of a tracking key.
pub const MIN_TRACKING_KEY_LEN: usize = 32;
/// The longest tracking token [`TrackingKey::verify`] looks at; longer ones are malformed.
pub const MAX_TRACKING_TOKEN_LEN: usize = 1024;

/// What a tracking tag signs before the payload: names the purpose and the version, so a
/// tag made for anything else under the same key never passes as a tracking tag.
const TRACKING_CONTEXT: &[u8] = b"dronedelivery-track-v1\0";
/// How many bytes of the HMAC a tracking token keeps.
const TRACKING_TAG_LEN: usize = 16;
/// The longest text form of a webhook secret: the prefix and the padded base64 of
/// [`MAX_WEBHOOK_SECRET_LEN`] bytes.
const MAX_WEBHOOK_SECRET_TEXT_LEN: usize =
    WEBHOOK_SECRET_PREFIX.len() + MAX_WEBHOOK_SECRET_LEN.div_ceil(3) * 4;

/// HMAC-SHA256 under `key` of the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac_with(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn hmac_with(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (longer ones are hashed first): this never fails.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC-SHA256 accepts keys of any length")
}

/// The secret a webhook endpoint's messages are signed with: the HMAC key's bytes.
///
/// Its text form ([`fmt::Display`], and serde) is `whsec_` followed by the bytes in
/// standard, padded base64: that is what the endpoint's owner is shown once and what is
/// stored. [`fmt::Debug`] prints `WebhookSecret(..)` only, so logging a value that holds
/// one never leaks it. Two secrets compare equal in constant time for equal lengths.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// A new secret of 32 bytes the caller drew from a cryptographic random source.
    pub fn from_random(bytes: [u8; 32]) -> Self {
        Self(bytes.to_vec())
    }

    /// Reads the text form `whsec_<base64>`; the base64 (standard alphabet, padding
    /// optional) must decode to 24 to 64 bytes.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let invalid = |reason: &str| ValidationError {
            field: "secret".to_owned(),
            reason: reason.to_owned(),
        };
        let Some(encoded) = text.strip_prefix(WEBHOOK_SECRET_PREFIX) else {
            return Err(invalid("must start with whsec_"));
        };
        if text.len() > MAX_WEBHOOK_SECRET_TEXT_LEN {
            return Err(invalid("must hold 24 to 64 bytes"));
        }
        let bytes = STANDARD_PAD_INDIFFERENT
            .decode(encoded)
            .map_err(|_| invalid("must be whsec_ followed by standard base64"))?;
        if !(MIN_WEBHOOK_SECRET_LEN..=MAX_WEBHOOK_SECRET_LEN).contains(&bytes.len()) {
            return Err(invalid("must hold 24 to 64 bytes"));
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(WEBHOOK_SECRET_PREFIX)?;
        f.write_str(&STANDARD.encode(&self.0))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl PartialEq for WebhookSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for WebhookSecret {}

impl Serialize for WebhookSecret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WebhookSecret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The raw HMAC of a webhook message: over `{id}.{timestamp_secs}.{body}`.
fn webhook_mac(secret: &WebhookSecret, id: &str, timestamp_secs: i64, body: &[u8]) -> [u8; 32] {
    let timestamp = timestamp_secs.to_string();
    hmac_sha256(
        &secret.0,
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    )
}

/// The `webhook-signature` header value of one message signed with one secret:
/// `v1,<standard base64 of HMAC-SHA256(secret, "{id}.{timestamp_secs}.{body}")>`.
///
/// `id` is the message's `webhook-id` header and `timestamp_secs` its `webhook-timestamp`
/// header (Unix seconds), `body` the exact bytes sent.
pub fn webhook_signature(
    secret: &WebhookSecret,
    id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> String {
    let mac = webhook_mac(secret, id, timestamp_secs, body);
    let mut out = String::with_capacity(WEBHOOK_SIGNATURE_PREFIX.len() + 44);
    out.push_str(WEBHOOK_SIGNATURE_PREFIX);
    STANDARD.encode_string(mac, &mut out);
    out
}

/// The `webhook-signature` header value of one message signed with each of `secrets` (the
/// current one and those being rotated out): their [`webhook_signature`]s, separated by
/// single spaces, in the order given. Empty when `secrets` is.
pub fn webhook_signatures(
    secrets: &[&WebhookSecret],
    id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> String {
    let mut out = String::with_capacity(secrets.len() * 48);
    for (i, secret) in secrets.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&webhook_signature(secret, id, timestamp_secs, body));
    }
    out
}

/// The receiver's side of the scheme: whether `header_value` (a `webhook-signature` header)
/// holds a `v1,` signature by `secret` of the message `id`, `timestamp_secs`, `body`, and the
/// timestamp lies within `tolerance_secs` of `now_secs` either way (so an old message
/// cannot be replayed later).
///
/// Any of the space-separated signatures may match; those of other versions are skipped.
/// The signatures are compared in constant time. Used by tests and by receivers written
/// against this crate; the pipeline itself only signs.
pub fn verify_webhook(
    secret: &WebhookSecret,
    id: &str,
    timestamp_secs: i64,
    body: &[u8],
    header_value: &str,
    now_secs: i64,
    tolerance_secs: i64,
) -> bool {
    let Ok(tolerance) = u64::try_from(tolerance_secs) else {
        return false;
    };
    if now_secs.abs_diff(timestamp_secs) > tolerance {
        return false;
    }
    let expected = webhook_mac(secret, id, timestamp_secs, body);
    let mut matched = false;
    for signature in header_value.split(' ') {
        let Some(encoded) = signature.strip_prefix(WEBHOOK_SIGNATURE_PREFIX) else {
            continue;
        };
        let mut given = [0u8; 32];
        match STANDARD.decode_slice(encoded, &mut given) {
            Ok(32) => matched |= bool::from(given.ct_eq(&expected)),
            _ => continue,
        }
    }
    matched
}

/// The server's secret key for tracking tokens: at least 32 bytes. [`fmt::Debug`] prints
/// `TrackingKey(..)` only.
///
/// It holds the HMAC already keyed and fed the tracking context, and each tag starts from
/// a copy of it: keying costs two SHA-256 blocks, as much again as a tag's own, and the
/// ingestion tier makes a tag for every accepted record.
#[derive(Clone)]
pub struct TrackingKey(HmacSha256);

/// What a valid tracking token grants: reading one delivery of one tenant until it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// The delivery's tenant.
    pub tenant: String,
    /// The delivery's id within its tenant.
    pub delivery_id: String,
    /// When the token stops being accepted, in Unix seconds.
    pub expires_at_secs: i64,
}

/// Why a tracking token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// It is not a token: too long, badly encoded, or its payload does not parse.
    #[error("malformed tracking token")]
    Malformed,
    /// Its tag does not match its payload under this key: forged, altered or made with
    /// another key.
    #[error("tracking token signature does not match")]
    BadSignature,
    /// It was valid but has expired.
    #[error("tracking token has expired")]
    Expired,
}

impl TrackingKey {
    /// The key made of `bytes`, which should come from a cryptographic random source;
    /// refuses fewer than 32 bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, ValidationError> {
        if bytes.len() < MIN_TRACKING_KEY_LEN {
            return Err(ValidationError {
                field: "trackingKey".to_owned(),
                reason: format!("must be at least {MIN_TRACKING_KEY_LEN} bytes"),
            });
        }
        let mut keyed = hmac_with(&bytes);
        keyed.update(TRACKING_CONTEXT);
        Ok(Self(keyed))
    }

    /// HMAC-SHA256 under the key of the tracking context followed by `payload`.
    fn tag(&self, payload: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    /// A token granting the delivery `delivery_id` of `tenant` until `expires_at_secs`
    /// (Unix seconds). Refuses an empty tenant or delivery id, one holding a NUL (the
    /// payload's separator), and a token that would be longer than
    /// [`MAX_TRACKING_TOKEN_LEN`] (which [`verify`](Self::verify) would refuse).
    pub fn token(
        &self,
        tenant: &str,
        delivery_id: &str,
        expires_at_secs: i64,
    ) -> Result<String, ValidationError> {
        for (value, field) in [(tenant, "tenant"), (delivery_id, "deliveryId")] {
            if value.is_empty() || value.contains('\0') {
                return Err(ValidationError {
                    field: field.to_owned(),
                    reason: "must be non-empty and hold no NUL".to_owned(),
                });
            }
        }
        let payload = format!("{tenant}\0{delivery_id}\0{expires_at_secs}");
        let tag = self.tag(payload.as_bytes());
        let mut token = URL_SAFE_NO_PAD.encode(payload.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&tag[..TRACKING_TAG_LEN], &mut token);
        if token.len() > MAX_TRACKING_TOKEN_LEN {
            return Err(ValidationError {
                field: "deliveryId".to_owned(),
                reason: format!(
                    "with its tenant, makes a token longer than {MAX_TRACKING_TOKEN_LEN} characters"
                ),
            });
        }
        Ok(token)
    }

    /// Checks a token from a request: its form, then its tag (in constant time), then its
    /// expiry. A token is accepted while `now_secs` is before its `expires_at_secs`.
    ///
    /// The input comes from URLs, so nothing about it is trusted: a token longer than
    /// [`MAX_TRACKING_TOKEN_LEN`] is refused before it is decoded, and the payload is read
    /// only once its tag has been checked. Never panics.
    pub fn verify(&self, token: &str, now_secs: i64) -> Result<Tracked, TokenError> {
        if token.len() > MAX_TRACKING_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        if payload.is_empty() {
            return Err(TokenError::Malformed);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let mut given = [0u8; TRACKING_TAG_LEN];
        match URL_SAFE_NO_PAD.decode_slice(tag, &mut given) {
            Ok(TRACKING_TAG_LEN) => {}
            _ => return Err(TokenError::Malformed),
        }
        let expected = self.tag(&payload);
        if !bool::from(given.ct_eq(&expected[..TRACKING_TAG_LEN])) {
            return Err(TokenError::BadSignature);
        }
        let tracked = parse_tracking_payload(&payload).ok_or(TokenError::Malformed)?;
        if now_secs >= tracked.expires_at_secs {
            return Err(TokenError::Expired);
        }
        Ok(tracked)
    }
}

/// `tenant NUL delivery_id NUL expires_at_secs`, as [`TrackingKey::token`] writes it.
fn parse_tracking_payload(payload: &[u8]) -> Option<Tracked> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split('\0');
    let (tenant, delivery_id, expires) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || tenant.is_empty() || delivery_id.is_empty() {
        return None;
    }
    let expires_at_secs: i64 = expires.parse().ok()?;
    // Only the canonical decimal form: one payload per (tenant, id, expiry).
    if expires_at_secs.to_string() != expires {
        return None;
    }
    Some(Tracked {
        tenant: tenant.to_owned(),
        delivery_id: delivery_id.to_owned(),
        expires_at_secs,
    })
}

impl fmt::Debug for TrackingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrackingKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(fill: u8) -> TrackingKey {
        TrackingKey::new(vec![fill; 32]).unwrap()
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            mac,
            hmac_sha256(b"Jefe", &[b"what do ya want for nothing?"])
        );
    }

    #[test]
    fn webhook_signature_matches_the_standard_webhooks_test_vector() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let ts = 1_614_265_330;
        let body = br#"{"test": 2432232314}"#;
        let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(webhook_signature(&secret, id, ts, body), expected);
        assert!(verify_webhook(&secret, id, ts, body, expected, ts, 300));
        assert!(verify_webhook(
            &secret,
            id,
            ts,
            body,
            expected,
            ts + 300,
            300
        ));
        assert!(verify_webhook(
            &secret,
            id,
            ts,
            body,
            expected,
            ts - 300,
            300
        ));
        assert!(!verify_webhook(
            &secret,
            id,
            ts,
            body,
            expected,
            ts + 301,
            300
        ));
        assert!(!verify_webhook(
            &secret,
            id,
            ts,
            body,
            expected,
            ts - 301,
            300
        ));
        assert!(!verify_webhook(&secret, id, ts, body, expected, ts, -1));
        assert!(!verify_webhook(
            &secret,
            id,
            ts + 1,
            body,
            expected,
            ts,
            300
        ));
        assert!(!verify_webhook(
            &secret,
            "msg_other",
            ts,
            body,
            expected,
            ts,
            300
        ));
        assert!(!verify_webhook(&secret, id, ts, b"{}", expected, ts, 300));
        let other = WebhookSecret::from_random([7; 32]);
        assert!(!verify_webhook(&other, id, ts, body, expected, ts, 300));
        // Extreme timestamps neither overflow nor pass.
        assert!(!verify_webhook(
            &secret,
            id,
            i64::MIN,
            body,
            expected,
            i64::MAX,
            i64::MAX
        ));
    }

    #[test]
    fn any_of_several_signatures_verifies_during_rotation() {
        let old = WebhookSecret::from_random([1; 32]);
        let new = WebhookSecret::from_random([2; 32]);
        let third = WebhookSecret::from_random([3; 32]);
        let header = webhook_signatures(&[&new, &old], "m1", 100, b"body");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], webhook_signature(&new, "m1", 100, b"body"));
        assert_eq!(parts[1], webhook_signature(&old, "m1", 100, b"body"));
        assert!(verify_webhook(&old, "m1", 100, b"body", &header, 100, 5));
        assert!(verify_webhook(&new, "m1", 100, b"body", &header, 100, 5));
        assert!(!verify_webhook(&third, "m1", 100, b"body", &header, 100, 5));
        assert_eq!(webhook_signatures(&[], "m1", 100, b"body"), "");
        // Other versions and junk are skipped, not fatal.
        let sig = webhook_signature(&old, "m1", 100, b"body");
        let mixed = format!("v1a,abc v1,!!! v2,{} {sig}", &sig[3..]);
        assert!(verify_webhook(&old, "m1", 100, b"body", &mixed, 100, 5));
        assert!(!verify_webhook(&old, "m1", 100, b"body", "", 100, 5));
        assert!(!verify_webhook(&old, "m1", 100, b"body", &sig[3..], 100, 5));
    }

    #[test]
    fn webhook_secrets_parse_print_and_hide() {
        let text = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let secret = WebhookSecret::parse(text).unwrap();
        assert_eq!(secret.to_string(), text);
        assert_eq!(format!("{secret:?}"), "WebhookSecret(..)");
        let random = WebhookSecret::from_random([0xAB; 32]);
        let shown = random.to_string();
        assert!(shown.starts_with("whsec_"));
        assert_eq!(WebhookSecret::parse(&shown).unwrap(), random);
        assert_ne!(random, secret);
        // Padding is optional on input.
        let unpadded = shown.trim_end_matches('=');
        assert_eq!(WebhookSecret::parse(unpadded).unwrap(), random);

        let json = serde_json::to_string(&random).unwrap();
        assert_eq!(json, format!("\"{shown}\""));
        assert_eq!(
            serde_json::from_str::<WebhookSecret>(&json).unwrap(),
            random
        );
        assert!(serde_json::from_str::<WebhookSecret>("\"whsec_\"").is_err());
        assert!(serde_json::from_str::<WebhookSecret>("12").is_err());

        let b64 = |n: usize| STANDARD.encode(vec![9u8; n]);
        for bad in [
            "",
            "whsec_",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS!",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw ",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa-_",
            &format!("whsec_{}", b64(23)),
            &format!("whsec_{}", b64(65)),
            &format!("whsec_{}", b64(4000)),
        ] {
            let err = WebhookSecret::parse(bad).unwrap_err();
            assert_eq!(err.field, "secret", "{bad}");
        }
        for good in [24, 32, 64] {
            let text = format!("whsec_{}", b64(good));
            assert_eq!(WebhookSecret::parse(&text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn tracking_tokens_round_trip_and_stay_url_safe() {
        let k = key(1);
        let token = k.token("fabrikam", "d-1:x.y_z", 2_000).unwrap();
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{token}"
        );
        assert_eq!(token.matches('.').count(), 1);
        let tracked = k.verify(&token, 1_999).unwrap();
        assert_eq!(
            tracked,
            Tracked {
                tenant: "fabrikam".into(),
                delivery_id: "d-1:x.y_z".into(),
                expires_at_secs: 2_000,
            }
        );
        assert_eq!(k.verify(&token, 2_000), Err(TokenError::Expired));
        assert_eq!(k.verify(&token, i64::MAX), Err(TokenError::Expired));
        // Negative and extreme expiries round trip too.
        for exp in [i64::MIN, -1, 0, i64::MAX] {
            let t = k.token("t", "d", exp).unwrap();
            assert_eq!(k.verify(&t, i64::MIN).map(|x| x.expires_at_secs), {
                if exp == i64::MIN {
                    Err(TokenError::Expired)
                } else {
                    Ok(exp)
                }
            });
        }
        // Non-ASCII names are carried as UTF-8.
        let t = k.token("tenant-é", "дрон", 10).unwrap();
        assert_eq!(k.verify(&t, 0).unwrap().delivery_id, "дрон");
        assert_eq!(format!("{k:?}"), "TrackingKey(..)");
    }

    #[test]
    fn tracking_tokens_refuse_bad_input() {
        let k = key(1);
        assert!(TrackingKey::new(vec![0; 31]).is_err());
        assert!(TrackingKey::new(Vec::new()).is_err());
        assert!(TrackingKey::new(vec![0; 32]).is_ok());
        assert_eq!(k.token("a\0b", "d", 1).unwrap_err().field, "tenant");
        assert_eq!(k.token("a", "d\0", 1).unwrap_err().field, "deliveryId");
        assert_eq!(k.token("", "d", 1).unwrap_err().field, "tenant");
        assert_eq!(k.token("a", "", 1).unwrap_err().field, "deliveryId");
        assert!(k.token("a", &"d".repeat(800), 1).is_err());
    }

    #[test]
    fn altered_or_foreign_tracking_tokens_are_refused() {
        let k = key(1);
        let token = k.token("fabrikam", "d-1", 2_000).unwrap();
        // One character of the tenant's part changed.
        let mut chars: Vec<char> = token.chars().collect();
        chars[0] = if chars[0] == 'Z' { 'Y' } else { 'Z' };
        let altered: String = chars.into_iter().collect();
        assert_eq!(k.verify(&altered, 0), Err(TokenError::BadSignature));
        // The tag changed.
        let mut chars: Vec<char> = token.chars().collect();
        let at = token.find('.').unwrap() + 1;
        chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
        let altered: String = chars.into_iter().collect();
        assert_eq!(k.verify(&altered, 0), Err(TokenError::BadSignature));
        // Another key.
        assert_eq!(key(2).verify(&token, 0), Err(TokenError::BadSignature));
        // A signature check comes before expiry: an expired forgery is still a forgery.
        assert_eq!(key(2).verify(&token, 5_000), Err(TokenError::BadSignature));
    }

    #[test]
    fn a_token_for_one_tenant_cannot_become_another_tenants() {
        let k = key(1);
        let a = k.token("tenant-a", "d-1", 2_000).unwrap();
        let b = k.token("tenant-b", "d-1", 2_000).unwrap();
        let (_, a_tag) = a.split_once('.').unwrap();
        let (b_payload, _) = b.split_once('.').unwrap();
        // B's payload under A's tag.
        let spliced = format!("{b_payload}.{a_tag}");
        assert_eq!(k.verify(&spliced, 0), Err(TokenError::BadSignature));
        // A payload written by hand for B, with A's tag.
        let forged_payload = URL_SAFE_NO_PAD.encode("tenant-b\0d-1\x002000");
        assert_eq!(
            k.verify(&format!("{forged_payload}.{a_tag}"), 0),
            Err(TokenError::BadSignature)
        );
        // Moving the separator makes another payload, so another tag.
        let ab_c = k.token("ab", "c", 1).unwrap();
        let a_bc = k.token("a", "bc", 1).unwrap();
        assert_ne!(
            ab_c.split_once('.').unwrap().1,
            a_bc.split_once('.').unwrap().1
        );
        // A tag made for webhooks (no context) never passes as a tracking tag.
        let payload = b"tenant-b\0d-1\x002000";
        let raw = hmac_sha256(&[1u8; 32], &[payload]);
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(&raw[..16])
        );
        assert_eq!(k.verify(&token, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn a_tracking_tag_is_the_hmac_of_the_context_and_payload_every_time() {
        // The key is keyed once and copied per tag: every tag is still
        // HMAC-SHA256(key, context || payload), and making one changes nothing for the next.
        let k = key(7);
        for payload in [&b"t\0d\x001"[..], b"", &[0xAB; 200]] {
            let expected = hmac_sha256(&[7u8; 32], &[TRACKING_CONTEXT, payload]);
            assert_eq!(k.tag(payload), expected);
            assert_eq!(k.tag(payload), expected);
        }
    }

    #[test]
    fn garbage_tracking_tokens_are_malformed() {
        let k = key(1);
        let good = k.token("t", "d", 2_000).unwrap();
        let (payload, tag) = good.split_once('.').unwrap();
        let signed = |payload: &[u8]| {
            let tag = k.tag(payload);
            format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(&tag[..16])
            )
        };
        let huge = "A".repeat(MAX_TRACKING_TOKEN_LEN + 1);
        for bad in [
            String::new(),
            ".".into(),
            "..".into(),
            "abc".into(),
            payload.to_owned(),
            format!("{payload}."),
            format!(".{tag}"),
            format!("{payload}.{tag}.x"),
            format!("{payload}={tag}"),
            format!("{payload}.{tag}="),
            format!("{payload}.{}", &tag[..tag.len() - 1]),
            format!("{payload}.{tag}AA"),
            format!("{payload}+.{tag}"),
            format!("{payload} .{tag}"),
            huge.clone(),
            format!("{huge}.{tag}"),
            // Signed, but not a payload this module writes.
            signed(b"t\0d"),
            signed(b"t\0d\x002000\0x"),
            signed(b"\0d\x002000"),
            signed(b"t\0\x002000"),
            signed(b"t\0d\0+2000"),
            signed(b"t\0d\x0002000"),
            signed(b"t\0d\0"),
            signed(b"t\0d\x0099999999999999999999"),
            signed(b"\xff\0d\x002000"),
        ] {
            assert_eq!(k.verify(&bad, 0), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(token in ".{0,1100}", now in any::<i64>()) {
            let _ = key(3).verify(&token, now);
        }

        #[test]
        fn token_shaped_strings_never_panic(token in "[A-Za-z0-9_.=+/-]{0,200}", now in any::<i64>()) {
            let _ = key(3).verify(&token, now);
        }

        #[test]
        fn any_tenant_and_id_round_trip(
            tenant in "[^\\x00]{1,40}",
            id in "[^\\x00]{1,40}",
            exp in any::<i64>(),
        ) {
            let k = key(4);
            let token = k.token(&tenant, &id, exp).unwrap();
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            if exp > i64::MIN {
                let tracked = k.verify(&token, exp - 1).unwrap();
                prop_assert_eq!(tracked, Tracked { tenant, delivery_id: id, expires_at_secs: exp });
            }
            prop_assert_eq!(k.verify(&token, exp), Err(TokenError::Expired));
        }

        #[test]
        fn arbitrary_secrets_and_headers_never_panic(text in ".{0,200}", header in ".{0,300}") {
            let _ = WebhookSecret::parse(&text);
            let _ = verify_webhook(&WebhookSecret::from_random([5; 32]), "m", 0, b"", &header, 0, 10);
        }
    }
}
