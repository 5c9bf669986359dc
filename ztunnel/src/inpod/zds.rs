//! The ZDS client: ztunnel's side of the node agent protocol (`proto/zds.proto`).
//!
//! SOCK_SEQPACKET unix socket, one protobuf message per packet (≤ 1024 bytes), netns fds as
//! SCM_RIGHTS on `AddWorkload` only. Every request is answered by exactly one `Ack`, in order.
//! Malformed requests are answered with an `Ack{error}` naming the problem and the
//! connection is kept; only an unreadable transport ends the session.

// Two unsafe operations, each with its SAFETY note: taking ownership of the raw fds that
// SCM_RIGHTS installed, and registering our socket with tokio's reactor.
#![allow(unsafe_code)]

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use mesh_proto::istio::workload::zds::{
    Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload,
    workload_response,
};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
    sendmsg, socket,
};
use prost::Message;
use tokio::io::unix::AsyncFd;

use super::Error;

/// Every ZDS message fits in this (both sides enforce it).
pub const MAX_MESSAGE: usize = 1024;

/// A request from the node agent, decoded.
#[derive(Debug)]
pub enum Request {
    Add {
        uid: String,
        name: String,
        namespace: String,
        service_account: String,
        netns: OwnedFd,
    },
    Keep {
        uid: String,
    },
    Del {
        uid: String,
    },
    SnapshotSent,
}

/// A packet that could not be understood; it still gets an `Ack{error}`.
#[derive(Debug)]
pub struct BadRequest(pub String);

/// An open ZDS session.
pub struct Connection {
    fd: AsyncFd<OwnedFd>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to the node agent and says hello.
    pub async fn connect(path: &Path) -> Result<Self, Error> {
        let err = |source: io::Error| Error::Connect {
            path: path.display().to_string(),
            source,
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINPROGRESS | nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(err(e.into())),
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open for exactly as
        // long as it is registered with the reactor.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| err(e.into()))?;
        let conn = Connection { fd };
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        conn.send(&hello.encode_to_vec()).await?;
        Ok(conn)
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), Error> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &[],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            }) {
                Ok(r) => {
                    r?;
                    return Ok(());
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Answers the last request.
    pub async fn ack(&self, error: Option<String>) -> Result<(), Error> {
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.unwrap_or_default(),
            })),
        };
        self.send(&resp.encode_to_vec()).await
    }

    /// Waits for the next request. `Ok(None)` means the agent closed the connection.
    pub async fn next(&self) -> Result<Option<Result<Request, BadRequest>>, Error> {
        let (bytes, fds, truncated) = loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv(fd.as_raw_fd())) {
                Ok(r) => break r?,
                Err(_would_block) => continue,
            }
        };
        if bytes.is_empty() && fds.is_empty() {
            return Ok(None);
        }
        if truncated {
            return Ok(Some(Err(BadRequest(format!(
                "message or ancillary data truncated (limit {MAX_MESSAGE} bytes, one fd)"
            )))));
        }
        Ok(Some(decode(&bytes, fds)))
    }
}

/// One `recvmsg`: payload, received fds (owned), and whether anything was cut off.
fn recv(fd: RawFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>, bool)> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: SCM_RIGHTS installed a fresh descriptor in this process for each
                // entry; nothing else knows it, so taking ownership here is sound.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    Ok((buf[..n].to_vec(), fds, truncated))
}

