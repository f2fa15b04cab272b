//! Field types: what kind of data each configured field type holds, how its
//! values are validated and normalised, what its tokens look like, whether
//! tokenization is deterministic, and how its values are masked.

pub mod fpt;
pub mod kinds;
mod mask;

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::{Deserialize, Serialize};

pub use fpt::{Head, Luhn};
pub use mask::{MaskRule, MaskRuleError};

use crate::{
    crypto::SecretValue,
    token::{FieldType, Token},
};

/// `[field_types.<name>]`. Every key is optional; see `examples/tokenvault.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFieldType {
    /// One of the built-in kinds; defaults to the field type's name if that
    /// is a kind, else `text`.
    pub kind: Option<String>,
    /// Largest value of this type, in bytes (at most `limits.max_value_bytes`).
    pub max_value_bytes: Option<usize>,
    /// `opaque` (default), `format_preserving` (card numbers) or `email`.
    pub token_format: Option<String>,
    /// Equal values get equal tokens (a keyed blind index finds them).
    pub deterministic: Option<bool>,
    /// Default retention of values, in days.
    pub retention_days: Option<u32>,
    /// Mask rule for `reveal_masked`: `full`, `email`, `last:N`, `first:N`.
    pub mask: Option<String>,
    /// For `national_id`: the regular expression an identifier must match.
    pub pattern: Option<String>,
    /// For `phone`: the ISO 3166 region of numbers without a country code.
    pub default_region: Option<String>,
    /// For format-preserving tokens: keep this many leading digits (0–6, default 6).
    pub keep_first_digits: Option<usize>,
    /// For format-preserving tokens: start with this reserved prefix instead.
    pub token_prefix: Option<String>,
    /// For format-preserving tokens: `invalid` (default) or `valid` Luhn.
    pub luhn: Option<Luhn>,
    /// For `email` tokens: the domain they end in.
    pub token_domain: Option<String>,
    /// Purposes for which detokenizing a subject's value of this type needs
    /// the subject's recorded consent (e.g. `marketing`). Purposes not listed
    /// (e.g. `fraud_prevention`, `legal_obligation`) need none.
    pub consent_purposes: Option<Vec<String>>,
}

/// The built-in kinds of data.
#[derive(Debug, Clone)]
pub enum FieldKind {
    /// An e-mail address.
    Email,
    /// A phone number, stored as E.164; numbers without a country code are
    /// read in the region if one is set.
    Phone(Option<phonenumber::country::Id>),
    /// A payment card number (PAN).
    CardNumber,
    /// An ISO 8601 calendar date.
    Date,
    /// A person's name.
    Name,
    /// A postal address.
    Address,
    /// A national identifier matching a configured pattern.
    NationalId(regex::Regex),
    /// Free text.
    Text,
}

impl FieldKind {
    /// The kind's name, as `kind = "..."` writes it.
    pub fn name(&self) -> &'static str {
        match self {
            FieldKind::Email => "email",
            FieldKind::Phone(_) => "phone",
            FieldKind::CardNumber => "card_number",
            FieldKind::Date => "date",
            FieldKind::Name => "name",
            FieldKind::Address => "address",
            FieldKind::NationalId(_) => "national_id",
            FieldKind::Text => "text",
        }
    }
}

/// What tokens of a field type look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFormat {
    /// `tok_<field type>_<26 base32>`: 128 random bits. The default.
    Opaque,
    /// Card-shaped: same length, digits, last four kept (card numbers only).
    FormatPreserving {
        /// The first digits.
        head: Head,
        /// Whether tokens pass the Luhn check.
        luhn: Luhn,
    },
    /// `<26 base32>@<domain>`, for systems that validate e-mail addresses.
    Email {
        /// The domain tokens end in (one you control, that never receives mail).
        domain: String,
    },
}

