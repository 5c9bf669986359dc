//! Waypoint deployment: for every Gateway of class `istio-waypoint`, a ServiceAccount, a
//! Deployment and a Service named like the Gateway and owned by it, plus the Gateway's status,
//! as istiod's Gateway deployment controller does (waypoint-semantics.md §1.1; the facts of
//! Istio's `waypoint` template: labels, ports, owner references).
//!
//! ```text
//!  Gateway watch (k8s.rs) ─► watch<Arc<Index>> ─┐
//!  owned SA/Deployment/Service watches ─────────┼─► one reconcile task ─► SSA apply (istiod-lite)
//!  retries (backoff), resync every 5 min ───────┘                      └► SSA apply gateways/status
//! ```
//!
//! - Everything is written with server-side apply, field manager [`FIELD_MANAGER`], forced:
//!   the fields we set are ours; fields others add (HPA replicas, annotations) are kept.
//! - A Gateway is reconciled when it changes, when one of its objects changes or disappears
//!   (their watches select the `gateway.networking.k8s.io/gateway-name` label), after a
//!   failure (backoff 1 s doubling to 60 s) and at every resync. Objects are re-applied only
//!   when what we would write changed, or when the object the API server holds is not the
//!   one our last apply returned (someone edited or deleted it).
//! - Status: `Accepted` is True (reason `Accepted`) for every waypoint Gateway we deploy.
//!   `Programmed` is True (reason `Programmed`, "Resource programmed, assigned to service(s)
//!   `<svc>.<ns>.svc.<suffix>:15008`") as soon as the waypoint Service exists with a ClusterIP,
//!   and `addresses` then hold the Service's hostname and ClusterIP; until then `Programmed`
//!   is False with reason `AddressNotAssigned` and no addresses. It does not wait for a ready
//!   pod (as istiod, the address is the Service's); ztunnels bind to the waypoint once
//!   `addresses` are set ([`crate::waypoint`]). Status is written only when it differs from
//!   what the Gateway shows, and `lastTransitionTime` is kept while a condition's status holds.
//! - Deleting the Gateway deletes its objects through their owner references (the API
//!   server's garbage collector); nothing here deletes.
//! - Failures are logged with the Gateway and object names and retried; they never stop the
//!   control plane or the other Gateways.
//! - The mesh root is published as ConfigMap `istio-ca-root-cert` in the root namespace (for
//!   ztunnel) and in every namespace with a waypoint.

use std::{
    collections::{BTreeMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use mesh_rt::drain::DrainWatcher;
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, time::Instant};
use tracing::{Instrument, debug, info, info_span, warn};

mod render;

pub use render::{
    CONTROLLER_LABEL, FIELD_MANAGER, GATEWAY_CLASS_LABEL, MANAGED_LABEL, NAME_OVERRIDE,
    ROOT_CERT_CONFIGMAP, Rendered, SERVICE_ACCOUNT_OVERRIDE, Settings, desired_status, render,
};
use render::{status_body, status_matches};

use crate::{
    index::Index,
    k8s::GATEWAY_GROUP,
    waypoint::{GATEWAY_NAME_LABEL, Gateway, WAYPOINT_CLASS},
};

const RESYNC: Duration = Duration::from_secs(300);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("Gateway {gateway}: {reason}")]
    Render { gateway: String, reason: String },
    #[error(
        "applying {kind} {object} for Gateway {gateway}: {source} (check that istiod-lite's ClusterRole allows get and patch on {kind}s, and that the namespace exists)"
    )]
    Apply {
        gateway: String,
        kind: &'static str,
        object: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "writing the status of Gateway {gateway}: {source} (check that istiod-lite's ClusterRole allows patch on gateways/status)"
    )]
    Status {
        gateway: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "the Gateway API is not served by the API server (install manifests/crds/gateway.networking.k8s.io.yaml)"
    )]
    NoGatewayApi,
    #[error("API discovery: {0}")]
    Discovery(String),
}

/// The kinds deployed per Gateway and watched for drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Owned {
    ServiceAccount,
    Deployment,
    Service,
}

impl Owned {
    fn kind(self) -> &'static str {
        match self {
            Owned::ServiceAccount => "ServiceAccount",
            Owned::Deployment => "Deployment",
            Owned::Service => "Service",
        }
    }
}

/// What the watches of owned objects report.
#[derive(Debug)]
enum Event {
    /// An owned object now has this resourceVersion (None: deleted). `cluster_ip` for Services.
    Owned {
        kind: Owned,
        namespace: String,
        name: String,
        gateway: String,
        rv: Option<String>,
        cluster_ip: Option<String>,
    },
    /// A (re)list completed: anything may have changed meanwhile.
    Resync,
}

