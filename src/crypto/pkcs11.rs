//! A master key that never leaves a hardware security module: a
//! non-extractable AES-256 key inside a PKCS#11 token, which wraps and
//! unwraps data keys (AES-GCM, the label as associated data) inside the
//! token. The process holds a session and the key's handle, never its
//! bytes.
//!
//! The module is loaded and initialised once per process (a PKCS#11 library
//! may be initialised only once), and a session that fails (the token was
//! reset, the login dropped) is opened again, logged in, and the operation
//! tried once more. Wrapping happens when the vault opens and when keys
//! rotate, never per request.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::{Mechanism, aead::GcmParams},
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::Slot,
    types::{AuthPin, Ulong},
};
use zeroize::Zeroizing;

use super::{Error, KEY_LEN, MasterKeyError, NONCE_LEN, Sealed};

/// Where the key-encrypting key is: `[keys.pkcs11]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Setting {
    /// The PKCS#11 module (shared library) of the HSM's vendor.
    pub module: PathBuf,
    /// The label of the token (partition) holding the key.
    pub token_label: String,
    /// The label (`CKA_LABEL`) of the AES-256 key.
    pub key_label: String,
    /// A file holding the token's user PIN, with the same permission rules
    /// as the master key file.
    pub pin_file: PathBuf,
}

impl Pkcs11Setting {
    /// Where the key is, for logs.
    pub fn describe(&self) -> String {
        format!(
            "PKCS#11 key '{}' in token '{}' of module {}",
            self.key_label,
            self.token_label,
            self.module.display()
        )
    }
}

/// A key-encrypting key held by a token, and the session that uses it.
pub(super) struct HsmKek {
    setting: Pkcs11Setting,
    context: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    open: Mutex<Option<Open>>,
}

/// A logged-in session and the key's handle in it.
struct Open {
    session: Session,
    key: ObjectHandle,
}

impl HsmKek {
    /// Loads the module, finds the token, logs in and checks the key: an
    /// AES-256 key that may encrypt and decrypt, sensitive, and not
    /// extractable.
    pub(super) fn open(setting: &Pkcs11Setting) -> Result<Self, MasterKeyError> {
        let pin = read_pin(&setting.pin_file)?;
        let context = module(&setting.module)?;
        let slot = find_token(&context, setting)?;
        let kek = Self {
            setting: setting.clone(),
            context,
            slot,
            pin,
            open: Mutex::new(None),
        };
        let open = kek.open_session()?;
        *kek.lock() = Some(open);
        Ok(kek)
    }

    /// Wraps 32 key bytes under the token's key, bound to `aad`.
    pub(super) fn wrap(&self, key: &[u8; KEY_LEN], aad: &[u8]) -> Result<Sealed, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)?;
        let ciphertext = self.with_session("wrap", |open| {
            let mut iv = nonce;
            let params = GcmParams::new(&mut iv, aad, Ulong::from(128))?;
            open.session
                .encrypt(&Mechanism::AesGcm(params), open.key, key)
        })?;
        Ok(Sealed { nonce, ciphertext })
    }

    /// The inverse of [`HsmKek::wrap`].
    pub(super) fn unwrap(
        &self,
        sealed: &Sealed,
        aad: &[u8],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, Error> {
        let plain = Zeroizing::new(self.with_session("unwrap", |open| {
            let mut iv = sealed.nonce;
            let params = GcmParams::new(&mut iv, aad, Ulong::from(128))?;
            open.session
                .decrypt(&Mechanism::AesGcm(params), open.key, &sealed.ciphertext)
        })?);
        let bytes: [u8; KEY_LEN] = plain.as_slice().try_into().map_err(|_| Error::KeyLength)?;
        Ok(Zeroizing::new(bytes))
    }

    /// Where the key is, for logs.
    pub(super) fn describe(&self) -> String {
        self.setting.describe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `op` in the session, opening one if there is none. A failure
    /// that is not about the ciphertext drops the session and tries once
    /// more in a new one.
    fn with_session<T>(
        &self,
        what: &'static str,
        op: impl Fn(&Open) -> Result<T, CkError>,
    ) -> Result<T, Error> {
        let mut open = self.lock();
        let mut retried = false;
        loop {
            if open.is_none() {
                *open = Some(self.open_session().map_err(|e| Error::Hsm(e.to_string()))?);
            }
            let Some(current) = open.as_ref() else {
                unreachable!("a session was just opened")
            };
            match op(current) {
                Ok(value) => return Ok(value),
                Err(e) if rejects_ciphertext(&e) => return Err(Error::Authentication),
                Err(e) if !retried => {
                    tracing::warn!(error = %short(&e), operation = what, hsm = %self.describe(), "the HSM session failed; opening a new one");
                    *open = None;
                    retried = true;
                }
                Err(e) => {
                    *open = None;
                    return Err(Error::Hsm(format!("{what} failed: {}", short(&e))));
                }
            }
        }
    }

    fn open_session(&self) -> Result<Open, MasterKeyError> {
        let token = &self.setting.token_label;
        let fail = |what: &str, e: CkError| token_error(&self.setting, what, &e);
        let session = self
            .context
            .open_ro_session(self.slot)
            .map_err(|e| fail("cannot open a session", e))?;
        login(&session, &self.pin, &self.setting)?;
        let label = &self.setting.key_label;
        let found = labelled_keys(&session, &self.setting)?;
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(MasterKeyError::Pkcs11(format!(
                    "token '{token}' holds no secret key labelled '{label}'; create one with `tokenvault keys create-hsm-key`"
                )));
            }
            many => {
                return Err(MasterKeyError::Pkcs11(format!(
                    "token '{token}' holds {} secret keys labelled '{label}'; the label must name one",
                    many.len()
                )));
            }
        };
        check_key(&session, key, label, token)?;
        Ok(Open { session, key })
    }
}

