//! Writes the fuzzers' seed corpus to `fuzz/corpus/<target>/`: valid and
//! nearly valid tokens, certificates, configs and requests, so fuzzing
//! starts from inputs that reach deep into each parser.
//!
//! Run from the repository root: `cargo run --example fuzz_seeds`. The
//! output is checked in; `tests/fuzz_corpus.rs` replays it in every test run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use prost::Message;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokenvault::{
    fuzzing::request_selector,
    pki::{Ca, ClientSpec},
    proto::v1 as pb,
    token::{FieldType, Token},
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn tokens() {
    let email: FieldType = "email".parse().unwrap();
    let seeds = [
        Token::generate(&email).unwrap().as_str().to_owned(),
        Token::generate(&"card_number".parse().unwrap())
            .unwrap()
            .as_str()
            .to_owned(),
        Token::email_shaped("tokens.shop.example")
            .unwrap()
            .as_str()
            .to_owned(),
        "4111119876541111".to_owned(),
        "tok_email_".to_owned(),
        "tok__AAAA".to_owned(),
        "customer_email".to_owned(),
        "tök_émail_ÄÖÜ".to_owned(),
    ];
    for (i, seed) in seeds.iter().enumerate() {
        write("token", &format!("seed-{i:02}"), seed.as_bytes());
    }
}

fn identities() {
    let ca = Ca::new("fuzz seed CA").unwrap();
    write("identity", "seed-ca", &der(&ca.cert_pem()));
    let spiffe = ca
        .issue_client(&ClientSpec::spiffe(
            "spiffe://shop.example/ns/prod/sa/checkout",
        ))
        .unwrap();
    write("identity", "seed-spiffe", &der(&spiffe.cert_pem));
    let mut dns = ClientSpec::spiffe("spiffe://x/y");
    dns.uris.clear();
    dns.dns = vec!["checkout.shop.internal".into()];
    write(
        "identity",
        "seed-dns",
        &der(&ca.issue_client(&dns).unwrap().cert_pem),
    );
    let mut cn = ClientSpec::spiffe("spiffe://x/y");
    cn.uris.clear();
    cn.common_name = Some("legacy-batch".into());
    write(
        "identity",
        "seed-cn",
        &der(&ca.issue_client(&cn).unwrap().cert_pem),
    );
    let mut two = ClientSpec::spiffe("spiffe://a/one");
    two.uris.push("spiffe://a/two".into());
    write(
        "identity",
        "seed-two-uris",
        &der(&ca.issue_client(&two).unwrap().cert_pem),
    );
}

fn configs() {
    write(
        "config",
        "seed-example",
        std::fs::read_to_string("examples/tokenvault.toml")
            .unwrap()
            .as_bytes(),
    );
    let seeds = [
        "data_dir = \"/var/lib/tokenvault\"\ndurability = \"buffered\"\n",
        "[server]\nlisten = \"0.0.0.0:50051\"\nshutdown_grace_seconds = 5\n",
        "[field_types.customer_email]\nkind = \"email\"\ndeterministic = true\n",
        "[field_types.card_fpt]\nkind = \"card_number\"\ntoken_format = \"format_preserving\"\nkeep_first_digits = 4\nluhn = \"invalid\"\n",
        "[[policy]]\nidentity = \"spiffe://shop/*\"\nscopes = [\"tokenize:*\"]\npurposes = [\"billing\"]\n",
        "[limits]\nmax_items_per_request = 0\n",
    ];
    for (i, seed) in seeds.iter().enumerate() {
        write("config", &format!("seed-{i:02}"), seed.as_bytes());
    }
}

fn request(name: &str, method: &str, message: &impl Message) {
    let mut bytes = vec![request_selector(method).unwrap()];
    bytes.extend(message.encode_to_vec());
    write("request", name, &bytes);
}

fn requests() {
    let item = |field_type: &str, value: &str, subject: &str| pb::TokenizeItem {
        field_type: field_type.into(),
        value: value.into(),
        subject_id: subject.into(),
        ttl_seconds: 0,
    };
    request(
        "seed-tokenize",
        "Tokenize",
        &pb::TokenizeRequest {
            items: vec![
                item("email", "Ada@Example.com", "cust-1"),
                item("phone", "+44 20 7946 0958", ""),
                item("card_number", "4111 1111 1111 1111", "cust-1"),
                item("date", "1990-02-28", ""),
            ],
            request_id: "seed-request-1".into(),
        },
    );
    let token = Token::generate(&"email".parse().unwrap()).unwrap();
    request(
        "seed-detokenize",
        "Detokenize",
        &pb::DetokenizeRequest {
            tokens: vec![token.as_str().into(), "tok_email_".into()],
            purpose: "customer_support".into(),
            masked: true,
        },
    );
    request(
        "seed-lookup",
        "LookupTokens",
        &pb::LookupTokensRequest {
            items: vec![pb::LookupItem {
                field_type: "email".into(),
                value: "ada@example.com".into(),
                subject_id: String::new(),
            }],
        },
    );
    request(
        "seed-update",
        "UpdateValue",
        &pb::UpdateValueRequest {
            token: token.as_str().into(),
            value: "new@example.com".into(),
            request_id: "seed-request-2".into(),
        },
    );
    request(
        "seed-delete",
        "DeleteTokens",
        &pb::DeleteTokensRequest {
            tokens: vec![token.as_str().into()],
        },
    );
    request(
        "seed-set-consent",
        "SetConsent",
        &pb::SetConsentRequest {
            subject_id: "cust-1".into(),
            purpose: "marketing".into(),
            granted: true,
        },
    );
    request(
        "seed-get-consent",
        "GetConsent",
        &pb::GetConsentRequest {
            subject_id: "cust-1".into(),
            purpose: "marketing".into(),
        },
    );
    request(
        "seed-erase",
        "EraseSubject",
        &pb::EraseSubjectRequest {
            subject_id: "cust-1".into(),
            request_id: "seed-request-3".into(),
        },
    );
}

fn main() {
    tokens();
    identities();
    configs();
    requests();
    println!("wrote the seed corpus under fuzz/corpus/");
}
