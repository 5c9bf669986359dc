//! In-pod redirection rules (Istio's, redirection-cni.md §1) as pure functions: desired
//! tables → `iptables-restore --noflush` text, `iptables-save` text → what exists, and the
//! policy-routing commands. Nothing here touches the system; `iptables.rs` applies it.
//!
//! Invariants: the constants equal Istio's (and ztunnel's `PACKET_MARK`); applying is
//! idempotent — chain declarations flush and refill our own chains in one transaction, and
//! a jump from a built-in chain is only added when `iptables-save` does not show it already;
//! removal deletes exactly what `iptables-save` shows of ours, so it never fails half-way.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

/// `SO_MARK` on every socket ztunnel opens in a pod netns (ztunnel `PACKET_MARK`).
pub const INPOD_MARK: u32 = 0x539;
pub const INPOD_MASK: u32 = 0xfff;
/// ctmark/fwmark "reply goes back to ztunnel" (Istio's `InpodTProxyMark`).
pub const CONNMARK: u32 = 0x111;
pub const CONNMARK_MASK: u32 = 0xfff;
pub const RESTORE_MASK: u32 = 0xffff_ffff;
pub const ROUTE_TABLE: u32 = 100;
pub const RULE_PRIORITY: u32 = 32764;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const INBOUND_HBONE_PORT: u16 = 15008;
pub const DNS_PORT: u16 = 15053;
pub const PROBE_SNAT_V4: &str = "169.254.7.127";
pub const PROBE_SNAT_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
pub const PROBE_IPSET_V4: &str = "istio-inpod-probes-v4";
pub const PROBE_IPSET_V6: &str = "istio-inpod-probes-v6";
pub const CHAIN_PRERT: &str = "ISTIO_PRERT";
pub const CHAIN_OUTPUT: &str = "ISTIO_OUTPUT";
pub const CHAIN_POSTRT: &str = "ISTIO_POSTRT";
/// Every chain this crate owns, in any table of any netns.
pub const OWNED_CHAINS: &[&str] = &[CHAIN_PRERT, CHAIN_OUTPUT, CHAIN_POSTRT];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
    pub fn probe_snat(self) -> &'static str {
        match self {
            Family::V4 => PROBE_SNAT_V4,
            Family::V6 => PROBE_SNAT_V6,
        }
    }
    pub fn probe_ipset(self) -> &'static str {
        match self {
            Family::V4 => PROBE_IPSET_V4,
            Family::V6 => PROBE_IPSET_V6,
        }
    }
    pub fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
    /// `iptables` / `ip6tables` command prefix.
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    pub fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// Per-pod switches (Istio's variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodOptions {
    /// Capture UDP and TCP port 53 to ztunnel's DNS proxy on :15053.
    pub dns_capture: bool,
    /// Capture inbound plaintext to :15006 (off = Istio's ingress mode).
    pub inbound_capture: bool,
}

impl Default for PodOptions {
    fn default() -> Self {
        PodOptions {
            dns_capture: true,
            inbound_capture: true,
        }
    }
}

/// A jump from a built-in chain to one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub from: &'static str,
    pub to: &'static str,
    /// Insert at position 1 instead of appending.
    pub first: bool,
}

/// One table's worth of our rules, in the order Istio writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub chains: Vec<&'static str>,
    pub jumps: Vec<Jump>,
    pub rules: Vec<String>,
}

fn jump(from: &'static str, to: &'static str) -> Jump {
    Jump {
        from,
        to,
        first: false,
    }
}

