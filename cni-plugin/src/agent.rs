//! The node agent's enrollment state machine: which pods are in the mesh, and the ordered
//! steps that put them in and take them out.
//!
//! Enroll (from the plugin's `add`, or from a reconcile of the pod source):
//!   1. open the pod's netns (the CNI path, or found via `/proc`) — gone → clean error;
//!   2. install the in-pod rules — failure → whatever was installed is removed, error;
//!   3. record the pod (pending) so every ztunnel snapshot names it from now on;
//!   4. ZDS `Add` to the newest ztunnel, wait for the ack — failure → annotate `pending`,
//!      retryable error (rules stay: the pod is fail-closed, not unprotected);
//!   5. add the pod IPs to the host probe ipset; 6. annotate `enabled`.
//!
//! Unenroll (label removed, namespace left the mesh, pod terminated or deleted): probe
//! ipset entries, in-pod rules and routes, ZDS `Del` to every ztunnel, annotation.
//! Reconcile runs on every new snapshot from the pod source and every resync interval, and
//! retries pending pods (ztunnel may come back at any time), so every step is idempotent.
//! One operation runs at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    discover,
    enablement::{Decision, Policy, REDIRECTION_ANNOTATION},
    iptables::RuleBackend,
    netns::Netns,
    protocol::{Request, Response},
    redirect::PodOptions,
    source::{ClusterState, Pod, PodAnnotator},
    zds::{SnapshotEntry, SnapshotSource, Workload, ZdsServer},
};

/// Pod annotation that overrides DNS capture for one pod (`"true"`/`"false"`).
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";
/// Pod annotation for Istio's ingress mode: no inbound plaintext capture.
pub const BYPASS_INBOUND_ANNOTATION: &str = "ambient.istio.io/bypass-inbound-capture";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {pod}: {reason}")]
    Permanent { pod: String, reason: String },
    #[error("pod {pod}: {reason}")]
    Retryable { pod: String, reason: String },
}

impl EnrollError {
    pub fn retryable(&self) -> bool {
        matches!(self, EnrollError::Retryable { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Rules installed; ztunnel has not acked yet.
    Pending,
    /// Rules installed and ztunnel serving the pod.
    Enabled,
}

#[derive(Debug, Clone)]
struct Enrolled {
    pod: Pod,
    netns: Arc<Netns>,
    ips: Vec<IpAddr>,
    phase: Phase,
    /// Seen in the pod source since enrollment: only then does its absence mean "deleted".
    seen_in_source: bool,
}

/// Enrolled pods, shared with the ZDS server (which snapshots it for every new ztunnel).
#[derive(Debug, Default)]
pub struct Registry {
    pods: Mutex<BTreeMap<String, Enrolled>>,
    /// Pods annotated `enabled` whose netns the agent has not found (yet): named in the
    /// snapshot as `KeepWorkload`, so ztunnel keeps serving them instead of draining them.
    keep: Mutex<BTreeSet<String>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Enrolled>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// UIDs and phases, for status and tests.
    pub fn phases(&self) -> BTreeMap<String, Phase> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.phase))
            .collect()
    }
}

fn workload(pod: &Pod) -> Workload {
    Workload {
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
    }
}

impl SnapshotSource for Registry {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        let pods = self.lock();
        let mut out: Vec<SnapshotEntry> = pods
            .values()
            .map(|e| SnapshotEntry::Add(workload(&e.pod), e.netns.clone()))
            .collect();
        let keep = self.keep.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(
            keep.iter()
                .filter(|uid| !pods.contains_key(*uid))
                .map(|uid| SnapshotEntry::Keep(uid.clone())),
        );
        out
    }
}

/// Settings the agent needs (a projection of `Config`, so tests build it directly).
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub policy: Policy,
    pub dns_capture: bool,
    pub netns_prefix: PathBuf,
    pub proc_root: PathBuf,
}

pub struct Agent {
    settings: Settings,
    backend: Arc<dyn RuleBackend>,
    /// The pod source's latest snapshot (`mesh_rt::source`).
    state: watch::Receiver<Arc<ClusterState>>,
    annotator: Arc<dyn PodAnnotator>,
    zds: ZdsServer,
    host: Arc<Netns>,
    registry: Arc<Registry>,
    /// One enroll/unenroll/reconcile at a time.
    ops: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.settings.node_name)
            .finish_non_exhaustive()
    }
}

/// How long an ADD waits for the pod source to show a pod the plugin already saw.
const SOURCE_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs blocking rule work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("rule worker failed: {e}"))
}