/// Everything the vault knows about one field type.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    /// The field type's name.
    pub name: FieldType,
    /// The kind of data.
    pub kind: FieldKind,
    /// Largest value, in bytes, before and after normalisation.
    pub max_value_bytes: usize,
    /// Token shape.
    pub token_format: TokenFormat,
    /// Whether equal values get equal tokens.
    pub deterministic: bool,
    /// How long values are kept by default (`None`: until deleted).
    pub retention: Option<Duration>,
    /// How the value is masked for callers with only `reveal_masked`.
    pub mask: MaskRule,
    /// Purposes that need the subject's consent to reveal a value.
    pub consent_purposes: std::collections::BTreeSet<String>,
}

/// A value that broke its field type's rules. Names the rule, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field type {field_type}: value {rule}")]
pub struct ValidationError {
    /// The field type.
    pub field_type: FieldType,
    /// The rule broken, e.g. "is longer than 320 bytes".
    pub rule: String,
}

impl FieldSpec {
    /// Validates `value` and returns its normalised form.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the broken rule.
    pub fn normalize(&self, value: &SecretValue) -> Result<SecretValue, ValidationError> {
        let invalid = |rule: String| ValidationError {
            field_type: self.name.clone(),
            rule,
        };
        let raw = value.expose();
        if raw.is_empty() {
            return Err(invalid("is empty".into()));
        }
        if raw.len() > self.max_value_bytes {
            return Err(invalid(format!(
                "is {} bytes, longer than the {} allowed (max_value_bytes)",
                raw.len(),
                self.max_value_bytes
            )));
        }
        let normalized = match &self.kind {
            FieldKind::Email => kinds::email(raw),
            FieldKind::Phone(region) => kinds::phone(raw, *region),
            FieldKind::CardNumber => kinds::card_number(raw),
            FieldKind::Date => kinds::date(raw),
            FieldKind::Name => kinds::name(raw),
            FieldKind::Address => kinds::address(raw),
            FieldKind::NationalId(pattern) => kinds::national_id(raw, pattern),
            FieldKind::Text => kinds::text(raw),
        }
        .map_err(|rule| invalid(rule.to_owned()))?;
        if normalized.len() > self.max_value_bytes {
            return Err(invalid(format!(
                "is longer than the {} bytes allowed once normalised",
                self.max_value_bytes
            )));
        }
        Ok(SecretValue::new(normalized.to_string()))
    }

    /// A new random token in this field type's format for the normalised
    /// `value` (format-preserving tokens keep some of its digits).
    ///
    /// # Errors
    /// If the random source fails or a card is too short for the format.
    pub fn new_token(&self, value: &SecretValue) -> Result<Token, TokenError> {
        match &self.token_format {
            TokenFormat::Opaque => Token::generate(&self.name).map_err(|_| TokenError::Random),
            TokenFormat::FormatPreserving { head, luhn } => {
                let digits = fpt::generate(value.expose(), head, *luhn).map_err(|e| match e {
                    Some(_) => TokenError::TooShort,
                    None => TokenError::Random,
                })?;
                Ok(Token::format_preserving(digits))
            }
            TokenFormat::Email { domain } => {
                Token::email_shaped(domain).map_err(|_| TokenError::Random)
            }
        }
    }

    /// Whether tokens of this format come from a space small enough that a
    /// collision must be checked for when storing.
    pub fn tokens_may_collide(&self) -> bool {
        matches!(self.token_format, TokenFormat::FormatPreserving { .. })
    }

    /// The masked form of a (normalised) value.
    pub fn masked(&self, value: &SecretValue) -> String {
        self.mask.apply(value.expose())
    }
}

/// Why a token could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The random source failed.
    #[error("the random source failed")]
    Random,
    /// The card is too short for the configured format-preserving head.
    #[error("the card number is too short for this field type's format-preserving tokens")]
    TooShort,
}

/// All configured field types.
#[derive(Debug, Clone, Default)]
pub struct FieldRegistry {
    specs: BTreeMap<FieldType, FieldSpec>,
}

impl FieldRegistry {
    /// The spec of `field_type`, if configured.
    pub fn get(&self, field_type: &FieldType) -> Option<&FieldSpec> {
        self.specs.get(field_type)
    }

