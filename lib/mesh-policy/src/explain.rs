//! The end-to-end decision for one request, hop by hop, as `meshctl authz check` prints it.
//!
//! The path is decided from the request: through the waypoint when the destination is bound
//! to one whose `istio.io/waypoint-for` matches what the client dialled (and the client is in
//! the mesh), then the destination ztunnel. Behind a waypoint the destination ztunnel sees the
//! waypoint's identity and IP. Each hop reports allow/deny, the deciding policy
//! (`namespace/name`) and rule index, a reason, and warnings for every silent behaviour.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use mesh_core::{
    Identity,
    policy::{self as l4p, Action as L4Action, Authorization, Connection, Match, Rule, Scope},
};
use serde::Serialize;

use crate::{
    l4::{self, L4Policy},
    mesh::{Condition, ConditionType, MeshConfig},
    model::{AuthorizationPolicy, PolicySet},
    path,
    peerauthn::{self, STATIC_STRICT_NAME},
    rbac,
    scope::{self, AddressedTo, Traversal, WaypointFor, WaypointTarget},
    validate,
};

/// The client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// `None`: plaintext (no mesh identity).
    pub identity: Option<Identity>,
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ip: IpAddr,
    /// The workload (container/target) port.
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub namespace: String,
    pub workload: Workload,
    /// In the destination's namespace.
    pub service: Option<Service>,
    pub addressed_to: AddressedTo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

/// A JWT the client sent, already checked (`valid: false` = the token was rejected).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JwtInput {
    pub valid: bool,
    pub iss: String,
    pub sub: String,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpRequest {
    pub method: String,
    /// Raw, before normalization (may carry a query).
    pub path: String,
    pub host: String,
    pub headers: BTreeMap<String, String>,
    /// `None`: no token.
    pub jwt: Option<JwtInput>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: IpAddr,
    pub for_: WaypointFor,
}

/// One request to explain.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub source: Client,
    pub destination: Destination,
    pub protocol: Protocol,
    /// Required when `protocol` is HTTP.
    pub http: Option<HttpRequest>,
    /// Present when the destination is bound to a ready waypoint.
    pub waypoint: Option<Waypoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HopKind {
    Waypoint,
    Ztunnel,
}

/// One enforcement point on the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hop {
    pub at: HopKind,
    pub decision: Decision,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub reason: String,
    pub warnings: Vec<String>,
    /// What the hop sees (for the text rendering).
    #[serde(skip)]
    pub sees: String,
    /// `namespace/name` of the policies this hop evaluated.
    #[serde(skip)]
    pub evaluated: Vec<String>,
}

/// The decision for a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub decision: Decision,
    /// In traversal order; evaluation stops at the first denying hop.
    pub hops: Vec<Hop>,
    /// Status conditions of the policies involved (`ZtunnelAccepted`, `WaypointAccepted`).
    pub conditions: Vec<Condition>,
}

/// Input that cannot be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Rejected(#[from] validate::Rejected),
    #[error("request: {field}: {message}")]
    Request {
        field: &'static str,
        message: String,
    },
}

/// Validates every object like the admission webhook; the first rejection is an error.
/// Returns the warnings, keyed by `namespace/name`.
pub fn validate_all(set: &PolicySet) -> Result<BTreeMap<String, Vec<String>>, validate::Rejected> {
    let mut warnings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut check = |kind: &'static str, key: String, origin: String, v: validate::Validation| {
        if !v.errors.is_empty() {
            return Err(validate::Rejected {
                origin,
                kind,
                key,
                message: v.errors.join("; "),
            });
        }
        if !v.warnings.is_empty() {
            warnings.entry(key).or_default().extend(v.warnings);
        }
        Ok(())
    };
    for p in &set.authorization_policies {
        check(
            "AuthorizationPolicy",
            p.key(),
            p.origin.to_string(),
            validate::validate_authorization_policy(p),
        )?;
    }
    for p in &set.peer_authentications {
        check(
            "PeerAuthentication",
            p.key(),
            p.origin.to_string(),
            validate::validate_peer_authentication(p),
        )?;
    }
    for p in &set.request_authentications {
        check(
            "RequestAuthentication",
            p.key(),
            p.origin.to_string(),
            validate::validate_request_authentication(p),
        )?;
    }
    Ok(warnings)
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

