//! HTTPRoute/GRPCRoute objects → [`CompiledRoute`]s: every field checked, regexes compiled,
//! durations and annotations parsed; errors name the field path.

use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use mesh_rt::config::parse_duration;
use regex::Regex;

use super::*;
use crate::objects::{
    BackendRef, Filter, GrpcRouteSpec, HeaderModifier, HttpRouteSpec, PathModifier, Route,
};

/// A field path and what is wrong with it.
pub type FieldError = (String, String);

fn regex(field: String, v: &str) -> Result<Regex, FieldError> {
    Regex::new(v).map_err(|e| (field, format!("invalid regular expression: {e}")))
}

fn value_match(field: String, kind: &str, v: &str) -> Result<ValueMatch, FieldError> {
    match kind {
        "Exact" => Ok(ValueMatch::Exact(v.to_string())),
        "RegularExpression" => Ok(ValueMatch::Regex(regex(format!("{field}.value"), v)?)),
        k => Err((
            format!("{field}.type"),
            format!("{k:?} is not Exact or RegularExpression"),
        )),
    }
}

fn header_name(field: String, n: &str) -> Result<HeaderName, FieldError> {
    HeaderName::try_from(n).map_err(|_| (field, format!("{n:?} is not a valid header name")))
}

fn edits(field: &str, m: &HeaderModifier) -> Result<HeaderEdits, FieldError> {
    let pair = |f: String, n: &str, v: &str| {
        let name = header_name(format!("{f}.name"), n)?;
        let value = http::HeaderValue::try_from(v).map_err(|_| {
            (
                format!("{f}.value"),
                format!("{v:?} is not a valid header value"),
            )
        })?;
        Ok::<_, FieldError>((name, value))
    };
    let mut e = HeaderEdits::default();
    for (i, h) in m.set.iter().enumerate() {
        e.set
            .push(pair(format!("{field}.set[{i}]"), &h.name, &h.value)?);
    }
    for (i, h) in m.add.iter().enumerate() {
        e.add
            .push(pair(format!("{field}.add[{i}]"), &h.name, &h.value)?);
    }
    for (i, n) in m.remove.iter().enumerate() {
        e.remove
            .push(header_name(format!("{field}.remove[{i}]"), n)?);
    }
    Ok(e)
}

fn path_rewrite(field: &str, p: &PathModifier) -> Result<PathRewrite, FieldError> {
    match p.kind.as_str() {
        "ReplaceFullPath" => Ok(PathRewrite::Full(
            p.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        )),
        "ReplacePrefixMatch" => Ok(PathRewrite::Prefix(
            p.replace_prefix_match.clone().unwrap_or_else(|| "/".into()),
        )),
        k => Err((
            format!("{field}.type"),
            format!("{k:?} is not ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

fn backend_service(
    field: &str,
    b: &BackendRef,
    route_ns: &str,
) -> Result<BackendService, FieldError> {
    let kind_ok = matches!(b.kind.as_deref(), None | Some("Service"))
        && matches!(b.group.as_deref(), None | Some("") | Some("core"));
    if !kind_ok {
        return Err((
            format!("{field}.kind"),
            "only core Service backends are supported".into(),
        ));
    }
    Ok(BackendService {
        namespace: b.namespace.clone().unwrap_or_else(|| route_ns.to_string()),
        name: b.name.clone(),
        port: b.port,
    })
}

struct RuleFilters {
    request_headers: HeaderEdits,
    response_headers: HeaderEdits,
    redirect: Option<RedirectSpec>,
    rewrite: Option<RewriteSpec>,
    mirrors: Vec<MirrorSpec>,
}

fn filters(field: &str, fs: &[Filter], route_ns: &str) -> Result<RuleFilters, FieldError> {
    let mut out = RuleFilters {
        request_headers: HeaderEdits::default(),
        response_headers: HeaderEdits::default(),
        redirect: None,
        rewrite: None,
        mirrors: Vec::new(),
    };
    for (i, f) in fs.iter().enumerate() {
        let ff = format!("{field}[{i}]");
        let missing = |what: &str| {
            (
                format!("{ff}.{what}"),
                format!("required for type {}", f.kind),
            )
        };
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                let m = f
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                out.request_headers = edits(&format!("{ff}.requestHeaderModifier"), m)?;
            }
            "ResponseHeaderModifier" => {
                let m = f
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                out.response_headers = edits(&format!("{ff}.responseHeaderModifier"), m)?;
            }
            "RequestRedirect" => {
                let r = f
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| missing("requestRedirect"))?;
                let status = r.status_code.unwrap_or(302);
                if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                    return Err((
                        format!("{ff}.requestRedirect.statusCode"),
                        format!("{status} is not 301, 302, 303, 307 or 308"),
                    ));
                }
                out.redirect = Some(RedirectSpec {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    port: r.port,
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_rewrite(&format!("{ff}.requestRedirect.path"), p))
                        .transpose()?,
                    status: StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND),
                });
            }
            "URLRewrite" => {
                let r = f
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| missing("urlRewrite"))?;
                out.rewrite = Some(RewriteSpec {
                    hostname: r.hostname.clone(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_rewrite(&format!("{ff}.urlRewrite.path"), p))
                        .transpose()?,
                });
            }
            "RequestMirror" => {
                let m = f
                    .request_mirror
                    .as_ref()
                    .ok_or_else(|| missing("requestMirror"))?;
                let ppm = match (&m.percent, &m.fraction) {
                    (Some(p), _) => p.min(&100) * 10_000,
                    (None, Some(fr)) if fr.denominator > 0 => {
                        ((u64::from(fr.numerator.min(fr.denominator)) * 1_000_000)
                            / u64::from(fr.denominator)) as u32
                    }
                    (None, Some(_)) => {
                        return Err((
                            format!("{ff}.requestMirror.fraction.denominator"),
                            "must be positive".into(),
                        ));
                    }
                    (None, None) => 1_000_000,
                };
                out.mirrors.push(MirrorSpec {
                    service: backend_service(
                        &format!("{ff}.requestMirror.backendRef"),
                        &m.backend_ref,
                        route_ns,
                    )?,
                    fraction_ppm: ppm,
                });
            }
            k => {
                return Err((
                    format!("{ff}.type"),
                    format!("filter type {k:?} is not supported by the waypoint"),
                ));
            }
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err((
            field.to_string(),
            "RequestRedirect and URLRewrite cannot be used together".into(),
        ));
    }
    Ok(out)
}

