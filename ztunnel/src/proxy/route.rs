//! The outbound decision, as a pure function of the state: where does a connection to
//! `dst` go, and how?
//!
//! 1. `dst` is a service VIP → the service's waypoint if it has one, else a healthy endpoint
//!    (random choice), with the port mapped to the endpoint's target port.
//! 2. `dst` is a workload IP → its waypoint if it has one, else the workload itself.
//! 3. Otherwise → passthrough to `dst` unchanged (not in the mesh).
//!
//! A chosen workload that speaks HBONE is reached through a tunnel to its IP on 15008 with
//! `:authority` = the final `IP:port`; one that doesn't is reached in plaintext.

use std::{net::SocketAddr, sync::Arc};

use mesh_core::{
    Identity,
    workload::{GatewayAddress, GatewayDestination, Service, TunnelProtocol, Workload},
};

use crate::state::State;

/// Where and how to send a connection.
#[derive(Debug, Clone)]
pub enum Route {
    /// Through an HBONE tunnel.
    Hbone {
        /// The tunnel endpoint (`ip:15008`).
        tunnel: SocketAddr,
        /// What the CONNECT asks for.
        authority: SocketAddr,
        /// Who must answer the TLS handshake.
        identity: Identity,
        /// The workload at the other end of the tunnel (the waypoint, if one is used).
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
        via_waypoint: bool,
    },
    /// Plain TCP, outside the mesh.
    Passthrough {
        dst: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
}

/// Why no route exists; the connection is closed with this reason logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("waypoint {0} is not known to this ztunnel (no workload or service with that address)")]
    WaypointNotFound(String),
    #[error("destination workload {uid} has an invalid identity: {reason}")]
    BadIdentity { uid: String, reason: String },
    #[error("destination {0} is this ztunnel's own capture port (routing loop)")]
    Loop(SocketAddr),
}

fn identity_of(w: &Workload) -> Result<Identity, RouteError> {
    w.identity().map_err(|e| RouteError::BadIdentity {
        uid: w.uid.clone(),
        reason: e.to_string(),
    })
}

