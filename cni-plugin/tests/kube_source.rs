//! The Kubernetes pod source against a scripted API server on loopback (plain HTTP/1.1, no
//! root). Pins: the pod watch is limited to this node (`fieldSelector=spec.nodeName=…`);
//! `start` returns only after both initial lists; the first snapshot converts pods and
//! namespaces and is mirrored to `cluster.yaml` for the plugin; `annotate` merge-patches
//! `pods/status`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use cni_plugin::{
    kube_source::{KubeAnnotator, KubeSource},
    source::{FilesSource, PodAnnotator},
};

const PODS: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[{"metadata":{"name":"echo","namespace":"foo","uid":"u1","labels":{"app":"echo"}},"spec":{"nodeName":"node1","serviceAccountName":"echo","containers":[]},"status":{"phase":"Running","podIPs":[{"ip":"10.244.1.2"}]}}]}"#;
const NAMESPACES: &str = r#"{"kind":"NamespaceList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[{"metadata":{"name":"foo","labels":{"istio.io/dataplane-mode":"ambient"}}}]}"#;
const POD: &str = r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"echo","namespace":"foo","uid":"u1"},"spec":{"containers":[]}}"#;

/// (method, path with query, body) of every request.
type Log = Arc<Mutex<Vec<(String, String, String)>>>;

fn respond(s: &mut TcpStream, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

fn serve(conn: TcpStream, log: Log) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        log.lock().unwrap().push((
            method.clone(),
            path.clone(),
            String::from_utf8_lossy(&body).into_owned(),
        ));
        if path.contains("watch=true") {
            // A watch that stays open and quiet.
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            let _ = w.flush();
            std::thread::sleep(Duration::from_secs(3600));
            return;
        }
        match (method.as_str(), path.split('?').next().unwrap_or("")) {
            ("GET", "/api/v1/pods") => respond(&mut w, PODS),
            ("GET", "/api/v1/namespaces") => respond(&mut w, NAMESPACES),
            ("PATCH", "/api/v1/namespaces/foo/pods/echo/status") => respond(&mut w, POD),
            _ => {
                let _ = write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_this_node_mirrors_for_the_plugin_and_patches_pod_status() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let l2 = log.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let log = l2.clone();
            std::thread::spawn(move || serve(c, log));
        }
    });
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_trigger, drain) = mesh_rt::drain::new();
    let source = KubeSource {
        client: client.clone(),
        node: "node1".into(),
        mirror: Some(dir.path().to_path_buf()),
    };
    let rx = tokio::time::timeout(
        Duration::from_secs(20),
        mesh_rt::source::subscribe(source, drain),
    )
    .await
    .expect("initial lists never completed")
    .unwrap();

    let pod_list = log
        .lock()
        .unwrap()
        .iter()
        .find(|(m, p, _)| m == "GET" && p.starts_with("/api/v1/pods?") && !p.contains("watch=true"))
        .map(|(_, p, _)| p.clone())
        .expect("no pod list request");
    assert!(
        pod_list.contains("fieldSelector=spec.nodeName%3Dnode1"),
        "{pod_list}"
    );

    let state = (**rx.borrow()).clone();
    let pod = state.pod("foo", "echo").unwrap().clone();
    assert_eq!(pod.uid, "u1");
    assert_eq!(pod.service_account, "echo");
    assert_eq!(
        pod.ips,
        vec!["10.244.1.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        state.namespace_labels("foo").unwrap()["istio.io/dataplane-mode"],
        "ambient"
    );
    // The plugin's view (files) equals the agent's.
    assert_eq!(FilesSource::new(dir.path()).load().unwrap(), state);

    let src = Arc::new(KubeAnnotator::new(client));
    let s2 = src.clone();
    let p2 = pod.clone();
    tokio::spawn(async move { s2.annotate(&p2, "ambient.istio.io/redirection", Some("enabled")) })
        .await
        .unwrap()
        .unwrap();
    let patches: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _, _)| m == "PATCH")
        .cloned()
        .collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert!(
        patches[0]
            .1
            .starts_with("/api/v1/namespaces/foo/pods/echo/status"),
        "{patches:?}"
    );
    let body: serde_json::Value = serde_json::from_str(&patches[0].2).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}})
    );
}
