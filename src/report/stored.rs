//! What a snapshot's tables hold, for the offline tools: which data key
//! versions encrypt how many records, and whether every record decodes.
//! The tools print it; they never decode a record themselves.

use std::collections::BTreeMap;

use crate::{
    layout::{self, KeyVersion, MasterWrapped, Record},
    store::{Error, Snapshot, Table},
};

/// The data key versions of a vault and the records under each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataKeyUsage {
    /// Per data key version: when it was made (ms since the epoch) and how
    /// many records it encrypts.
    pub versions: BTreeMap<u32, (u64, u64)>,
    /// Records under their data subject's own key.
    pub subject_keyed: u64,
    /// The blind-index key versions and when each was made (more than one
    /// while a re-index runs).
    pub index_versions: Vec<(u32, u64)>,
}

impl DataKeyUsage {
    /// The version new values are encrypted under (the newest).
    pub fn active(&self) -> u32 {
        self.versions.keys().next_back().copied().unwrap_or(0)
    }
}

/// Reads the data key versions of `snapshot` and counts the records under
/// each (a record that does not decode is counted nowhere).
///
/// # Errors
/// Engine failures.
pub fn data_key_usage(snapshot: &impl Snapshot) -> Result<DataKeyUsage, Error> {
    let mut usage = DataKeyUsage {
        versions: versions(snapshot, MasterWrapped::DataKey)?
            .into_iter()
            .map(|(version, created_ms)| (version, (created_ms, 0)))
            .collect(),
        subject_keyed: 0,
        index_versions: versions(snapshot, MasterWrapped::BlindIndexKey)?,
    };
    snapshot.scan(Table::Records, &[], |_, bytes| {
        if let Ok(record) = Record::decode(bytes) {
            match record.key_version {
                KeyVersion::Vault(version) => {
                    if let Some((_, count)) = usage.versions.get_mut(&version) {
                        *count += 1;
                    }
                }
                KeyVersion::Subject => usage.subject_keyed += 1,
            }
        }
        true
    })?;
    Ok(usage)
}

/// The versions of one family of keys the master key wraps, in order, and
/// when each was made (ms since the epoch).
fn versions(snapshot: &impl Snapshot, family: MasterWrapped) -> Result<Vec<(u32, u64)>, Error> {
    let mut found = Vec::new();
    snapshot.scan(Table::Keys, family.prefix().as_bytes(), |label, wrapped| {
        let Some(version) = family.version_of(label) else {
            return false;
        };
        found.push((version, layout::wrapped_created_ms(wrapped)));
        true
    })?;
    Ok(found)
}

/// How many records `snapshot` holds, and how many of them do not decode.
///
/// # Errors
/// Engine failures.
pub fn records_decode(snapshot: &impl Snapshot) -> Result<(u64, u64), Error> {
    let (mut records, mut bad) = (0u64, 0u64);
    snapshot.scan(Table::Records, &[], |_, value| {
        records += 1;
        if Record::decode(value).is_err() {
            bad += 1;
        }
        true
    })?;
    Ok((records, bad))
}
