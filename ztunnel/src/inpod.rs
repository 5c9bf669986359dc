//! In-pod ("shared") mode: one ztunnel per node proxies for every enrolled pod from inside
//! that pod's own network namespace.
//!
//! The CNI node agent passes each pod's netns fd over ZDS ([`zds`]); for every pod the
//! [`manager`] opens the outbound (15001), plaintext inbound (15006) and HBONE (15008)
//! listeners inside the pod's netns through a [`netns::NetnsSocketFactory`], and every
//! connection those proxies open is created there too, marked 0x539 so the pod's capture
//! rules let it through. All pods share one state, certificate cache and HBONE pool.

pub mod manager;
pub mod netns;
pub mod zds;

/// Errors of the in-pod machinery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ZDS socket {path}: {source} (is the CNI node agent running?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("ZDS protocol error: {0}")]
    Protocol(String),
    #[error("ZDS I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("network namespace: {0}")]
    Netns(String),
}
