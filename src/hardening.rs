//! Process hardening at start: no core dumps (so plaintext in memory never
//! lands on disk), and optionally locked memory (so it is never swapped out).

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};

/// Why hardening failed. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// Core dumps could not be disabled.
    #[error("cannot disable core dumps: {0}")]
    CoreDumps(rustix::io::Errno),
    /// Memory could not be locked.
    #[error(
        "security.lock_memory is set but memory cannot be locked ({0}): grant CAP_IPC_LOCK or raise RLIMIT_MEMLOCK (ulimit -l), or turn the setting off"
    )]
    LockMemory(rustix::io::Errno),
}

/// Disables core dumps (a zero core size limit, and the process marked not
/// dumpable, which also keeps other users' ptrace out) and, if asked, locks
/// all current and future memory.
///
/// # Errors
/// See [`HardeningError`].
pub fn harden(lock_memory: bool) -> Result<(), HardeningError> {
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(HardeningError::CoreDumps)?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(HardeningError::CoreDumps)?;
    if lock_memory {
        rustix::mm::mlockall(
            rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE,
        )
        .map_err(HardeningError::LockMemory)?;
    }
    Ok(())
}
