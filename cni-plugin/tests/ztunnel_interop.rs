//! Interop: our ZDS server with the real ztunnel binary in shared (in-pod) mode. ztunnel
//! runs in its own netns with no link to the pods and reaches them only through the netns
//! fds our server sends. Pins: snapshot → ztunnel binds 15001/15006/15008 inside the pod;
//! ztunnel killed → the pod's listeners vanish (fail closed); ztunnel restarted → snapshot
//! replayed and listeners back; a steady-state Add is acked; a Del drains that pod.
//!
//! Needs root and the ztunnel binary (built by `cargo test --workspace`, or
//! `cargo build -p ztunnel`); skips with a notice otherwise, unless MESH_REQUIRE_NETNS=1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs::File,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use cni_plugin::{
    netns::Netns,
    zds::{SnapshotEntry, SnapshotSource, Workload, ZdsServer},
};
use common::{Proc, TestNs, runnable, wait_until, ztunnel_bin};

struct Snap(Mutex<Vec<SnapshotEntry>>);
impl SnapshotSource for Snap {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.0.lock().unwrap().clone()
    }
}

fn workload(uid: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: "default".into(),
    }
}

fn listening(pod: &TestNs, port: u16) -> bool {
    pod.run(move || {
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
    })
}

fn start_ztunnel(bin: &Path, zt_ns: &TestNs, dir: &Path, sock: &Path, run: u32) -> (Proc, PathBuf) {
    let log = dir.join(format!("ztunnel-{run}.log"));
    let child = Command::new("ip")
        .args(["netns", "exec", &zt_ns.name])
        .arg(bin)
        .args(["--proxy-mode", "shared", "--node-name", "node-a"])
        .arg("--inpod-uds")
        .arg(sock)
        .arg("--local-xds-path")
        .arg(dir.join("config.yaml"))
        .arg("--local-ca-dir")
        .arg(dir.join("ca"))
        .env("RUST_LOG", "info")
        .stdout(File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    (Proc(child), log)
}

fn log_has(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ztunnel_gets_the_snapshot_and_it_is_replayed_after_a_restart() {
    if !runnable() {
        return;
    }
    let Some(bin) = ztunnel_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    std::fs::create_dir(&ca).unwrap();
    for (name, body) in mesh_tls::ca::LocalCa::generate_pem("cluster.local")
        .unwrap()
        .files()
    {
        std::fs::write(ca.join(name), body).unwrap();
    }
    std::fs::write(
        dir.path().join("config.yaml"),
        "workloads:
- {uid: uid-a, name: uid-a, namespace: default, serviceAccount: default, workloadIps: [10.212.0.1], protocol: HBONE, node: node-a}
- {uid: uid-b, name: uid-b, namespace: default, serviceAccount: default, workloadIps: [10.212.0.2], protocol: HBONE, node: node-a}
policies: []
",
    )
    .unwrap();
    let pod_a = TestNs::new("zpa");
    let pod_b = TestNs::new("zpb");
    let zt_ns = TestNs::new("zt");
    let sock = dir.path().join("ztunnel.sock");
    let snap = Arc::new(Snap(Mutex::new(vec![SnapshotEntry::Add(
        workload("uid-a"),
        Arc::new(Netns::open(&pod_a.path()).unwrap()),
    )])));
    let server = ZdsServer::start(&sock, snap.clone()).unwrap();
    let mut snaps = server.snapshots();

    assert!(
        !listening(&pod_a, 15001),
        "control: nothing listens before ztunnel"
    );
    let (zt, log) = start_ztunnel(&bin, &zt_ns, dir.path(), &sock, 1);
    tokio::time::timeout(Duration::from_secs(20), snaps.changed())
        .await
        .expect("no snapshot acked")
        .unwrap();
    wait_until(
        "ztunnel applied the snapshot",
        Duration::from_secs(20),
        || log_has(&log, "ZDS snapshot applied"),
    );
    for port in [15001, 15006, 15008] {
        wait_until(
            &format!("ztunnel listening on {port} in the pod"),
            Duration::from_secs(10),
            || listening(&pod_a, port),
        );
    }

    // ztunnel dies: nothing listens in the pod any more (with rules in place: refused).
    drop(zt);
    wait_until("listeners gone", Duration::from_secs(10), || {
        !listening(&pod_a, 15001)
    });
    wait_until(
        "server noticed the disconnect",
        Duration::from_secs(10),
        || server.connections() == 0,
    );
    let e = server
        .add(
            &workload("uid-b"),
            Arc::new(Netns::open(&pod_b.path()).unwrap()),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no ztunnel connection"), "{e}");

    // ztunnel restarts: the snapshot is replayed and the pod is served again.
    let (_zt, log) = start_ztunnel(&bin, &zt_ns, dir.path(), &sock, 2);
    tokio::time::timeout(Duration::from_secs(20), snaps.changed())
        .await
        .expect("snapshot not replayed")
        .unwrap();
    assert_eq!(*snaps.borrow(), 2);
    wait_until(
        "ztunnel re-applied the snapshot",
        Duration::from_secs(20),
        || log_has(&log, "ZDS snapshot applied"),
    );
    wait_until("pod served again", Duration::from_secs(10), || {
        listening(&pod_a, 15001)
    });

    // Steady state: Add pod b (acked only once ztunnel bound its listeners), then Del it.
    let netns_b = Arc::new(Netns::open(&pod_b.path()).unwrap());
    assert!(
        !listening(&pod_b, 15001),
        "control: pod b is not served yet"
    );
    server.add(&workload("uid-b"), netns_b).await.unwrap();
    assert!(
        listening(&pod_b, 15001),
        "Add acked but nothing listens in pod b"
    );
    server.del("uid-b").await.unwrap();
    wait_until("pod b drained", Duration::from_secs(15), || {
        !listening(&pod_b, 15001)
    });
    assert!(listening(&pod_a, 15001), "Del of b must not touch a");
}
