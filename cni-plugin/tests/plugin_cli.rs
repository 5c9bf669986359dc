//! The `mesh-cni` binary as a container runtime runs it: env + stdin in, exactly one JSON
//! document on stdout, exit status. No root needed. Pins the CNI contract (VERSION range,
//! ADD prints prevResult unchanged, DEL/CHECK/GC/STATUS succeed), the error JSON for bad
//! input (naming the problem, with the spec's code), that pods outside the mesh never
//! contact the agent, and that an ambient pod without a reachable agent fails with code 11.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::Value;

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/p1a"}],"ips":[{"interface":0,"address":"10.244.1.2/24","gateway":"10.244.1.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;
const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=foo;K8S_POD_NAME=app-a;K8S_POD_INFRA_CONTAINER_ID=c0ffee01;K8S_POD_UID=uid-a";

struct Run {
    code: i32,
    stdout: String,
}

fn run(env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
    }
}

fn add_env(args: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee01"),
        ("CNI_NETNS", "/var/run/netns/mesh-cni-test-none"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

fn conf(source: &Path, sock: &Path, version: &str) -> String {
    format!(
        r#"{{"cniVersion":"{version}","name":"podnet","type":"mesh-cni","agent_socket":{sock:?},"agent_timeout_seconds":1,"pod_source_dir":{source:?},"prevResult":{PREV}}}"#,
        sock = sock.display().to_string(),
        source = source.display().to_string(),
    )
}

fn cluster(dir: &Path, ns_label: bool) {
    let label = if ns_label {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    std::fs::write(
        dir.join("cluster.yaml"),
        format!("namespaces:\n- name: foo\n  labels: {label}\npods:\n- {{uid: uid-a, name: app-a, namespace: foo, nodeName: node1, podIPs: [10.244.1.2]}}\n"),
    )
    .unwrap();
}

/// An error run: non-zero exit, one JSON error object with this code, msg containing `want`.
fn assert_error(r: &Run, code: u64, want: &str) {
    assert_ne!(r.code, 0, "{}", r.stdout);
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {:?}", r.stdout));
    assert_eq!(v["code"], code, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.contains(want), "{msg:?} should contain {want:?}");
}

#[test]
fn version_advertises_0_3_1_to_1_1_0() {
    let r = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(r.code, 0);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn non_ambient_pod_passes_prev_result_through_without_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), false);
    // The agent socket does not exist: a non-ambient pod must not need it.
    let r = run(
        &add_env(ARGS),
        &conf(dir.path(), &dir.path().join("absent.sock"), "1.0.0"),
    );
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.stdout, PREV, "prevResult must be printed unchanged");
}

#[test]
fn excluded_and_mesh_pods_skip_the_lookup_entirely() {
    let dir = tempfile::tempdir().unwrap();
    // No cluster.yaml at all: a lookup would fail, so success proves there was none.
    let sock = dir.path().join("absent.sock");
    for args in [
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1",
        "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ztunnel-abcde",
        "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=mesh-cni-node-xyz",
    ] {
        let r = run(&add_env(args), &conf(dir.path(), &sock, "0.4.0"));
        assert_eq!(r.code, 0, "{args}: {}", r.stdout);
        assert_eq!(r.stdout, PREV);
    }
}

#[test]
fn ambient_pod_without_agent_fails_add_with_code_11() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), true);
    let r = run(
        &add_env(ARGS),
        &conf(dir.path(), &dir.path().join("absent.sock"), "1.0.0"),
    );
    assert_error(&r, 11, "cannot reach the node agent");
    assert!(r.stdout.contains("foo/app-a"), "{}", r.stdout);
}

#[test]
fn del_check_gc_status_succeed_with_nothing_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["DEL", "CHECK", "GC", "STATUS"] {
        let mut env = add_env(ARGS);
        env[0] = ("CNI_COMMAND", cmd);
        let r = run(
            &env,
            &conf(dir.path(), &dir.path().join("absent.sock"), "1.1.0"),
        );
        assert_eq!(r.code, 0, "{cmd}: {}", r.stdout);
        assert_eq!(r.stdout, "", "{cmd}");
    }
    // DEL without CNI_NETNS (allowed by the spec).
    let r = run(
        &[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c")],
        r#"{"cniVersion":"1.0.0","name":"n"}"#,
    );
    assert_eq!(r.code, 0, "{}", r.stdout);
}

#[test]
fn bad_input_is_cni_error_json_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = conf(dir.path(), &dir.path().join("absent.sock"), "1.0.0");
    assert_error(
        &run(&add_env(ARGS), "this is not json"),
        6,
        "not a valid CNI network configuration",
    );
    assert_error(
        &run(
            &add_env(ARGS),
            &conf(dir.path(), &dir.path().join("s"), "0.2.0"),
        ),
        1,
        "\"0.2.0\" is not supported",
    );
    assert_error(
        &run(
            &add_env(ARGS),
            &good.replace(
                "\"agent_timeout_seconds\":1",
                "\"agent_timeout_seconds\":\"x\"",
            ),
        ),
        6,
        "agent_timeout_seconds",
    );
    assert_error(
        &run(&add_env("IgnoreUnknown=1;K8S_POD_NAME=app-a"), &good),
        4,
        "CNI_ARGS has no K8S_POD_NAMESPACE",
    );
    assert_error(
        &run(&add_env("K8S_POD_NAMESPACE=foo"), &good),
        4,
        "CNI_ARGS has no K8S_POD_NAME",
    );
    assert_error(
        &run(&add_env("junk"), &good),
        4,
        "\"junk\" is not KEY=VALUE",
    );
    assert_error(&run(&[], &good), 4, "CNI_COMMAND is not set");
    assert_error(
        &run(&[("CNI_COMMAND", "ADD")], &good),
        4,
        "CNI_CONTAINERID is not set",
    );
    let mut env = add_env(ARGS);
    env[0] = ("CNI_COMMAND", "EXPLODE");
    assert_error(&run(&env, &good), 4, "\"EXPLODE\" is not one of");
    // Reported in the request's version when it is a supported one.
    let r = run(
        &add_env("K8S_POD_NAMESPACE=foo"),
        &conf(dir.path(), &dir.path().join("s"), "0.4.0"),
    );
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
}

#[test]
fn ambient_pod_unknown_to_the_source_is_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.yaml"),
        "namespaces: []\npods: []\n",
    )
    .unwrap();
    let r = run(
        &add_env(ARGS),
        &conf(dir.path(), &dir.path().join("absent.sock"), "1.0.0"),
    );
    assert_error(&r, 11, "not known to the pod source yet");
}
