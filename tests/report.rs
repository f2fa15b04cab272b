//! The records of processing from a real vault: through Admin/ProcessingReport
//! and offline with `tokenvault report processing`, and the HTML form
//! rendered by a real headless Chromium.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{TestVault, subject_item, tokenize_one, tokens_of, tokenvault_command};
use tokenvault::proto::v1::{
    DetokenizeRequest, ExportSubjectRequest, ProcessingReportRequest, TokenizeRequest,
    admin_client::AdminClient, subjects_client::SubjectsClient,
};
use tonic::{Code, transport::Channel};

async fn report(admin: &mut AdminClient<Channel>, format: &str) -> Result<String, tonic::Status> {
    admin
        .processing_report(ProcessingReportRequest {
            format: format.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().body)
}

async fn json(admin: &mut AdminClient<Channel>) -> serde_json::Value {
    serde_json::from_str(&report(admin, "json").await.unwrap()).unwrap()
}

/// The report once it lists `loads` policy loads (the vault records the
/// policy in force within a second of putting it in force).
async fn with_policy_loads(admin: &mut AdminClient<Channel>, loads: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = json(admin).await;
        if report["policy_loads"].as_array().unwrap().len() >= loads {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "no policy load recorded: {report}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spiffe(name: &str) -> String {
    common::spiffe(name)
}

/// (identity, field type, purpose, calls) of the reveals part.
fn reveals(report: &serde_json::Value) -> Vec<(String, String, String, u64)> {
    report["reveals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["identity"].as_str().unwrap().to_owned(),
                r["field_type"].as_str().unwrap().to_owned(),
                r["purpose"].as_str().unwrap().to_owned(),
                r["calls"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processing_report_counts_what_the_trail_holds_online_and_offline() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let response = support
        .tokenize(TokenizeRequest {
            items: vec![
                subject_item("email", "report.subject@example.com", "cust-report"),
                subject_item("phone", "+442079460958", "cust-report"),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let tokens = tokens_of(response);
    support
        .detokenize(DetokenizeRequest {
            tokens: tokens.clone(),
            purpose: "customer_support".into(),
            masked: false,
        })
        .await
        .unwrap();
    let mut masked = vault.client("masked-reader").await;
    masked
        .detokenize(DetokenizeRequest {
            tokens: tokens[..1].to_vec(),
            purpose: "customer_support".into(),
            masked: true,
        })
        .await
        .unwrap();
    let privacy = vault.channel_with(&vault.pki.tls("privacy")).await.unwrap();
    let mut export = SubjectsClient::new(privacy)
        .export_subject(ExportSubjectRequest {
            subject_id: "cust-report".into(),
            purpose: "subject_access_request".into(),
            recipient_public_key: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    while export.message().await.unwrap().is_some() {}

    let auditor = vault.channel_with(&vault.pki.tls("auditor")).await.unwrap();
    let mut admin = AdminClient::new(auditor);
    let online = with_policy_loads(&mut admin, 1).await;
    assert_eq!(
        reveals(&online),
        [
            (
                spiffe("masked-reader"),
                "email".into(),
                "customer_support".into(),
                1
            ),
            (
                spiffe("support"),
                "email".into(),
                "customer_support".into(),
                1
            ),
            (
                spiffe("support"),
                "phone".into(),
                "customer_support".into(),
                1
            ),
        ],
        "{online}"
    );
    let per_day = &online["reveals_per_day"];
    assert_eq!(per_day.as_array().unwrap().len(), 1, "{per_day}");
    assert_eq!(per_day[0]["purpose"], "customer_support");
    assert_eq!(per_day[0]["values"], 3, "two plain and one masked value");
    assert_eq!(online["rights"]["exports"], 1);
    let held = |name: &str| {
        online["field_types"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["values_held"].as_u64().unwrap())
    };
    assert_eq!((held("email"), held("phone")), (Some(1), Some(1)));
    let privacy_rule = online["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["identity"] == spiffe("privacy"))
        .unwrap();
    assert!(
        privacy_rule["scopes"]
            .to_string()
            .contains("subject:history")
    );
    assert!(
        online["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["label"] == "dek/0000000001")
    );
    let first_hash = online["policy_loads"][0]["policy_hash"].clone();
    assert_eq!(first_hash.as_str().unwrap().len(), 64);

    // A reload that changes the policy is recorded with the new hash.
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    std::fs::write(
        vault.config_path(),
        config + "\n[[policy]]\nidentity = \"spiffe://test.tokenvault.local/newcomer\"\nscopes = [\"tokenize:email\"]\n",
    )
    .unwrap();
    vault.reload_and_wait("reloaded the policy");
    let reloaded = with_policy_loads(&mut admin, 2).await;
    assert_ne!(reloaded["policy_loads"][1]["policy_hash"], first_hash);

    // The other forms, and what is refused.
    let md = report(&mut admin, "md").await.unwrap();
    assert!(
        md.contains(&format!(
            "| {} | phone | customer_support | 1 |",
            spiffe("support")
        )),
        "{md}"
    );
    let invalid = report(&mut admin, "pdf").await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let mut denied = AdminClient::new(vault.channel_with(&vault.pki.tls("support")).await.unwrap());
    let refused = report(&mut denied, "json").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Offline, on the running vault's directory: the same counts.
    let output = tokenvault_command()
        .args(["report", "processing", "--format", "json", "--config"])
        .arg(vault.config_path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let offline: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(reveals(&offline), reveals(&reloaded));
    assert_eq!(offline["reveals_per_day"], reloaded["reveals_per_day"]);
    assert_eq!(offline["policy_loads"], reloaded["policy_loads"]);
    assert_eq!(offline["rights"]["exports"], 1);
    vault.assert_log_free_of(&["report.subject@example.com", "+442079460958"]);
    assert!(!String::from_utf8_lossy(&output.stdout).contains("report.subject@example.com"));
}

/// Debian's Chromium, installed by `scripts/install-deps.sh --test`.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium with the flags this machine's closed network
/// needs (no background connections), on `url`.
fn chromium(profile: &Path, args: &[&str], url: &str) -> std::process::Output {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `make test-deps` (scripts/install-deps.sh --test installs Debian's chromium)"
    );
    Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap()
}

/// The HTML report, rendered by a real browser: the screenshot shows the
/// chart's bars at the heights the JSON's numbers give them, and the DOM the
/// browser built holds one bar per JSON row with its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_renders_its_chart_in_a_real_browser() {
    let vault = TestVault::start();
    let mut support = vault.client("support").await;
    for n in 0..3 {
        let token = tokenize_one(&mut support, "email", &format!("chart.{n}@example.com")).await;
        for purpose in ["customer_support", "order_fulfilment"].iter().take(n + 1) {
            support
                .detokenize(DetokenizeRequest {
                    tokens: vec![token.clone()],
                    purpose: (*purpose).into(),
                    masked: false,
                })
                .await
                .unwrap();
        }
    }
    let mut admin = AdminClient::new(vault.channel_with(&vault.pki.tls("auditor")).await.unwrap());
    let json = json(&mut admin).await;
    let html = report(&mut admin, "html").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).unwrap();
    let url = format!("file://{}", page.display());

    // What the browser parsed: every bar, with its day, purpose and count.
    let dom = chromium(&dir.path().join("profile-dom"), &["--dump-dom"], &url);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let bars: Vec<(String, u64)> = dom
        .split("<rect class=\"bar\" ")
        .skip(1)
        .map(|bar| {
            let attr = |name: &str| {
                let start = bar.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                bar[start..start + bar[start..].find('"').unwrap()].to_owned()
            };
            (attr("data-purpose"), attr("data-values").parse().unwrap())
        })
        .collect();
    let rows: Vec<(String, u64)> = json["reveals_per_day"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["purpose"].as_str().unwrap().to_owned(),
                r["values"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(bars, rows, "the chart's bars are the JSON's rows");
    assert_eq!(
        rows,
        [
            ("customer_support".to_owned(), 3),
            ("order_fulfilment".to_owned(), 2)
        ]
    );

    // What the browser drew: each purpose's bar in its colour, its height
    // in proportion to its number (the tallest is the chart's 200 px).
    let shot = dir.path().join("report.png");
    let drawn = chromium(
        &dir.path().join("profile-shot"),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=900,1200",
        ],
        &url,
    );
    assert!(
        drawn.status.success(),
        "{}",
        String::from_utf8_lossy(&drawn.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (900, 1200));
    let channels = info.line_size / info.width as usize;
    let tallest_run = |rgb: [u8; 3]| -> usize {
        (0..info.width as usize)
            .map(|x| {
                let (mut best, mut run) = (0, 0);
                for y in 0..info.height as usize {
                    let at = y * info.line_size + x * channels;
                    if pixels[at..at + 3] == rgb {
                        run += 1;
                        best = best.max(run);
                    } else {
                        run = 0;
                    }
                }
                best
            })
            .max()
            .unwrap_or(0)
    };
    // The first two colours of the chart's palette, in purpose order.
    let support_bar = tallest_run([0x4e, 0x79, 0xa7]);
    let fulfilment_bar = tallest_run([0xf2, 0x8e, 0x2b]);
    assert!(
        (198..=202).contains(&support_bar),
        "the 3-value bar is {support_bar} px, not the chart's 200"
    );
    let expected = support_bar * 2 / 3;
    assert!(
        fulfilment_bar.abs_diff(expected) <= 2,
        "the 2-value bar is {fulfilment_bar} px, not {expected}"
    );
}