#[derive(Debug, Clone, Default)]
struct Observed {
    rv: Option<String>,
    cluster_ip: Option<String>,
}

#[derive(Debug, Default)]
struct GatewayState {
    /// Debug fingerprint of the Gateway last reconciled.
    seen: u64,
    /// Fingerprint of the objects last applied successfully.
    applied: Option<u64>,
    /// kind → (object name, resourceVersion our apply returned).
    ours: BTreeMap<Owned, (String, String)>,
    failures: u32,
    retry_at: Option<Instant>,
    dirty: bool,
}

fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(BACKOFF_MAX)
}

fn fingerprint(gw: &Gateway) -> u64 {
    let mut h = DefaultHasher::new();
    format!("{gw:?}").hash(&mut h);
    h.finish()
}

/// The reconciler. Start it with [`Deployer::spawn`].
#[derive(Clone)]
pub struct Deployer {
    pub client: Client,
    pub settings: Settings,
}

struct Loop {
    client: Client,
    settings: Settings,
    gateway_api: ApiResource,
    states: BTreeMap<String, GatewayState>,
    /// (kind, namespace/name) → what the API server holds.
    observed: BTreeMap<(Owned, String), Observed>,
}

impl Deployer {
    /// Starts the watches of owned objects and the reconcile task; returns at once.
    pub fn spawn(self, index: tokio::sync::watch::Receiver<Arc<Index>>, drain: DrainWatcher) {
        let (tx, rx) = mpsc::channel(1024);
        let sel = watcher::Config::default().labels(GATEWAY_NAME_LABEL);
        let c = &self.client;
        tokio::spawn(
            watch_owned(
                Api::<ServiceAccount>::all(c.clone()),
                Owned::ServiceAccount,
                no_ip,
                sel.clone(),
                tx.clone(),
                drain.clone(),
            )
            .instrument(info_span!("deploy", kind = "ServiceAccount")),
        );
        tokio::spawn(
            watch_owned(
                Api::<Deployment>::all(c.clone()),
                Owned::Deployment,
                no_ip,
                sel.clone(),
                tx.clone(),
                drain.clone(),
            )
            .instrument(info_span!("deploy", kind = "Deployment")),
        );
        tokio::spawn(
            watch_owned(
                Api::<Service>::all(c.clone()),
                Owned::Service,
                cluster_ip,
                sel,
                tx,
                drain.clone(),
            )
            .instrument(info_span!("deploy", kind = "Service")),
        );
        tokio::spawn(
            publish_root(
                self.client.clone(),
                self.settings.root_namespace.clone(),
                self.settings.root_pem.clone(),
                drain.clone(),
            )
            .instrument(info_span!("deploy", configmap = ROOT_CERT_CONFIGMAP)),
        );
        tokio::spawn(run(self, index, rx, drain).instrument(info_span!("deploy")));
    }
}

fn no_ip<K>(_: &K) -> Option<String> {
    None
}

fn cluster_ip(s: &Service) -> Option<String> {
    s.spec.as_ref().and_then(|s| s.cluster_ip.clone())
}

