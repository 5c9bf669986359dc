//! The waypoint's configuration: the only place that reads flags and environment variables.
//!
//! [`Args`] is what the operator typed (every flag has an environment variable); [`Config`]
//! is the validated result the rest of the program receives. All problems are reported
//! together and `main` exits with status 64 (EX_USAGE).
//!
//! Two sources: a local file (`WAYPOINT_CONFIG`) or the control plane (`XDS_ADDRESS`, with
//! the variables istiod-lite's waypoint Deployment sets: `XDS_ROOT_CA`, `CA_ADDRESS`,
//! `CA_ROOT_CA`, `AUTH_TOKEN_PATH`, `TRUST_DOMAIN`, `CLUSTER_ID`, `POD_NAME`,
//! `POD_NAMESPACE`, `INSTANCE_IP`, `SERVICE_ACCOUNT`, `NODE_NAME`, and `GATEWAY_NAME`).
//! Certificates come from a local CA (`LOCAL_CA_DIR`) or Istio's CA (`CA_ADDRESS`, which
//! defaults to `XDS_ADDRESS`). Trace spans go to an OTLP/gRPC collector when
//! `TRACING_OTLP_ENDPOINT` is set ([`TracingConfig`]; off by default).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use mesh_core::Identity;
use mesh_rt::config::parse_duration;
use mesh_xds::ControlPlane;
use serde::Serialize;

use crate::{state::WaypointId, xds::NodeInfo};

/// Where workloads, services and Kubernetes objects come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfigSource {
    /// A local YAML file (`docs/waypoint.md`), re-read when it changes.
    File(PathBuf),
    /// Delta ADS from istiod-lite: `istio.workload.Address` and `mesh.config.v1.KubeObject`.
    Xds(XdsSource),
}

/// The control plane, and who this waypoint is to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsSource {
    pub endpoint: ControlPlane,
    pub node: NodeInfo,
    /// The Gateway served and the identity presented (from the flags, not from xDS).
    pub waypoint: WaypointId,
}

/// Where the waypoint's own certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CertSource {
    /// A CA directory in Istio's `cacerts` layout (dev and test meshes).
    LocalCa {
        dir: PathBuf,
        #[serde(with = "secs")]
        ttl: Duration,
    },
    /// Istio's `IstioCertificateService/CreateCertificate` (istiod or istiod-lite).
    IstioCa {
        endpoint: ControlPlane,
        #[serde(with = "secs")]
        ttl: Duration,
    },
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs()))
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "waypoint",
    version,
    about = "Envoy-free waypoint: L7 policy and routing inside HBONE."
)]
pub struct Args {
    /// The waypoint's identity, Gateway, workloads, services and objects (YAML).
    #[arg(long, env = "WAYPOINT_CONFIG")]
    pub config: Option<PathBuf>,

    /// The control plane's delta xDS endpoint (istiod-lite), e.g.
    /// `https://istiod.istio-system.svc:15012`. Mutually exclusive with WAYPOINT_CONFIG.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,

    /// Root certificates (PEM) that sign the control plane's serving certificate.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_ca: PathBuf,

    /// The name to verify in the control plane's certificate when it differs from the
    /// address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,

    /// The Istio CA endpoint; defaults to XDS_ADDRESS. Mutually exclusive with LOCAL_CA_DIR.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,

    /// Roots that sign the CA's serving certificate; defaults to XDS_ROOT_CA.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_ca: Option<PathBuf>,

    /// Like ALT_XDS_HOSTNAME, for the CA; defaults to ALT_XDS_HOSTNAME.
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,

    /// Projected service-account token (audience istio-ca), re-read on every request.
    #[arg(
        long,
        env = "AUTH_TOKEN_PATH",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub auth_token_path: PathBuf,

    /// Requested lifetime of certificates from the Istio CA.
    #[arg(long, env = "SECRET_TTL", default_value = "24h")]
    pub secret_ttl: String,

    /// Kubernetes cluster id, sent to the control plane.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// This pod's IP, name and namespace: the xDS node id
    /// `waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`. The namespace is the Gateway's.
    #[arg(long, env = "INSTANCE_IP", default_value = "1.1.1.1")]
    pub instance_ip: String,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,

