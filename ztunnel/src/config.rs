//! ztunnel's configuration: the only place that reads flags and environment variables.
//!
//! Every setting is a flag with an environment variable of the same meaning (Istio's names
//! where Istio has one: `LOCAL_XDS_PATH`, `NODE_NAME`, `TRUST_DOMAIN`, …). [`Args`] is what
//! the user typed; [`Config`] is the validated result the rest of the program receives.
//! All problems are reported together, and `main` exits with status 64 (EX_USAGE).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use mesh_rt::config::parse_duration;
use serde::Serialize;

/// How ztunnel captures traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// One ztunnel inside one network namespace whose traffic iptables REDIRECTs to it.
    /// It serves every workload of the configuration whose IP is local (or on its node).
    Dedicated,
    /// One ztunnel per node serving every enrolled pod from inside the pod's own network
    /// namespace; the CNI node agent hands the namespaces over ZDS (INPOD_UDS).
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Command-line flags and their environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Per-node HBONE proxy of the mesh (L4 only)."
)]
pub struct Args {
    /// Capture mode.
    #[arg(long, env = "PROXY_MODE", value_enum, default_value = "dedicated")]
    pub proxy_mode: ProxyMode,

    /// ZDS socket of the CNI node agent (shared mode).
    #[arg(
        long,
        env = "INPOD_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub inpod_uds: PathBuf,

    /// Workloads, services and policies from a file in Istio ztunnel's LOCAL_XDS_PATH format.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,

    /// Issue certificates locally from a CA in Istio's `cacerts` layout (ca-key.pem,
    /// ca-cert.pem, root-cert.pem, cert-chain.pem). Every ztunnel of the mesh must use the
    /// same CA directory. `meshctl ca create DIR` makes one.
    #[arg(long, env = "LOCAL_CA_DIR")]
    pub local_ca_dir: Option<PathBuf>,

    /// Lifetime of certificates issued by the local CA.
    #[arg(long, env = "LOCAL_CA_CERT_TTL", value_parser = parse_duration, default_value = "24h")]
    pub local_ca_cert_ttl: Duration,

    /// The control plane's delta xDS endpoint (istiod or istiod-lite), e.g.
    /// `https://istiod.istio-system.svc:15012`. Mutually exclusive with LOCAL_XDS_PATH.
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
    /// address's host (e.g. `istiod.istio-system.svc` when dialling an IP).
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,

    /// The Istio CA endpoint (`IstioCertificateService`); defaults to XDS_ADDRESS.
    /// Mutually exclusive with LOCAL_CA_DIR.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,

    /// Root certificates (PEM) that sign the CA's serving certificate; they are also added
    /// to the trust bundle for peers (root rotation). Defaults to XDS_ROOT_CA.
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_ca: Option<PathBuf>,

    /// Like ALT_XDS_HOSTNAME, for the CA; defaults to ALT_XDS_HOSTNAME.
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,

    /// Projected service-account token (audience istio-ca) sent as `authorization: Bearer`
    /// to the control plane; re-read on every request so kubelet rotation is picked up.
    #[arg(
        long,
        env = "AUTH_TOKEN_PATH",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub auth_token_path: PathBuf,

    /// Requested lifetime of certificates from the Istio CA.
    #[arg(long, env = "SECRET_TTL", value_parser = parse_duration, default_value = "24h")]
    pub secret_ttl: Duration,

    /// Kubernetes cluster id, sent to the control plane (node metadata, `ClusterID` header).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// This ztunnel pod's own IP, name and namespace: they form the xDS node id
    /// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`, as Istio's ztunnel does.
    #[arg(long, env = "INSTANCE_IP", default_value = "1.1.1.1")]
    pub instance_ip: String,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,

    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Other trust domains whose identities are accepted (comma separated).
    #[arg(long, env = "TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,

    /// Serve only workloads scheduled on this node (all local-IP workloads when unset).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Outbound capture listener (iptables REDIRECTs pod egress here).
    #[arg(long, env = "OUTBOUND_ADDR", default_value = "[::]:15001")]
    pub outbound_addr: SocketAddr,

    /// Inbound plaintext capture listener.
    #[arg(long, env = "INBOUND_PLAINTEXT_ADDR", default_value = "[::]:15006")]
    pub inbound_plaintext_addr: SocketAddr,

    /// HBONE listener.
    #[arg(long, env = "INBOUND_ADDR", default_value = "[::]:15008")]
    pub inbound_addr: SocketAddr,

