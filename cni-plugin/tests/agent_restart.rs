//! The agent binary restarting under a running ztunnel (real binaries, root): a pod that
//! was already running is found through `/proc` and enrolled without any CNI call; after an
//! agent crash and restart, ztunnel's new snapshot still names the pod — as `KeepWorkload`
//! while the agent cannot find its netns, as `AddWorkload` once it can — so ztunnel never
//! drains it, and re-applying the rules changes nothing.
//!
//! Needs root and the ztunnel binary; skips with a notice otherwise, unless
//! MESH_REQUIRE_NETNS=1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs::File,
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Proc, TestNs, link, runnable, wait_until, ztunnel_bin};

const UID: &str = "5d0c7a1e-1b2c-4d3e-8f90-a1b2c3d4e5f6";

fn listening(pod: &TestNs, port: u16) -> bool {
    pod.run(move || {
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .is_ok()
    })
}

fn annotation(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("source/annotations/foo.app-a.yaml")).unwrap_or_default()
}

fn start_agent(dir: &Path, host: &TestNs, run: u32) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_mesh-cni-agent"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .arg("--node-name=node1")
            .arg(format!("--pod-source-dir={}", dir.join("source").display()))
            .arg(format!("--host-netns={}", host.path().display()))
            .arg(format!("--cni-socket={}", dir.join("cni.sock").display()))
            .arg(format!(
                "--ztunnel-uds={}",
                dir.join("ztunnel.sock").display()
            ))
            .arg(format!("--proc-root={}", dir.join("proc").display()))
            .args(["--install-cni=false", "--resync-interval=100ms"])
            .stderr(File::create(dir.join(format!("agent-{run}.log"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn snapshots_applied(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("ZDS snapshot applied")
        .count()
}

#[test]
fn agent_restart_keeps_the_running_pod_served() {
    if !runnable() {
        return;
    }
    let Some(zt_bin) = ztunnel_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (host, pod, peer, zt_ns) = (
        TestNs::new("rh"),
        TestNs::new("rp"),
        TestNs::new("rq"),
        TestNs::new("rz"),
    );
    link(&pod, &peer, 225);
    std::fs::create_dir_all(d.join("source")).unwrap();
    std::fs::write(
        d.join("source/cluster.yaml"),
        format!("namespaces:\n- {{name: foo, labels: {{istio.io/dataplane-mode: ambient}}}}\npods:\n- {{uid: {UID}, name: app-a, namespace: foo, nodeName: node1, podIPs: [10.225.0.1]}}\n"),
    )
    .unwrap();
    // A fake /proc holding the pod's sandbox process.
    let proc_pid = d.join("proc/4242");
    let make_proc = || {
        std::fs::create_dir_all(proc_pid.join("ns")).unwrap();
        std::fs::write(
            proc_pid.join("cgroup"),
            format!("0::/kubepods/besteffort/pod{UID}/0123abcd\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(pod.path(), proc_pid.join("ns/net")).unwrap();
    };
    make_proc();
    std::fs::create_dir(d.join("ca")).unwrap();
    for (name, body) in mesh_tls::ca::LocalCa::generate_pem("cluster.local")
        .unwrap()
        .files()
    {
        std::fs::write(d.join("ca").join(name), body).unwrap();
    }
    std::fs::write(
        d.join("zt.yaml"),
        format!("workloads:\n- {{uid: {UID}, name: app-a, namespace: foo, serviceAccount: default, workloadIps: [10.225.0.1], protocol: HBONE, node: node1}}\npolicies: []\n"),
    )
    .unwrap();

    let agent = start_agent(d, &host, 1);
    let zt_log = d.join("ztunnel.log");
    let _zt = Proc(
        Command::new("ip")
            .args(["netns", "exec", &zt_ns.name])
            .arg(&zt_bin)
            .args(["--proxy-mode", "shared", "--node-name", "node1"])
            .arg("--inpod-uds")
            .arg(d.join("ztunnel.sock"))
            .arg("--local-xds-path")
            .arg(d.join("zt.yaml"))
            .arg("--local-ca-dir")
            .arg(d.join("ca"))
            .env("RUST_LOG", "info")
            .stdout(File::create(&zt_log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_until(
        "the running pod enabled without any CNI call",
        Duration::from_secs(20),
        || annotation(d).contains("enabled"),
    );
    wait_until("ztunnel serving the pod", Duration::from_secs(10), || {
        listening(&pod, 15001)
    });
    let rules = pod.owned_rules(false);
    assert!(
        rules.iter().any(|l| l.contains("--to-ports 15001")),
        "{rules:?}"
    );

    // The agent crashes, and comes back unable to find the pod's process (yet).
    drop(agent);
    std::fs::remove_dir_all(&proc_pid).unwrap();
    let before = snapshots_applied(&zt_log);
    let agent = start_agent(d, &host, 2);
    wait_until(
        "ztunnel reconnected and applied a new snapshot",
        Duration::from_secs(30),
        || snapshots_applied(&zt_log) > before,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        listening(&pod, 15001),
        "ztunnel drained the pod: the snapshot must Keep it"
    );
    let zt_text = std::fs::read_to_string(&zt_log).unwrap();
    assert!(!zt_text.contains("pod not in snapshot"), "{zt_text}");

    // The process is visible again: the agent takes the pod over (rules unchanged).
    make_proc();
    std::thread::sleep(Duration::from_millis(800));
    assert!(annotation(d).contains("enabled"));
    assert_eq!(
        pod.owned_rules(false),
        rules,
        "re-enrolling changed the rules"
    );
    assert!(listening(&pod, 15001));

    // And a further restart now sends the pod as an Add; still served.
    drop(agent);
    let before = snapshots_applied(&zt_log);
    let _agent = start_agent(d, &host, 3);
    wait_until("third snapshot", Duration::from_secs(30), || {
        snapshots_applied(&zt_log) > before
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(listening(&pod, 15001));
    assert_eq!(pod.owned_rules(false), rules);
}
