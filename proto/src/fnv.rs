//! FNV-1a (64-bit): a hash that is the same in every process, build and
//! version (std's is not), for digests that replicas compare, names derived
//! from paths, and seeded simulations. Not for anything an attacker picks
//! the input of in bulk (no DoS resistance).

/// The FNV-1a offset basis: the hash of nothing.
pub const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// `hash` (start with [`OFFSET`]) extended by `bytes`.
pub fn extend(hash: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes
        .into_iter()
        .fold(hash, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The FNV-1a hash of `bytes`.
pub fn hash(bytes: &[u8]) -> u64 {
    extend(OFFSET, bytes.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(hash(b""), OFFSET);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(extend(hash(b"fo"), *b"o"), hash(b"foo"));
    }
}
