//! `meshctl authz check`: explain offline which hop allows or denies a request, which policy
//! and rule decided, and why. Reads the policies as users apply them, a request file and an
//! optional mesh file; renders `mesh_policy::explain` as JSON or text.
//!
//! Every input error names the file and the field (or the object and the webhook's message);
//! the caller exits 2 on them and 0 for any decision.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use mesh_policy::{
    Explanation, MeshConfig, PolicySet,
    explain::{
        Client, Destination, HttpRequest, JwtInput, Protocol, Request, Service, Waypoint, Workload,
    },
    mesh::FeatureFlags,
    path::PathNormalization,
    scope::{AddressedTo, WaypointFor},
};
use serde::Deserialize;

/// Bad input: the message says which file and field, and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: {field}: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Policy(String),
}

fn read(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|e| InputError::Io {
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

/// `--policies FILE_OR_DIR`: one multi-document file, or every `.yaml`/`.yml` file of a
/// directory (sorted by name).
pub fn load_policies(path: &Path) -> Result<PolicySet, InputError> {
    let mut files: Vec<PathBuf> = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| InputError::Io {
            path: path.display().to_string(),
            message: format!("cannot list the directory: {e}"),
        })?;
        for e in entries.flatten() {
            let p = e.path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or_default();
            if p.is_file() && (ext == "yaml" || ext == "yml") {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(InputError::Io {
                path: path.display().to_string(),
                message: "the directory has no .yaml files".into(),
            });
        }
    } else {
        files.push(path.to_path_buf());
    }
    let mut set = PolicySet::default();
    for f in files {
        let text = read(&f)?;
        let parsed = mesh_policy::parse_objects(&f.display().to_string(), &text)
            .map_err(|e| InputError::Policy(e.to_string()))?;
        set.extend(parsed);
    }
    Ok(set)
}

/// `serde_yaml` errors carry `field.path: message at line L column C`; split the field off.
fn yaml_error(path: &Path, e: &serde_yaml::Error) -> InputError {
    let msg = e.to_string();
    let (field, message) = match msg.split_once(": ") {
        Some((f, m)) if !f.contains(' ') => (f.to_string(), m.to_string()),
        _ => ("(document)".to_string(), msg.clone()),
    };
    InputError::Field {
        path: path.display().to_string(),
        field,
        message,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    trust_domain_aliases: Vec<String>,
    #[serde(default)]
    feature_flags: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    path_normalization: Option<PathNormalization>,
    #[serde(default, alias = "strictPolicy")]
    strict_policy: bool,
}

/// `--mesh MESH.yaml` (every field optional; Istio's defaults).
pub fn load_mesh(path: Option<&Path>) -> Result<MeshConfig, InputError> {
    let Some(path) = path else {
        return Ok(MeshConfig::default());
    };
    let text = read(path)?;
    if text.trim().is_empty() {
        return Ok(MeshConfig::default());
    }
    let raw: RawMesh = serde_yaml::from_str(&text).map_err(|e| yaml_error(path, &e))?;
    let field = |field: &str, message: String| InputError::Field {
        path: path.display().to_string(),
        field: field.to_string(),
        message,
    };
    let d = MeshConfig::default();
    let trust_domain = raw.trust_domain.unwrap_or(d.trust_domain);
    mesh_core::Identity::new(&trust_domain, "ns", "sa").map_err(|e| {
        field(
            "trust_domain",
            format!("{trust_domain:?} is not a valid trust domain ({e})"),
        )
    })?;
    Ok(MeshConfig {
        trust_domain,
        root_namespace: raw.root_namespace.unwrap_or(d.root_namespace),
        trust_domain_aliases: raw.trust_domain_aliases,
        feature_flags: FeatureFlags::from_map(&raw.feature_flags)
            .map_err(|m| field("feature_flags", m))?,
        path_normalization: raw.path_normalization.unwrap_or(d.path_normalization),
        strict_policy: raw.strict_policy,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    identity: Option<String>,
    ip: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    service_account: String,
    ip: String,
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    namespace: String,
    workload: RawWorkload,
    #[serde(default)]
    service: Option<RawService>,
    #[serde(default)]
    addressed_to: Option<RawAddressedTo>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawAddressedTo {
    Service,
    Workload,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawProtocol {
    Http,
    Tcp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    #[serde(default = "yes")]
    present: bool,
    #[serde(default = "yes")]
    valid: bool,
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    claims: BTreeMap<String, serde_yaml::Value>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    method: String,
    path: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    jwt: Option<RawJwt>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawWaypointFor {
    Service,
    Workload,
    All,
    None,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWaypoint {
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    ip: String,
    #[serde(default, rename = "for")]
    for_: Option<RawWaypointFor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    source: RawSource,
    destination: RawDestination,
    #[serde(default)]
    protocol: Option<RawProtocol>,
    #[serde(default)]
    http: Option<RawHttp>,
    #[serde(default)]
    waypoint: Option<RawWaypoint>,
}

/// `--request REQUEST.yaml`.
pub fn load_request(path: &Path) -> Result<Request, InputError> {
    let text = read(path)?;
    let raw: RawRequest = serde_yaml::from_str(&text).map_err(|e| yaml_error(path, &e))?;
    let field = |field: &str, message: String| InputError::Field {
        path: path.display().to_string(),
        field: field.to_string(),
        message,
    };
    let ip = |name: &str, v: &str| {
        v.parse::<IpAddr>()
            .map_err(|_| field(name, format!("{v:?} is not an IP address")))
    };
    let identity = match raw.source.identity.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<mesh_core::Identity>().map_err(|e| {
            field(
                "source.identity",
                format!("{e} (write null for a plaintext client)"),
            )
        })?),
    };
    let d = raw.destination;
    let service = match d.service {
        Some(s) => Some(Service {
            vip: ip("destination.service.vip", &s.vip)?,
            name: s.name,
            port: s.port,
        }),
        None => None,
    };
    let addressed_to = match d.addressed_to {
        Some(RawAddressedTo::Service) => AddressedTo::Service,
        Some(RawAddressedTo::Workload) => AddressedTo::Workload,
        None if service.is_some() => AddressedTo::Service,
        None => AddressedTo::Workload,
    };
    if addressed_to == AddressedTo::Service && service.is_none() {
        return Err(field(
            "destination.service",
            "required when destination.addressed_to is service".into(),
        ));
    }
    let protocol = match (raw.protocol, raw.http.is_some()) {
        (Some(RawProtocol::Http), _) | (None, true) => Protocol::Http,
        (Some(RawProtocol::Tcp), _) | (None, false) => Protocol::Tcp,
    };
    let http = match raw.http {
        Some(h) => {
            if !h.path.starts_with('/') {
                return Err(field(
                    "http.path",
                    format!("{:?} must start with `/`", h.path),
                ));
            }
            let jwt = match h.jwt {
                Some(j) if j.present => {
                    let claims = serde_json::to_value(&j.claims)
                        .ok()
                        .and_then(|v| v.as_object().cloned())
                        .ok_or_else(|| {
                            field("http.jwt.claims", "must be a mapping of claim names".into())
                        })?;
                    Some(JwtInput {
                        valid: j.valid,
                        iss: j.iss,
                        sub: j.sub,
                        claims,
                    })
                }
                _ => None,
            };
            if jwt.as_ref().is_some_and(|j| j.valid && j.iss.is_empty()) {
                return Err(field("http.jwt.iss", "required for a valid token".into()));
            }
            Some(HttpRequest {
                method: h.method,
                path: h.path,
                host: h.host,
                headers: h.headers,
                jwt,
            })
        }
        None if protocol == Protocol::Http => {
            return Err(field("http", "required when protocol is http".into()));
        }
        None => None,
    };
    let waypoint = match raw.waypoint {
        Some(w) => Some(Waypoint {
            ip: ip("waypoint.ip", &w.ip)?,
            service_account: w.service_account.unwrap_or_else(|| w.name.clone()),
            for_: match w.for_.unwrap_or(RawWaypointFor::Service) {
                RawWaypointFor::Service => WaypointFor::Service,
                RawWaypointFor::Workload => WaypointFor::Workload,
                RawWaypointFor::All => WaypointFor::All,
                RawWaypointFor::None => WaypointFor::None,
            },
            name: w.name,
            namespace: w.namespace,
        }),
        None => None,
    };
    Ok(Request {
        source: Client {
            identity,
            ip: ip("source.ip", &raw.source.ip)?,
        },
        destination: Destination {
            namespace: d.namespace,
            workload: Workload {
                labels: d.workload.labels,
                service_account: d.workload.service_account,
                ip: ip("destination.workload.ip", &d.workload.ip)?,
                port: d.workload.port,
            },
            service,
            addressed_to,
        },
        protocol,
        http,
        waypoint,
    })
}

/// Output format of `authz check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Text,
}

/// Loads everything and explains; `Err` is bad input (exit 2).
pub fn check(
    policies: &Path,
    request: &Path,
    mesh: Option<&Path>,
    output: Output,
) -> Result<String, InputError> {
    let set = load_policies(policies)?;
    let mesh = load_mesh(mesh)?;
    let req = load_request(request)?;
    let exp = mesh_policy::explain(&set, &mesh, &req).map_err(|e| match e {
        mesh_policy::explain::ExplainError::Request { field: f, message } => InputError::Field {
            path: request.display().to_string(),
            field: f.to_string(),
            message,
        },
        other => InputError::Policy(other.to_string()),
    })?;
    Ok(match output {
        Output::Json => render_json(&exp),
        Output::Text => render_text(&exp, &req),
    })
}

pub fn render_json(exp: &Explanation) -> String {
    let mut s =
        serde_json::to_string_pretty(exp).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

fn upper(d: mesh_policy::Decision) -> &'static str {
    match d {
        mesh_policy::Decision::Allow => "ALLOW",
        mesh_policy::Decision::Deny => "DENY",
    }
}

/// A person's explanation: the path, then each hop with what it sees and why it decided.
pub fn render_text(exp: &Explanation, req: &Request) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Decision: {}", upper(exp.decision));
    let src = req
        .source
        .identity
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "plaintext client".into());
    let mut path = format!("{src} ({})", req.source.ip);
    for h in &exp.hops {
        match h.at {
            mesh_policy::HopKind::Waypoint => {
                if let Some(w) = &req.waypoint {
                    let _ = write!(path, " -> waypoint {}/{}", w.namespace, w.name);
                }
            }
            mesh_policy::HopKind::Ztunnel => {
                let _ = write!(
                    path,
                    " -> ztunnel of {}/{} ({}:{})",
                    req.destination.namespace,
                    req.destination.workload.service_account,
                    req.destination.workload.ip,
                    req.destination.workload.port
                );
            }
        }
    }
    let _ = writeln!(s, "Path:     {path}");
    for (i, h) in exp.hops.iter().enumerate() {
        let at = match h.at {
            mesh_policy::HopKind::Waypoint => "waypoint",
            mesh_policy::HopKind::Ztunnel => "destination ztunnel",
        };
        let _ = writeln!(s, "\n{}. {at}: {}", i + 1, upper(h.decision));
        let _ = writeln!(s, "   sees:       {}", h.sees);
        let evaluated = if h.evaluated.is_empty() {
            "no policy applies here".to_string()
        } else {
            h.evaluated.join(", ")
        };
        let _ = writeln!(s, "   policies:   {evaluated}");
        match (&h.policy, h.rule) {
            (Some(p), Some(r)) => {
                let _ = writeln!(s, "   decided by: {p} rule {r}");
            }
            (Some(p), None) => {
                let _ = writeln!(s, "   decided by: {p}");
            }
            _ => {
                let _ = writeln!(s, "   decided by: no single policy (default)");
            }
        }
        let _ = writeln!(s, "   reason:     {}", h.reason);
        if !h.warnings.is_empty() {
            let _ = writeln!(s, "   warnings:");
            for w in &h.warnings {
                let _ = writeln!(s, "   - {w}");
            }
        }
    }
    if !exp.conditions.is_empty() {
        let _ = writeln!(s, "\nStatus conditions:");
        for c in &exp.conditions {
            let _ = writeln!(
                s,
                "- {} {:?}={} {}: {}",
                c.policy, c.type_, c.status, c.reason, c.message
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "source: {identity: spiffe://cluster.local/ns/bar/sa/sleep, ip: 10.244.1.5}
destination:
  namespace: foo
  workload: {labels: {app: httpbin}, service_account: httpbin, ip: 10.244.2.7, port: 8080}
  service: {name: httpbin, vip: 10.96.10.20, port: 8000}
protocol: http
http: {method: GET, path: /ip, host: h, jwt: {present: true, valid: true, iss: i, sub: s, claims: {groups: [dev]}}}
waypoint: {name: waypoint, namespace: default, ip: 10.244.3.9}
";

    fn load(name: &str, text: &str, f: fn(&Path) -> Result<(), InputError>) -> String {
        let dir = std::env::temp_dir().join(format!("meshctl-authz-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.yaml");
        std::fs::write(&p, text).unwrap();
        let r = f(&p).err().map(|e| e.to_string()).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    fn req_err(name: &str, text: &str) -> String {
        load(name, text, |p| load_request(p).map(|_| ()))
    }

    fn mesh_err(name: &str, text: &str) -> String {
        load(name, text, |p| load_mesh(Some(p)).map(|_| ()))
    }

    #[test]
    fn good_request_and_defaults() {
        assert_eq!(req_err("good", GOOD), "");
        let dir =
            std::env::temp_dir().join(format!("meshctl-authz-{}-defaults", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.yaml");
        std::fs::write(&p, GOOD).unwrap();
        let r = load_request(&p).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            r.destination.addressed_to,
            AddressedTo::Service,
            "service given"
        );
        let w = r.waypoint.unwrap();
        assert_eq!(
            (w.service_account.as_str(), w.for_),
            ("waypoint", WaypointFor::Service)
        );
        assert_eq!(r.http.unwrap().jwt.unwrap().claims["groups"][0], "dev");
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let cases = [
            (
                "ip",
                GOOD.replace("ip: 10.244.1.5", "ip: nope"),
                "source.ip: \"nope\" is not an IP address",
            ),
            (
                "noip",
                GOOD.replace(", ip: 10.244.1.5", ""),
                "source: missing field `ip`",
            ),
            (
                "vip",
                GOOD.replace("vip: 10.96.10.20", "vip: x"),
                "destination.service.vip",
            ),
            (
                "port",
                GOOD.replace("port: 8080", "port: -1"),
                "destination.workload.port",
            ),
            (
                "for",
                GOOD.replace("ip: 10.244.3.9}", "ip: 10.244.3.9, for: pods}"),
                "waypoint.for: unknown variant `pods`",
            ),
            (
                "proto",
                GOOD.replace("protocol: http", "protocol: grpc"),
                "protocol: unknown variant `grpc`",
            ),
            (
                "nohttp",
                GOOD.replace("http: {method", "xhttp: {method"),
                "unknown field `xhttp`",
            ),
            (
                "path",
                GOOD.replace("path: /ip", "path: ip"),
                "http.path: \"ip\" must start with `/`",
            ),
            (
                "iss",
                GOOD.replace("iss: i, ", ""),
                "http.jwt.iss: required for a valid token",
            ),
            (
                "id",
                GOOD.replace(
                    "spiffe://cluster.local/ns/bar/sa/sleep",
                    "spiffe://cluster.local/bar",
                ),
                "source.identity",
            ),
            (
                "svc",
                GOOD.replace(
                    "  service: {name: httpbin, vip: 10.96.10.20, port: 8000}\n",
                    "  addressed_to: service\n",
                ),
                "destination.service: required when destination.addressed_to is service",
            ),
            (
                "http",
                GOOD.replace("http: {method", "#"),
                "http: required when protocol is http",
            ),
        ];
        for (name, text, want) in cases {
            let e = req_err(name, &text);
            assert!(e.contains(want), "{name}: want {want:?} in {e:?}");
            assert!(e.contains("f.yaml: "), "{name}: {e}");
        }
    }

    #[test]
    fn mesh_file_errors_name_the_field() {
        assert_eq!(
            mesh_err("ok", "strictPolicy: true\ntrust_domain_aliases: [old]\n"),
            ""
        );
        assert!(
            mesh_err("flag", "feature_flags: {PILOT_AUTO_ALLOW: true}\n")
                .contains("feature_flags: feature_flags.PILOT_AUTO_ALLOW: unknown flag")
        );
        assert!(
            mesh_err("norm", "path_normalization: FANCY\n")
                .contains("path_normalization: unknown variant `FANCY`")
        );
        assert!(
            mesh_err("td", "trust_domain: \"Not/Valid\"\n")
                .contains("trust_domain: \"Not/Valid\" is not a valid trust domain")
        );
        assert!(mesh_err("typo", "trust_domian: x\n").contains("unknown field `trust_domian`"));
    }
}
