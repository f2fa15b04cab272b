//! Fuzz targets: each takes arbitrary bytes, feeds them to a parser or to the
//! request path, and panics only if a promise is broken (a parse that does
//! not round-trip, an error that echoes its input, a response that does not
//! answer every item).
//!
//! `fuzz/fuzz_targets/*.rs` (cargo-fuzz, nightly) call these; so does
//! `tests/fuzz_corpus.rs`, which replays the checked-in corpus on stable in
//! every test run. `examples/fuzz_seeds.rs` writes the seed corpus.

use std::sync::Arc;

use prost::Message;

use crate::{
    api::{ApiSettings, Limits, TokenVaultService},
    authz::{IdentityPattern, Policy, PurposeSet, Rule, SharedPolicy},
    config::{Config, RawConfig},
    crypto::MasterKey,
    fields::FieldRegistry,
    identity::{ClientId, Peer},
    proto::v1::{self as pb, subjects_server::Subjects, token_vault_server::TokenVault},
    store::{RocksStore, StoreOptions},
    token::{FieldType, Token},
    vault::Vault,
};

/// Inputs shorter than this may appear in a message by chance.
const ECHO_MIN: usize = 8;

/// Fails if `message` contains `input`. Only inputs with a non-ASCII
/// character count: every message template is ASCII, so such an input can
/// be in a message only if the message copied it, whereas an ASCII input can
/// equal a piece of a template (the fuzzer learns templates from this very
/// comparison, and found "field_type is longer than 32 characters" as a
/// field type within a minute).
fn assert_no_echo(message: &str, input: &str) {
    assert!(
        input.len() < ECHO_MIN || input.is_ascii() || !message.contains(input),
        "an error message echoes its input"
    );
}

/// Whether `message` repeats `input` (long enough not to be there by chance).
fn repeats(message: &str, input: &str) -> bool {
    input.len() >= ECHO_MIN && message.contains(input)
}

/// `value` with every ASCII letter and digit moved on by one (`z` to `a`,
/// `9` to `0`): the same shape, other characters.
fn twin(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            'z' => 'a',
            'Z' => 'A',
            '9' => '0',
            c if c.is_ascii_alphanumeric() => char::from(c as u8 + 1),
            c => c,
        })
        .collect()
}

/// The promise that values are never echoed: no message a call answers with
/// (its status, or an item's error) repeats one of the values it was sent.
/// `call` sends the values and returns every message of the answer.
///
/// An ASCII value (an e-mail address, a card number) may also equal a piece
/// of a message template by chance, and the fuzzer learns templates from
/// this very comparison. So a hit on an ASCII value is checked again with
/// every value's twin: a real echo repeats the twin too; a template does
/// not contain it.
async fn assert_values_not_echoed<F, Fut>(values: &[String], call: F)
where
    F: Fn(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let first_hit = |messages: &[String], values: &[String]| {
        values
            .iter()
            .position(|v| messages.iter().any(|m| repeats(m, v)))
    };
    let Some(hit) = first_hit(&call(values.to_vec()).await, values) else {
        return;
    };
    assert!(values[hit].is_ascii(), "an error message echoes a value");
    let twins: Vec<String> = values.iter().map(|v| twin(v)).collect();
    if twins[hit] == values[hit] {
        // No letter or digit to move: a template cannot be told apart.
        return;
    }
    let again = call(twins.clone()).await;
    assert!(
        !again.iter().any(|m| repeats(m, &twins[hit])),
        "an error message echoes a value"
    );
}

/// The status message, or else the messages of the items that failed.
fn messages<T>(
    answer: &Result<tonic::Response<T>, tonic::Status>,
    item_errors: impl FnOnce(&T) -> Vec<String>,
) -> Vec<String> {
    match answer {
        Ok(r) => item_errors(r.get_ref()),
        Err(s) => vec![s.message().to_owned()],
    }
}

