//! Readiness as a set of named blockers: the process is ready when none is left.
//!
//! Each startup dependency (certificates, first configuration, listeners) registers a
//! [`BlockReady`] and drops it when satisfied; `/healthz/ready` reports what is still pending.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

/// Shared readiness state. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    pending: Arc<Mutex<BTreeSet<String>>>,
}

/// Blocks readiness until dropped.
#[derive(Debug)]
pub struct BlockReady {
    name: String,
    ready: Ready,
}

impl Ready {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a blocker named `name` (names are unique; re-registering is harmless).
    pub fn register(&self, name: &str) -> BlockReady {
        self.lock().insert(name.to_owned());
        BlockReady {
            name: name.to_owned(),
            ready: self.clone(),
        }
    }

    /// Names still blocking readiness, sorted.
    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.ready.lock().remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_all_blockers_drop() {
        let r = Ready::new();
        let a = r.register("certificates");
        let b = r.register("config");
        assert_eq!(r.pending(), vec!["certificates", "config"]);
        drop(a);
        assert!(!r.is_ready());
        drop(b);
        assert!(r.is_ready());
    }
}
