//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! tokenvault never needs a system `protoc`. The encoded descriptor set is
//! written next to the generated code for server reflection.
//!
//! Also records which commit the binary is built from
//! (`TV_BUILD_COMMIT`), so a benchmark run names the code it
//! measured rather than whatever directory it was started in. Not a
//! `TOKENVAULT_` name: cargo also sets it for `cargo run` and `cargo test`,
//! and the vault reads its configuration from `TOKENVAULT_` variables.

use std::{
    env,
    error::Error,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let protos = [
        "proto/tokenvault/v1/tokenvault.proto",
        "proto/tokenvault/v1/subjects.proto",
        "proto/tokenvault/v1/admin.proto",
        "proto/tokenvault/v1/audit.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("tokenvault_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    record_commit()?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

/// `git describe --always --dirty` of the source tree, or `unknown` when it
/// is not a git checkout (a source tarball). Re-run when HEAD moves or a
/// source file changes, so the `-dirty` mark is current.
fn record_commit() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let git = root.join(".git");
    for watched in ["src", "proto", "Cargo.toml", "build.rs"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    if git.is_dir() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(reference) = head_reference(&git) {
            println!("cargo:rerun-if-changed=.git/{reference}");
        }
    }
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=10"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TV_BUILD_COMMIT={commit}");
    Ok(())
}

/// The branch file HEAD points to (`refs/heads/main`), if it is one.
fn head_reference(git: &Path) -> Option<String> {
    let head = fs::read_to_string(git.join("HEAD")).ok()?;
    head.strip_prefix("ref: ").map(|r| r.trim().to_owned())
}
