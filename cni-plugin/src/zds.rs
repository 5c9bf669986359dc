//! The ZDS server: the node agent's side of `proto/zds.proto`, wire-compatible with Istio's
//! (`istio.workload.zds` over SOCK_SEQPACKET), so Istio's ztunnel can connect to us and our
//! ztunnel to Istio's agent.
//!
//! Per connection: ztunnel sends `ZdsHello{V1}`; we send the snapshot (`AddWorkload` with
//! the netns fd as SCM_RIGHTS for each enrolled pod, `KeepWorkload` for pods whose netns we
//! do not hold), then `SnapshotSent`; then steady-state `AddWorkload`s (to the newest
//! connection only) and `DelWorkload`s (to all). Every request waits for its one `Ack`
//! before the next is sent, so acks correlate by order. A nack or an unreadable ack fails
//! that request and keeps the connection; a silent or closed peer ends it.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_proto::istio::workload::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};
use nix::sys::socket::{ControlMessage, MsgFlags, recvmsg, sendmsg};
use prost::Message;
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::netns::{Netns, register_socket};

/// Every ZDS message fits in this (both sides enforce it).
pub const MAX_MESSAGE: usize = 1024;
/// How long ztunnel may take to say hello, and to ack one request.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("binding the ZDS socket {path}: {source}")]
    Bind { path: String, source: io::Error },
    #[error(
        "no ztunnel connection; ztunnel on this node is not running or not connected to {path}"
    )]
    NoConnection { path: String },
    #[error("ztunnel refused {what}: {error}")]
    Nack { what: String, error: String },
    #[error("ztunnel sent an unreadable answer to {what}: {reason}")]
    BadAck { what: String, reason: String },
    #[error("ztunnel did not acknowledge {what} within {ACK_TIMEOUT:?}")]
    Timeout { what: String },
    #[error("the ztunnel connection closed before acknowledging {what}")]
    Closed { what: String },
    #[error("{what} does not fit in one ZDS message ({len} > {MAX_MESSAGE} bytes)")]
    TooLarge { what: String, len: usize },
    #[error("ZDS session ended: {0}")]
    Session(String),
    #[error("ZDS socket I/O: {0}")]
    Io(#[from] io::Error),
}

impl ZdsError {
    /// Might this succeed later without anyone changing anything?
    pub fn retryable(&self) -> bool {
        !matches!(self, ZdsError::TooLarge { .. } | ZdsError::Bind { .. })
    }
}

/// Who the pod is, as ztunnel needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

impl Workload {
    fn add_request(&self) -> WorkloadRequest {
        WorkloadRequest {
            payload: Some(Payload::Add(AddWorkload {
                uid: self.uid.clone(),
                workload_info: Some(WorkloadInfo {
                    name: self.name.clone(),
                    namespace: self.namespace.clone(),
                    service_account: self.service_account.clone(),
                }),
            })),
        }
    }
}

/// One snapshot entry: a pod with its netns (`Add`), or one we know without a netns (`Keep`).
#[derive(Debug, Clone)]
pub enum SnapshotEntry {
    Add(Workload, Arc<Netns>),
    Keep(String),
}

/// What the agent has enrolled, read afresh for every new ztunnel connection.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> Vec<SnapshotEntry>;
}

struct Job {
    what: String,
    bytes: Vec<u8>,
    netns: Option<Arc<Netns>>,
    reply: oneshot::Sender<Result<(), ZdsError>>,
}

struct ConnHandle {
    id: u64,
    tx: mpsc::Sender<Job>,
}

struct Inner {
    path: PathBuf,
    conns: Mutex<Vec<ConnHandle>>,
    next_id: AtomicU64,
    /// Counts completed snapshots (tests and readiness watch it).
    snapshots: watch::Sender<u64>,
}

