//! The layering ARCHITECTURE.md promises, checked on the source: which
//! modules may name which, and that the storage engine's crate is named only
//! inside `store/`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The top-level crate module a source file belongs to (`vault` for
/// `src/vault/tokenize.rs`, `metrics` for `src/metrics.rs`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_str().unwrap().trim_end_matches(".rs").to_owned()
}

/// The crate modules `text` names: `crate::x::…` paths, and the first
/// segment of each item of `use crate::{x::…, y, …}` groups. Comments are
/// skipped.
fn crate_modules_named(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut named = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group, at brace depth 0.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[i..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        named.insert(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            named.insert(ident(rest));
        }
    }
    named.remove("");
    named
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_parser_reads_use_groups_and_paths() {
    let text = "use crate::{\n    audit::{A, B},\n    store::Table, // crate::api\n    token,\n};\nfn f() { crate::metrics::x(); }";
    let named: Vec<String> = crate_modules_named(text).into_iter().collect();
    assert_eq!(named, ["audit", "metrics", "store", "token"]);
}

/// The lower layers never reach up: `api → authz → vault → crypto/store`,
/// and nothing below `api` knows about gRPC or the server.
#[test]
fn lower_layers_never_name_the_layers_above_them() {
    let forbidden: &[(&str, &[&str])] = &[
        (
            "store",
            &["vault", "api", "authz", "server", "cli", "bench", "config"],
        ),
        (
            "crypto",
            &["vault", "api", "store", "server", "cli", "authz"],
        ),
        (
            "vault",
            &["api", "server", "cli", "bench", "metrics", "config"],
        ),
        (
            "layout",
            &[
                "vault", "api", "authz", "audit", "server", "cli", "bench", "config", "store",
            ],
        ),
        (
            "authz",
            &["api", "vault", "server", "cli", "store", "config"],
        ),
        ("audit", &["api", "vault", "server", "cli", "config"]),
        // Reports read the stored tables and the trail; the vault calls
        // them, never the other way.
        (
            "report",
            &["api", "vault", "server", "cli", "bench", "config"],
        ),
        (
            "fields",
            &["api", "vault", "server", "cli", "store", "config"],
        ),
        (
            "token",
            &["api", "vault", "server", "cli", "store", "fields", "config"],
        ),
        (
            "identity",
            &["api", "vault", "server", "cli", "store", "config"],
        ),
        // The API is configured by values of its own types; the server
        // wiring turns the configuration into them.
        ("api", &["config", "server", "cli", "bench"]),
        // Metrics are told numbers; they do not reach into what they count.
        (
            "metrics",
            &["vault", "api", "server", "cli", "config", "store"],
        ),
    ];
    let mut violations = Vec::new();
    for file in rust_files(&src()) {
        let module = module_of(&src(), &file);
        let Some((_, banned)) = forbidden.iter().find(|(m, _)| *m == module) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for named in crate_modules_named(&text) {
            if banned.contains(&named.as_str()) {
                violations.push(format!("{} names crate::{named}", file.display()));
            }
        }
        // The API is gRPC; metrics label requests by their gRPC code.
        let speaks_grpc = module == "api" || module == "metrics";
        if !speaks_grpc && (text.contains("tonic::") || text.contains("prost::")) {
            violations.push(format!("{} names tonic or prost", file.display()));
        }
    }
    assert!(violations.is_empty(), "{violations:#?}");
}

/// Only `store/` names the storage engine's crate; everything else goes
/// through the `Store` trait (the composition roots pick `RocksStore`).
#[test]
fn only_the_store_names_the_storage_engine() {
    let mut violations = Vec::new();
    for file in rust_files(&src()) {
        // The benchmark's peer is a PostgreSQL client by definition: it
        // measures a plain table, not the vault.
        if file.starts_with(src().join("store")) || file == src().join("bench/peer.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for engine in [
            "rocksdb::",
            "use rocksdb",
            "tokio_postgres",
            "deadpool_postgres",
        ] {
            if text.contains(engine) {
                violations.push(format!("{} names {engine}", file.display()));
            }
        }
    }
    assert!(violations.is_empty(), "{violations:#?}");
}

/// Whether `line` (code, comments stripped) makes a `tonic::Status` itself:
/// `Status::new(…)`, `Status::unavailable(…)` and the like; a conversion
/// (`Status::from`) goes through `api/status.rs`.
fn makes_a_status(line: &str) -> bool {
    let code = line.split("//").next().unwrap();
    code.match_indices("Status::").any(|(at, _)| {
        let rest = &code[at + "Status::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        // Called, or passed as a function (`.map_err(Status::internal)`).
        !name.is_empty() && name != "from" && rest[name.len()..].starts_with(['(', ')', ','])
    })
}

#[test]
fn only_api_status_makes_a_grpc_status() {
    assert!(makes_a_status(
        "    Err(Status::unauthenticated(e.to_string()))"
    ));
    assert!(!makes_a_status("    .map_err(Status::from)"));
    assert!(makes_a_status("    .map_err(Status::internal)"));
    assert!(!makes_a_status("    // Status::internal(\"x\")"));
    let src = src();
    let mut found = Vec::new();
    for file in rust_files(&src) {
        if file.ends_with("api/status.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if makes_a_status(line) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "only src/api/status.rs makes a tonic::Status:\n{}",
        found.join("\n")
    );
}
