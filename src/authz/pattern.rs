//! Identity patterns: which certificate identities a policy rule names.

use std::fmt;

use super::PolicyError;
use crate::identity::{ClientId, IdentityKind};

/// An identity pattern: the kind of identity it matches and a glob over
/// that identity's text (exact, or `*` wildcards matching any run of
/// characters).
///
/// Written `spiffe://shop.example/ns/payments/*` (SPIFFE IDs from a URI
/// SAN), `dns:*.billing.internal` (DNS SANs) or `cn:billing` (common names).
/// A pattern never matches an identity of another kind, so a certificate
/// whose common name spells a SPIFFE ID cannot pass for that SPIFFE ID. A
/// pattern that names no kind is refused rather than guessed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPattern {
    kind: IdentityKind,
    glob: String,
}

impl IdentityPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// If `pattern` is empty or names no kind of identity.
    pub fn new(pattern: &str) -> Result<Self, PolicyError> {
        let (kind, glob) = if pattern.starts_with("spiffe://") {
            (IdentityKind::Spiffe, pattern)
        } else if let Some(glob) = pattern.strip_prefix("dns:") {
            (IdentityKind::Dns, glob)
        } else if let Some(glob) = pattern.strip_prefix("cn:") {
            (IdentityKind::CommonName, glob)
        } else if pattern.is_empty() {
            return Err(PolicyError::EmptyIdentity);
        } else {
            return Err(PolicyError::NoIdentityKind(pattern.to_owned()));
        };
        if glob.is_empty() {
            return Err(PolicyError::EmptyIdentity);
        }
        Ok(Self {
            kind,
            glob: glob.to_owned(),
        })
    }

    /// Whether `id` is of this pattern's kind and its text matches.
    pub fn matches(&self, id: &ClientId) -> bool {
        id.kind() == self.kind && glob_match(self.glob.as_bytes(), id.name().as_bytes())
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind.prefix(), self.glob)
    }
}

/// `*` matches any run of bytes; everything else matches itself. Iterative
/// with one backtrack point, so it is linear-ish and cannot blow the stack.
pub(super) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}
