//! The edges of the server: the TLS handshake, identities, health, reflection
//! and refusing to start with a broken setup.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{os::unix::fs::PermissionsExt, time::Duration};

use common::{Pki, TestVault, metric, scrape, spiffe, tokenvault_command};
use tokenvault::{
    client::ClientTls,
    pki::{ClientSpec, Eku},
    proto::v1::{TokenizeItem, TokenizeRequest},
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn request() -> TokenizeRequest {
    TokenizeRequest {
        items: vec![TokenizeItem {
            field_type: "email".into(),
            value: "tls@example.com".into(),
            subject_id: String::new(),
            ttl_seconds: 0,
        }],
        ..Default::default()
    }
}

/// Connects with `tls` and makes one call; Err if either fails.
async fn call_with(vault: &TestVault, tls: &ClientTls) -> Result<(), String> {
    let channel = vault.channel_with(tls).await.map_err(|e| e.to_string())?;
    tokenvault::client::TokenVaultClient::new(channel)
        .tokenize(request())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_requires_a_valid_client_certificate_from_our_ca() {
    let vault = TestVault::start();
    // Sanity: the good certificate works, so the failures below are about
    // the certificates and nothing else.
    call_with(&vault, &vault.pki.tls("checkout")).await.unwrap();

    // No client certificate at all.
    let ca = std::fs::read(vault.pki.dir.join("ca.pem")).unwrap();
    let no_cert = Endpoint::from_shared(format!("https://{}", vault.grpc_addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await;
    let refused = match no_cert {
        Err(_) => true,
        Ok(channel) => tokenvault::client::TokenVaultClient::new(channel)
            .tokenize(request())
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA with a policy-known identity.
    let other_dir = vault.root.path().join("other-ca");
    let other = Pki::new(&other_dir);
    let foreign = other.tls("support");
    let foreign = ClientTls {
        ca: vault.pki.dir.join("ca.pem"),
        ..foreign
    };
    assert!(
        call_with(&vault, &foreign).await.is_err(),
        "a foreign CA's certificate was served"
    );

    // An expired certificate from our CA.
    let expired = vault.pki.expired("expired");
    assert!(
        call_with(&vault, &expired).await.is_err(),
        "an expired certificate was served"
    );

    // The server logs the failure on its side of the handshake, which may
    // end after the client has given up: wait for the line.
    assert!(
        vault.wait_for_log("TLS handshake failed"),
        "handshake failures are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_without_one_clear_identity_are_unauthenticated() {
    let vault = TestVault::start();
    let two_uris = vault.pki.client(
        "two-uris",
        &ClientSpec {
            uris: vec![spiffe("support"), spiffe("checkout")],
            ..ClientSpec::spiffe("unused")
        },
    );
    let err = call_with(&vault, &two_uris).await.unwrap_err();
    assert!(err.starts_with("Unauthenticated"), "{err}");
    assert!(err.contains("URI SANs"), "{err}");
}

/// The probe of the security review: a certificate from the trusted CA,
/// with no URI SAN, whose common name (or DNS SAN) spells a SPIFFE ID the
/// policy grants detokenize to. It must not act as that identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_common_name_or_dns_name_spelling_a_spiffe_id_is_not_that_identity() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let token = common::tokenize_one(&mut support, "email", "lookalike@example.com").await;
    for (name, spec) in [
        (
            "cn-lookalike",
            ClientSpec {
                uris: vec![],
                common_name: Some(spiffe("support")),
                ..ClientSpec::spiffe("unused")
            },
        ),
        (
            "dns-lookalike",
            ClientSpec {
                uris: vec![],
                dns: vec!["spiffe.test.tokenvault.local".into()],
                common_name: Some(spiffe("support")),
                ..ClientSpec::spiffe("unused")
            },
        ),
    ] {
        let tls = vault.pki.client(name, &spec);
        let channel = vault.channel_with(&tls).await.unwrap();
        let status = tokenvault::client::TokenVaultClient::new(channel)
            .detokenize(tokenvault::proto::v1::DetokenizeRequest {
                tokens: vec![token.clone()],
                purpose: "customer_support".into(),
                masked: false,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ),
            "{name}: {status:?}"
        );
    }
    vault.assert_log_free_of(&["lookalike@example.com"]);
}

/// Connects with `tls`: the TLS handshake itself must fail (not a call
/// answered with an error after it).
async fn assert_handshake_fails(vault: &TestVault, tls: &ClientTls) {
    match vault.channel_with(tls).await {
        Err(_) => {}
        Ok(channel) => {
            let status = tokenvault::client::TokenVaultClient::new(channel)
                .tokenize(request())
                .await
                .unwrap_err();
            // With TLS 1.3 the client learns of the refusal (an alert) only
            // when it first uses the connection: the call then fails with a
            // transport error (Unavailable, Unknown or Cancelled, depending
            // on when the alert races the request), never with a status the
            // server answered, which carries no transport source.
            let transport_failure = std::error::Error::source(&status)
                .is_some_and(|source| source.is::<tonic::transport::Error>());
            assert!(
                transport_failure
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ),
                "the handshake succeeded and the call was answered: {status:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_on_both_ports_and_reflection_lists_the_api() {
    let vault = TestVault::start();
    // Plaintext probe port, through the CLI's exec-probe command.
    let out = tokenvault_command()
        .args(["health", "--addr", &vault.health_addr.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    let out = tokenvault_command()
        .args([
            "health",
            "--addr",
            &vault.health_addr.to_string(),
            "--service",
            "tokenvault.v1.TokenVault",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    // Health over mTLS, and reflection v1.
    let channel = vault
        .channel_with(&vault.pki.tls("checkout"))
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "tokenvault.v1.TokenVault",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let mut vault = TestVault::start();
    let mut client = vault.client("checkout").await;
    client.tokenize(request()).await.unwrap();
    // Eight writers keep requests in flight when SIGTERM comes: those the
    // drain lets finish are acknowledged, and every acknowledged write is
    // there after the restart.
    let writers = common::Writers::start(&client, 8, "term", false);
    writers.wait_for(50).await;
    let term_at = std::time::Instant::now();
    vault.stop();
    let after_term = writers.acked_since(term_at);
    let acked = writers.stop().await;
    eprintln!(
        "SIGTERM under load: {} writes acknowledged, {after_term} of them after the signal was sent",
        acked.len()
    );
    assert!(after_term > 0, "no request was in flight at the signal");
    let logs = vault.logs();
    vault.spawn().unwrap();
    common::assert_all_detokenize(&vault, &acked).await;
    assert!(logs.contains("draining"), "{logs}");
    // The idle client answered the server's GOAWAY, so the drain did not
    // have to wait for its deadline.
    assert!(!logs.contains("drain deadline passed"), "{logs}");
    assert!(logs.contains("\"stopped\""), "{logs}");
}

/// While SIGTERM drains in-flight requests, health says NOT_SERVING on both
/// ports: a readiness probe reads "not ready" from the plaintext port, not a
/// refused connection, and a watcher on the mTLS port hears the change. The
/// server exits once the last request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_draining() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut vault = TestVault::start();
    // A Watch on the mTLS port is a request that stays in flight, so the
    // drain waits for it.
    let channel = vault
        .channel_with(&vault.pki.tls("checkout"))
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &vault.pid().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watcher heard nothing after SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert!(vault.wait_for_log("draining"));
    let probe = tokio::task::spawn_blocking({
        let addr = vault.health_addr.to_string();
        move || {
            tokenvault_command()
                .args(["health", "--addr", &addr])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!probe.status.success());
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "NOT_SERVING",
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    // The last request ends; the drain completes before its deadline.
    drop(watch);
    vault.stop();
    let logs = vault.logs();
    assert!(logs.contains("\"stopped\""), "{logs}");
    assert!(!logs.contains("drain deadline passed"), "{logs}");
}

/// Runs `serve` on `vault`'s config and returns its stderr; it must fail
/// within the deadline.
fn serve_must_fail(config: &std::path::Path) -> String {
    let child = tokenvault_command()
        .args(["serve", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let output = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serve did not exit")
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_setups_refuse_to_start_with_one_clear_line() {
    let vault = TestVault::start();

    // The data directory is locked by the running vault.
    let err = serve_must_fail(&vault.config_path());
    assert!(
        err.contains("in use by another tokenvault process"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A master key file others can read.
    let key = vault.root.path().join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = serve_must_fail(&vault.config_path());
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A config with a typo.
    let bad = vault.root.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisen = \"127.0.0.1:1\"\n").unwrap();
    let err = serve_must_fail(&bad);
    assert!(err.contains("lisen"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // `config check` agrees.
    let out = tokenvault_command()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = tokenvault_command()
        .args(["config", "check"])
        .arg(vault.config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[policy]]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_master_key_is_refused() {
    let mut vault = TestVault::start();
    vault.stop();
    let key = vault.root.path().join("master.key");
    std::fs::remove_file(&key).unwrap();
    tokenvault::crypto::MasterKey::create_file(&key).unwrap();
    let err = serve_must_fail(&vault.config_path());
    assert!(err.contains("master key does not match"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_bad_client_certificates_are_refused() {
    let vault = TestVault::start_with_tls("trust_domains = [\"test.tokenvault.local\"]");
    call_with(&vault, &vault.pki.tls("checkout")).await.unwrap();
    let now = time::OffsetDateTime::now_utc();

    // Not yet valid.
    let mut future = ClientSpec::spiffe(&spiffe("checkout"));
    future.not_before = now + time::Duration::days(1);
    future.not_after = now + time::Duration::days(30);
    let tls = vault.pki.client("future", &future);
    assert!(
        call_with(&vault, &tls).await.is_err(),
        "a not-yet-valid certificate was served"
    );

    // Self-signed, with a policy-known identity.
    let issued =
        tokenvault::pki::Ca::self_signed_client(&ClientSpec::spiffe(&spiffe("checkout"))).unwrap();
    let tls = vault.pki.save_client("self-signed", &issued);
    assert!(
        call_with(&vault, &tls).await.is_err(),
        "a self-signed certificate was served"
    );

    // From our CA, but for servers only (no clientAuth extended key usage).
    let mut server_only = ClientSpec::spiffe(&spiffe("checkout"));
    server_only.eku = Eku::ServerAuth;
    let tls = vault.pki.client("server-only", &server_only);
    assert!(
        call_with(&vault, &tls).await.is_err(),
        "a certificate without clientAuth was served"
    );
    // From our CA, with no extended key usage at all: webpki accepts it for
    // any purpose; the vault requires clientAuth, so the handshake fails.
    let mut no_eku = ClientSpec::spiffe(&spiffe("checkout"));
    no_eku.eku = Eku::Absent;
    let tls = vault.pki.client("no-eku", &no_eku);
    assert_handshake_fails(&vault, &tls).await;

    // From our CA, a DNS name and no SPIFFE ID: trust_domains accepts
    // SPIFFE IDs only.
    let tls = vault.pki.client(
        "dns-only",
        &ClientSpec {
            uris: vec![],
            dns: vec!["api.billing.internal".into()],
            ..ClientSpec::spiffe("unused")
        },
    );
    let err = call_with(&vault, &tls).await.unwrap_err();
    assert!(
        err.starts_with("Unauthenticated") && err.contains("no SPIFFE ID"),
        "{err}"
    );

    // From our CA, but a trust domain the config does not accept.
    let tls = vault.pki.client(
        "foreign-domain",
        &ClientSpec::spiffe("spiffe://evil.example/checkout"),
    );
    let err = call_with(&vault, &tls).await.unwrap_err();
    assert!(
        err.starts_with("Unauthenticated") && err.contains("trust domain evil.example"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_cannot_dump_core() {
    let vault = TestVault::start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", vault.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_by_the_configured_crl_is_refused() {
    // The vault directory is prepared first so the CRL can be signed by its CA.
    let mut vault = TestVault::start();
    let mut revoked = ClientSpec::spiffe(&spiffe("checkout"));
    revoked.serial = Some(0x5eed_0001);
    let revoked_tls = vault.pki.client("revoked", &revoked);
    let mut kept = ClientSpec::spiffe(&spiffe("checkout"));
    kept.serial = Some(0x5eed_0002);
    let kept_tls = vault.pki.client("kept", &kept);
    call_with(&vault, &revoked_tls).await.unwrap();

    let crl = vault.root.path().join("tls").join("revoked.crl");
    std::fs::write(&crl, vault.pki.ca.crl(&[0x5eed_0001]).unwrap()).unwrap();
    vault.stop();
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    let config = config.replace(
        "client_ca = \"tls/ca.pem\"",
        "client_ca = \"tls/ca.pem\"\ncrl_files = [\"tls/revoked.crl\"]",
    );
    std::fs::write(vault.config_path(), config).unwrap();
    vault.spawn().unwrap();
    assert!(
        call_with(&vault, &revoked_tls).await.is_err(),
        "a revoked certificate was served"
    );
    call_with(&vault, &kept_tls).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_and_parse() {
    let vault = TestVault::start();
    let mut client = vault.client("checkout").await;
    for _ in 0..3 {
        client.tokenize(request()).await.unwrap();
    }
    let mut stranger = vault.client("stranger").await;
    stranger.tokenize(request()).await.unwrap_err();
    let text = scrape(vault.metrics_addr).await;
    // Every sample line parses as `name{labels} number`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "unparsable sample: {line}");
    }
    assert_eq!(
        metric(
            &text,
            "grpc_server_handled_total{grpc_method=\"Tokenize\",grpc_code=\"OK\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            "grpc_server_handled_total{grpc_method=\"Tokenize\",grpc_code=\"PERMISSION_DENIED\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "grpc_server_handling_seconds_count{grpc_method=\"Tokenize\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(&text, "tokenvault_denials_total{reason=\"policy\"}"),
        1.0
    );
    // The policy the vault started with, then three tokenize events; the
    // refusal is counted and written with the next refusal flush
    // (audit.refusal_interval_seconds), not at once.
    assert_eq!(metric(&text, "tokenvault_audit_chain_head"), 4.0);
    // The three tokenized values, still in the memtable, counted exactly.
    assert_eq!(metric(&text, "tokenvault_tokens_stored"), 3.0);
    assert!(
        !text.contains("tls@example.com") && !text.contains("spiffe://"),
        "metrics carry no value or identity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_refuses_the_noisy_identity_and_not_the_other() {
    let vault = TestVault::start_with("[limits]\nper_identity_rate = 1\nper_identity_burst = 5\n");
    let mut noisy = vault.client("checkout").await;
    let mut refused = None;
    for _ in 0..20 {
        if let Err(status) = noisy.tokenize(request()).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the noisy identity was never limited");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("limits.per_identity_rate"),
        "{}",
        status.message()
    );
    let retry: u64 = status
        .metadata()
        .get("retry-after-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 1000);
    // Another identity is unaffected.
    let mut quiet = vault.client("support").await;
    quiet.tokenize(request()).await.unwrap();
}

/// A platform's reload hook may fire the moment the vault says it serves:
/// that SIGHUP must reload, not take SIGHUP's default action (exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_as_soon_as_the_vault_serves_reloads_and_does_not_kill_it() {
    let mut vault = TestVault::start();
    for _ in 0..5 {
        vault.reload_and_wait("reloaded the TLS certificate");
        call_with(&vault, &vault.pki.tls("checkout")).await.unwrap();
        vault.stop();
        vault.spawn().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_policy_reload_on_sighup_and_a_broken_one_is_refused() {
    let vault = TestVault::start();
    // A new server certificate from a new CA, swapped in the Kubernetes way:
    // write new files, then repoint a symlink... here, the configured paths.
    let new_ca = tokenvault::pki::Ca::new("rotated CA").unwrap();
    let issued = new_ca
        .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let tls_dir = vault.root.path().join("tls");
    std::fs::write(tls_dir.join("rotated-ca.pem"), new_ca.cert_pem()).unwrap();
    let trusting_new = ClientTls {
        ca: tls_dir.join("rotated-ca.pem"),
        ..vault.pki.tls("checkout")
    };
    assert!(
        call_with(&vault, &trusting_new).await.is_err(),
        "the new certificate is not in use yet"
    );

    std::fs::write(tls_dir.join("server.pem.new"), &issued.cert_pem).unwrap();
    std::fs::write(tls_dir.join("server.key.new"), &issued.key_pem).unwrap();
    std::fs::rename(tls_dir.join("server.key.new"), tls_dir.join("server.key")).unwrap();
    std::fs::rename(tls_dir.join("server.pem.new"), tls_dir.join("server.pem")).unwrap();
    vault.reload_and_wait("reloaded the TLS certificate");
    call_with(&vault, &trusting_new).await.unwrap();

    // A broken certificate is refused and the last good one stays.
    std::fs::write(
        tls_dir.join("server.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    vault.reload_and_wait("refused the new TLS files");
    call_with(&vault, &trusting_new).await.unwrap();

    // The policy reloads with the config file: grant the stranger tokenize.
    std::fs::write(tls_dir.join("server.pem"), &issued.cert_pem).unwrap();
    let stranger = ClientTls {
        ca: tls_dir.join("rotated-ca.pem"),
        ..vault.pki.tls("stranger")
    };
    let err = call_with(&vault, &stranger).await.unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    std::fs::write(
        vault.config_path(),
        format!(
            "{config}\n[[policy]]\nidentity = \"{}\"\nscopes = [\"tokenize:email\"]\n",
            spiffe("stranger")
        ),
    )
    .unwrap();
    vault.reload_and_wait("reloaded the policy");
    call_with(&vault, &stranger).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_development_master_key_can_come_from_the_environment() {
    let mut vault = TestVault::start();
    vault.stop();
    let key_hex = std::fs::read_to_string(vault.root.path().join("master.key")).unwrap();
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    let env_config = vault.root.path().join("env.toml");
    std::fs::write(
        &env_config,
        config.replace(
            "master_key_file = \"master.key\"",
            "master_key_env = \"TV_TEST_MASTER_KEY\"",
        ),
    )
    .unwrap();

    // Missing or malformed: one clear line.
    let err = serve_must_fail(&env_config);
    assert!(err.contains("TV_TEST_MASTER_KEY is not set"), "{err}");

    // Set: the vault opens (the same key as the file) and warns.
    let mut child = tokenvault_command()
        .args(["serve", "--config"])
        .arg(&env_config)
        .env("TV_TEST_MASTER_KEY", key_hex.trim())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut warned = false;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            warned |= line.contains("development only");
            if line.contains("\"serving\"") {
                let _ = tx.send(warned);
                return;
            }
        }
    });
    let warned = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the vault did not start with the environment key");
    assert!(warned, "no development-only warning");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// What Kubernetes makes of a ConfigMap or Secret volume: `dir/..data` is a
/// symlink to a versioned directory holding the files, and each file is a
/// symlink through `..data`. An update writes a new versioned directory,
/// swaps `..data` to it with one rename, and deletes the old directory.
fn kubernetes_volume(dir: &std::path::Path, version: &str, files: &[(&str, Vec<u8>)]) {
    use std::os::unix::fs::symlink;
    let versioned = dir.join(version);
    std::fs::create_dir_all(&versioned).unwrap();
    for (name, content) in files {
        std::fs::write(versioned.join(name), content).unwrap();
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            symlink(format!("..data/{name}"), link).unwrap();
        }
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    symlink(version, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// The policy (from a ConfigMap), and the CRL and the server certificate
/// (from a Secret) reload when Kubernetes swaps `..data`, without a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_certificates_reload_through_a_kubernetes_volume_swap() {
    let mut vault = TestVault::start();
    vault.stop();
    let root = vault.root.path().to_owned();
    let tls_dir = root.join("tls");
    let at = |relative: &str| root.join(relative).display().to_string();
    let config = std::fs::read_to_string(vault.config_path())
        .unwrap()
        .replace(
            "\"tls/server.pem\"",
            &format!("\"{}\"", at("secret/server.pem")),
        )
        .replace(
            "\"tls/server.key\"",
            &format!("\"{}\"", at("secret/server.key")),
        )
        .replace(
            "client_ca = \"tls/ca.pem\"",
            &format!(
                "client_ca = \"{}\"\ncrl_files = [\"{}\"]",
                at("tls/ca.pem"),
                at("secret/revoked.crl")
            ),
        )
        .replace("\"master.key\"", &format!("\"{}\"", at("master.key")))
        .replace(
            "\"ledger/erasures\"",
            &format!("\"{}\"", at("ledger/erasures")),
        )
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", at("data")),
        )
        .replace(
            "shutdown_grace_seconds = 10",
            "shutdown_grace_seconds = 10\nreload_poll_seconds = 1",
        );
    let secret = root.join("secret");
    let configmap = root.join("configmap");
    let secret_files = |cert: &[u8], key: &[u8], crl: String| {
        [
            ("server.pem", cert.to_vec()),
            ("server.key", key.to_vec()),
            ("revoked.crl", crl.into_bytes()),
        ]
    };
    let (first_cert, first_key) = (
        std::fs::read(tls_dir.join("server.pem")).unwrap(),
        std::fs::read(tls_dir.join("server.key")).unwrap(),
    );
    kubernetes_volume(
        &secret,
        "..2026_12_02_v1",
        &secret_files(&first_cert, &first_key, vault.pki.ca.crl(&[]).unwrap()),
    );
    kubernetes_volume(
        &configmap,
        "..2026_12_02_v1",
        &[("tokenvault.toml", config.clone().into_bytes())],
    );
    std::fs::remove_file(vault.config_path()).unwrap();
    std::os::unix::fs::symlink("configmap/tokenvault.toml", vault.config_path()).unwrap();
    vault.spawn().unwrap();
    call_with(&vault, &vault.pki.tls("checkout")).await.unwrap();

    // The ConfigMap changes: the stranger is granted tokenize.
    let stranger = vault.pki.tls("stranger");
    let err = call_with(&vault, &stranger).await.unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    let seen = vault.count_log("reloaded the policy");
    let granted = format!(
        "{config}\n[[policy]]\nidentity = \"{}\"\nscopes = [\"tokenize:email\"]\n",
        spiffe("stranger")
    );
    kubernetes_volume(
        &configmap,
        "..2026_12_02_v2",
        &[("tokenvault.toml", granted.into_bytes())],
    );
    assert!(
        vault.wait_for_more_logs("reloaded the policy", seen),
        "the ConfigMap swap was not noticed:\n{}",
        vault.logs()
    );
    call_with(&vault, &stranger).await.unwrap();

    // The Secret changes: its CRL revokes a client certificate.
    let mut to_revoke = ClientSpec::spiffe(&spiffe("checkout"));
    to_revoke.serial = Some(0x5eed_0003);
    let to_revoke = vault.pki.client("to-revoke", &to_revoke);
    call_with(&vault, &to_revoke).await.unwrap();
    let revoking = vault.pki.ca.crl(&[0x5eed_0003]).unwrap();
    let seen = vault.count_log("reloaded the TLS certificate");
    kubernetes_volume(
        &secret,
        "..2026_12_02_v2",
        &secret_files(&first_cert, &first_key, revoking.clone()),
    );
    assert!(
        vault.wait_for_more_logs("reloaded the TLS certificate", seen),
        "the CRL swap was not noticed:\n{}",
        vault.logs()
    );
    assert!(
        call_with(&vault, &to_revoke).await.is_err(),
        "a certificate the new CRL revokes was served"
    );
    call_with(&vault, &vault.pki.tls("checkout")).await.unwrap();

    // The Secret changes again: a server certificate from a new CA.
    let new_ca = tokenvault::pki::Ca::new("rotated CA").unwrap();
    let issued = new_ca
        .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    std::fs::write(tls_dir.join("rotated-ca.pem"), new_ca.cert_pem()).unwrap();
    let trusting_new = ClientTls {
        ca: tls_dir.join("rotated-ca.pem"),
        ..vault.pki.tls("checkout")
    };
    assert!(call_with(&vault, &trusting_new).await.is_err());
    let seen = vault.count_log("reloaded the TLS certificate");
    kubernetes_volume(
        &secret,
        "..2026_12_02_v3",
        &secret_files(
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            revoking,
        ),
    );
    assert!(
        vault.wait_for_more_logs("reloaded the TLS certificate", seen),
        "the Secret swap was not noticed:\n{}",
        vault.logs()
    );
    call_with(&vault, &trusting_new).await.unwrap();
}

/// Narrowing `tls.trust_domains` on reload ends the open connections of
/// identities it no longer accepts, as a new handshake would refuse them:
/// the identity is checked again, not only the chain. Before, such a
/// connection kept working until `max_connection_age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrowing_the_trust_domains_ends_the_connections_they_no_longer_accept() {
    let vault = TestVault::start_with_tls("trust_domains = [\"test.tokenvault.local\"]");
    let mut client = vault.client("checkout").await;
    let request = || TokenizeRequest {
        items: vec![common::item("email", "narrowed@example.com")],
        ..Default::default()
    };
    client.tokenize(request()).await.unwrap();

    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    assert!(config.contains("\"test.tokenvault.local\""));
    std::fs::write(
        vault.config_path(),
        config.replace("\"test.tokenvault.local\"", "\"other.example\""),
    )
    .unwrap();
    vault.reload_and_wait("closed connections whose client certificate is no longer accepted");
    // The same channel: its connection is gone, and a new one is refused.
    // The first call may meet the connection as it closes (CANCELLED:
    // "connection closed"), or find it closed (UNAVAILABLE), or reconnect
    // and be refused (UNAUTHENTICATED); none is answered.
    let status = client.tokenize(request()).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unauthenticated | tonic::Code::Unavailable | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    let status = client.tokenize(request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}
