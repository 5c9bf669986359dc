//! Network-namespace tier for the whole node agent, run in-process, driven through the real
//! `mesh-cni` binary and (where needed) the real ztunnel binary in shared mode.
//!
//! Pins: an ambient pod created while ztunnel is down fails ADD with code 11, gets its
//! rules anyway and sends no plaintext; once ztunnel connects the pending pod is taken and
//! annotated `enabled`; ztunnel restarted → the agent replays its snapshot; the namespace
//! label removed → rules, routes, ipset entry and annotation removed and ztunnel told; a
//! non-ambient pod is untouched; a running pod is found through `/proc` (and a foreign
//! process in another netns is not mistaken for it); a netns that vanished mid-enroll
//! gives a clean error and leaves no rules behind; the plugin binary is installed and
//! chained into the conflist.
//!
//! Needs root; skips with a notice otherwise, unless MESH_REQUIRE_NETNS=1 (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs::File,
    io::{ErrorKind, Write},
    net::{IpAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use cni_plugin::{
    agent::Phase,
    app,
    config::{Config, Install},
    iptables::{IptablesRestore, RuleBackend, RuleError},
    netns::Netns,
    redirect::{Family, PodOptions},
    source::FilesSource,
};
use common::{Proc, TestNs, link, runnable, wait_until, ztunnel_bin};

const NODE: &str = "node1";

struct Lab {
    dir: tempfile::TempDir,
    host: TestNs,
    cfg: Config,
    /// Keeps the pod source running for the test (dropping it stops the source).
    _drain: mesh_rt::drain::DrainTrigger,
    drain: mesh_rt::drain::DrainWatcher,
}

impl Lab {
    fn new(install: bool) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let host = TestNs::new("host");
        let d = dir.path();
        let cfg = Config {
            node_name: NODE.into(),
            ztunnel_uds: d.join("ztunnel.sock"),
            cni_socket: d.join("cni.sock"),
            pod_source: cni_plugin::config::SourceKind::Files,
            kubeconfig: None,
            pod_source_dir: d.join("source"),
            host_netns: Some(host.path()),
            netns_prefix: PathBuf::new(),
            proc_root: d.join("proc"),
            dns_capture: true,
            families: vec![Family::V4, Family::V6],
            exclude_namespaces: vec!["kube-system".into()],
            mesh_namespace: "istio-system".into(),
            resync_interval: Duration::from_millis(200),
            install: install.then(|| Install {
                bin_dir: d.join("bin"),
                conf_dir: d.join("net.d"),
                plugin_binary: PathBuf::from(env!("CARGO_BIN_EXE_mesh-cni")),
            }),
            log: "info".into(),
        };
        std::fs::create_dir_all(&cfg.pod_source_dir).unwrap();
        std::fs::create_dir_all(&cfg.proc_root).unwrap();
        let (_drain, drain) = mesh_rt::drain::new();
        Lab {
            dir,
            host,
            cfg,
            _drain,
            drain,
        }
    }

    /// Writes `cluster.yaml`: namespace `foo` (ambient or not) and pods (name, uid, ip).
    fn cluster(&self, ambient: bool, pods: &[(&str, &str, &str)]) {
        let label = if ambient {
            "{istio.io/dataplane-mode: ambient}"
        } else {
            "{}"
        };
        let mut y = format!("namespaces:\n- name: foo\n  labels: {label}\npods:\n");
        for (name, uid, ip) in pods {
            y.push_str(&format!(
                "- {{uid: {uid}, name: {name}, namespace: foo, nodeName: {NODE}, podIPs: [{ip}], serviceAccountName: sa-{name}}}\n"
            ));
        }
        cni_plugin::source::write_atomic(
            &self.cfg.pod_source_dir.join("cluster.yaml"),
            y.as_bytes(),
        )
        .unwrap();
    }

    fn annotation(&self, name: &str) -> Option<String> {
        let src = FilesSource::new(&self.cfg.pod_source_dir);
        src.load()
            .unwrap()
            .pod("foo", name)
            .and_then(|p| p.annotations.get("ambient.istio.io/redirection").cloned())
    }

    async fn start(&self) -> app::Running {
        let backend = Arc::new(IptablesRestore {
            families: self.cfg.families.clone(),
        });
        self.start_with(backend).await
    }

    /// Starts the agent with the files source, as the lab's agents run.
    async fn start_with(
        &self,
        backend: Arc<dyn cni_plugin::iptables::RuleBackend>,
    ) -> app::Running {
        let files = FilesSource::new(&self.cfg.pod_source_dir);
        let state = mesh_rt::source::subscribe(files.clone(), self.drain.clone())
            .await
            .unwrap();
        app::start(&self.cfg, backend, state, Arc::new(files))
            .await
            .unwrap()
    }

    /// Runs the plugin's ADD like a runtime would; returns (exit code, stdout).
    fn cni_add(&self, name: &str, uid: &str, netns: &Path, ip: &str) -> (i32, String) {
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"podnet","type":"mesh-cni","agent_socket":{sock:?},"agent_timeout_seconds":10,"pod_source_dir":{src:?},"prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"{ip}/24"}}]}}}}"#,
            sock = self.cfg.cni_socket.display().to_string(),
            src = self.cfg.pod_source_dir.display().to_string(),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("cid-{uid}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=foo;K8S_POD_NAME={name};K8S_POD_UID={uid}"
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        // The plugin blocks on the agent, which runs on this test's runtime threads.
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
        )
    }

    fn ipset(&self) -> String {
        self.host.exec(&["ipset", "save", "istio-inpod-probes-v4"])
    }
}

