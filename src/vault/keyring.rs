//! The data keys and hash keys, unwrapped in memory, and their wrapped form
//! in the store.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    crypto::{AuditSigningKey, DataKey, HashKey, MasterKey, Sealed},
    layout::{self, MasterWrapped},
    store::{Batch, FailedGuard, Store, Table},
};

use super::{Error, now_ms};

/// Every key the vault uses, unwrapped once at open.
pub struct Keyring {
    /// Data keys by version; a rotation adds one while requests run.
    data_keys: std::sync::RwLock<BTreeMap<u32, Arc<DataKey>>>,
    /// Wraps new data keys at rotation. Kept in memory (zeroized on drop)
    /// for the life of the process; replaced by a master-key rotation.
    master: std::sync::RwLock<MasterKey>,
    /// Hashes subject ids for the records that name a subject.
    subject_key: HashKey,
    /// Hashes values of deterministic field types for the blind index, by
    /// version. A rotation adds one; the re-index job retires the older ones
    /// once every entry is hashed under the newest.
    index_keys: std::sync::RwLock<BTreeMap<u32, Arc<HashKey>>>,
    /// Hashes tokens and subject ids in audit events.
    audit_key: HashKey,
    /// Signs audit checkpoints.
    audit_signer: AuditSigningKey,
    /// Chains the erasure ledger's entries.
    ledger_key: HashKey,
    /// Wraps each subject's own data key (itself wrapped by the master key),
    /// so the master key need not stay in memory to create subject keys.
    subject_kek: DataKey,
    /// The master key's mark in the store: see [`MasterMark`].
    mark: std::sync::RwLock<MasterMark>,
}

/// Which master key wraps the stored keys, as this process knows it: the
/// label and stored bytes of one key every vault has (the subject-id hash
/// key), which every master-key rotation re-wraps and so changes.
///
/// Replicas share the keys table but each holds the master key its own
/// configuration names. Every write that wraps a key under the master key
/// guards that the mark is still the one this process saw: once a
/// rotation through another replica moved the keys to a new master key,
/// this process wraps nothing under the retired one (its new data key
/// would unwrap nowhere after the switch), and hears
/// [`Error::MasterKeyMoved`] instead.
#[derive(Debug, Clone)]
struct MasterMark {
    label: Vec<u8>,
    wrapped: Vec<u8>,
}

impl MasterMark {
    /// Reads the mark, and checks that `master` unwraps it.
    async fn read<S: Store>(store: &S, master: &MasterKey) -> Result<Self, Error> {
        // It has one version, made with the vault.
        let label = MasterWrapped::SubjectIdHashKey.label(1);
        let wrapped = store
            .get_many(Table::Keys, vec![label.clone()])
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| Error::CorruptKey("the subject-id hash key is missing".into()))?;
        master
            .unwrap_hash_key(&decode_wrapped(&label, &wrapped)?, &label)
            .map_err(|_| wrong_master(&label))?;
        Ok(Self { label, wrapped })
    }
}