fn uses_source_attributes(p: &AuthorizationPolicy) -> bool {
    p.spec.rules().iter().any(|r| {
        r.from.iter().flatten().any(|f| {
            f.source.as_ref().is_some_and(|s| {
                !(s.principals.is_empty()
                    && s.not_principals.is_empty()
                    && s.namespaces.is_empty()
                    && s.not_namespaces.is_empty()
                    && s.service_accounts.is_empty()
                    && s.not_service_accounts.is_empty()
                    && s.ip_blocks.is_empty()
                    && s.not_ip_blocks.is_empty())
            })
        }) || r
            .when
            .iter()
            .flatten()
            .any(|c| c.key.starts_with("source."))
    })
}

fn principal_warnings(p: &AuthorizationPolicy, mesh: &MeshConfig, at_ztunnel: bool) -> Vec<String> {
    let mut out = Vec::new();
    let values = p.spec.rules().iter().flat_map(|r| {
        r.from
            .iter()
            .flatten()
            .filter_map(|f| f.source.as_ref())
            .flat_map(|s| s.principals.iter().chain(&s.not_principals))
            .chain(
                r.when
                    .iter()
                    .flatten()
                    .filter(|c| c.key == "source.principal")
                    .flat_map(|c| c.values.iter().chain(&c.not_values)),
            )
            .collect::<Vec<_>>()
    });
    for v in values {
        if v.starts_with("spiffe://") {
            push_unique(
                &mut out,
                format!(
                    "{}: principal {v:?} starts with spiffe://; principals are written without the scheme, so it never matches (istio/ztunnel#1901)",
                    p.key()
                ),
            );
        } else if at_ztunnel
            && mesh.trust_domain != "cluster.local"
            && v.starts_with("cluster.local/")
        {
            push_unique(
                &mut out,
                format!(
                    "{}: principal {v:?} uses cluster.local but the trust domain is {}; ztunnel matches principals verbatim (no alias), so it never matches there (istio/ztunnel#1260); waypoints treat cluster.local as the local trust domain",
                    p.key(),
                    mesh.trust_domain
                ),
            );
        }
    }
    out
}

struct HopOut {
    hop: Hop,
    conditions: Vec<Condition>,
}