/// Handle to the running server: send Adds and Dels, see connections.
#[derive(Clone)]
pub struct ZdsServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl ZdsServer {
    /// A server that is not listening yet: `add` fails with "no ztunnel connection" until
    /// [`ZdsServer::listen`] is called (after the agent knows its pods, so the first
    /// snapshot is complete).
    pub fn new(path: &Path) -> ZdsServer {
        ZdsServer {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conns: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                snapshots: watch::channel(0).0,
            }),
        }
    }

    /// `new` + `listen`.
    pub fn start(path: &Path, source: Arc<dyn SnapshotSource>) -> Result<ZdsServer, ZdsError> {
        let server = ZdsServer::new(path);
        server.listen(source)?;
        Ok(server)
    }

    /// Binds the socket (replacing a stale one) and starts accepting on the current tokio
    /// runtime. Every new connection gets a snapshot of `source`.
    pub fn listen(&self, source: Arc<dyn SnapshotSource>) -> Result<(), ZdsError> {
        let path = self.inner.path.clone();
        let bind_err = |source: io::Error| ZdsError::Bind {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(bind_err)?;
        sock.bind(&SockAddr::unix(&path).map_err(bind_err)?)
            .map_err(bind_err)?;
        sock.listen(16).map_err(bind_err)?;
        let listener = register_socket(sock).map_err(bind_err)?;
        let s = self.clone();
        tokio::spawn(
            async move { s.accept_loop(listener, source).await }
                .instrument(info_span!("zds", path = %path.display())),
        );
        info!(path = %self.inner.path.display(), "ZDS server listening");
        Ok(())
    }

    async fn accept_loop(self, listener: AsyncFd<Socket>, source: Arc<dyn SnapshotSource>) {
        loop {
            let accepted = match listener.readable().await {
                Ok(mut guard) => match guard.try_io(|l| l.get_ref().accept()) {
                    Ok(r) => r,
                    Err(_would_block) => continue,
                },
                Err(e) => Err(e),
            };
            let conn = match accepted.and_then(|(s, _)| register_socket(s)) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accepting a ZDS connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(100);
            let s = self.clone();
            let source = source.clone();
            tokio::spawn(
                async move {
                    match s.serve(&conn, rx, source.as_ref(), id, tx).await {
                        Ok(()) => info!("ztunnel disconnected"),
                        Err(e) => warn!(error = %e, "ZDS connection ended"),
                    }
                    s.inner
                        .conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|c| c.id != id);
                }
                .instrument(info_span!("zds_conn", conn = id)),
            );
        }
    }

    async fn serve(
        &self,
        conn: &AsyncFd<Socket>,
        mut rx: mpsc::Receiver<Job>,
        source: &dyn SnapshotSource,
        id: u64,
        tx: mpsc::Sender<Job>,
    ) -> Result<(), ZdsError> {
        let hello = tokio::time::timeout(HELLO_TIMEOUT, recv_packet(conn))
            .await
            .map_err(|_| ZdsError::Timeout {
                what: "the connection (no ZdsHello)".into(),
            })??;
        let hello = ZdsHello::decode(hello.as_slice()).map_err(|e| ZdsError::BadAck {
            what: "the connection".into(),
            reason: format!("not a ZdsHello: {e}"),
        })?;
        if hello.version != Version::V1 as i32 {
            return Err(ZdsError::BadAck {
                what: "the connection".into(),
                reason: format!("unsupported ZDS version {}", hello.version),
            });
        }
        // Newest connection from now on: new pods queue here until the snapshot is sent.
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ConnHandle { id, tx });
        let entries = source.snapshot();
        info!(pods = entries.len(), "ztunnel connected; sending snapshot");
        for e in &entries {
            let r = match e {
                SnapshotEntry::Add(w, netns) => {
                    exchange(
                        conn,
                        &format!("snapshot Add {}", w.uid),
                        &w.add_request(),
                        Some(netns),
                    )
                    .await
                }
                SnapshotEntry::Keep(uid) => {
                    let req = WorkloadRequest {
                        payload: Some(Payload::Keep(KeepWorkload { uid: uid.clone() })),
                    };
                    exchange(conn, &format!("snapshot Keep {uid}"), &req, None).await
                }
            };
            match r {
                Ok(()) => {}
                // ztunnel keeps the pod pending and retries it by itself.
                Err(e @ (ZdsError::Nack { .. } | ZdsError::BadAck { .. })) => {
                    warn!(error = %e, "snapshot entry not accepted")
                }
                Err(e) => return Err(e),
            }
        }
        let snap = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        exchange(conn, "SnapshotSent", &snap, None).await?;
        self.inner.snapshots.send_modify(|n| *n += 1);
        info!(pods = entries.len(), "snapshot sent");
        loop {
            tokio::select! {
                job = rx.recv() => {
                    let Some(job) = job else { return Ok(()) };
                    let r = exchange_bytes(conn, &job.what, &job.bytes, job.netns.as_deref()).await;
                    // Without an ack in order, later acks cannot be matched: end the session.
                    let fatal = r
                        .as_ref()
                        .err()
                        .filter(|e| matches!(e, ZdsError::Timeout { .. } | ZdsError::Closed { .. } | ZdsError::Io(_)))
                        .map(ToString::to_string);
                    let _ = job.reply.send(r);
                    if let Some(e) = fatal {
                        return Err(ZdsError::Session(e));
                    }
                }
                closed = peer_closed(conn) => {
                    // ztunnel never speaks unprompted: EOF or stray data both end the session.
                    return closed;
                }
            }
        }
    }

    fn newest(&self) -> Option<mpsc::Sender<Job>> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map(|c| c.tx.clone())
    }

    fn all(&self) -> Vec<mpsc::Sender<Job>> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.tx.clone())
            .collect()
    }

    /// Number of ztunnels connected (past their hello).
    pub fn connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Completed snapshots so far (one per ztunnel connection that got that far).
    pub fn snapshots(&self) -> watch::Receiver<u64> {
        self.inner.snapshots.subscribe()
    }

    async fn submit(
        tx: mpsc::Sender<Job>,
        what: String,
        bytes: Vec<u8>,
        netns: Option<Arc<Netns>>,
    ) -> Result<(), ZdsError> {
        let (reply, answer) = oneshot::channel();
        let closed = || ZdsError::Closed { what: what.clone() };
        tx.send(Job {
            what: what.clone(),
            bytes,
            netns,
            reply,
        })
        .await
        .map_err(|_| closed())?;
        // The queue may hold a snapshot and other requests ahead of us.
        match tokio::time::timeout(ACK_TIMEOUT * 4, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(ZdsError::Timeout { what }),
        }
    }

    /// Sends `AddWorkload` (with the netns fd) to the newest ztunnel and waits for its ack.
    pub async fn add(&self, w: &Workload, netns: Arc<Netns>) -> Result<(), ZdsError> {
        let what = format!("Add {} ({}/{})", w.uid, w.namespace, w.name);
        let bytes = encode(&what, &w.add_request())?;
        let tx = self.newest().ok_or_else(|| ZdsError::NoConnection {
            path: self.inner.path.display().to_string(),
        })?;
        Self::submit(tx, what, bytes, Some(netns)).await
    }

    /// Sends `DelWorkload` to every connected ztunnel. Succeeds when none is connected (a
    /// reconnecting ztunnel learns it from the snapshot).
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let what = format!("Del {uid}");
        let req = WorkloadRequest {
            payload: Some(Payload::Del(DelWorkload { uid: uid.into() })),
        };
        let bytes = encode(&what, &req)?;
        let mut first_err = None;
        for tx in self.all() {
            if let Err(e) = Self::submit(tx, what.clone(), bytes.clone(), None).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn encode(what: &str, req: &WorkloadRequest) -> Result<Vec<u8>, ZdsError> {
    let bytes = req.encode_to_vec();
    if bytes.len() > MAX_MESSAGE {
        return Err(ZdsError::TooLarge {
            what: what.into(),
            len: bytes.len(),
        });
    }
    Ok(bytes)
}

async fn exchange(
    conn: &AsyncFd<Socket>,
    what: &str,
    req: &WorkloadRequest,
    netns: Option<&Arc<Netns>>,
) -> Result<(), ZdsError> {
    let bytes = encode(what, req)?;
    exchange_bytes(conn, what, &bytes, netns.map(|n| n.as_ref())).await
}

/// Sends one request and waits for its ack.
async fn exchange_bytes(
    conn: &AsyncFd<Socket>,
    what: &str,
    bytes: &[u8],
    netns: Option<&Netns>,
) -> Result<(), ZdsError> {
    send_packet(conn, bytes, netns).await?;
    let answer = match tokio::time::timeout(ACK_TIMEOUT, recv_packet(conn)).await {
        Err(_) => return Err(ZdsError::Timeout { what: what.into() }),
        Ok(Err(ZdsError::Closed { .. })) => return Err(ZdsError::Closed { what: what.into() }),
        Ok(r) => r?,
    };
    let bad = |reason: String| ZdsError::BadAck {
        what: what.into(),
        reason,
    };
    let resp = WorkloadResponse::decode(answer.as_slice())
        .map_err(|e| bad(format!("not a WorkloadResponse: {e}")))?;
    match resp.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => {
            debug!(what, "acked");
            Ok(())
        }
        Some(workload_response::Payload::Ack(ack)) => Err(ZdsError::Nack {
            what: what.into(),
            error: ack.error,
        }),
        None => Err(bad("WorkloadResponse without an ack".into())),
    }
}