/// The rules inside a pod's netns for one address family (redirection-cni.md §1.2).
pub fn pod_tables(family: Family, opts: PodOptions) -> Vec<Table> {
    let mark = format!("{INPOD_MARK:#x}/{INPOD_MASK:#x}");
    let connmark = format!("{CONNMARK:#x}/{CONNMARK_MASK:#x}");
    let lo = family.localhost();
    let snat = family.probe_snat();
    let mangle = Table {
        name: "mangle",
        chains: vec![CHAIN_PRERT, CHAIN_OUTPUT],
        jumps: vec![
            jump("PREROUTING", CHAIN_PRERT),
            jump("OUTPUT", CHAIN_OUTPUT),
        ],
        rules: vec![
            format!("-A {CHAIN_PRERT} -m mark --mark {mark} -j CONNMARK --set-xmark {connmark}"),
            format!(
                "-A {CHAIN_OUTPUT} -m connmark --mark {connmark} -j CONNMARK --restore-mark --nfmask {RESTORE_MASK:#x} --ctmask {RESTORE_MASK:#x}"
            ),
        ],
    };
    let mut nat_rules = Vec::new();
    if opts.inbound_capture {
        nat_rules.push(format!(
            "-A {CHAIN_PRERT} -s {snat} -p tcp -m tcp -j ACCEPT"
        ));
    }
    nat_rules.push(format!(
        "-A {CHAIN_OUTPUT} -d {snat} -p tcp -m tcp -j ACCEPT"
    ));
    if opts.inbound_capture {
        nat_rules.push(format!(
            "-A {CHAIN_PRERT} ! -d {lo} -p tcp ! --dport {INBOUND_HBONE_PORT} -m mark ! --mark {mark} -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}"
        ));
    }
    if opts.dns_capture {
        nat_rules.push(format!(
            "-A {CHAIN_OUTPUT} ! -o lo -p udp -m mark ! --mark {mark} -m udp --dport 53 -j REDIRECT --to-port {DNS_PORT}"
        ));
        nat_rules.push(format!(
            "-A {CHAIN_OUTPUT} ! -d {lo} -p tcp --dport 53 -m mark ! --mark {mark} -j REDIRECT --to-ports {DNS_PORT}"
        ));
    }
    nat_rules.extend([
        format!("-A {CHAIN_OUTPUT} -p tcp -m mark --mark {connmark} -j ACCEPT"),
        format!("-A {CHAIN_OUTPUT} ! -d {lo} -o lo -j ACCEPT"),
        format!(
            "-A {CHAIN_OUTPUT} ! -d {lo} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {OUTBOUND_PORT}"
        ),
    ]);
    let nat = Table {
        name: "nat",
        chains: vec![CHAIN_PRERT, CHAIN_OUTPUT],
        jumps: vec![
            jump("OUTPUT", CHAIN_OUTPUT),
            jump("PREROUTING", CHAIN_PRERT),
        ],
        rules: nat_rules,
    };
    let mut tables = vec![mangle, nat];
    if opts.dns_capture {
        tables.push(Table {
            name: "raw",
            chains: vec![CHAIN_OUTPUT, CHAIN_PRERT],
            jumps: vec![jump("PREROUTING", CHAIN_PRERT), jump("OUTPUT", CHAIN_OUTPUT)],
            rules: vec![
                format!("-A {CHAIN_OUTPUT} -p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone 1"),
                format!("-A {CHAIN_PRERT} -p udp -m mark ! --mark {mark} -m udp --sport 53 -j CT --zone 1"),
            ],
        });
    }
    tables
}

/// The node's root-netns rule: SNAT local-socket TCP to enrolled pods (the probe ipset) to
/// the probe address, which the pods accept uncaptured (redirection-cni.md §1.3).
pub fn host_tables(family: Family) -> Vec<Table> {
    vec![Table {
        name: "nat",
        chains: vec![CHAIN_POSTRT],
        jumps: vec![Jump {
            from: "POSTROUTING",
            to: CHAIN_POSTRT,
            first: true,
        }],
        rules: vec![format!(
            "-A {CHAIN_POSTRT} -m owner --socket-exists -p tcp -m set --match-set {} dst -j SNAT --to-source {}",
            family.probe_ipset(),
            family.probe_snat()
        )],
    }]
}

/// What `iptables-save` shows: per table, its chains and rule lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: BTreeMap<String, SavedTable>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: BTreeSet<String>,
    pub rules: Vec<String>,
}

