//! The request phases, in order, as plain code: authenticate → authorize → route → upstream
//! → respond → log. Each phase either passes the request on or ends it with a local reply;
//! whatever happens, exactly one access-log line and one set of metrics are recorded
//! (when the response body ends, or is dropped).
//!
//! ```text
//! request ─► authenticate ─► authorize ─► route ─► upstream ─► respond ─► (body) ─► log
//!              401            403          404/429   503/504     header edits
//!                                          30x redirect, fault abort
//! ```

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use mesh_core::{Identity, workload::Service};
use mesh_policy::rbac::{self, Ctx, HttpView, View};
use tokio::time::Instant;
use tracing::debug;

use crate::{
    config::Config,
    metrics::{DestinationLabels, LabelCache, Metrics, Record, RequestLabels, ServiceLabels},
    ratelimit::Limiter,
    route::{self, Backend, BackendService, Entry, RetrySpec, RewriteSpec, RouteKind},
    state::{PortProtocol, Snapshot, Store, Target},
    upstream::{Body, BoxError, Endpoint, Lb, Upstream},
};

mod body;
mod headers;
mod mirror;
mod protocol;

use body::{CountIn, Finish, ReqBody};
use headers::authority;
pub use headers::{HeadFacts, child_traceparent, head_facts, strip_hop_by_hop};
use protocol::DownTrailers;

/// Shared by every request.
pub struct Proxy {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub limiter: Limiter,
    /// One JWKS cache for the process, so fetched keys survive configuration changes.
    pub jwks: mesh_jwt::JwksStore,
    /// Span export; `None` when TRACING_OTLP_ENDPOINT is unset.
    pub tracing: Option<crate::trace::Tracing>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

/// The HBONE stream a request arrived on.
#[derive(Debug)]
pub struct Downstream {
    pub peer: Option<Identity>,
    pub src: std::net::SocketAddr,
    /// The CONNECT authority (service VIP:port or workload IP:port).
    pub dst: std::net::SocketAddr,
    /// Metric labels and series reused by this connection's requests.
    pub labels: LabelCache,
}

/// A local reply or an upstream response, with what the log should say about it.
struct Outcome {
    resp: Response<Body>,
    flag: &'static str,
    reason: Option<String>,
    /// Set for replies the waypoint made itself (their text body), so a gRPC caller can get
    /// them as a gRPC status instead ([`grpc_local_reply`]).
    local: Option<&'static str>,
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

pub(crate) fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|e| -> BoxError { match e {} })
        .boxed_unsync()
}

fn local(status: StatusCode, body: &'static str, flag: &'static str, reason: String) -> Outcome {
    Outcome {
        resp: text(status, body),
        flag,
        reason: Some(reason),
        local: Some(body),
    }
}

fn labels(snap: &Snapshot, down: &Downstream, target: Option<&Target>) -> RequestLabels {
    let src = snap.mesh.workload_by_ip("", down.src.ip());
    RequestLabels {
        reporter: "waypoint",
        src: down.labels.source(src, down.peer.as_ref()),
        svc: match target {
            Some(Target::Service { service, .. }) => down.labels.service(service),
            _ => ServiceLabels::unknown(),
        },
        dst: DestinationLabels::unknown(),
        request_protocol: "http",
        response_code: 0,
        grpc_response_status: String::new(),
        response_flags: "-",
        connection_security_policy: "mutual_tls",
    }
}

