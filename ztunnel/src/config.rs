//! ztunnel's configuration: the only place that reads flags and environment variables.
//!
//! Every setting is a flag with an environment variable of the same meaning (Istio's names
//! where Istio has one: `LOCAL_XDS_PATH`, `NODE_NAME`, `TRUST_DOMAIN`, …). [`Args`] is what
//! the user typed; [`Config`] is the validated result the rest of the program receives.
//! All problems are reported together, and `main` exits with status 64 (EX_USAGE).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 10m or 24h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{s:?} has unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
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

    /// Data-plane worker threads.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// tracing filter, e.g. `info` or `info,ztunnel::proxy=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub proxy_mode: ProxyMode,
    pub inpod_uds: PathBuf,
    pub local_xds_path: PathBuf,
    pub local_ca_dir: PathBuf,
    #[serde(serialize_with = "ser_duration")]
    pub local_ca_cert_ttl: Duration,
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
    pub packet_mark: Option<u32>,
    pub preserve_source_ip: bool,
    #[serde(serialize_with = "ser_duration")]
    pub drain_deadline: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
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
            packet_mark,
            preserve_source_ip,
            drain_deadline,
            connect_timeout,
            worker_threads,
            log_level,
            log_format,
        } = self;
        if local_xds_path.is_none() {
            errs.push(
                "no configuration source: set LOCAL_XDS_PATH (--local-xds-path) to a workload file"
                    .to_owned(),
            );
        }
        if local_ca_dir.is_none() {
            errs.push(
                "no certificate source: set LOCAL_CA_DIR (--local-ca-dir); create one with `meshctl ca create DIR`"
                    .to_owned(),
            );
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
        if worker_threads == 0 {
            errs.push("WORKER_THREADS must be at least 1".to_owned());
        }
        if connect_timeout.is_zero() {
            errs.push("CONNECT_TIMEOUT must be positive".to_owned());
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
        let (Some(local_xds_path), Some(local_ca_dir)) = (local_xds_path, local_ca_dir) else {
            return Err(ConfigError(errs));
        };
        if !errs.is_empty() {
            return Err(ConfigError(errs));
        }
        Ok(Config {
            proxy_mode,
            inpod_uds,
            local_xds_path,
            local_ca_dir,
            local_ca_cert_ttl,
            trust_domains,
            node_name,
            outbound_addr,
            inbound_plaintext_addr,
            inbound_addr,
            admin_addr,
            stats_addr,
            readiness_addr,
            socks5_addr,
            packet_mark: (packet_mark != 0).then_some(packet_mark),
            preserve_source_ip,
            drain_deadline,
            connect_timeout,
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
    fn all_problems_are_reported_at_once() {
        let err = args(&["--trust-domain", "Bad_TD!", "--worker-threads", "0"]).unwrap_err();
        for want in [
            "LOCAL_XDS_PATH",
            "LOCAL_CA_DIR",
            "trust domain",
            "WORKER_THREADS",
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
