//! Installing the plugin on the node: copy the `mesh-cni` binary into the CNI bin dir, and
//! chain our entry into the primary CNI's configuration — the lexicographically first
//! valid `.conf`/`.conflist`/`.json` in the CNI config dir, as kubelet/libcni pick it.
//!
//! Invariants: every write is atomic (temp file in the same dir + rename) and keeps the
//! file's mode; a `.conflist` gets our entry appended (replacing any older one of ours); a
//! single `.conf` is wrapped into a `.conflist`; a file already chained correctly is not
//! rewritten, so the watcher does not loop on its own writes. [`watch`] re-chains whenever
//! another CNI rewrites its file.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::{cni::PLUGIN_TYPE, config::Config};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a CNI configuration: {reason}")]
    Invalid { path: String, reason: String },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Our conflist entry, carrying what the plugin needs to decide and to reach the agent.
pub fn plugin_entry(cfg: &Config) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "name": PLUGIN_TYPE,
        "agent_socket": cfg.cni_socket,
        "agent_timeout_seconds": 5,
        "exclude_namespaces": cfg.exclude_namespaces,
        "mesh_namespace": cfg.mesh_namespace,
        "pod_source_dir": cfg.pod_source_dir,
    })
}

/// The chained configuration, or `None` if `existing` is already chained with `entry`.
pub fn chain(existing: &Value, entry: &Value) -> Result<Option<Value>, String> {
    let obj = existing
        .as_object()
        .ok_or_else(|| "not a JSON object".to_string())?;
    let new = if let Some(plugins) = obj.get("plugins") {
        let plugins = plugins
            .as_array()
            .ok_or_else(|| "\"plugins\" is not a list".to_string())?;
        let mut kept: Vec<Value> = plugins
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE))
            .cloned()
            .collect();
        if kept.is_empty() {
            return Err(
                "the conflist has no plugin but ours: no primary CNI to chain after".into(),
            );
        }
        kept.push(entry.clone());
        let mut out = obj.clone();
        out.insert("plugins".into(), Value::Array(kept));
        Value::Object(out)
    } else if obj.get("type").and_then(Value::as_str).is_some() {
        if obj.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE) {
            return Err("the primary configuration is our own plugin".into());
        }
        let version = obj
            .get("cniVersion")
            .cloned()
            .unwrap_or_else(|| json!("0.3.1"));
        let name = obj
            .get("name")
            .cloned()
            .unwrap_or_else(|| json!("k8s-pod-network"));
        json!({ "cniVersion": version, "name": name, "plugins": [existing, entry] })
    } else {
        return Err("neither \"plugins\" nor \"type\" is set".into());
    };
    Ok((new != *existing).then_some(new))
}

