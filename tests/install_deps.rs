//! The dependency detection of `scripts/install-deps.sh`, run against fake
//! machines: a directory standing for `/` that holds only what a test puts
//! there, and a `kubectl` stub on `PATH`. This is what a green CI on a
//! machine where someone had installed things by hand could not show: the
//! script once took Debian's `libclang-cpp.so.14` for the libclang that
//! bindgen loads, and `make dev` failed on every fresh machine.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps.sh")
}

/// Runs `install-deps.sh --probe NAME` with the file probes pointed at `root`
/// and nothing of this machine's own set-up leaking in.
fn probe(name: &str, root: &Path, path: &str) -> Output {
    Command::new("bash")
        .arg(script())
        .args(["--probe", name])
        .env_clear()
        .env("PATH", path)
        .env("HOME", root)
        .env("TOKENVAULT_PROBE_ROOT", root)
        .env("TV_TOOLS_VENV", root.join("venv"))
        .output()
        .unwrap()
}

fn found(name: &str, root: &Path) -> bool {
    let output = probe(name, root, "/usr/bin:/bin");
    assert!(
        output.status.code().is_some_and(|c| c <= 1),
        "probe {name} crashed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.status.success()
}

fn touch(root: &Path, path: &str) {
    let path = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"").unwrap();
}

fn executable(path: &Path, script: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, script).unwrap();
    let mut permissions = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(path, permissions).unwrap();
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let root = tempfile::tempdir().unwrap();
    // What a Debian 12 image with LLVM but without libclang-dev ships.
    touch(root.path(), "/usr/lib/llvm-14/lib/libclang-cpp.so.14");
    touch(root.path(), "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14");
    touch(root.path(), "/usr/lib/llvm-14/lib/libLLVM-14.so");
    assert!(!found("libclang", root.path()));
}

#[test]
fn libclang_without_clang_headers_is_not_enough() {
    let root = tempfile::tempdir().unwrap();
    // libclang1-14 alone: the library, but not the stddef.h bindgen needs.
    touch(root.path(), "/usr/lib/llvm-14/lib/libclang.so.1");
    assert!(!found("libclang", root.path()));
}

#[test]
fn libclang_dev_is_found() {
    for library in [
        "/usr/lib/llvm-14/lib/libclang.so",
        "/usr/lib/llvm-14/lib/libclang.so.1",
        "/usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        "/usr/lib/x86_64-linux-gnu/libclang-14.so",
    ] {
        let root = tempfile::tempdir().unwrap();
        touch(root.path(), "/usr/lib/llvm-14/lib/libclang-cpp.so.14");
        touch(root.path(), library);
        touch(
            root.path(),
            "/usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h",
        );
        assert!(found("libclang", root.path()), "{library}");
    }
}

#[test]
fn postgres_server_binaries_are_detected() {
    let root = tempfile::tempdir().unwrap();
    // The client package alone (psql) is not a server.
    touch(root.path(), "/usr/lib/postgresql/15/bin/psql");
    assert!(!found("postgres", root.path()));
    for binary in ["initdb", "postgres", "pg_ctl"] {
        executable(
            &root.path().join("usr/lib/postgresql/15/bin").join(binary),
            "#!/bin/sh\n",
        );
    }
    assert!(found("postgres", root.path()));
}

#[test]
fn softhsm_needs_its_module_and_its_token_tool() {
    let root = tempfile::tempdir().unwrap();
    assert!(!found("softhsm", root.path()));
    // The library package alone (libsofthsm2) cannot initialise a token.
    touch(
        root.path(),
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    );
    assert!(!found("softhsm", root.path()));
    executable(&root.path().join("usr/bin/softhsm2-util"), "#!/bin/sh\n");
    assert!(found("softhsm", root.path()));
    // Debian's own path for the module works as well.
    let debian = tempfile::tempdir().unwrap();
    touch(debian.path(), "/usr/lib/softhsm/libsofthsm2.so");
    executable(&debian.path().join("usr/bin/softhsm2-util"), "#!/bin/sh\n");
    assert!(found("softhsm", debian.path()));
    // The tool without the module cannot load a token either.
    let tool_only = tempfile::tempdir().unwrap();
    executable(
        &tool_only.path().join("usr/bin/softhsm2-util"),
        "#!/bin/sh\n",
    );
    assert!(!found("softhsm", tool_only.path()));
}