    /// Whether `field_type` is configured.
    pub fn contains(&self, field_type: &FieldType) -> bool {
        self.specs.contains_key(field_type)
    }

    /// Every spec, by name.
    pub fn iter(&self) -> impl Iterator<Item = &FieldSpec> {
        self.specs.values()
    }

    /// How many field types are configured.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Builds the registry from the `[field_types]` tables.
    ///
    /// # Errors
    /// The first bad setting.
    pub fn from_raw(
        raw: &BTreeMap<String, RawFieldType>,
        max_value_bytes: usize,
    ) -> Result<Self, InvalidSetting> {
        let mut specs = BTreeMap::new();
        for (name, settings) in raw {
            let spec = spec_from_raw(name, settings, max_value_bytes)
                .map_err(|(key, message)| InvalidSetting { key, message })?;
            specs.insert(spec.name.clone(), spec);
        }
        Ok(Self { specs })
    }
}

/// A `[field_types]` setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidSetting {
    /// The setting's full key, e.g. `field_types.card_number.luhn`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

fn spec_from_raw(
    name: &str,
    raw: &RawFieldType,
    limit: usize,
) -> Result<FieldSpec, (String, String)> {
    let key = |k: &str| {
        format!(
            "field_types.{name}{}{k}",
            if k.is_empty() { "" } else { "." }
        )
    };
    let field_type: FieldType = name.parse().map_err(|e| (key(""), format!("{e}")))?;
    let kind_name = raw.kind.clone().unwrap_or_else(|| {
        if BUILTIN_KINDS.contains(&name) {
            name.to_owned()
        } else {
            "text".to_owned()
        }
    });
    if kind_name != "phone" && raw.default_region.is_some() {
        return Err((
            key("default_region"),
            "only phone field types have a default_region".into(),
        ));
    }
    if kind_name != "national_id" && raw.pattern.is_some() {
        return Err((
            key("pattern"),
            "only national_id field types have a pattern".into(),
        ));
    }
    let kind = match kind_name.as_str() {
        "email" => FieldKind::Email,
        "phone" => FieldKind::Phone(match &raw.default_region {
            None => None,
            Some(region) => Some(region.parse().map_err(|_| {
                (
                    key("default_region"),
                    format!("{region:?} is not an ISO 3166 region code such as GB or US"),
                )
            })?),
        }),
        "card_number" => FieldKind::CardNumber,
        "date" => FieldKind::Date,
        "name" => FieldKind::Name,
        "address" => FieldKind::Address,
        "national_id" => {
            let pattern = raw
                .pattern
                .as_deref()
                .unwrap_or(DEFAULT_NATIONAL_ID_PATTERN);
            // Anchored, so the pattern must match the whole identifier.
            let regex = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                (
                    key("pattern"),
                    format!("not a valid regular expression: {e}"),
                )
            })?;
            FieldKind::NationalId(regex)
        }
        "text" => FieldKind::Text,
        other => {
            return Err((
                key("kind"),
                format!(
                    "unknown kind {other:?}; one of {}",
                    BUILTIN_KINDS.join(", ")
                ),
            ));
        }
    };
    let max_value_bytes = raw.max_value_bytes.unwrap_or(limit);
    if max_value_bytes == 0 || max_value_bytes > limit {
        return Err((
            key("max_value_bytes"),
            format!("must be between 1 and limits.max_value_bytes ({limit})"),
        ));
    }
    let token_format = match raw.token_format.as_deref().unwrap_or("opaque") {
        "opaque" => TokenFormat::Opaque,
        "format_preserving" => {
            if !matches!(kind, FieldKind::CardNumber) {
                return Err((
                    key("token_format"),
                    "format_preserving tokens are for card_number field types".into(),
                ));
            }
            let head = match (&raw.token_prefix, raw.keep_first_digits) {
                (Some(_), Some(_)) => {
                    return Err((
                        key("token_prefix"),
                        "set token_prefix or keep_first_digits, not both".into(),
                    ));
                }
                (Some(prefix), None) => {
                    if prefix.is_empty()
                        || prefix.len() > fpt::MAX_HEAD_DIGITS
                        || !prefix.chars().all(|c| c.is_ascii_digit())
                    {
                        return Err((
                            key("token_prefix"),
                            format!(
                                "must be 1 to {} digits, so that a 16-digit card's token keeps {} random digits",
                                fpt::MAX_HEAD_DIGITS,
                                fpt::MIN_RANDOM_DIGITS
                            ),
                        ));
                    }
                    Head::Prefix(prefix.clone())
                }
                (None, keep) => {
                    let keep = keep.unwrap_or(0);
                    if keep > fpt::MAX_HEAD_DIGITS {
                        return Err((
                            key("keep_first_digits"),
                            format!(
                                "must be 0 to {}, so that a 16-digit card's token keeps {} random digits (with more kept, one caller can use up every token of a BIN and last four)",
                                fpt::MAX_HEAD_DIGITS,
                                fpt::MIN_RANDOM_DIGITS
                            ),
                        ));
                    }
                    Head::KeepFirst(keep)
                }
            };
            TokenFormat::FormatPreserving {
                head,
                luhn: raw.luhn.unwrap_or(Luhn::Invalid),
            }
        }
        "email" => {
            let domain = raw.token_domain.clone().ok_or_else(|| {
                (
                    key("token_domain"),
                    "email tokens need a token_domain".into(),
                )
            })?;
            if !crate::token::is_hostname(&domain) || !domain.contains('.') {
                return Err((
                    key("token_domain"),
                    format!("{domain:?} is not a domain name"),
                ));
            }
            TokenFormat::Email {
                domain: domain.to_ascii_lowercase(),
            }
        }
        other => {
            return Err((
                key("token_format"),
                format!("unknown token format {other:?}; one of opaque, format_preserving, email"),
            ));
        }
    };
    if !matches!(token_format, TokenFormat::FormatPreserving { .. })
        && (raw.keep_first_digits.is_some() || raw.token_prefix.is_some() || raw.luhn.is_some())
    {
        return Err((
            key("token_format"),
            "keep_first_digits, token_prefix and luhn need token_format = \"format_preserving\""
                .into(),
        ));
    }
    let mask = match &raw.mask {
        Some(m) => m
            .parse()
            .map_err(|e: MaskRuleError| (key("mask"), e.to_string()))?,
        None => default_mask(&kind),
    };
    let retention = match raw.retention_days {
        Some(0) => {
            return Err((
                key("retention_days"),
                "must be at least 1 (omit it to keep values until deleted)".into(),
            ));
        }
        Some(days) => Some(Duration::from_secs(u64::from(days) * 86_400)),
        None => None,
    };
    let mut consent_purposes = std::collections::BTreeSet::new();
    for purpose in raw.consent_purposes.iter().flatten() {
        let parsed: crate::authz::Purpose = purpose
            .parse()
            .map_err(|e| (key("consent_purposes"), format!("{purpose:?}: {e}")))?;
        consent_purposes.insert(parsed.as_str().to_owned());
    }
    Ok(FieldSpec {
        consent_purposes,
        name: field_type,
        kind,
        max_value_bytes,
        token_format,
        deterministic: raw.deterministic.unwrap_or(false),
        retention,
        mask,
    })
}