impl Keyring {
    /// Loads and unwraps the keys, creating any that the store lacks (all of
    /// them in an empty vault; the newer kinds in a vault made by an older
    /// version).
    ///
    /// # Errors
    /// [`Error::WrongMasterKey`] if a key does not unwrap; storage errors.
    pub async fn open<S: Store>(store: &S, master: &MasterKey) -> Result<Self, Error> {
        let mut data_keys = load_versions(store, MasterWrapped::DataKey, |sealed, label| {
            master.unwrap_data_key(sealed, label)
        })
        .await?;
        if data_keys.is_empty() {
            let dek = DataKey::generate()?;
            let dek_label = MasterWrapped::DataKey.label(1);
            let wrapped = encode_wrapped(&master.wrap_data_key(&dek, &dek_label)?);
            let dek = match create_once(store, Table::Keys, &dek_label, wrapped).await? {
                None => {
                    tracing::info!("created the first data key");
                    dek
                }
                Some(theirs) => master
                    .unwrap_data_key(&decode_wrapped(&dek_label, &theirs)?, &dek_label)
                    .map_err(|_| wrong_master(&dek_label))?,
            };
            data_keys.insert(1, Arc::new(dek));
        }
        let subject_key = hash_key(store, master, MasterWrapped::SubjectIdHashKey).await?;
        let mut index_keys = load_versions(store, MasterWrapped::BlindIndexKey, |sealed, label| {
            master.unwrap_hash_key(sealed, label)
        })
        .await?;
        if index_keys.is_empty() {
            index_keys.insert(
                1,
                Arc::new(hash_key(store, master, MasterWrapped::BlindIndexKey).await?),
            );
        }
        let audit_key = hash_key(store, master, MasterWrapped::AuditHashKey).await?;
        let ledger_key = hash_key(store, master, MasterWrapped::ErasureLedgerMacKey).await?;
        let audit_signer = AuditSigningKey::from_seed(
            &hash_key(store, master, MasterWrapped::AuditSigningKey).await?,
        );
        let subject_kek = hash_key(store, master, MasterWrapped::SubjectKek)
            .await?
            .into_data_key();
        let public = audit_signer.public_key().to_vec();
        let stored = store
            .get_many(Table::Keys, vec![layout::AUDIT_PUBLIC_KEY.to_vec()])
            .await?;
        if stored.first().and_then(Option::as_ref) != Some(&public) {
            let mut batch = Batch::new();
            batch.put(Table::Keys, layout::AUDIT_PUBLIC_KEY.to_vec(), public);
            store.commit(batch).await?;
        }
        // Read last: a rotation through another replica since the keys
        // above were read shows here, as a master key that does not unwrap.
        let mark = MasterMark::read(store, master).await?;
        Ok(Self {
            data_keys: std::sync::RwLock::new(data_keys),
            master: std::sync::RwLock::new(master.duplicate()),
            subject_key,
            index_keys: std::sync::RwLock::new(index_keys),
            audit_key,
            audit_signer,
            ledger_key,
            subject_kek,
            mark: std::sync::RwLock::new(mark),
        })
    }

    /// Adds to `unit` the guard that the keys are still wrapped under the
    /// master key this process holds (see [`MasterMark`]).
    pub fn guard_master(&self, unit: &mut crate::store::Unit) {
        let mark = self.mark();
        unit.guard_unchanged(Table::Keys, mark.label, mark.wrapped);
    }

    fn mark(&self) -> MasterMark {
        self.mark
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Checks that no other process moved the keys to another master key
    /// since this one last looked.
    ///
    /// # Errors
    /// [`Error::MasterKeyMoved`]; storage failures.
    async fn check_master<S: Store>(&self, store: &S) -> Result<(), Error> {
        let mark = self.mark();
        let stored = store.get_many(Table::Keys, vec![mark.label]).await?;
        match stored.into_iter().next().flatten() {
            Some(wrapped) if wrapped == mark.wrapped => Ok(()),
            _ => Err(Error::MasterKeyMoved),
        }
    }

    /// Loads the data-key and blind-index-key versions that another process
    /// sharing the store has added since this one opened it (a rotation
    /// through another replica). Returns how many were new.
    ///
    /// # Errors
    /// Storage failures, or a new key that does not unwrap.
    pub async fn refresh<S: Store>(&self, store: &S) -> Result<usize, Error> {
        self.check_master(store).await?;
        let data = load_versions(store, MasterWrapped::DataKey, |sealed, label| {
            self.master().unwrap_data_key(sealed, label)
        })
        .await?;
        let index = load_versions(store, MasterWrapped::BlindIndexKey, |sealed, label| {
            self.master().unwrap_hash_key(sealed, label)
        })
        .await?;
        Ok(add_missing(&self.data_keys, data) + add_missing(&self.index_keys, index))
    }

    /// The key new values are encrypted with, and its version.
    pub fn active(&self) -> (u32, Arc<DataKey>) {
        let keys = self
            .data_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // `open` never leaves the map empty.
        let (version, key) = keys
            .last_key_value()
            .unwrap_or_else(|| unreachable!("the keyring always holds a data key"));
        (*version, Arc::clone(key))
    }

    /// The data key of `version`, if the vault has it.
    pub fn data_key(&self, version: u32) -> Option<Arc<DataKey>> {
        self.data_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&version)
            .cloned()
    }

