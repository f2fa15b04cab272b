//! Every example configuration the project ships parses with the server's
//! own loader.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};

use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use tokenvault::config::{Config, RawConfig};

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    toml_files(&root.join("examples"), &mut files);
    toml_files(&root.join("deploy"), &mut files);
    assert!(!files.is_empty(), "no example configs found");
    for file in files {
        // A `tokenvault migrate` config names the databases only.
        if file.parent().is_some_and(|dir| dir.ends_with("migrate")) {
            let (engine, _) =
                Config::databases_of(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(
                matches!(engine, tokenvault::config::EngineSetting::Postgres(_)),
                "{}",
                file.display()
            );
            continue;
        }
        // No environment layer: the examples must stand on their own.
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let config =
            Config::from_figment(&figment).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!config.field_types.is_empty());
    }
}

#[test]
fn the_full_example_documents_every_section() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tokenvault.toml"),
    )
    .unwrap();
    let defaults = RawConfig::default().to_toml().unwrap();
    let table: toml::Table = defaults.parse().unwrap();
    for (key, value) in table {
        if let toml::Value::Table(section) = value {
            for sub in section.keys() {
                if key == "field_types" {
                    continue;
                }
                assert!(
                    text.contains(&format!("{sub} =")),
                    "examples/tokenvault.toml lacks {key}.{sub}"
                );
            }
        } else {
            let documented =
                text.contains(&format!("{key} =")) || text.contains(&format!("[[{key}]]"));
            assert!(documented, "examples/tokenvault.toml lacks {key}");
        }
    }
}
