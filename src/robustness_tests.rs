//! Arbitrary input at every parser the network or the disk can reach: none
//! panics, and none echoes its input in an error. Property tests next to the
//! coverage-guided fuzzers in `fuzz/` (which need nightly): these run in
//! every `make test`, and proptest shrinks and persists failing cases under
//! `proptest-regressions/`.

use proptest::prelude::*;

use crate::{
    identity::ClientId,
    store::chain,
    token::Token,
    vault::{Record, SubjectId},
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn token_parsing_never_panics_or_echoes(s in "\\PC{0,80}") {
        if let Err(e) = s.parse::<Token>() {
            let message = e.to_string();
            prop_assert!(s.len() < 8 || !message.contains(&s));
        }
    }

    #[test]
    fn token_like_strings_are_judged_consistently(field in "[a-z][a-z0-9_]{0,20}", random in "[A-Z2-7]{20,30}") {
        let text = format!("tok_{field}_{random}");
        if let Ok(token) = text.parse::<Token>() {
            prop_assert_eq!(token.as_str(), text.as_str());
            prop_assert_eq!(token.as_str().parse::<Token>().unwrap(), token);
        }
    }

    #[test]
    fn certificate_parsing_never_panics(der in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = ClientId::from_certificate(&der);
    }

    #[test]
    fn record_and_chain_decoding_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Record::decode(&bytes);
        if let Some(link) = chain::decode(&bytes) {
            let _ = link.is_intact(1);
        }
    }

    #[test]
    fn subject_ids_are_checked_without_echo(s in "\\PC{0,300}") {
        if let Err(e) = s.parse::<SubjectId>() {
            prop_assert!(s.len() < 8 || !e.to_string().contains(&s));
        }
    }

    #[test]
    fn config_parsing_never_panics(toml_text in "\\PC{0,200}") {
        use figment::providers::{Format, Serialized, Toml};
        let figment = figment::Figment::from(Serialized::defaults(crate::config::RawConfig::default()))
            .merge(Toml::string(&toml_text));
        let _ = crate::config::Config::from_figment(&figment);
    }

    #[test]
    fn request_messages_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        use prost::Message;
        use crate::proto::v1 as pb;
        let _ = pb::TokenizeRequest::decode(bytes.as_slice());
        let _ = pb::DetokenizeRequest::decode(bytes.as_slice());
        let _ = pb::LookupTokensRequest::decode(bytes.as_slice());
        let _ = pb::ExportSubjectRequest::decode(bytes.as_slice());
    }
}

/// Arbitrary but well-formed requests through the real service in-process
/// ([`crate::fuzzing::RequestTarget`], which checks every answer: one result
/// per item, no value echoed in an error).
#[test]
fn the_request_path_answers_arbitrary_requests() {
    use prost::Message;

    use crate::{
        fuzzing::{RequestTarget, request_selector},
        proto::v1 as pb,
    };
    let target = RequestTarget::new();
    let text = "\\PC{0,40}|tok_[a-z_]{1,12}_[A-Z2-7]{26}|[0-9]{12,19}";
    let item = (text, text, text, 0u64..10_000).prop_map(
        |(field_type, value, subject_id, ttl_seconds)| pb::TokenizeItem {
            field_type,
            value,
            subject_id,
            ttl_seconds,
        },
    );
    let framed = |method: &str, message: Vec<u8>| {
        let mut bytes = vec![request_selector(method).unwrap()];
        bytes.extend(message);
        bytes
    };
    let config = ProptestConfig::with_cases(300);
    proptest!(config, |(items in proptest::collection::vec(item, 0..60), tokens in proptest::collection::vec(text, 0..60), purpose in text, masked in any::<bool>())| {
        target.run(&framed("Tokenize", pb::TokenizeRequest { items, ..Default::default() }.encode_to_vec()));
        let detokenize = pb::DetokenizeRequest { tokens, purpose, masked };
        target.run(&framed("Detokenize", detokenize.encode_to_vec()));
    });
}