    /// Every data key version, oldest first.
    pub fn versions(&self) -> Vec<u32> {
        self.data_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    /// Re-wraps every key the master key wraps (data keys, hash keys, the
    /// subject KEK, the audit signing key) under `new`, in one write, without
    /// touching any record; then uses `new` for keys made from now on. The
    /// old master key can be retired once the configuration names the new
    /// one. Returns how many keys were re-wrapped.
    ///
    /// # Errors
    /// [`Error::MasterKeyMoved`] if another process rotated it first; if a
    /// key does not unwrap under the current master key, or storage fails.
    pub async fn rotate_master<S: Store>(&self, store: &S, new: MasterKey) -> Result<usize, Error> {
        // Said plainly, before any key fails to unwrap under the old one.
        self.check_master(store).await?;
        let mut wrapped_keys = Vec::new();
        for family in MasterWrapped::ALL {
            wrapped_keys.extend(
                store
                    .scan_prefix(Table::Keys, family.prefix().into())
                    .await?,
            );
        }
        let count = wrapped_keys.len();
        let mut batch = Batch::new();
        let unit = batch.unit();
        // Two rotations through two replicas at once: one wins, and the
        // other re-wraps nothing (its keys would be under a master key no
        // configuration names). First, so that its failure is told apart.
        self.guard_master(unit);
        // Nor may another replica add, replace or retire a key between the
        // scan and this write: a data key it added meanwhile would stay
        // under the old master key, one it retired would come back.
        for (label, wrapped) in &wrapped_keys {
            unit.guard_unchanged(Table::Keys, label.clone(), wrapped.clone());
        }
        for family in [MasterWrapped::DataKey, MasterWrapped::BlindIndexKey] {
            let newest = wrapped_keys
                .iter()
                .filter_map(|(label, _)| family.version_of(label))
                .max()
                .unwrap_or(0);
            unit.guard_absent(Table::Keys, family.label(newest + 1));
        }
        let mut mark = self.mark();
        {
            let old = self
                .master
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (label, wrapped) in wrapped_keys {
                let sealed = decode_wrapped(&label, &wrapped)?;
                // Every one of these is 256 bits sealed the same way.
                let key = old
                    .unwrap_data_key(&sealed, &label)
                    .map_err(|_| wrong_master(&label))?;
                let rewrapped = encode_wrapped(&new.wrap_data_key(&key, &label)?);
                if label == mark.label {
                    mark.wrapped.clone_from(&rewrapped);
                }
                unit.put(Table::Keys, label, rewrapped);
            }
        }
        if let Some(Err(conflict)) = store.commit(batch).await?.pop() {
            return Err(match conflict.guard {
                FailedGuard::Unchanged(0) => Error::MasterKeyMoved,
                _ => Error::Conflict(
                    "a key was added, rotated or retired through another replica meanwhile; nothing was changed, retry",
                ),
            });
        }
        *self
            .master
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
        *self
            .mark
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = mark;
        tracing::info!(
            keys = count,
            "re-wrapped every key under the new master key; update keys.master_key_file before the next restart"
        );
        Ok(count)
    }

    /// A new data-key version, not yet in use: the caller stores it with
    /// [`NewKey::store`] in its own write and then calls
    /// [`Keyring::install_data_key`].
    ///
    /// # Errors
    /// Random-source or cipher failures.
    pub fn new_data_key(&self) -> Result<(NewKey, DataKey), Error> {
        let key = DataKey::generate()?;
        let new = NewKey::wrap(MasterWrapped::DataKey, self.active().0 + 1, |label| {
            self.master().wrap_data_key(&key, label)
        })?;
        Ok((new, key))
    }

    /// Makes a stored data key the one new values are encrypted with. Old
    /// versions keep decrypting.
    pub fn install_data_key(&self, version: u32, key: DataKey) {
        self.data_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(version, Arc::new(key));
        tracing::info!(
            version,
            "rotated the data key: new values use the new version"
        );
    }

    /// A new blind-index key version, not yet in use (see
    /// [`Keyring::new_data_key`]).
    ///
    /// # Errors
    /// Random-source or cipher failures.
    pub fn new_index_key(&self) -> Result<(NewKey, HashKey), Error> {
        let key = HashKey::generate()?;
        let new = NewKey::wrap(
            MasterWrapped::BlindIndexKey,
            self.index_keys().version + 1,
            |label| self.master().wrap_hash_key(&key, label),
        )?;
        Ok((new, key))
    }

    /// Makes a stored blind-index key the one new entries are hashed with;
    /// lookups try the older ones too until they are retired.
    pub fn install_index_key(&self, version: u32, key: HashKey) {
        self.index_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(version, Arc::new(key));
        tracing::info!(
            version,
            "rotated the blind-index key: new entries use the new version, the index is rebuilt in the background"
        );
    }

    /// Deletes every blind-index key older than the active one, once no
    /// index entry is hashed under them. Returns how many were retired.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn retire_index_keys<S: Store>(&self, store: &S) -> Result<usize, Error> {
        let active = self.index_keys().version;
        let older: Vec<u32> = self
            .index_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .filter(|v| *v < active)
            .collect();
        if older.is_empty() {
            return Ok(0);
        }
        let mut batch = Batch::new();
        for version in &older {
            batch.delete(Table::Keys, MasterWrapped::BlindIndexKey.label(*version));
        }
        store.commit(batch).await?;
        self.index_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|v, _| *v >= active);
        tracing::info!(
            retired = older.len(),
            version = active,
            "every blind-index entry uses the newest key: retired the older keys"
        );
        Ok(older.len())
    }

    fn master(&self) -> std::sync::RwLockReadGuard<'_, MasterKey> {
        self.master
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key that hashes subject ids.
    pub fn subject_key(&self) -> &HashKey {
        &self.subject_key
    }

    /// The blind-index keys in use.
    pub fn index_keys(&self) -> IndexKeys {
        let keys = self
            .index_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut newest_first = keys.iter().rev();
        // `open` never leaves the map empty.
        let (version, active) = newest_first
            .next()
            .unwrap_or_else(|| unreachable!("the keyring always holds an index key"));
        IndexKeys {
            version: *version,
            active: Arc::clone(active),
            older: newest_first.map(|(_, k)| Arc::clone(k)).collect(),
        }
    }

    /// The key that hashes tokens and subjects in audit events.
    pub fn audit_key(&self) -> &HashKey {
        &self.audit_key
    }

    /// The key that signs audit checkpoints and sealed exports.
    pub fn audit_signer(&self) -> &AuditSigningKey {
        &self.audit_signer
    }

    /// The key that chains the erasure ledger's entries.
    pub fn ledger_key(&self) -> &HashKey {
        &self.ledger_key
    }

    /// A new subject data key in its stored form (wrapped for `label`,
    /// recording `erased_through`, the number of the subject's newest
    /// erasure: `layout::encode_wrapped_subject`), and the key: the same
    /// order as [`Keyring::new_data_key`].
    ///
    /// # Errors
    /// If the random source fails.
    pub fn new_subject_key(
        &self,
        label: &[u8],
        erased_through: u64,
    ) -> Result<(Vec<u8>, DataKey), Error> {
        let key = DataKey::generate()?;
        let wrapped = layout::encode_wrapped_subject(
            &self.subject_kek.wrap_key(&key, label)?,
            now_ms(),
            erased_through,
        );
        Ok((wrapped, key))
    }

    /// Unwraps a stored subject data key.
    ///
    /// # Errors
    /// If it is malformed or does not unwrap.
    pub fn open_subject_key(&self, label: &[u8], wrapped: &[u8]) -> Result<DataKey, Error> {
        let sealed = decode_wrapped(label, wrapped)?;
        self.subject_kek
            .unwrap_wrapped(&sealed, label)
            .map_err(|_| {
                Error::CorruptKey(format!(
                    "subject key {} does not unwrap",
                    String::from_utf8_lossy(label)
                ))
            })
    }
}

