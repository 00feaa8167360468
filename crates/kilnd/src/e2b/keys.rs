//! E2B API keys: `e2b_<hex>`, derived from a kiln access key so that kiln issues, lists and
//! revokes them with the access keys it already has (`kiln e2b env` prints the key of the
//! CLI's own credentials). The hex encodes `<access key id>:<secret>`: the E2B key is exactly
//! as powerful as the access key, and revoking the access key revokes it.

use crate::auth::keys::Caller;
use crate::store::Store;

/// The prefix of every E2B key.
pub const PREFIX: &str = "e2b_";

/// The E2B key of an access key.
pub fn encode(access_key_id: &str, secret: &str) -> String {
    let raw = format!("{access_key_id}:{secret}");
    let mut out = String::with_capacity(PREFIX.len() + raw.len() * 2);
    out.push_str(PREFIX);
    for b in raw.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The access key id and secret an E2B key carries, if it is well-formed.
pub fn decode(key: &str) -> Option<(String, String)> {
    let hex = key.strip_prefix(PREFIX)?;
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 512 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (id, secret) = text.split_once(':')?;
    (!id.is_empty() && !secret.is_empty()).then(|| (id.to_string(), secret.to_string()))
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller an `X-API-Key` stands for: its access key must exist, be active, and match.
pub fn authenticate(store: &std::sync::Arc<dyn Store>, key: &str) -> Result<Caller, String> {
    let refused = || "invalid API key: use the key `kiln e2b env` prints (E2B_API_KEY)".to_string();
    let (id, secret) = decode(key.trim()).ok_or_else(refused)?;
    let row = store
        .access_key(&id)
        .map_err(|e| format!("reading the access keys: {e}"))?
        .filter(|k| k.revoked_at.is_none())
        .ok_or_else(refused)?;
    if !constant_time_eq(row.secret.as_bytes(), secret.as_bytes()) {
        return Err(refused());
    }
    let account = store
        .ensure_account(&row.principal, crate::now())
        .map_err(|e| format!("reading the principal's account: {e}"))?;
    Ok(Caller {
        principal: row.principal,
        account,
        access_key_id: row.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_look_like_e2b_keys() {
        let key = encode("AKIAEXAMPLE", "s3cr3t/+x");
        assert!(key.starts_with("e2b_"));
        assert!(key[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(
            decode(&key),
            Some(("AKIAEXAMPLE".into(), "s3cr3t/+x".into()))
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        for key in ["", "e2b_", "e2b_zz", "e2b_4", "sk_123", "e2b_41414141"] {
            assert_eq!(decode(key), None, "{key}");
        }
    }
}
