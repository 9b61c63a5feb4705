//! Tracking links: `/track/{token}`, where the token names one delivery of one tenant
//! and is signed with the server's secret (HMAC-SHA256, `schemas::signing`), so that any
//! replica given the same `--tracking-secret` verifies it without a lookup.
//!
//! It owns making and checking links; it must not serve them (`handlers/track.rs`).

use schemas::signing::{TokenError, Tracked, TrackingKey};

use crate::error::{IngestError, Result};

/// The path prefix of tracking links.
pub(crate) const PREFIX: &str = "/track/";

/// Makes and checks tracking links.
pub(crate) struct Links {
    key: TrackingKey,
    ttl_secs: i64,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl Links {
    /// Links signed with `secret` (at least 32 bytes), or with a key made up here when
    /// there is none; each valid for `ttl_secs`.
    pub(crate) fn new(secret: Option<&str>, ttl_secs: u64) -> Result<Self> {
        let bytes = match secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => {
                tracing::warn!(
                    "no --tracking-secret: tracking links are signed with a key of this \
                     process's own; they fail on other replicas and after a restart"
                );
                // Two version-4 UUIDs: 244 bits from the operating system's generator.
                let mut bytes = uuid::Uuid::new_v4().into_bytes().to_vec();
                bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
                bytes
            }
        };
        let key = TrackingKey::new(bytes).map_err(|e| IngestError::Config {
            reason: format!("--tracking-secret {}", e.reason),
        })?;
        Ok(Self {
            key,
            ttl_secs: i64::try_from(ttl_secs.max(1)).unwrap_or(i64::MAX),
        })
    }

    /// The link of `tenant`'s delivery `delivery_id`, valid from `now_secs` for the
    /// links' lifetime; `None` if the ids cannot be put in a token.
    pub(crate) fn url(&self, tenant: &str, delivery_id: &str, now_secs: i64) -> Option<String> {
        let token = self
            .key
            .token(tenant, delivery_id, now_secs.saturating_add(self.ttl_secs))
            .ok()?;
        Some(format!("{PREFIX}{token}"))
    }

    /// What `token` grants at `now_secs`: 404 for anything forged, altered or made with
    /// another key (nothing tells those apart), 410 once it has expired.
    pub(crate) fn verify(&self, token: &str, now_secs: i64) -> Result<Tracked> {
        self.key.verify(token, now_secs).map_err(|e| match e {
            TokenError::Expired => IngestError::LinkExpired,
            TokenError::Malformed | TokenError::BadSignature => IngestError::NotFound {
                path: format!("{PREFIX}…"),
            },
        })
    }
}

/// Now, in Unix seconds.
pub(crate) fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_one_delivery_of_one_tenant_until_they_expire() {
        let links = Links::new(Some("0123456789abcdef0123456789abcdef"), 60).unwrap();
        let url = links.url("fabrikam", "d-1", 1_000).unwrap();
        let token = url.strip_prefix(PREFIX).unwrap();
        let tracked = links.verify(token, 1_000).unwrap();
        assert_eq!(
            (tracked.tenant.as_str(), tracked.delivery_id.as_str()),
            ("fabrikam", "d-1")
        );
        assert!(matches!(
            links.verify(token, 1_060),
            Err(IngestError::LinkExpired)
        ));
        // Another key (another deployment, or none shared) refuses it as unknown.
        let other = Links::new(None, 60).unwrap();
        assert!(matches!(
            other.verify(token, 1_000),
            Err(IngestError::NotFound { .. })
        ));
        // A tampered token, and one changed to another tenant, are unknown.
        let mut tampered = token.to_owned();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(matches!(
            links.verify(&tampered, 1_000),
            Err(IngestError::NotFound { .. })
        ));
        let forged = links.url("contoso", "d-1", 1_000).unwrap();
        let (payload, _) = forged
            .strip_prefix(PREFIX)
            .unwrap()
            .split_once('.')
            .unwrap();
        let (_, tag) = token.split_once('.').unwrap();
        assert!(links.verify(&format!("{payload}.{tag}"), 1_000).is_err());
        assert!(Links::new(Some("short"), 60).is_err());
    }
}
