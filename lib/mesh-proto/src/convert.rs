//! Wire ⇄ domain conversions for the workload and authorization APIs.
//!
//! Inbound (`*_from_proto`) checks every value a control plane could get wrong — address
//! lengths, port ranges, CIDR prefixes, identities, enum values — and names the offending
//! field in the error, so a NACK tells the operator exactly what to fix. Outbound
//! (`*_to_proto`) is total. `from(to(x)) == x` for every valid domain value (tested below).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use mesh_core::{
    policy::{self, Authorization},
    workload::{
        GatewayAddress, GatewayDestination, HealthStatus, NamespacedHostname, NetworkAddress,
        PortMap, Service, TunnelProtocol, Workload,
    },
};

use crate::istio::{security as pbs, workload as pbw};

/// A wire value that the domain model cannot accept, with the field that holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    /// Dotted path of the field inside the resource, e.g. `addresses[1]`.
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
    ConvertError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Decodes 4 or 16 address bytes.
pub fn ip_from_bytes(b: &[u8], field: &str) -> Result<IpAddr, ConvertError> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        n => Err(err(
            field,
            format!("an IP address is 4 or 16 bytes, got {n}"),
        )),
    }
}

pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn port(v: u32, field: &str) -> Result<u16, ConvertError> {
    u16::try_from(v).map_err(|_| err(field, format!("port {v} is out of range (0-65535)")))
}

fn network_address(a: pbw::NetworkAddress, field: &str) -> Result<NetworkAddress, ConvertError> {
    Ok(NetworkAddress {
        network: a.network,
        address: ip_from_bytes(&a.address, &format!("{field}.address"))?,
    })
}

fn network_address_to(a: &NetworkAddress) -> pbw::NetworkAddress {
    pbw::NetworkAddress {
        network: a.network.clone(),
        address: ip_to_bytes(a.address),
    }
}

fn gateway(g: pbw::GatewayAddress, field: &str) -> Result<GatewayAddress, ConvertError> {
    use pbw::gateway_address::Destination;
    let destination = match g.destination {
        Some(Destination::Address(a)) => {
            GatewayDestination::Address(network_address(a, &format!("{field}.address"))?)
        }
        Some(Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                return Err(err(
                    format!("{field}.hostname"),
                    "needs both namespace and hostname",
                ));
            }
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: h.namespace,
                hostname: h.hostname,
            })
        }
        None => return Err(err(field, "has neither an address nor a hostname")),
    };
    let hbone_mtls_port = port(g.hbone_mtls_port, &format!("{field}.hbone_mtls_port"))?;
    Ok(GatewayAddress {
        destination,
        // Istio's control plane always sets it; an unset port means the HBONE default.
        hbone_mtls_port: if hbone_mtls_port == 0 {
            mesh_core::workload::HBONE_PORT
        } else {
            hbone_mtls_port
        },
    })
}

fn gateway_to(g: &GatewayAddress) -> pbw::GatewayAddress {
    use pbw::gateway_address::Destination;
    pbw::GatewayAddress {
        destination: Some(match &g.destination {
            GatewayDestination::Address(a) => Destination::Address(network_address_to(a)),
            GatewayDestination::Hostname(h) => Destination::Hostname(pbw::NamespacedHostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            }),
        }),
        hbone_mtls_port: u32::from(g.hbone_mtls_port),
    }
}

fn port_list(ports: &[pbw::Port], field: &str) -> Result<PortMap, ConvertError> {
    let mut m = PortMap::new();
    for (i, p) in ports.iter().enumerate() {
        let sp = port(p.service_port, &format!("{field}[{i}].service_port"))?;
        let tp = port(p.target_port, &format!("{field}[{i}].target_port"))?;
        m.insert(sp, tp);
    }
    Ok(m)
}

fn port_list_to(m: &PortMap) -> Vec<pbw::Port> {
    m.iter()
        .map(|(&s, &t)| pbw::Port {
            service_port: u32::from(s),
            target_port: u32::from(t),
        })
        .collect()
}

