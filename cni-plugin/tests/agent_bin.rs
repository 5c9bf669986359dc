//! The `mesh-cni-agent` binary: bad configuration exits 64 naming every problem; as root it
//! starts against a test host netns (binds both sockets, installs the host probe rule) and
//! exits cleanly on SIGTERM, leaving the host rule in place (pods stay fail-closed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{Proc, TestNs, runnable, wait_until};

#[test]
fn bad_configuration_exits_64_naming_every_problem() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni-agent"))
        .env_clear()
        .args(["--install-cni", "false", "--resync-interval", "soon"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap rejects an unparsable flag value"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("duration"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni-agent"))
        .env_clear()
        .args(["--install-cni", "false"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NODE_NAME") && err.contains("POD_SOURCE_DIR"),
        "{err}"
    );
}

#[test]
fn starts_binds_installs_host_rule_and_stops_on_sigterm() {
    if !runnable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = TestNs::new("abin");
    std::fs::write(
        dir.path().join("cluster.yaml"),
        "namespaces: []\npods: []\n",
    )
    .unwrap();
    let (cni, zds) = (dir.path().join("cni.sock"), dir.path().join("ztunnel.sock"));
    let mut agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_mesh-cni-agent"))
            .env_clear()
            .arg("--node-name=node1")
            .arg(format!("--pod-source-dir={}", dir.path().display()))
            .arg(format!("--host-netns={}", host.path().display()))
            .arg(format!("--cni-socket={}", cni.display()))
            .arg(format!("--ztunnel-uds={}", zds.display()))
            .arg(format!("--proc-root={}", dir.path().display()))
            .args(["--install-cni=false", "--resync-interval=100ms"])
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("both sockets bound", Duration::from_secs(10), || {
        cni.exists() && zds.exists()
    });
    assert!(
        host.owned_rules(false)
            .iter()
            .any(|l| l.contains("--to-source 169.254.7.127"))
    );
    let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut status = None;
    wait_until("agent exit", Duration::from_secs(10), || {
        status = agent.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    assert!(
        !host.owned_rules(false).is_empty(),
        "host rule must stay on shutdown"
    );
}
