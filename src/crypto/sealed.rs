//! Exports sealed to the data subject's (or their agent's) public key:
//! HPKE (RFC 9180) in base mode with DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256 and ChaCha20-Poly1305. One context per export; each record
//! is one `seal`, so the records are bound to their order by the context's
//! sequence numbers. The vault holds the plaintext only in its own memory;
//! what it streams is ciphertext only the private key's holder can open.

use hpke::{
    Deserializable, Kem as _, OpModeR, OpModeS, Serializable, aead::ChaCha20Poly1305,
    kdf::HkdfSha256, kem::X25519HkdfSha256,
};
use zeroize::Zeroizing;

use super::Error;

type Kem = X25519HkdfSha256;
type Aead = ChaCha20Poly1305;
type Kdf = HkdfSha256;

/// Bound into every sealed export's key schedule.
const INFO: &[u8] = b"tokenvault sealed export v1";

/// The length of a recipient's public key and of a private key.
pub const EXPORT_KEY_LEN: usize = 32;

/// Seals the records of one export, in order.
pub struct ExportSealer(hpke::aead::AeadCtxS<Aead, Kdf, Kem>);

impl ExportSealer {
    /// A new export to `recipient` (an X25519 public key) and the
    /// encapsulated key the recipient needs to open it.
    ///
    /// # Errors
    /// [`Error::BadPublicKey`] if `recipient` is not a usable X25519 public
    /// key; [`Error::Random`] if the random source fails.
    pub fn new(recipient: &[u8]) -> Result<(Vec<u8>, Self), Error> {
        let recipient = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient)
            .map_err(|_| Error::BadPublicKey)?;
        let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
        let (encapsulated, context) =
            hpke::setup_sender::<Aead, Kdf, Kem, _>(&OpModeS::Base, &recipient, INFO, &mut rng)
                .map_err(|_| Error::BadPublicKey)?;
        Ok((encapsulated.to_bytes().to_vec(), Self(context)))
    }

    /// Seals the next record.
    ///
    /// # Errors
    /// If the context's sequence is exhausted (2^64 records).
    pub fn seal(&mut self, record: &[u8]) -> Result<Vec<u8>, Error> {
        self.0.seal(record, &[]).map_err(|_| Error::Authentication)
    }
}

/// Opens the records of one sealed export, in order.
pub struct ExportOpener(hpke::aead::AeadCtxR<Aead, Kdf, Kem>);

impl ExportOpener {
    /// Opens an export that `encapsulated` starts, with the private key.
    ///
    /// # Errors
    /// [`Error::Authentication`] if the key or the encapsulated key is not
    /// one this export was sealed with.
    pub fn new(private: &[u8; EXPORT_KEY_LEN], encapsulated: &[u8]) -> Result<Self, Error> {
        let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(private)
            .map_err(|_| Error::Authentication)?;
        let encapsulated = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapsulated)
            .map_err(|_| Error::Authentication)?;
        hpke::setup_receiver::<Aead, Kdf, Kem>(&OpModeR::Base, &private, &encapsulated, INFO)
            .map(Self)
            .map_err(|_| Error::Authentication)
    }

    /// Opens the next record.
    ///
    /// # Errors
    /// [`Error::Authentication`] for a wrong key, a changed or reordered
    /// record.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.0
            .open(sealed, &[])
            .map(Zeroizing::new)
            .map_err(|_| Error::Authentication)
    }
}

/// What the vault signs at the end of a sealed export, with its audit key:
/// everything that makes the export this one, so that whoever relays it
/// can neither substitute, fabricate, shorten or replay one unnoticed, nor
/// pass one subject's off as another's.
pub struct ExportStatement<'a> {
    /// The HPKE encapsulated key the export opens with.
    pub encapsulated: &'a [u8],
    /// Every field record's ciphertext, in order (not the end record).
    pub records: &'a [Vec<u8>],
    /// SHA-256 of the subject id ([`subject_digest`]).
    pub subject_digest: &'a [u8],
    /// The export call's request id.
    pub request_id: &'a str,
    /// When the vault made it, ms since the epoch.
    pub exported_ms: u64,
}

impl ExportStatement<'_> {
    /// The signed message: a domain string of its own (no checkpoint
    /// message starts with it), then each part, length-prefixed.
    pub fn message(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut records = Sha256::new();
        for record in self.records {
            records.update((record.len() as u64).to_be_bytes());
            records.update(record);
        }
        let mut message = b"tokenvault-sealed-export/v2\0".to_vec();
        for part in [
            Sha256::digest(self.encapsulated).as_slice(),
            records.finalize().as_slice(),
            &(self.records.len() as u64).to_be_bytes(),
            self.subject_digest,
            self.request_id.as_bytes(),
            &self.exported_ms.to_be_bytes(),
        ] {
            message.extend_from_slice(&(part.len() as u64).to_be_bytes());
            message.extend_from_slice(part);
        }
        message
    }
}

/// SHA-256 of a subject id, as a sealed export's end record names it.
pub fn subject_digest(subject_id: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update(b"tokenvault export subject v1\0")
        .chain_update(subject_id.as_bytes())
        .finalize()
        .into()
}

/// A new key pair for receiving sealed exports: (private, public).
///
/// # Errors
/// [`Error::Random`] if the random source fails.
pub fn export_keypair() -> Result<(Zeroizing<[u8; EXPORT_KEY_LEN]>, [u8; EXPORT_KEY_LEN]), Error> {
    let mut seed = Zeroizing::new([0u8; EXPORT_KEY_LEN]);
    getrandom::fill(seed.as_mut())?;
    let (private, public) = Kem::derive_keypair(seed.as_ref());
    let mut private_bytes = Zeroizing::new([0u8; EXPORT_KEY_LEN]);
    private_bytes.copy_from_slice(&private.to_bytes());
    let mut public_bytes = [0u8; EXPORT_KEY_LEN];
    public_bytes.copy_from_slice(&public.to_bytes());
    Ok((private_bytes, public_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_open_in_order_with_the_right_key_only() {
        let (private, public) = export_keypair().unwrap();
        let (encapsulated, mut sealer) = ExportSealer::new(&public).unwrap();
        let first = sealer.seal(b"first record").unwrap();
        let second = sealer.seal(b"second record").unwrap();
        assert!(!first.windows(5).any(|w| w == b"first"));

        let mut opener = ExportOpener::new(&private, &encapsulated).unwrap();
        assert_eq!(opener.open(&first).unwrap().as_slice(), b"first record");
        assert_eq!(opener.open(&second).unwrap().as_slice(), b"second record");

        // Out of order: the sequence number binds each record's place.
        let mut opener = ExportOpener::new(&private, &encapsulated).unwrap();
        assert!(opener.open(&second).is_err());

        // Another key opens nothing.
        let (other, _) = export_keypair().unwrap();
        let mut wrong = ExportOpener::new(&other, &encapsulated).unwrap();
        assert!(wrong.open(&first).is_err());
    }

    #[test]
    fn a_public_key_of_the_wrong_length_is_refused() {
        assert!(matches!(
            ExportSealer::new(&[7u8; 31]),
            Err(Error::BadPublicKey)
        ));
    }
}
