//! The CNI config watcher (no root needed): our entry is chained into the primary
//! conflist, and chained again after "another CNI" rewrites its file (atomic rename, as
//! CNIs do) or writes a new higher-priority file; an already-chained file is left alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::Path, time::Duration};

use cni_plugin::install;
use common::wait_until;
use serde_json::{Value, json};

fn chained(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|p| {
            p.last().is_some_and(|e| e["type"] == "mesh-cni")
                && p.iter().filter(|e| e["type"] == "mesh-cni").count() == 1
        })
}

fn other_cni_writes(path: &Path, body: &str) {
    let tmp = path.with_extension("other-tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn rewritten_conflist_is_chained_again() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("net.d");
    std::fs::create_dir(&conf_dir).unwrap();
    let primary = conf_dir.join("10-podnet.conflist");
    let original = r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
    std::fs::write(&primary, original).unwrap();
    let entry =
        json!({"type": "mesh-cni", "name": "mesh-cni", "agent_socket": "/run/mesh-cni/cni.sock"});
    let (d, e) = (conf_dir.clone(), entry.clone());
    std::thread::spawn(move || install::watch(&d, &e));

    wait_until("first chaining", Duration::from_secs(5), || {
        chained(&primary)
    });
    let first = std::fs::read_to_string(&primary).unwrap();
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["plugins"][0]["type"], "bridge");
    assert_eq!(v["plugins"][1]["type"], "portmap");

    // Another CNI (a primary CNI's own installer) rewrites its file without us.
    other_cni_writes(&primary, original);
    wait_until(
        "re-chaining after the rewrite",
        Duration::from_secs(5),
        || chained(&primary),
    );

    // The file settles: the watcher does not keep rewriting its own output.
    std::thread::sleep(Duration::from_millis(300));
    let settled = std::fs::read_to_string(&primary).unwrap();
    let inode = std::fs::metadata(&primary)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read_to_string(&primary).unwrap(), settled);
    assert_eq!(
        std::fs::metadata(&primary)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
        inode,
        "rewritten although already chained"
    );

    // A new CNI installs a higher-priority single .conf: that becomes the one we chain.
    let newer = conf_dir.join("05-calico.conf");
    other_cni_writes(
        &newer,
        r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"calico"}"#,
    );
    let wrapped = conf_dir.join("05-calico.conflist");
    wait_until(
        "the new primary is wrapped and chained",
        Duration::from_secs(5),
        || chained(&wrapped),
    );
    assert!(!newer.exists());
}