/// The promise of a per-item RPC's answer: a response with one result per
/// item, or a status whose message echoes none of the items.
fn check_answer<T>(
    answer: Result<tonic::Response<T>, tonic::Status>,
    items: &[String],
    results: impl FnOnce(&T) -> usize,
) {
    match answer {
        Ok(r) => assert_eq!(results(r.get_ref()), items.len()),
        Err(s) => items.iter().for_each(|v| assert_no_echo(s.message(), v)),
    }
}

/// Token and field-type parsing: a token that parses round-trips, and an
/// error never contains the input.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Token>() {
        Ok(token) => {
            assert_eq!(token.as_str(), text);
            assert_eq!(token.as_str().parse::<Token>().ok(), Some(token.clone()));
            assert_eq!(token.storage_key(), text.as_bytes());
        }
        Err(e) => assert_no_echo(&e.to_string(), text),
    }
    match text.parse::<FieldType>() {
        Ok(field_type) => assert_eq!(field_type.as_str(), text),
        Err(e) => assert_no_echo(&e.to_string(), text),
    }
}

/// Client identity from arbitrary certificate DER: an identity, or an
/// error; a SPIFFE identity names its trust domain.
pub fn identity(data: &[u8]) {
    if let Ok(ClientId::Spiffe(id)) = ClientId::from_certificate(data) {
        assert!(id.starts_with("spiffe://"));
        let client = ClientId::Spiffe(id);
        assert!(client.trust_domain().is_some());
    }
}

/// The config file: arbitrary TOML over the defaults is a valid config or
/// a config error, never a panic.
pub fn config(data: &[u8]) {
    use figment::providers::{Format, Serialized, Toml};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let figment = figment::Figment::from(Serialized::defaults(RawConfig::default()))
        .merge(Toml::string(text));
    if let Ok(config) = Config::from_figment(&figment) {
        // A valid config writes out as TOML again.
        assert!(config.to_toml().is_ok());
    }
}

/// The request path in-process: a real service over a real RocksDB in a
/// temporary directory, called as a client with broad scopes.
pub struct RequestTarget {
    runtime: tokio::runtime::Runtime,
    service: TokenVaultService<RocksStore>,
    vault: Arc<Vault<RocksStore>>,
    peer: Peer,
    _dir: tempfile::TempDir,
}

/// The methods the first input byte selects; the rest is the message.
const METHODS: u8 = 8;