/// The blind-index keys in use.
pub struct IndexKeys {
    /// The active key's version.
    pub version: u32,
    /// The key new entries are hashed with.
    pub active: Arc<HashKey>,
    /// Older keys entries may still be hashed under until the re-index job
    /// finishes, newest first.
    pub older: Vec<Arc<HashKey>>,
}

/// A new key in its stored (wrapped) form, to be written by the caller in
/// the same write as whatever starts using it.
pub struct NewKey {
    /// Its version.
    pub version: u32,
    /// Its label in the keys table.
    pub label: Vec<u8>,
    /// The key wrapped by the master key.
    pub wrapped: Vec<u8>,
}

impl NewKey {
    /// Version `version` of the keys of `family`, wrapped by `wrap`
    /// (which is given the key's label, bound in as associated data).
    fn wrap(
        family: MasterWrapped,
        version: u32,
        wrap: impl FnOnce(&[u8]) -> Result<Sealed, crate::crypto::Error>,
    ) -> Result<Self, Error> {
        let label = family.label(version);
        let wrapped = encode_wrapped(&wrap(&label)?);
        Ok(Self {
            version,
            label,
            wrapped,
        })
    }

    /// Adds the key to `unit`, which then applies only if no other rotation
    /// stored this version first.
    pub fn store(self, unit: &mut crate::store::Unit) {
        unit.guard_absent(Table::Keys, self.label.clone()).put(
            Table::Keys,
            self.label,
            self.wrapped,
        );
    }
}

