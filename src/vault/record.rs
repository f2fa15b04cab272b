//! The on-disk form of one tokenized value. Never holds plaintext.

use crate::{
    crypto::NONCE_LEN,
    token::{FieldType, Token},
};

/// Record formats. v1 (the first release) had no expiry; v2 adds it. New
/// records are v2; v1 records still decode.
const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;

/// The `key_version` of a record encrypted under its subject's own key.
pub const SUBJECT_KEY: u32 = 0;

/// A stored record: everything needed to decrypt a value, except keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The field type the value was tokenized as.
    pub field_type: FieldType,
    /// Version of the data key that encrypted it, or [`SUBJECT_KEY`].
    pub key_version: u32,
    /// The AES-GCM-SIV nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Expiry time, milliseconds since the Unix epoch; `None` for never.
    pub expires_ms: Option<u64>,
    /// Keyed hash of the data subject's id, if the value has one.
    pub subject_hash: Option<[u8; 32]>,
    /// The value's blind-index key, for deterministic field types (so that
    /// deleting the record can delete its index entry).
    pub blind: Option<[u8; 32]>,
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// A stored record that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stored record is malformed ({0})")]
pub struct DecodeError(&'static str);

impl Record {
    /// The associated data the ciphertext is bound to: the token, the key
    /// version and the subject. A ciphertext copied under another token, or
    /// re-labelled with another key version or subject, fails to decrypt.
    pub fn aad(token: &Token, key_version: u32, subject_hash: Option<&[u8; 32]>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(64 + token.as_str().len());
        aad.extend_from_slice(b"tokenvault/record/v1\0");
        aad.extend_from_slice(token.storage_key());
        aad.push(0);
        aad.extend_from_slice(&key_version.to_be_bytes());
        match subject_hash {
            Some(hash) => {
                aad.push(1);
                aad.extend_from_slice(hash);
            }
            None => aad.push(0),
        }
        aad
    }

    /// Whether the record has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|t| t <= now_ms)
    }

    /// Serializes the record.
    pub fn encode(&self) -> Vec<u8> {
        let ft = self.field_type.as_str().as_bytes();
        let mut out =
            Vec::with_capacity(1 + 1 + ft.len() + 4 + NONCE_LEN + 8 + 33 + self.ciphertext.len());
        out.push(FORMAT_V2);
        // Field type names are at most 32 bytes (see `FieldType`).
        out.push(u8::try_from(ft.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(ft);
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.unwrap_or(0).to_be_bytes());
        for optional in [&self.subject_hash, &self.blind] {
            match optional {
                Some(hash) => {
                    out.push(1);
                    out.extend_from_slice(hash);
                }
                None => out.push(0),
            }
        }
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses a stored record.
    ///
    /// # Errors
    /// [`DecodeError`] naming the part that is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        let format = r.take(1)?[0];
        if format != FORMAT_V1 && format != FORMAT_V2 {
            return Err(DecodeError("unknown format version"));
        }
        let ft_len = r.take(1)?[0] as usize;
        let ft = std::str::from_utf8(r.take(ft_len)?).map_err(|_| DecodeError("field type"))?;
        let field_type = ft.parse().map_err(|_| DecodeError("field type"))?;
        let key_version = u32::from_be_bytes(r.array()?);
        let nonce = r.array()?;
        let created_ms = u64::from_be_bytes(r.array()?);
        let expires_ms = if format == FORMAT_V2 {
            Some(u64::from_be_bytes(r.array()?)).filter(|&t| t != 0)
        } else {
            None
        };
        let subject_hash = r.optional_hash("subject flag")?;
        let blind = if format == FORMAT_V2 {
            r.optional_hash("blind index flag")?
        } else {
            None
        };
        if r.0.len() < 16 {
            return Err(DecodeError("ciphertext shorter than its tag"));
        }
        Ok(Self {
            field_type,
            key_version,
            nonce,
            created_ms,
            expires_ms,
            subject_hash,
            blind,
            ciphertext: r.0.to_vec(),
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn optional_hash(&mut self, what: &'static str) -> Result<Option<[u8; 32]>, DecodeError> {
        match self.take(1)?[0] {
            0 => Ok(None),
            1 => Ok(Some(self.array()?)),
            _ => Err(DecodeError(what)),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(subject: Option<[u8; 32]>) -> Record {
        Record {
            field_type: "card_number".parse().unwrap(),
            key_version: 7,
            nonce: [9; NONCE_LEN],
            created_ms: 1_700_000_000_000,
            expires_ms: Some(1_800_000_000_000),
            subject_hash: subject,
            blind: subject.map(|_| [5; 32]),
            ciphertext: vec![1; 40],
        }
    }

    #[test]
    fn round_trips() {
        for record in [sample(None), sample(Some([3; 32]))] {
            assert_eq!(Record::decode(&record.encode()).unwrap(), record);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample(Some([3; 32])).encode();
        // Anything shorter than header + 16-byte tag must fail, never panic.
        let header = bytes.len() - 40;
        for len in 0..header + 16 {
            assert!(Record::decode(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn version_one_records_still_decode() {
        // A v1 record: no expiry field.
        let mut v1 = vec![1, 5];
        v1.extend_from_slice(b"email");
        v1.extend_from_slice(&3u32.to_be_bytes());
        v1.extend_from_slice(&[7; NONCE_LEN]);
        v1.extend_from_slice(&42u64.to_be_bytes());
        v1.push(0);
        v1.extend_from_slice(&[9; 20]);
        let record = Record::decode(&v1).unwrap();
        assert_eq!(
            (record.key_version, record.created_ms, record.expires_ms),
            (3, 42, None)
        );
        assert_eq!(record.ciphertext, vec![9; 20]);
    }

    #[test]
    fn unknown_versions_and_flags_are_errors() {
        let mut bytes = sample(None).encode();
        bytes[0] = 3;
        assert_eq!(
            Record::decode(&bytes),
            Err(DecodeError("unknown format version"))
        );
    }

    #[test]
    fn aad_differs_by_token_version_and_subject() {
        let ft = "email".parse().unwrap();
        let (a, b) = (Token::generate(&ft).unwrap(), Token::generate(&ft).unwrap());
        assert_ne!(Record::aad(&a, 1, None), Record::aad(&b, 1, None));
        assert_ne!(Record::aad(&a, 1, None), Record::aad(&a, 2, None));
        assert_ne!(Record::aad(&a, 1, None), Record::aad(&a, 1, Some(&[0; 32])));
    }
}