async fn send_packet(
    conn: &AsyncFd<Socket>,
    bytes: &[u8],
    netns: Option<&Netns>,
) -> Result<(), ZdsError> {
    loop {
        let mut guard = conn.writable().await?;
        let r = guard.try_io(|s| {
            let raw = s.get_ref().as_raw_fd();
            let fds;
            let cmsg: Vec<ControlMessage<'_>> = match netns {
                Some(n) => {
                    fds = [n.fd().as_raw_fd()];
                    vec![ControlMessage::ScmRights(&fds)]
                }
                None => Vec::new(),
            };
            sendmsg::<()>(
                raw,
                &[IoSlice::new(bytes)],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(r) => {
                r?;
                return Ok(());
            }
            Err(_would_block) => continue,
        }
    }
}

/// One packet. Fds and truncation are errors (ztunnel sends neither).
async fn recv_packet(conn: &AsyncFd<Socket>) -> Result<Vec<u8>, ZdsError> {
    loop {
        let mut guard = conn.readable().await?;
        let r = guard.try_io(|s| {
            let mut buf = [0u8; MAX_MESSAGE];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                s.get_ref().as_raw_fd(),
                &mut iov,
                None,
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let (n, flags) = (msg.bytes, msg.flags);
            Ok((buf[..n].to_vec(), flags))
        });
        match r {
            Ok(Ok((bytes, flags))) => {
                if bytes.is_empty() {
                    return Err(ZdsError::Closed {
                        what: "a read".into(),
                    });
                }
                if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
                    return Err(ZdsError::BadAck {
                        what: "a request".into(),
                        reason: format!(
                            "message truncated or carried fds (limit {MAX_MESSAGE} bytes, no fds)"
                        ),
                    });
                }
                return Ok(bytes);
            }
            Ok(Err(e)) => return Err(ZdsError::Io(e)),
            Err(_would_block) => continue,
        }
    }
}