impl RequestTarget {
    /// Opens a fresh vault.
    ///
    /// # Panics
    /// If the vault cannot be created (a broken machine, not a finding).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key = dir.path().join("master.key");
        MasterKey::create_file(&key).expect("a master key");
        let store =
            RocksStore::open(&dir.path().join("data"), &StoreOptions::default()).expect("a store");
        let defaults = RawConfig::default();
        let fields = FieldRegistry::from_raw(&defaults.field_types, 4096).expect("fields");
        let vault = runtime
            .block_on(Vault::open(
                store,
                &MasterKey::load(&key).expect("the key"),
                fields,
            ))
            .expect("a vault");
        let scopes = [
            "tokenize:*",
            "detokenize:*",
            "reveal_masked:*",
            "lookup:*",
            "update:*",
            "delete:*",
            "subject:export",
            "subject:erase",
            "consent:read",
            "consent:write",
        ]
        .map(|s| s.parse().expect("a scope"))
        .to_vec();
        let policy = Policy::new(vec![Rule::new(
            IdentityPattern::new("spiffe://*").expect("a pattern"),
            scopes,
            PurposeSet::Any,
        )]);
        let settings = ApiSettings {
            limits: Limits {
                max_items_per_request: 50,
                max_value_bytes: 4096,
                max_message_bytes: 1 << 20,
                max_concurrent_requests: 64,
                max_request_buffer_bytes: 16 << 20,
            },
            policy: Arc::new(SharedPolicy::new(policy)),
            pkcs11_modules: Vec::new(),
            refusals: Arc::new(crate::api::RefusalLog::default()),
        };
        let vault = Arc::new(vault);
        let service = TokenVaultService::new(
            Arc::clone(&vault),
            settings,
            Arc::new(crate::metrics::Metrics::default()),
        );
        let peer = Peer {
            identity: Arc::new(Ok(ClientId::Spiffe("spiffe://fuzz/client".into()))),
            remote_addr: None,
        };
        Self {
            runtime,
            service,
            vault,
            peer,
            _dir: dir,
        }
    }

    /// How many records the target's vault holds (for tests of the seeds).
    pub fn tokens_stored(&self) -> usize {
        use crate::store::{Store, Table};
        self.runtime
            .block_on(
                self.vault
                    .store()
                    .scan_from(Table::Records, Vec::new(), 1_000_000),
            )
            .map_or(0, |records| records.len())
    }

    /// Tokenizes one value through the service, as a client's request
    /// would arrive: the token, or the status or item error's message.
    ///
    /// # Errors
    /// What the service answered instead of a token.
    pub fn tokenize_one(&self, field_type: &str, value: String) -> Result<String, String> {
        let request = pb::TokenizeRequest {
            items: vec![pb::TokenizeItem {
                field_type: field_type.to_owned(),
                value,
                subject_id: String::new(),
                ttl_seconds: 0,
            }],
            ..Default::default()
        };
        let response = self
            .runtime
            .block_on(self.service.tokenize(self.request(request)))
            .map_err(|s| s.message().to_owned())?;
        match &response
            .get_ref()
            .results
            .first()
            .and_then(|r| r.result.as_ref())
        {
            Some(pb::tokenize_result::Result::Token(token)) => Ok(token.clone()),
            Some(pb::tokenize_result::Result::Error(e)) => Err(e.message.clone()),
            None => Err("no result".into()),
        }
    }

    /// Detokenizes `token` through the service and drops the answer, as
    /// the server does once it is sent: whether a value came back.
    pub fn reveal(&self, token: &str) -> bool {
        let request = pb::DetokenizeRequest {
            tokens: vec![token.to_owned()],
            purpose: "fuzzing".into(),
            masked: false,
        };
        self.runtime
            .block_on(self.service.detokenize(self.request(request)))
            .is_ok_and(|r| {
                matches!(
                    r.get_ref().results.first().and_then(|r| r.result.as_ref()),
                    Some(pb::detokenize_result::Result::Value(_))
                )
            })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(self.peer.clone());
        request
    }

    /// Decodes `data[1..]` as the request message of method `data[0]` and
    /// calls it. Every answer must be an answer: a status whose message
    /// does not echo a value, or a response with one result per item.
    pub fn run(&self, data: &[u8]) {
        let Some((&selector, body)) = data.split_first() else {
            return;
        };
        let svc = &self.service;
        self.runtime.block_on(async {
            match selector % METHODS {
                0 => {
                    let Ok(m) = pb::TokenizeRequest::decode(body) else {
                        return;
                    };
                    let values: Vec<String> = m.items.iter().map(|i| i.value.clone()).collect();
                    assert_values_not_echoed(&values, |values| {
                        let mut m = m.clone();
                        for (item, value) in m.items.iter_mut().zip(values) {
                            item.value = value;
                        }
                        async move {
                            let count = m.items.len();
                            let answer = svc.tokenize(self.request(m)).await;
                            if let Ok(r) = &answer {
                                assert_eq!(r.get_ref().results.len(), count);
                            }
                            messages(&answer, |r| {
                                r.results
                                    .iter()
                                    .filter_map(|r| match &r.result {
                                        Some(pb::tokenize_result::Result::Error(e)) => {
                                            Some(e.message.clone())
                                        }
                                        _ => None,
                                    })
                                    .collect()
                            })
                        }
                    })
                    .await;
                }
                1 => {
                    let Ok(m) = pb::DetokenizeRequest::decode(body) else {
                        return;
                    };
                    let tokens = m.tokens.clone();
                    let answer = svc.detokenize(self.request(m)).await;
                    check_answer(answer, &tokens, |r| r.results.len());
                }
                2 => {
                    let Ok(m) = pb::LookupTokensRequest::decode(body) else {
                        return;
                    };
                    let values: Vec<String> = m.items.iter().map(|i| i.value.clone()).collect();
                    assert_values_not_echoed(&values, |values| {
                        let mut m = m.clone();
                        for (item, value) in m.items.iter_mut().zip(values) {
                            item.value = value;
                        }
                        async move {
                            let count = m.items.len();
                            let answer = svc.lookup_tokens(self.request(m)).await;
                            if let Ok(r) = &answer {
                                assert_eq!(r.get_ref().results.len(), count);
                            }
                            messages(&answer, |r| {
                                r.results
                                    .iter()
                                    .filter_map(|r| match &r.result {
                                        Some(pb::lookup_result::Result::Error(e)) => {
                                            Some(e.message.clone())
                                        }
                                        _ => None,
                                    })
                                    .collect()
                            })
                        }
                    })
                    .await;
                }
                3 => {
                    let Ok(m) = pb::UpdateValueRequest::decode(body) else {
                        return;
                    };
                    assert_values_not_echoed(std::slice::from_ref(&m.value), |values| {
                        let mut m = m.clone();
                        m.value = values.into_iter().next().unwrap_or_default();
                        async move {
                            let answer = svc.update_value(self.request(m)).await;
                            messages(&answer, |_| Vec::new())
                        }
                    })
                    .await;
                }
                4 => {
                    let Ok(m) = pb::DeleteTokensRequest::decode(body) else {
                        return;
                    };
                    let tokens = m.tokens.clone();
                    let answer = svc.delete_tokens(self.request(m)).await;
                    check_answer(answer, &tokens, |r| r.results.len());
                }
                5 => {
                    let Ok(m) = pb::SetConsentRequest::decode(body) else {
                        return;
                    };
                    let _ = svc.set_consent(self.request(m)).await;
                }
                6 => {
                    let Ok(m) = pb::GetConsentRequest::decode(body) else {
                        return;
                    };
                    let _ = svc.get_consent(self.request(m)).await;
                }
                _ => {
                    let Ok(m) = pb::EraseSubjectRequest::decode(body) else {
                        return;
                    };
                    let _ = svc.erase_subject(self.request(m)).await;
                }
            }
        });
    }
}

