//! The one type that holds a plaintext value inside the vault.

use std::fmt;

use zeroize::Zeroizing;

/// A sensitive value (an e-mail address, a card number...) in plaintext.
///
/// Zeroized on drop; `Debug` prints only the length; no `Clone`, `Display`
/// or `Serialize`. The text is reached through [`SecretValue::expose`] and
/// leaves the type for good only through [`SecretValue::into_response_string`].
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Takes ownership of `value`; the caller's `String` is moved, not copied,
    /// so no second unzeroized copy is left behind.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// Decodes plaintext bytes that came out of decryption.
    ///
    /// # Errors
    /// Returns `None` if the bytes are not UTF-8 (they always are for values
    /// the vault wrote, so this means corruption).
    pub fn from_decrypted(bytes: Zeroizing<Vec<u8>>) -> Option<Self> {
        let text = std::str::from_utf8(&bytes).ok()?;
        Some(Self(Zeroizing::new(text.to_owned())))
    }

    /// The plaintext, for encryption or validation. Callers must not log,
    /// format or copy it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in bytes: safe to report, e.g. in a limit error.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hands the plaintext to the gRPC response encoder: the one place a
    /// value leaves the vault on purpose. The returned `String` is moved,
    /// not copied, into a response message, which clears it when tonic has
    /// encoded and dropped it (`proto.rs`).
    pub fn into_response_string(self) -> String {
        let mut guarded = self.0;
        std::mem::take(&mut *guarded)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes redacted>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = SecretValue::new("4111 1111 1111 1111".to_owned());
        let debug = format!("{secret:?}");
        assert!(!debug.contains("4111"));
        assert_eq!(debug, "SecretValue(<19 bytes redacted>)");
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert!(SecretValue::from_decrypted(Zeroizing::new(vec![0xff, 0xfe])).is_none());
    }
}
