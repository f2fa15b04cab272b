//! Dual control for a master key held in memory: the key is split into N
//! shares of which any K make it whole again (Shamir's secret sharing over
//! GF(256), the `blahaj` crate), so that no one person holds it. A vault
//! configured with `[keys.shares]` starts sealed and waits on a unix socket
//! for K holders to each run `tokenvault unseal`; then it opens as with a
//! key file.
//!
//! A share is one line of text:
//! `tvshare1-<threshold>-<check>-<share>`, where `check` is 8 bytes of
//! SHA-256 over a domain string and the key (the same in every share of one
//! split, so that shares of different keys are refused before they are
//! combined, and a combination is checked) and `share` is the share's bytes,
//! all in lowercase hex.
//!
//! The configuration names every share of the split by its commitment
//! (`keys.shares.commitments`: SHA-256 over a domain string and the share's
//! bytes, printed by `keys split-master`), and only those shares are
//! taken: whoever reaches the socket cannot unseal a vault with a key of
//! their own, nor make the holders' shares be thrown away with a junk one.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use blahaj::{Share, Sharks};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{KEY_LEN, MasterKey, MasterKeyError};

const PREFIX: &str = "tvshare1";

/// The longest line a share can be (with room to spare).
const MAX_LINE: u64 = 512;

/// How long an unseal client may take to send its share.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[keys.shares]`: how many shares open the vault, and where they arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharesSetting {
    /// How many shares make the key (K of K-of-N).
    pub threshold: u8,
    /// The unix socket `tokenvault unseal` sends shares to. Created with
    /// mode 0600 while the vault is sealed, removed once it is not.
    pub socket: PathBuf,
    /// The commitment of every share of the split ([`commitment`]): no
    /// other share is taken.
    pub commitments: Vec<[u8; 32]>,
}

impl SharesSetting {
    /// Where the key comes from, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} master-key shares entered over {}",
            self.threshold,
            self.socket.display()
        )
    }
}

/// Splits the key in the file at `key_file` into `count` shares of which any
/// `threshold` make it again. Each share is a line of text (see the module
/// documentation).
///
/// # Errors
/// The key file is unusable (as for `keys.master_key_file`), or the numbers
/// are out of range (2 ≤ threshold ≤ count ≤ 255).
pub fn split(
    key_file: &Path,
    threshold: u8,
    count: u8,
) -> Result<Vec<Zeroizing<String>>, MasterKeyError> {
    if threshold < 2 || count < threshold {
        return Err(MasterKeyError::Shares(format!(
            "a split needs 2 ≤ threshold ≤ shares ≤ 255, not {threshold} of {count}"
        )));
    }
    let key = MasterKey::load(key_file)?;
    let bytes = key.local_bytes().ok_or_else(|| {
        MasterKeyError::Shares("only a key held in memory can be split".to_owned())
    })?;
    let check = check_value(bytes);
    Ok(Sharks(threshold)
        .dealer(bytes)
        .take(usize::from(count))
        .map(|share| {
            let raw = Zeroizing::new(Vec::from(&share));
            Zeroizing::new(format!(
                "{PREFIX}-{threshold}-{}-{}",
                data_encoding::HEXLOWER.encode(&check),
                data_encoding::HEXLOWER.encode(&raw)
            ))
        })
        .collect())
}

