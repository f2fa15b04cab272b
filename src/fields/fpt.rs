//! Format-preserving tokens for card numbers: the same length, digits only,
//! the last four kept, the head kept or replaced by a reserved prefix, and a
//! Luhn check that passes or deliberately fails as configured. The middle
//! digits are random, never derived from the value.
//!
//! Every token has at least [`MIN_RANDOM_DIGITS`] random digits. Tokens of
//! one card "bucket" (same head, same last four) are drawn from those digits
//! alone, so a caller allowed to tokenize could otherwise fill a bucket and
//! make every later card with that head and tail fail: with 6 + 4 digits kept
//! of a 16-digit card, fewer than a million tokens exhaust it. With eight
//! random digits (one of them partly fixed by the Luhn rule) a bucket holds
//! about 90 million tokens.

use super::kinds::luhn_sum;

/// The fewest random digits a token has.
pub const MIN_RANDOM_DIGITS: usize = 8;

/// The longest head (kept digits or reserved prefix) a field type may
/// configure: what a 16-digit card leaves after its last four and
/// [`MIN_RANDOM_DIGITS`]. Shorter cards keep fewer digits (see [`generate`]).
pub const MAX_HEAD_DIGITS: usize = 16 - 4 - MIN_RANDOM_DIGITS;

/// What the first digits of a token are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// Keep up to the first N digits of the card (0 to [`MAX_HEAD_DIGITS`]);
    /// a card shorter than 16 digits keeps fewer, so that
    /// [`MIN_RANDOM_DIGITS`] stay random.
    KeepFirst(usize),
    /// Start with this reserved prefix instead (e.g. a range no issuer uses).
    Prefix(String),
}

/// Whether tokens pass the Luhn check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Luhn {
    /// Tokens pass, for systems that validate card numbers on input.
    Valid,
    /// Tokens fail, so a token can never be mistaken for (or charged as) a card.
    Invalid,
}

/// Why no token can be made for this card with this configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "card number too short for a format-preserving token with this prefix (a token needs 8 random digits besides the prefix and the last four)"
)]
pub struct TooShort;

/// A token for the card `digits` (already normalised: ASCII digits only).
///
/// # Errors
/// [`TooShort`] if a reserved prefix and the last four leave fewer than
/// [`MIN_RANDOM_DIGITS`] to randomise (a kept head shrinks instead);
/// `getrandom` failures as `Err(None)`.
pub fn generate(digits: &str, head: &Head, luhn: Luhn) -> Result<String, Option<TooShort>> {
    let len = digits.len();
    let room = len.saturating_sub(4 + MIN_RANDOM_DIGITS);
    let head: String = match head {
        Head::KeepFirst(n) => digits[..(*n).min(room)].to_owned(),
        Head::Prefix(p) => p.clone(),
    };
    if head.len() > room {
        return Err(Some(TooShort));
    }
    let tail = &digits[len - 4..];
    loop {
        let middle_len = len - head.len() - 4;
        let mut middle = random_digits(middle_len).map_err(|_| None)?;
        // Fix the last middle digit so the whole passes or fails Luhn as
        // asked. For any position, the digit → Luhn contribution map is a
        // bijection on 0..=9, so exactly one digit makes the sum divisible
        // by ten.
        let candidate = |d: u8, middle: &[u8]| {
            let mut all: Vec<u8> = head.bytes().map(|b| b - b'0').collect();
            all.extend_from_slice(&middle[..middle.len() - 1]);
            all.push(d);
            all.extend(tail.bytes().map(|b| b - b'0'));
            luhn_sum(all.into_iter()).is_multiple_of(10)
        };
        let wanted: Vec<u8> = (0..10u8)
            .filter(|d| candidate(*d, &middle) == (luhn == Luhn::Valid))
            .collect();
        let pick = random_digits(1).map_err(|_| None)?[0] as usize % wanted.len();
        let last = middle.len() - 1;
        middle[last] = wanted[pick];
        let token: String = head
            .chars()
            .chain(middle.iter().map(|d| char::from(b'0' + d)))
            .chain(tail.chars())
            .collect();
        if token != digits {
            return Ok(token);
        }
    }
}

