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

/// The lawful basis a purpose relies on (GDPR Art. 6(1) (a) to (f)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LegalBasis {
    /// (a) the subject's consent.
    Consent,
    /// (b) a contract with the subject, or steps before one.
    Contract,
    /// (c) a legal obligation of the controller.
    LegalObligation,
    /// (d) someone's vital interests.
    VitalInterests,
    /// (e) a task in the public interest or official authority.
    PublicTask,
    /// (f) the controller's or a third party's legitimate interests.
    LegitimateInterests,
}

impl LegalBasis {
    /// Every basis, in the order of Art. 6(1).
    pub const ALL: [LegalBasis; 6] = [
        LegalBasis::Consent,
        LegalBasis::Contract,
        LegalBasis::LegalObligation,
        LegalBasis::VitalInterests,
        LegalBasis::PublicTask,
        LegalBasis::LegitimateInterests,
    ];

    /// The name the config and the API use.
    pub fn name(self) -> &'static str {
        match self {
            LegalBasis::Consent => "consent",
            LegalBasis::Contract => "contract",
            LegalBasis::LegalObligation => "legal_obligation",
            LegalBasis::VitalInterests => "vital_interests",
            LegalBasis::PublicTask => "public_task",
            LegalBasis::LegitimateInterests => "legitimate_interests",
        }
    }
}

impl FromStr for LegalBasis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|b| b.name()).collect();
                format!("{s:?} is not a legal basis (one of {})", names.join(", "))
            })
    }
}

impl fmt::Display for LegalBasis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a purpose is for and on what lawful basis: `[purposes.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurposeDeclaration {
    /// What the purpose is, in words a data subject reads.
    pub description: String,
    /// The lawful basis it relies on.
    pub legal_basis: LegalBasis,
}