async fn cni_add(
    lab: &Arc<Lab>,
    name: &'static str,
    uid: &'static str,
    netns: PathBuf,
    ip: &'static str,
) -> (i32, String) {
    let lab = lab.clone();
    tokio::task::spawn_blocking(move || lab.cni_add(name, uid, &netns, ip))
        .await
        .unwrap()
}

fn start_ztunnel(bin: &Path, lab: &Lab, zt_ns: &TestNs, run: u32) -> (Proc, PathBuf) {
    let d = lab.dir.path();
    if !d.join("ca").exists() {
        std::fs::create_dir(d.join("ca")).unwrap();
        for (name, body) in mesh_tls::ca::LocalCa::generate_pem("cluster.local")
            .unwrap()
            .files()
        {
            std::fs::write(d.join("ca").join(name), body).unwrap();
        }
        std::fs::write(
            d.join("zt.yaml"),
            format!(
                "workloads:\n- {{uid: uid-a, name: app-a, namespace: foo, serviceAccount: sa-app-a, workloadIps: [10.221.0.1], protocol: HBONE, node: {NODE}}}\npolicies: []\n"
            ),
        )
        .unwrap();
    }
    let log = d.join(format!("ztunnel-{run}.log"));
    let child = Command::new("ip")
        .args(["netns", "exec", &zt_ns.name])
        .arg(bin)
        .args(["--proxy-mode", "shared", "--node-name", NODE])
        .arg("--inpod-uds")
        .arg(&lab.cfg.ztunnel_uds)
        .arg("--local-xds-path")
        .arg(d.join("zt.yaml"))
        .arg("--local-ca-dir")
        .arg(d.join("ca"))
        .env("RUST_LOG", "info")
        .stdout(File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    (Proc(child), log)
}

fn listening(pod: &TestNs, port: u16) -> bool {
    pod.run(move || {
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .is_ok()
    })
}

/// Did `l` accept a connection within `d`?
fn accepted(l: &TcpListener, d: Duration) -> bool {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        match l.accept() {
            Ok(_) => return true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    false
}

async fn wait_async(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_closed_without_ztunnel_then_enrolled_replayed_and_removed() {
    if !runnable() {
        return;
    }
    let Some(zt_bin) = ztunnel_bin() else { return };
    let lab = Arc::new(Lab::new(true));
    let pod = TestNs::new("pa");
    let peer = TestNs::new("peer");
    link(&pod, &peer, 221);
    let zt_ns = TestNs::new("zt");
    lab.cluster(true, &[("app-a", "uid-a", "10.221.0.1")]);
    let running = lab.start().await;

    // Installed and chained (the primary CNI config appears after the agent started).
    let conf_dir = lab.cfg.install.as_ref().unwrap().conf_dir.clone();
    assert!(
        lab.cfg
            .install
            .as_ref()
            .unwrap()
            .bin_dir
            .join("mesh-cni")
            .exists()
    );
    std::fs::write(
        conf_dir.join("10-podnet.conflist"),
        r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    wait_async("conflist chained", Duration::from_secs(5), || {
        std::fs::read_to_string(conf_dir.join("10-podnet.conflist"))
            .unwrap_or_default()
            .contains("mesh-cni")
    })
    .await;

    // ztunnel is down: ADD fails with "try again later", and nothing leaves the pod.
    let app = peer.run(|| TcpListener::bind("10.221.0.2:8080").unwrap());
    let (code, out) = cni_add(&lab, "app-a", "uid-a", pod.path(), "10.221.0.1").await;
    assert_ne!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["code"], 11, "{out}");
    assert!(
        v["msg"].as_str().unwrap().contains("no ztunnel connection"),
        "{out}"
    );
    assert!(
        pod.owned_rules(false)
            .iter()
            .any(|l| l.contains("--to-ports 15001")),
        "fail closed: rules stay"
    );
    let refused = pod.run(|| {
        TcpStream::connect_timeout(&"10.221.0.2:8080".parse().unwrap(), Duration::from_secs(1))
    });
    assert!(refused.is_err(), "the pod reached the app without ztunnel");
    assert!(
        !accepted(&app, Duration::from_millis(300)),
        "plaintext left the pod"
    );
    assert_eq!(lab.annotation("app-a").as_deref(), Some("pending"));
    assert_eq!(
        running.agent.registry().phases().get("uid-a"),
        Some(&Phase::Pending)
    );

    // ztunnel comes: the reconcile loop retries the pending pod; ztunnel serves it.
    let (zt, log) = start_ztunnel(&zt_bin, &lab, &zt_ns, 1);
    wait_async("pod enabled", Duration::from_secs(20), || {
        lab.annotation("app-a").as_deref() == Some("enabled")
    })
    .await;
    assert_eq!(
        running.agent.registry().phases().get("uid-a"),
        Some(&Phase::Enabled)
    );
    assert!(
        lab.ipset().contains("10.221.0.1 comment \"uid-a\""),
        "{}",
        lab.ipset()
    );
    wait_async(
        "ztunnel listening in the pod",
        Duration::from_secs(10),
        || listening(&pod, 15001),
    )
    .await;
    // The kubelet's retry now succeeds and prints prevResult.
    let (code, out) = cni_add(&lab, "app-a", "uid-a", pod.path(), "10.221.0.1").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        r#"{"cniVersion":"1.0.0","ips":[{"address":"10.221.0.1/24"}]}"#
    );

    // ztunnel restarts: the agent replays its snapshot to the new connection.
    drop(zt);
    wait_async(
        "listeners gone with ztunnel",
        Duration::from_secs(10),
        || !listening(&pod, 15001),
    )
    .await;
    let mut snaps = running.zds.snapshots();
    let before = *snaps.borrow_and_update();
    let (_zt, log2) = start_ztunnel(&zt_bin, &lab, &zt_ns, 2);
    tokio::time::timeout(Duration::from_secs(20), snaps.changed())
        .await
        .expect("snapshot not replayed")
        .unwrap();
    assert!(*snaps.borrow() > before);
    wait_async(
        "pod served again after the restart",
        Duration::from_secs(10),
        || listening(&pod, 15001),
    )
    .await;
    let log2_text = std::fs::read_to_string(&log2).unwrap();
    assert!(log2_text.contains("pod enrolled"), "{log2_text}");
    drop(log);

    // The namespace leaves the mesh: everything of ours goes, ztunnel drains the pod.
    lab.cluster(false, &[("app-a", "uid-a", "10.221.0.1")]);
    // Unenroll ends with the annotation; everything before it must be gone by then.
    wait_async("annotation removed", Duration::from_secs(10), || {
        lab.annotation("app-a").is_none()
    })
    .await;
    assert!(
        pod.owned_rules(false).is_empty(),
        "{:?}",
        pod.owned_rules(false)
    );
    assert!(
        pod.owned_rules(true).is_empty(),
        "{:?}",
        pod.owned_rules(true)
    );
    assert_eq!(pod.exec(&["ip", "rule", "show", "pref", "32764"]), "");
    assert_eq!(pod.exec(&["ip", "-6", "rule", "show", "pref", "32764"]), "");
    assert!(!lab.ipset().contains("10.221.0.1"));
    wait_async("ztunnel drained the pod", Duration::from_secs(15), || {
        !listening(&pod, 15001)
    })
    .await;
    assert!(running.agent.registry().phases().is_empty());
    let _direct = pod
        .run(|| {
            TcpStream::connect_timeout(&"10.221.0.2:8080".parse().unwrap(), Duration::from_secs(2))
        })
        .unwrap();
    assert!(
        accepted(&app, Duration::from_secs(2)),
        "unenrolled pod reaches the app directly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_ambient_pod_is_untouched_and_vanished_netns_is_a_clean_error() {
    if !runnable() {
        return;
    }
    let lab = Arc::new(Lab::new(false));
    let pod = TestNs::new("pn");
    lab.cluster(false, &[("app-n", "uid-n", "10.222.0.1")]);
    let running = lab.start().await;
    let (code, out) = cni_add(&lab, "app-n", "uid-n", pod.path(), "10.222.0.1").await;
    assert_eq!(code, 0, "{out}");
    assert!(
        pod.owned_rules(false).is_empty() && pod.owned_rules(true).is_empty(),
        "a non-ambient pod got rules"
    );
    assert!(running.agent.registry().phases().is_empty());
    // Even if asked directly (a plugin that read the labels just before they changed), the
    // agent goes by its own view and leaves the pod alone.
    let req = cni_plugin::protocol::Request::Add {
        pod_namespace: "foo".into(),
        pod_name: "app-n".into(),
        pod_uid: Some("uid-n".into()),
        netns: pod.path(),
        container_id: "c".into(),
        ips: vec!["10.222.0.1".parse().unwrap()],
    };
    let sock = lab.cfg.cni_socket.clone();
    tokio::task::spawn_blocking(move || {
        cni_plugin::protocol::call(&sock, &req, Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        pod.owned_rules(false).is_empty(),
        "the agent enrolled a non-ambient pod"
    );
    assert!(running.agent.registry().phases().is_empty());

    // An ambient pod whose sandbox netns is gone by the time the agent opens it.
    lab.cluster(true, &[("app-v", "uid-v", "10.222.0.9")]);
    let gone = TestNs::new("gone");
    let path = gone.path();
    drop(gone);
    let (code, out) = cni_add(&lab, "app-v", "uid-v", path.clone(), "10.222.0.9").await;
    assert_ne!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["msg"].as_str().unwrap().contains("is gone"), "{out}");
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .contains(&path.display().to_string()),
        "{out}"
    );
    assert!(running.agent.registry().phases().is_empty());
    assert!(!lab.ipset().contains("10.222.0.9"));
}

/// Applies the rules, then fails — as if the netns went away half-way through.
struct FailsAfterApplying(IptablesRestore);

impl RuleBackend for FailsAfterApplying {
    fn apply_pod(&self, netns: &Netns, opts: PodOptions) -> Result<(), RuleError> {
        self.0.apply_pod(netns, opts)?;
        Err(RuleError::Failed {
            cmd: "ip6tables-restore --noflush".into(),
            netns: netns.path().display().to_string(),
            status: "exit status: 1".into(),
            stderr: "simulated failure after the v4 rules were in".into(),
        })
    }
    fn remove_pod(&self, netns: &Netns) -> Result<(), RuleError> {
        self.0.remove_pod(netns)
    }
    fn apply_host(&self, host: &Netns) -> Result<(), RuleError> {
        self.0.apply_host(host)
    }
    fn probe_add(&self, host: &Netns, ip: IpAddr, uid: &str) -> Result<(), RuleError> {
        self.0.probe_add(host, ip, uid)
    }
    fn probe_remove(&self, host: &Netns, ip: IpAddr, uid: &str) -> Result<(), RuleError> {
        self.0.probe_remove(host, ip, uid)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_mid_enroll_leaves_no_rules_behind() {
    if !runnable() {
        return;
    }
    let lab = Arc::new(Lab::new(false));
    let pod = TestNs::new("pf");
    lab.cluster(true, &[("app-f", "uid-f", "10.223.0.1")]);
    let backend = Arc::new(FailsAfterApplying(IptablesRestore {
        families: lab.cfg.families.clone(),
    }));
    let running = lab.start_with(backend).await;
    let (code, out) = cni_add(&lab, "app-f", "uid-f", pod.path(), "10.223.0.1").await;
    assert_ne!(code, 0);
    assert!(out.contains("simulated failure"), "{out}");
    assert!(
        pod.owned_rules(false).is_empty(),
        "partial rules left: {:?}",
        pod.owned_rules(false)
    );
    assert_eq!(pod.exec(&["ip", "rule", "show", "pref", "32764"]), "");
    assert!(running.agent.registry().phases().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_pod_is_found_through_proc_and_a_visitor_is_not_mistaken_for_it() {
    if !runnable() {
        return;
    }
    let lab = Arc::new(Lab::new(false));
    let pod = TestNs::new("pr");
    let peer = TestNs::new("prp");
    link(&pod, &peer, 224);
    let visitor = TestNs::new("vis");
    let uid = "72f7f152-440c-4d7e-a2b0-3b3a7f0c8d1e";
    // A fake /proc: pid 10 is a process of the pod but in a netns without its IP (not the
    // pod); pid 20 is the pod's sandbox.
    for (pid, ns) in [(10, &visitor), (20, &pod)] {
        let d = lab.cfg.proc_root.join(pid.to_string());
        std::fs::create_dir_all(d.join("ns")).unwrap();
        std::fs::write(
            d.join("cgroup"),
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-abc.scope\n", uid.replace('-', "_")),
        )
        .unwrap();
        std::os::unix::fs::symlink(ns.path(), d.join("ns/net")).unwrap();
    }
    // The pod is ambient from the start: the agent enrolls it without any CNI call.
    let y = format!(
        "namespaces:\n- name: foo\n  labels: {{istio.io/dataplane-mode: ambient}}\npods:\n- {{uid: {uid}, name: app-r, namespace: foo, nodeName: {NODE}, podIPs: [10.224.0.1]}}\n- {{uid: other, name: elsewhere, namespace: foo, nodeName: node2, podIPs: [10.9.9.9]}}\n"
    );
    cni_plugin::source::write_atomic(&lab.cfg.pod_source_dir.join("cluster.yaml"), y.as_bytes())
        .unwrap();
    let running = lab.start().await;
    wait_async("running pod enrolled", Duration::from_secs(10), || {
        running.agent.registry().phases().contains_key(uid)
    })
    .await;
    assert!(
        pod.owned_rules(false)
            .iter()
            .any(|l| l.contains("--to-ports 15006"))
    );
    assert!(
        visitor.owned_rules(false).is_empty(),
        "the visitor's netns got rules"
    );
    assert!(
        !running.agent.registry().phases().contains_key("other"),
        "a pod of another node was enrolled"
    );
    // No ztunnel: the pod is pending (and fail-closed), not enabled.
    assert_eq!(
        running.agent.registry().phases().get(uid),
        Some(&Phase::Pending)
    );
    wait_until("pending annotation", Duration::from_secs(5), || {
        lab.annotation("app-r").as_deref() == Some("pending")
    });
}
