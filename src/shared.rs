//! [`Shared`]: a value that a reload replaces while requests run.

use std::sync::{Arc, PoisonError, RwLock};

/// A value in force now, replaceable at run time (the policy, the TLS
/// material, the limits; reloaded on SIGHUP or when the config changes). A
/// request takes the current value once and keeps it to the end, so a
/// reload never changes the rules half-way through a call.
#[derive(Debug, Default)]
pub struct Shared<T>(RwLock<Arc<T>>);

impl<T> Shared<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }

    /// The value in force now.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `value` in force for whatever takes it from now on.
    pub fn replace(&self, value: T) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}