    /// Admin endpoint (config dump, log level); keep it on localhost.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics.
    #[arg(long, env = "STATS_ADDR", default_value = "[::]:15020")]
    pub stats_addr: SocketAddr,

    /// Readiness (`/healthz/ready`).
    #[arg(long, env = "READINESS_ADDR", default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,

    /// Optional SOCKS5 listener (RFC 1928, CONNECT by IP): an explicit-proxy entry to the
    /// outbound path for hosts without capture, and for tests.
    #[arg(long, env = "SOCKS5_ADDR")]
    pub socks5_addr: Option<SocketAddr>,

    /// Serve DNS in every captured pod on 127.0.0.1:15053 (and [::1]:15053), where the CNI's
    /// DNS capture sends UDP/TCP 53 (in-pod mode). Istio's name for the switch.
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,

    /// DNS proxy listener in dedicated mode (unset: no DNS proxy outside in-pod mode).
    #[arg(long, env = "DNS_PROXY_ADDR")]
    pub dns_proxy_addr: Option<SocketAddr>,

    /// Kubernetes cluster DNS domain (service FQDNs are `<svc>.<ns>.svc.<domain>`).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Where the DNS proxy finds its upstream resolvers and extra search domains.
    #[arg(long, env = "DNS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,

    /// SO_MARK on every socket ztunnel opens, so capture rules skip its own traffic.
    #[arg(long, env = "PACKET_MARK", default_value_t = 1337)]
    pub packet_mark: u32,

    /// Connect to the app with the client's source IP (IP_TRANSPARENT). Needs the connmark
    /// routing rules of the capture set-up (see docs/redirection.md).
    #[arg(long, env = "PRESERVE_SOURCE_IP", default_value_t = false, action = clap::ArgAction::Set)]
    pub preserve_source_ip: bool,

    /// How long established connections may finish after SIGTERM.
    #[arg(long, env = "DRAIN_DEADLINE", value_parser = parse_duration, default_value = "5s")]
    pub drain_deadline: Duration,

    /// Timeout for opening a connection (HBONE or to the app).
    #[arg(long, env = "CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub connect_timeout: Duration,

    /// Streams one pooled HBONE connection carries before another is opened (Istio's name).
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub pool_max_streams_per_connection: usize,

    /// How long a pooled HBONE connection with no stream is kept for reuse (Istio's name).
    /// `0s`: released as soon as its last stream ends, so idle tunnels are never reused.
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", value_parser = parse_duration, default_value = "5m")]
    pub pool_unused_release_timeout: Duration,

    /// Data-plane worker threads.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// tracing filter, e.g. `info` or `info,ztunnel::proxy=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// A control-plane endpoint: where to dial and how to trust it (the type and its parser,
/// [`ControlPlane::parse`], are shared with the waypoint).
pub use mesh_xds::ControlPlane;

/// Where workloads, services and policies come from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfigSource {
    /// A file in Istio ztunnel's LOCAL_XDS_PATH format, reloaded when it changes.
    Local(PathBuf),
    /// Delta xDS from istiod / istiod-lite.
    Xds(ControlPlane),
}

/// Where workload certificates come from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CertSource {
    /// A CA directory in Istio's `cacerts` layout, shared by every ztunnel of a dev mesh.
    LocalCa {
        dir: PathBuf,
        #[serde(serialize_with = "ser_duration")]
        ttl: Duration,
    },
    /// Istio's `IstioCertificateService/CreateCertificate`.
    IstioCa {
        endpoint: ControlPlane,
        #[serde(serialize_with = "ser_duration")]
        ttl: Duration,
    },
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub proxy_mode: ProxyMode,
    pub inpod_uds: PathBuf,
    pub config_source: ConfigSource,
    pub cert_source: CertSource,
    pub auth_token_path: PathBuf,
    pub cluster_id: String,
    pub instance_ip: String,
    pub pod_name: String,
    pub pod_namespace: String,
    /// Our trust domain first, then aliases.
    pub trust_domains: Vec<String>,
    pub node_name: Option<String>,
    pub outbound_addr: SocketAddr,
    pub inbound_plaintext_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub socks5_addr: Option<SocketAddr>,
    /// In-pod DNS proxy on (see `dns`).
    pub dns_capture: bool,
    pub dns_proxy_addr: Option<SocketAddr>,
    pub cluster_domain: String,
    pub dns_resolv_conf: PathBuf,
    pub packet_mark: Option<u32>,
    pub preserve_source_ip: bool,
    #[serde(serialize_with = "ser_duration")]
    pub drain_deadline: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    pub pool_max_streams_per_connection: usize,
    #[serde(serialize_with = "ser_duration")]
    pub pool_unused_release_timeout: Duration,
    pub worker_threads: usize,
    pub log_level: String,
    pub log_format: LogFormat,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{}ms", d.as_millis()))
}

