//! A hash-chained, append-only log: the storage primitive under the audit
//! trail.
//!
//! Entry `n` is stored under key `n` (8 bytes, big-endian, from 1) with the
//! value `[format 1][hash of entry n-1: 32][digest: 32][payload]`. The hash
//! of an entry is SHA-256 over its key and value, so changing, removing or
//! reordering any entry breaks every later link. The digest is SHA-256 over
//! the entry's own sequence number, link and payload: it does not add
//! security (whoever rewrites an entry can recompute it), but it lets a
//! verifier name the entry that was changed or moved, rather than the next
//! one whose link broke. The committer thread assigns sequence numbers and
//! links, so the chain follows commit order.

use sha2::{Digest, Sha256};

const FORMAT_V1: u8 = 1;

/// The hash that entry 1 links to.
pub const GENESIS: [u8; 32] = [0; 32];

/// The newest entry of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// Its sequence number (0 for an empty chain).
    pub seq: u64,
    /// Its hash ([`GENESIS`] for an empty chain).
    pub hash: [u8; 32],
}

/// A decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link<'a> {
    /// The hash of the previous entry.
    pub prev: [u8; 32],
    /// The digest of sequence number, link and payload, as written.
    pub digest: [u8; 32],
    /// The payload.
    pub payload: &'a [u8],
}

impl Link<'_> {
    /// Whether the entry is whole and stored under the sequence number it
    /// was written with.
    pub fn is_intact(&self, seq: u64) -> bool {
        self.digest == digest(seq, &self.prev, self.payload)
    }
}

fn digest(seq: u64, prev: &[u8; 32], payload: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"tokenvault-chain-entry/v1\0");
    hasher.update(seq.to_be_bytes());
    hasher.update(prev);
    hasher.update(payload);
    hasher.finalize().into()
}

/// The storage key of entry `seq`.
pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number of a storage key.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The key under which the store indexes entry `seq` by `prefix` (in
/// [`crate::store::Table::AuditIndex`]): the prefix, then the sequence
/// number's complement, big-endian, so that a forward scan of one prefix
/// yields its entries newest first.
pub fn index_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&(u64::MAX - seq).to_be_bytes());
    key
}

/// The sequence number an index key of `prefix` names.
pub fn seq_of_index_key(prefix: &[u8], key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(prefix)?;
    Some(u64::MAX - u64::from_be_bytes(rest.try_into().ok()?))
}

/// The stored value of entry `seq`, linking to `prev`.
pub fn encode(seq: u64, prev: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + 64 + payload.len());
    value.push(FORMAT_V1);
    value.extend_from_slice(prev);
    value.extend_from_slice(&digest(seq, prev, payload));
    value.extend_from_slice(payload);
    value
}

/// Parses a stored value.
pub fn decode(value: &[u8]) -> Option<Link<'_>> {
    if value.len() < 65 || value[0] != FORMAT_V1 {
        return None;
    }
    Some(Link {
        prev: value[1..33].try_into().ok()?,
        digest: value[33..65].try_into().ok()?,
        payload: &value[65..],
    })
}

/// The hash of entry `seq` with stored value `value`.
pub fn hash(seq: u64, value: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(key(seq));
    hasher.update(value);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_round_trip_and_hashes_depend_on_everything() {
        let value = encode(1, &GENESIS, b"event");
        let link = decode(&value).unwrap();
        assert_eq!(link.prev, GENESIS);
        assert_eq!(link.payload, b"event");
        assert!(link.is_intact(1));
        assert!(!link.is_intact(2), "moved to another position");
        let mut changed = value.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(!decode(&changed).unwrap().is_intact(1));
        assert_ne!(hash(1, &value), hash(2, &value));
        assert_ne!(hash(1, &value), hash(1, &encode(1, &GENESIS, b"evenT")));
        assert!(decode(&value[..40]).is_none());
        assert_eq!(seq_of(&key(42)), Some(42));
    }

    #[test]
    fn index_keys_sort_newest_first_within_a_prefix() {
        let (older, newer) = (index_key(b"s1", 7), index_key(b"s1", 300));
        assert!(
            newer < older,
            "a forward scan must meet the newer entry first"
        );
        assert_eq!(seq_of_index_key(b"s1", &older), Some(7));
        assert_eq!(seq_of_index_key(b"s2", &older), None);
        assert_eq!(seq_of_index_key(b"s1", &older[..9]), None);
    }
}
