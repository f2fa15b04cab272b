//! The deployment files: the kustomizations render and pass strict schema
//! validation, the Dockerfile copies what exists and runs what we build, and
//! every path the configs name is mounted by their manifests.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use tokenvault::config::{Config, RawConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const KUSTOMIZATIONS: [&str; 2] = ["deploy/base", "deploy/overlays/sidecar"];

/// The oldest Kubernetes with native sidecars, and the newest the validator knows.
const KUBERNETES_VERSIONS: [Option<&str>; 2] = [Some("1.29.0"), None];

#[test]
fn kustomizations_render_and_pass_strict_validation() {
    // The manifests use `labels:`, which kubectl's embedded kustomize knows
    // from v5 on: say so rather than fail on a confusing render error.
    let kustomize = Command::new("bash")
        .arg(root().join("scripts/install-deps.sh"))
        .args(["--probe", "kustomize"])
        .status()
        .unwrap();
    assert!(
        kustomize.success(),
        "kubectl is missing or its kustomize is older than v5.0: install a current kubectl (`make test-deps` says which)"
    );
    let out_dir = tempfile::tempdir().unwrap();
    for dir in KUSTOMIZATIONS {
        let rendered = Command::new("kubectl")
            .args(["kustomize", dir])
            .current_dir(root())
            .output()
            .expect("kubectl is missing: run `make test-deps` (scripts/install-deps.sh --test installs it)");
        assert!(
            rendered.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let file = out_dir
            .path()
            .join(format!("{}.yaml", dir.replace('/', "_")));
        std::fs::write(&file, &rendered.stdout).unwrap();
        let yaml = String::from_utf8(rendered.stdout).unwrap();
        for label in ["app.kubernetes.io/part-of", "app.kubernetes.io/managed-by"] {
            assert!(yaml.contains(label), "{dir}: no {label} label");
        }
        for version in KUBERNETES_VERSIONS {
            let mut validate = Command::new(common::test_tool("kubernetes-validate"));
            validate.arg("--strict");
            if let Some(version) = version {
                validate.args(["-k", version]);
            }
            let result = validate.arg(&file).output().unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&result.stdout),
                String::from_utf8_lossy(&result.stderr)
            );
            assert!(
                result.status.success(),
                "{dir} against {version:?}:\n{report}"
            );
            assert!(
                !report.contains("ERROR"),
                "{dir} against {version:?}:\n{report}"
            );
            assert!(
                report.contains("passed"),
                "{dir}: nothing was validated:\n{report}"
            );
        }
    }
}

#[test]
fn the_dockerfile_copies_what_exists_and_runs_our_binary() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut copies = 0;
    for line in dockerfile.lines().map(str::trim) {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                root().join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
            copies += 1;
        }
    }
    assert!(copies >= 4, "the Dockerfile copies too little: {copies}");
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("name = \"tokenvault\"\npath = \"src/main.rs\""));
    assert!(dockerfile.contains("cargo build --release --locked --bin tokenvault"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/tokenvault\"]"));
    assert!(
        dockerfile.contains("USER 65532:65532"),
        "the image must run as non-root"
    );
    // The config path the image defaults to is the one the StatefulSet mounts.
    assert!(
        dockerfile
            .contains("CMD [\"serve\", \"--config\", \"/etc/tokenvault/config/tokenvault.toml\"]")
    );
    for (manifest, config) in [
        (
            "deploy/base/statefulset.yaml",
            "deploy/base/tokenvault.toml",
        ),
        (
            "deploy/overlays/sidecar/deployment.yaml",
            "deploy/overlays/sidecar/tokenvault.toml",
        ),
    ] {
        let text = std::fs::read_to_string(root().join(manifest)).unwrap();
        // A subPath mount never sees ConfigMap updates, so reloads would
        // silently never happen.
        assert!(
            text.contains("mountPath: /etc/tokenvault/config\n"),
            "{manifest}"
        );
        assert!(
            !text.contains("subPath"),
            "{manifest}: config mounted with subPath"
        );
        // The erasure ledger lives on its own volume, outside the data
        // volume that backups snapshot and restore.
        assert!(
            text.contains("mountPath: /var/lib/tokenvault-ledger\n"),
            "{manifest}"
        );
        let config = load(&root().join(config));
        assert!(
            config
                .erasure_ledger
                .starts_with("/var/lib/tokenvault-ledger/")
                && !config.erasure_ledger.starts_with("/var/lib/tokenvault/"),
            "{manifest}: ledger at {}",
            config.erasure_ledger.display()
        );
    }
}

fn load(path: &Path) -> Config {
    let figment =
        Figment::from(Serialized::defaults(RawConfig::default())).merge(Toml::file_exact(path));
    Config::from_figment(&figment).unwrap()
}

/// Every file a deploy config reads sits under a path its manifest mounts.
#[test]
fn every_configured_path_is_mounted() {
    let cases = [
        (
            "deploy/base/tokenvault.toml",
            "deploy/base/statefulset.yaml",
        ),
        (
            "deploy/overlays/sidecar/tokenvault.toml",
            "deploy/overlays/sidecar/deployment.yaml",
        ),
    ];
    for (config, manifest) in cases {
        let config = load(&root().join(config));
        let manifest = std::fs::read_to_string(root().join(manifest)).unwrap();
        let mounts: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_prefix("mountPath: "))
            .collect();
        let paths = [
            &config.data_dir,
            &config.tls.cert,
            &config.tls.key,
            &config.tls.client_ca,
            match &config.master_key {
                tokenvault::crypto::MasterKeySetting::File(path) => path,
                other => panic!("the deployed config reads its master key from {other:?}"),
            },
        ];
        for path in paths {
            assert!(
                mounts.iter().any(|m| path.starts_with(m)),
                "{} is not under any mountPath of {mounts:?}",
                path.display()
            );
        }
    }
}
