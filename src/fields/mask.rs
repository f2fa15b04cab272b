//! Masked forms of values, for callers allowed to see only part of them.

use std::{fmt, str::FromStr};

/// How a value is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskRule {
    /// Nothing shown: a fixed `********`, which does not even leak the length.
    Full,
    /// The last N characters shown, the rest as `*`.
    KeepLast(usize),
    /// The first N characters shown, the rest as `*`.
    KeepFirst(usize),
    /// An e-mail address: the first character of the local part and the domain.
    Email,
}

/// Why a string is not a mask rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mask must be full, email, last:N or first:N (N from 1 to 8)")]
pub struct MaskRuleError;

impl FromStr for MaskRule {
    type Err = MaskRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let count = |n: &str| match n.parse::<usize>() {
            Ok(n @ 1..=8) => Ok(n),
            _ => Err(MaskRuleError),
        };
        match s {
            "full" => Ok(MaskRule::Full),
            "email" => Ok(MaskRule::Email),
            _ => match s.split_once(':') {
                Some(("last", n)) => count(n).map(MaskRule::KeepLast),
                Some(("first", n)) => count(n).map(MaskRule::KeepFirst),
                _ => Err(MaskRuleError),
            },
        }
    }
}

impl fmt::Display for MaskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskRule::Full => f.write_str("full"),
            MaskRule::Email => f.write_str("email"),
            MaskRule::KeepLast(n) => write!(f, "last:{n}"),
            MaskRule::KeepFirst(n) => write!(f, "first:{n}"),
        }
    }
}

impl MaskRule {
    /// The masked form of `value`. At most half of a value is ever shown,
    /// whatever N says, so a short value is never revealed whole.
    pub fn apply(self, value: &str) -> String {
        let chars: Vec<char> = value.chars().collect();
        let cap = |n: usize| n.min(chars.len() / 2);
        match self {
            MaskRule::Full => "********".into(),
            MaskRule::KeepLast(n) => {
                let keep = cap(n);
                let hidden = chars.len() - keep;
                "*".repeat(hidden) + &chars[hidden..].iter().collect::<String>()
            }
            MaskRule::KeepFirst(n) => {
                let keep = cap(n);
                chars[..keep].iter().collect::<String>() + &"*".repeat(chars.len() - keep)
            }
            MaskRule::Email => match value.rsplit_once('@') {
                Some((local, domain)) => {
                    let first: String = local.chars().take(1).collect();
                    format!("{first}***@{domain}")
                }
                None => "********".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print() {
        for s in ["full", "email", "last:4", "first:1"] {
            assert_eq!(s.parse::<MaskRule>().unwrap().to_string(), s);
        }
        for s in ["last:0", "last:9", "middle:2", "last", ""] {
            assert!(s.parse::<MaskRule>().is_err(), "{s}");
        }
    }

    #[test]
    fn masks() {
        assert_eq!(
            MaskRule::KeepLast(4).apply("4111111111111111"),
            "************1111"
        );
        assert_eq!(
            MaskRule::Email.apply("ada.lovelace@example.com"),
            "a***@example.com"
        );
        assert_eq!(
            MaskRule::KeepLast(4).apply("+442079460958"),
            "*********0958"
        );
        assert_eq!(MaskRule::KeepFirst(1).apply("Ada Lovelace"), "A***********");
        assert_eq!(MaskRule::Full.apply("1815-12-10"), "********");
        // Never more than half.
        assert_eq!(MaskRule::KeepLast(4).apply("abc"), "**c");
        assert_eq!(MaskRule::KeepFirst(8).apply("Zoë"), "Z**");
    }
}
