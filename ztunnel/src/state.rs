//! The indexed snapshot of the mesh that the data path reads: workloads, services, policies.
//!
//! Writers (the local file loader, the xDS client) replace it or apply a batch of
//! [`Change`]s; readers take a short read lock and clone `Arc`s out. Indexes are kept consistent on every write:
//! workloads by `(network, ip)` and uid, services by `(network, vip)` and `ns/hostname`,
//! and each service's endpoints (derived from the workloads' `services` maps).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use mesh_core::{
    policy::{Authorization, Scope},
    workload::{NamespacedHostname, PortMap, Service, Workload},
};
use serde::Serialize;

/// One endpoint of a service: a workload and its port map for that service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub ports: PortMap,
}

/// Everything the proxy knows, with lookup indexes.
#[derive(Debug, Default)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    /// IP → the workloads holding it, one per network. Keyed by IP alone so that a lookup
    /// (several per connection, one per waypoint request) allocates no key.
    by_ip: HashMap<IpAddr, Vec<(String, Arc<Workload>)>>,
    services: HashMap<NamespacedHostname, Arc<Service>>,
    /// VIP → the services holding it, one per network (as `by_ip`).
    by_vip: HashMap<IpAddr, Vec<(String, Arc<Service>)>>,
    endpoints: HashMap<NamespacedHostname, Vec<Endpoint>>,
    /// Lower-cased hostname → the services of every namespace carrying it (DNS proxy).
    by_hostname: HashMap<String, Vec<Arc<Service>>>,
    policies: BTreeMap<String, Arc<Authorization>>,
}

/// One resource update from the control plane.
#[derive(Debug, Clone)]
pub enum Change {
    Workload(Workload),
    Service(Service),
    /// An `istio.workload.Address` resource went away: a workload uid or a service's
    /// `namespace/hostname`.
    RemoveAddress(String),
    Policy(Authorization),
    /// An `istio.security.Authorization` resource (`namespace/name`) went away.
    RemovePolicy(String),
}