impl Proxy {
    /// Serves one request through every phase.
    pub async fn handle(
        self: Arc<Self>,
        down: Arc<Downstream>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let started = Instant::now();
        let snap = self.store.get();
        let target = snap.target(down.dst);
        let (trace, span) =
            crate::trace::begin(self.tracing.as_ref(), &req, target.as_ref(), down.dst);
        let mut rec = Record {
            labels: labels(&snap, &down, target.as_ref()),
            src_addr: down.src,
            dst_addr: down.dst,
            upstream: None,
            authority: authority(&req),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            route: None,
            policy: None,
            reason: None,
            attempts: 0,
            duration_ms: 0.0,
            request_bytes: 0,
            response_bytes: 0,
            upstream_protocol: "-",
            traceparent: String::new(),
            trace,
            span,
        };
        let grpc = crate::grpc::is_grpc(req.headers());
        rec.labels.request_protocol = if grpc {
            "grpc"
        } else if req.version() == http::Version::HTTP_2 {
            "http2"
        } else {
            "http"
        };
        let bytes_in = Arc::new(AtomicU64::new(0));
        let out = match target {
            None => local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no such destination\n",
                "NR",
                format!(
                    "authority {} is neither a service VIP nor a workload",
                    down.dst
                ),
            ),
            Some(t) => {
                self.phases(&snap, &down, &t, req, &mut rec, &bytes_in)
                    .await
            }
        };
        let Outcome {
            mut resp,
            flag,
            reason,
            local,
        } = out;
        if grpc && let Some(message) = local {
            crate::grpc::local_reply(&mut resp, message);
        }
        rec.labels.response_code = resp.status().as_u16();
        rec.labels.response_flags = flag;
        rec.reason = reason;
        if let Some(s) = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            rec.labels.grpc_response_status = s.to_string();
        }
        let body = std::mem::replace(resp.body_mut(), full(Bytes::new()));
        let fin = Finish {
            inner: body,
            record: Some(rec),
            started,
            bytes_in,
            metrics: self.metrics.clone(),
            down,
        };
        *resp.body_mut() = fin.boxed_unsync();
        resp
    }

    async fn phases(
        &self,
        snap: &Snapshot,
        down: &Downstream,
        target: &Target,
        mut req: Request<Incoming>,
        rec: &mut Record,
        bytes_in: &Arc<AtomicU64>,
    ) -> Outcome {
        let Some(wp) = snap.waypoint.as_ref() else {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "waypoint not configured\n",
                "NR",
                "no waypoint identity".into(),
            );
        };
        let (service, port) = match target {
            Target::Service { service, port } => (Some(service.clone()), *port),
            Target::Workload { addr, .. } => (None, addr.port()),
        };
        let scoped = snap.scoped(service.as_deref());

        // ── authenticate ─────────────────────────────────────────────────────────────
        let ras = snap.request_authentications(&scoped);
        let jwt = if ras.is_empty() {
            None
        } else {
            let authn = match snap.authenticator(&scoped, &self.jwks) {
                Ok(a) => a,
                Err(e) => {
                    return local(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "RequestAuthentication misconfigured\n",
                        "UAEX",
                        e,
                    );
                }
            };
            match authn.authenticate_request(&mut req).await {
                Ok(j) => j,
                Err(e) => {
                    let (status, body) = (e.status(), e.body());
                    let mut resp = text(status, body);
                    if let Ok(v) = HeaderValue::try_from(e.www_authenticate()) {
                        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                    rec.policy = Some(ras.iter().map(|r| r.key()).collect::<Vec<_>>().join(","));
                    return Outcome {
                        resp,
                        flag: "UAEX",
                        reason: Some(format!("JWT rejected: {body}")),
                        local: Some(body),
                    };
                }
            }
        };

        // ── authorize ────────────────────────────────────────────────────────────────
        let raw_path = req.uri().path();
        let path = match mesh_policy::path::normalize(raw_path, snap.mesh_config.path_normalization)
        {
            Ok(p) => p,
            Err(e) => {
                return local(
                    StatusCode::BAD_REQUEST,
                    "Bad Request\n",
                    "DPE",
                    format!("path {raw_path:?}: {e}"),
                );
            }
        };
        let policies = snap.authorization_policies(&scoped);
        // No policy applies: allowed, and nothing to build a view for (evaluating an empty
        // set decides exactly this, after copying every header into the view).
        if !policies.is_empty() {
            let mut hv = std::collections::BTreeMap::new();
            for (k, v) in req.headers() {
                if let Ok(v) = v.to_str() {
                    hv.entry(k.as_str().to_string())
                        .and_modify(|e: &mut String| {
                            e.push(',');
                            e.push_str(v);
                        })
                        .or_insert_with(|| v.to_string());
                }
            }
            let view = View {
                peer: down.peer.clone(),
                src_ip: down.src.ip(),
                dst_ip: down.dst.ip(),
                dst_port: port,
                http: Some(HttpView {
                    method: req.method().to_string(),
                    path,
                    host: rec.authority.clone(),
                    headers: hv,
                    jwt,
                }),
            };
            let ctx = Ctx {
                trust_domains: snap.mesh_config.trust_domain_bundle(),
            };
            let decision = rbac::evaluate(&policies, &view, &ctx);
            rec.policy = decision.policy.clone();
            if !decision.allowed {
                rec.policy = decision.policy.clone().or_else(|| {
                    Some(
                        policies
                            .iter()
                            .map(|p| p.key())
                            .collect::<Vec<_>>()
                            .join(","),
                    )
                });
                return local(
                    StatusCode::FORBIDDEN,
                    "RBAC: access denied",
                    "RBAC",
                    decision.reason,
                );
            }
        }

        // ── route ────────────────────────────────────────────────────────────────────
        let Some(svc) = service else {
            // Workload-addressed: no routes; straight to the workload.
            let Target::Workload { workload, addr } = target else {
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no route\n",
                    "NR",
                    "unreachable".into(),
                );
            };
            let ep = Endpoint {
                workload: workload.clone(),
                addr: *addr,
            };
            return self
                .forward_direct(snap, down, wp, ep, req, rec, bytes_in)
                .await;
        };
        let table = snap.route_table(&svc, port);
        let entry: Option<Entry> = match &table {
            None => None,
            Some(t) => {
                let head = route::RequestHead {
                    method: req.method(),
                    path: req.uri().path(),
                    query: req.uri().query(),
                    headers: req.headers(),
                };
                match route::select(t, &head) {
                    Some(e) => Some(e.clone()),
                    None => {
                        return local(
                            StatusCode::NOT_FOUND,
                            "route not found\n",
                            "NR",
                            format!("no rule of the routes attached to {} matches", svc.hostname),
                        );
                    }
                }
            }
        };
        if let Some(e) = &entry {
            rec.route = Some(format!("{}#{}", e.route.key(), e.rule));
            if let Some(rl) = &e.route.rate_limit {
                let src = down
                    .peer
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                if !self.limiter.allow(&e.route.key(), &src, rl) {
                    return local(
                        StatusCode::TOO_MANY_REQUESTS,
                        "local_rate_limited",
                        "RL",
                        format!("local rate limit of route {}", e.route.key()),
                    );
                }
            }
            let fault = &e.route.fault;
            if let Some((d, pct)) = fault.delay
                && rand::random_range(0..100) < pct
            {
                tokio::time::sleep(d).await;
            }
            if let Some((status, pct)) = fault.abort
                && rand::random_range(0..100) < pct
            {
                return Outcome {
                    resp: text(status, "fault filter abort"),
                    flag: "FI",
                    reason: Some("fault injection".into()),
                    local: Some("fault filter abort"),
                };
            }
            if let Some(rd) = &e.rule().redirect {
                return redirect(&req, rd, e, &rec.authority);
            }
        }
        let default_rule;
        let rule = match &entry {
            Some(e) => e.rule(),
            None => {
                default_rule = default_rule_for(&svc);
                &default_rule
            }
        };
        let backend: Backend = match route::pick_backend(&rule.backends, rand::random::<u64>()) {
            Some(b) => b.clone(),
            // GAMMA: a rule without backendRefs forwards to the parent Service.
            None if rule.backends.is_empty() => default_rule_for(&svc).backends[0].clone(),
            None => {
                return local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no healthy upstream\n",
                    "NR",
                    "every backendRef has weight 0, or the rule has none".into(),
                );
            }
        };
        let Some(bsvc) = snap
            .service(&backend.service.namespace, &backend.service.name)
            .cloned()
        else {
            return local(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backend not found\n",
                "NR",
                format!(
                    "backendRef {}/{} is not a known Service",
                    backend.service.namespace, backend.service.name
                ),
            );
        };
        let bport = backend.service.port.unwrap_or(port);

        // Build the upstream request head.
        let upgrade =
            req.version() != http::Version::HTTP_2 && req.headers().contains_key(header::UPGRADE);
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let h2 = protocol::upstream_h2(snap, &bsvc, bport, upgrade);
        let down_trailers = DownTrailers::of(req.version(), req.headers());
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        rule.request_headers.apply(&mut parts.headers);
        backend.request_headers.apply(&mut parts.headers);
        let mut host = rec.authority.clone();
        let mut new_path = parts.uri.path().to_string();
        if let (Some(RewriteSpec { hostname, path: pr }), Some(e)) = (&rule.rewrite, &entry) {
            if let Some(h) = hostname {
                host = h.clone();
            }
            if let Some(p) = pr {
                new_path = route::rewrite_path(&new_path, p, e.matched());
            }
        }
        let pq = match parts.uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        crate::trace::set_cluster(rec, &bsvc.hostname, bport);
        let tp = rec.trace.traceparent();
        rec.traceparent = tp.to_str().unwrap_or_default().to_string();
        parts.headers.insert("traceparent", tp);
        let uri: Uri = match protocol::set_target(&mut parts, h2, &host, &pq) {
            Ok(u) => u,
            Err(_) => {
                return local(
                    StatusCode::BAD_REQUEST,
                    "Bad Request\n",
                    "DPE",
                    "request target cannot be rebuilt".into(),
                );
            }
        };

        // Buffer small bodies so retries and mirrors can replay them.
        let counted = CountIn {
            inner: body,
            n: bytes_in.clone(),
        };
        let limit = self.cfg.retry_buffer_bytes as u64;
        let small =
            counted.is_end_stream() || counted.size_hint().upper().is_some_and(|u| u <= limit);
        let mut body = if small && !upgrade {
            match Limited::new(counted, limit as usize).collect().await {
                Ok(c) => ReqBody::Buffered(c.to_bytes()),
                Err(e) => {
                    return local(
                        StatusCode::BAD_REQUEST,
                        "Bad Request\n",
                        "DPE",
                        format!("reading request body: {e}"),
                    );
                }
            }
        } else {
            ReqBody::Streaming(Some(counted.boxed_unsync()))
        };

        // ── upstream ─────────────────────────────────────────────────────────────────
        for m in &rule.mirrors {
            if let ReqBody::Buffered(b) = &body
                && rand::random_range(0..1_000_000) < m.fraction_ppm
            {
                self.mirror(
                    snap,
                    wp.identity.clone(),
                    &m.service,
                    port,
                    &parts,
                    &pq,
                    &host,
                    b.clone(),
                );
            }
        }
        let lb = lb_for(snap, &bsvc);
        let max = snap
            .destination_rule(&bsvc)
            .and_then(|d| d.traffic_policy.as_ref())
            .and_then(|t| t.connection_pool.as_ref())
            .and_then(|c| c.http.as_ref())
            .and_then(|h| h.http2_max_requests);
        let outlier = outlier_for(snap, &bsvc);
        let attempts = async {
            let mut tried: Vec<String> = Vec::new();
            let mut last: Option<Outcome> = None;
            let retry: &RetrySpec = &rule.retry;
            for attempt in 0..=retry.retries {
                if attempt > 0 {
                    if !body.replayable() {
                        break;
                    }
                    let cap = retry.backoff.as_millis() as u64 * (1u64 << (attempt - 1).min(6));
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=cap.max(1))))
                        .await;
                }
                rec.attempts = attempt + 1;
                let ep = match self.upstream.pick(snap, &bsvc, bport, lb, &tried) {
                    Ok(ep) => ep,
                    Err(e) => {
                        return local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no healthy upstream",
                            e.flag(),
                            e.to_string(),
                        );
                    }
                };
                tried.push(ep.workload.uid.clone());
                rec.labels.dst = down.labels.destination(&ep.workload);
                rec.upstream = Some(ep.addr.to_string());
                rec.upstream_protocol = protocol::name(h2);
                let _in_flight = match self.upstream.begin(&ep, max) {
                    Ok(g) => g,
                    Err(e) => {
                        return local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                            e.flag(),
                            e.to_string(),
                        );
                    }
                };
                let Some(b) = body.take() else { break };
                let mut r = Request::from_parts(parts.clone(), b);
                *r.uri_mut() = uri.clone();
                let sent = self.upstream.send(&ep, &wp.identity, r, h2, upgrade);
                let res = match rule.backend_timeout {
                    Some(t) => match tokio::time::timeout(t, sent).await {
                        Ok(r) => r,
                        Err(_) => {
                            return local(
                                StatusCode::GATEWAY_TIMEOUT,
                                "upstream request timeout",
                                "UT",
                                format!("backendRequest timeout {t:?}"),
                            );
                        }
                    },
                    None => sent.await,
                };
                match res {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let grpc = resp
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        self.upstream.report(&ep, status >= 500, outlier);
                        let retry_it = retry.codes.contains(&status)
                            || (retry.grpc_statuses && (grpc == "14" || grpc == "1"));
                        let out = Outcome {
                            resp: resp
                                .map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
                            flag: "-",
                            reason: None,
                            local: None,
                        };
                        if retry_it && attempt < retry.retries && body.replayable() {
                            debug!(status, attempt, "retrying");
                            last = Some(out);
                            continue;
                        }
                        return out;
                    }
                    Err(e) => {
                        self.upstream.report(&ep, true, outlier);
                        let retriable = e.retriable();
                        let out = local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error or disconnect/reset before headers",
                            e.flag(),
                            e.to_string(),
                        );
                        if retriable && attempt < retry.retries {
                            last = Some(out);
                            continue;
                        }
                        return out;
                    }
                }
            }
            last.unwrap_or_else(|| {
                local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                    "UH",
                    "no attempt was possible".into(),
                )
            })
        };
        let out = match rule.request_timeout {
            Some(t) => match tokio::time::timeout(t, attempts).await {
                Ok(o) => o,
                Err(_) => local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    "UT",
                    format!("request timeout {t:?}"),
                ),
            },
            None => attempts.await,
        };

        // ── respond ──────────────────────────────────────────────────────────────────
        let mut out = out;
        if out.resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(down_up) = on_upgrade {
                let up = hyper::upgrade::on(&mut out.resp);
                tokio::spawn(async move {
                    match (down_up.await, up.await) {
                        (Ok(d), Ok(u)) => {
                            let mut d = hyper_util::rt::TokioIo::new(d);
                            let mut u = hyper_util::rt::TokioIo::new(u);
                            let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                        }
                        (d, u) => debug!(down = d.is_ok(), up = u.is_ok(), "upgrade failed"),
                    }
                });
            }
        } else {
            let declared = out.resp.headers().get(header::TRAILER).cloned();
            strip_hop_by_hop(out.resp.headers_mut(), false);
            down_trailers.declare(declared, out.resp.headers_mut());
        }
        rule.response_headers.apply(out.resp.headers_mut());
        out
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward_direct(
        &self,
        snap: &Snapshot,
        down: &Downstream,
        wp: &crate::state::WaypointId,
        ep: Endpoint,
        req: Request<Incoming>,
        rec: &mut Record,
        bytes_in: &Arc<AtomicU64>,
    ) -> Outcome {
        let h2 = snap.workload_protocol(&ep.workload, ep.addr.port()) == PortProtocol::Http2;
        let down_trailers = DownTrailers::of(req.version(), req.headers());
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        match protocol::set_target(&mut parts, h2, &rec.authority, &pq) {
            Ok(u) => parts.uri = u,
            Err(_) => {
                return local(
                    StatusCode::BAD_REQUEST,
                    "Bad Request\n",
                    "DPE",
                    "request target cannot be rebuilt".into(),
                );
            }
        }
        let tp = rec.trace.traceparent();
        rec.traceparent = tp.to_str().unwrap_or_default().to_string();
        parts.headers.insert("traceparent", tp);
        rec.labels.dst = down.labels.destination(&ep.workload);
        rec.upstream = Some(ep.addr.to_string());
        rec.upstream_protocol = protocol::name(h2);
        rec.attempts = 1;
        let body = CountIn {
            inner: body,
            n: bytes_in.clone(),
        }
        .boxed_unsync();
        let r = Request::from_parts(parts, body);
        match self.upstream.send(&ep, &wp.identity, r, h2, false).await {
            Ok(resp) => {
                let mut resp =
                    resp.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync());
                let declared = resp.headers().get(header::TRAILER).cloned();
                strip_hop_by_hop(resp.headers_mut(), false);
                down_trailers.declare(declared, resp.headers_mut());
                Outcome {
                    resp,
                    flag: "-",
                    reason: None,
                    local: None,
                }
            }
            Err(e) => local(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers",
                e.flag(),
                e.to_string(),
            ),
        }
    }
}