/// Uniform random decimal digits from the OS CSPRNG (rejection sampling).
fn random_digits(n: usize) -> Result<Vec<u8>, getrandom::Error> {
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 32];
    while out.len() < n {
        getrandom::fill(&mut buf)?;
        out.extend(
            buf.iter()
                .filter(|b| **b < 250)
                .map(|b| b % 10)
                .take(n - out.len()),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::fields::kinds::luhn_valid;

    fn card(len: usize, seed: &str) -> String {
        // A Luhn-valid card of `len` digits built from `seed`.
        let mut body: String = seed.chars().cycle().take(len - 1).collect();
        for check in 0..10 {
            let candidate = format!("{body}{check}");
            if luhn_valid(&candidate) {
                body = candidate;
                break;
            }
        }
        body
    }

    proptest! {
        #[test]
        fn tokens_keep_shape_tail_and_head(len in 12usize..=19, seed in "[0-9]{18}", keep in 0usize..=MAX_HEAD_DIGITS, valid in any::<bool>()) {
            let digits = card(len, &seed);
            let luhn = if valid { Luhn::Valid } else { Luhn::Invalid };
            let token = generate(&digits, &Head::KeepFirst(keep), luhn).unwrap();
            prop_assert_eq!(token.len(), digits.len());
            prop_assert!(token.chars().all(|c| c.is_ascii_digit()));
            prop_assert_eq!(&token[token.len() - 4..], &digits[digits.len() - 4..]);
            let kept = keep.min(len - 4 - MIN_RANDOM_DIGITS);
            prop_assert_eq!(&token[..kept], &digits[..kept]);
            prop_assert_eq!(luhn_valid(&token), valid);
            prop_assert_ne!(&token, &digits);
        }

        #[test]
        fn reserved_prefixes_are_used(seed in "[0-9]{18}", valid in any::<bool>()) {
            let digits = card(16, &seed);
            let luhn = if valid { Luhn::Valid } else { Luhn::Invalid };
            let token = generate(&digits, &Head::Prefix("999".into()), luhn).unwrap();
            prop_assert!(token.starts_with("999"));
            prop_assert_eq!(luhn_valid(&token), valid);
        }
    }

    #[test]
    fn tokens_are_random() {
        let digits = card(16, "4111111111111111");
        let a = generate(&digits, &Head::KeepFirst(6), Luhn::Invalid).unwrap();
        let b = generate(&digits, &Head::KeepFirst(6), Luhn::Invalid).unwrap();
        let c = generate(&digits, &Head::KeepFirst(6), Luhn::Invalid).unwrap();
        assert!(a != b || b != c, "three identical tokens");
    }

    #[test]
    fn a_token_always_has_eight_random_digits() {
        // A 12-digit card keeps no head at all: 12 - 4 leaves exactly eight.
        let short = card(12, "5018000000000000");
        let tokens: std::collections::HashSet<String> = (0..64)
            .map(|_| generate(&short, &Head::KeepFirst(4), Luhn::Invalid).unwrap())
            .collect();
        // With the head kept, only 10^3 tokens would exist in the bucket and
        // 64 draws would almost surely collide; with eight random digits
        // they are all distinct, and not all start like the card.
        assert_eq!(tokens.len(), 64);
        assert!(tokens.iter().any(|t| !t.starts_with(&short[..4])));
        // A reserved prefix cannot shrink: such cards are refused.
        assert_eq!(
            generate(&short, &Head::Prefix("9".into()), Luhn::Valid),
            Err(Some(TooShort))
        );
        assert!(generate(&card(13, "5018"), &Head::Prefix("9".into()), Luhn::Valid).is_ok());
    }
}