fn workload_type_name(t: i32) -> Result<&'static str, ConvertError> {
    Ok(match pbw::WorkloadType::try_from(t) {
        Ok(pbw::WorkloadType::Deployment) => "deployment",
        Ok(pbw::WorkloadType::Cronjob) => "cronjob",
        Ok(pbw::WorkloadType::Pod) => "pod",
        Ok(pbw::WorkloadType::Job) => "job",
        Err(_) => return Err(err("workload_type", format!("unknown value {t}"))),
    })
}

fn workload_type_value(s: &str) -> i32 {
    match s {
        "cronjob" => pbw::WorkloadType::Cronjob as i32,
        "pod" => pbw::WorkloadType::Pod as i32,
        "job" => pbw::WorkloadType::Job as i32,
        _ => pbw::WorkloadType::Deployment as i32,
    }
}

/// A workload as ztunnel holds it. The uid is required (it is the xDS resource name).
pub fn workload_from_proto(w: pbw::Workload) -> Result<Workload, ConvertError> {
    if w.uid.is_empty() {
        return Err(err("uid", "is empty; every workload needs a unique uid"));
    }
    let workload_ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip_from_bytes(a, &format!("addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if workload_ips.is_empty() && w.hostname.is_empty() {
        return Err(err("addresses", "a workload needs addresses or a hostname"));
    }
    let protocol = match pbw::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pbw::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(pbw::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Err(_) => {
            return Err(err(
                "tunnel_protocol",
                format!("unknown value {}", w.tunnel_protocol),
            ));
        }
    };
    let status = match pbw::WorkloadStatus::try_from(w.status) {
        Ok(pbw::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pbw::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => return Err(err("status", format!("unknown value {}", w.status))),
    };
    let waypoint = w.waypoint.map(|g| gateway(g, "waypoint")).transpose()?;
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        if key.parse::<NamespacedHostname>().is_err() {
            return Err(err(
                format!("services[{key:?}]"),
                "key must be namespace/hostname",
            ));
        }
        services.insert(
            key.clone(),
            port_list(&list.ports, &format!("services[{key:?}].ports"))?,
        );
    }
    let out = Workload {
        workload_type: workload_type_name(w.workload_type)?.to_owned(),
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        workload_ips,
        network: w.network,
        protocol,
        trust_domain: w.trust_domain,
        service_account: w.service_account,
        node: w.node,
        hostname: w.hostname,
        waypoint,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        cluster_id: w.cluster_id,
        authorization_policies: w.authorization_policies,
        status,
        services,
    };
    if protocol == TunnelProtocol::Hbone {
        out.identity().map_err(|e| {
            err(
                "trust_domain/namespace/service_account",
                format!("do not form a SPIFFE identity: {e}"),
            )
        })?;
    }
    Ok(out)
}

pub fn workload_to_proto(w: &Workload) -> pbw::Workload {
    pbw::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(|ip| ip_to_bytes(*ip)).collect(),
        hostname: w.hostname.clone(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            TunnelProtocol::None => pbw::TunnelProtocol::None as i32,
            TunnelProtocol::Hbone => pbw::TunnelProtocol::Hbone as i32,
        },
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_to),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: workload_type_value(&w.workload_type),
        workload_name: w.workload_name.clone(),
        services: w
            .services
            .iter()
            .map(|(k, m)| {
                (
                    k.clone(),
                    pbw::PortList {
                        ports: port_list_to(m),
                    },
                )
            })
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            HealthStatus::Healthy => pbw::WorkloadStatus::Healthy as i32,
            HealthStatus::Unhealthy => pbw::WorkloadStatus::Unhealthy as i32,
        },
        cluster_id: w.cluster_id.clone(),
        ..Default::default()
    }
}