    /// The node the pod runs on (node metadata only).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// The pod's service account: the identity presented upstream. Defaults to GATEWAY_NAME.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// The Gateway (class istio-waypoint) this waypoint serves, in POD_NAMESPACE: routes
    /// whose parentRef names it attach here. Defaults to SERVICE_ACCOUNT.
    #[arg(long, env = "GATEWAY_NAME")]
    pub gateway_name: Option<String>,

    /// Issue the waypoint's certificate from a local CA in Istio's `cacerts` layout.
    #[arg(long, env = "LOCAL_CA_DIR")]
    pub local_ca_dir: Option<PathBuf>,

    /// Lifetime of certificates issued by the local CA.
    #[arg(long, env = "LOCAL_CA_CERT_TTL", default_value = "24h")]
    pub local_ca_cert_ttl: String,

    /// The mesh trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Further trust domains whose clients are accepted (comma-separated).
    #[arg(long, env = "TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,

    /// HBONE listener.
    #[arg(long, env = "HBONE_ADDR", default_value = "[::]:15008")]
    pub hbone_addr: SocketAddr,

    /// Admin: /config_dump, /quitquitquit, /logging (keep on loopback).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus /metrics.
    #[arg(long, env = "STATS_ADDR", default_value = "[::]:15020")]
    pub stats_addr: SocketAddr,

    /// /healthz/ready.
    #[arg(long, env = "READINESS_ADDR", default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,

    /// How long open requests may finish after SIGTERM.
    #[arg(long, env = "DRAIN_DEADLINE", default_value = "5s")]
    pub drain_deadline: String,

    /// How long to wait for a client's first bytes on a port of unknown protocol before
    /// treating it as opaque TCP.
    #[arg(long, env = "PROTOCOL_DETECTION_TIMEOUT", default_value = "100ms")]
    pub protocol_detection_timeout: String,

    /// Connect timeout for upstream HBONE connections.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "10s")]
    pub connect_timeout: String,

    /// Largest request head (request line and headers) accepted from a client, bytes.
    #[arg(long, env = "MAX_REQUEST_HEADERS_BYTES", default_value = "61440")]
    pub max_request_headers_bytes: usize,

    /// Request bodies up to this size are buffered so they can be retried and mirrored.
    #[arg(long, env = "RETRY_BUFFER_BYTES", default_value = "65536")]
    pub retry_buffer_bytes: usize,

    /// Data-plane worker threads.
    #[arg(long, env = "WORKER_THREADS", default_value = "2")]
    pub worker_threads: usize,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    /// One JSON object per log line.
    #[arg(long, env = "LOG_JSON", default_value = "false")]
    pub log_json: bool,

    /// OTLP/gRPC collector for trace spans, `http://host:port` (e.g.
    /// `http://otel-collector.observability:4317`). Unset: no spans are exported (the W3C
    /// trace context is still propagated).
    #[arg(long, env = "TRACING_OTLP_ENDPOINT")]
    pub tracing_otlp_endpoint: Option<String>,

    /// Percentage (0–100) of requests arriving without a trace context for which the
    /// waypoint starts a sampled trace; Istio's default is 1. A caller's `traceparent`
    /// keeps its own sampled flag.
    #[arg(long, env = "TRACING_SAMPLING", default_value = "1")]
    pub tracing_sampling: f64,

    /// Spans per OTLP export request at most.
    #[arg(long, env = "TRACING_BATCH_SIZE", default_value = "512")]
    pub tracing_batch_size: usize,

    /// How often queued spans are exported.
    #[arg(long, env = "TRACING_BATCH_INTERVAL", default_value = "1s")]
    pub tracing_batch_interval: String,

    /// Finished spans waiting for export at most; beyond it spans are dropped and counted.
    #[arg(long, env = "TRACING_QUEUE_SIZE", default_value = "4096")]
    pub tracing_queue_size: usize,
}

/// Trace export (on when TRACING_OTLP_ENDPOINT is set).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingConfig {
    /// `http://host:port` of the OTLP/gRPC collector.
    pub endpoint: String,
    /// For traces the waypoint starts.
    pub sampling_percent: f64,
    pub batch_size: usize,
    #[serde(with = "millis")]
    pub batch_interval: Duration,
    pub queue_size: usize,
    /// Istio's node id, `waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`, for `node_id`.
    pub node_id: String,
}

