//! Tokens and field types: the two names every request carries.
//!
//! Both are parsed, never validated after the fact: once code holds a
//! [`Token`] or a [`FieldType`], it is well formed.

use std::{fmt, str::FromStr, sync::LazyLock};

use data_encoding::Encoding;

/// How many random bytes a token carries: 128 bits from the OS CSPRNG.
const TOKEN_RANDOM_BYTES: usize = 16;

/// Length of the base32 text of [`TOKEN_RANDOM_BYTES`] without padding.
const TOKEN_RANDOM_CHARS: usize = 26;

/// The longest field type name accepted.
pub const MAX_FIELD_TYPE_LEN: usize = 32;

/// RFC 4648 base32, upper case, no padding, canonical trailing bits.
///
/// Upper case on purpose: tokens are `tok_<field type>_<random>`, and values
/// such as e-mail addresses are mostly lower case, so a random part never
/// looks like a piece of a value to a person reading logs.
static RANDOM_PART: LazyLock<Encoding> = LazyLock::new(|| data_encoding::BASE32_NOPAD.clone());

/// The kind of data a value is (`email`, `card_number`, ...).
///
/// A field type name is 1 to 32 characters of `a-z`, `0-9` and `_`, starting
/// with a letter. Whether the vault knows the field type is a separate
/// question answered by the configuration.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldType(String);

/// Why a string is not a field type name. Carries no part of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldTypeError {
    /// The name is empty.
    #[error("field_type is empty")]
    Empty,
    /// The name is longer than [`MAX_FIELD_TYPE_LEN`].
    #[error("field_type is longer than {MAX_FIELD_TYPE_LEN} characters")]
    TooLong,
    /// The name has characters outside `a-z0-9_` or does not start with a letter.
    #[error("field_type must be lower-case letters, digits and '_', starting with a letter")]
    BadCharacters,
}

impl FieldType {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for FieldType {
    type Err = FieldTypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(FieldTypeError::Empty);
        }
        if s.len() > MAX_FIELD_TYPE_LEN {
            return Err(FieldTypeError::TooLong);
        }
        let mut chars = s.chars();
        let first_is_letter = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !first_is_letter || !rest_ok {
            return Err(FieldTypeError::BadCharacters);
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FieldType({})", self.0)
    }
}

/// A token, in one of three shapes:
///
/// - opaque: `tok_<field type>_<26 base32 characters>`, the default;
/// - format-preserving: 12 to 19 digits, for card numbers;
/// - e-mail-shaped: `<26 lower-case base32 characters>@<token domain>`.
///
/// The random part of every shape comes from the operating system's CSPRNG
/// and is never derived from the value. Opaque tokens name their field type,
/// so a caller can see what a token is without asking the vault.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token {
    /// The field type, for opaque tokens.
    field_type: Option<FieldType>,
    /// The canonical text form, kept because it is the storage key and what
    /// callers hold.
    text: String,
}

/// Why a string is not a token. Never carries the input itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is empty.
    #[error("token is empty")]
    Empty,
    /// The token has none of the token shapes.
    #[error(
        "token is malformed: expected tok_<field_type>_<26 base32 characters>, 12 to 19 digits, or <26 base32 characters>@<domain>"
    )]
    Malformed,
}

/// Lower-case RFC 4648 base32 for the local part of e-mail-shaped tokens
/// (e-mail local parts are conventionally lower case).
static EMAIL_LOCAL: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.check_trailing_bits = true;
    spec.encoding()
        .unwrap_or_else(|_| unreachable!("a valid base32 alphabet"))
});

fn random_part() -> Result<[u8; TOKEN_RANDOM_BYTES], getrandom::Error> {
    let mut random = [0u8; TOKEN_RANDOM_BYTES];
    getrandom::fill(&mut random)?;
    Ok(random)
}

impl Token {
    /// A new random opaque token for `field_type`.
    ///
    /// # Errors
    /// Fails only if the operating system's random source fails.
    pub fn generate(field_type: &FieldType) -> Result<Self, getrandom::Error> {
        let text = format!("tok_{}_{}", field_type, RANDOM_PART.encode(&random_part()?));
        Ok(Self {
            field_type: Some(field_type.clone()),
            text,
        })
    }

    /// A new random e-mail-shaped token in `domain`.
    ///
    /// # Errors
    /// Fails only if the operating system's random source fails.
    pub fn email_shaped(domain: &str) -> Result<Self, getrandom::Error> {
        Ok(Self {
            field_type: None,
            text: format!("{}@{domain}", EMAIL_LOCAL.encode(&random_part()?)),
        })
    }

    /// A format-preserving token made by `fields::fpt`: ASCII digits.
    pub(crate) fn format_preserving(digits: String) -> Self {
        Self {
            field_type: None,
            text: digits,
        }
    }

    /// The field type named in the token (opaque tokens only).
    pub fn field_type(&self) -> Option<&FieldType> {
        self.field_type.as_ref()
    }

