//! The plugin's decision logic, kept out of `main` so tests drive it in-process: parse the
//! invocation, decide whether the pod is ambient, ask the node agent, print the result.
//!
//! Invariants: only the returned string goes to stdout; pods outside the mesh never contact
//! the agent; an ambient pod's ADD succeeds only after the agent said its rules are in and
//! ztunnel acked, otherwise ADD fails (code 11 when retrying may help) — fail closed.

use std::collections::BTreeMap;

use tracing::{debug, info};

use crate::{
    cni::{self, Command, Error, Invocation, NetConf},
    enablement::{Decision, Policy},
    protocol,
    source::FilesSource,
};

/// Output of one invocation: what to print on stdout, and whether it is an error.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub error: Option<Error>,
}

/// Runs one invocation. Never panics on input; every failure becomes CNI error JSON.
pub fn run(env: &BTreeMap<String, String>, stdin: &[u8]) -> Outcome {
    match execute(env, stdin) {
        Ok(stdout) => Outcome {
            stdout,
            error: None,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&cni::version_hint(stdin)),
            error: Some(e),
        },
    }
}

fn execute(env: &BTreeMap<String, String>, stdin: &[u8]) -> Result<String, Error> {
    let inv = Invocation::from_env(env)?;
    if inv.command == Command::Version {
        // VERSION's stdin has only cniVersion; answer even if it is missing or odd.
        return Ok(cni::version_json(&cni::version_hint(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    match inv.command {
        Command::Add => add(&inv, &conf),
        // Unenrollment is driven by the agent's pod watch, not by DEL; these succeed.
        Command::Del | Command::Check | Command::Gc | Command::Status | Command::Version => {
            Ok(String::new())
        }
    }
}

fn add(inv: &Invocation, conf: &NetConf) -> Result<String, Error> {
    let k8s = inv.k8s()?;
    let policy = Policy {
        exclude_namespaces: conf.exclude_namespaces.clone(),
        mesh_namespace: conf.mesh_namespace.clone(),
    };
    let pod_key = format!("{}/{}", k8s.namespace, k8s.name);
    if let Some(reason) = policy.skip_by_name(&k8s.namespace, &k8s.name) {
        debug!(pod = %pod_key, reason = reason.as_str(), "not enrolling");
        return Ok(conf.add_result());
    }
    let ips = conf.prev_ips()?;
    let dir = conf.pod_source_dir.as_ref().ok_or_else(|| {
        Error::InvalidConfig(
            "pod_source_dir is not set; this plugin reads pod and namespace labels from a files source (cluster.yaml)".into(),
        )
    })?;
    let state = FilesSource::new(dir)
        .load()
        .map_err(|e| Error::TryAgainLater(format!("looking up pod {pod_key}: {e}")))?;
    let pod = state.pod(&k8s.namespace, &k8s.name).ok_or_else(|| {
        Error::TryAgainLater(format!(
            "pod {pod_key} is not known to the pod source yet; the runtime should retry"
        ))
    })?;
    match policy.decide(pod, state.namespace_labels(&k8s.namespace)) {
        Decision::Skip(reason) => {
            debug!(pod = %pod_key, reason = reason.as_str(), "not enrolling");
            Ok(conf.add_result())
        }
        Decision::Ambient => {
            let netns = inv.netns.clone().unwrap_or_default();
            let req = protocol::Request::Add {
                pod_namespace: k8s.namespace.clone(),
                pod_name: k8s.name.clone(),
                pod_uid: k8s.uid.clone().or_else(|| Some(pod.uid.clone())),
                netns,
                container_id: inv.container_id.clone().unwrap_or_default(),
                ips,
            };
            protocol::call(&conf.agent_socket, &req, conf.agent_timeout()).map_err(|e| {
                if e.retryable() {
                    Error::TryAgainLater(format!("enrolling pod {pod_key}: {e}"))
                } else {
                    Error::Io(format!("enrolling pod {pod_key}: {e}"))
                }
            })?;
            info!(pod = %pod_key, "pod enrolled in the mesh");
            Ok(conf.add_result())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(command: &str, args: &str) -> BTreeMap<String, String> {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/var/run/netns/none"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    proptest! {
        // Whatever the runtime hands over, the plugin answers with exactly one JSON document
        // (a result, or an error with a code and a message) and never panics.
        #[test]
        fn any_input_gives_one_json_document(
            stdin in proptest::collection::vec(any::<u8>(), 0..300),
            command in prop::sample::select(vec!["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS", "", "add"]),
            args in "[A-Za-z0-9_=;]{0,60}",
        ) {
            let out = run(&env(command, &args), &stdin);
            if out.stdout.is_empty() {
                prop_assert!(out.error.is_none());
            } else {
                let v: serde_json::Value = serde_json::from_str(&out.stdout)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {:?}", out.stdout)))?;
                if out.error.is_some() {
                    prop_assert!(v["code"].as_u64().is_some());
                    prop_assert!(!v["msg"].as_str().unwrap_or("").is_empty());
                }
            }
        }

        // Valid JSON with a supported version and arbitrary extra fields: DEL always succeeds.
        #[test]
        fn del_tolerates_unknown_fields(key in "[a-z]{1,12}", val in any::<i64>()) {
            let stdin = format!(r#"{{"cniVersion":"1.0.0","name":"n","{key}x":{val}}}"#);
            let out = run(&env("DEL", ""), stdin.as_bytes());
            prop_assert!(out.error.is_none(), "{:?}", out.stdout);
        }
    }
}
