//! The ZDS server against a scripted fake ztunnel (no root needed: the "pod netns" is this
//! process's own). Pins: hello → snapshot (Add with exactly one fd, Keep without) →
//! SnapshotSent; one ack per request; a reconnecting ztunnel gets the snapshot again; Adds
//! go to the newest connection and Dels to all; a nack or an unreadable ack fails only that
//! request and keeps the connection; no connection → a retryable "no ztunnel connection".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, RawFd},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use cni_plugin::{
    netns::Netns,
    zds::{SnapshotEntry, SnapshotSource, Workload, ZdsError, ZdsServer},
};
use mesh_proto::istio::workload::zds::{
    Ack, WorkloadRequest, WorkloadResponse, workload_request::Payload, workload_response,
};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use prost::Message;
use socket2::{Domain, SockAddr, Socket, Type};

struct Snap(Mutex<Vec<SnapshotEntry>>);
impl SnapshotSource for Snap {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.0.lock().unwrap().clone()
    }
}

struct FakeZtunnel(Socket);

impl FakeZtunnel {
    fn connect(path: &Path) -> FakeZtunnel {
        let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        s.connect(&SockAddr::unix(path).unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        FakeZtunnel(s)
    }
    fn send(&self, bytes: &[u8]) {
        sendmsg::<()>(
            self.0.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }
    fn hello(&self) {
        self.send(&[0x08, 0x01]);
    }
    /// Next request and the fds that came with it.
    fn next(&self) -> (Payload, Vec<RawFd>) {
        let mut buf = [0u8; 1024];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let msg = recvmsg::<()>(
            self.0.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        let n = msg.bytes;
        let req = WorkloadRequest::decode(&buf[..n]).unwrap();
        (req.payload.unwrap(), fds)
    }
    fn ack(&self, error: &str) {
        let r = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.into(),
            })),
        };
        self.send(&r.encode_to_vec());
    }
}

/// The netns inode an fd received over SCM_RIGHTS points at.
fn fd_target(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .unwrap()
        .display()
        .to_string()
}

fn workload(uid: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: format!("{uid}-name"),
        namespace: "default".into(),
        service_account: "sa".into(),
    }
}

