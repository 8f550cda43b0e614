//! Bearer tokens: `mst_<id>_<secret>`, 16 hex digits of id and 64 of secret.
//!
//! The id lets the scheduler find the record without comparing every hash;
//! the record holds the SHA-256 of the whole token, compared in constant
//! time. Expiry is checked against the receiving scheduler's clock.

use crate::state::{State, TokenRecord};
use sha2::{Digest, Sha256};

/// A fresh token and its id, from the kernel's random source.
pub fn generate() -> std::io::Result<(String, String)> {
    let mut bytes = [0u8; 40];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let id = hex(&bytes[..8]);
    let token = format!("mst_{id}_{}", hex(&bytes[8..]));
    Ok((id, token))
}

/// SHA-256 of a token.
pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Equal without an early exit, so timing does not tell how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The id part of a well-formed token.
fn id_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("mst_")?;
    let (id, secret) = rest.split_once('_')?;
    let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_hexdigit());
    (hexy(id, 16) && hexy(secret, 64)).then_some(id)
}

/// The record a token belongs to, or why it is refused.
pub fn verify<'a>(state: &'a State, token: &str, now_ms: i64) -> Result<&'a TokenRecord, String> {
    let id = id_of(token).ok_or("invalid token: not a Muster token")?;
    let rec = state
        .tokens
        .get(id)
        .filter(|r| constant_time_eq(&r.hash, &hash(token)))
        .ok_or("invalid token: unknown or forged")?;
    if rec.revoked {
        return Err(format!("token {id} of {} was revoked", rec.user));
    }
    if let Some(exp) = rec.expires_at_ms {
        if now_ms >= exp {
            return Err(format!(
                "token {id} of {} expired at {}",
                rec.user,
                crate::auth::rfc3339(exp)
            ));
        }
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(token: &str, expires: Option<i64>, revoked: bool) -> State {
        let mut s = State::new();
        let id = id_of(token).unwrap().to_string();
        s.tokens.insert(
            id.clone(),
            TokenRecord {
                id,
                user: "alice".into(),
                hash: hash(token),
                created_at_ms: 0,
                expires_at_ms: expires,
                revoked,
                created_by: "root".into(),
            },
        );
        s
    }

    #[test]
    fn a_good_token_names_its_user() {
        let (id, t) = generate().unwrap();
        assert!(t.starts_with(&format!("mst_{id}_")));
        let s = state_with(&t, Some(1000), false);
        assert_eq!(verify(&s, &t, 999).unwrap().user, "alice");
    }

    #[test]
    fn forged_expired_and_revoked_tokens_are_refused() {
        let (_, t) = generate().unwrap();
        let s = state_with(&t, Some(1000), false);
        let mut forged = t.clone();
        let last = if forged.ends_with('0') { '1' } else { '0' };
        forged.pop();
        forged.push(last);
        assert!(verify(&s, &forged, 0).unwrap_err().contains("forged"));
        assert!(verify(&s, "mst_zz", 0)
            .unwrap_err()
            .contains("not a Muster token"));
        assert!(verify(&s, &t, 1000).unwrap_err().contains("expired"));
        let s = state_with(&t, None, true);
        assert!(verify(&s, &t, 0).unwrap_err().contains("revoked"));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
