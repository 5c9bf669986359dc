//! Finding the netns of a pod that was already running (agent restart, label added later):
//! scan `<proc>/*/cgroup` for the pod UID, open that process's `ns/net`, and accept it only
//! if one of the pod's IPs is local there (a process merely visiting the netns, or a stale
//! cgroup, is not the pod).
//!
//! The cgroup parsing is pure and table-tested; it understands the systemd and cgroupfs
//! layouts of cgroup v1 and v2 (`…-pod<uid with _>.slice`, `…/pod<uid>/…`).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use tracing::debug;

use crate::netns::Netns;

/// The pod UID in a `/proc/<pid>/cgroup` file, canonicalised (`_` → `-`), if any.
pub fn pod_uid_from_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/').find_map(uid_in_segment)
    })
}

fn uid_in_segment(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let mut from = 0;
    while let Some(i) = seg[from..].find("pod") {
        let start = from + i + 3;
        let before_ok = from + i == 0 || !seg.as_bytes()[from + i - 1].is_ascii_alphanumeric();
        if let Some(cand) = seg.get(start..start + 36) {
            let after_ok = seg
                .as_bytes()
                .get(start + 36)
                .is_none_or(|b| !b.is_ascii_alphanumeric());
            if before_ok && after_ok && is_uuid(cand) {
                return Some(cand.replace('_', "-").to_ascii_lowercase());
            }
        }
        from = start;
    }
    None
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-' || b == b'_',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Scans `proc_root` for a process of pod `uid` whose netns holds one of `ips`. Skips the
/// netns `skip` (the host's). `Ok(None)`: not found (yet).
pub fn find_pod_netns(
    proc_root: &Path,
    uid: &str,
    ips: &[IpAddr],
    skip: (u64, u64),
) -> std::io::Result<Option<Netns>> {
    if ips.is_empty() {
        return Ok(None);
    }
    let want = uid.to_ascii_lowercase();
    let mut pids: Vec<(u64, PathBuf)> = std::fs::read_dir(proc_root)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u64 = e.file_name().to_str()?.parse().ok()?;
            Some((pid, e.path()))
        })
        .collect();
    // Oldest first (lowest PID is a good proxy for the sandbox's pause process).
    pids.sort();
    let mut seen = Vec::new();
    for (pid, dir) in pids {
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        if pod_uid_from_cgroup(&cgroup).as_deref() != Some(want.as_str()) {
            continue;
        }
        let Ok(netns) = Netns::open(&dir.join("ns/net")) else {
            continue;
        };
        if netns.id() == skip || seen.contains(&netns.id()) {
            continue;
        }
        seen.push(netns.id());
        let mut holds_ip = false;
        for ip in ips {
            if netns.has_ip(*ip).unwrap_or(false) {
                holds_ip = true;
                break;
            }
        }
        if holds_ip {
            debug!(%uid, pid, "found the pod's netns");
            return Ok(Some(netns));
        }
        debug!(%uid, pid, "process of the pod is in a netns without the pod's IPs; ignored");
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    const UID: &str = "72f7f152-440c-4d7e-a2b0-3b3a7f0c8d1e";

    #[test_case("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod72f7f152_440c_4d7e_a2b0_3b3a7f0c8d1e.slice/cri-containerd-abc.scope", Some(UID) ; "v2 systemd")]
    #[test_case("12:memory:/kubepods/burstable/pod72f7f152-440c-4d7e-a2b0-3b3a7f0c8d1e/0123abcd", Some(UID) ; "v1 cgroupfs")]
    #[test_case("0::/kubepods.slice/kubepods-pod72F7F152_440C_4D7E_A2B0_3B3A7F0C8D1E.slice/crio-1.scope", Some(UID) ; "upper case guaranteed pod")]
    #[test_case("0::/system.slice/containerd.service", None ; "not a pod")]
    #[test_case("0::/kubepods.slice/kubepods-podnothex-440c-4d7e-a2b0-3b3a7f0c8d1e.slice", None ; "not a uuid")]
    #[test_case("0::/x/apod72f7f152-440c-4d7e-a2b0-3b3a7f0c8d1e/", None ; "pod must start a word")]
    #[test_case("garbage", None ; "garbage")]
    fn cgroup_pod_uid(text: &str, want: Option<&str>) {
        assert_eq!(pod_uid_from_cgroup(text).as_deref(), want);
    }

    #[test]
    fn multi_line_v1_file() {
        let text = format!("12:pids:/\n11:cpu,cpuacct:/kubepods/pod{UID}/c1\n0::/\n");
        assert_eq!(pod_uid_from_cgroup(&text).as_deref(), Some(UID));
    }
}
