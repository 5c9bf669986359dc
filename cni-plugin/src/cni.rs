//! The CNI contract as the plugin sees it (spec 0.3.1 … 1.1.0): the `CNI_*` environment,
//! the network configuration on stdin, the result and error JSON on stdout.
//!
//! Invariants: parsing is pure (the caller hands in the environment as a map and stdin as
//! bytes); `prevResult` is kept as raw JSON so ADD can print it back byte for byte; every
//! error maps to a spec error code and a message that names the variable or field at fault.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Versions `VERSION` advertises. 1.1.0 is included because GC and STATUS are implemented
/// (as successful no-ops: unenrollment is driven by the node agent, not by the runtime).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The plugin's `type` in the conflist (and the binary's name in the CNI bin dir).
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// Spec error codes we use.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const BAD_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "CNI_COMMAND is not set; the container runtime must set it (ADD, DEL, CHECK, VERSION, GC or STATUS)"
    )]
    MissingCommand,
    #[error("CNI_COMMAND={0:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS")]
    UnknownCommand(String),
    #[error("{var} is not set; the container runtime must set it for {command}")]
    MissingEnv {
        var: &'static str,
        command: &'static str,
    },
    #[error("CNI_ARGS entry {0:?} is not KEY=VALUE (CNI_ARGS is `K=V;K=V`)")]
    BadArgs(String),
    #[error(
        "CNI_ARGS has no {0}; the plugin needs the Kubernetes pod identity (containerd and CRI-O set K8S_POD_NAMESPACE and K8S_POD_NAME)"
    )]
    MissingK8sArg(&'static str),
    #[error("stdin is not a valid CNI network configuration: {0}")]
    Decode(String),
    #[error("cniVersion {0:?} is not supported; this plugin supports {SUPPORTED_VERSIONS:?}")]
    IncompatibleVersion(String),
    #[error("invalid plugin configuration: {0}")]
    InvalidConfig(String),
    #[error("{0}")]
    TryAgainLater(String),
    #[error("{0}")]
    Io(String),
}

impl Error {
    /// The spec's error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            Error::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Error::MissingCommand
            | Error::UnknownCommand(_)
            | Error::MissingEnv { .. }
            | Error::BadArgs(_)
            | Error::MissingK8sArg(_) => code::BAD_ENV,
            Error::Decode(_) => code::DECODE,
            Error::InvalidConfig(_) => code::INVALID_CONFIG,
            Error::TryAgainLater(_) => code::TRY_AGAIN_LATER,
            Error::Io(_) => code::IO,
        }
    }

    /// The error JSON the runtime expects on stdout (with a non-zero exit).
    pub fn to_json(&self, cni_version: &str) -> String {
        let body = ErrorJson {
            cni_version,
            code: self.code(),
            msg: self.to_string(),
            details: None,
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"1.0.0\",\"code\":{},\"msg\":\"unprintable error\"}}",
                self.code()
            )
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorJson<'a> {
    cni_version: &'a str,
    code: u32,
    msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    fn parse(s: &str) -> Result<Command, Error> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => return Err(Error::UnknownCommand(other.to_string())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub container_id: Option<String>,
    /// Path of the pod's network namespace (e.g. `/var/run/netns/cni-…`).
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Parses the environment (only `CNI_*` keys are looked at).
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<Invocation, Error> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let command = Command::parse(&get("CNI_COMMAND").ok_or(Error::MissingCommand)?)?;
        let inv = Invocation {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS").map(PathBuf::from),
            ifname: get("CNI_IFNAME"),
            args: parse_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))?,
        };
        // The spec makes these required for ADD (and CHECK); DEL may omit CNI_NETNS.
        if matches!(command, Command::Add | Command::Check) {
            let required = [
                ("CNI_CONTAINERID", inv.container_id.is_some()),
                ("CNI_NETNS", inv.netns.is_some()),
                ("CNI_IFNAME", inv.ifname.is_some()),
            ];
            if let Some((var, _)) = required.iter().find(|(_, present)| !present) {
                return Err(Error::MissingEnv {
                    var,
                    command: command.name(),
                });
            }
        }
        Ok(inv)
    }

    /// The Kubernetes identity of the pod, from `CNI_ARGS`.
    pub fn k8s(&self) -> Result<K8sArgs, Error> {
        let req = |k: &'static str| {
            self.args
                .get(k)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or(Error::MissingK8sArg(k))
        };
        Ok(K8sArgs {
            namespace: req("K8S_POD_NAMESPACE")?,
            name: req("K8S_POD_NAME")?,
            uid: self
                .args
                .get("K8S_POD_UID")
                .filter(|v| !v.is_empty())
                .cloned(),
            infra_container_id: self.args.get("K8S_POD_INFRA_CONTAINER_ID").cloned(),
        })
    }
}

