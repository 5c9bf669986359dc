//! Golden tests of `meshctl authz check`, running the built binary over
//! `tests/data/authz/<case>/`:
//!
//! - `policies.yaml` (or a `policies/` directory), `request.yaml`, optional `mesh.yaml`;
//! - `expected.json` (`-o json`), `expected.txt` for `text-*` cases (`-o text`), or
//!   `expected.err` for `bad-*` cases (stderr; the exit code must be 2).
//!
//! `UPDATE_GOLDEN=1 cargo test -p meshctl --test authz_check` rewrites the expected files;
//! review the diff before committing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/authz");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    assert!(
        v.len() >= 10,
        "golden cases missing under {}",
        root.display()
    );
    v
}

enum Kind {
    Json,
    Text,
    Error,
}

fn kind(case: &Path) -> Kind {
    let name = case.file_name().unwrap().to_string_lossy();
    if name.starts_with("text-") {
        Kind::Text
    } else if name.starts_with("bad-") {
        Kind::Error
    } else {
        Kind::Json
    }
}

fn run(case: &Path) -> (i32, String, String) {
    let policies = if case.join("policies").is_dir() {
        "policies"
    } else {
        "policies.yaml"
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.current_dir(case).args([
        "authz",
        "check",
        "--policies",
        policies,
        "--request",
        "request.yaml",
    ]);
    if case.join("mesh.yaml").exists() {
        cmd.args(["--mesh", "mesh.yaml"]);
    }
    cmd.args([
        "-o",
        match kind(case) {
            Kind::Text => "text",
            _ => "json",
        },
    ]);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn golden() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in cases() {
        let (code, stdout, stderr) = run(&case);
        let (file, actual, want_code) = match kind(&case) {
            Kind::Json => ("expected.json", stdout, 0),
            Kind::Text => ("expected.txt", stdout, 0),
            Kind::Error => ("expected.err", stderr, 2),
        };
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        if code != want_code {
            failures.push(format!(
                "{name}: exit {code}, want {want_code}; stderr: {}",
                stderr_or(&actual)
            ));
            continue;
        }
        let path = case.join(file);
        if update {
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
        if expected != actual {
            failures.push(format!(
                "{name}: output differs from {file}\n--- expected\n{expected}\n--- actual\n{actual}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn stderr_or(s: &str) -> &str {
    if s.is_empty() { "(empty)" } else { s }
}

/// The JSON shape the issue specifies: top-level `decision` and `hops`, each hop exactly
/// `at, decision, policy, rule, reason, warnings` (plus our `conditions` list at top level).
#[test]
fn json_shape() {
    for case in cases() {
        if !matches!(kind(&case), Kind::Json) {
            continue;
        }
        let (_, stdout, _) = run(&case);
        // Key order as the issue writes it (serde_json::Value would sort the keys).
        let order = [
            "\"at\"",
            "\"decision\"",
            "\"policy\"",
            "\"rule\"",
            "\"reason\"",
            "\"warnings\"",
        ];
        let first_hop = &stdout[stdout.find("\"hops\"").unwrap()..];
        let pos: Vec<usize> = order.iter().map(|k| first_hop.find(k).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{}", case.display());
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let d = v["decision"].as_str().unwrap();
        assert!(d == "allow" || d == "deny");
        let hops = v["hops"].as_array().unwrap();
        assert!(!hops.is_empty());
        for h in hops {
            let mut keys: Vec<&str> = h.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                vec!["at", "decision", "policy", "reason", "rule", "warnings"],
                "{}",
                case.display()
            );
            assert!(matches!(h["at"].as_str(), Some("waypoint" | "ztunnel")));
            assert!(h["policy"].is_null() || h["policy"].as_str().unwrap().contains('/'));
            assert!(h["rule"].is_null() || h["rule"].is_u64());
        }
        // Overall decision is deny iff some hop denies; only the last hop may deny.
        let denies: Vec<bool> = hops.iter().map(|h| h["decision"] == "deny").collect();
        assert_eq!(d == "deny", denies.iter().any(|x| *x));
        assert!(denies[..denies.len() - 1].iter().all(|x| !x));
    }
}

#[test]
fn garbage_input_never_panics() {
    let dir = std::env::temp_dir().join(format!("meshctl-authz-garbage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inputs = [
        "",
        ":",
        "[",
        "- a\n- b",
        "source: 3",
        "\u{0}",
        "a: !!binary x",
    ];
    for (i, text) in inputs.iter().enumerate() {
        std::fs::write(dir.join("p.yaml"), text).unwrap();
        std::fs::write(dir.join("r.yaml"), text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .current_dir(&dir)
            .args([
                "authz",
                "check",
                "--policies",
                "p.yaml",
                "--request",
                "r.yaml",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "input {i}: {stderr}");
        assert!(!stderr.contains("panicked"), "input {i}: {stderr}");
        assert!(
            stderr.starts_with("meshctl authz check: "),
            "input {i}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