/// Every problem found in the flags, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Args {
    /// Checks cross-field rules and produces the [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut errs = Vec::new();
        let Args {
            proxy_mode,
            inpod_uds,
            local_xds_path,
            local_ca_dir,
            local_ca_cert_ttl,
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
            trust_domain,
            trust_domain_aliases,
            node_name,
            outbound_addr,
            inbound_plaintext_addr,
            inbound_addr,
            admin_addr,
            stats_addr,
            readiness_addr,
            socks5_addr,
            dns_capture,
            dns_proxy_addr,
            cluster_domain,
            dns_resolv_conf,
            packet_mark,
            preserve_source_ip,
            drain_deadline,
            connect_timeout,
            pool_max_streams_per_connection,
            pool_unused_release_timeout,
            worker_threads,
            log_level,
            log_format,
        } = self;
        let xds = xds_address.as_deref().map(|a| {
            ControlPlane::parse("XDS_ADDRESS", a, alt_xds_hostname.as_deref(), &xds_root_ca)
        });
        let config_source = match (local_xds_path, xds) {
            (Some(_), Some(_)) => {
                errs.push(
                    "LOCAL_XDS_PATH and XDS_ADDRESS are both set: pick one configuration source"
                        .to_owned(),
                );
                None
            }
            (Some(p), None) => Some(ConfigSource::Local(p)),
            (None, Some(Ok(cp))) => Some(ConfigSource::Xds(cp)),
            (None, Some(Err(e))) => {
                errs.push(e);
                None
            }
            (None, None) => {
                errs.push(
                    "no configuration source: set XDS_ADDRESS (the control plane) or LOCAL_XDS_PATH (a workload file)"
                        .to_owned(),
                );
                None
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
                        .to_owned(),
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
                    "no certificate source: set CA_ADDRESS/XDS_ADDRESS (the Istio CA) or LOCAL_CA_DIR (create one with `meshctl ca create DIR`)"
                        .to_owned(),
                );
                None
            }
        };
        if secret_ttl < Duration::from_secs(60) {
            errs.push(format!(
                "SECRET_TTL {secret_ttl:?} is too short (minimum 1m)"
            ));
        }
        let mut trust_domains = vec![trust_domain];
        trust_domains.extend(trust_domain_aliases.into_iter().filter(|a| !a.is_empty()));
        for td in &trust_domains {
            if mesh_core::Identity::new(td, "ns", "sa").is_err() {
                errs.push(format!(
                    "trust domain {td:?} is invalid (lowercase letters, digits, '.', '-', '_')"
                ));
            }
        }
        if local_ca_cert_ttl < Duration::from_secs(60) {
            errs.push(format!(
                "LOCAL_CA_CERT_TTL {local_ca_cert_ttl:?} is too short (minimum 1m)"
            ));
        }
        let cluster_domain = cluster_domain.trim_matches('.').to_ascii_lowercase();
        if cluster_domain.is_empty()
            || !cluster_domain
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            errs.push(format!(
                "CLUSTER_DOMAIN {cluster_domain:?} is not a DNS domain (e.g. cluster.local)"
            ));
        }
        if worker_threads == 0 {
            errs.push("WORKER_THREADS must be at least 1".to_owned());
        }
        if connect_timeout.is_zero() {
            errs.push("CONNECT_TIMEOUT must be positive".to_owned());
        }
        if pool_max_streams_per_connection == 0 {
            errs.push("POOL_MAX_STREAMS_PER_CONNECTION must be at least 1".to_owned());
        }
        if log_level.trim().is_empty() {
            errs.push("RUST_LOG is empty (use e.g. info)".to_owned());
        }
        if proxy_mode == ProxyMode::Shared && node_name.is_none() {
            errs.push(
                "PROXY_MODE=shared needs NODE_NAME: it serves the pods of its node".to_owned(),
            );
        }
        if proxy_mode == ProxyMode::Shared && packet_mark == 0 {
            errs.push(
                "PROXY_MODE=shared needs PACKET_MARK: in-pod capture rules skip marked sockets"
                    .to_owned(),
            );
        }
        let (Some(config_source), Some(cert_source)) = (config_source, cert_source) else {
            return Err(ConfigError(errs));
        };
        if !errs.is_empty() {
            return Err(ConfigError(errs));
        }
        Ok(Config {
            proxy_mode,
            inpod_uds,
            config_source,
            cert_source,
            auth_token_path,
            cluster_id,
            instance_ip,
            pod_name,
            pod_namespace,
            trust_domains,
            node_name,
            outbound_addr,
            inbound_plaintext_addr,
            inbound_addr,
            admin_addr,
            stats_addr,
            readiness_addr,
            socks5_addr,
            dns_capture,
            dns_proxy_addr,
            cluster_domain,
            dns_resolv_conf,
            packet_mark: (packet_mark != 0).then_some(packet_mark),
            preserve_source_ip,
            drain_deadline,
            connect_timeout,
            pool_max_streams_per_connection,
            pool_unused_release_timeout,
            worker_threads,
            log_level,
            log_format,
        })
    }
}