/// `CNI_ARGS` = `K=V;K=V`. `IgnoreUnknown` is accepted and ignored: this plugin reads only
/// the keys it knows and never rejects others.
fn parse_args(s: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for part in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| Error::BadArgs(part.to_string()))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `CNI_ARGS` keys a Kubernetes runtime sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sArgs {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub infra_container_id: Option<String>,
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from("/var/run/mesh-cni/cni.sock")
}
fn default_agent_timeout() -> u64 {
    5
}
fn default_exclude_namespaces() -> Vec<String> {
    vec!["kube-system".into()]
}
fn default_mesh_namespace() -> String {
    "istio-system".into()
}

/// The network configuration on stdin: the plugin's conflist entry plus what the runtime
/// adds (`name`, `cniVersion`, `prevResult`, `runtimeConfig`). Unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The previous plugin's result, verbatim.
    #[serde(default)]
    pub prev_result: Option<Box<RawValue>>,
    /// The node agent's plugin socket.
    #[serde(rename = "agent_socket", default = "default_agent_socket")]
    pub agent_socket: PathBuf,
    /// How long ADD waits for the agent (rules installed and ztunnel acked), in seconds.
    #[serde(rename = "agent_timeout_seconds", default = "default_agent_timeout")]
    pub agent_timeout_seconds: u64,
    /// Namespaces never enrolled (ADD returns at once, without any lookup).
    #[serde(rename = "exclude_namespaces", default = "default_exclude_namespaces")]
    pub exclude_namespaces: Vec<String>,
    /// The mesh's own namespace: its ztunnel and node-agent pods are never enrolled.
    #[serde(rename = "mesh_namespace", default = "default_mesh_namespace")]
    pub mesh_namespace: String,
    /// Where pod and namespace labels are read from: a directory holding `cluster.yaml`
    /// (the files source, see `source.rs`).
    #[serde(rename = "pod_source_dir", default)]
    pub pod_source_dir: Option<PathBuf>,
}

impl NetConf {
    /// Parses stdin and checks the version. `Err` carries the best version to report in.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, Error> {
        let de = &mut serde_json::Deserializer::from_slice(stdin);
        let conf: NetConf = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                Error::Decode(e.into_inner().to_string())
            } else {
                Error::Decode(format!("field {path}: {}", e.into_inner()))
            }
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(Error::IncompatibleVersion(conf.cni_version));
        }
        if conf.agent_timeout_seconds == 0 {
            return Err(Error::InvalidConfig(
                "agent_timeout_seconds must be at least 1".into(),
            ));
        }
        Ok(conf)
    }

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_seconds)
    }

    /// What ADD prints: `prevResult` unchanged, or an empty result for the first plugin.
    pub fn add_result(&self) -> String {
        match &self.prev_result {
            Some(raw) => raw.get().to_string(),
            None => format!("{{\"cniVersion\":{:?}}}", self.cni_version),
        }
    }

    /// The pod's IPs from `prevResult.ips[].address` (same shape in 0.3.x, 0.4 and 1.x).
    pub fn prev_ips(&self) -> Result<Vec<IpAddr>, Error> {
        #[derive(Deserialize)]
        struct Prev {
            #[serde(default)]
            ips: Vec<PrevIp>,
        }
        #[derive(Deserialize)]
        struct PrevIp {
            address: String,
        }
        let Some(raw) = &self.prev_result else {
            return Ok(Vec::new());
        };
        let prev: Prev = serde_json::from_str(raw.get())
            .map_err(|e| Error::Decode(format!("prevResult: {e}")))?;
        prev.ips
            .iter()
            .map(|ip| {
                let addr = ip.address.split('/').next().unwrap_or_default();
                addr.parse().map_err(|_| {
                    Error::Decode(format!(
                        "prevResult.ips[].address {:?} is not an IP/prefix",
                        ip.address
                    ))
                })
            })
            .collect()
    }
}

