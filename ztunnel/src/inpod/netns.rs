//! Running socket creation inside another network namespace.
//!
//! `setns(2)` switches only the calling OS thread. A socket keeps the namespace it was
//! created in, so [`InpodNetns::run`] switches into the pod, runs a short synchronous closure
//! (socket(), bind(), listen()) and switches straight back — no `.await` in between, so no
//! other task can run on this thread while it is in the pod's namespace.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use nix::sched::{CloneFlags, setns};

use crate::proxy::{SocketFactory, new_tcp_socket, new_udp_socket};

/// `NSFS_MAGIC`: the filesystem type of a namespace file (`/proc/<pid>/ns/net`).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `PROC_SUPER_MAGIC`: older kernels report namespace files as procfs.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// A pod's network namespace, held open by its fd.
#[derive(Debug)]
pub struct InpodNetns {
    fd: OwnedFd,
    /// (st_dev, st_ino): identifies the namespace across different fds.
    id: (u64, u64),
    /// ztunnel's own namespace, to return to.
    home: Arc<OwnedFd>,
}

/// Opens ztunnel's own network namespace (to return to after each switch).
pub fn own_netns() -> io::Result<OwnedFd> {
    Ok(File::open("/proc/self/ns/net")?.into())
}

/// Namespace identity of an fd: (st_dev, st_ino).
pub fn netns_id(fd: &impl AsFd) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)?;
    Ok((st.st_dev, st.st_ino))
}

impl InpodNetns {
    /// Wraps a received fd after checking it really is a network namespace.
    pub fn new(fd: OwnedFd, home: Arc<OwnedFd>) -> Result<Self, super::Error> {
        let fs = nix::sys::statfs::fstatfs(&fd).map_err(|e| super::Error::Netns(e.to_string()))?;
        let kind = fs.filesystem_type().0 as i64;
        if kind != NSFS_MAGIC && kind != PROC_SUPER_MAGIC {
            return Err(super::Error::Netns(format!(
                "fd is not a namespace file (filesystem type {kind:#x})"
            )));
        }
        let id = netns_id(&fd).map_err(|e| super::Error::Netns(e.to_string()))?;
        Ok(InpodNetns { fd, id, home })
    }

    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Runs `f` with the calling thread inside this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // The thread would keep serving from the pod's namespace: unrecoverable.
            tracing::error!(error = %e, "could not return to ztunnel's network namespace");
            std::process::abort();
        }
        out
    }
}

/// Creates every socket inside one pod's namespace, marked so capture skips it.
#[derive(Debug, Clone)]
pub struct NetnsSocketFactory {
    pub netns: Arc<InpodNetns>,
    pub mark: Option<u32>,
}

impl SocketFactory for NetnsSocketFactory {
    fn tcp_socket(&self, domain: socket2::Domain) -> io::Result<socket2::Socket> {
        let s = self.netns.run(|| new_tcp_socket(domain))?;
        if let Some(m) = self.mark {
            s.set_mark(m)?;
        }
        Ok(s)
    }

    fn udp_socket(&self, domain: socket2::Domain) -> io::Result<socket2::Socket> {
        self.netns.run(|| new_udp_socket(domain))
    }

    fn scope(&self) -> u64 {
        self.netns.id.0.rotate_left(32) ^ self.netns.id.1
    }
}
