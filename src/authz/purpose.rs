//! Purposes: why a caller asks for a value (`fraud_check`).

use std::{fmt, str::FromStr};

/// Why a caller wants plaintext back, e.g. `order_fulfilment`.
///
/// 1 to 64 characters of `a-z`, `0-9`, `_`, `-` and `.`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Purpose(String);

/// Why a string is not a purpose. Carries no part of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurposeError {
    /// No purpose was given.
    #[error("purpose is required")]
    Empty,
    /// Not of the allowed shape.
    #[error(
        "purpose must be 1 to 64 lower-case letters, digits, '_', '-' or '.', starting with a letter"
    )]
    Malformed,
}

impl Purpose {
    /// The purpose as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Purpose {
    type Err = PurposeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PurposeError::Empty);
        }
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c);
        if s.len() > 64
            || !s.starts_with(|c: char| c.is_ascii_lowercase())
            || !s.chars().all(ok_char)
        {
            return Err(PurposeError::Malformed);
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
