//! Helpers for the root-only network-namespace tests: uniquely named namespaces and
//! processes that are removed by name or PID on drop, and the skip rule (skip without root
//! unless MESH_REQUIRE_NETNS=1, as in CI).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    os::fd::AsFd,
    path::PathBuf,
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub fn runnable() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var("MESH_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("network-namespace tests need root (MESH_REQUIRE_NETNS=1 is set)");
    }
    eprintln!("SKIPPED: network-namespace tests need root");
    false
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace `mcni-<pid>-<n>-<tag>`, deleted (by that name) on drop.
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    pub fn new(tag: &str) -> TestNs {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("mcni-{}-{n}-{tag}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        TestNs { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut argv = vec!["ip", "netns", "exec", &self.name];
        argv.extend(args);
        let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Our chains, jumps and rules as `iptables-save` shows them (counters stripped).
    pub fn owned_rules(&self, v6: bool) -> Vec<String> {
        let save = self.exec(&[if v6 {
            "ip6tables-save"
        } else {
            "iptables-save"
        }]);
        cni_plugin::redirect::Saved::parse(&save).owned()
    }

    /// Runs `f` on a thread inside this namespace (sockets it creates stay there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap();
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair between two namespaces: `a` gets 10.<net>.0.1/24 (+ fd00:<net>::1/64),
/// `b` gets .2. The link dies with the namespaces.
pub fn link(a: &TestNs, b: &TestNs, net: u8) {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let (va, vb) = (
        format!("mc{}{n}a", std::process::id() % 100000),
        format!("mc{}{n}b", std::process::id() % 100000),
    );
    sh(&[
        "ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
        &b.name,
    ]);
    for (ns, dev, host) in [(a, &va, 1), (b, &vb, 2)] {
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("10.{net}.0.{host}/24"),
            "dev",
            dev,
        ]);
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("fd00:{net}::{host}/64"),
            "dev",
            dev,
            "nodad",
        ]);
        sh(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
    }
}

/// A child process killed (by PID) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// The ztunnel binary `cargo test --workspace` builds next to this test, or `None` (with a
/// SKIPPED line) when it is missing; under `MESH_REQUIRE_NETNS=1` a missing binary fails.
pub fn ztunnel_bin() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("ztunnel");
    if bin.exists() {
        return Some(bin);
    }
    if std::env::var("MESH_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!(
            "{} is missing; `cargo test --workspace` (or `cargo build -p ztunnel`) builds it",
            bin.display()
        );
    }
    eprintln!(
        "SKIPPED: {} not built (cargo build -p ztunnel)",
        bin.display()
    );
    None
}