fn outlier_for(snap: &Snapshot, svc: &Service) -> Option<crate::upstream::OutlierPolicy> {
    let od = snap
        .destination_rule(svc)?
        .traffic_policy
        .as_ref()?
        .outlier_detection
        .as_ref()?;
    Some(crate::upstream::OutlierPolicy {
        // Istio's default when outlierDetection is set without it.
        consecutive_5xx: od.consecutive5xx_errors.unwrap_or(5),
        base_ejection: od
            .base_ejection_time
            .as_deref()
            .and_then(|d| mesh_rt::config::parse_duration(d).ok())
            .unwrap_or(Duration::from_secs(30)),
    })
}

fn lb_for(snap: &Snapshot, svc: &Service) -> Lb {
    match snap
        .destination_rule(svc)
        .and_then(|d| d.traffic_policy.as_ref())
        .and_then(|t| t.load_balancer.as_ref())
        .and_then(|l| l.simple.as_deref())
    {
        Some("LEAST_REQUEST") | Some("LEAST_CONN") => Lb::LeastRequest,
        Some("RANDOM") => Lb::Random,
        _ => Lb::RoundRobin,
    }
}

/// No route attached: the Service itself, Istio's default retry policy, no timeout.
fn default_rule_for(svc: &Service) -> route::Rule {
    route::Rule {
        index: 0,
        matches: Vec::new(),
        request_headers: Default::default(),
        response_headers: Default::default(),
        redirect: None,
        rewrite: None,
        mirrors: Vec::new(),
        backends: vec![Backend {
            service: BackendService {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                port: None,
            },
            weight: 1,
            request_headers: Default::default(),
        }],
        request_timeout: None,
        backend_timeout: None,
        retry: RetrySpec::istio_default(),
    }
}

fn redirect(
    req: &Request<Incoming>,
    rd: &route::RedirectSpec,
    e: &Entry,
    authority: &str,
) -> Outcome {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
            (h.to_string(), p.parse::<u16>().ok())
        }
        _ => (authority.to_string(), None),
    };
    let scheme = rd.scheme.clone().unwrap_or_else(|| "http".into());
    let host = rd.hostname.clone().unwrap_or(host);
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = rd.port.or(if rd.scheme.is_some() { None } else { port });
    let path = match &rd.path {
        Some(p) => route::rewrite_path(req.uri().path(), p, e.matched()),
        None => req.uri().path().to_string(),
    };
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port.filter(|p| *p != default_port) {
        loc.push_str(&format!(":{p}"));
    }
    loc.push_str(&path);
    if let Some(q) = req.uri().query() {
        loc.push('?');
        loc.push_str(q);
    }
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = rd.status;
    if let Ok(v) = HeaderValue::try_from(loc) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    let _ = (e.route.kind == RouteKind::Http, Method::GET);
    Outcome {
        resp,
        flag: "-",
        reason: Some("RequestRedirect".into()),
        local: None,
    }
}