impl State {
    /// Applies a batch of changes and rebuilds the indexes once. Removing something
    /// unknown is not an error (xDS allows it).
    pub fn apply(&mut self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::Workload(w) => {
                    self.workloads.insert(w.uid.clone(), Arc::new(w));
                }
                Change::Service(svc) => {
                    self.services.insert(svc.key(), Arc::new(svc));
                }
                Change::RemoveAddress(name) => {
                    if self.workloads.remove(&name).is_none()
                        && let Ok(key) = name.parse::<NamespacedHostname>()
                    {
                        self.services.remove(&key);
                    }
                }
                Change::Policy(p) => {
                    self.policies.insert(p.key(), Arc::new(p));
                }
                Change::RemovePolicy(key) => {
                    self.policies.remove(&key);
                }
            }
        }
        self.reindex();
    }

    /// Builds a state from complete lists (a local file, or an xDS state-of-the-world).
    pub fn from_parts(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) -> Self {
        let mut s = State::default();
        for w in workloads {
            s.workloads.insert(w.uid.clone(), Arc::new(w));
        }
        for svc in services {
            s.services.insert(svc.key(), Arc::new(svc));
        }
        for p in policies {
            s.policies.insert(p.key(), Arc::new(p));
        }
        s.reindex();
        s
    }

    fn reindex(&mut self) {
        self.by_ip.clear();
        self.by_vip.clear();
        self.endpoints.clear();
        self.by_hostname.clear();
        for w in self.workloads.values() {
            for ip in &w.workload_ips {
                put(self.by_ip.entry(*ip).or_default(), &w.network, w);
            }
            for (svc, ports) in &w.services {
                if let Ok(key) = svc.parse::<NamespacedHostname>() {
                    self.endpoints.entry(key).or_default().push(Endpoint {
                        workload: w.clone(),
                        ports: ports.clone(),
                    });
                }
            }
        }
        for eps in self.endpoints.values_mut() {
            eps.sort_by(|a, b| a.workload.uid.cmp(&b.workload.uid));
        }
        for svc in self.services.values() {
            self.by_hostname
                .entry(svc.hostname.to_ascii_lowercase())
                .or_default()
                .push(svc.clone());
            for vip in &svc.vips {
                put(
                    self.by_vip.entry(vip.address).or_default(),
                    &vip.network,
                    svc,
                );
            }
        }
        // Sorted here once, not on every DNS query.
        for svcs in self.by_hostname.values_mut() {
            svcs.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        }
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        find(self.by_ip.get(&ip)?, network)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<Arc<Service>> {
        find(self.by_vip.get(&ip)?, network)
    }

    pub fn service_by_host(&self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// Services named `hostname` (any case), in any namespace, ordered by namespace.
    pub fn services_by_hostname(&self, hostname: &str) -> &[Arc<Service>] {
        self.by_hostname
            .get(&hostname.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Endpoints of a service, in a stable order.
    pub fn endpoints(&self, key: &NamespacedHostname) -> &[Endpoint] {
        self.endpoints.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The services a workload backs, resolved.
    pub fn services_of(&self, w: &Workload) -> Vec<Arc<Service>> {
        w.services
            .keys()
            .filter_map(|k| k.parse().ok())
            .filter_map(|k| self.services.get(&k).cloned())
            .collect()
    }

    /// The L4 policies that apply to `w`, as ztunnel selects them: every global policy, the
    /// namespace-wide policies of `w`'s namespace, and the selector policies `w` lists.
    pub fn policies_for(&self, w: &Workload) -> Vec<Arc<Authorization>> {
        let mut out: Vec<Arc<Authorization>> = self
            .policies
            .values()
            .filter(|p| match p.scope {
                Scope::Global => true,
                Scope::Namespace => p.namespace == w.namespace,
                Scope::WorkloadSelector => false,
            })
            .cloned()
            .collect();
        for key in &w.authorization_policies {
            if let Some(p) = self.policies.get(key)
                && p.scope == Scope::WorkloadSelector
            {
                out.push(p.clone());
            }
        }
        out
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn dump(&self) -> StateDump<'_> {
        let mut workloads: Vec<&Workload> = self.workloads.values().map(|w| w.as_ref()).collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<&Service> = self.services.values().map(|s| s.as_ref()).collect();
        services.sort_by_key(|s| s.key());
        StateDump {
            workloads,
            services,
            policies: self.policies.values().map(|p| p.as_ref()).collect(),
        }
    }
}

/// Sets `network`'s entry of one IP's list (the last writer wins, as a map insert would).
fn put<T>(list: &mut Vec<(String, Arc<T>)>, network: &str, v: &Arc<T>) {
    match list.iter_mut().find(|(n, _)| n == network) {
        Some(slot) => slot.1 = v.clone(),
        None => list.push((network.to_owned(), v.clone())),
    }
}

fn find<T>(list: &[(String, Arc<T>)], network: &str) -> Option<Arc<T>> {
    list.iter()
        .find(|(n, _)| n == network)
        .map(|(_, v)| v.clone())
}

/// The config-dump view of the state.
#[derive(Debug, Serialize)]
pub struct StateDump<'a> {
    pub workloads: Vec<&'a Workload>,
    pub services: Vec<&'a Service>,
    pub policies: Vec<&'a Authorization>,
}

/// The shared, swappable state.
#[derive(Debug, Clone, Default)]
pub struct StateStore {
    inner: Arc<RwLock<State>>,
}

impl StateStore {
    pub fn new(state: State) -> Self {
        StateStore {
            inner: Arc::new(RwLock::new(state)),
        }
    }

    /// Runs `f` with a read view.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        f(&g)
    }

    /// Replaces everything at once.
    pub fn replace(&self, state: State) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *g = state;
    }

    /// Applies a batch of changes under one write lock.
    pub fn apply(&self, changes: Vec<Change>) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.apply(changes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::policy::Action;

    fn wl(uid: &str, ns: &str, ip: &str, svcs: &[(&str, u16, u16)]) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: ns.into(),
            workload_ips: vec![ip.parse().unwrap()],
            services: svcs
                .iter()
                .map(|(k, p, t)| (k.to_string(), PortMap::from([(*p, *t)])))
                .collect(),
            ..Default::default()
        }
    }

    fn pol(name: &str, ns: &str, scope: Scope) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope,
            action: Action::Allow,
            rules: vec![],
            dry_run: false,
        }
    }

    #[test]
    fn indexes_and_policy_selection() {
        let mut w = wl(
            "a",
            "foo",
            "10.0.0.1",
            &[("foo/svc.foo.svc.cluster.local", 80, 8080)],
        );
        w.authorization_policies = vec!["foo/selected".into()];
        let w2 = wl("b", "bar", "10.0.0.2", &[]);
        let svc = Service {
            name: "svc".into(),
            namespace: "foo".into(),
            hostname: "svc.foo.svc.cluster.local".into(),
            vips: vec!["/10.96.0.1".parse().unwrap()],
            ports: BTreeMap::from([(80, 8080)]),
            waypoint: None,
        };
        let s = State::from_parts(
            vec![w, w2],
            vec![svc],
            vec![
                pol("global", "istio-system", Scope::Global),
                pol("ns", "foo", Scope::Namespace),
                pol("other-ns", "bar", Scope::Namespace),
                pol("selected", "foo", Scope::WorkloadSelector),
                pol("unselected", "foo", Scope::WorkloadSelector),
            ],
        );
        let a = s.workload_by_ip("", "10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(a.uid, "a");
        assert!(
            s.workload_by_ip("other-net", "10.0.0.1".parse().unwrap())
                .is_none()
        );
        let svc = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(s.endpoints(&svc.key()).len(), 1);
        let mut keys: Vec<String> = s.policies_for(&a).iter().map(|p| p.key()).collect();
        keys.sort();
        assert_eq!(keys, vec!["foo/ns", "foo/selected", "istio-system/global"]);
    }

    #[test]
    fn deltas_keep_indexes_consistent() {
        let mut s = State::default();
        let svc = Service {
            name: "svc".into(),
            namespace: "foo".into(),
            hostname: "svc.foo.svc.cluster.local".into(),
            vips: vec!["/10.96.0.1".parse().unwrap()],
            ports: BTreeMap::from([(80, 8080)]),
            waypoint: None,
        };
        s.apply(vec![
            Change::Workload(wl(
                "a",
                "foo",
                "10.0.0.1",
                &[("foo/svc.foo.svc.cluster.local", 80, 8080)],
            )),
            Change::Service(svc.clone()),
            Change::Policy(pol("p", "foo", Scope::Namespace)),
        ]);
        assert_eq!(s.endpoints(&svc.key()).len(), 1);
        // A workload moving to a new IP is re-indexed, the old IP forgotten.
        s.apply(vec![Change::Workload(wl(
            "a",
            "foo",
            "10.0.0.9",
            &[("foo/svc.foo.svc.cluster.local", 80, 8080)],
        ))]);
        assert!(s.workload_by_ip("", "10.0.0.1".parse().unwrap()).is_none());
        assert!(s.workload_by_ip("", "10.0.0.9".parse().unwrap()).is_some());
        // Removal by uid, by service key, of a policy, and of something unknown.
        s.apply(vec![
            Change::RemoveAddress("a".into()),
            Change::RemoveAddress("foo/svc.foo.svc.cluster.local".into()),
            Change::RemovePolicy("foo/p".into()),
            Change::RemoveAddress("never/existed".into()),
        ]);
        assert!(s.workload_by_uid("a").is_none());
        assert!(s.service_by_vip("", "10.96.0.1".parse().unwrap()).is_none());
        assert!(s.endpoints(&svc.key()).is_empty());
        assert_eq!(s.dump().policies.len(), 0);
    }
}