fn duration(field: String, v: &Option<String>) -> Result<Option<Duration>, FieldError> {
    match v {
        None => Ok(None),
        Some(s) => {
            let d = parse_duration(s).map_err(|e| (field, e))?;
            // Gateway API: a zero timeout disables it.
            Ok((d > Duration::ZERO).then_some(d))
        }
    }
}

fn backends(field: &str, refs: &[BackendRef], route_ns: &str) -> Result<Vec<Backend>, FieldError> {
    let mut out = Vec::new();
    for (i, b) in refs.iter().enumerate() {
        let bf = format!("{field}[{i}]");
        let f = filters(&format!("{bf}.filters"), &b.filters, route_ns)?;
        out.push(Backend {
            service: backend_service(&bf, b, route_ns)?,
            weight: b.weight.unwrap_or(1),
            request_headers: f.request_headers,
        });
    }
    Ok(out)
}

fn extensions(
    ann: &std::collections::BTreeMap<String, String>,
) -> Result<(Option<RateLimitSpec>, FaultSpec), FieldError> {
    let field = |k: &str| format!("metadata.annotations[{k}]");
    let pct = |k: &str| -> Result<u32, FieldError> {
        match ann.get(k) {
            None => Ok(100),
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| (field(k), format!("{v:?} is not a percentage 0..100"))),
        }
    };
    let rate = match ann.get(ANN_RATE_REQUESTS) {
        None => None,
        Some(v) => {
            let tokens = v.parse::<u32>().ok().filter(|t| *t > 0).ok_or_else(|| {
                (
                    field(ANN_RATE_REQUESTS),
                    format!("{v:?} is not a positive integer"),
                )
            })?;
            let interval = match ann.get(ANN_RATE_INTERVAL) {
                None => Duration::from_secs(1),
                Some(i) => parse_duration(i)
                    .ok()
                    .filter(|d| *d >= Duration::from_millis(1))
                    .ok_or_else(|| {
                        (
                            field(ANN_RATE_INTERVAL),
                            format!("{i:?} is not a duration ≥ 1ms"),
                        )
                    })?,
            };
            let per_source = ann
                .get(ANN_RATE_PER_SOURCE)
                .is_some_and(|v| mesh_policy::model::parse_go_bool(v) == Some(true));
            Some(RateLimitSpec {
                tokens,
                interval,
                per_source,
            })
        }
    };
    let mut fault = FaultSpec::default();
    if let Some(v) = ann.get(ANN_FAULT_ABORT) {
        let s = v
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .filter(|c| c.as_u16() >= 200)
            .ok_or_else(|| {
                (
                    field(ANN_FAULT_ABORT),
                    format!("{v:?} is not an HTTP status"),
                )
            })?;
        fault.abort = Some((s, pct(ANN_FAULT_ABORT_PCT)?));
    }
    if let Some(v) = ann.get(ANN_FAULT_DELAY) {
        let d = parse_duration(v).map_err(|e| (field(ANN_FAULT_DELAY), e))?;
        fault.delay = Some((d, pct(ANN_FAULT_DELAY_PCT)?));
    }
    Ok((rate, fault))
}

