//! The one seam for "where cluster knowledge comes from", shared by the control plane
//! (istiod-lite's object index) and the CNI node agent (its node's pods and all namespaces).
//!
//! A [`Source`] publishes complete snapshots of its state on a `watch` channel: the first once
//! everything has been read (only then does `start` return, so no consumer ever acts on a
//! partial view), then a new one after every change, until the drain fires. Each binary has
//! a Kubernetes implementation (kube-rs watches) and a files implementation (what the netns
//! lab and the tests feed), and its consumers cannot tell them apart.

use std::{future::Future, sync::Arc};

use tokio::sync::watch;

use crate::drain::DrainWatcher;

/// A source of complete snapshots of `State`.
pub trait Source: Send + 'static {
    /// One complete snapshot (never a delta).
    type State: Send + Sync + 'static;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads everything, puts the first complete snapshot on `out`, returns, and keeps `out`
    /// current (from tasks it spawns) until `drain` is signaled.
    fn start(
        self,
        out: watch::Sender<Arc<Self::State>>,
        drain: DrainWatcher,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Starts `source` and returns the receiving end, holding its first complete snapshot.
pub async fn subscribe<S>(
    source: S,
    drain: DrainWatcher,
) -> Result<watch::Receiver<Arc<S::State>>, S::Error>
where
    S: Source,
    S::State: Default,
{
    let (tx, rx) = watch::channel(Arc::new(S::State::default()));
    source.start(tx, drain).await?;
    Ok(rx)
}

/// Publishes `next` only if it differs from the current snapshot, so receivers wake only
/// for real changes. Returns whether it was sent.
pub fn publish_if_changed<T: PartialEq>(out: &watch::Sender<Arc<T>>, next: T) -> bool {
    out.send_if_modified(|cur| {
        if **cur == next {
            false
        } else {
            *cur = Arc::new(next);
            true
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain;

    struct Counter(u32);

    impl Source for Counter {
        type State = u32;
        type Error = std::io::Error;
        async fn start(
            self,
            out: watch::Sender<Arc<u32>>,
            _drain: DrainWatcher,
        ) -> Result<(), std::io::Error> {
            if self.0 == 0 {
                return Err(std::io::Error::other("nothing to read"));
            }
            out.send_replace(Arc::new(self.0));
            Ok(())
        }
    }

    #[tokio::test]
    async fn subscribe_returns_the_first_snapshot_or_the_error() {
        let (_trigger, watcher) = drain::new();
        let rx = subscribe(Counter(7), watcher.clone()).await.unwrap();
        assert_eq!(**rx.borrow(), 7);
        assert!(subscribe(Counter(0), watcher).await.is_err());
    }

    #[test]
    fn unchanged_snapshots_do_not_wake_receivers() {
        let (tx, mut rx) = watch::channel(Arc::new(1u32));
        rx.mark_unchanged();
        assert!(!publish_if_changed(&tx, 1));
        assert!(!rx.has_changed().unwrap());
        assert!(publish_if_changed(&tx, 2));
        assert!(rx.has_changed().unwrap());
        assert_eq!(**rx.borrow_and_update(), 2);
    }
}