/// A failed PKCS#11 call on the setting's token, as one line.
fn token_error(setting: &Pkcs11Setting, what: &str, e: &CkError) -> MasterKeyError {
    MasterKeyError::Pkcs11(format!(
        "{what} on token '{}': {}",
        setting.token_label,
        short(e)
    ))
}

/// The token's secret keys labelled as the setting's key.
fn labelled_keys(
    session: &Session,
    setting: &Pkcs11Setting,
) -> Result<Vec<ObjectHandle>, MasterKeyError> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(setting.key_label.as_bytes().to_vec()),
        ])
        .map_err(|e| token_error(setting, "cannot search for the key", &e))
}

/// Logs the user in. The login belongs to the application and is shared
/// by its sessions, so "already logged in" is success.
fn login(session: &Session, pin: &AuthPin, setting: &Pkcs11Setting) -> Result<(), MasterKeyError> {
    let token = &setting.token_label;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(MasterKeyError::Pkcs11(format!(
            "token '{token}' refused the PIN in {}",
            setting.pin_file.display()
        ))),
        Err(e) => Err(token_error(setting, "cannot log in", &e)),
    }
}

/// Refuses a key that is not AES-256, cannot both encrypt and decrypt, or
/// could leave the token or have left it (imported, or once extractable).
fn check_key(
    session: &Session,
    key: ObjectHandle,
    label: &str,
    token: &str,
) -> Result<(), MasterKeyError> {
    let attributes = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Extractable,
                AttributeType::Sensitive,
                AttributeType::NeverExtractable,
                AttributeType::AlwaysSensitive,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
            ],
        )
        .map_err(|e| {
            MasterKeyError::Pkcs11(format!(
                "cannot read the attributes of key '{label}' on token '{token}': {}",
                short(&e)
            ))
        })?;
    let refuse = |why: &str| {
        Err(MasterKeyError::Pkcs11(format!(
            "key '{label}' on token '{token}' {why}"
        )))
    };
    let (mut aes, mut len, mut extractable, mut sensitive, mut encrypt, mut decrypt) =
        (false, 0u64, true, false, false, false);
    // Absent (a token that does not say): taken as the worst.
    let (mut never_extractable, mut always_sensitive) = (false, false);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(kind) => aes = kind == KeyType::AES,
            Attribute::ValueLen(value) => len = value.into(),
            Attribute::Extractable(value) => extractable = value,
            Attribute::Sensitive(value) => sensitive = value,
            Attribute::NeverExtractable(value) => never_extractable = value,
            Attribute::AlwaysSensitive(value) => always_sensitive = value,
            Attribute::Encrypt(value) => encrypt = value,
            Attribute::Decrypt(value) => decrypt = value,
            _ => {}
        }
    }
    // First what matters most: a key that can leave the token is refused
    // whatever else it is.
    if extractable || !sensitive {
        return refuse(
            "can leave the token (CKA_EXTRACTABLE true or CKA_SENSITIVE false); a master key must not: create a new one with `tokenvault keys create-hsm-key`",
        );
    }
    if !aes || len != KEY_LEN as u64 {
        return refuse(&format!(
            "is not an AES-256 key ({}, {len} bytes)",
            if aes { "AES" } else { "not AES" }
        ));
    }
    // Not extractable now is not enough: a key that once was (made
    // extractable and then locked) or was imported may have copies
    // outside the token.
    if !never_extractable || !always_sensitive {
        return refuse(
            "may have copies outside the token: it was imported, or once extractable or not sensitive (CKA_NEVER_EXTRACTABLE or CKA_ALWAYS_SENSITIVE false); create a new one inside the token with `tokenvault keys create-hsm-key`",
        );
    }
    if !encrypt || !decrypt {
        return refuse("may not both encrypt and decrypt (CKA_ENCRYPT, CKA_DECRYPT)");
    }
    Ok(())
}

