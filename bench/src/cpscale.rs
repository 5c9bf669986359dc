//! Control-plane scale: istiod-lite (the release binary, its own process) holding `pods` pods
//! and `services` services from a manifest directory, with `clients` real ztunnel xDS
//! clients (`ztunnel::xds::XdsClient`, in this process) subscribed over TLS with their own
//! tokens. Reports the initial sync, then the latency of one pod change reaching every
//! client, and istiod-lite's CPU time and memory (from `/proc`).
//!
//! The change is made on disk (one manifest file replaced atomically), so each latency also
//! contains istiod-lite's directory poll (`--manifests-poll`, reported as `poll_ms`).

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::json;
use ztunnel::{
    config::ControlPlane,
    controlplane::Credentials,
    state::{State, StateStore},
    xds::{NodeInfo, XdsClient},
};

pub struct Params {
    pub istiod_bin: PathBuf,
    pub pods: usize,
    pub services: usize,
    pub clients: usize,
    pub poll: Duration,
}

const NAMESPACES: usize = 50;
const GRPC_PORT: u16 = 25012;

fn pod_ip(j: usize) -> String {
    format!("10.{}.{}.{}", 16 + j / 65536, (j / 256) % 256, j % 256)
}

fn pod_doc(j: usize, services: usize, ip: &str) -> String {
    let s = j % services;
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{j}, namespace: ns-{ns}, uid: uid-{j}, labels: {{app: svc-{s}}}}}\n\
         spec: {{nodeName: node-{node}, serviceAccountName: sa-{s}, containers: [{{name: app, image: app}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: \"True\"}}]}}\n",
        ns = s % NAMESPACES,
        node = j % 100,
    )
}

/// Writes the manifests; returns the file holding pod 0 (the one the benchmark changes).
fn write_manifests(dir: &Path, pods: usize, services: usize) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut ns = String::new();
    for n in 0..NAMESPACES {
        ns.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n"
        ));
    }
    std::fs::write(dir.join("00-namespaces.yaml"), ns)?;
    let mut svc = String::new();
    for s in 0..services {
        svc.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\n\
             spec: {{clusterIP: 10.96.{a}.{b}, selector: {{app: svc-{s}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n",
            ns = s % NAMESPACES,
            a = s / 256,
            b = s % 256,
        ));
    }
    std::fs::write(dir.join("01-services.yaml"), svc)?;
    for (chunk, start) in (1..pods).step_by(1000).enumerate() {
        let mut body = String::new();
        for j in start..(start + 1000).min(pods) {
            body.push_str(&pod_doc(j, services, &pod_ip(j)));
            body.push_str("---\n");
        }
        std::fs::write(dir.join(format!("10-pods-{chunk:03}.yaml")), body)?;
    }
    let changed = dir.join("20-pod-0.yaml");
    std::fs::write(&changed, pod_doc(0, services, &pod_ip(0)))?;
    Ok(changed)
}

/// (utime + stime in ms, VmRSS KiB, VmHWM KiB) of `pid`.
fn proc_usage(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" of the command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = 100; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks * 1000 / hz, kib("VmRSS:"), kib("VmHWM:")))
}

struct Istiod {
    child: Child,
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn wait_all(
    stores: &[StateStore],
    t0: Instant,
    timeout: Duration,
    done: impl Fn(&State) -> bool,
) -> anyhow::Result<Vec<f64>> {
    let mut at: Vec<Option<f64>> = vec![None; stores.len()];
    while at.iter().any(Option::is_none) {
        if t0.elapsed() > timeout {
            let n = at.iter().filter(|x| x.is_some()).count();
            bail!(
                "only {n} of {} clients got there within {timeout:?}",
                stores.len()
            );
        }
        for (i, s) in stores.iter().enumerate() {
            if at[i].is_none() && s.read(&done) {
                at[i] = Some(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut v: Vec<f64> = at.into_iter().flatten().collect();
    v.sort_by(f64::total_cmp);
    Ok(v)
}

pub async fn run(p: Params) -> anyhow::Result<serde_json::Value> {
    let work = std::env::temp_dir().join(format!("mesh-cpscale-{}", std::process::id()));
    let _cleanup = Cleanup(work.clone());
    let manifests = work.join("manifests");
    let t = Instant::now();
    let changed = write_manifests(&manifests, p.pods, p.services)?;
    eprintln!("manifests written in {:?}", t.elapsed());
    let tokens = work.join("tokens.yaml");
    let mut f = std::fs::File::create(&tokens)?;
    for c in 0..p.clients {
        writeln!(
            f,
            "- {{token: tok-{c}, serviceAccount: istio-system/ztunnel, node: node-{}}}",
            c % 100
        )?;
        std::fs::write(work.join(format!("tok-{c}")), format!("tok-{c}"))?;
    }
    drop(f);
    let ca = work.join("ca");
    std::fs::create_dir_all(&ca)?;
    let grpc: SocketAddr = ([127, 0, 0, 1], GRPC_PORT).into();
    let log = std::fs::File::create(work.join("istiod.log"))?;
    let t_start = Instant::now();
    let child = Command::new(&p.istiod_bin)
        .arg("--manifests")
        .arg(&manifests)
        .arg("--ca-dir")
        .arg(&ca)
        .arg("--static-tokens")
        .arg(&tokens)
        .args([
            "--grpc-addr",
            &grpc.to_string(),
            "--monitor-addr",
            "127.0.0.1:0",
        ])
        .args(["--manifests-poll", &format!("{}ms", p.poll.as_millis())])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", p.istiod_bin.display()))?;
    let istiod = Istiod { child };
    let pid = istiod.child.id();
    let root = ca.join("root-cert.pem");
    while !(root.exists() && tokio::net::TcpStream::connect(grpc).await.is_ok()) {
        if t_start.elapsed() > Duration::from_secs(120) {
            bail!(
                "istiod-lite did not come up; see {}",
                work.join("istiod.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let startup_ms = t_start.elapsed().as_millis();
    let (cpu_idle, rss_idle, _) = proc_usage(pid)?;

    let endpoint = ControlPlane {
        address: format!("https://{grpc}"),
        authority: grpc.to_string(),
        server_name: "istiod.istio-system.svc".into(),
        root_ca: root.clone(),
    };
    let (_trigger, drain) = mesh_rt::drain::new();
    let mut stores = Vec::new();
    let mut synced_rx = Vec::new();
    let t_sync = Instant::now();
    for c in 0..p.clients {
        let state = StateStore::new(State::default());
        let (synced, rx) = tokio::sync::watch::channel(false);
        synced_rx.push(rx);
        let client = XdsClient {
            endpoint: endpoint.clone(),
            credentials: Credentials {
                token_path: work.join(format!("tok-{c}")),
                cluster_id: "Kubernetes".into(),
            },
            node: NodeInfo {
                instance_ip: "127.0.0.1".into(),
                pod_name: format!("ztunnel-{c}"),
                pod_namespace: "istio-system".into(),
                node_name: format!("node-{}", c % 100),
                cluster_id: "Kubernetes".into(),
            },
            state: state.clone(),
            synced,
        };
        tokio::spawn(client.run(drain.clone()));
        stores.push(state);
    }
    let want = p.pods;
    let sync = wait_all(&stores, t_sync, Duration::from_secs(300), |s| {
        s.workloads().count() >= want
    })
    .await?;
    let (cpu_synced, rss_synced, _) = proc_usage(pid)?;
    eprintln!(
        "initial sync of {} clients: max {:.0} ms",
        p.clients,
        sync.last().unwrap_or(&0.0)
    );

    // One change: pod 0 moves to a new IP.
    let new_ip = "10.250.0.1";
    let mut rounds = Vec::new();
    for round in 0..5 {
        let ip = if round % 2 == 0 {
            new_ip.to_owned()
        } else {
            pod_ip(0)
        };
        let tmp = changed.with_extension("tmp");
        std::fs::write(&tmp, pod_doc(0, p.services, &ip))?;
        let target: std::net::IpAddr = ip.parse()?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, &changed)?;
        let lat = wait_all(&stores, t0, Duration::from_secs(60), |s| {
            s.workload_by_ip("", target).is_some()
        })
        .await?;
        rounds.push(lat);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (cpu_end, rss_end, hwm) = proc_usage(pid)?;
    let mut all: Vec<f64> = rounds.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let per_round_max: Vec<f64> = rounds.iter().map(|r| *r.last().unwrap_or(&0.0)).collect();
    drop(istiod);
    Ok(json!({
        "scenario": "cp-scale",
        "pods": p.pods,
        "services": p.services,
        "clients": p.clients,
        "poll_ms": p.poll.as_millis() as u64,
        "istiod_startup_ms": startup_ms,
        "initial_sync_ms": {"p50": percentile(&sync, 0.5), "max": percentile(&sync, 1.0)},
        "push_latency_ms": {
            "p50": percentile(&all, 0.5), "p99": percentile(&all, 0.99), "max": percentile(&all, 1.0),
            "per_round_max": per_round_max,
        },
        "istiod_cpu_ms": {"startup_and_load": cpu_idle, "initial_sync": cpu_synced - cpu_idle, "five_changes": cpu_end - cpu_synced},
        "istiod_rss_kib": {"loaded_no_clients": rss_idle, "after_sync": rss_synced, "end": rss_end, "peak": hwm},
    }))
}

/// Removes the work directory (ours, by exact path) on every exit.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
