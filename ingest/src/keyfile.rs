//! The API key file: one `tenant:key[:records_per_second]` per line. Pure: it parses text
//! and checks names, keys and rates; reading the file and hashing the keys is
//! `tenants.rs`'s.

use std::collections::HashMap;

/// The largest key file read.
pub(crate) const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;
/// The most keys in a key file.
const MAX_KEYS: usize = 100_000;
/// The shortest accepted API key.
pub const MIN_KEY_LEN: usize = 16;
/// The longest accepted API key.
pub const MAX_KEY_LEN: usize = 256;
/// The smallest rate limit, in records per second (one record in about 17 minutes).
pub const MIN_RATE: f64 = 0.001;

/// One line of a key file.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLine<'a> {
    /// The tenant the key belongs to.
    pub tenant: &'a str,
    /// The key, as clients send it after `Bearer `.
    pub key: &'a str,
    /// The tenant's own rate limit in records per second, when the line sets one.
    pub rate: Option<f64>,
}

/// Parses a key file: one `tenant:key[:records_per_second]` per line; `#` starts a
/// comment (neither names nor keys contain it) and blank lines are skipped. A tenant may
/// have several keys (rotation); a key belongs to one tenant only; the name `default` is
/// reserved for unauthenticated loopback clients. Errors name the line.
pub fn parse_api_keys(text: &str) -> std::result::Result<Vec<KeyLine<'_>>, String> {
    let mut lines = Vec::new();
    let mut seen_keys = std::collections::HashSet::new();
    let mut rates: HashMap<&str, f64> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split(':');
        let (Some(tenant), Some(key)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "line {n}: expected tenant:key or tenant:key:records_per_second"
            ));
        };
        let rate = match parts.next() {
            None => None,
            Some(text) => match text.trim().parse::<f64>() {
                Ok(rate) if rate.is_finite() && rate >= MIN_RATE => Some(rate),
                _ => {
                    return Err(format!(
                        "line {n}: the rate must be at least {MIN_RATE} records per second"
                    ));
                }
            },
        };
        if parts.next().is_some() {
            return Err(format!("line {n}: too many ':' separated fields"));
        }
        let (tenant, key) = (tenant.trim(), key.trim());
        schemas::delivery::check_tenant(tenant)
            .map_err(|e| format!("line {n}: tenant {}", e.reason))?;
        if tenant == schemas::DEFAULT_TENANT {
            return Err(format!(
                "line {n}: the tenant name {tenant} is reserved for unauthenticated loopback clients"
            ));
        }
        check_key(key).map_err(|reason| format!("line {n}: key {reason}"))?;
        if !seen_keys.insert(key) {
            return Err(format!("line {n}: this key is already listed"));
        }
        if let Some(rate) = rate
            && let Some(previous) = rates.insert(tenant, rate)
            && previous != rate
        {
            return Err(format!(
                "line {n}: tenant {tenant} already has rate {previous}"
            ));
        }
        lines.push(KeyLine { tenant, key, rate });
        if lines.len() > MAX_KEYS {
            return Err(format!("more than {MAX_KEYS} keys"));
        }
    }
    if lines.is_empty() {
        return Err("the file lists no keys".into());
    }
    Ok(lines)
}

/// An API key is 16 to 256 characters of the bearer token alphabet
/// (`A-Z a-z 0-9 - . _ ~ + / =`).
fn check_key(key: &str) -> std::result::Result<(), String> {
    if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(format!("must be {MIN_KEY_LEN} to {MAX_KEY_LEN} characters"));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
    {
        return Err("may contain only letters, digits and - . _ ~ + / =".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbb";
    const KEY_A2: &str = "cccccccccccccccccccc";

    #[test]
    fn key_files_parse_with_comments_rates_and_rotation() {
        let text =
            format!("# tenants\n\nfabrikam:{KEY_A}:500\n  contoso:{KEY_B}  \nfabrikam:{KEY_A2}\n");
        let lines = parse_api_keys(&text).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            KeyLine {
                tenant: "fabrikam",
                key: KEY_A,
                rate: Some(500.0)
            }
        );
        assert_eq!(lines[1].tenant, "contoso");
        assert_eq!(lines[1].rate, None);
    }

    #[test]
    fn bad_key_files_name_the_line() {
        let err = |text: &str| parse_api_keys(text).unwrap_err();
        assert!(err("").contains("no keys"));
        assert!(err("# only a comment\n").contains("no keys"));
        assert!(err("fabrikam\n").starts_with("line 1:"));
        assert!(err(&format!("ok:{KEY_A}\nbad/tenant:{KEY_B}")).starts_with("line 2: tenant"));
        assert!(err("t:short").contains("16 to 256"));
        assert!(err("t:has space in the key!!").contains("key"));
        assert!(err(&format!("t:{KEY_A}:-5")).contains("at least"));
        assert!(err(&format!("t:{KEY_A}:1e-20")).contains("at least"));
        assert!(err(&format!("default:{KEY_A}")).contains("reserved"));
        assert!(err(&format!("t:{KEY_A}:5:6")).contains("too many"));
        assert!(err(&format!("t:{KEY_A}\nu:{KEY_A}")).contains("already listed"));
        assert!(err(&format!("t:{KEY_A}:5\nt:{KEY_B}:6")).contains("already has rate"));
    }
}
