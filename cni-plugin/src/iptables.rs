//! Applying the rules of `redirect.rs`: the [`RuleBackend`] trait (so an nftables backend
//! can follow) and its `iptables-restore` implementation, plus the host's probe ipsets.
//!
//! Invariants: every operation runs inside the given netns (see `netns.rs`); applying
//! twice yields the same rules; removal touches only our chains, jumps, ip rule and table
//! 100 route; any failing command is an error naming the command, the netns and stderr.

use std::{
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
};

use tracing::debug;

use crate::{
    netns::{Netns, NetnsError},
    redirect::{self, Family, PodOptions, Saved},
};

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error(
        "cannot run {cmd} in netns {netns}: {source}; install iptables, iproute2 and ipset on the node"
    )]
    Spawn {
        cmd: String,
        netns: String,
        source: std::io::Error,
    },
    #[error("{cmd} in netns {netns} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        netns: String,
        status: String,
        stderr: String,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// How redirection rules get into a netns.
pub trait RuleBackend: Send + Sync + 'static {
    /// Installs (or refreshes) the in-pod rules and return-path routing.
    fn apply_pod(&self, netns: &Netns, opts: PodOptions) -> Result<(), RuleError>;
    /// Removes everything `apply_pod` installed; succeeds when nothing is there.
    fn remove_pod(&self, netns: &Netns) -> Result<(), RuleError>;
    /// Installs the host's probe SNAT rule and (empty) probe ipsets.
    fn apply_host(&self, host: &Netns) -> Result<(), RuleError>;
    /// Adds a pod IP to the probe ipset (comment = pod UID), replacing any older entry.
    fn probe_add(&self, host: &Netns, ip: IpAddr, uid: &str) -> Result<(), RuleError>;
    /// Removes a pod IP from the probe ipset, only if its comment is this UID.
    fn probe_remove(&self, host: &Netns, ip: IpAddr, uid: &str) -> Result<(), RuleError>;
}

/// `iptables-restore --noflush` / `ip6tables-restore` plus `ip` and `ipset`.
#[derive(Debug, Clone)]
pub struct IptablesRestore {
    pub families: Vec<Family>,
}

struct Out {
    stdout: String,
}

fn run(netns: &Netns, argv: &[&str], stdin: Option<&str>) -> Result<Out, RuleError> {
    let ns = netns.path().display().to_string();
    let cmd = argv.join(" ");
    let (prog, args) = argv.split_first().unwrap_or((&"true", &[]));
    let result = netns.run(|| {
        let mut child = Command::new(prog)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        child.wait_with_output()
    })?;
    let out = result.map_err(|source| RuleError::Spawn {
        cmd: cmd.clone(),
        netns: ns.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(RuleError::Failed {
            cmd,
            netns: ns,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    debug!(netns = %ns, %cmd, "ran");
    Ok(Out {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

fn save(netns: &Netns, family: Family) -> Result<Saved, RuleError> {
    let prog = format!("{}-save", family.iptables());
    Ok(Saved::parse(&run(netns, &[&prog], None)?.stdout))
}

fn restore(netns: &Netns, family: Family, text: &str) -> Result<(), RuleError> {
    if text.is_empty() {
        return Ok(());
    }
    let prog = format!("{}-restore", family.iptables());
    run(netns, &[&prog, "--noflush"], Some(text)).map(|_| ())
}

fn ip(netns: &Netns, args: &[String]) -> Result<Out, RuleError> {
    let mut argv = vec!["ip"];
    argv.extend(args.iter().map(String::as_str));
    run(netns, &argv, None)
}

fn rule_present(netns: &Netns, family: Family) -> Result<bool, RuleError> {
    let out = ip(
        netns,
        &[
            family.ip_flag(),
            "rule",
            "show",
            "pref",
            &redirect::RULE_PRIORITY.to_string(),
        ]
        .map(String::from),
    )?;
    Ok(redirect::rule_present(&out.stdout))
}

fn route_present(netns: &Netns, family: Family) -> Result<bool, RuleError> {
    let out = ip(
        netns,
        &[
            family.ip_flag(),
            "route",
            "show",
            "table",
            &redirect::ROUTE_TABLE.to_string(),
        ]
        .map(String::from),
    );
    // An empty or missing table is "not present".
    Ok(out.is_ok_and(|o| !o.stdout.trim().is_empty()))
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}

impl RuleBackend for IptablesRestore {
    fn apply_pod(&self, netns: &Netns, opts: PodOptions) -> Result<(), RuleError> {
        for &f in &self.families {
            let existing = save(netns, f)?;
            restore(
                netns,
                f,
                &redirect::apply_text(&redirect::pod_tables(f, opts), &existing),
            )?;
            for args in redirect::route_add_commands(f, rule_present(netns, f)?) {
                ip(netns, &args)?;
            }
        }
        Ok(())
    }

    fn remove_pod(&self, netns: &Netns) -> Result<(), RuleError> {
        // Both families regardless of configuration: leave nothing of ours behind.
        for f in [Family::V4, Family::V6] {
            match save(netns, f) {
                Ok(existing) => restore(netns, f, &redirect::remove_text(&existing))?,
                // No ip6tables on a v4-only node means no v6 rules to remove.
                Err(RuleError::Spawn { .. }) if f == Family::V6 => continue,
                Err(e) => return Err(e),
            }
            let (rule, route) = (
                rule_present(netns, f).unwrap_or(false),
                route_present(netns, f)?,
            );
            for args in redirect::route_del_commands(f, rule, route) {
                ip(netns, &args)?;
            }
        }
        Ok(())
    }

    fn apply_host(&self, host: &Netns) -> Result<(), RuleError> {
        for &f in &self.families {
            let set = f.probe_ipset();
            let family = if f == Family::V4 { "inet" } else { "inet6" };
            run(
                host,
                &[
                    "ipset", "create", set, "hash:ip", "comment", "family", family, "-exist",
                ],
                None,
            )?;
            // Refilled from the enrolled pods by the agent.
            run(host, &["ipset", "flush", set], None)?;
            // Only the nat table is ours on the host; never touch chains elsewhere there.
            let mut existing = save(host, f)?;
            existing.tables.retain(|name, _| name == "nat");
            restore(
                host,
                f,
                &redirect::apply_text(&redirect::host_tables(f), &existing),
            )?;
        }
        Ok(())
    }

    fn probe_add(&self, host: &Netns, ip: IpAddr, uid: &str) -> Result<(), RuleError> {
        let f = family_of(ip);
        if !self.families.contains(&f) {
            return Ok(());
        }
        let set = f.probe_ipset();
        let ip = ip.to_string();
        // `-exist` alone keeps an old comment; delete first so the entry names this pod.
        let _ = run(host, &["ipset", "del", set, &ip, "-exist"], None);
        run(
            host,
            &["ipset", "add", set, &ip, "comment", uid, "-exist"],
            None,
        )
        .map(|_| ())
    }

    fn probe_remove(&self, host: &Netns, ip: IpAddr, uid: &str) -> Result<(), RuleError> {
        let f = family_of(ip);
        if !self.families.contains(&f) {
            return Ok(());
        }
        let set = f.probe_ipset();
        let listed = run(host, &["ipset", "save", set], None)?;
        let ip = ip.to_string();
        let ours = redirect::ipset_entries(&listed.stdout, set)
            .iter()
            .any(|(i, c)| *i == ip && c == uid);
        if ours {
            run(host, &["ipset", "del", set, &ip, "-exist"], None)?;
        }
        Ok(())
    }
}