impl Saved {
    pub fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        let mut current: Option<String> = None;
        for line in text.lines().map(str::trim) {
            if let Some(t) = line.strip_prefix('*') {
                current = Some(t.to_string());
                saved.tables.entry(t.to_string()).or_default();
            } else if line == "COMMIT" {
                current = None;
            } else if let Some(t) = current.as_ref().and_then(|t| saved.tables.get_mut(t)) {
                if let Some(decl) = line.strip_prefix(':') {
                    if let Some(name) = decl.split_whitespace().next() {
                        t.chains.insert(name.to_string());
                    }
                } else if line.starts_with("-A ") {
                    t.rules.push(line.to_string());
                }
            }
        }
        saved
    }

    fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.get(name)
    }

    fn jump_count(&self, table: &str, j: &Jump) -> usize {
        let want = format!("-A {} -j {}", j.from, j.to);
        self.table(table)
            .map_or(0, |t| t.rules.iter().filter(|r| **r == want).count())
    }

    /// Our rules as they stand, normalised for comparison (table, chain decls, rule lines).
    pub fn owned(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, t) in &self.tables {
            for c in t
                .chains
                .iter()
                .filter(|c| OWNED_CHAINS.contains(&c.as_str()))
            {
                out.push(format!("{name} :{c}"));
            }
            for r in &t.rules {
                if OWNED_CHAINS
                    .iter()
                    .any(|c| r.split_whitespace().any(|w| w == *c))
                {
                    out.push(format!("{name} {r}"));
                }
            }
        }
        out
    }

    /// Does anything of ours exist here?
    pub fn has_owned(&self) -> bool {
        !self.owned().is_empty()
    }
}

