//! Validation and normalisation for each built-in kind of field.
//!
//! Every function returns the normalised value or the rule the input broke,
//! never the input itself. Normalisation is idempotent: normalising a
//! normalised value returns it unchanged (property-tested below).

use unicode_normalization::UnicodeNormalization;
use zeroize::Zeroizing;

/// The rule a value broke, phrased to follow "value": safe to show to the
/// caller and to log.
pub type Rule = &'static str;

/// `local@domain`: trimmed, domain lower-cased, local part kept as given
/// (it may be case-sensitive).
pub fn email(value: &str) -> Result<Zeroizing<String>, Rule> {
    const RULE: Rule = "is not an e-mail address (expected local-part@domain.tld)";
    let value = value.trim();
    let (local, domain) = value.rsplit_once('@').ok_or(RULE)?;
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
    if !local_ok {
        return Err(RULE);
    }
    let domain = domain.to_ascii_lowercase();
    if !crate::token::is_hostname(&domain) || !domain.contains('.') {
        return Err(RULE);
    }
    let tld = domain.rsplit('.').next().unwrap_or_default();
    if tld.len() < 2 || !tld.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(RULE);
    }
    Ok(Zeroizing::new(format!("{local}@{domain}")))
}

/// A phone number in E.164 (`+442079460958`). Numbers without a country
/// code are read in `region` if one is configured.
pub fn phone(
    value: &str,
    region: Option<phonenumber::country::Id>,
) -> Result<Zeroizing<String>, Rule> {
    let number = phonenumber::parse(region, value.trim()).map_err(|_| {
        if region.is_some() {
            "is not a phone number"
        } else {
            "is not a phone number in international format (+country code)"
        }
    })?;
    if !phonenumber::is_valid(&number) {
        return Err("is not a valid phone number for its country");
    }
    Ok(Zeroizing::new(
        number.format().mode(phonenumber::Mode::E164).to_string(),
    ))
}

/// Digits only (spaces and dashes removed), 12 to 19 of them, Luhn-valid.
pub fn card_number(value: &str) -> Result<Zeroizing<String>, Rule> {
    let digits: Zeroizing<String> =
        Zeroizing::new(value.chars().filter(|c| *c != ' ' && *c != '-').collect());
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err("must be digits (spaces and dashes allowed)");
    }
    if !(12..=19).contains(&digits.len()) {
        return Err("must have 12 to 19 digits");
    }
    if !luhn_valid(&digits) {
        return Err("fails the Luhn check");
    }
    Ok(digits)
}

/// Whether a string of ASCII digits passes the Luhn check.
pub fn luhn_valid(digits: &str) -> bool {
    luhn_sum(digits.bytes().map(|b| b - b'0')) % 10 == 0
}

/// The Luhn sum of digits given most significant first.
pub fn luhn_sum(digits: impl DoubleEndedIterator<Item = u8>) -> u32 {
    digits
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum()
}

/// An ISO 8601 calendar date, `YYYY-MM-DD`, that exists.
pub fn date(value: &str) -> Result<Zeroizing<String>, Rule> {
    const RULE: Rule = "is not an ISO 8601 calendar date (YYYY-MM-DD)";
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let value = value.trim();
    if value.len() != 10 {
        return Err(RULE);
    }
    let date = time::Date::parse(value, &format).map_err(|_| RULE)?;
    Ok(Zeroizing::new(date.format(&format).map_err(|_| RULE)?))
}

/// A person's name: Unicode NFC, trimmed, inner whitespace runs collapsed to
/// one space, no control characters.
pub fn name(value: &str) -> Result<Zeroizing<String>, Rule> {
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters or line breaks");
    }
    let nfc: Zeroizing<String> = Zeroizing::new(value.nfc().collect());
    let collapsed: Zeroizing<String> =
        Zeroizing::new(nfc.split_whitespace().collect::<Vec<_>>().join(" "));
    if collapsed.is_empty() {
        return Err("is blank");
    }
    Ok(collapsed)
}

/// A postal address: Unicode NFC, lines trimmed, blank lines dropped, line
/// breaks as `\n`, no other control characters.
pub fn address(value: &str) -> Result<Zeroizing<String>, Rule> {
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r')
    {
        return Err("must not contain control characters other than line breaks");
    }
    let nfc: Zeroizing<String> = Zeroizing::new(value.nfc().collect());
    let lines: Vec<&str> = nfc
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err("is blank");
    }
    Ok(Zeroizing::new(lines.join("\n")))
}

/// A national identifier: trimmed, spaces removed, upper case, and matching
/// the configured pattern in full.
pub fn national_id(value: &str, pattern: &regex::Regex) -> Result<Zeroizing<String>, Rule> {
    let id: Zeroizing<String> = Zeroizing::new(
        value
            .chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_uppercase)
            .collect(),
    );
    if !pattern.is_match(&id) {
        return Err("does not match the configured national_id pattern");
    }
    Ok(id)
}