    /// The token as text, as callers hold it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The bytes the vault stores the record under.
    pub fn storage_key(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl FromStr for Token {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if let Some(rest) = s.strip_prefix("tok_") {
            let (field, random) = rest.rsplit_once('_').ok_or(TokenError::Malformed)?;
            let field_type: FieldType = field.parse().map_err(|_| TokenError::Malformed)?;
            check_random(&RANDOM_PART, random)?;
            return Ok(Self {
                field_type: Some(field_type),
                text: s.to_owned(),
            });
        }
        if (12..=19).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Self::format_preserving(s.to_owned()));
        }
        if let Some((local, domain)) = s.split_once('@') {
            check_random(&EMAIL_LOCAL, local)?;
            if !is_hostname(domain) || domain.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(TokenError::Malformed);
            }
            return Ok(Self {
                field_type: None,
                text: s.to_owned(),
            });
        }
        Err(TokenError::Malformed)
    }
}

/// Decoding checks the alphabet and that the unused trailing bits are zero,
/// so every token has exactly one accepted spelling.
fn check_random(encoding: &Encoding, random: &str) -> Result<(), TokenError> {
    if random.len() != TOKEN_RANDOM_CHARS {
        return Err(TokenError::Malformed);
    }
    let decoded = encoding
        .decode(random.as_bytes())
        .map_err(|_| TokenError::Malformed)?;
    if decoded.len() != TOKEN_RANDOM_BYTES {
        return Err(TokenError::Malformed);
    }
    Ok(())
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Tokens are not secret on their own, but a token next to its value in a log
/// is exactly the pair the vault exists to keep apart, so `Debug` shows only
/// the shape.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field_type {
            Some(ft) => write!(f, "Token(tok_{ft}_…)"),
            None if self.text.contains('@') => f.write_str("Token(…@…)"),
            None => write!(f, "Token(<{} digits>)", self.text.len()),
        }
    }
}

/// A DNS host name: LDH labels of 1 to 63 characters, 253 in all.
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> FieldType {
        "email".parse().unwrap()
    }

    #[test]
    fn generated_tokens_parse_back() {
        let token = Token::generate(&email()).unwrap();
        let parsed: Token = token.as_str().parse().unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.field_type(), Some(&email()));
        assert!(token.as_str().starts_with("tok_email_"));
        assert_eq!(
            token.as_str().len(),
            "tok_email_".len() + TOKEN_RANDOM_CHARS
        );
    }

    #[test]
    fn field_types_with_underscores_round_trip() {
        let ft: FieldType = "card_number".parse().unwrap();
        let token = Token::generate(&ft).unwrap();
        let parsed: Token = token.as_str().parse().unwrap();
        assert_eq!(parsed.field_type(), Some(&ft));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let good = Token::generate(&email()).unwrap().to_string();
        let cases = [
            String::new(),
            "tok_email".into(),
            "tok__AAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            "TOK_email_AAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            good.to_lowercase(),
            format!("{good}A"),
            good[..good.len() - 1].to_owned(),
            good.replace("tok_", "tak_"),
            // Non-canonical: the last character leaves trailing bits set.
            "tok_email_AAAAAAAAAAAAAAAAAAAAAAAAAB".into(),
            "tok_email_AAAAAAAAAAAAAAAAAAAAAAAA1A".into(),
            "41111111111".into(),
            "41111111111111111111".into(),
            "4111-1111-1111-1111".into(),
            "aaaaaaaaaaaaaaaaaaaaaaaaaa@".into(),
            "AAAAAAAAAAAAAAAAAAAAAAAAAA@tokens.example".into(),
            "aaaaaaaaaaaaaaaaaaaaaaaaa@tokens.example".into(),
            "aaaaaaaaaaaaaaaaaaaaaaaaaa@Tokens.example".into(),
        ];
        for case in cases {
            assert!(case.parse::<Token>().is_err(), "accepted {case:?}");
        }
    }

    #[test]
    fn other_shapes_parse() {
        let digits: Token = "4111110000001111".parse().unwrap();
        assert_eq!(digits.field_type(), None);
        let email = Token::email_shaped("tokens.example").unwrap();
        assert_eq!(email.as_str().parse::<Token>().unwrap(), email);
        assert!(!format!("{email:?}").contains("tokens.example"));
    }

    #[test]
    fn token_errors_never_echo_the_input() {
        let err = "tok_email_secret-looking-input"
            .parse::<Token>()
            .unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn debug_hides_the_random_part() {
        let token = Token::generate(&email()).unwrap();
        let random = token.as_str().rsplit_once('_').unwrap().1.to_owned();
        assert!(!format!("{token:?}").contains(&random));
    }

    #[test]
    fn field_type_names_are_checked() {
        for good in ["email", "card_number", "a", "x9"] {
            assert!(good.parse::<FieldType>().is_ok(), "{good}");
        }
        assert_eq!("".parse::<FieldType>(), Err(FieldTypeError::Empty));
        for bad in ["Email", "9x", "_x", "e-mail", "e mail", "émail"] {
            assert_eq!(
                bad.parse::<FieldType>(),
                Err(FieldTypeError::BadCharacters),
                "{bad}"
            );
        }
        let long = "a".repeat(MAX_FIELD_TYPE_LEN + 1);
        assert_eq!(long.parse::<FieldType>(), Err(FieldTypeError::TooLong));
    }
}