/// `iptables-restore --noflush` input that makes `tables` current, given what exists.
/// With nothing existing this is exactly Istio's golden text. Our chains in tables that
/// are no longer wanted (the raw table when DNS capture is turned off) are removed.
pub fn apply_text(tables: &[Table], existing: &Saved) -> String {
    let unwanted = Saved {
        tables: existing
            .tables
            .iter()
            .filter(|(name, _)| !tables.iter().any(|t| t.name == name.as_str()))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect(),
    };
    let mut out = remove_text(&unwanted);
    for t in tables {
        let _ = writeln!(out, "*{}", t.name);
        for c in &t.chains {
            // With --noflush, declaring a user chain creates it or flushes it.
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for j in &t.jumps {
            if existing.jump_count(t.name, j) > 0 {
                continue;
            }
            if j.first {
                let _ = writeln!(out, "-I {} 1 -j {}", j.from, j.to);
            } else {
                let _ = writeln!(out, "-A {} -j {}", j.from, j.to);
            }
        }
        for r in &t.rules {
            let _ = writeln!(out, "{r}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// `iptables-restore --noflush` input that removes everything of ours that exists (jumps,
/// then our chains). Empty when there is nothing to remove.
pub fn remove_text(existing: &Saved) -> String {
    let mut out = String::new();
    for (name, t) in &existing.tables {
        let ours: Vec<&String> = t
            .chains
            .iter()
            .filter(|c| OWNED_CHAINS.contains(&c.as_str()))
            .collect();
        let jumps: Vec<&String> = t
            .rules
            .iter()
            .filter(|r| {
                let w: Vec<&str> = r.split_whitespace().collect();
                w.len() == 4
                    && w[0] == "-A"
                    && w[2] == "-j"
                    && OWNED_CHAINS.contains(&w[3])
                    && !OWNED_CHAINS.contains(&w[1])
            })
            .collect();
        if ours.is_empty() && jumps.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{name}");
        for j in jumps {
            let _ = writeln!(out, "-D{}", &j[2..]);
        }
        for c in &ours {
            let _ = writeln!(out, "-F {c}");
        }
        for c in &ours {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// `ip` argument lists that install the return-path routing (fwmark 0x111 → table 100 →
/// local on lo). `rule_present` = `ip rule show pref 32764` already lists our rule.
pub fn route_add_commands(family: Family, rule_present: bool) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    if !rule_present {
        cmds.push(rule_args(family, "add"));
    }
    cmds.push(route_args(family, "replace"));
    cmds
}

/// `ip` argument lists that remove the routing (only what is present).
pub fn route_del_commands(
    family: Family,
    rule_present: bool,
    route_present: bool,
) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    if rule_present {
        cmds.push(rule_args(family, "del"));
    }
    if route_present {
        cmds.push(route_args(family, "del"));
    }
    cmds
}

fn rule_args(family: Family, verb: &str) -> Vec<String> {
    let mark = format!("{CONNMARK:#x}/{CONNMARK_MASK:#x}");
    [
        family.ip_flag(),
        "rule",
        verb,
        "fwmark",
        &mark,
        "pref",
        &RULE_PRIORITY.to_string(),
        "lookup",
        &ROUTE_TABLE.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn route_args(family: Family, verb: &str) -> Vec<String> {
    [
        family.ip_flag(),
        "route",
        verb,
        "local",
        family.any(),
        "dev",
        "lo",
        "table",
        &ROUTE_TABLE.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Does `ip rule show pref 32764` output contain our rule?
pub fn rule_present(ip_rule_show: &str) -> bool {
    ip_rule_show.lines().any(|l| {
        l.trim_start().starts_with(&format!("{RULE_PRIORITY}:"))
            && l.contains(&format!("fwmark {CONNMARK:#x}/{CONNMARK_MASK:#x}"))
            && l.contains(&format!("lookup {ROUTE_TABLE}"))
    })
}

/// `ipset` entries of a set, from `ipset save <set>` output: (ip, comment).
pub fn ipset_entries(save: &str, set: &str) -> Vec<(String, String)> {
    save.lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("add ")?
                .strip_prefix(set)?
                .strip_prefix(' ')?;
            let (ip, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let comment = tail
                .strip_prefix("comment ")
                .map(|c| c.trim().trim_matches('"').to_string())
                .unwrap_or_default();
            Some((ip.to_string(), comment))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str, got: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(got, want, "{} differs", path.display());
    }

    #[test]
    fn v4_with_dns_is_istios_default_golden() {
        let text = apply_text(
            &pod_tables(Family::V4, PodOptions::default()),
            &Saved::default(),
        );
        golden("pod-v4-dns.rules", &text);
        // Same as Istio's cni/pkg/iptables/testdata/default.golden (redirection-cni.md §1.2).
        assert!(text.contains("-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006\n"));
        assert!(text.contains("-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053\n"));
    }

    #[test]
    fn v4_without_dns_has_no_raw_table_and_no_15053() {
        let opts = PodOptions {
            dns_capture: false,
            ..PodOptions::default()
        };
        let text = apply_text(&pod_tables(Family::V4, opts), &Saved::default());
        golden("pod-v4-nodns.rules", &text);
        assert!(!text.contains("*raw"));
        assert!(!text.contains("15053"));
    }

    #[test]
    fn v6_uses_v6_loopback_and_snat_address() {
        let text = apply_text(
            &pod_tables(Family::V6, PodOptions::default()),
            &Saved::default(),
        );
        golden("pod-v6-dns.rules", &text);
        assert!(!text.contains("127.0.0.1"));
        assert!(text.contains("! -d ::1/128"));
        assert!(text.contains("-s fd16:9254:7127:1337:ffff:ffff:ffff:ffff -p tcp"));
    }

    #[test]
    fn ingress_mode_keeps_connmark_but_not_inbound_redirect() {
        let opts = PodOptions {
            inbound_capture: false,
            ..PodOptions::default()
        };
        let text = apply_text(&pod_tables(Family::V4, opts), &Saved::default());
        assert!(!text.contains("15006"));
        assert!(!text.contains("-A ISTIO_PRERT -s 169.254.7.127"));
        assert!(text.contains("CONNMARK --set-xmark 0x111/0xfff"));
    }

    #[test]
    fn host_rules_are_istios_hostprobe_golden() {
        let mut text = apply_text(&host_tables(Family::V4), &Saved::default());
        text.push_str(&apply_text(&host_tables(Family::V6), &Saved::default()));
        golden("host.rules", &text);
    }

    #[test]
    fn reapply_skips_existing_jumps_only() {
        let tables = pod_tables(Family::V4, PodOptions::default());
        // What iptables-save prints after a first apply (nft backend).
        let saved = Saved::parse(
            "# Generated by iptables-save\n*mangle\n:PREROUTING ACCEPT [0:0]\n:ISTIO_PRERT - [0:0]\n-A PREROUTING -j ISTIO_PRERT\nCOMMIT\n*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A PREROUTING -j ISTIO_PRERT\nCOMMIT\n",
        );
        let text = apply_text(&tables, &saved);
        assert!(!text.contains("-D "), "{text}");
        // nat had both jumps: none is added again.
        let nat = text
            .split("*nat\n")
            .nth(1)
            .unwrap()
            .split("COMMIT")
            .next()
            .unwrap();
        assert!(
            !nat.contains("-j ISTIO_PRERT\n-A") && !nat.contains("-A OUTPUT -j"),
            "{nat}"
        );
        assert!(!nat.contains("-A PREROUTING -j"), "{nat}");
        // mangle OUTPUT and raw jumps were missing, so they are added.
        assert!(
            text.starts_with(
                "*mangle\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n"
            ),
            "{text}"
        );
        assert!(text.contains("*raw\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_PRERT - [0:0]\n-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\n"), "{text}");
        // The chains are always re-declared (flushed) and refilled.
        assert_eq!(text.matches("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001").count(), 1);
    }

    #[test]
    fn turning_dns_off_removes_our_raw_chains() {
        let opts = PodOptions {
            dns_capture: false,
            ..PodOptions::default()
        };
        let saved = Saved::parse(
            "*raw\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_PRERT - [0:0]\n-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n",
        );
        let text = apply_text(&pod_tables(Family::V4, opts), &saved);
        assert!(
            text.starts_with("*raw\n-D PREROUTING -j ISTIO_PRERT\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-F ISTIO_PRERT\n-X ISTIO_OUTPUT\n-X ISTIO_PRERT\nCOMMIT\n*mangle\n"),
            "{text}"
        );
    }

    #[test]
    fn removal_deletes_only_what_exists_and_leaves_others_rules() {
        let saved = Saved::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:KUBE-SVC - [0:0]\n-A OUTPUT -j KUBE-SVC\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
        );
        assert_eq!(
            remove_text(&saved),
            "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
        assert!(saved.has_owned());
        assert_eq!(
            remove_text(&Saved::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")),
            ""
        );
    }

    #[test]
    fn route_commands_are_istios() {
        assert_eq!(
            route_add_commands(Family::V4, false),
            vec![
                "-4 rule add fwmark 0x111/0xfff pref 32764 lookup 100"
                    .split(' ')
                    .map(String::from)
                    .collect::<Vec<_>>(),
                "-4 route replace local 0.0.0.0/0 dev lo table 100"
                    .split(' ')
                    .map(String::from)
                    .collect(),
            ]
        );
        assert_eq!(
            route_add_commands(Family::V6, true)[0].join(" "),
            "-6 route replace local ::/0 dev lo table 100"
        );
        assert!(rule_present(
            "32764:\tfrom all fwmark 0x111/0xfff lookup 100\n"
        ));
        assert!(!rule_present("32766:\tfrom all lookup main\n"));
        assert_eq!(route_del_commands(Family::V4, false, true).len(), 1);
    }

    #[test]
    fn ipset_save_is_parsed() {
        let save = "create istio-inpod-probes-v4 hash:ip family inet hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x1\nadd istio-inpod-probes-v4 10.244.1.2 comment \"uid-p1a\"\nadd istio-inpod-probes-v4 10.244.1.3\n";
        assert_eq!(
            ipset_entries(save, PROBE_IPSET_V4),
            vec![
                ("10.244.1.2".into(), "uid-p1a".into()),
                ("10.244.1.3".into(), String::new())
            ]
        );
        assert!(ipset_entries(save, PROBE_IPSET_V6).is_empty());
    }
}