/// Creates a new master key in a token: AES-256, generated inside it,
/// sensitive and not extractable. Fails if a key with the label exists.
///
/// # Errors
/// The module, token, PIN or generation failed; or the label is taken.
pub fn create_key(setting: &Pkcs11Setting) -> Result<(), MasterKeyError> {
    let pin = read_pin(&setting.pin_file)?;
    let context = module(&setting.module)?;
    let slot = find_token(&context, setting)?;
    let token = &setting.token_label;
    let fail = |what: &str, e: CkError| token_error(setting, what, &e);
    let session = context
        .open_rw_session(slot)
        .map_err(|e| fail("cannot open a session", e))?;
    login(&session, &pin, setting)?;
    if !labelled_keys(&session, setting)?.is_empty() {
        return Err(MasterKeyError::Pkcs11(format!(
            "token '{token}' already holds a key labelled '{}'; a master key is never replaced",
            setting.key_label
        )));
    }
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::from(KEY_LEN as u64)),
                Attribute::Label(setting.key_label.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
            ],
        )
        .map_err(|e| fail("cannot generate the key", e))?;
    Ok(())
}

/// The module at `path`, loaded and initialised once per process.
fn module(path: &Path) -> Result<Pkcs11, MasterKeyError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(context) = modules.get(path) {
        return Ok(context.clone());
    }
    let context = Pkcs11::new(path).map_err(|e| {
        MasterKeyError::Pkcs11(format!(
            "cannot load the PKCS#11 module {}: {e}",
            path.display()
        ))
    })?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(MasterKeyError::Pkcs11(format!(
                "cannot initialise the PKCS#11 module {}: {}",
                path.display(),
                short(&e)
            )));
        }
    }
    modules.insert(path.to_owned(), context.clone());
    Ok(context)
}

/// The slot of the token labelled as the setting says.
fn find_token(context: &Pkcs11, setting: &Pkcs11Setting) -> Result<Slot, MasterKeyError> {
    let slots = context.get_slots_with_token().map_err(|e| {
        MasterKeyError::Pkcs11(format!("cannot list the module's slots: {}", short(&e)))
    })?;
    let mut labels = Vec::new();
    for slot in slots {
        let Ok(info) = context.get_token_info(slot) else {
            continue;
        };
        let label = info.label().trim_end().to_owned();
        if label == setting.token_label {
            return Ok(slot);
        }
        // A free slot's token has no label yet.
        if !label.is_empty() {
            labels.push(label);
        }
    }
    Err(MasterKeyError::Pkcs11(format!(
        "module {} has no token labelled '{}' (its tokens: {})",
        setting.module.display(),
        setting.token_label,
        if labels.is_empty() {
            "none".to_owned()
        } else {
            labels.join(", ")
        }
    )))
}

/// The PIN from its file (mode 0600 or stricter, as the master key file),
/// without a trailing newline.
fn read_pin(path: &Path) -> Result<AuthPin, MasterKeyError> {
    let bytes = super::master::read_protected(path, "PIN file")?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| MasterKeyError::Pkcs11(format!("PIN file {} is not UTF-8", path.display())))?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(MasterKeyError::Pkcs11(format!(
            "PIN file {} is empty",
            path.display()
        )));
    }
    Ok(AuthPin::from(pin.to_owned()))
}

/// Whether the token answered that the ciphertext (or its tag, nonce or
/// associated data) is not what it wrapped: a wrong key or a changed
/// value, not a failing session.
fn rejects_ciphertext(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
            _
        )
    )
}

/// The return value's name and the function, without the specification's
/// paragraph that cryptoki's `Display` adds.
fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function}: {rv:?}"),
        other => other.to_string(),
    }
}