/// Decodes a request, enforcing the fd rules: exactly one on Add, none otherwise.
fn decode(bytes: &[u8], mut fds: Vec<OwnedFd>) -> Result<Request, BadRequest> {
    let req = WorkloadRequest::decode(bytes)
        .map_err(|e| BadRequest(format!("not a WorkloadRequest: {e}")))?;
    let payload = req
        .payload
        .ok_or_else(|| BadRequest("WorkloadRequest has no payload".into()))?;
    let no_fds = |fds: &Vec<OwnedFd>, what: &str| {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(BadRequest(format!(
                "{what} must not carry a file descriptor"
            )))
        }
    };
    match payload {
        Payload::Add(add) => {
            if fds.len() != 1 {
                return Err(BadRequest(format!(
                    "AddWorkload {:?} must carry exactly one netns fd, got {}",
                    add.uid,
                    fds.len()
                )));
            }
            let info = add.workload_info.ok_or_else(|| {
                BadRequest(format!("AddWorkload {:?} has no workload_info", add.uid))
            })?;
            if add.uid.is_empty() {
                return Err(BadRequest("AddWorkload has an empty uid".into()));
            }
            let netns = fds.remove(0);
            Ok(Request::Add {
                uid: add.uid,
                name: info.name,
                namespace: info.namespace,
                service_account: info.service_account,
                netns,
            })
        }
        Payload::Keep(k) => {
            no_fds(&fds, "KeepWorkload")?;
            Ok(Request::Keep { uid: k.uid })
        }
        Payload::Del(d) => {
            no_fds(&fds, "DelWorkload")?;
            Ok(Request::Del { uid: d.uid })
        }
        Payload::SnapshotSent(_) => {
            no_fds(&fds, "SnapshotSent")?;
            Ok(Request::SnapshotSent)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::istio::workload::zds::{AddWorkload, DelWorkload, SnapshotSent, WorkloadInfo};

    fn add(uid: &str, info: bool) -> Vec<u8> {
        WorkloadRequest {
            payload: Some(Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: info.then(|| WorkloadInfo {
                    name: "app-a".into(),
                    namespace: "default".into(),
                    service_account: "sa-a".into(),
                }),
            })),
        }
        .encode_to_vec()
    }

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn wire_bytes_match_istio() {
        // Bytes observed between Istio's node agent and ztunnel (redirection-cni.md §2.2).
        assert_eq!(
            ZdsHello {
                version: Version::V1 as i32
            }
            .encode_to_vec(),
            [0x08, 0x01]
        );
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack::default())),
        };
        assert_eq!(ack.encode_to_vec(), [0x0a, 0x00]);
        let snap = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);
        let mut want = vec![0x0a, 0x21, 0x0a, 0x07];
        want.extend_from_slice(b"uid-p1a");
        want.extend_from_slice(&[0x12, 0x16, 0x0a, 0x05]);
        want.extend_from_slice(b"app-a");
        want.extend_from_slice(&[0x12, 0x07]);
        want.extend_from_slice(b"default");
        want.extend_from_slice(&[0x1a, 0x04]);
        want.extend_from_slice(b"sa-a");
        let got = WorkloadRequest {
            payload: Some(Payload::Add(AddWorkload {
                uid: "uid-p1a".into(),
                workload_info: Some(WorkloadInfo {
                    name: "app-a".into(),
                    namespace: "default".into(),
                    service_account: "sa-a".into(),
                }),
            })),
        }
        .encode_to_vec();
        assert_eq!(got, want);
    }

    #[test]
    fn fd_rules_are_enforced_with_named_errors() {
        assert!(matches!(
            decode(&add("u", true), vec![devnull()]),
            Ok(Request::Add { .. })
        ));
        let e = decode(&add("u", true), vec![]).unwrap_err();
        assert!(e.0.contains("exactly one netns fd"), "{}", e.0);
        let e = decode(&add("u", true), vec![devnull(), devnull()]).unwrap_err();
        assert!(e.0.contains("got 2"), "{}", e.0);
        let e = decode(&add("u", false), vec![devnull()]).unwrap_err();
        assert!(e.0.contains("no workload_info"), "{}", e.0);
        let del = WorkloadRequest {
            payload: Some(Payload::Del(DelWorkload { uid: "u".into() })),
        }
        .encode_to_vec();
        let e = decode(&del, vec![devnull()]).unwrap_err();
        assert!(e.0.contains("must not carry"), "{}", e.0);
        let e = decode(&[0xff, 0xff, 0xff], vec![]).unwrap_err();
        assert!(e.0.contains("not a WorkloadRequest"), "{}", e.0);
        let e = decode(&[], vec![]).unwrap_err();
        assert!(e.0.contains("no payload"), "{}", e.0);
    }
}