/// The primary CNI configuration file, as libcni chooses it.
pub fn primary_config(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.')
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let valid = serde_json::from_str::<Value>(&text).ok().is_some_and(|v| {
            v.get("plugins").is_some_and(Value::is_array) || v.get("type").is_some()
        });
        if valid {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

fn write_atomic(path: &Path, body: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.mesh-cni.tmp"));
    std::fs::write(&tmp, body).map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Chains our entry into the primary configuration. `Ok(Some(path))`: written there;
/// `Ok(None)`: nothing to do (already chained, or no primary configuration yet).
pub fn ensure_chained(dir: &Path, entry: &Value) -> Result<Option<PathBuf>, InstallError> {
    let Some(path) = primary_config(dir)? else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let invalid = |reason: String| InstallError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let existing: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let Some(new) = chain(&existing, entry).map_err(invalid)? else {
        return Ok(None);
    };
    let mode = std::fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let mut body = serde_json::to_vec_pretty(&new).map_err(|e| invalid(e.to_string()))?;
    body.push(b'\n');
    let target = if existing.get("plugins").is_none() {
        path.with_extension("conflist")
    } else {
        path.clone()
    };
    write_atomic(&target, &body, mode)?;
    if target != path {
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    info!(file = %target.display(), "chained mesh-cni into the primary CNI configuration");
    Ok(Some(target))
}

/// Copies the plugin binary into `bin_dir` (atomically, mode 0755) unless it is there
/// already with the same content.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let dst = bin_dir.join(PLUGIN_TYPE);
    let body = std::fs::read(src).map_err(io_err(src))?;
    if std::fs::read(&dst).is_ok_and(|old| old == body) {
        return Ok(dst);
    }
    std::fs::create_dir_all(bin_dir).map_err(io_err(bin_dir))?;
    write_atomic(&dst, &body, 0o755)?;
    info!(path = %dst.display(), "installed the CNI plugin binary");
    Ok(dst)
}

/// Keeps our entry chained: checks now, then after every change in `dir`. Returns only if
/// the directory can no longer be watched (for example it was deleted).
pub fn watch(dir: &Path, entry: &Value) {
    let check = || match ensure_chained(dir, entry) {
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "chaining the CNI configuration failed; retrying on the next change")
        }
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        warn!(dir = %dir.display(), error = %e, "cannot create the CNI config dir");
    }
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            warn!(error = %e, "inotify unavailable; the CNI config is not watched");
            check();
            return;
        }
    };
    let mask = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    if let Err(e) = inotify.add_watch(dir, mask) {
        warn!(dir = %dir.display(), error = %e, "cannot watch the CNI config dir");
        check();
        return;
    }
    check();
    loop {
        match inotify.read_events() {
            Ok(events) => {
                if events.iter().any(|e| {
                    e.mask.intersects(
                        AddWatchFlags::IN_IGNORED
                            | AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_MOVE_SELF,
                    )
                }) {
                    warn!(dir = %dir.display(), "the CNI config dir went away; no longer watching it");
                    return;
                }
                // Let a writer finish a burst of changes before we look.
                std::thread::sleep(std::time::Duration::from_millis(50));
                check();
            }
            Err(e) => {
                warn!(error = %e, "reading inotify events failed; no longer watching");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        json!({"type": "mesh-cni", "name": "mesh-cni", "agent_socket": "/run/a.sock"})
    }

    #[test]
    fn conflist_gets_our_entry_appended_once() {
        let list = json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
        let chained = chain(&list, &entry()).unwrap().unwrap();
        assert_eq!(chained["plugins"][2]["type"], "mesh-cni");
        assert_eq!(chained["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(chained["name"], "podnet");
        assert_eq!(
            chain(&chained, &entry()).unwrap(),
            None,
            "already chained: no rewrite"
        );
        // An older entry of ours (different settings, wrong position) is replaced.
        let stale = json!({"cniVersion": "1.0.0", "name": "p", "plugins": [{"type": "mesh-cni"}, {"type": "bridge"}]});
        let fixed = chain(&stale, &entry()).unwrap().unwrap();
        assert_eq!(fixed["plugins"], json!([{"type": "bridge"}, entry()]));
    }

    #[test]
    fn single_conf_is_wrapped() {
        let conf = json!({"cniVersion": "0.4.0", "name": "k", "type": "bridge"});
        let chained = chain(&conf, &entry()).unwrap().unwrap();
        assert_eq!(
            chained,
            json!({"cniVersion": "0.4.0", "name": "k", "plugins": [conf, entry()]})
        );
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        assert!(
            chain(&json!([1]), &entry())
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            chain(&json!({"plugins": 3}), &entry())
                .unwrap_err()
                .contains("not a list")
        );
        assert!(
            chain(&json!({"plugins": [{"type": "mesh-cni"}]}), &entry())
                .unwrap_err()
                .contains("no primary CNI")
        );
    }

    #[test]
    fn primary_is_first_valid_file_and_chaining_is_atomic_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("00-broken.conflist"), "{not json").unwrap();
        std::fs::write(dir.path().join("README"), "x").unwrap();
        let conf = dir.path().join("10-bridge.conf");
        std::fs::write(
            &conf,
            r#"{"cniVersion":"1.0.0","name":"podnet","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(
            dir.path().join("20-other.conflist"),
            r#"{"name":"o","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(primary_config(dir.path()).unwrap(), Some(conf.clone()));
        let written = ensure_chained(dir.path(), &entry()).unwrap().unwrap();
        assert_eq!(written, dir.path().join("10-bridge.conflist"));
        assert!(!conf.exists(), "the .conf is replaced by the .conflist");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!(v["plugins"][1]["type"], "mesh-cni");
        let mode = std::fs::metadata(&written).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ensure_chained(dir.path(), &entry()).unwrap(), None);
        let other = std::fs::read_to_string(dir.path().join("20-other.conflist")).unwrap();
        assert!(
            !other.contains("mesh-cni"),
            "only the primary config is chained"
        );
    }

    #[test]
    fn binary_is_installed_executable() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-bin");
        std::fs::write(&src, b"\x7fELF...").unwrap();
        let dst = install_binary(&src, &dir.path().join("bin")).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"\x7fELF...");
        assert_eq!(
            std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            install_binary(&dir.path().join("missing"), dir.path())
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }
}
