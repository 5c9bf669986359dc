//! Network namespaces by fd: opening and identifying them, and running code inside one.
//!
//! `setns(2)` switches only the calling OS thread, so [`Netns::run`] does its work on a
//! fresh scoped thread that enters the namespace and then ends; the caller's thread (a
//! tokio worker, say) never changes namespace. Processes spawned from that thread
//! (`iptables-restore`, `ip`) start inside the namespace. nix's `setns`, `fstat` and
//! `fstatfs` are safe; the crate's one `unsafe` block is [`register_socket`], which hands
//! an owned socket (the ZDS sockets) to tokio's reactor.

// One unsafe operation, with its SAFETY note: registering an owned socket with tokio.
#![allow(unsafe_code)]

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// `NSFS_MAGIC`: the filesystem type of a namespace file.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `PROC_SUPER_MAGIC`: older kernels report `/proc/<pid>/ns/net` as procfs.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("pod netns {path} is gone ({source}); the pod sandbox was probably deleted")]
    Open { path: String, source: io::Error },
    #[error("{path} is not a network namespace file (filesystem type {kind:#x})")]
    NotNetns { path: String, kind: i64 },
    #[error("entering netns {path}: {source}; the agent needs CAP_SYS_ADMIN")]
    Enter { path: String, source: io::Error },
    #[error("the worker thread for netns {path} panicked")]
    Panicked { path: String },
}

/// A network namespace, held open by its fd (so it outlives its path and its processes).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: (u64, u64),
    path: PathBuf,
}

impl Netns {
    /// Opens a netns file (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let p = path.display().to_string();
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: p.clone(),
            source,
        })?;
        let fd: OwnedFd = file.into();
        let fs = nix::sys::statfs::fstatfs(&fd).map_err(|e| NetnsError::Open {
            path: p.clone(),
            source: e.into(),
        })?;
        let kind = fs.filesystem_type().0 as i64;
        if kind != NSFS_MAGIC && kind != PROC_SUPER_MAGIC {
            return Err(NetnsError::NotNetns { path: p, kind });
        }
        let st = nix::sys::stat::fstat(&fd).map_err(|e| NetnsError::Open {
            path: p,
            source: e.into(),
        })?;
        Ok(Netns {
            fd,
            id: (st.st_dev, st.st_ino),
            path: path.to_path_buf(),
        })
    }

    /// The calling process's own namespace.
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open(Path::new("/proc/self/ns/net"))
    }

    /// (st_dev, st_ino): the namespace's identity across different fds and paths.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let path = self.path.display().to_string();
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetnsError::Enter {
                        path: path.clone(),
                        source: e.into(),
                    }
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Panicked { path: path.clone() })?
        })
    }

    /// Whether `ip` is a local address inside this namespace (binding to it succeeds only
    /// then) — guards against a foreign process that merely visits a pod's netns.
    pub fn has_ip(&self, ip: IpAddr) -> Result<bool, NetnsError> {
        self.run(|| TcpListener::bind(SocketAddr::new(ip, 0)).is_ok())
    }
}

/// Registers an owned socket with tokio's reactor (for SOCK_SEQPACKET, which tokio does not
/// wrap itself). Must be called on a tokio runtime.
pub fn register_socket(
    sock: socket2::Socket,
) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    sock.set_nonblocking(true)?;
    // SAFETY: the AsyncFd takes ownership of the Socket, so the descriptor stays open and is
    // not replaced for exactly as long as it is registered; it is closed only when the
    // AsyncFd (and with it the registration) is dropped.
    unsafe { tokio::io::unix::AsyncFd::register(sock) }.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanished_netns_is_a_clean_named_error() {
        let e = Netns::open(Path::new("/var/run/netns/mesh-cni-test-does-not-exist")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("mesh-cni-test-does-not-exist") && s.contains("is gone"),
            "{s}"
        );
    }

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = Netns::open(f.path()).unwrap_err();
        assert!(matches!(e, NetnsError::NotNetns { .. }), "{e}");
    }

    #[test]
    fn own_netns_has_the_same_identity_by_any_path() {
        let a = Netns::current().unwrap();
        let b = Netns::open(Path::new(&format!("/proc/{}/ns/net", std::process::id()))).unwrap();
        assert_eq!(a.id(), b.id());
        assert!(a.has_ip("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!a.has_ip("192.0.2.77".parse().unwrap()).unwrap());
    }
}
