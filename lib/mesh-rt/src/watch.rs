//! Watching a configuration file for changes.
//!
//! Polling, not inotify: the file's modification time is read once a second, which also sees
//! a ConfigMap's symlink swap and costs nothing worth measuring. A file that disappears counts
//! as a change (so does its return); what to do about it is the caller's.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::drain::DrainWatcher;

/// How often the file's modification time is read.
pub const POLL: Duration = Duration::from_secs(1);

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Calls `changed(path)` every time the modification time of `path` differs from the one
/// last seen (the first reading is taken now, so the file as it is now is not reported).
/// Returns when `drain` is signaled.
pub async fn file_changes(path: PathBuf, drain: DrainWatcher, mut changed: impl FnMut(&Path)) {
    let mut last = mtime(&path);
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = drain.signaled() => return,
        }
        let now = mtime(&path);
        if now == last {
            continue;
        }
        last = now;
        changed(&path);
    }
}
