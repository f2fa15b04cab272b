//! The master key in an HSM, against a real PKCS#11 module (SoftHSM2, a
//! throwaway token per test): the vault serves and restarts with it, an
//! unusable token or key is refused with one clear line, and the master key
//! moves from a file into the HSM and back.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{TestVault, softhsm::SoftHsm, subject_item, tokenvault_command};
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    mechanism::Mechanism,
    object::{Attribute, KeyType, ObjectClass},
    session::UserType,
    types::{AuthPin, Ulong},
};
use tokenvault::{
    crypto::{DataKey, MasterKey, Pkcs11Setting},
    proto::v1::{TokenizeRequest, tokenize_result},
};

/// A vault whose `[keys]` table is `keys`, with SoftHSM's environment.
fn start_with_keys(hsm: &SoftHsm, keys: &str) -> TestVault {
    let mut vault = TestVault::prepare("");
    vault.keys = keys.to_owned();
    vault.env.push(hsm.env());
    vault.write_config();
    vault.spawn().expect("the vault did not start");
    vault
}

/// Tokenizes one value with a subject and one without; returns the tokens
/// and values.
async fn tokenize_two(vault: &TestVault) -> Vec<(String, String)> {
    let mut client = vault.client("support").await;
    let pairs = [
        ("hsm-subject@example.com", "cust-hsm"),
        ("hsm-plain@example.com", ""),
    ];
    let response = client
        .tokenize(TokenizeRequest {
            items: pairs
                .iter()
                .map(|(value, subject)| subject_item("email", value, subject))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    response
        .results
        .into_iter()
        .zip(pairs)
        .map(|(result, (value, _))| match result.result {
            Some(tokenize_result::Result::Token(token)) => (token, value.to_owned()),
            other => panic!("tokenize failed: {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_with_its_master_key_in_an_hsm_serves_and_restarts() {
    let hsm = SoftHsm::new();
    let pin = hsm.init_token("vault");
    hsm.create_key("vault", "kek", &pin);
    let mut vault = start_with_keys(&hsm, &hsm.keys_toml("vault", "kek", &pin));
    assert!(
        vault.logs().contains("PKCS#11 key 'kek' in token 'vault'"),
        "the log does not say where the master key is:\n{}",
        vault.logs()
    );
    let pairs = tokenize_two(&vault).await;
    common::assert_all_detokenize(&vault, &pairs).await;
    vault.restart();
    common::assert_all_detokenize(&vault, &pairs).await;
    vault.stop();

    // The keys really are wrapped by the token: with a file master key the
    // same data directory does not open.
    let mut file_vault = vault;
    file_vault.keys = "master_key_file = \"master.key\"\n".to_owned();
    file_vault.write_config();
    let refused = file_vault.spawn().unwrap_err();
    assert!(refused.contains("master key does not match"), "{refused}");
}

#[test]
fn an_unusable_hsm_key_is_refused_with_one_clear_line() {
    let hsm = SoftHsm::new();
    let pin = hsm.init_token("vault");
    hsm.create_key("vault", "kek", &pin);
    in_helper(&hsm, "extractable", "vault", "exportable");
    // A key imported with softhsm2-util is not extractable, but it is the
    // wrong size when given 64 bytes.
    hsm.import_key("vault", "imported", &[7u8; 64]);
    // The right size, but imported: a copy may exist outside the token.
    hsm.import_key("vault", "copied", &[7u8; 32]);
    in_helper(&hsm, "once-extractable", "vault", "locked-later");
    let wrong_pin = hsm.pin_file("wrong.pin", "0000");
    let open_pin = hsm.pin_file("open.pin", common::softhsm::PIN);
    std::fs::set_permissions(
        &open_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let cases = [
        (
            hsm.keys_toml("vault", "kek", &wrong_pin),
            "token 'vault' refused the PIN in",
        ),
        (
            hsm.keys_toml("vault", "missing", &pin),
            "token 'vault' holds no secret key labelled 'missing'",
        ),
        (
            hsm.keys_toml("vault", "exportable", &pin),
            "key 'exportable' on token 'vault' can leave the token",
        ),
        (
            hsm.keys_toml("vault", "imported", &pin),
            "key 'imported' on token 'vault' is not an AES-256 key (AES, 64 bytes)",
        ),
        (
            hsm.keys_toml("vault", "copied", &pin),
            "key 'copied' on token 'vault' may have copies outside the token",
        ),
        (
            hsm.keys_toml("vault", "locked-later", &pin),
            "key 'locked-later' on token 'vault' may have copies outside the token",
        ),
        (
            hsm.keys_toml("elsewhere", "kek", &pin),
            "has no token labelled 'elsewhere' (its tokens: vault)",
        ),
        (hsm.keys_toml("vault", "kek", &open_pin), "PIN file"),
        (
            hsm.keys_toml("vault", "kek", &pin)
                .replace(hsm.module.to_str().unwrap(), "/nonexistent/libpkcs11.so"),
            "cannot load the PKCS#11 module /nonexistent/libpkcs11.so",
        ),
    ];
    for (keys, expected) in cases {
        let mut vault = TestVault::prepare("");
        vault.keys = keys;
        vault.write_config();
        let mut serve = tokenvault_command();
        serve
            .args(["serve", "--config"])
            .arg(vault.config_path())
            .env(hsm.env().0, hsm.env().1);
        // A vault that starts serves until stopped: a failure, not a hang.
        let out = exit_within(serve, std::time::Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{expected}: the vault started"));
        assert!(!out.status.success(), "{expected}: the vault started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{expected}: not one line:\n{stderr}");
        assert!(lines[0].contains(expected), "{expected}:\n{stderr}");
        assert!(
            !lines[0].contains(common::softhsm::PIN),
            "the PIN is in the message: {stderr}"
        );
        if expected == "PIN file" {
            assert!(lines[0].contains("chmod 600"), "{stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_moves_from_a_file_to_the_hsm_and_back() {
    let hsm = SoftHsm::new();
    let pin = hsm.init_token("vault");
    hsm.create_key("vault", "kek", &pin);
    let allowed = format!(
        "allowed_pkcs11_modules = [\"{}\"]\nmaster_key_file = \"master.key\"\n",
        hsm.module.display()
    );
    let mut vault = start_with_keys(&hsm, &allowed);
    let pairs = tokenize_two(&vault).await;

    // A module the configuration does not list is never loaded.
    let other_module = vault.root.path().join("libevil.so");
    std::fs::write(&other_module, b"not a library").unwrap();
    let mut args = vec!["rotate-master".to_owned()];
    args.extend(hsm.key_args("vault", "kek", &pin));
    let evil: Vec<String> = args
        .iter()
        .map(|a| a.replace(hsm.module.to_str().unwrap(), other_module.to_str().unwrap()))
        .collect();
    let (ok, _, err) = common::keys_cli(&vault, &evil).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("allowed_pkcs11_modules"),
        "{err}"
    );

    let (ok, out, err) = common::keys_cli(&vault, &args).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("re-wrapped") && out.contains("[keys.pkcs11]"),
        "{out}"
    );
    common::assert_all_detokenize(&vault, &pairs).await;
    vault.stop();
    // The file no longer opens the vault; the HSM does.
    assert!(
        vault
            .spawn()
            .unwrap_err()
            .contains("master key does not match")
    );
    vault.keys = hsm.keys_toml("vault", "kek", &pin);
    vault.write_config();
    vault.spawn().unwrap();
    common::assert_all_detokenize(&vault, &pairs).await;

    // And back to a new file.
    let out = common::rotate_master_to_new_file(&vault, "master-2.key").await;
    assert!(out.contains("keys.master_key_file"), "{out}");
    vault.stop();
    vault.keys = "master_key_file = \"master-2.key\"\n".to_owned();
    vault.write_config();
    vault.spawn().unwrap();
    common::assert_all_detokenize(&vault, &pairs).await;
}

/// The HSM session is opened again after a failure: here the token logs
/// the application out (as a reset HSM or another component's C_Logout
/// would), and the next wrap and unwrap still succeed.
#[test]
fn the_hsm_session_is_opened_again_after_a_failure() {
    let hsm = SoftHsm::new();
    let pin = hsm.init_token("vault");
    hsm.create_key("vault", "kek", &pin);
    in_helper(&hsm, "reopen", "vault", "kek");
}

/// Runs `command` and its output once it exits, or kills it and says
/// `None` if it is still running after `within`.
fn exit_within(
    mut command: std::process::Command,
    within: std::time::Duration,
) -> Option<std::process::Output> {
    // Its stderr goes to a file: a pipe nobody reads while waiting could
    // fill and stop a chatty child.
    let log = tempfile::tempfile().unwrap();
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(log.try_clone().unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = Vec::new();
    std::io::Seek::rewind(&mut &log).unwrap();
    std::io::Read::read_to_end(&mut &log, &mut stderr).unwrap();
    Some(std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    })
}

/// Runs `helper` (below) in a child process of this test binary, with
/// SoftHSM's configuration in its environment from the start: a PKCS#11
/// module reads it once, when it is initialised, and a test must not change
/// its own process's environment.
fn in_helper(hsm: &SoftHsm, what: &str, token: &str, key: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper", "--nocapture", "--test-threads", "1"])
        .env(hsm.env().0, hsm.env().1)
        .env(
            "TV_HSM_HELPER",
            format!("{what}|{}|{token}|{key}", hsm.module.display()),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("helper {what} done")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Not a test by itself: [`in_helper`] runs it with `TV_HSM_HELPER` set
/// (and it does nothing without).
#[test]
fn helper() {
    let Ok(spec) = std::env::var("TV_HSM_HELPER") else {
        return;
    };
    let [what, module, token, key] = spec.split('|').collect::<Vec<_>>()[..] else {
        panic!("TV_HSM_HELPER: {spec}")
    };
    match what {
        "extractable" => make_extractable_key(module, token, key, false),
        "once-extractable" => make_extractable_key(module, token, key, true),
        "reopen" => wrap_across_a_logout(module, token, key),
        other => panic!("no helper {other}"),
    }
    println!("helper {what} done");
}

/// An AES-256 key that may leave the token, as a careless key ceremony
/// would make it; with `lock_after`, made not extractable afterwards
/// (CKA_EXTRACTABLE false now, CKA_NEVER_EXTRACTABLE false for good).
fn make_extractable_key(module: &str, token: &str, key: &str, lock_after: bool) {
    let context = Pkcs11::new(module).unwrap();
    context
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let session = context.open_rw_session(slot_of(&context, token)).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::from(common::softhsm::PIN)))
        .unwrap();
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::from(32)),
                Attribute::Label(key.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .unwrap();
    if lock_after {
        let handle = session
            .find_objects(&[Attribute::Label(key.as_bytes().to_vec())])
            .unwrap()[0];
        session
            .update_attributes(handle, &[Attribute::Extractable(false)])
            .unwrap();
    }
}

fn wrap_across_a_logout(module: &str, token: &str, key: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, common::softhsm::PIN).unwrap();
    std::fs::set_permissions(
        &pin_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let master = MasterKey::from_hsm(&Pkcs11Setting {
        module: module.into(),
        token_label: token.into(),
        key_label: key.into(),
        pin_file,
    })
    .unwrap();
    let dek = DataKey::generate().unwrap();
    let before = master.wrap_data_key(&dek, b"dek/1").unwrap();
    // Another session of this process logs the application out of the
    // token: every session of it loses the login.
    let context = Pkcs11::new(module).unwrap();
    let _ = context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let other = context.open_ro_session(slot_of(&context, token)).unwrap();
    other.logout().unwrap();
    let after = master.wrap_data_key(&dek, b"dek/1").unwrap();
    for sealed in [before, after] {
        master.unwrap_data_key(&sealed, b"dek/1").unwrap();
        // Still bound to its label.
        assert!(master.unwrap_data_key(&sealed, b"dek/2").is_err());
    }
}

fn slot_of(context: &Pkcs11, token: &str) -> cryptoki::slot::Slot {
    context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| context.get_token_info(*slot).unwrap().label().trim_end() == token)
        .unwrap()
}
