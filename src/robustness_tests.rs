//! Arbitrary input at every parser the network or the disk can reach: none
//! panics, and none echoes its input in an error. A stand-in for fuzzing on
//! a stable toolchain (cargo-fuzz needs nightly); proptest shrinks and
//! persists failing cases under `proptest-regressions/`.

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

/// A service over a real RocksDB, and the peer identity requests carry.
async fn service_fixture() -> (
    tempfile::TempDir,
    crate::api::TokenVaultService<crate::store::RocksStore>,
    crate::identity::Peer,
) {
    use std::sync::Arc;

    use crate::{
        api::{ApiSettings, IdentityLimits, TokenVaultService},
        authz::{IdentityPattern, Policy, PurposeSet, Rule, SharedPolicy},
        config::{Limits, RawConfig},
        crypto::MasterKey,
        fields::FieldRegistry,
        store::{RocksStore, StoreOptions},
        vault::Vault,
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    MasterKey::create_file(&key).unwrap();
    let store = RocksStore::open(&dir.path().join("data"), &StoreOptions::default()).unwrap();
    let defaults = RawConfig::default();
    let fields = FieldRegistry::from_raw(&defaults.field_types, 4096).unwrap();
    let vault = Vault::open(store, &MasterKey::load(&key).unwrap(), fields)
        .await
        .unwrap();
    let scopes = ["tokenize:*", "detokenize:*", "reveal_masked:*", "lookup:*"]
        .map(|s| s.parse().unwrap())
        .to_vec();
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("*").unwrap(),
        scopes,
        PurposeSet::Any,
    )]);
    let settings = ApiSettings {
        limits: Limits {
            max_items_per_request: 50,
            max_value_bytes: 4096,
            max_message_bytes: 1 << 20,
        },
        identity_limits: IdentityLimits::default(),
        policy: Arc::new(SharedPolicy::new(policy)),
    };
    let service = TokenVaultService::new(
        Arc::new(vault),
        settings,
        Arc::new(crate::metrics::Metrics::default()),
    );
    let peer = crate::identity::Peer {
        identity: Arc::new(Ok(ClientId::Spiffe("spiffe://fuzz/client".into()))),
        remote_addr: None,
    };
    (dir, service, peer)
}

#[test]
fn the_request_path_answers_arbitrary_requests() {
    use crate::proto::v1::{self as pb, token_vault_server::TokenVault};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_dir, service, peer) = runtime.block_on(service_fixture());
    let text = "\\PC{0,40}|tok_[a-z_]{1,12}_[A-Z2-7]{26}|[0-9]{12,19}";
    let item = (text, text, text, 0u64..10_000).prop_map(
        |(field_type, value, subject_id, ttl_seconds)| pb::TokenizeItem {
            field_type,
            value,
            subject_id,
            ttl_seconds,
        },
    );
    let config = ProptestConfig::with_cases(300);
    proptest!(config, |(items in proptest::collection::vec(item, 0..60), tokens in proptest::collection::vec(text, 0..60), purpose in text, masked in any::<bool>())| {
        let mut request = tonic::Request::new(pb::TokenizeRequest { items });
        request.extensions_mut().insert(peer.clone());
        let answer = runtime.block_on(service.tokenize(request));
        if let Ok(response) = answer {
            prop_assert!(!response.get_ref().results.is_empty());
        }
        let mut request = tonic::Request::new(pb::DetokenizeRequest { tokens, purpose, masked });
        request.extensions_mut().insert(peer.clone());
        // Any answer is fine, as long as it is an answer.
        let _ = runtime.block_on(service.detokenize(request));
    });
}
