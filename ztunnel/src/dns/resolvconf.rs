//! Reads the upstream resolvers and search domains from a resolv.conf(5) file.
//!
//! Only `nameserver` and `search`/`domain` lines matter to the proxy; other options are
//! ignored. A file with no usable nameserver is an error naming the file, since forwarding
//! would otherwise fail for every non-mesh name.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

/// What the proxy takes from resolv.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// Upstream resolvers, port 53, in file order.
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolvConfError {
    #[error(
        "reading {path}: {source} (set DNS_RESOLV_CONF to the file with the upstream resolvers)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} names no nameserver (line `nameserver <ip>`): non-mesh names could not be forwarded"
    )]
    NoNameserver { path: String },
}

impl ResolvConf {
    pub fn load(path: &Path) -> Result<Self, ResolvConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| ResolvConfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let rc = Self::parse(&text);
        if rc.nameservers.is_empty() {
            return Err(ResolvConfError::NoNameserver {
                path: path.display().to_string(),
            });
        }
        Ok(rc)
    }

    /// Parses the text; malformed lines are skipped (as the libc resolver does).
    pub fn parse(text: &str) -> Self {
        let mut nameservers = Vec::new();
        let mut search = Vec::new();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // A zone index (`fe80::1%eth0`) cannot be used from another netns: skip.
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
                // The last `search` or `domain` line wins.
                Some("search") | Some("domain") => {
                    search = words.map(|w| w.trim_matches('.').to_owned()).collect();
                }
                _ => {}
            }
        }
        ResolvConf {
            nameservers,
            search,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_and_last_search_line() {
        let rc = ResolvConf::parse(
            "# generated\nsearch a.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
             nameserver fd00::a ; v6\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n\
             domain corp.example.\n",
        );
        assert_eq!(
            rc.nameservers,
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[fd00::a]:53".parse().unwrap()
            ]
        );
        assert_eq!(rc.search, vec!["corp.example"]);
    }

    #[test]
    fn missing_file_and_no_nameserver_are_errors_naming_the_file() {
        let e = ResolvConf::load(Path::new("/nonexistent/resolv.conf")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/resolv.conf"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(&p, "search x\n").unwrap();
        let e = ResolvConf::load(&p).unwrap_err();
        assert!(e.to_string().contains("names no nameserver"), "{e}");
    }
}
