//! Graceful shutdown: tell every server to stop accepting, then wait for what is in flight.
//!
//! [`DrainTrigger::drain`] flips the signal and waits until every [`DrainWatcher`] clone has
//! been dropped (each connection or server holds one) or the deadline passes, whichever
//! comes first. Callers then force-close whatever is left.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain. Held by the process's main task.
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    released: mpsc::Receiver<()>,
}

/// Observes the drain signal; holding one delays the end of the drain.
#[derive(Debug, Clone)]
pub struct DrainWatcher {
    signal: watch::Receiver<bool>,
    _hold: mpsc::Sender<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every watcher was released before the deadline.
    Complete,
    /// The deadline passed with watchers still held.
    DeadlineExceeded,
}

/// Creates a linked trigger and watcher.
pub fn new() -> (DrainTrigger, DrainWatcher) {
    let (signal, rx) = watch::channel(false);
    let (hold, released) = mpsc::channel(1);
    (
        DrainTrigger { signal, released },
        DrainWatcher {
            signal: rx,
            _hold: hold,
        },
    )
}

impl DrainTrigger {
    /// Signals every watcher and waits for them to be dropped, at most `deadline`.
    pub async fn drain(mut self, deadline: Duration) -> DrainOutcome {
        let _ = self.signal.send(true);
        match tokio::time::timeout(deadline, self.released.recv()).await {
            Ok(_) => DrainOutcome::Complete,
            Err(_) => DrainOutcome::DeadlineExceeded,
        }
    }
}

impl DrainWatcher {
    /// Resolves once a drain has started.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger is gone, which also means "stop".
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_watchers_then_completes() {
        let (trigger, watcher) = new();
        let w2 = watcher.clone();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(w2);
        });
        drop(watcher);
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            DrainOutcome::Complete
        );
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_deadline() {
        let (trigger, watcher) = new();
        let _held = watcher.clone();
        assert!(!watcher.is_draining());
        assert_eq!(
            trigger.drain(Duration::from_secs(2)).await,
            DrainOutcome::DeadlineExceeded
        );
        assert!(watcher.is_draining());
    }
}