async fn wait_connections(s: &ZdsServer, n: usize) {
    for _ in 0..200 {
        if s.connections() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected {n} connections, have {}", s.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_then_steady_state_and_replay_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let netns = Arc::new(Netns::current().unwrap());
    let own = std::fs::read_link("/proc/self/ns/net")
        .unwrap()
        .display()
        .to_string();
    let snap = Arc::new(Snap(Mutex::new(vec![
        SnapshotEntry::Add(workload("uid-a"), netns.clone()),
        SnapshotEntry::Keep("uid-k".into()),
    ])));
    let server = ZdsServer::start(&path, snap.clone()).unwrap();

    let e = server
        .add(&workload("uid-x"), netns.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ZdsError::NoConnection { .. }) && e.retryable(),
        "{e}"
    );
    assert!(e.to_string().contains("ztunnel.sock"), "{e}");

    let mut snaps = server.snapshots();
    let zt = FakeZtunnel::connect(&path);
    zt.hello();
    let (p, fds) = zt.next();
    assert!(
        matches!(&p, Payload::Add(a) if a.uid == "uid-a" && a.workload_info.as_ref().unwrap().name == "uid-a-name"),
        "{p:?}"
    );
    assert_eq!(fds.len(), 1, "Add carries exactly one fd");
    assert_eq!(fd_target(fds[0]), own, "the fd is the pod's netns");
    zt.ack("");
    let (p, fds) = zt.next();
    assert!(matches!(&p, Payload::Keep(k) if k.uid == "uid-k"), "{p:?}");
    assert!(fds.is_empty());
    zt.ack("");
    let (p, _) = zt.next();
    assert!(matches!(p, Payload::SnapshotSent(_)), "{p:?}");
    zt.ack("");
    snaps.changed().await.unwrap();
    assert_eq!(*snaps.borrow(), 1);

    // Steady state: an Add, answered; then a Del.
    let s2 = server.clone();
    let n2 = netns.clone();
    let add = tokio::spawn(async move { s2.add(&workload("uid-b"), n2).await });
    let (p, fds) = zt.next();
    assert!(matches!(&p, Payload::Add(a) if a.uid == "uid-b"), "{p:?}");
    assert_eq!(fds.len(), 1);
    zt.ack("");
    add.await.unwrap().unwrap();
    let s2 = server.clone();
    let del = tokio::spawn(async move { s2.del("uid-b").await });
    let (p, fds) = zt.next();
    assert!(matches!(&p, Payload::Del(d) if d.uid == "uid-b"), "{p:?}");
    assert!(fds.is_empty());
    zt.ack("");
    del.await.unwrap().unwrap();

    // ztunnel restarts: the snapshot is replayed to the new connection.
    drop(zt);
    wait_connections(&server, 0).await;
    snap.0
        .lock()
        .unwrap()
        .push(SnapshotEntry::Add(workload("uid-b"), netns.clone()));
    let zt = FakeZtunnel::connect(&path);
    zt.hello();
    let mut uids = Vec::new();
    loop {
        let (p, fds) = zt.next();
        zt.ack("");
        match p {
            Payload::Add(a) => {
                assert_eq!(fds.len(), 1);
                uids.push(a.uid);
            }
            Payload::Keep(k) => uids.push(k.uid),
            Payload::SnapshotSent(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(uids, ["uid-a", "uid-k", "uid-b"]);
    snaps.changed().await.unwrap();
    assert_eq!(*snaps.borrow(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nack_and_malformed_ack_fail_the_request_but_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.sock");
    let netns = Arc::new(Netns::current().unwrap());
    let server = ZdsServer::start(&path, Arc::new(Snap(Mutex::new(vec![])))).unwrap();
    let zt = FakeZtunnel::connect(&path);
    zt.hello();
    let (p, _) = zt.next();
    assert!(matches!(p, Payload::SnapshotSent(_)));
    zt.ack("");
    wait_connections(&server, 1).await;

    let s2 = server.clone();
    let n2 = netns.clone();
    let add = tokio::spawn(async move { s2.add(&workload("uid-n"), n2).await });
    zt.next();
    zt.ack("starting proxies for default/uid-n: bind failed");
    let e = add.await.unwrap().unwrap_err();
    assert!(
        e.to_string().contains("bind failed") && e.retryable(),
        "{e}"
    );

    let s2 = server.clone();
    let n2 = netns.clone();
    let add = tokio::spawn(async move { s2.add(&workload("uid-m"), n2).await });
    zt.next();
    zt.send(&[0xff, 0xff, 0xff]);
    let e = add.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("unreadable answer"), "{e}");

    // Same connection, next request works.
    assert_eq!(server.connections(), 1);
    let s2 = server.clone();
    let add = tokio::spawn(async move { s2.add(&workload("uid-ok"), netns).await });
    let (p, _) = zt.next();
    assert!(matches!(&p, Payload::Add(a) if a.uid == "uid-ok"));
    zt.ack("");
    add.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adds_go_to_the_newest_connection_and_dels_to_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.sock");
    let netns = Arc::new(Netns::current().unwrap());
    let server = ZdsServer::start(&path, Arc::new(Snap(Mutex::new(vec![])))).unwrap();
    let mut zts = Vec::new();
    for i in 1..=2 {
        let zt = FakeZtunnel::connect(&path);
        zt.hello();
        zt.next();
        zt.ack("");
        wait_connections(&server, i).await;
        zts.push(zt);
    }
    let s2 = server.clone();
    let add = tokio::spawn(async move { s2.add(&workload("uid-new"), netns).await });
    let (p, _) = zts[1].next();
    assert!(matches!(&p, Payload::Add(a) if a.uid == "uid-new"));
    zts[1].ack("");
    add.await.unwrap().unwrap();
    let s2 = server.clone();
    let del = tokio::spawn(async move { s2.del("uid-new").await });
    for zt in &zts {
        let (p, _) = zt.next();
        assert!(matches!(&p, Payload::Del(d) if d.uid == "uid-new"), "{p:?}");
        zt.ack("");
    }
    del.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_hello_is_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.sock");
    let server = ZdsServer::start(&path, Arc::new(Snap(Mutex::new(vec![])))).unwrap();
    let bad = FakeZtunnel::connect(&path);
    bad.send(&[0x08, 0x07]); // version 7
    let mut buf = [0u8; 16];
    let n = nix::sys::socket::recv(bad.0.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert_eq!(
        n, 0,
        "server must close a connection with an unknown version"
    );
    assert_eq!(server.connections(), 0);
    let good = FakeZtunnel::connect(&path);
    good.hello();
    assert!(matches!(good.next().0, Payload::SnapshotSent(_)));
}