/// Waits, sealed, for `setting.threshold` shares on the socket, and returns
/// the key they make. Shares that cannot belong (malformed, another split's,
/// another threshold's, one already given) are refused with a reason and
/// the wait goes on. Shares of different keys are kept apart, so a holder's
/// mistake does not block the others; a combination that does not give the
/// key its shares were made from is dropped, to be entered again.
///
/// # Errors
/// The socket cannot be made.
pub fn unseal(setting: &SharesSetting) -> Result<MasterKey, MasterKeyError> {
    let listener = bind(&setting.socket)?;
    tracing::warn!(
        socket = %setting.socket.display(),
        threshold = setting.threshold,
        "sealed: waiting for master-key shares; each holder runs `tokenvault unseal --socket {}`",
        setting.socket.display()
    );
    let mut collected = Collected::new(setting.threshold, setting.commitments.clone());
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        let line = match read_line(&stream) {
            Ok(line) => line,
            Err(reason) => {
                let _ = writeln!(stream, "refused: {reason}");
                continue;
            }
        };
        match collected.add(&line) {
            Ok(Added::Key(key)) => {
                let _ = writeln!(stream, "unsealed");
                let _ = std::fs::remove_file(&setting.socket);
                tracing::info!("unsealed: the shares made the master key");
                return Ok(key);
            }
            Ok(Added::Kept(count)) => {
                tracing::info!(
                    shares = count,
                    threshold = setting.threshold,
                    "a master-key share was accepted"
                );
                let _ = writeln!(
                    stream,
                    "accepted: {count} of {} shares of key {}",
                    setting.threshold,
                    key_id(&line)
                );
            }
            Err(reason) => {
                tracing::warn!(%reason, "a master-key share was refused");
                let _ = writeln!(stream, "refused: {reason}");
            }
        }
    }
    Err(MasterKeyError::Shares(format!(
        "stopped listening on {}",
        setting.socket.display()
    )))
}