impl TracingConfig {
    /// TRACING_SAMPLING as parts per million.
    pub fn sample_ppm(&self) -> u32 {
        (self.sampling_percent * 10_000.0).round() as u32
    }
}

/// Checks an OTLP endpoint: `http://host:port`, or `host:port` (taken as http).
fn otlp_endpoint(v: &str) -> Result<String, String> {
    let var = "TRACING_OTLP_ENDPOINT";
    if v.starts_with("https://") {
        return Err(format!(
            "{var} {v:?}: TLS to the collector is not supported; use http:// (a collector in the cluster or a local agent)"
        ));
    }
    let full = if v.starts_with("http://") {
        v.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", v.trim_end_matches('/'))
    };
    match full.parse::<http::Uri>() {
        Ok(u)
            if u.port_u16().is_some()
                && u.host().is_some_and(|h| !h.is_empty())
                && u.path() == "/" =>
        {
            Ok(full)
        }
        _ => Err(format!(
            "{var} {v:?} is not of the form http://host:port (OTLP/gRPC, usually port 4317)"
        )),
    }
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub source: ConfigSource,
    pub cert_source: CertSource,
    pub auth_token_path: PathBuf,
    pub cluster_id: String,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub hbone_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub drain_deadline: Duration,
    pub protocol_detection_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_request_headers_bytes: usize,
    pub retry_buffer_bytes: usize,
    pub worker_threads: usize,
    pub log_level: String,
    pub log_json: bool,
    /// `None`: tracing off.
    pub tracing: Option<TracingConfig>,
}

