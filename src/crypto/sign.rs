//! Ed25519 signatures by the vault's audit key: audit checkpoints and prune
//! markers, and sealed exports' statements (each message with a domain of
//! its own). The signing key is its own key, apart from the data keys, so
//! an auditor or a data subject holding only the public key can check them
//! without any of the vault's secrets.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::HashKey;

/// The private key that signs audit checkpoints and sealed exports. Zeroized on drop (by
/// `ed25519-dalek`'s `zeroize` feature); `Debug` prints no bytes.
pub struct AuditSigningKey {
    key: SigningKey,
}

impl AuditSigningKey {
    /// The signing key whose seed is `seed` (a random 256-bit key, stored
    /// wrapped by the master key like the other keys).
    pub(crate) fn from_seed(seed: &HashKey) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed.bytes),
        }
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// The public key, for auditors.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
}

impl std::fmt::Debug for AuditSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditSigningKey(<redacted>)")
    }
}

/// Whether `signature` is `public_key`'s signature of `message`.
pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    // Strict: no small-order key or non-canonical signature passes (a
    // bogus public key handed to a verifier must not accept everything).
    VerifyingKey::from_bytes(public_key).is_ok_and(|key| {
        !key.is_weak()
            && key
                .verify_strict(message, &Signature::from_bytes(signature))
                .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let key = AuditSigningKey::from_seed(&HashKey::generate().unwrap());
        let other = AuditSigningKey::from_seed(&HashKey::generate().unwrap());
        let sig = key.sign(b"checkpoint 7");
        assert!(verify_signature(&key.public_key(), b"checkpoint 7", &sig));
        assert!(!verify_signature(&key.public_key(), b"checkpoint 8", &sig));
        assert!(!verify_signature(
            &other.public_key(),
            b"checkpoint 7",
            &sig
        ));
        assert_eq!(format!("{key:?}"), "AuditSigningKey(<redacted>)");
    }
}