/// Every version of the keys of `family`, unwrapped by `unwrap`.
async fn load_versions<S: Store, K>(
    store: &S,
    family: MasterWrapped,
    unwrap: impl Fn(&Sealed, &[u8]) -> Result<K, crate::crypto::Error>,
) -> Result<BTreeMap<u32, Arc<K>>, Error> {
    let mut keys = BTreeMap::new();
    for (label, wrapped) in store
        .scan_prefix(Table::Keys, family.prefix().into())
        .await?
    {
        let version = family.version_of(&label).ok_or_else(|| {
            Error::CorruptKey(format!(
                "unexpected key label {}",
                String::from_utf8_lossy(&label)
            ))
        })?;
        let sealed = decode_wrapped(&label, &wrapped)?;
        let key = unwrap(&sealed, &label).map_err(|_| wrong_master(&label))?;
        keys.insert(version, Arc::new(key));
    }
    Ok(keys)
}

/// Adds the versions of `loaded` that `keys` lacks; returns how many.
fn add_missing<K>(
    keys: &std::sync::RwLock<BTreeMap<u32, Arc<K>>>,
    loaded: BTreeMap<u32, Arc<K>>,
) -> usize {
    let mut keys = keys
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = keys.len();
    for (version, key) in loaded {
        keys.entry(version).or_insert(key);
    }
    keys.len() - before
}

/// The newest hash key of `family`, created if there is none.
async fn hash_key<S: Store>(
    store: &S,
    master: &MasterKey,
    family: MasterWrapped,
) -> Result<HashKey, Error> {
    if let Some((label, wrapped)) = store
        .scan_prefix(Table::Keys, family.prefix().into())
        .await?
        .pop()
    {
        let sealed = decode_wrapped(&label, &wrapped)?;
        return master
            .unwrap_hash_key(&sealed, &label)
            .map_err(|_| wrong_master(&label));
    }
    let key = HashKey::generate()?;
    let key_label = family.label(1);
    let wrapped = encode_wrapped(&master.wrap_hash_key(&key, &key_label)?);
    match create_once(store, Table::Keys, &key_label, wrapped).await? {
        None => {
            tracing::info!(
                key = family.prefix().trim_end_matches('/'),
                "created a hash key"
            );
            Ok(key)
        }
        Some(theirs) => master
            .unwrap_hash_key(&decode_wrapped(&key_label, &theirs)?, &key_label)
            .map_err(|_| wrong_master(&key_label)),
    }
}

/// Stores `value` under `key` of `table` unless another process sharing
/// the store (a replica starting at the same moment) stored one there
/// first: then returns theirs, which everyone must use.
pub(super) async fn create_once<S: Store>(
    store: &S,
    table: Table,
    key: &[u8],
    value: Vec<u8>,
) -> Result<Option<Vec<u8>>, Error> {
    let mut batch = Batch::new();
    batch
        .unit()
        .guard_absent(table, key.to_vec())
        .put(table, key.to_vec(), value);
    Ok(match store.commit(batch).await?.pop() {
        Some(Err(conflict)) => Some(conflict.existing),
        _ => None,
    })
}

fn wrong_master(label: &[u8]) -> Error {
    Error::WrongMasterKey(String::from_utf8_lossy(label).into_owned())
}

fn encode_wrapped(sealed: &Sealed) -> Vec<u8> {
    layout::encode_wrapped(sealed, now_ms())
}

fn decode_wrapped(label: &[u8], bytes: &[u8]) -> Result<Sealed, Error> {
    layout::decode_wrapped(bytes).ok_or_else(|| {
        Error::CorruptKey(format!(
            "wrapped key {} is malformed",
            String::from_utf8_lossy(label)
        ))
    })
}
