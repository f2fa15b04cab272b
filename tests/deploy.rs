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
use tokenvault::config::{Config, DatabaseSetting, EngineSetting, LedgerSetting, RawConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const KUSTOMIZATIONS: [&str; 6] = [
    "deploy/base",
    "deploy/overlays/hsm",
    "deploy/overlays/sidecar",
    "deploy/overlays/ha",
    "deploy/overlays/ha/migrate",
    "deploy/overlays/sidecar-shared",
];

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
        let LedgerSetting::File(ledger) = &config.erasure_ledger else {
            panic!("{manifest}: the ledger is not a file");
        };
        assert!(
            ledger.starts_with("/var/lib/tokenvault-ledger/")
                && !ledger.starts_with("/var/lib/tokenvault/"),
            "{manifest}: ledger at {}",
            ledger.display()
        );
    }
}

fn load(path: &Path) -> Config {
    let figment =
        Figment::from(Serialized::defaults(RawConfig::default())).merge(Toml::file_exact(path));
    Config::from_figment(&figment).unwrap()
}

/// Renders a kustomization, as JSON objects (through the validator's own
/// YAML parser).
fn render(dir: &str) -> Vec<serde_json::Value> {
    let rendered = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(root())
        .output()
        .expect("kubectl is missing: run `make test-deps`");
    assert!(rendered.status.success(), "{dir}");
    let mut python = Command::new(common::test_tool("python3"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    python
        .stdin
        .take()
        .unwrap()
        .write_all(&rendered.stdout)
        .unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(out.status.success(), "{dir}: YAML to JSON failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn of_kind<'a>(objects: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The vault's pod template in a rendered layout (the StatefulSet's or
/// Deployment's holding the tokenvault container).
fn vault_container(objects: &[serde_json::Value]) -> (serde_json::Value, serde_json::Value) {
    for object in objects {
        let spec = &object["spec"]["template"]["spec"];
        for list in ["containers", "initContainers"] {
            if let Some(found) = spec[list]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == "tokenvault"))
            {
                return (found.clone(), spec.clone());
            }
        }
    }
    panic!("no tokenvault container");
}

/// Every file a deploy config reads sits under a path its rendered
/// manifests mount, and the engine's state is where it should be: a volume
/// for the embedded engine, nothing but Secrets for replicas on PostgreSQL.
#[test]
fn every_configured_path_is_mounted() {
    let cases = [
        ("deploy/base", "deploy/base/tokenvault.toml"),
        (
            "deploy/overlays/sidecar",
            "deploy/overlays/sidecar/tokenvault.toml",
        ),
        ("deploy/overlays/ha", "deploy/overlays/ha/tokenvault.toml"),
        ("deploy/overlays/hsm", "deploy/overlays/hsm/tokenvault.toml"),
        (
            "deploy/overlays/sidecar-shared",
            "deploy/overlays/sidecar-shared/tokenvault.toml",
        ),
    ];
    for (dir, config) in cases {
        let config = load(&root().join(config));
        let objects = render(dir);
        let (container, pod) = vault_container(&objects);
        let mounts: Vec<String> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap().to_owned())
            .collect();
        let mut paths = vec![
            config.tls.cert.clone(),
            config.tls.key.clone(),
            config.tls.client_ca.clone(),
        ];
        match &config.master_key {
            tokenvault::crypto::MasterKeySetting::File(path) => paths.push(path.clone()),
            tokenvault::crypto::MasterKeySetting::Pkcs11(hsm) => {
                paths.push(hsm.module.clone());
                paths.push(hsm.pin_file.clone());
            }
            other => panic!("{dir}: the deployed config reads its master key from {other:?}"),
        }
        let database_files = |db: &DatabaseSetting| {
            db.password_file
                .iter()
                .chain(&db.ca_file)
                .cloned()
                .collect::<Vec<_>>()
        };
        match (&config.engine, &config.erasure_ledger) {
            (EngineSetting::RocksDb, LedgerSetting::File(ledger)) => {
                paths.push(config.data_dir.clone());
                paths.push(ledger.clone());
            }
            (EngineSetting::Postgres(db), LedgerSetting::Database(ledger)) => {
                // Stateless: no volume but Secrets and the ConfigMap.
                for volume in pod["volumes"].as_array().unwrap() {
                    assert!(
                        volume.get("secret").is_some() || volume.get("configMap").is_some(),
                        "{dir}: a replica on PostgreSQL mounts {volume}"
                    );
                }
                assert!(
                    !objects.iter().any(|o| o["kind"] == "PersistentVolumeClaim" || o["kind"] == "StatefulSet"),
                    "{dir}: state outside the database"
                );
                let (db, ledger) = (database_files(db), database_files(ledger));
                assert_eq!(
                    (db.len(), ledger.len()),
                    (2, 2),
                    "{dir}: TLS and a password to each database"
                );
                paths.extend(db);
                paths.extend(ledger);
            }
            other => panic!("{dir}: an unexpected layout {other:?}"),
        }
        for path in paths {
            assert!(
                mounts.iter().any(|m| path.starts_with(m)),
                "{dir}: {} is not under any mountPath of {mounts:?}",
                path.display()
            );
        }
    }
}

/// The replicated layout: a Deployment of at least two replicas, spread
/// over nodes, scaled on CPU, drained one at a time; its two databases
/// (the data and the erasure ledger) are the CloudNativePG clusters the
/// database kustomization defines, with a synchronous standby each.
#[test]
fn the_replicated_layout_scales_and_names_its_databases() {
    let objects = render("deploy/overlays/ha");
    let deployment = of_kind(&objects, "Deployment");
    assert_eq!(deployment.len(), 1);
    let spec = &deployment[0]["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2);
    assert!(
        spec["template"]["spec"]["affinity"]["podAntiAffinity"].is_object(),
        "no anti-affinity"
    );
    let hpa = of_kind(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpa.len(), 1);
    assert!(hpa[0]["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert_eq!(
        hpa[0]["spec"]["scaleTargetRef"]["name"],
        deployment[0]["metadata"]["name"]
    );
    assert_eq!(hpa[0]["spec"]["metrics"][0]["resource"]["name"], "cpu");
    let pdb = of_kind(&objects, "PodDisruptionBudget");
    assert_eq!(pdb[0]["spec"]["maxUnavailable"], 1);
    assert!(pdb[0]["spec"].get("minAvailable").is_none());
    // Every selector of the layout matches the Deployment's pods.
    let pod_labels = &spec["template"]["metadata"]["labels"];
    let selects = |selector: &serde_json::Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels[k] == *v)
    };
    assert!(selects(&spec["selector"]["matchLabels"]));
    assert!(selects(&pdb[0]["spec"]["selector"]["matchLabels"]));
    for service in of_kind(&objects, "Service") {
        assert!(selects(&service["spec"]["selector"]), "{service}");
    }

    let databases = render("deploy/overlays/ha/database");
    let clusters = of_kind(&databases, "Cluster");
    let config = load(&root().join("deploy/overlays/ha/tokenvault.toml"));
    let (EngineSetting::Postgres(db), LedgerSetting::Database(ledger)) =
        (&config.engine, &config.erasure_ledger)
    else {
        panic!("the replicated layout is not on PostgreSQL");
    };
    for setting in [db, ledger] {
        let host = setting
            .connection
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("host="))
            .unwrap();
        let cluster = host.strip_suffix("-rw").expect("the read-write Service");
        let defined = clusters
            .iter()
            .find(|c| c["metadata"]["name"] == cluster)
            .unwrap_or_else(|| panic!("no Cluster {cluster}"));
        assert!(
            defined["spec"]["minSyncReplicas"].as_u64().unwrap() >= 1,
            "{cluster}"
        );
        assert!(
            defined["spec"]["instances"].as_u64().unwrap() >= 3,
            "{cluster}"
        );
        assert!(setting.connection.contains("sslmode=require"));
        // Least privilege: the replicas connect as a role of their own,
        // never as the owner, and the cluster makes that role.
        let user = |connection: &str| {
            connection
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("user="))
                .unwrap()
                .to_owned()
        };
        let owner = defined["spec"]["bootstrap"]["initdb"]["owner"]
            .as_str()
            .unwrap();
        let runtime = user(&setting.connection);
        assert_ne!(
            runtime, owner,
            "{cluster}: the replicas connect as the owner"
        );
        assert!(
            defined["spec"]["managed"]["roles"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == runtime.as_str() && r["login"] == true),
            "{cluster}: no managed role {runtime}"
        );
    }
    // The lock table fits the HPA's most replicas: two committers each,
    // up to 2,048 key locks each (deploy/README.md, "Locks"), in
    // max_locks_per_transaction x max_connections (100 by default).
    let max_replicas = hpa[0]["spec"]["maxReplicas"].as_u64().unwrap();
    let vault_db = clusters
        .iter()
        .find(|c| c["metadata"]["name"] == "tokenvault-db")
        .unwrap();
    let max_locks: u64 = vault_db["spec"]["postgresql"]["parameters"]["max_locks_per_transaction"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        max_locks * 100 >= max_replicas * 2 * 2048,
        "max_locks_per_transaction {max_locks} is too small for {max_replicas} replicas"
    );
    // Only the vault and the migrate Job reach the databases' pods.
    let policies = of_kind(&databases, "NetworkPolicy");
    assert_eq!(policies.len(), 1);
    assert_eq!(
        policies[0]["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );

    // The migrate Job connects as the owner and grants the replicas' role.
    let migrate = render("deploy/overlays/ha/migrate");
    let job = of_kind(&migrate, "Job");
    let args = &job[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    let (EngineSetting::Postgres(owner_db), LedgerSetting::Database(owner_ledger)) =
        Config::databases_of(&root().join("deploy/overlays/ha/migrate/tokenvault.toml")).unwrap()
    else {
        panic!("the migrate config is not on PostgreSQL");
    };
    for (owner, runtime) in [(&owner_db, db), (&owner_ledger, ledger)] {
        let host = |c: &str| {
            c.split_whitespace()
                .find(|kv| kv.starts_with("host="))
                .unwrap()
                .to_owned()
        };
        assert_eq!(host(&owner.connection), host(&runtime.connection));
        assert!(
            owner.connection.contains("user=tokenvault "),
            "{}",
            owner.connection
        );
    }
    assert_eq!(
        args,
        &serde_json::json!([
            "migrate",
            "--config",
            "/etc/tokenvault/config/tokenvault.toml",
            "--grant-to",
            "tokenvault_runtime"
        ])
    );
}

/// The NetworkPolicy admits clients by their own label only: common labels
/// must not leak into its client and DNS selectors (kustomize's
/// includeSelectors did, and then no client matched).
#[test]
fn network_policies_select_clients_by_their_label_only() {
    for dir in ["deploy/base", "deploy/overlays/ha"] {
        let objects = render(dir);
        let policy = of_kind(&objects, "NetworkPolicy");
        let client = &policy[0]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"];
        assert_eq!(
            *client,
            serde_json::json!({"tokenvault.io/client": "true"}),
            "{dir}"
        );
    }
    let ha = render("deploy/overlays/ha");
    let egress = &of_kind(&ha, "NetworkPolicy")[0]["spec"]["egress"];
    assert_eq!(
        egress[1]["to"][0]["podSelector"]["matchLabels"],
        serde_json::json!({"k8s-app": "kube-dns"})
    );
}

/// The HSM layout: no master key in the pod at all; the PKCS#11 module
/// comes from the vendor's image through a volume the vault cannot write,
/// the PIN from a Secret only the vault's user and group can read, and the
/// only egress is to the HSM.
#[test]
fn the_hsm_layout_mounts_a_module_and_a_pin_and_no_master_key() {
    let objects = render("deploy/overlays/hsm");
    let (container, pod) = vault_container(&objects);
    let volumes = pod["volumes"].as_array().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).cloned();
    assert!(
        volume("master-key").is_none(),
        "the master-key Secret is still mounted"
    );
    assert!(
        !objects
            .iter()
            .any(|o| o.to_string().contains("tokenvault-master-key")),
        "something still names the master-key Secret"
    );
    let pin = volume("hsm-pin").expect("no PIN volume");
    assert_eq!(pin["secret"]["defaultMode"], 0o400);
    assert!(volume("hsm-module").unwrap()["emptyDir"].is_object());
    let mounts = container["volumeMounts"].as_array().unwrap();
    for name in ["hsm-module", "hsm-pin"] {
        let mount = mounts.iter().find(|m| m["name"] == name).unwrap();
        assert_eq!(mount["readOnly"], true, "{name} is writable by the vault");
    }
    let copier = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hsm-module")
        .expect("nothing puts the module into its volume");
    assert!(copier["volumeMounts"][0]["name"] == "hsm-module");

    let config = load(&root().join("deploy/overlays/hsm/tokenvault.toml"));
    let tokenvault::crypto::MasterKeySetting::Pkcs11(hsm) = &config.master_key else {
        panic!("the HSM layout's config reads {:?}", config.master_key);
    };
    let module_mount = mounts.iter().find(|m| m["name"] == "hsm-module").unwrap();
    assert!(
        hsm.module
            .starts_with(module_mount["mountPath"].as_str().unwrap())
    );

    let policy = of_kind(&objects, "NetworkPolicy");
    let egress = policy[0]["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 1, "egress beyond the HSM: {egress:?}");
    assert!(egress[0]["to"][0]["ipBlock"]["cidr"].is_string());
}
