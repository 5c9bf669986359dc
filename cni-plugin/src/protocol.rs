//! The plugin ↔ node agent protocol on `cni.sock` (a unix stream socket): one JSON request
//! line, one JSON response line, then the connection closes. See `docs/cni.md`.
//!
//! The agent answers only after the pod's rules are installed *and* ztunnel acked the pod
//! (`ok: true`); anything else is an error that fails ADD (code 11 when `retryable`).
//! The client side here is synchronous (the plugin has no async runtime).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Largest request or response line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// `{"op":"add", …}`: enroll the pod whose sandbox was just created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    #[serde(rename_all = "camelCase")]
    Add {
        pod_namespace: String,
        pod_name: String,
        /// `K8S_POD_UID` when the runtime set it; otherwise the agent looks it up.
        #[serde(default)]
        pod_uid: Option<String>,
        /// `CNI_NETNS`, as seen by the runtime (host path).
        netns: PathBuf,
        #[serde(default)]
        container_id: String,
        /// From `prevResult.ips` (the API server does not know them yet).
        #[serde(default)]
        ips: Vec<IpAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub ok: bool,
    /// Empty when `ok`.
    #[serde(default)]
    pub error: String,
    /// The failure may clear by itself (ztunnel not connected yet, agent starting).
    #[serde(default)]
    pub retryable: bool,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            error: String::new(),
            retryable: false,
        }
    }

    pub fn failed(error: impl Into<String>, retryable: bool) -> Response {
        Response {
            ok: false,
            error: error.into(),
            retryable,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the node agent at {path}: {source}; is the mesh-cni-agent DaemonSet running on this node?"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("node agent at {path} did not answer in {timeout:?}: {reason}")]
    NoAnswer {
        path: String,
        timeout: Duration,
        reason: String,
    },
    #[error("node agent refused the pod: {error}")]
    Refused { error: String, retryable: bool },
}

impl ClientError {
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::NoAnswer { .. } => true,
            ClientError::Refused { retryable, .. } => *retryable,
        }
    }
}

/// Sends one request and waits (at most `timeout` in total per read/write) for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<(), ClientError> {
    let path = socket.display().to_string();
    let no_answer = |reason: String| ClientError::NoAnswer {
        path: path.clone(),
        timeout,
        reason,
    };
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: path.clone(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| no_answer(e.to_string()))?;
    let mut line = serde_json::to_vec(req).map_err(|e| no_answer(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| no_answer(e.to_string()))?;
    let mut answer = String::new();
    let mut r = BufReader::new(s.take(MAX_LINE as u64));
    r.read_line(&mut answer)
        .map_err(|e| no_answer(e.to_string()))?;
    let resp: Response = serde_json::from_str(answer.trim())
        .map_err(|e| no_answer(format!("unreadable answer {answer:?}: {e}")))?;
    if resp.ok {
        Ok(())
    } else {
        Err(ClientError::Refused {
            error: resp.error,
            retryable: resp.retryable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_is_stable() {
        let req = Request::Add {
            pod_namespace: "default".into(),
            pod_name: "app-a".into(),
            pod_uid: Some("uid-p1a".into()),
            netns: "/run/netns/p1a".into(),
            container_id: "c0ffee01".into(),
            ips: vec!["10.244.1.2".parse().unwrap()],
        };
        let s = serde_json::to_string(&req).unwrap();
        assert_eq!(
            s,
            r#"{"op":"add","podNamespace":"default","podName":"app-a","podUid":"uid-p1a","netns":"/run/netns/p1a","containerId":"c0ffee01","ips":["10.244.1.2"]}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), req);
    }

    #[test]
    fn absent_agent_is_retryable_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cni.sock");
        let req = Request::Add {
            pod_namespace: "d".into(),
            pod_name: "p".into(),
            pod_uid: None,
            netns: "/x".into(),
            container_id: String::new(),
            ips: vec![],
        };
        let e = call(&sock, &req, Duration::from_secs(1)).unwrap_err();
        assert!(e.retryable());
        assert!(e.to_string().contains("cni.sock"), "{e}");
    }
}