/// Every problem found in the arguments.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let Args {
            config,
            xds_address,
            xds_root_ca,
            alt_xds_hostname,
            ca_address,
            ca_root_ca,
            alt_ca_hostname,
            auth_token_path,
            secret_ttl,
            cluster_id,
            instance_ip,
            pod_name,
            pod_namespace,
            node_name,
            service_account,
            gateway_name,
            local_ca_dir,
            local_ca_cert_ttl,
            trust_domain,
            trust_domain_aliases,
            hbone_addr,
            admin_addr,
            stats_addr,
            readiness_addr,
            drain_deadline,
            protocol_detection_timeout,
            connect_timeout,
            max_request_headers_bytes,
            retry_buffer_bytes,
            worker_threads,
            log_level,
            log_json,
            tracing_otlp_endpoint,
            tracing_sampling,
            tracing_batch_size,
            tracing_batch_interval,
            tracing_queue_size,
        } = self;
        let mut errs = Vec::new();
        let mut dur = |name: &str, v: &str, min: Duration| match parse_duration(v) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                errs.push(format!("{name}: {v:?} must be at least {min:?}"));
                min
            }
            Err(e) => {
                errs.push(format!("{name}: {e}"));
                min
            }
        };
        let local_ca_cert_ttl = dur(
            "LOCAL_CA_CERT_TTL",
            &local_ca_cert_ttl,
            Duration::from_secs(60),
        );
        let drain_deadline = dur("DRAIN_DEADLINE", &drain_deadline, Duration::ZERO);
        let protocol_detection_timeout = dur(
            "PROTOCOL_DETECTION_TIMEOUT",
            &protocol_detection_timeout,
            Duration::from_millis(1),
        );
        let connect_timeout = dur(
            "CONNECT_TIMEOUT",
            &connect_timeout,
            Duration::from_millis(1),
        );
        let secret_ttl = dur("SECRET_TTL", &secret_ttl, Duration::from_secs(60));
        let tracing_batch_interval = dur(
            "TRACING_BATCH_INTERVAL",
            &tracing_batch_interval,
            Duration::from_millis(1),
        );
        let node_id = format!(
            "waypoint~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"
        );
        let xds = xds_address.as_deref().map(|a| {
            ControlPlane::parse("XDS_ADDRESS", a, alt_xds_hostname.as_deref(), &xds_root_ca)
        });
        let source = match (config, xds) {
            (Some(_), Some(_)) => {
                errs.push(
                    "WAYPOINT_CONFIG and XDS_ADDRESS are both set: pick one configuration source"
                        .to_string(),
                );
                ConfigSource::File(PathBuf::new())
            }
            (Some(p), None) => ConfigSource::File(p),
            (None, Some(Ok(endpoint))) => {
                let gateway = gateway_name
                    .clone()
                    .or_else(|| service_account.clone())
                    .unwrap_or_default();
                let sa = service_account.clone().unwrap_or_else(|| gateway.clone());
                if gateway.is_empty() {
                    errs.push(
                        "GATEWAY_NAME (--gateway-name): required with XDS_ADDRESS (the waypoint's Gateway; SERVICE_ACCOUNT is used when unset)".to_string(),
                    );
                }
                if pod_namespace.is_empty() {
                    errs.push(
                        "POD_NAMESPACE (--pod-namespace): required with XDS_ADDRESS (the Gateway's namespace; set it from metadata.namespace)".to_string(),
                    );
                }
                let identity = match Identity::new(&trust_domain, &pod_namespace, &sa) {
                    Ok(id) => Some(id),
                    Err(e) if !gateway.is_empty() && !pod_namespace.is_empty() => {
                        errs.push(format!("SERVICE_ACCOUNT {sa:?}: {e}"));
                        None
                    }
                    Err(_) => None,
                };
                match identity {
                    Some(identity) => ConfigSource::Xds(XdsSource {
                        endpoint,
                        node: NodeInfo {
                            proxy: mesh_xds::NodeInfo {
                                instance_ip,
                                pod_name,
                                pod_namespace: pod_namespace.clone(),
                                node_name,
                                cluster_id: cluster_id.clone(),
                            },
                            service_account: sa,
                            gateway_name: gateway.clone(),
                        },
                        waypoint: WaypointId {
                            name: gateway,
                            namespace: pod_namespace,
                            identity,
                        },
                    }),
                    None => ConfigSource::File(PathBuf::new()),
                }
            }
            (None, Some(Err(e))) => {
                errs.push(e);
                ConfigSource::File(PathBuf::new())
            }
            (None, None) => {
                errs.push(
                    "no configuration source: set XDS_ADDRESS (the control plane) or WAYPOINT_CONFIG (--config, a local file)".to_string(),
                );
                ConfigSource::File(PathBuf::new())
            }
        };
        // The CA defaults to the xDS endpoint, as istiod serves both on :15012.
        let ca = ca_address.as_deref().or(xds_address.as_deref()).map(|a| {
            ControlPlane::parse(
                if ca_address.is_some() {
                    "CA_ADDRESS"
                } else {
                    "XDS_ADDRESS"
                },
                a,
                alt_ca_hostname.as_deref().or(alt_xds_hostname.as_deref()),
                ca_root_ca.as_deref().unwrap_or(&xds_root_ca),
            )
        });
        let cert_source = match (local_ca_dir, ca) {
            (Some(_), Some(_)) if ca_address.is_some() => {
                errs.push(
                    "LOCAL_CA_DIR and CA_ADDRESS are both set: pick one certificate source"
                        .to_string(),
                );
                None
            }
            (Some(dir), _) => Some(CertSource::LocalCa {
                dir,
                ttl: local_ca_cert_ttl,
            }),
            (None, Some(Ok(endpoint))) => Some(CertSource::IstioCa {
                endpoint,
                ttl: secret_ttl,
            }),
            (None, Some(Err(e))) => {
                errs.push(e);
                None
            }
            (None, None) => {
                errs.push(
                    "no certificate source: set CA_ADDRESS/XDS_ADDRESS (the Istio CA) or LOCAL_CA_DIR (make one with `meshctl ca create DIR`)".to_string(),
                );
                None
            }
        };
        if trust_domain.is_empty() || trust_domain.contains('/') {
            errs.push(format!(
                "TRUST_DOMAIN: {trust_domain:?} is not a trust domain"
            ));
        }
        if worker_threads == 0 {
            errs.push("WORKER_THREADS: must be at least 1".into());
        }
        if max_request_headers_bytes < 1024 {
            errs.push("MAX_REQUEST_HEADERS_BYTES: must be at least 1024".into());
        }
        if !(0.0..=100.0).contains(&tracing_sampling) {
            errs.push(format!(
                "TRACING_SAMPLING: {tracing_sampling} is not a percentage (0 to 100)"
            ));
        }
        if tracing_batch_size == 0 {
            errs.push("TRACING_BATCH_SIZE: must be at least 1".into());
        }
        if tracing_queue_size == 0 {
            errs.push("TRACING_QUEUE_SIZE: must be at least 1".into());
        }
        let tracing = match tracing_otlp_endpoint.as_deref().map(otlp_endpoint) {
            None => None,
            Some(Err(e)) => {
                errs.push(e);
                None
            }
            Some(Ok(endpoint)) => Some(TracingConfig {
                endpoint,
                sampling_percent: tracing_sampling,
                batch_size: tracing_batch_size,
                batch_interval: tracing_batch_interval,
                queue_size: tracing_queue_size,
                node_id,
            }),
        };
        let Some(cert_source) = cert_source.filter(|_| errs.is_empty()) else {
            return Err(ConfigError(errs));
        };
        Ok(Config {
            source,
            cert_source,
            auth_token_path,
            cluster_id,
            trust_domain,
            trust_domain_aliases,
            hbone_addr,
            admin_addr,
            stats_addr,
            readiness_addr,
            drain_deadline,
            protocol_detection_timeout,
            connect_timeout,
            max_request_headers_bytes,
            retry_buffer_bytes,
            worker_threads,
            log_level,
            log_json,
            tracing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_together() {
        let e = Args::try_parse_from([
            "waypoint",
            "--drain-deadline",
            "soon",
            "--worker-threads",
            "0",
        ])
        .unwrap()
        .validate()
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("DRAIN_DEADLINE"), "{s}");
        assert!(s.contains("WORKER_THREADS"), "{s}");
        assert!(s.contains("WAYPOINT_CONFIG"), "{s}");
        assert!(s.contains("LOCAL_CA_DIR"), "{s}");
    }

    #[test]
    fn defaults_validate() {
        let c = Args::try_parse_from(["waypoint", "--config", "/x.yaml", "--local-ca-dir", "/ca"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.protocol_detection_timeout, Duration::from_millis(100));
    }

    #[test]
    fn tracing_is_off_by_default_and_checked_when_on() {
        let base = ["waypoint", "--config", "/x.yaml", "--local-ca-dir", "/ca"];
        let c = Args::try_parse_from(base).unwrap().validate().unwrap();
        assert_eq!(c.tracing, None);
        let on = |extra: &[&str]| {
            Args::try_parse_from(base.iter().chain(extra))
                .unwrap()
                .validate()
        };
        let c = on(&["--tracing-otlp-endpoint", "otel.observability:4317"]).unwrap();
        let t = c.tracing.unwrap();
        assert_eq!(t.endpoint, "http://otel.observability:4317");
        assert_eq!(t.sample_ppm(), 10_000, "Istio's 1 %");
        assert_eq!(t.batch_interval, Duration::from_secs(1));
        let e = on(&[
            "--tracing-otlp-endpoint",
            "https://otel:4317",
            "--tracing-sampling",
            "101",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("TLS") && e.contains("TRACING_SAMPLING"), "{e}");
        let e = on(&["--tracing-otlp-endpoint", "http://otel/v1/traces"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://host:port"), "{e}");
    }

    #[test]
    fn xds_takes_the_deployment_variables_and_defaults_the_ca_to_it() {
        let c = Args::try_parse_from([
            "waypoint",
            "--xds-address",
            "https://istiod.istio-system.svc:15012",
            "--pod-namespace",
            "foo",
            "--pod-name",
            "waypoint-abc",
            "--instance-ip",
            "10.0.0.9",
            "--service-account",
            "waypoint",
        ])
        .unwrap()
        .validate()
        .unwrap();
        let ConfigSource::Xds(x) = &c.source else {
            panic!("{:?}", c.source)
        };
        assert_eq!(
            x.waypoint.name, "waypoint",
            "GATEWAY_NAME defaults to SERVICE_ACCOUNT"
        );
        assert_eq!(
            x.waypoint.identity.to_string(),
            "spiffe://cluster.local/ns/foo/sa/waypoint"
        );
        assert_eq!(x.endpoint.server_name, "istiod.istio-system.svc");
        assert!(
            matches!(&c.cert_source, CertSource::IstioCa { endpoint, .. } if endpoint.authority == "istiod.istio-system.svc:15012")
        );

        let e = Args::try_parse_from([
            "waypoint",
            "--xds-address",
            "https://istiod:15012",
            "--config",
            "/x.yaml",
        ])
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("both set"), "{e}");
        let e = Args::try_parse_from(["waypoint", "--xds-address", "https://istiod:15012"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GATEWAY_NAME") && e.contains("POD_NAMESPACE"),
            "{e}"
        );
    }
}