pub fn service_from_proto(s: pbw::Service) -> Result<Service, ConvertError> {
    if s.namespace.is_empty() || s.hostname.is_empty() {
        return Err(err(
            "namespace/hostname",
            "a service needs both (its key is namespace/hostname)",
        ));
    }
    let vips = s
        .addresses
        .into_iter()
        .enumerate()
        .map(|(i, a)| network_address(a, &format!("addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        ports: port_list(&s.ports, "ports")?,
        waypoint: s.waypoint.map(|g| gateway(g, "waypoint")).transpose()?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
    })
}

pub fn service_to_proto(s: &Service) -> pbw::Service {
    pbw::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s.vips.iter().map(network_address_to).collect(),
        ports: port_list_to(&s.ports),
        waypoint: s.waypoint.as_ref().map(gateway_to),
        ..Default::default()
    }
}

/// What an `istio.workload.Address` resource carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressResource {
    Workload(Workload),
    Service(Service),
}

pub fn address_from_proto(a: pbw::Address) -> Result<AddressResource, ConvertError> {
    match a.r#type {
        Some(pbw::address::Type::Workload(w)) => Ok(AddressResource::Workload(
            workload_from_proto(w).map_err(|e| err(format!("workload.{}", e.field), e.reason))?,
        )),
        Some(pbw::address::Type::Service(s)) => Ok(AddressResource::Service(
            service_from_proto(s).map_err(|e| err(format!("service.{}", e.field), e.reason))?,
        )),
        None => Err(err("type", "an Address holds a workload or a service")),
    }
}

pub fn address_to_proto(a: &AddressResource) -> pbw::Address {
    pbw::Address {
        r#type: Some(match a {
            AddressResource::Workload(w) => pbw::address::Type::Workload(workload_to_proto(w)),
            AddressResource::Service(s) => pbw::address::Type::Service(service_to_proto(s)),
        }),
    }
}

fn string_match(m: &pbs::StringMatch, field: &str) -> Result<policy::StringMatch, ConvertError> {
    use pbs::string_match::MatchType;
    Ok(match &m.match_type {
        Some(MatchType::Exact(v)) => policy::StringMatch::Exact(v.clone()),
        Some(MatchType::Prefix(v)) => policy::StringMatch::Prefix(v.clone()),
        Some(MatchType::Suffix(v)) => policy::StringMatch::Suffix(v.clone()),
        Some(MatchType::Presence(())) => policy::StringMatch::Presence,
        None => {
            return Err(err(
                field,
                "a string match needs exact, prefix, suffix or presence",
            ));
        }
    })
}

fn string_match_to(m: &policy::StringMatch) -> pbs::StringMatch {
    use pbs::string_match::MatchType;
    pbs::StringMatch {
        match_type: Some(match m {
            policy::StringMatch::Exact(v) => MatchType::Exact(v.clone()),
            policy::StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
            policy::StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
            policy::StringMatch::Presence => MatchType::Presence(()),
        }),
    }
}

fn cidr(a: &pbs::Address, field: &str) -> Result<IpNet, ConvertError> {
    let ip = ip_from_bytes(&a.address, &format!("{field}.address"))?;
    let len = u8::try_from(a.length)
        .ok()
        .and_then(|l| IpNet::new(ip, l).ok())
        .ok_or_else(|| {
            err(
                format!("{field}.length"),
                format!("prefix length {} is too long for {ip}", a.length),
            )
        })?;
    Ok(len)
}

fn cidr_to(n: &IpNet) -> pbs::Address {
    pbs::Address {
        address: ip_to_bytes(n.addr()),
        length: u32::from(n.prefix_len()),
    }
}

