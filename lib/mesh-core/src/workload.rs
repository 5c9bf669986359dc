//! Workloads and services as the data plane sees them (Istio's workload API, `istio.workload`).
//!
//! These are plain values: the control plane or a local file produces them, the proxies look
//! them up. A workload's service membership lives on the workload (`services`), exactly as in
//! Istio's `Workload.services`, so a service's endpoints are derived, never stored twice.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::Serialize;

use crate::identity::{Identity, IdentityError};

/// Port on which every HBONE-capable ztunnel and waypoint accepts tunnels.
pub const HBONE_PORT: u16 = 15008;

/// How traffic to a workload is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TunnelProtocol {
    /// Not in the mesh: plaintext, passthrough.
    #[default]
    None,
    /// HTTP/2 CONNECT over mutual TLS to port 15008.
    Hbone,
}

/// Whether a workload may receive traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// An IP address qualified by the network it is reachable on (`""` is the default network).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

/// Why a `network/ip` string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address {0:?} is not of the form [network/]ip")]
pub struct NetworkAddressError(pub String);

impl FromStr for NetworkAddress {
    type Err = NetworkAddressError;

    /// Accepts `ip`, `/ip` and `network/ip` (Istio writes VIPs as `network/ip`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (network, ip) = match s.rsplit_once('/') {
            Some((n, ip)) => (n, ip),
            None => ("", s),
        };
        let address = ip.parse().map_err(|_| NetworkAddressError(s.to_owned()))?;
        Ok(NetworkAddress {
            network: network.to_owned(),
            address,
        })
    }
}

/// `namespace/hostname`, the key Istio uses for services.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

impl FromStr for NamespacedHostname {
    type Err = NetworkAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() => Ok(NamespacedHostname {
                namespace: ns.to_owned(),
                hostname: host.to_owned(),
            }),
            _ => Err(NetworkAddressError(s.to_owned())),
        }
    }
}

/// Where a waypoint (or network gateway) is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

/// A pointer to a waypoint: its address and the port its HBONE listener is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

/// Service port → target port, for one service a workload belongs to. A target of 0 means
/// "use the service's own target port" (as in Istio's `PortList`).
pub type PortMap = BTreeMap<u16, u16>;

/// One schedulable unit (a pod, a VM entry): what ztunnel must know to reach and identify it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub workload_ips: Vec<IpAddr>,
    pub network: String,
    pub protocol: TunnelProtocol,
    pub trust_domain: String,
    pub service_account: String,
    pub node: String,
    pub hostname: String,
    pub waypoint: Option<GatewayAddress>,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub workload_type: String,
    pub cluster_id: String,
    /// Names (`namespace/name`) of selector-attached L4 policies that apply to this workload.
    pub authorization_policies: Vec<String>,
    pub status: HealthStatus,
    /// `namespace/hostname` of each service this workload backs → its port map.
    pub services: BTreeMap<String, PortMap>,
}

impl Workload {
    /// The SPIFFE identity this workload's certificate carries.
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        let td = if self.trust_domain.is_empty() {
            "cluster.local"
        } else {
            &self.trust_domain
        };
        let sa = if self.service_account.is_empty() {
            "default"
        } else {
            &self.service_account
        };
        Identity::new(td, &self.namespace, sa)
    }

    /// The name Istio reports for the workload's owner (Deployment etc.), falling back to the pod.
    pub fn workload_name(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }

    /// `canonical_name`, or the workload name when the control plane sent none.
    pub fn canonical_service(&self) -> &str {
        if self.canonical_name.is_empty() {
            self.workload_name()
        } else {
            &self.canonical_name
        }
    }

    pub fn canonical_revision(&self) -> &str {
        if self.canonical_revision.is_empty() {
            "latest"
        } else {
            &self.canonical_revision
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }
}

/// A Kubernetes Service (or ServiceEntry) with the VIPs clients dial.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<NetworkAddress>,
    /// Service port → default target port.
    pub ports: BTreeMap<u16, u16>,
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname {
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
        }
    }

    /// The port to dial on an endpoint for `service_port`, given the endpoint's own port map.
    /// `None` when neither the endpoint nor the service maps the port.
    pub fn target_port(&self, endpoint_ports: &PortMap, service_port: u16) -> Option<u16> {
        match endpoint_ports.get(&service_port) {
            Some(&t) if t != 0 => Some(t),
            _ => self.ports.get(&service_port).copied().filter(|&t| t != 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_address_forms() {
        let a: NetworkAddress = "10.0.0.1".parse().unwrap();
        assert_eq!(a.network, "");
        let b: NetworkAddress = "/10.0.0.1".parse().unwrap();
        assert_eq!(a, b);
        let c: NetworkAddress = "net1/fd00::1".parse().unwrap();
        assert_eq!(c.network, "net1");
        assert_eq!(c.to_string(), "net1/fd00::1");
        assert!("net1/notanip".parse::<NetworkAddress>().is_err());
    }

    #[test]
    fn identity_defaults() {
        let w = Workload {
            namespace: "foo".into(),
            ..Default::default()
        };
        assert_eq!(
            w.identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/foo/sa/default"
        );
        let bad = Workload {
            namespace: "".into(),
            ..Default::default()
        };
        assert!(bad.identity().is_err());
    }

    #[test]
    fn target_port_resolution() {
        let svc = Service {
            ports: BTreeMap::from([(80, 8080), (90, 0)]),
            ..Default::default()
        };
        let ep = PortMap::from([(80, 9090)]);
        assert_eq!(svc.target_port(&ep, 80), Some(9090));
        assert_eq!(svc.target_port(&PortMap::new(), 80), Some(8080));
        assert_eq!(svc.target_port(&PortMap::from([(80, 0)]), 80), Some(8080));
        assert_eq!(svc.target_port(&PortMap::new(), 90), None);
        assert_eq!(svc.target_port(&ep, 443), None);
    }
}