/// Best-effort version to report an error in, read from raw stdin.
pub fn version_hint(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct V {
        cni_version: String,
    }
    serde_json::from_slice::<V>(stdin)
        .ok()
        .map(|v| v.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".into())
}

/// The `VERSION` answer.
pub fn version_json(cni_version: &str) -> String {
    serde_json::json!({ "cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const K8S: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=app-a;K8S_POD_INFRA_CONTAINER_ID=c0ffee01;K8S_POD_UID=uid-p1a";

    fn add_env(args: &str) -> BTreeMap<String, String> {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c0ffee01"),
            ("CNI_NETNS", "/run/netns/p1a"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ])
    }

    #[test]
    fn kubernetes_args_are_parsed() {
        let inv = Invocation::from_env(&add_env(K8S)).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(
            inv.netns.as_deref(),
            Some(std::path::Path::new("/run/netns/p1a"))
        );
        let k = inv.k8s().unwrap();
        assert_eq!(
            k,
            K8sArgs {
                namespace: "default".into(),
                name: "app-a".into(),
                uid: Some("uid-p1a".into()),
                infra_container_id: Some("c0ffee01".into()),
            }
        );
    }

    #[test_case(&[], "CNI_COMMAND is not set" ; "no command")]
    #[test_case(&[("CNI_COMMAND", "FROB")], "\"FROB\" is not one of" ; "unknown command")]
    #[test_case(&[("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/n"), ("CNI_IFNAME", "eth0")], "CNI_CONTAINERID is not set" ; "add without container id")]
    #[test_case(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")], "CNI_NETNS is not set" ; "add without netns")]
    #[test_case(&[("CNI_COMMAND", "DEL"), ("CNI_ARGS", "K8S_POD_NAME")], "\"K8S_POD_NAME\" is not KEY=VALUE" ; "bad args")]
    fn bad_env_names_the_variable(pairs: &[(&str, &str)], want: &str) {
        let e = Invocation::from_env(&env(pairs)).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(e.code(), code::BAD_ENV);
    }

    #[test]
    fn del_needs_no_netns() {
        let inv = Invocation::from_env(&env(&[("CNI_COMMAND", "DEL")])).unwrap();
        assert_eq!(inv.command, Command::Del);
    }

    #[test_case("IgnoreUnknown=1;K8S_POD_NAME=a", "K8S_POD_NAMESPACE" ; "no namespace")]
    #[test_case("K8S_POD_NAMESPACE=default", "K8S_POD_NAME" ; "no name")]
    #[test_case("K8S_POD_NAMESPACE=;K8S_POD_NAME=a", "K8S_POD_NAMESPACE" ; "empty namespace")]
    fn missing_k8s_args_are_named(args: &str, want: &str) {
        let e = Invocation::from_env(&add_env(args))
            .unwrap()
            .k8s()
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!("CNI_ARGS has no {want}")),
            "{e}"
        );
        assert_eq!(e.code(), code::BAD_ENV);
    }

    #[test_case(b"not json", code::DECODE, "not a valid CNI network configuration" ; "garbage")]
    #[test_case(b"{\"name\":\"x\"}", code::DECODE, "cniVersion" ; "no version")]
    #[test_case(b"{\"cniVersion\":\"0.2.0\",\"name\":\"x\"}", code::INCOMPATIBLE_VERSION, "\"0.2.0\" is not supported" ; "old version")]
    #[test_case(b"{\"cniVersion\":\"9.9.9\"}", code::INCOMPATIBLE_VERSION, "9.9.9" ; "future version")]
    #[test_case(b"{\"cniVersion\":\"1.0.0\",\"agent_timeout_seconds\":0}", code::INVALID_CONFIG, "agent_timeout_seconds" ; "zero timeout")]
    #[test_case(b"{\"cniVersion\":\"1.0.0\",\"exclude_namespaces\":\"kube-system\"}", code::DECODE, "exclude_namespaces" ; "wrong field type")]
    fn bad_stdin_is_a_named_error(stdin: &[u8], want_code: u32, want: &str) {
        let e = NetConf::parse(stdin).unwrap_err();
        assert_eq!(e.code(), want_code, "{e}");
        assert!(e.to_string().contains(want), "{e}");
    }

    #[test]
    fn error_json_has_code_and_message() {
        let e = Error::TryAgainLater("ztunnel has not acknowledged pod default/app-a".into());
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "ztunnel has not acknowledged pod default/app-a");
    }

    #[test]
    fn prev_result_is_printed_unchanged_and_ips_are_read() {
        // The lab's bridge+portmap result, key order and spacing kept.
        let prev = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/p1a"}], "ips":[{"interface":0,"address":"10.244.1.2/24","gateway":"10.244.1.1"},{"address":"fd00::2/64"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;
        let stdin = format!(
            r#"{{"cniVersion":"1.0.0","name":"podnet","type":"mesh-cni","prevResult":{prev}}}"#
        );
        let conf = NetConf::parse(stdin.as_bytes()).unwrap();
        assert_eq!(conf.add_result(), prev);
        assert_eq!(
            conf.prev_ips().unwrap(),
            vec![
                "10.244.1.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert_eq!(conf.agent_socket, default_agent_socket());
        assert_eq!(conf.exclude_namespaces, ["kube-system"]);
    }

    #[test]
    fn first_plugin_prints_an_empty_result() {
        let conf = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n"}"#).unwrap();
        assert_eq!(conf.add_result(), r#"{"cniVersion":"0.3.1"}"#);
        assert!(conf.prev_ips().unwrap().is_empty());
    }

    #[test]
    fn bad_prev_ip_is_named() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"nope/24"}]}}"#,
        )
        .unwrap();
        let e = conf.prev_ips().unwrap_err();
        assert!(e.to_string().contains("\"nope/24\""), "{e}");
    }

    #[test]
    fn version_lists_0_3_1_to_1_1_0() {
        let v: serde_json::Value = serde_json::from_str(&version_json("1.0.0")).unwrap();
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_hint(b"{\"cniVersion\":\"0.4.0\"}"), "0.4.0");
        assert_eq!(version_hint(b"garbage"), "1.0.0");
    }
}