impl Agent {
    /// Installs the host rules and returns the agent. `registry` must be the one the ZDS
    /// server snapshots.
    pub async fn new(
        settings: Settings,
        backend: Arc<dyn RuleBackend>,
        state: watch::Receiver<Arc<ClusterState>>,
        annotator: Arc<dyn PodAnnotator>,
        zds: ZdsServer,
        host: Arc<Netns>,
        registry: Arc<Registry>,
    ) -> Result<Agent, String> {
        let (b, h) = (backend.clone(), host.clone());
        blocking(move || b.apply_host(&h))
            .await?
            .map_err(|e| format!("installing the host probe rules: {e}"))?;
        Ok(Agent {
            settings,
            backend,
            state,
            annotator,
            zds,
            host,
            registry,
            ops: tokio::sync::Mutex::new(()),
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn pod_options(&self, pod: &Pod) -> PodOptions {
        let dns_capture = match pod
            .annotations
            .get(DNS_CAPTURE_ANNOTATION)
            .map(String::as_str)
        {
            Some("true") => true,
            Some("false") => false,
            _ => self.settings.dns_capture,
        };
        PodOptions {
            dns_capture,
            inbound_capture: pod
                .annotations
                .get(BYPASS_INBOUND_ANNOTATION)
                .is_none_or(|v| v != "true"),
        }
    }

    /// Handles one plugin request (the answer goes back on `cni.sock`).
    pub async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Add {
                pod_namespace,
                pod_name,
                pod_uid,
                netns,
                container_id,
                ips,
            } => {
                let key = format!("{pod_namespace}/{pod_name}");
                info!(pod = %key, %container_id, netns = %netns.display(), "CNI add");
                match self
                    .cni_add(&pod_namespace, &pod_name, pod_uid, &netns, ips)
                    .await
                {
                    Ok(()) => Response::ok(),
                    Err(e) => {
                        warn!(pod = %key, error = %e, retryable = e.retryable(), "enrollment failed");
                        Response::failed(e.to_string(), e.retryable())
                    }
                }
            }
        }
    }

    async fn cni_add(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<String>,
        netns_path: &Path,
        ips: Vec<IpAddr>,
    ) -> Result<(), EnrollError> {
        let key = format!("{namespace}/{name}");
        let permanent = |reason: String| EnrollError::Permanent {
            pod: key.clone(),
            reason,
        };
        // The plugin may have seen the pod (it reads the source directly) a moment before
        // the agent's snapshot has it; wait briefly for it rather than enrolling on a guess
        // (no labels, service account "default").
        let mut rx = self.state.clone();
        if rx.borrow().pod(namespace, name).is_none() {
            let _ = tokio::time::timeout(
                SOURCE_CATCH_UP,
                rx.wait_for(|s| s.pod(namespace, name).is_some()),
            )
            .await;
        }
        let state = rx.borrow().clone();
        // The agent's own view decides when it knows the pod (the plugin may have read the
        // labels just before they changed); a pod it does not know yet is taken on the
        // plugin's word and reconciled later.
        let verdict = state.pod(namespace, name).map(|p| {
            self.settings
                .policy
                .decide(p, state.namespace_labels(namespace))
        });
        if let Some(Decision::Skip(reason)) = verdict {
            info!(pod = %key, reason = reason.as_str(), "not enrolling: the pod is not ambient (any more)");
            return Ok(());
        }
        let mut pod = match state.pod(namespace, name) {
            Some(p) => p.clone(),
            None => Pod {
                uid: uid.clone().unwrap_or_default(),
                name: name.into(),
                namespace: namespace.into(),
                node_name: self.settings.node_name.clone(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                ips: Vec::new(),
                service_account: "default".into(),
                host_network: false,
                phase: String::new(),
            },
        };
        if let Some(uid) = uid.filter(|u| !u.is_empty()) {
            pod.uid = uid;
        }
        if pod.uid.is_empty() {
            return Err(permanent(
                "no pod UID (K8S_POD_UID unset and the pod source does not know the pod)".into(),
            ));
        }
        let relative = netns_path.strip_prefix("/").unwrap_or(netns_path);
        let path = if self.settings.netns_prefix.as_os_str().is_empty() {
            netns_path.to_path_buf()
        } else {
            self.settings.netns_prefix.join(relative)
        };
        let netns = Netns::open(&path).map_err(|e| permanent(e.to_string()))?;
        let ips = if ips.is_empty() { pod.ips.clone() } else { ips };
        let _op = self.ops.lock().await;
        self.enroll(pod, Arc::new(netns), ips).await
    }

    /// Steps 2–6 of enrollment (the caller holds `ops`).
    async fn enroll(
        &self,
        pod: Pod,
        netns: Arc<Netns>,
        ips: Vec<IpAddr>,
    ) -> Result<(), EnrollError> {
        let key = pod.key();
        let uid = pod.uid.clone();
        let opts = self.pod_options(&pod);
        let (b, n) = (self.backend.clone(), netns.clone());
        let applied = blocking(move || {
            let r = b.apply_pod(&n, opts);
            if r.is_err() {
                // Leave nothing half-installed behind.
                let _ = b.remove_pod(&n);
            }
            r.map_err(|e| e.to_string())
        })
        .await
        .and_then(|r| r);
        if let Err(reason) = applied {
            self.registry.lock().remove(&uid);
            return Err(EnrollError::Permanent {
                pod: key,
                reason: format!("installing the redirection rules: {reason}"),
            });
        }
        let seen = self
            .registry
            .lock()
            .get(&uid)
            .is_some_and(|e| e.seen_in_source);
        self.registry.lock().insert(
            uid.clone(),
            Enrolled {
                pod: pod.clone(),
                netns: netns.clone(),
                ips: ips.clone(),
                phase: Phase::Pending,
                seen_in_source: seen,
            },
        );
        self.complete(pod, netns, ips).await
    }

    /// Steps 4–6: hand the pod to ztunnel, probe ipset, annotation. Retried by reconcile
    /// for pending pods (their rules are already in).
    async fn complete(
        &self,
        pod: Pod,
        netns: Arc<Netns>,
        ips: Vec<IpAddr>,
    ) -> Result<(), EnrollError> {
        let key = pod.key();
        let uid = pod.uid.clone();
        if let Err(e) = self.zds.add(&workload(&pod), netns).await {
            let already = pod
                .annotations
                .get(REDIRECTION_ANNOTATION)
                .is_some_and(|v| v == "pending");
            let annotated = if already {
                Ok(())
            } else {
                self.annotator
                    .annotate(&pod, REDIRECTION_ANNOTATION, Some("pending"))
            };
            if let Err(ae) = annotated {
                warn!(pod = %key, error = %ae, "could not annotate the pod pending");
            }
            return Err(EnrollError::Retryable {
                pod: key,
                reason: format!("rules installed but ztunnel has not taken the pod: {e}"),
            });
        }
        for ip in &ips {
            let (b, h, ip, u) = (self.backend.clone(), self.host.clone(), *ip, uid.clone());
            let r = blocking(move || b.probe_add(&h, ip, &u).map_err(|e| e.to_string()))
                .await
                .and_then(|r| r);
            if let Err(reason) = r {
                return Err(EnrollError::Retryable {
                    pod: key,
                    reason: format!("adding {ip} to the probe ipset: {reason}"),
                });
            }
        }
        self.annotator
            .annotate(&pod, REDIRECTION_ANNOTATION, Some("enabled"))
            .map_err(|e| EnrollError::Retryable {
                pod: key.clone(),
                reason: e.to_string(),
            })?;
        if let Some(e) = self.registry.lock().get_mut(&uid) {
            e.phase = Phase::Enabled;
        }
        info!(pod = %key, %uid, "pod enrolled: rules installed, ztunnel acked");
        Ok(())
    }

    /// Takes a pod out of the mesh (the caller holds `ops`). Best effort, step by step.
    async fn unenroll(&self, uid: &str, why: &str) {
        let Some(e) = self.registry.lock().remove(uid) else {
            return;
        };
        let key = e.pod.key();
        for ip in &e.ips {
            let (b, h, ip, u) = (
                self.backend.clone(),
                self.host.clone(),
                *ip,
                uid.to_string(),
            );
            if let Ok(Err(err)) = blocking(move || b.probe_remove(&h, ip, &u)).await {
                warn!(pod = %key, %ip, error = %err, "removing the probe ipset entry failed");
            }
        }
        let (b, n) = (self.backend.clone(), e.netns.clone());
        match blocking(move || b.remove_pod(&n)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(pod = %key, error = %err, "removing the in-pod rules failed"),
            Err(err) => warn!(pod = %key, error = %err, "removing the in-pod rules failed"),
        }
        if let Err(err) = self.zds.del(uid).await {
            warn!(pod = %key, error = %err, "ztunnel did not ack the removal");
        }
        if let Err(err) = self
            .annotator
            .annotate(&e.pod, REDIRECTION_ANNOTATION, None)
        {
            debug!(pod = %key, error = %err, "removing the annotation failed");
        }
        info!(pod = %key, %uid, reason = why, "pod removed from the mesh");
    }

    /// Brings every pod of this node to the desired state of the source's latest snapshot.
    pub async fn reconcile(&self) {
        let _op = self.ops.lock().await;
        let state = self.state.borrow().clone();
        self.reconcile_with(&state).await;
    }

    async fn reconcile_with(&self, state: &ClusterState) {
        let node = &self.settings.node_name;
        let mine: Vec<&Pod> = state.pods.iter().filter(|p| p.node_name == *node).collect();
        for pod in &mine {
            let should = !pod.terminated()
                && self
                    .settings
                    .policy
                    .decide(pod, state.namespace_labels(&pod.namespace))
                    == Decision::Ambient;
            let current = {
                let mut reg = self.registry.lock();
                reg.get_mut(&pod.uid).map(|e| {
                    e.seen_in_source = true;
                    // A pod enrolled on the plugin's word gets the source's facts (service
                    // account, labels) for the next ZDS snapshot.
                    e.pod = (*pod).clone();
                    (e.phase, e.netns.clone(), e.ips.clone())
                })
            };
            match (should, current) {
                (true, Some((Phase::Enabled, _, _))) => {}
                (true, Some((Phase::Pending, netns, ips))) => {
                    if let Err(e) = self.complete((*pod).clone(), netns, ips).await {
                        debug!(pod = %pod.key(), error = %e, "still pending");
                    }
                }
                (true, None) => self.enroll_running(pod).await,
                (false, Some(_)) => {
                    let why = if pod.terminated() {
                        "pod terminated"
                    } else {
                        "no longer selected for the mesh"
                    };
                    self.unenroll(&pod.uid, why).await;
                }
                (false, None) => {}
            }
        }
        // Enabled pods we could not find a netns for: ztunnel must not drain them.
        let keep: BTreeSet<String> = {
            let reg = self.registry.lock();
            mine.iter()
                .filter(|p| {
                    !p.terminated()
                        && !reg.contains_key(&p.uid)
                        && p.annotations
                            .get(REDIRECTION_ANNOTATION)
                            .is_some_and(|v| v == "enabled")
                        && self
                            .settings
                            .policy
                            .decide(p, state.namespace_labels(&p.namespace))
                            == Decision::Ambient
                })
                .map(|p| p.uid.clone())
                .collect()
        };
        *self.registry.keep.lock().unwrap_or_else(|p| p.into_inner()) = keep;
        // Pods that were in the source and are gone: deleted.
        let gone: Vec<String> = self
            .registry
            .lock()
            .iter()
            .filter(|(uid, e)| e.seen_in_source && !mine.iter().any(|p| &p.uid == *uid))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.unenroll(&uid, "pod deleted").await;
        }
    }

    /// Enrolls a pod that is already running: its netns comes from a `/proc` scan.
    async fn enroll_running(&self, pod: &Pod) {
        if pod.ips.is_empty() {
            debug!(pod = %pod.key(), "no IP yet; enrolling later");
            return;
        }
        let (root, uid, ips, skip) = (
            self.settings.proc_root.clone(),
            pod.uid.clone(),
            pod.ips.clone(),
            self.host.id(),
        );
        let found = blocking(move || discover::find_pod_netns(&root, &uid, &ips, skip)).await;
        match found {
            Ok(Ok(Some(netns))) => {
                let r = self
                    .enroll(pod.clone(), Arc::new(netns), pod.ips.clone())
                    .await;
                if let Err(e) = r {
                    warn!(pod = %pod.key(), error = %e, "enrolling a running pod failed");
                    if let EnrollError::Permanent { .. } = e {
                        self.registry.lock().remove(&pod.uid);
                    } else if let Some(entry) = self.registry.lock().get_mut(&pod.uid) {
                        entry.seen_in_source = true;
                    }
                } else if let Some(entry) = self.registry.lock().get_mut(&pod.uid) {
                    entry.seen_in_source = true;
                }
            }
            Ok(Ok(None)) => debug!(pod = %pod.key(), "no process of the pod found yet"),
            Ok(Err(e)) => warn!(error = %e, "scanning /proc failed"),
            Err(e) => warn!(error = %e, "scanning /proc failed"),
        }
    }
}