async fn watch_owned<K>(
    api: Api<K>,
    kind: Owned,
    cluster_ip_of: fn(&K) -> Option<String>,
    cfg: watcher::Config,
    tx: mpsc::Sender<Event>,
    drain: DrainWatcher,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher(api, cfg).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            () = drain.signaled() => return,
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                warn!(kind = kind.kind(), error = %e, "watch of waypoint objects failed; retrying with backoff (istiod-lite needs list and watch on them cluster-wide)");
                continue;
            }
            None => return,
        };
        let report = |o: &K, deleted: bool| {
            let m = o.meta();
            Event::Owned {
                kind,
                namespace: m.namespace.clone().unwrap_or_default(),
                name: m.name.clone().unwrap_or_default(),
                gateway: m
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(GATEWAY_NAME_LABEL))
                    .cloned()
                    .unwrap_or_default(),
                rv: if deleted {
                    None
                } else {
                    m.resource_version.clone()
                },
                cluster_ip: if deleted { None } else { cluster_ip_of(o) },
            }
        };
        let out = match ev {
            watcher::Event::Init => continue,
            watcher::Event::InitDone => Event::Resync,
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => report(&o, false),
            watcher::Event::Delete(o) => report(&o, true),
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

/// Keeps `istio-ca-root-cert` in the root namespace (ztunnel's `XDS_ROOT_CA`/`CA_ROOT_CA`):
/// applied at start, retried with backoff until it succeeds, then re-applied every resync.
async fn publish_root(client: Client, ns: String, root_pem: String, drain: DrainWatcher) {
    let api = Api::<ConfigMap>::namespaced(client, &ns);
    let body = render::root_cert(&ns, &root_pem);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut failures = 0;
    loop {
        let wait = match api
            .patch(ROOT_CERT_CONFIGMAP, &pp, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                if failures > 0 {
                    info!(namespace = %ns, "root ConfigMap applied");
                }
                failures = 0;
                RESYNC
            }
            Err(e) => {
                failures += 1;
                let wait = backoff(failures);
                warn!(namespace = %ns, configmap = ROOT_CERT_CONFIGMAP, error = %e, retry_in_s = wait.as_secs(), "applying the mesh root ConfigMap failed (does the namespace exist? istiod-lite needs create and patch on configmaps); retrying");
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = drain.signaled() => return,
        }
    }
}

/// The served version of the Gateway API (v1, else v1beta1).
async fn gateway_api(client: &Client) -> Result<ApiResource, DeployError> {
    let v = crate::k8s::served_version(client, GATEWAY_GROUP, "gateways")
        .await
        .map_err(DeployError::Discovery)?
        .ok_or(DeployError::NoGatewayApi)?;
    Ok(ApiResource {
        group: GATEWAY_GROUP.into(),
        version: v.into(),
        api_version: format!("{GATEWAY_GROUP}/{v}"),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    })
}

async fn run(
    d: Deployer,
    mut index: tokio::sync::watch::Receiver<Arc<Index>>,
    mut events: mpsc::Receiver<Event>,
    drain: DrainWatcher,
) {
    // The Gateway API may be installed after start: wait for it (k8s.rs does the same).
    let gateway_api = loop {
        match gateway_api(&d.client).await {
            Ok(ar) => break ar,
            Err(e) => debug!(error = %e, "waypoint deployment waits for the Gateway API"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            () = drain.signaled() => return,
        }
    };
    info!(api_version = %gateway_api.api_version, image = %d.settings.waypoint.image, "deploying waypoints");
    let mut lp = Loop {
        client: d.client,
        settings: d.settings,
        gateway_api,
        states: BTreeMap::new(),
        observed: BTreeMap::new(),
    };
    let mut resync = tokio::time::interval(RESYNC);
    let mut idx = index.borrow_and_update().clone();
    lp.note_index(&idx);
    loop {
        let wake = lp
            .states
            .values()
            .filter(|s| s.dirty)
            .filter_map(|s| s.retry_at)
            .min();
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            c = index.changed() => {
                if c.is_err() { return }
                idx = index.borrow_and_update().clone();
                lp.note_index(&idx);
            }
            ev = events.recv() => match ev {
                Some(ev) => lp.note_event(ev),
                None => return,
            },
            _ = resync.tick() => lp.mark_all(),
            () = sleep => {}
            () = drain.signaled() => return,
        }
        lp.reconcile_due(&idx).await;
    }
}

impl Loop {
    fn note_index(&mut self, idx: &Index) {
        let waypoints: BTreeMap<&String, &Gateway> = idx
            .gateways
            .iter()
            .filter(|(_, g)| g.spec.gateway_class_name == WAYPOINT_CLASS)
            .collect();
        self.states.retain(|k, _| waypoints.contains_key(k));
        for (k, g) in waypoints {
            let f = fingerprint(g);
            let st = self.states.entry(k.clone()).or_default();
            if st.seen != f {
                st.seen = f;
                st.dirty = true;
            }
        }
    }

    fn mark(&mut self, key: &str) {
        if let Some(st) = self.states.get_mut(key) {
            st.dirty = true;
        }
    }

    fn mark_all(&mut self) {
        for st in self.states.values_mut() {
            st.dirty = true;
        }
    }

    fn note_event(&mut self, ev: Event) {
        match ev {
            Event::Resync => self.mark_all(),
            Event::Owned {
                kind,
                namespace,
                name,
                gateway,
                rv,
                cluster_ip,
            } => {
                let k = (kind, format!("{namespace}/{name}"));
                match rv {
                    Some(rv) => {
                        self.observed.insert(
                            k,
                            Observed {
                                rv: Some(rv),
                                cluster_ip,
                            },
                        );
                    }
                    None => {
                        self.observed.remove(&k);
                    }
                }
                self.mark(&format!("{namespace}/{gateway}"));
            }
        }
    }

    async fn reconcile_due(&mut self, idx: &Index) {
        let now = Instant::now();
        let due: Vec<String> = self
            .states
            .iter()
            .filter(|(_, s)| s.dirty && s.retry_at.is_none_or(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(gw) = idx.gateways.get(&key) else {
                continue;
            };
            let r = self.reconcile(gw).await;
            let Some(st) = self.states.get_mut(&key) else {
                continue;
            };
            match r {
                Ok(()) => {
                    st.dirty = false;
                    st.failures = 0;
                    st.retry_at = None;
                }
                Err(e) => {
                    st.failures += 1;
                    let wait = backoff(st.failures);
                    st.retry_at = Some(Instant::now() + wait);
                    warn!(gateway = %key, error = %e, retry_in_s = wait.as_secs(), failures = st.failures, "waypoint reconcile failed; retrying");
                }
            }
        }
    }

    async fn reconcile(&mut self, gw: &Gateway) -> Result<(), DeployError> {
        let key = format!("{}/{}", gw.namespace(), gw.name());
        let ns = gw.namespace().to_owned();
        let r = render(gw, &self.gateway_api.api_version, &self.settings)?;
        let f = r.fingerprint();
        let st = self.states.entry(key.clone()).or_default();
        let names = [
            (Owned::ServiceAccount, r.service_account_name().to_owned()),
            (Owned::Deployment, r.name.clone()),
            (Owned::Service, r.name.clone()),
        ];
        let drifted = names.iter().any(|(kind, name)| {
            let held = self
                .observed
                .get(&(*kind, format!("{ns}/{name}")))
                .and_then(|o| o.rv.as_ref());
            held != st.ours.get(kind).map(|(_, rv)| rv)
        });
        if st.applied != Some(f) || drifted {
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            let c = &self.client;
            let apply_err = |kind: &'static str, object: &str| {
                let gateway = key.clone();
                let object = format!("{ns}/{object}");
                move |source| DeployError::Apply {
                    gateway,
                    kind,
                    object,
                    source: Box::new(source),
                }
            };
            Api::<ConfigMap>::namespaced(c.clone(), &ns)
                .patch(ROOT_CERT_CONFIGMAP, &pp, &Patch::Apply(&r.root_cert))
                .await
                .map_err(apply_err("ConfigMap", ROOT_CERT_CONFIGMAP))?;
            let sa = Api::<ServiceAccount>::namespaced(c.clone(), &ns)
                .patch(&names[0].1, &pp, &Patch::Apply(&r.service_account))
                .await
                .map_err(apply_err("ServiceAccount", &names[0].1))?;
            let dep = Api::<Deployment>::namespaced(c.clone(), &ns)
                .patch(&r.name, &pp, &Patch::Apply(&r.deployment))
                .await
                .map_err(apply_err("Deployment", &r.name))?;
            let svc = Api::<Service>::namespaced(c.clone(), &ns)
                .patch(&r.name, &pp, &Patch::Apply(&r.service))
                .await
                .map_err(apply_err("Service", &r.name))?;
            let rv = |m: &kube::api::ObjectMeta| m.resource_version.clone().unwrap_or_default();
            st.ours = BTreeMap::from([
                (
                    Owned::ServiceAccount,
                    (names[0].1.clone(), rv(&sa.metadata)),
                ),
                (Owned::Deployment, (r.name.clone(), rv(&dep.metadata))),
                (Owned::Service, (r.name.clone(), rv(&svc.metadata))),
            ]);
            st.applied = Some(f);
            let ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.clone());
            self.observed.insert(
                (Owned::Service, format!("{ns}/{}", r.name)),
                Observed {
                    rv: Some(rv(&svc.metadata)),
                    cluster_ip: ip,
                },
            );
            for (kind, m) in [
                (Owned::ServiceAccount, &sa.metadata),
                (Owned::Deployment, &dep.metadata),
            ] {
                let obs = self
                    .observed
                    .entry((kind, format!("{ns}/{}", m.name.clone().unwrap_or_default())))
                    .or_default();
                obs.rv = Some(rv(m));
            }
            info!(gateway = %key, deployment = %r.name, service_account = %names[0].1, "waypoint applied");
        }
        let ip = self
            .observed
            .get(&(Owned::Service, format!("{ns}/{}", r.name)))
            .and_then(|o| o.cluster_ip.clone());
        let now = serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now()))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let (addresses, conditions) = desired_status(
            gw,
            &r.name,
            ip.as_deref(),
            &self.settings.domain_suffix,
            &now,
        );
        if !status_matches(gw, &addresses, &conditions) {
            let body = status_body(gw, &self.gateway_api.api_version, &addresses, &conditions);
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &ns, &self.gateway_api);
            api.patch_status(
                gw.name(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|source| DeployError::Status {
                gateway: key.clone(),
                source: Box::new(source),
            })?;
            info!(gateway = %key, programmed = ip.is_some(), "gateway status written");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }
}