/// Kinds, by the names the config uses.
pub const BUILTIN_KINDS: [&str; 8] = [
    "email",
    "phone",
    "card_number",
    "date",
    "name",
    "address",
    "national_id",
    "text",
];

/// Upper-case letters, digits and dashes, 4 to 32 of them: set `pattern` for
/// your country's format.
const DEFAULT_NATIONAL_ID_PATTERN: &str = "[A-Z0-9-]{4,32}";

fn default_mask(kind: &FieldKind) -> MaskRule {
    match kind {
        FieldKind::Email => MaskRule::Email,
        FieldKind::Phone(_) | FieldKind::CardNumber | FieldKind::NationalId(_) => {
            MaskRule::KeepLast(4)
        }
        FieldKind::Name => MaskRule::KeepFirst(1),
        FieldKind::Date | FieldKind::Address | FieldKind::Text => MaskRule::Full,
    }
}

impl fmt::Display for FieldSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.kind.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(toml_text: &str) -> Result<FieldRegistry, InvalidSetting> {
        let raw: BTreeMap<String, RawFieldType> = toml::from_str(toml_text).unwrap();
        FieldRegistry::from_raw(&raw, 4096)
    }

    fn spec(toml_text: &str, name: &str) -> FieldSpec {
        registry(toml_text)
            .unwrap()
            .get(&name.parse().unwrap())
            .unwrap()
            .clone()
    }

    #[test]
    fn kinds_default_from_builtin_names() {
        let card = spec("[card_number]", "card_number");
        assert!(matches!(card.kind, FieldKind::CardNumber));
        assert_eq!(card.mask, MaskRule::KeepLast(4));
        let notes = spec("[notes]", "notes");
        assert!(matches!(notes.kind, FieldKind::Text));
    }

    #[test]
    fn validation_errors_name_the_rule_and_not_the_value() {
        let email = spec("[email]", "email");
        let err = email
            .normalize(&SecretValue::new("ada-at-example.com".into()))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("field type email: value is not an e-mail address"),
            "{err}"
        );
        assert!(!err.to_string().contains("ada-at"));
        let card = spec("[card_number]", "card_number");
        let err = card
            .normalize(&SecretValue::new("4111 1111 1111 1112".into()))
            .unwrap_err();
        assert!(err.to_string().contains("Luhn"), "{err}");
        assert!(!err.to_string().contains("4111"));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let cases = [
            ("[x]\nkind = \"iban\"", "field_types.x.kind"),
            (
                "[email]\ntoken_format = \"format_preserving\"",
                "field_types.email.token_format",
            ),
            (
                "[email]\ntoken_format = \"email\"",
                "field_types.email.token_domain",
            ),
            (
                // Six kept digits (the whole BIN) leave a 16-digit card
                // six random ones: too few (see fpt::MIN_RANDOM_DIGITS).
                "[card_number]\ntoken_format = \"format_preserving\"\nkeep_first_digits = 6",
                "field_types.card_number.keep_first_digits",
            ),
            (
                "[card_number]\ntoken_format = \"format_preserving\"\ntoken_prefix = \"99999\"",
                "field_types.card_number.token_prefix",
            ),
            (
                "[card_number]\nluhn = \"valid\"",
                "field_types.card_number.token_format",
            ),
            (
                "[phone]\ndefault_region = \"XX\"",
                "field_types.phone.default_region",
            ),
            (
                "[national_id]\npattern = \"[\"",
                "field_types.national_id.pattern",
            ),
            ("[email]\nmask = \"middle:3\"", "field_types.email.mask"),
            (
                "[email]\nmax_value_bytes = 5000",
                "field_types.email.max_value_bytes",
            ),
        ];
        for (text, key) in cases {
            let InvalidSetting { key: got, message } = registry(text).unwrap_err();
            assert_eq!(got, key, "{text}: {message}");
        }
    }

    #[test]
    fn token_formats() {
        let card = spec(
            "[card_number]\ntoken_format = \"format_preserving\"\nkeep_first_digits = 4\nluhn = \"valid\"",
            "card_number",
        );
        let value = card
            .normalize(&SecretValue::new("4111 1111 1111 1111".into()))
            .unwrap();
        let token = card.new_token(&value).unwrap();
        assert_eq!(token.as_str().len(), 16);
        assert!(token.as_str().starts_with("4111") && token.as_str().ends_with("1111"));
        assert!(card.tokens_may_collide());
        let email = spec(
            "[email]\ntoken_format = \"email\"\ntoken_domain = \"tokens.shop.example\"",
            "email",
        );
        let token = email
            .new_token(&SecretValue::new("a@b.example".into()))
            .unwrap();
        assert!(token.as_str().ends_with("@tokens.shop.example"), "{token}");
        assert_eq!(token.as_str().parse::<Token>().unwrap(), token);
    }
}