fn waypoint_hop(
    set: &PolicySet,
    mesh: &MeshConfig,
    req: &Request,
    wp: &Waypoint,
    vwarn: &BTreeMap<String, Vec<String>>,
) -> Result<HopOut, ExplainError> {
    let dest = &req.destination;
    let service = match dest.addressed_to {
        AddressedTo::Service => dest.service.as_ref(),
        AddressedTo::Workload => None,
    };
    let (dst_ip, dst_port) = match service {
        Some(s) => (s.vip, s.port),
        None => (dest.workload.ip, dest.workload.port),
    };
    let target = WaypointTarget {
        waypoint_name: &wp.name,
        waypoint_namespace: &wp.namespace,
        service: service.map(|s| (dest.namespace.as_str(), s.name.as_str())),
    };
    let mut warnings = Vec::new();
    let peer = req.source.identity.clone();
    let peer_s = peer
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "no identity".into());
    let mut sees = format!(
        "peer {peer_s} from {}, destination {dst_ip}:{dst_port} ({})",
        req.source.ip,
        if service.is_some() {
            "Service VIP and Service port"
        } else {
            "pod IP and workload port"
        }
    );
    let deny = |policy: Option<String>, reason: String, warnings: Vec<String>, sees: String| {
        Ok(HopOut {
            hop: Hop {
                at: HopKind::Waypoint,
                decision: Decision::Deny,
                policy,
                rule: None,
                reason,
                warnings,
                sees,
                evaluated: Vec::new(),
            },
            conditions: Vec::new(),
        })
    };

    let mut http_view = None;
    if let (Protocol::Http, Some(h)) = (req.protocol, &req.http) {
        sees.push_str(&format!(", HTTP {} {} host {:?}", h.method, h.path, h.host));
        if h.method.is_empty() || h.method.chars().any(|c| !c.is_ascii_uppercase()) {
            return deny(
                None,
                format!(
                    "method {:?} is not upper case; the waypoint rejects the request with HTTP 400 before authorization",
                    h.method
                ),
                warnings,
                sees,
            );
        }
        let normalized = match path::normalize(&h.path, mesh.path_normalization) {
            Ok(p) => p,
            Err(e) => return deny(None, format!("{e}"), warnings, sees),
        };
        if normalized != h.path {
            sees.push_str(&format!(" (normalized path {normalized:?})"));
        }
        let ras = scope::waypoint_request_authentications(set, mesh, &target);
        let mut jwt = None;
        if let Some(j) = &h.jwt {
            if ras.is_empty() {
                warnings.push("the request carries a JWT but no RequestAuthentication applies at this waypoint: the token is not validated and the request has no request principal".into());
            } else if !j.valid {
                return deny(
                    Some(ras[0].key()),
                    format!(
                        "RequestAuthentication {} rejects the invalid JWT with HTTP 401 \"Jwt verification fails\" before authorization",
                        ras[0].key()
                    ),
                    warnings,
                    sees,
                );
            } else if !ras.iter().any(|ra| {
                ra.spec
                    .jwt_rules
                    .iter()
                    .any(|r| r.issuer.is_empty() || r.issuer == j.iss)
            }) {
                return deny(
                    Some(ras[0].key()),
                    format!(
                        "no RequestAuthentication at this waypoint has a jwtRule for issuer {:?}; the token is rejected with HTTP 401 \"Jwt issuer is not configured\"",
                        j.iss
                    ),
                    warnings,
                    sees,
                );
            } else {
                jwt = Some(rbac::Jwt {
                    iss: j.iss.clone(),
                    sub: j.sub.clone(),
                    claims: j.claims.clone(),
                });
                sees.push_str(&format!(", request principal {}/{}", j.iss, j.sub));
            }
        }
        http_view = Some(rbac::HttpView {
            method: h.method.clone(),
            path: normalized,
            host: h.host.clone(),
            headers: h
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            jwt,
        });
    } else {
        sees.push_str(", TCP (no HTTP attributes)");
    }

    let view = rbac::View {
        peer: peer.clone(),
        src_ip: req.source.ip,
        dst_ip,
        dst_port,
        http: http_view,
    };
    let (policies, conditions) = scope::waypoint_policies(set, mesh, &target);
    for p in &policies {
        for w in vwarn.get(&p.key()).into_iter().flatten() {
            if req.protocol == Protocol::Tcp || !w.contains("TCP ports") {
                push_unique(&mut warnings, format!("{}: {w}", p.key()));
            }
        }
        warnings.extend(principal_warnings(p, mesh, false));
    }

    // Selector policies aimed at the waypoint's own pods.
    let wp_labels = scope::waypoint_pod_labels(&wp.name);
    let layered: Vec<&AuthorizationPolicy> = set
        .authorization_policies
        .iter()
        .filter(|p| {
            let ns = p.namespace();
            (ns == wp.namespace || ns == mesh.root_namespace)
                && p.spec.all_target_refs().is_empty()
                && p.spec.selector.as_ref().is_some_and(|s| {
                    !s.match_labels.is_empty()
                        && (s.matches(&wp_labels)
                            || s.match_labels.get("istio.io/gateway-name") == Some(&wp.name))
                })
        })
        .collect();
    let mut evaluated: Vec<String> = policies.iter().map(|p| p.key()).collect();
    if mesh.feature_flags.layered_waypoint_policies {
        let mut auths = Vec::new();
        for p in layered.iter().filter(|p| {
            p.spec
                .selector
                .as_ref()
                .is_some_and(|s| s.matches(&wp_labels))
        }) {
            let c = l4::convert(p, mesh);
            warnings.extend(c.notes);
            if let Some(lp) = c.policy {
                evaluated.push(p.key());
                auths.push(lp);
            }
        }
        let conn = Connection {
            src: SocketAddr::new(req.source.ip, 0),
            dst: SocketAddr::new(dst_ip, dst_port),
            src_identity: peer.clone(),
        };
        let d = l4p::evaluate(auths.iter().map(|a| &a.authorization), &conn);
        if !d.allowed {
            let rule = rule_of(&auths, &d);
            return Ok(HopOut {
                hop: Hop {
                    at: HopKind::Waypoint,
                    decision: Decision::Deny,
                    policy: d.policy.clone(),
                    rule,
                    reason: format!(
                        "layered L4 policy at the waypoint's HBONE termination (ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES): {}",
                        d.reason
                    ),
                    warnings,
                    sees,
                    evaluated,
                },
                conditions,
            });
        }
    } else {
        for p in &layered {
            warnings.push(format!(
                "{}: selects the waypoint's pods, but waypoints ignore selector policies (legacy pre-1.22 pattern); it is enforced nowhere. Use targetRefs to the Gateway (or enable ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES for L4 enforcement)",
                p.key()
            ));
        }
    }

    let d = rbac::evaluate(
        &policies,
        &view,
        &rbac::Ctx {
            trust_domains: mesh.trust_domain_bundle(),
        },
    );
    warnings.extend(d.warnings);
    Ok(HopOut {
        hop: Hop {
            at: HopKind::Waypoint,
            decision: if d.allowed {
                Decision::Allow
            } else {
                Decision::Deny
            },
            policy: d.policy,
            rule: d.rule,
            reason: d.reason,
            warnings,
            sees,
            evaluated,
        },
        conditions,
    })
}

