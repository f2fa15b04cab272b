//! The on-disk form of one tokenized value. Never holds plaintext.

use crate::{
    crypto::NONCE_LEN,
    token::{FieldType, Token},
};

/// Current record format. Bump it and keep a decoder for the old one when
/// the layout changes.
const FORMAT_V1: u8 = 1;

/// A stored record: everything needed to decrypt a value, except keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The field type the value was tokenized as.
    pub field_type: FieldType,
    /// Version of the data key that encrypted it.
    pub key_version: u32,
    /// The AES-GCM-SIV nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Keyed hash of the data subject's id, if the value has one.
    pub subject_hash: Option<[u8; 32]>,
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

    /// Serializes the record.
    pub fn encode(&self) -> Vec<u8> {
        let ft = self.field_type.as_str().as_bytes();
        let mut out =
            Vec::with_capacity(1 + 1 + ft.len() + 4 + NONCE_LEN + 8 + 33 + self.ciphertext.len());
        out.push(FORMAT_V1);
        // Field type names are at most 32 bytes (see `FieldType`).
        out.push(u8::try_from(ft.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(ft);
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        match &self.subject_hash {
            Some(hash) => {
                out.push(1);
                out.extend_from_slice(hash);
            }
            None => out.push(0),
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
        if r.take(1)?[0] != FORMAT_V1 {
            return Err(DecodeError("unknown format version"));
        }
        let ft_len = r.take(1)?[0] as usize;
        let ft = std::str::from_utf8(r.take(ft_len)?).map_err(|_| DecodeError("field type"))?;
        let field_type = ft.parse().map_err(|_| DecodeError("field type"))?;
        let key_version = u32::from_be_bytes(r.array()?);
        let nonce = r.array()?;
        let created_ms = u64::from_be_bytes(r.array()?);
        let subject_hash = match r.take(1)?[0] {
            0 => None,
            1 => Some(r.array()?),
            _ => return Err(DecodeError("subject flag")),
        };
        if r.0.len() < 16 {
            return Err(DecodeError("ciphertext shorter than its tag"));
        }
        Ok(Self {
            field_type,
            key_version,
            nonce,
            created_ms,
            subject_hash,
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
            subject_hash: subject,
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
    fn unknown_versions_and_flags_are_errors() {
        let mut bytes = sample(None).encode();
        bytes[0] = 2;
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
