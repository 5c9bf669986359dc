//! Giving freed heap back to the OS.
//!
//! A proxy's memory follows its connection count: a burst of 10k connections allocates
//! many small blocks, and when they close glibc's allocator keeps the freed pages mapped
//! (RSS stays at the peak — the retention Istio's ztunnel shows in istio/ztunnel#1630).
//! `malloc_trim(0)` returns every free page, including those in the middle of the heap. It
//! is cheap when little is free, so [`run_trimmer`] simply runs it periodically.

use std::time::Duration;

/// Returns free heap pages to the OS; true if any memory was released. A no-op where the
/// C library has no `malloc_trim` (non-glibc targets).
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        trim_glibc()
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_glibc() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own free lists under its own locks;
    // it takes no pointers from us and is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Runs [`trim`] every `every`, forever (spawn it on a runtime of your choice).
pub async fn run_trimmer(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if trim() {
            tracing::debug!("returned free heap pages to the OS");
        }
    }
}