fn rule_of(auths: &[L4Policy], d: &l4p::Decision) -> Option<usize> {
    let rule = d.rule?;
    let key = d.policy.as_deref()?;
    Some(
        auths
            .iter()
            .find(|a| a.authorization.key() == key)
            .map(|a| a.source_rule(rule))
            .unwrap_or(rule),
    )
}

fn auto_allow_waypoint(mesh: &MeshConfig, wp: &Waypoint) -> L4Policy {
    let principal = format!(
        "{}/ns/{}/sa/{}",
        mesh.trust_domain, wp.namespace, wp.service_account
    );
    L4Policy {
        authorization: Authorization {
            name: format!("istio_allow_waypoint_{}_{}", wp.namespace, wp.name),
            namespace: wp.namespace.clone(),
            scope: Scope::WorkloadSelector,
            action: L4Action::Allow,
            rules: vec![Rule {
                clauses: vec![vec![Match {
                    principals: vec![l4p::StringMatch::Exact(principal)],
                    ..Default::default()
                }]],
            }],
            dry_run: false,
        },
        rule_map: vec![0],
    }
}

fn ztunnel_hop(
    set: &PolicySet,
    mesh: &MeshConfig,
    req: &Request,
    src: (Option<Identity>, IpAddr),
    via: Option<&Waypoint>,
    vwarn: &BTreeMap<String, Vec<String>>,
) -> HopOut {
    let dest = &req.destination;
    let mut warnings = Vec::new();
    let mut conditions = Vec::new();
    let (policies, notes, attach_conditions) =
        scope::ztunnel_policies(set, mesh, &dest.namespace, &dest.workload.labels);
    warnings.extend(notes);
    conditions.extend(attach_conditions);
    let mut auths: Vec<L4Policy> = Vec::new();
    let mut identity_based = Vec::new();
    let mut evaluated = Vec::new();
    for (p, _) in &policies {
        let c = l4::convert(p, mesh);
        warnings.extend(c.notes);
        conditions.extend(c.status);
        for w in vwarn.get(&p.key()).into_iter().flatten() {
            // The webhook's HTTP-only DENY warning describes Envoy; say so at ztunnel.
            let w = if w.contains("TCP ports") {
                format!("{w} (admission warning; it describes sidecars and waypoints, not ztunnel)")
            } else {
                w.clone()
            };
            push_unique(&mut warnings, format!("{}: {w}", p.key()));
        }
        warnings.extend(principal_warnings(p, mesh, true));
        if let Some(lp) = c.policy {
            if uses_source_attributes(p) {
                identity_based.push(p.key());
            }
            evaluated.push(p.key());
            auths.push(lp);
        }
    }
    let pa = peerauthn::for_workload(set, mesh, &dest.namespace, &dest.workload.labels);
    warnings.extend(pa.notes);
    conditions.extend(pa.conditions);
    for a in pa.policies {
        evaluated.push(a.key());
        let n = a.rules.len();
        auths.push(L4Policy {
            authorization: a,
            rule_map: (0..n).collect(),
        });
    }
    if let Some(wp) = req
        .waypoint
        .as_ref()
        .filter(|w| mesh.feature_flags.auto_allow_waypoint_policy && w.for_ != WaypointFor::None)
    {
        let a = auto_allow_waypoint(mesh, wp);
        evaluated.push(a.authorization.key());
        auths.push(a);
    }
    for ra in
        scope::selector_request_authentications(set, mesh, &dest.namespace, &dest.workload.labels)
    {
        warnings.push(format!(
            "RequestAuthentication {} applies to this workload (selector or namespace-wide), but ztunnel never validates JWTs; in ambient it takes effect only at a waypoint attached with targetRefs",
            ra.key()
        ));
    }
    if let (Some(wp), false) = (via, identity_based.is_empty()) {
        warnings.push(format!(
            "behind waypoint {}/{} this ztunnel sees the waypoint's identity ({}/ns/{}/sa/{}) and IP ({}), not the client's: source principals, namespaces, service accounts and IPs in {} refer to the waypoint here (allow by client identity becomes deny; deny by client identity is bypassed)",
            wp.namespace,
            wp.name,
            mesh.trust_domain,
            wp.namespace,
            wp.service_account,
            wp.ip,
            identity_based.join(", ")
        ));
    }

    let (identity, src_ip) = src;
    let conn = Connection {
        src: SocketAddr::new(src_ip, 0),
        dst: SocketAddr::new(dest.workload.ip, dest.workload.port),
        src_identity: identity.clone(),
    };
    for a in auths.iter().filter(|a| a.authorization.dry_run) {
        if let Some(r) = a.authorization.matching_rule(&conn) {
            warnings.push(format!(
                "dry-run {:?} policy {} rule {} matched (logged by ztunnel, not enforced)",
                a.authorization.action,
                a.authorization.key(),
                a.source_rule(r)
            ));
        }
    }
    let d = l4p::evaluate(auths.iter().map(|a| &a.authorization), &conn);
    let rule = rule_of(&auths, &d);
    let refusal = if identity.is_some() {
        "the HBONE CONNECT gets HTTP 401 and the client sees a reset"
    } else {
        "the plaintext connection is closed"
    };
    let reason = match (&d.policy, d.allowed) {
        (Some(k), false) if k.ends_with(STATIC_STRICT_NAME) => format!(
            "denied by {k}: PeerAuthentication STRICT and the connection is plaintext (no peer identity); {refusal}"
        ),
        (Some(k), false) if k.contains("/converted_peer_authentication_") => format!(
            "denied by {k}: port-level PeerAuthentication requires mTLS on port {} and the connection is plaintext; {refusal}",
            dest.workload.port
        ),
        (Some(k), false) => format!(
            "denied by DENY policy {k} rule {}; {refusal}",
            rule.unwrap_or_default()
        ),
        (Some(k), true) => format!(
            "allowed by ALLOW policy {k} rule {}",
            rule.unwrap_or_default()
        ),
        (None, true) => {
            "no ALLOW policy applies to the workload, and no DENY policy matched".into()
        }
        (None, false) => {
            let allows: Vec<String> = auths
                .iter()
                .filter(|a| a.authorization.action == L4Action::Allow && !a.authorization.dry_run)
                .map(|a| a.authorization.key())
                .collect();
            format!(
                "ALLOW policies apply ({}) but none matched (\"allow policies exist, but none allowed\"); {refusal}",
                allows.join(", ")
            )
        }
    };
    let id_s = identity
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "no identity (plaintext)".into());
    HopOut {
        hop: Hop {
            at: HopKind::Ztunnel,
            decision: if d.allowed {
                Decision::Allow
            } else {
                Decision::Deny
            },
            policy: d.policy,
            rule,
            reason,
            warnings,
            sees: format!(
                "peer {id_s} from {src_ip}, destination {}:{} (pod IP and workload port), L4 only",
                dest.workload.ip, dest.workload.port
            ),
            evaluated,
        },
        conditions,
    }
}