/// Free text: kept exactly, except that NUL is refused.
pub fn text(value: &str) -> Result<Zeroizing<String>, Rule> {
    if value.contains('\0') {
        return Err("must not contain NUL characters");
    }
    Ok(Zeroizing::new(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            email("  Ada.Lovelace@Example.COM ").unwrap().as_str(),
            "Ada.Lovelace@example.com"
        );
        assert_eq!(
            email("a+tag@sub.example.org").unwrap().as_str(),
            "a+tag@sub.example.org"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a..b@example.com",
            ".a@example.com",
            "ada@exa_mple.com",
            "ada@example.c0m",
            "ada lovelace@example.com",
        ] {
            assert!(email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn phones() {
        let gb = Some(phonenumber::country::Id::GB);
        assert_eq!(
            phone("+44 20 7946 0958", None).unwrap().as_str(),
            "+442079460958"
        );
        assert_eq!(
            phone("020 7946 0958", gb).unwrap().as_str(),
            "+442079460958"
        );
        assert!(phone("020 7946 0958", None).is_err());
        assert!(phone("+44 12", None).is_err());
        assert!(phone("not a phone", gb).is_err());
    }

    #[test]
    fn cards() {
        assert_eq!(
            card_number("4111 1111-1111 1111").unwrap().as_str(),
            "4111111111111111"
        );
        assert_eq!(
            card_number("4111 1111 1111 1112"),
            Err("fails the Luhn check")
        );
        assert_eq!(card_number("4111"), Err("must have 12 to 19 digits"));
        assert!(card_number("4111 1111 1111 111x").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(date("1815-12-10").unwrap().as_str(), "1815-12-10");
        for bad in [
            "1815-13-10",
            "2023-02-29",
            "10/12/1815",
            "1815-1-1",
            "18151210",
        ] {
            assert!(date(bad).is_err(), "{bad}");
        }
        assert!(date("2024-02-29").is_ok());
    }

    #[test]
    fn names_and_addresses() {
        assert_eq!(name("  Ada   Lovelace ").unwrap().as_str(), "Ada Lovelace");
        // Decomposed é becomes the composed form.
        assert_eq!(name("Zoe\u{301}").unwrap().as_str(), "Zoé");
        assert!(name("Ada\nLovelace").is_err());
        assert_eq!(
            address(" 221b Baker St \r\n\r\n London ").unwrap().as_str(),
            "221b Baker St\nLondon"
        );
        assert!(address("  \n ").is_err());
    }

    #[test]
    fn national_ids() {
        let pattern = regex::Regex::new("^[A-Z]{2}[0-9]{6}[A-D]$").unwrap();
        assert_eq!(
            national_id("ab 12 34 56 c", &pattern).unwrap().as_str(),
            "AB123456C"
        );
        assert!(national_id("AB1234567", &pattern).is_err());
    }

    #[test]
    fn luhn() {
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("79927398710"));
    }

    proptest! {
        #[test]
        fn email_normalisation_is_idempotent(local in "[a-zA-Z0-9._+-]{1,20}", domain in "[a-zA-Z0-9-]{1,10}\\.[a-zA-Z]{2,6}") {
            if let Ok(once) = email(&format!(" {local}@{domain} ")) {
                let twice = email(&once).unwrap();
                prop_assert_eq!(twice.as_str(), once.as_str());
            }
        }

        #[test]
        fn name_and_address_normalisation_is_idempotent(s in "\\PC{0,40}") {
            if let Ok(once) = name(&s) {
                let twice = name(&once).unwrap();
                prop_assert_eq!(twice.as_str(), once.as_str());
            }
            if let Ok(once) = address(&s) {
                let twice = address(&once).unwrap();
                prop_assert_eq!(twice.as_str(), once.as_str());
            }
        }

        #[test]
        fn card_normalisation_accepts_exactly_luhn_valid_digit_strings(digits in "[0-9]{12,19}", seps in proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("-")], 19)) {
            let spaced: String = digits.chars().zip(seps.iter().cycle()).map(|(c, s)| format!("{c}{s}")).collect();
            match card_number(&spaced) {
                Ok(n) => {
                    prop_assert_eq!(n.as_str(), digits.as_str());
                    prop_assert!(luhn_valid(&digits));
                    let twice = card_number(&n).unwrap();
                    prop_assert_eq!(twice.as_str(), n.as_str());
                }
                Err(_) => prop_assert!(!luhn_valid(&digits)),
            }
        }

        #[test]
        fn dates_round_trip(y in 1i32..9999, m in 1u8..=12, d in 1u8..=31) {
            let s = format!("{y:04}-{m:02}-{d:02}");
            let valid = time::Date::from_calendar_date(y, time::Month::try_from(m).unwrap(), d).is_ok();
            prop_assert_eq!(date(&s).is_ok(), valid);
            if let Ok(once) = date(&s) {
                prop_assert_eq!(once.as_str(), s.as_str());
            }
        }

        #[test]
        fn errors_never_contain_the_value(s in "[a-z]{6,30}") {
            for err in [email(&s).err(), card_number(&s).err(), date(&s).err(), phone(&s, None).err()].into_iter().flatten() {
                prop_assert!(!err.contains(&s));
            }
        }
    }
}