impl Default for RequestTarget {
    fn default() -> Self {
        Self::new()
    }
}

/// The first byte that selects `method` in [`RequestTarget::run`]'s input.
pub fn request_selector(method: &str) -> Option<u8> {
    [
        "Tokenize",
        "Detokenize",
        "LookupTokens",
        "UpdateValue",
        "DeleteTokens",
        "SetConsent",
        "GetConsent",
        "EraseSubject",
    ]
    .iter()
    .position(|m| *m == method)
    .and_then(|i| u8::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// A call that answers with `template` and, if `echo`, repeats the first
    /// value it was sent.
    fn check(values: &[&str], template: &'static str, echo: bool) {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        block_on(assert_values_not_echoed(&values, |sent| async move {
            if echo {
                vec![format!("{template}: {}", sent[0])]
            } else {
                vec![template.to_owned()]
            }
        }));
    }

    #[test]
    #[should_panic(expected = "echoes a value")]
    fn an_echoed_email_address_is_caught() {
        check(&["alice@example.com"], "not a valid email", true);
    }

    #[test]
    #[should_panic(expected = "echoes a value")]
    fn an_echoed_card_number_is_caught() {
        check(&["4111111111111111", "x"], "card rejected", true);
    }

    #[test]
    #[should_panic(expected = "echoes a value")]
    fn an_echoed_non_ascii_value_is_caught() {
        check(&["Zoë Ünïcödé-Smith"], "bad name", true);
    }

    #[test]
    fn a_value_that_is_a_piece_of_the_template_is_not_an_echo() {
        check(
            &["is longer than 32"],
            "field_type is longer than 32 characters",
            false,
        );
    }

    #[test]
    fn twins_keep_the_shape_and_change_every_letter_and_digit() {
        assert_eq!(twin("az.AZ@09-x"), "ba.BA@10-y");
        assert_eq!(twin("....@@"), "....@@");
    }
}