fn match_from(m: &pbs::Match, f: &str) -> Result<policy::Match, ConvertError> {
    let sms = |v: &[pbs::StringMatch], name: &str| {
        v.iter()
            .enumerate()
            .map(|(i, s)| string_match(s, &format!("{f}.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let nets = |v: &[pbs::Address], name: &str| {
        v.iter()
            .enumerate()
            .map(|(i, a)| cidr(a, &format!("{f}.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |v: &[u32], name: &str| {
        v.iter()
            .enumerate()
            .map(|(i, p)| port(*p, &format!("{f}.{name}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let sas = |v: &[pbs::ServiceAccountMatch]| {
        v.iter()
            .map(|s| policy::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(policy::Match {
        namespaces: sms(&m.namespaces, "namespaces")?,
        not_namespaces: sms(&m.not_namespaces, "not_namespaces")?,
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        principals: sms(&m.principals, "principals")?,
        not_principals: sms(&m.not_principals, "not_principals")?,
        source_ips: nets(&m.source_ips, "source_ips")?,
        not_source_ips: nets(&m.not_source_ips, "not_source_ips")?,
        destination_ips: nets(&m.destination_ips, "destination_ips")?,
        not_destination_ips: nets(&m.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports(&m.destination_ports, "destination_ports")?,
        not_destination_ports: ports(&m.not_destination_ports, "not_destination_ports")?,
    })
}

fn match_to(m: &policy::Match) -> pbs::Match {
    let sms = |v: &[policy::StringMatch]| v.iter().map(string_match_to).collect();
    let nets = |v: &[IpNet]| v.iter().map(cidr_to).collect();
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let sas = |v: &[policy::ServiceAccountMatch]| {
        v.iter()
            .map(|s| pbs::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    pbs::Match {
        namespaces: sms(&m.namespaces),
        not_namespaces: sms(&m.not_namespaces),
        principals: sms(&m.principals),
        not_principals: sms(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        extensions: vec![],
    }
}

pub fn authorization_from_proto(a: pbs::Authorization) -> Result<Authorization, ConvertError> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err(err(
            "name/namespace",
            "a policy needs both (its key is namespace/name)",
        ));
    }
    let scope = match pbs::Scope::try_from(a.scope) {
        Ok(pbs::Scope::Global) => policy::Scope::Global,
        Ok(pbs::Scope::Namespace) => policy::Scope::Namespace,
        Ok(pbs::Scope::WorkloadSelector) => policy::Scope::WorkloadSelector,
        Err(_) => return Err(err("scope", format!("unknown value {}", a.scope))),
    };
    // An action this proxy does not know must not be guessed: fail closed by rejecting.
    let action = match pbs::Action::try_from(a.action) {
        Ok(pbs::Action::Allow) => policy::Action::Allow,
        Ok(pbs::Action::Deny) => policy::Action::Deny,
        Err(_) => return Err(err("action", format!("unknown value {}", a.action))),
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (ri, r) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for (ci, c) in r.clauses.iter().enumerate() {
            let clause = c
                .matches
                .iter()
                .enumerate()
                .map(|(mi, m)| match_from(m, &format!("rules[{ri}].clauses[{ci}].matches[{mi}]")))
                .collect::<Result<Vec<_>, _>>()?;
            clauses.push(clause);
        }
        rules.push(policy::Rule { clauses });
    }
    Ok(Authorization {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}

pub fn authorization_to_proto(a: &Authorization) -> pbs::Authorization {
    pbs::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match a.scope {
            policy::Scope::Global => pbs::Scope::Global as i32,
            policy::Scope::Namespace => pbs::Scope::Namespace as i32,
            policy::Scope::WorkloadSelector => pbs::Scope::WorkloadSelector as i32,
        },
        action: match a.action {
            policy::Action::Allow => pbs::Action::Allow as i32,
            policy::Action::Deny => pbs::Action::Deny as i32,
        },
        rules: a
            .rules
            .iter()
            .map(|r| pbs::Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| pbs::Clause {
                        matches: c.iter().map(match_to).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: a.dry_run,
        extensions: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_workload() -> Workload {
        Workload {
            uid: "cluster1//Pod/foo/echo-1".into(),
            name: "echo-1".into(),
            namespace: "foo".into(),
            workload_ips: vec!["10.244.2.7".parse().unwrap(), "fd00::7".parse().unwrap()],
            network: "".into(),
            protocol: TunnelProtocol::Hbone,
            trust_domain: "cluster.local".into(),
            service_account: "echo".into(),
            node: "node-b".into(),
            waypoint: Some(GatewayAddress {
                destination: GatewayDestination::Address("/10.96.0.9".parse().unwrap()),
                hbone_mtls_port: 15008,
            }),
            workload_type: "pod".into(),
            authorization_policies: vec!["foo/only-sleep".into()],
            status: HealthStatus::Unhealthy,
            services: BTreeMap::from([(
                "foo/echo.foo.svc.cluster.local".into(),
                PortMap::from([(80, 8080)]),
            )]),
            ..Default::default()
        }
    }

    #[test]
    fn workload_round_trips() {
        let w = sample_workload();
        assert_eq!(workload_from_proto(workload_to_proto(&w)).unwrap(), w);
    }

    #[test]
    fn service_and_address_round_trip() {
        let s = Service {
            name: "echo".into(),
            namespace: "foo".into(),
            hostname: "echo.foo.svc.cluster.local".into(),
            vips: vec!["/10.96.0.10".parse().unwrap()],
            ports: BTreeMap::from([(80, 8080), (443, 0)]),
            waypoint: Some(GatewayAddress {
                destination: GatewayDestination::Hostname(NamespacedHostname {
                    namespace: "foo".into(),
                    hostname: "waypoint.foo.svc.cluster.local".into(),
                }),
                hbone_mtls_port: 15008,
            }),
        };
        let a = AddressResource::Service(s);
        assert_eq!(address_from_proto(address_to_proto(&a)).unwrap(), a);
    }

    #[test]
    fn authorization_round_trips() {
        let a = Authorization {
            name: "p".into(),
            namespace: "foo".into(),
            scope: policy::Scope::WorkloadSelector,
            action: policy::Action::Deny,
            rules: vec![policy::Rule {
                clauses: vec![vec![policy::Match {
                    principals: vec![policy::StringMatch::Prefix("cluster.local/ns/".into())],
                    not_namespaces: vec![policy::StringMatch::Presence],
                    source_ips: vec!["10.0.0.0/8".parse().unwrap()],
                    not_destination_ips: vec!["fd00::/64".parse().unwrap()],
                    destination_ports: vec![8080],
                    service_accounts: vec![policy::ServiceAccountMatch {
                        namespace: "bar".into(),
                        service_account: "sleep".into(),
                    }],
                    ..Default::default()
                }]],
            }],
            dry_run: true,
        };
        assert_eq!(
            authorization_from_proto(authorization_to_proto(&a)).unwrap(),
            a
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut w = workload_to_proto(&sample_workload());
        w.addresses[1] = vec![1, 2, 3];
        let e = workload_from_proto(w).unwrap_err();
        assert_eq!(e.field, "addresses[1]");

        let mut w = workload_to_proto(&sample_workload());
        w.services
            .get_mut("foo/echo.foo.svc.cluster.local")
            .unwrap()
            .ports[0]
            .target_port = 70000;
        let e = workload_from_proto(w).unwrap_err();
        assert!(e.field.contains("target_port"), "{e}");

        let mut w = workload_to_proto(&sample_workload());
        w.uid.clear();
        assert_eq!(workload_from_proto(w).unwrap_err().field, "uid");

        let mut w = workload_to_proto(&sample_workload());
        w.service_account = "Not A Valid SA!".into();
        assert!(workload_from_proto(w).is_err());

        let mut a = authorization_to_proto(&Authorization {
            name: "p".into(),
            namespace: "foo".into(),
            scope: policy::Scope::Namespace,
            action: policy::Action::Allow,
            rules: vec![policy::Rule {
                clauses: vec![vec![policy::Match {
                    source_ips: vec!["10.0.0.0/8".parse().unwrap()],
                    ..Default::default()
                }]],
            }],
            dry_run: false,
        });
        a.rules[0].clauses[0].matches[0].source_ips[0].length = 33;
        let e = authorization_from_proto(a.clone()).unwrap_err();
        assert_eq!(
            e.field,
            "rules[0].clauses[0].matches[0].source_ips[0].length"
        );
        a.action = 7;
        assert_eq!(authorization_from_proto(a).unwrap_err().field, "action");

        let e = address_from_proto(pbw::Address { r#type: None }).unwrap_err();
        assert_eq!(e.field, "type");
    }
}
