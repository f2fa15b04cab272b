//! The on-disk form of one tokenized value. Never holds plaintext.

use crate::{
    crypto::NONCE_LEN,
    layout::KeyVersion,
    token::{FieldType, Token},
};

/// Record formats. v1 (the first release) had no expiry; v2 adds it and the
/// blind-index key; v3 has v2's layout and binds the field type and expiry
/// into the associated data too. New records are v3; v1 and v2 still
/// decode and decrypt under the associated data they were sealed with.
const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const FORMAT_V3: u8 = 3;

/// What a record's ciphertext is bound to (its associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// Formats 1 and 2: the token, the key version and the subject.
    TokenKeySubject,
    /// Format 3: also the field type and the expiry, so a record relabelled
    /// as another field type, or given a later expiry, fails to decrypt.
    WithFieldTypeAndExpiry,
}

/// A stored record: everything needed to decrypt a value, except keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The field type the value was tokenized as.
    pub field_type: FieldType,
    /// The key that encrypted it: a vault data key, or its subject's own.
    pub key_version: KeyVersion,
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
    /// What the ciphertext is bound to; decides the format written.
    pub binding: Binding,
}

/// A stored record that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stored record is malformed ({0})")]
pub struct DecodeError(&'static str);

impl Record {
    /// The associated data a new ciphertext is sealed with: the token, the
    /// key version, the subject, the field type and the expiry. A ciphertext
    /// copied under another token, or relabelled with another key version,
    /// subject, field type or expiry, fails to decrypt.
    pub fn sealing_aad(
        token: &Token,
        key_version: KeyVersion,
        subject_hash: Option<&[u8; 32]>,
        field_type: &FieldType,
        expires_ms: Option<u64>,
    ) -> Vec<u8> {
        let mut aad = legacy_aad(b"tokenvault/record/v2\0", token, key_version, subject_hash);
        aad.extend_from_slice(field_type.as_str().as_bytes());
        aad.push(0);
        aad.extend_from_slice(&expires_ms.unwrap_or(0).to_be_bytes());
        aad
    }

    /// The associated data this record's ciphertext was sealed with.
    pub fn aad(&self, token: &Token) -> Vec<u8> {
        match self.binding {
            Binding::TokenKeySubject => legacy_aad(
                b"tokenvault/record/v1\0",
                token,
                self.key_version,
                self.subject_hash.as_ref(),
            ),
            Binding::WithFieldTypeAndExpiry => Self::sealing_aad(
                token,
                self.key_version,
                self.subject_hash.as_ref(),
                &self.field_type,
                self.expires_ms,
            ),
        }
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
        out.push(match self.binding {
            Binding::TokenKeySubject => FORMAT_V2,
            Binding::WithFieldTypeAndExpiry => FORMAT_V3,
        });
        // Field type names are at most 32 bytes (see `FieldType`).
        out.push(u8::try_from(ft.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(ft);
        out.extend_from_slice(&self.key_version.stored().to_be_bytes());
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
        if !matches!(format, FORMAT_V1 | FORMAT_V2 | FORMAT_V3) {
            return Err(DecodeError("unknown format version"));
        }
        let ft_len = r.take(1)?[0] as usize;
        let ft = std::str::from_utf8(r.take(ft_len)?).map_err(|_| DecodeError("field type"))?;
        let field_type = ft.parse().map_err(|_| DecodeError("field type"))?;
        let key_version = KeyVersion::from_stored(u32::from_be_bytes(r.array()?));
        let nonce = r.array()?;
        let created_ms = u64::from_be_bytes(r.array()?);
        let expires_ms = if format != FORMAT_V1 {
            Some(u64::from_be_bytes(r.array()?)).filter(|&t| t != 0)
        } else {
            None
        };
        let subject_hash = r.optional_hash("subject flag")?;
        let blind = if format != FORMAT_V1 {
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
            binding: if format == FORMAT_V3 {
                Binding::WithFieldTypeAndExpiry
            } else {
                Binding::TokenKeySubject
            },
        })
    }
}

/// The associated data of formats 1 and 2 (and the start of format 3's).
fn legacy_aad(
    domain: &[u8],
    token: &Token,
    key_version: KeyVersion,
    subject_hash: Option<&[u8; 32]>,
) -> Vec<u8> {
    let mut aad = Vec::with_capacity(128 + token.as_str().len());
    aad.extend_from_slice(domain);
    aad.extend_from_slice(token.storage_key());
    aad.push(0);
    aad.extend_from_slice(&key_version.stored().to_be_bytes());
    match subject_hash {
        Some(hash) => {
            aad.push(1);
            aad.extend_from_slice(hash);
        }
        None => aad.push(0),
    }
    aad
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
            key_version: KeyVersion::Vault(7),
            nonce: [9; NONCE_LEN],
            created_ms: 1_700_000_000_000,
            expires_ms: Some(1_800_000_000_000),
            subject_hash: subject,
            blind: subject.map(|_| [5; 32]),
            ciphertext: vec![1; 40],
            binding: Binding::WithFieldTypeAndExpiry,
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
            (KeyVersion::Vault(3), 42, None)
        );
        assert_eq!(record.ciphertext, vec![9; 20]);
    }

    #[test]
    fn unknown_versions_and_flags_are_errors() {
        let mut bytes = sample(None).encode();
        bytes[0] = 4;
        assert_eq!(
            Record::decode(&bytes),
            Err(DecodeError("unknown format version"))
        );
    }

    #[test]
    fn aad_differs_by_token_version_subject_field_type_and_expiry() {
        let ft: FieldType = "email".parse().unwrap();
        let text: FieldType = "text".parse().unwrap();
        let (a, b) = (Token::generate(&ft).unwrap(), Token::generate(&ft).unwrap());
        let aad = |t, v, s, f, e| Record::sealing_aad(t, KeyVersion::from_stored(v), s, f, e);
        let base = aad(&a, 1, None, &ft, None);
        assert_ne!(base, aad(&b, 1, None, &ft, None));
        assert_ne!(base, aad(&a, 2, None, &ft, None));
        assert_ne!(base, aad(&a, 1, Some(&[0; 32]), &ft, None));
        assert_ne!(base, aad(&a, 1, None, &text, None));
        assert_ne!(base, aad(&a, 1, None, &ft, Some(1)));
    }

    /// A v2 record keeps its format (and the associated data it was sealed
    /// with) when re-encoded, e.g. by the re-index job.
    #[test]
    fn older_formats_keep_their_binding() {
        let mut record = sample(None);
        record.binding = Binding::TokenKeySubject;
        let bytes = record.encode();
        assert_eq!(bytes[0], FORMAT_V2);
        assert_eq!(Record::decode(&bytes).unwrap(), record);
        let token = Token::generate(&"email".parse().unwrap()).unwrap();
        let relabelled = Record {
            field_type: "text".parse().unwrap(),
            ..record.clone()
        };
        assert_eq!(
            record.aad(&token),
            relabelled.aad(&token),
            "v2 does not bind the field type"
        );
        let bound = Record {
            binding: Binding::WithFieldTypeAndExpiry,
            ..record.clone()
        };
        let relabelled = Record {
            field_type: "text".parse().unwrap(),
            ..bound.clone()
        };
        assert_ne!(bound.aad(&token), relabelled.aad(&token));
    }
}