#[test]
fn chromium_needs_the_browser_not_only_its_launcher() {
    let root = tempfile::tempdir().unwrap();
    assert!(!found("chromium", root.path()));
    // A launcher script alone (Ubuntu's snap stub, a half-removed package)
    // starts no browser.
    executable(&root.path().join("usr/bin/chromium"), "#!/bin/sh\n");
    assert!(!found("chromium", root.path()));
    executable(
        &root.path().join("usr/lib/chromium/chromium"),
        "#!/bin/sh\n",
    );
    assert!(found("chromium", root.path()));
    // The browser without its launcher is not where the tests look.
    let no_launcher = tempfile::tempdir().unwrap();
    executable(
        &no_launcher.path().join("usr/lib/chromium/chromium"),
        "#!/bin/sh\n",
    );
    assert!(!found("chromium", no_launcher.path()));
}

#[test]
fn patroni_needs_etcd_beside_it() {
    let root = tempfile::tempdir().unwrap();
    assert!(!found("patroni", root.path()));
    // Patroni alone has no store to elect a leader in.
    executable(&root.path().join("usr/bin/patroni"), "#!/bin/sh\n");
    assert!(!found("patroni", root.path()));
    executable(&root.path().join("usr/bin/etcd"), "#!/bin/sh\n");
    assert!(found("patroni", root.path()));
}

#[test]
fn python_tools_are_looked_for_in_the_virtual_environment() {
    let root = tempfile::tempdir().unwrap();
    assert!(!found("python-tools", root.path()));
    // A venv whose tools exist but do not run (a half-finished install).
    touch(root.path(), "/venv/bin/grpcurl");
    touch(root.path(), "/venv/bin/kubernetes-validate");
    assert!(!found("python-tools", root.path()));
}

/// A `kubectl` that reports `kustomize` as its embedded kustomize version.
fn kubectl_stub(dir: &Path, kustomize: &str) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    executable(
        &bin.join("kubectl"),
        &format!(
            "#!/bin/sh\necho 'Client Version: v1.20.0'\necho 'Kustomize Version: {kustomize}'\n"
        ),
    );
    format!("{}:/usr/bin:/bin", bin.display())
}

#[test]
fn an_old_kustomize_is_refused() {
    for (version, usable) in [
        ("v2.0.3", false),
        ("v4.5.7", false),
        ("v5.0.0", true),
        ("v5.5.0", true),
        ("v10.1.0", true),
    ] {
        let root = tempfile::tempdir().unwrap();
        let path = kubectl_stub(root.path(), version);
        let output = probe("kustomize", root.path(), &path);
        assert_eq!(output.status.success(), usable, "kustomize {version}");
    }
}

#[test]
fn test_install_names_an_old_kustomize_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let path = kubectl_stub(root.path(), "v2.0.3");
    // libclang present, so the build step passes and the test step speaks.
    touch(root.path(), "/usr/lib/llvm-14/lib/libclang.so.1");
    touch(
        root.path(),
        "/usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h",
    );
    let cargo = Command::new("sh")
        .args(["-c", "command -v cargo"])
        .output()
        .unwrap();
    let cargo_dir = Path::new(String::from_utf8(cargo.stdout).unwrap().trim())
        .parent()
        .unwrap()
        .to_owned();
    let output = Command::new("bash")
        .arg(script())
        .arg("--test")
        .env_clear()
        .env("PATH", format!("{path}:{}", cargo_dir.display()))
        .env("HOME", root.path())
        .env("TOKENVAULT_PROBE_ROOT", root.path())
        .env("TV_TOOLS_VENV", root.path().join("venv"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("kustomize is v2.0.3") && stderr.contains("v5.0.0 or newer"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_probe_is_an_error_not_a_yes() {
    let root = tempfile::tempdir().unwrap();
    let output = probe("libclangg", root.path(), "/usr/bin:/bin");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown probe"));
}