/// Resolves when the idle peer closes (Ok) or sends something unprompted (Err).
async fn peer_closed(conn: &AsyncFd<Socket>) -> Result<(), ZdsError> {
    match recv_packet(conn).await {
        Err(ZdsError::Closed { .. }) => Ok(()),
        Err(e) => Err(e),
        Ok(bytes) => Err(ZdsError::BadAck {
            what: "nothing (ztunnel spoke unprompted)".into(),
            reason: format!("{} unexpected bytes", bytes.len()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_request_bytes_match_istio() {
        // redirection-cni.md §2.2, observed between Istio's agent and ztunnel.
        let w = Workload {
            uid: "uid-p1a".into(),
            name: "app-a".into(),
            namespace: "default".into(),
            service_account: "sa-a".into(),
        };
        let mut want = vec![0x0a, 0x21, 0x0a, 0x07];
        want.extend_from_slice(b"uid-p1a");
        want.extend_from_slice(&[0x12, 0x16, 0x0a, 0x05]);
        want.extend_from_slice(b"app-a");
        want.extend_from_slice(&[0x12, 0x07]);
        want.extend_from_slice(b"default");
        want.extend_from_slice(&[0x1a, 0x04]);
        want.extend_from_slice(b"sa-a");
        assert_eq!(w.add_request().encode_to_vec(), want);
        let snap = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);
    }

    #[test]
    fn oversized_requests_are_refused_before_sending() {
        let w = Workload {
            uid: "u".repeat(2000),
            name: "n".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        };
        let e = encode("Add big", &w.add_request()).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(!e.retryable());
    }
}