/// Sends one share to a sealed vault's socket and returns its answer.
///
/// # Errors
/// The socket cannot be reached, or the vault refused the share (its
/// reason).
pub fn send_share(socket: &Path, share: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach a sealed vault at {}: {e} (is it running, and still sealed?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{}\n", share.trim()).as_bytes())
        .map_err(|e| format!("cannot send the share: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_LINE))
        .read_line(&mut answer)
        .map_err(|e| format!("no answer from the vault: {e}"))?;
    let answer = answer.trim().to_owned();
    match answer.strip_prefix("refused: ") {
        Some(reason) => Err(format!("the vault refused the share: {reason}")),
        None if answer.is_empty() => Err("the vault closed the connection".to_owned()),
        None => Ok(answer),
    }
}

/// The shares given so far, grouped by the key they say they belong to:
/// a share of another key (a holder's mistake) starts a group of its own
/// instead of blocking the others.
struct Collected {
    threshold: u8,
    /// The shares this vault takes, by commitment.
    commitments: Vec<[u8; 32]>,
    groups: Vec<([u8; 8], Vec<Share>)>,
}

/// What a share did.
enum Added {
    /// Kept: this many of the threshold for its key.
    Kept(usize),
    /// The key, made of enough shares.
    Key(MasterKey),
}

impl Collected {
    fn new(threshold: u8, commitments: Vec<[u8; 32]>) -> Self {
        Self {
            threshold,
            commitments,
            groups: Vec::new(),
        }
    }

    /// Adds a share; the key once its group has enough.
    fn add(&mut self, line: &str) -> Result<Added, String> {
        let (threshold, check, share) = parse(line)?;
        if threshold != self.threshold {
            return Err(format!(
                "this share is from a split needing {threshold} shares; this vault is configured for {}",
                self.threshold
            ));
        }
        if !self.commitments.contains(&commit(&share)) {
            return Err(
                "this share is not one of this vault's (keys.shares.commitments names each of them); nothing was kept"
                    .to_owned(),
            );
        }
        let index = match self.groups.iter().position(|(c, _)| *c == check) {
            Some(index) => index,
            None => {
                self.groups.push((check, Vec::new()));
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[index].1;
        if group.iter().any(|s| s.x.0 == share.x.0) {
            return Err("this share was already given".to_owned());
        }
        group.push(share);
        if group.len() < usize::from(self.threshold) {
            return Ok(Added::Kept(group.len()));
        }
        // Enough: combine, and whatever comes of it, this group is spent.
        let (_, shares) = self.groups.swap_remove(index);
        let recovered = Zeroizing::new(
            Sharks(self.threshold)
                .recover(&shares)
                .map_err(str::to_owned)?,
        );
        drop(shares);
        let bytes: Zeroizing<[u8; KEY_LEN]> =
            Zeroizing::new(recovered.as_slice().try_into().map_err(|_| {
                "the shares do not make a 256-bit key; enter them again".to_owned()
            })?);
        if check_value(&bytes) != check {
            return Err(
                "the shares do not make the key they were split from (one is damaged); enter them again"
                    .to_owned(),
            );
        }
        Ok(Added::Key(MasterKey::local(bytes)))
    }
}

/// `(threshold, check, share)` from a share's line.
fn parse(line: &str) -> Result<(u8, [u8; 8], Share), String> {
    let malformed = || format!("not a share (expected {PREFIX}-<threshold>-<check>-<share>)");
    let mut parts = line.trim().split('-');
    if parts.next() != Some(PREFIX) {
        return Err(malformed());
    }
    let threshold: u8 = parts
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(malformed)?;
    let check: [u8; 8] = parts
        .next()
        .and_then(|c| data_encoding::HEXLOWER.decode(c.as_bytes()).ok())
        .and_then(|c| c.try_into().ok())
        .ok_or_else(malformed)?;
    let raw = Zeroizing::new(
        parts
            .next()
            .and_then(|s| data_encoding::HEXLOWER.decode(s.as_bytes()).ok())
            .ok_or_else(malformed)?,
    );
    if parts.next().is_some() || raw.len() != KEY_LEN + 1 {
        return Err(malformed());
    }
    let share = Share::try_from(raw.as_slice()).map_err(|_| malformed())?;
    Ok((threshold, check, share))
}

/// The commitment to a share's line, as `keys.shares.commitments` lists
/// it: lowercase hex.
///
/// # Errors
/// The line is not a share.
pub fn commitment(line: &str) -> Result<String, String> {
    let (_, _, share) = parse(line)?;
    Ok(data_encoding::HEXLOWER.encode(&commit(&share)))
}

/// SHA-256 over a domain string and the share's bytes (its x and y): it
/// names one share and says nothing of the key.
fn commit(share: &Share) -> [u8; 32] {
    let bytes = Zeroizing::new(Vec::from(share));
    Sha256::new()
        .chain_update(b"tokenvault master key share commitment v1")
        .chain_update(bytes.as_slice())
        .finalize()
        .into()
}

/// The check value of a well-formed share's line, which names its key to
/// the holders (shares of one key show the same).
fn key_id(line: &str) -> &str {
    line.trim().split('-').nth(2).unwrap_or_default()
}

/// 8 bytes that tell whether shares belong to one key, and whether they
/// made it; they say nothing useful about the 256-bit key itself.
fn check_value(key: &[u8; KEY_LEN]) -> [u8; 8] {
    let digest = Sha256::new()
        .chain_update(b"tokenvault master key shares check v1")
        .chain_update(key)
        .finalize();
    let mut check = [0u8; 8];
    check.copy_from_slice(&digest[..8]);
    check
}

/// The unseal socket, mode 0600. A socket left by a vault that died sealed
/// is replaced; one another vault is listening on is not.
fn bind(path: &Path) -> Result<UnixListener, MasterKeyError> {
    let fail = |what: &str, e: std::io::Error| {
        MasterKeyError::Shares(format!("{what} unseal socket {}: {e}", path.display()))
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(MasterKeyError::Shares(format!(
                "{} exists and is not a socket; keys.shares.socket must name a path the vault can create",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(MasterKeyError::Shares(format!(
                "another process is listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| fail("cannot remove the stale", e))?;
    }
    // Created 0600, not restricted afterwards: no moment in which another
    // user could connect. (The umask is the process's; while the vault is
    // sealed the only other thread writes the log to stderr and creates
    // no file.)
    let before = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(before);
    let listener = bound.map_err(|e| fail("cannot create the", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("cannot restrict the", e))?;
    Ok(listener)
}

fn read_line(stream: &UnixStream) -> Result<Zeroizing<String>, String> {
    let mut line = Zeroizing::new(String::new());
    BufReader::new(stream.take(MAX_LINE))
        .read_line(&mut line)
        .map_err(|e| format!("could not read a share: {e}"))?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path) -> PathBuf {
        let path = dir.join("master.key");
        MasterKey::create_file(&path).unwrap();
        path
    }

    /// The commitments of `shares`, as the configuration lists them.
    fn commitments(shares: &[Zeroizing<String>]) -> Vec<[u8; 32]> {
        shares
            .iter()
            .map(|line| {
                data_encoding::HEXLOWER
                    .decode(commitment(line).unwrap().as_bytes())
                    .unwrap()
                    .try_into()
                    .unwrap()
            })
            .collect()
    }

    fn collect(
        shares: &[Zeroizing<String>],
        threshold: u8,
        lines: &[&str],
    ) -> Vec<Result<Added, String>> {
        let mut collected = Collected::new(threshold, commitments(shares));
        lines.iter().map(|line| collected.add(line)).collect()
    }

    #[test]
    fn any_two_of_three_make_the_key_and_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path());
        let original = *MasterKey::load(&path).unwrap().local_bytes().unwrap();
        let shares = split(&path, 2, 3).unwrap();
        assert_eq!(shares.len(), 3);
        for (a, b) in [(0, 1), (0, 2), (2, 1)] {
            let results = collect(&shares, 2, &[&shares[a], &shares[b]]);
            assert!(matches!(results[0], Ok(Added::Kept(1))));
            let Ok(Added::Key(key)) = &results[1] else {
                panic!("{a} and {b} did not unseal");
            };
            assert_eq!(key.local_bytes().unwrap(), &original);
        }
    }

    #[test]
    fn shares_that_cannot_belong_are_refused_or_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let one = split(&key_file(dir.path()), 2, 3).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = split(&key_file(other_dir.path()), 2, 3).unwrap();
        let three_dir = tempfile::tempdir().unwrap();
        let three_of_five = split(&key_file(three_dir.path()), 3, 5).unwrap();

        let mut collected = Collected::new(2, commitments(&one));
        let refused = |r: Result<Added, String>| r.err().unwrap();
        // Another key's share (a key of someone's choosing, or a holder's
        // mistake) is refused and keeps nothing.
        assert!(refused(collected.add(&other[1])).contains("not one of this vault's"));
        assert!(matches!(collected.add(&one[0]), Ok(Added::Kept(1))));
        assert!(refused(collected.add(&one[0])).contains("already given"));
        assert!(refused(collected.add(&three_of_five[0])).contains("needing 3 shares"));
        assert!(refused(collected.add("tvshare1-2-00")).contains("not a share"));
        assert!(refused(collected.add("hello")).contains("not a share"));
        // A damaged share of the right shape, or a junk one carrying the
        // visible check value: refused one by one, the honest share kept.
        let mut damaged = one[1].to_string();
        let last = damaged.pop().unwrap();
        damaged.push(if last == '0' { '1' } else { '0' });
        assert!(refused(collected.add(&damaged)).contains("not one of this vault's"));
        let junk = format!("{}-{}", one[1].rsplit_once('-').unwrap().0, "11".repeat(33));
        assert!(refused(collected.add(&junk)).contains("not one of this vault's"));
        assert!(matches!(collected.add(&one[1]), Ok(Added::Key(_))));
    }

    #[test]
    fn a_split_needs_a_sensible_threshold_and_no_share_holds_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path());
        for (k, n) in [(1, 3), (3, 2), (0, 0)] {
            assert!(split(&path, k, n).is_err(), "{k} of {n}");
        }
        let key = std::fs::read_to_string(&path).unwrap();
        for share in split(&path, 2, 3).unwrap() {
            assert!(!share.contains(key.trim()));
        }
    }
}