/// Resolves a waypoint pointer to the waypoint workload that should take the tunnel.
fn resolve_waypoint(
    state: &State,
    net: &str,
    gw: &GatewayAddress,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<Arc<Workload>, RouteError> {
    match &gw.destination {
        GatewayDestination::Address(a) => {
            if let Some(w) = state.workload_by_ip(&a.network, a.address) {
                return Ok(w);
            }
            // A waypoint addressed by its Service VIP: pick one of its endpoints.
            let svc = state
                .service_by_vip(&a.network, a.address)
                .ok_or_else(|| RouteError::WaypointNotFound(a.to_string()))?;
            pick_endpoint(state, &svc, None, pick)
                .map(|(w, _)| w)
                .ok_or_else(|| RouteError::WaypointNotFound(a.to_string()))
        }
        GatewayDestination::Hostname(h) => {
            let svc = state
                .service_by_host(h)
                .ok_or_else(|| RouteError::WaypointNotFound(h.to_string()))?;
            let _ = net;
            pick_endpoint(state, &svc, None, pick)
                .map(|(w, _)| w)
                .ok_or_else(|| RouteError::WaypointNotFound(h.to_string()))
        }
    }
}

/// A random healthy endpoint of `svc`; with `port`, only endpoints that map it.
fn pick_endpoint(
    state: &State,
    svc: &Service,
    port: Option<u16>,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Option<(Arc<Workload>, u16)> {
    let candidates: Vec<(Arc<Workload>, u16)> = state
        .endpoints(&svc.key())
        .iter()
        .filter(|e| e.workload.is_healthy() && !e.workload.workload_ips.is_empty())
        .filter_map(|e| match port {
            Some(p) => svc
                .target_port(&e.ports, p)
                .map(|t| (e.workload.clone(), t)),
            None => Some((e.workload.clone(), 0)),
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let i = pick(candidates.len()) % candidates.len();
    candidates.into_iter().nth(i)
}

fn via_waypoint(
    state: &State,
    net: &str,
    gw: &GatewayAddress,
    authority: SocketAddr,
    service: Option<Arc<Service>>,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<Route, RouteError> {
    let wp = resolve_waypoint(state, net, gw, pick)?;
    let ip = wp
        .workload_ips
        .first()
        .copied()
        .ok_or_else(|| RouteError::WaypointNotFound(wp.uid.clone()))?;
    Ok(Route::Hbone {
        tunnel: SocketAddr::new(ip, gw.hbone_mtls_port),
        authority,
        identity: identity_of(&wp)?,
        workload: wp,
        service,
        via_waypoint: true,
    })
}

fn to_workload(
    w: Arc<Workload>,
    port: u16,
    service: Option<Arc<Service>>,
) -> Result<Route, RouteError> {
    let ip = w.workload_ips[0];
    let dst = SocketAddr::new(ip, port);
    Ok(match w.protocol {
        TunnelProtocol::Hbone => Route::Hbone {
            tunnel: SocketAddr::new(ip, mesh_core::workload::HBONE_PORT),
            authority: dst,
            identity: identity_of(&w)?,
            workload: w,
            service,
            via_waypoint: false,
        },
        TunnelProtocol::None => Route::Passthrough {
            dst,
            workload: Some(w),
            service,
        },
    })
}

/// Decides the route for a connection from `src` to `dst`. `pick(n)` returns an index below
/// `n` (random in production, fixed in tests).
pub fn route(
    state: &State,
    src: &Workload,
    dst: SocketAddr,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Result<Route, RouteError> {
    let net = src.network.as_str();
    if let Some(svc) = state.service_by_vip(net, dst.ip()) {
        if let Some(gw) = &svc.waypoint
            && !is_waypoint_itself(state, src, gw)
        {
            return via_waypoint(state, net, gw, dst, Some(svc.clone()), pick);
        }
        let (w, port) = pick_endpoint(state, &svc, Some(dst.port()), pick).ok_or_else(|| {
            RouteError::NoHealthyEndpoint {
                service: svc.key().to_string(),
                port: dst.port(),
            }
        })?;
        return to_workload(w, port, Some(svc));
    }
    if let Some(w) = state.workload_by_ip(net, dst.ip()) {
        if let Some(gw) = &w.waypoint
            && !is_waypoint_itself(state, src, gw)
        {
            return via_waypoint(state, net, gw, dst, None, pick);
        }
        return to_workload(w, dst.port(), None);
    }
    Ok(Route::Passthrough {
        dst,
        workload: None,
        service: None,
    })
}

/// A waypoint forwarding to its own backends must not be sent back to itself.
fn is_waypoint_itself(state: &State, src: &Workload, gw: &GatewayAddress) -> bool {
    match &gw.destination {
        GatewayDestination::Address(a) => {
            src.workload_ips.contains(&a.address)
                || state
                    .service_by_vip(&a.network, a.address)
                    .is_some_and(|s| src.services.contains_key(&s.key().to_string()))
        }
        GatewayDestination::Hostname(h) => src.services.contains_key(&h.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::workload::{HealthStatus, NetworkAddress, PortMap};
    use std::collections::BTreeMap;

    const SVC: &str = "foo/echo.foo.svc.cluster.local";

    fn wl(uid: &str, ip: &str, proto: TunnelProtocol) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "foo".into(),
            service_account: uid.into(),
            workload_ips: vec![ip.parse().unwrap()],
            protocol: proto,
            services: BTreeMap::from([(SVC.to_string(), PortMap::from([(80, 8080)]))]),
            ..Default::default()
        }
    }

    fn svc(waypoint: Option<GatewayAddress>) -> Service {
        Service {
            name: "echo".into(),
            namespace: "foo".into(),
            hostname: "echo.foo.svc.cluster.local".into(),
            vips: vec!["/10.96.0.10".parse().unwrap()],
            ports: BTreeMap::from([(80, 8080)]),
            waypoint,
        }
    }

    fn client() -> Workload {
        Workload {
            uid: "client".into(),
            namespace: "bar".into(),
            workload_ips: vec!["10.0.1.1".parse().unwrap()],
            protocol: TunnelProtocol::Hbone,
            ..Default::default()
        }
    }

    fn first(_: usize) -> usize {
        0
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn vip_goes_to_endpoint_target_port_over_hbone() {
        let s = State::from_parts(
            vec![wl("e1", "10.0.2.1", TunnelProtocol::Hbone)],
            vec![svc(None)],
            vec![],
        );
        match route(&s, &client(), addr("10.96.0.10:80"), &mut first).unwrap() {
            Route::Hbone {
                tunnel,
                authority,
                identity,
                via_waypoint,
                service,
                ..
            } => {
                assert_eq!(tunnel, addr("10.0.2.1:15008"));
                assert_eq!(authority, addr("10.0.2.1:8080"));
                assert_eq!(identity.to_string(), "spiffe://cluster.local/ns/foo/sa/e1");
                assert!(!via_waypoint);
                assert!(service.is_some());
            }
            r => panic!("unexpected {r:?}"),
        }
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_and_none_left_is_an_error() {
        let mut bad = wl("e1", "10.0.2.1", TunnelProtocol::Hbone);
        bad.status = HealthStatus::Unhealthy;
        let good = wl("e2", "10.0.2.2", TunnelProtocol::Hbone);
        let s = State::from_parts(vec![bad.clone(), good], vec![svc(None)], vec![]);
        for i in 0..4 {
            let mut pick = |n: usize| i % n;
            match route(&s, &client(), addr("10.96.0.10:80"), &mut pick).unwrap() {
                Route::Hbone { authority, .. } => assert_eq!(authority, addr("10.0.2.2:8080")),
                r => panic!("unexpected {r:?}"),
            }
        }
        let s = State::from_parts(vec![bad], vec![svc(None)], vec![]);
        let err = route(&s, &client(), addr("10.96.0.10:80"), &mut first).unwrap_err();
        assert!(matches!(
            err,
            RouteError::NoHealthyEndpoint { port: 80, .. }
        ));
        // An unmapped service port has no endpoint either.
        let s = State::from_parts(
            vec![wl("e2", "10.0.2.2", TunnelProtocol::Hbone)],
            vec![svc(None)],
            vec![],
        );
        assert!(route(&s, &client(), addr("10.96.0.10:81"), &mut first).is_err());
    }

    #[test]
    fn endpoint_choice_spreads_over_endpoints() {
        let s = State::from_parts(
            vec![
                wl("e1", "10.0.2.1", TunnelProtocol::Hbone),
                wl("e2", "10.0.2.2", TunnelProtocol::Hbone),
            ],
            vec![svc(None)],
            vec![],
        );
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..10 {
            let mut pick = |n: usize| i % n;
            if let Route::Hbone { authority, .. } =
                route(&s, &client(), addr("10.96.0.10:80"), &mut pick).unwrap()
            {
                seen.insert(authority);
            }
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn non_mesh_workload_is_plaintext_and_unknown_is_passthrough() {
        let s = State::from_parts(
            vec![wl("legacy", "10.0.3.1", TunnelProtocol::None)],
            vec![],
            vec![],
        );
        match route(&s, &client(), addr("10.0.3.1:9000"), &mut first).unwrap() {
            Route::Passthrough { dst, workload, .. } => {
                assert_eq!(dst, addr("10.0.3.1:9000"));
                assert!(workload.is_some());
            }
            r => panic!("unexpected {r:?}"),
        }
        match route(&s, &client(), addr("192.0.2.1:443"), &mut first).unwrap() {
            Route::Passthrough { dst, workload, .. } => {
                assert_eq!(dst, addr("192.0.2.1:443"));
                assert!(workload.is_none());
            }
            r => panic!("unexpected {r:?}"),
        }
    }

    #[test]
    fn service_with_waypoint_goes_to_waypoint_with_vip_authority() {
        let mut wp = wl("waypoint", "10.0.4.1", TunnelProtocol::Hbone);
        wp.services.clear();
        let gw = GatewayAddress {
            destination: GatewayDestination::Address(NetworkAddress {
                network: String::new(),
                address: "10.0.4.1".parse().unwrap(),
            }),
            hbone_mtls_port: 15008,
        };
        let s = State::from_parts(
            vec![wl("e1", "10.0.2.1", TunnelProtocol::Hbone), wp.clone()],
            vec![svc(Some(gw))],
            vec![],
        );
        match route(&s, &client(), addr("10.96.0.10:80"), &mut first).unwrap() {
            Route::Hbone {
                tunnel,
                authority,
                identity,
                via_waypoint,
                ..
            } => {
                assert_eq!(tunnel, addr("10.0.4.1:15008"));
                assert_eq!(authority, addr("10.96.0.10:80"));
                assert_eq!(identity.service_account(), "waypoint");
                assert!(via_waypoint);
            }
            r => panic!("unexpected {r:?}"),
        }
        // The waypoint itself goes straight to the endpoint.
        match route(&s, &wp, addr("10.96.0.10:80"), &mut first).unwrap() {
            Route::Hbone {
                authority,
                via_waypoint,
                ..
            } => {
                assert_eq!(authority, addr("10.0.2.1:8080"));
                assert!(!via_waypoint);
            }
            r => panic!("unexpected {r:?}"),
        }
    }
}