fn retry(field: &str, r: &Option<crate::objects::Retry>) -> Result<RetrySpec, FieldError> {
    let Some(r) = r else {
        return Ok(RetrySpec::istio_default());
    };
    for (i, c) in r.codes.iter().enumerate() {
        if !(400..=599).contains(c) {
            return Err((format!("{field}.codes[{i}]"), format!("{c} is not 4xx/5xx")));
        }
    }
    Ok(RetrySpec {
        retries: r.attempts.unwrap_or(2).min(10),
        codes: if r.codes.is_empty() {
            vec![503]
        } else {
            r.codes.clone()
        },
        backoff: duration(format!("{field}.backoff"), &r.backoff)?
            .unwrap_or(Duration::from_millis(25)),
        grpc_statuses: false,
    })
}

/// Compiles an HTTPRoute. Errors name the field.
pub fn compile_http(r: &Route<HttpRouteSpec>) -> Result<CompiledRoute, FieldError> {
    let ns = r.meta.namespace();
    let (rate_limit, fault) = extensions(&r.meta.annotations)?;
    let mut rules = Vec::new();
    for (ri, rule) in r.spec.rules.iter().enumerate() {
        let rf = format!("spec.rules[{ri}]");
        let mut matches = Vec::new();
        for (mi, m) in rule.matches.iter().enumerate() {
            let mf = format!("{rf}.matches[{mi}]");
            let path = match &m.path {
                None => PathMatch::Prefix("/".into()),
                Some(p) => {
                    if !p.value.starts_with('/') && p.kind != "RegularExpression" {
                        return Err((format!("{mf}.path.value"), "must start with /".into()));
                    }
                    match p.kind.as_str() {
                        "Exact" => PathMatch::Exact(p.value.clone()),
                        "PathPrefix" => PathMatch::Prefix(p.value.clone()),
                        "RegularExpression" => PathMatch::Regex(regex(
                            format!("{mf}.path.value"),
                            &format!("^(?:{})$", p.value),
                        )?),
                        k => {
                            return Err((
                                format!("{mf}.path.type"),
                                format!("{k:?} is not Exact, PathPrefix or RegularExpression"),
                            ));
                        }
                    }
                }
            };
            let method = m
                .method
                .as_deref()
                .map(|s| {
                    Method::from_bytes(s.as_bytes())
                        .map_err(|_| (format!("{mf}.method"), format!("{s:?} is not a method")))
                })
                .transpose()?;
            let mut headers = Vec::new();
            for (hi, h) in m.headers.iter().enumerate() {
                let hf = format!("{mf}.headers[{hi}]");
                headers.push((
                    header_name(format!("{hf}.name"), &h.name)?,
                    value_match(hf, &h.kind, &h.value)?,
                ));
            }
            let mut query = Vec::new();
            for (qi, q) in m.query_params.iter().enumerate() {
                let qf = format!("{mf}.queryParams[{qi}]");
                query.push((q.name.clone(), value_match(qf, &q.kind, &q.value)?));
            }
            matches.push(Match {
                path,
                method,
                headers,
                query,
            });
        }
        if matches.is_empty() {
            matches.push(Match {
                path: PathMatch::Prefix("/".into()),
                method: None,
                headers: Vec::new(),
                query: Vec::new(),
            });
        }
        let f = filters(&format!("{rf}.filters"), &rule.filters, ns)?;
        if let Some(PathRewrite::Prefix(_)) = f
            .rewrite
            .as_ref()
            .and_then(|r| r.path.clone())
            .or_else(|| f.redirect.as_ref().and_then(|r| r.path.clone()))
            && matches
                .iter()
                .any(|m| !matches!(m.path, PathMatch::Prefix(_)))
        {
            return Err((
                format!("{rf}.filters"),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
            ));
        }
        let timeouts = rule.timeouts.clone().unwrap_or_default();
        let request_timeout = duration(format!("{rf}.timeouts.request"), &timeouts.request)?;
        let backend_timeout = duration(
            format!("{rf}.timeouts.backendRequest"),
            &timeouts.backend_request,
        )?;
        if let (Some(req), Some(b)) = (request_timeout, backend_timeout)
            && b > req
        {
            return Err((
                format!("{rf}.timeouts.backendRequest"),
                "must not be longer than timeouts.request".into(),
            ));
        }
        rules.push(Rule {
            index: ri,
            matches,
            request_headers: f.request_headers,
            response_headers: f.response_headers,
            redirect: f.redirect,
            rewrite: f.rewrite,
            mirrors: f.mirrors,
            backends: backends(&format!("{rf}.backendRefs"), &rule.backend_refs, ns)?,
            request_timeout,
            backend_timeout,
            retry: retry(&format!("{rf}.retry"), &rule.retry)?,
        });
    }
    Ok(CompiledRoute {
        kind: RouteKind::Http,
        namespace: ns.to_string(),
        name: r.meta.name.clone(),
        created: r.meta.creation_timestamp.clone(),
        parents: r.spec.parent_refs.clone(),
        rules,
        rate_limit,
        fault,
    })
}