/// Explains `req` against `set`: validates every object, decides the path, evaluates each hop.
pub fn explain(
    set: &PolicySet,
    mesh: &MeshConfig,
    req: &Request,
) -> Result<Explanation, ExplainError> {
    let vwarn = validate_all(set)?;
    let dest = &req.destination;
    if dest.addressed_to == AddressedTo::Service && dest.service.is_none() {
        return Err(ExplainError::Request {
            field: "destination.service",
            message: "required when destination.addressed_to is service".into(),
        });
    }
    if req.protocol == Protocol::Http && req.http.is_none() {
        return Err(ExplainError::Request {
            field: "http",
            message: "required when protocol is http".into(),
        });
    }
    let plaintext = req.source.identity.is_none();
    let wp_key = req
        .waypoint
        .as_ref()
        .map(|w| format!("{}/{}", w.namespace, w.name));
    let traversal = scope::traversal(
        req.waypoint
            .as_ref()
            .zip(wp_key.as_deref())
            .map(|(w, k)| (k, w.for_)),
        dest.addressed_to,
        plaintext,
    );
    let mut path_warnings = Vec::new();
    let mut conditions = Vec::new();
    // The workload's Service, whether or not the client dialled it: a pod-IP client skips
    // the Service's waypoint and with it every policy targeting the Service.
    let service_ref = dest
        .service
        .as_ref()
        .map(|s| (dest.namespace.as_str(), s.name.as_str()));
    if let Traversal::Bypassed(why) = &traversal {
        path_warnings.push(format!("waypoint bypassed: {why}"));
    }
    if req.protocol == Protocol::Http && traversal != Traversal::ViaWaypoint {
        path_warnings.push(
            "no waypoint on this path: HTTP attributes are never evaluated (ztunnel is L4 only)"
                .into(),
        );
    }
    if traversal != Traversal::ViaWaypoint {
        for p in scope::unenforced_target_ref_policies(set, service_ref) {
            let svc = service_ref
                .map(|(n, s)| format!("{n}/{s}"))
                .unwrap_or_default();
            path_warnings.push(format!(
                "{} targets Service {svc}, but this connection does not traverse a waypoint, so the policy is enforced nowhere on this path",
                p.key()
            ));
            if req.waypoint.is_none() {
                conditions.push(Condition::new(
                    &p.key(),
                    ConditionType::WaypointAccepted,
                    false,
                    "AncestorNotBound",
                    format!("Service {svc} is not bound to a waypoint"),
                ));
            }
        }
    }

    let mut hops = Vec::new();
    let src = match (&traversal, &req.waypoint) {
        (Traversal::ViaWaypoint, Some(wp)) => {
            let out = waypoint_hop(set, mesh, req, wp, &vwarn)?;
            conditions.extend(out.conditions);
            let denied = out.hop.decision == Decision::Deny;
            hops.push(out.hop);
            if denied {
                return Ok(finish(hops, conditions, path_warnings));
            }
            let id = Identity::new(&mesh.trust_domain, &wp.namespace, &wp.service_account)
                .map_err(|e| ExplainError::Request {
                    field: "waypoint.service_account",
                    message: e.to_string(),
                })?;
            (Some(id), wp.ip)
        }
        _ => (req.source.identity.clone(), req.source.ip),
    };
    let via = match traversal {
        Traversal::ViaWaypoint => req.waypoint.as_ref(),
        _ => None,
    };
    let out = ztunnel_hop(set, mesh, req, src, via, &vwarn);
    conditions.extend(out.conditions);
    hops.push(out.hop);
    Ok(finish(hops, conditions, path_warnings))
}

fn finish(
    mut hops: Vec<Hop>,
    mut conditions: Vec<Condition>,
    path_warnings: Vec<String>,
) -> Explanation {
    if let Some(first) = hops.first_mut() {
        let mut w = path_warnings;
        w.append(&mut first.warnings);
        first.warnings = w;
    }
    for h in &mut hops {
        let mut seen = Vec::new();
        for w in std::mem::take(&mut h.warnings) {
            push_unique(&mut seen, w);
        }
        h.warnings = seen;
    }
    let mut uniq: Vec<Condition> = Vec::new();
    for c in conditions.drain(..) {
        if !uniq.contains(&c) {
            uniq.push(c);
        }
    }
    let decision = if hops.iter().any(|h| h.decision == Decision::Deny) {
        Decision::Deny
    } else {
        Decision::Allow
    };
    Explanation {
        decision,
        hops,
        conditions: uniq,
    }
}