impl Config {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domains[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn args(extra: &[&str]) -> Result<Config, String> {
        let mut v = vec!["ztunnel"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_validates() {
        let c = args(&["--local-xds-path", "w.yaml", "--local-ca-dir", "ca"]).unwrap();
        assert_eq!(c.inbound_addr.port(), 15008);
        assert_eq!(c.outbound_addr.port(), 15001);
        assert_eq!(c.packet_mark, Some(1337));
        assert_eq!(c.trust_domain(), "cluster.local");
        assert_eq!(c.drain_deadline, Duration::from_secs(5));
    }

    #[test]
    fn xds_address_implies_the_istio_ca() {
        let c = args(&[
            "--xds-address",
            "https://127.0.0.1:15012",
            "--alt-xds-hostname",
            "istiod.istio-system.svc",
        ])
        .unwrap();
        let ConfigSource::Xds(cp) = &c.config_source else {
            panic!("{:?}", c.config_source)
        };
        assert_eq!(cp.authority, "127.0.0.1:15012");
        assert_eq!(cp.server_name, "istiod.istio-system.svc");
        let CertSource::IstioCa { endpoint, ttl } = &c.cert_source else {
            panic!("{:?}", c.cert_source)
        };
        assert_eq!(endpoint, cp);
        assert_eq!(*ttl, Duration::from_secs(86400));
        // A local CA may still be used with a remote config source.
        let c = args(&["--xds-address", "istiod:15012", "--local-ca-dir", "ca"]).unwrap();
        assert!(matches!(c.cert_source, CertSource::LocalCa { .. }));
    }

    #[test_case(&["--xds-address", "istiod", "--local-ca-dir", "ca"], "XDS_ADDRESS"; "no port")]
    #[test_case(&["--xds-address", "https://istiod:15012/x", "--local-ca-dir", "ca"], "XDS_ADDRESS"; "path")]
    #[test_case(&["--xds-address", "istiod:1", "--local-xds-path", "w.yaml", "--local-ca-dir", "ca"], "both set"; "two sources")]
    #[test_case(&["--local-xds-path", "w.yaml", "--ca-address", "ca:1", "--local-ca-dir", "ca"], "both set"; "two cert sources")]
    fn bad_control_plane_settings(a: &[&str], want: &str) {
        let err = args(a).unwrap_err();
        assert!(err.contains(want), "{err}");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let err = args(&[
            "--trust-domain",
            "Bad_TD!",
            "--worker-threads",
            "0",
            "--pool-max-streams-per-connection",
            "0",
        ])
        .unwrap_err();
        for want in [
            "LOCAL_XDS_PATH",
            "LOCAL_CA_DIR",
            "trust domain",
            "WORKER_THREADS",
            "POOL_MAX_STREAMS_PER_CONNECTION",
        ] {
            assert!(err.contains(want), "missing {want} in {err}");
        }
    }

    #[test]
    fn shared_mode_needs_node_and_mark() {
        let err = args(&[
            "--local-xds-path",
            "w.yaml",
            "--local-ca-dir",
            "ca",
            "--proxy-mode",
            "shared",
            "--packet-mark",
            "0",
        ])
        .unwrap_err();
        assert!(
            err.contains("NODE_NAME") && err.contains("PACKET_MARK"),
            "{err}"
        );
    }

    #[test_case("500ms" => Ok(Duration::from_millis(500)))]
    #[test_case("5s" => Ok(Duration::from_secs(5)))]
    #[test_case("5" => Ok(Duration::from_secs(5)))]
    #[test_case("2m" => Ok(Duration::from_secs(120)))]
    #[test_case("24h" => Ok(Duration::from_secs(86400)))]
    #[test_case("5 parsecs" => matches Err(_))]
    #[test_case("x" => matches Err(_))]
    fn durations(s: &str) -> Result<Duration, String> {
        parse_duration(s)
    }
}