/// Compiles a GRPCRoute into HTTP matches on `/<service>/<method>`.
pub fn compile_grpc(r: &Route<GrpcRouteSpec>) -> Result<CompiledRoute, FieldError> {
    let ns = r.meta.namespace();
    let (rate_limit, fault) = extensions(&r.meta.annotations)?;
    let mut rules = Vec::new();
    for (ri, rule) in r.spec.rules.iter().enumerate() {
        let rf = format!("spec.rules[{ri}]");
        let mut matches = Vec::new();
        for (mi, m) in rule.matches.iter().enumerate() {
            let mf = format!("{rf}.matches[{mi}]");
            let path = match &m.method {
                None => PathMatch::Prefix("/".into()),
                Some(gm) => {
                    let svc = gm.service.as_deref().unwrap_or_default();
                    let meth = gm.method.as_deref().unwrap_or_default();
                    match gm.kind.as_str() {
                        "Exact" => match (svc.is_empty(), meth.is_empty()) {
                            (true, true) => {
                                return Err((
                                    format!("{mf}.method"),
                                    "one of service or method must be set".into(),
                                ));
                            }
                            (false, false) => PathMatch::Exact(format!("/{svc}/{meth}")),
                            (false, true) => PathMatch::Prefix(format!("/{svc}")),
                            (true, false) => PathMatch::Regex(regex(
                                format!("{mf}.method.method"),
                                &format!("^/[^/]+/{}$", regex::escape(meth)),
                            )?),
                        },
                        "RegularExpression" => {
                            let s = if svc.is_empty() { "[^/]+" } else { svc };
                            let m = if meth.is_empty() { "[^/]+" } else { meth };
                            PathMatch::Regex(regex(format!("{mf}.method"), &format!("^/{s}/{m}$"))?)
                        }
                        k => {
                            return Err((
                                format!("{mf}.method.type"),
                                format!("{k:?} is not Exact or RegularExpression"),
                            ));
                        }
                    }
                }
            };
            let mut headers = Vec::new();
            for (hi, h) in m.headers.iter().enumerate() {
                let hf = format!("{mf}.headers[{hi}]");
                headers.push((
                    header_name(format!("{hf}.name"), &h.name)?,
                    value_match(hf, &h.kind, &h.value)?,
                ));
            }
            matches.push(Match {
                path,
                method: None,
                headers,
                query: Vec::new(),
            });
        }
        if matches.is_empty() {
            matches.push(Match {
                path: PathMatch::Prefix("/".into()),
                method: None,
                headers: Vec::new(),
                query: Vec::new(),
            });
        }
        let f = filters(&format!("{rf}.filters"), &rule.filters, ns)?;
        if f.redirect.is_some() || f.rewrite.is_some() {
            return Err((
                format!("{rf}.filters"),
                "GRPCRoute supports header modifiers and mirrors only".into(),
            ));
        }
        rules.push(Rule {
            index: ri,
            matches,
            request_headers: f.request_headers,
            response_headers: f.response_headers,
            redirect: None,
            rewrite: None,
            mirrors: f.mirrors,
            backends: backends(&format!("{rf}.backendRefs"), &rule.backend_refs, ns)?,
            request_timeout: None,
            backend_timeout: None,
            retry: RetrySpec::istio_default(),
        });
    }
    Ok(CompiledRoute {
        kind: RouteKind::Grpc,
        namespace: ns.to_string(),
        name: r.meta.name.clone(),
        created: r.meta.creation_timestamp.clone(),
        parents: r.spec.parent_refs.clone(),
        rules,
        rate_limit,
        fault,
    })
}

pub fn validate_http(r: &Route<HttpRouteSpec>) -> Result<(), FieldError> {
    compile_http(r).map(|_| ())
}

pub fn validate_grpc(r: &Route<GrpcRouteSpec>) -> Result<(), FieldError> {
    compile_grpc(r).map(|_| ())
}
