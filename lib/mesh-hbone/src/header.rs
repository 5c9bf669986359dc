//! CONNECT request heads: building them (client) and validating them (server).
//!
//! `:authority` is the destination `IP:port` (IPv6 in brackets), with no scheme or path. The
//! server accepts nothing else: a hostname, a missing port or port 0 is a 400.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header::HeaderName};

/// W3C trace context, propagated per tunnel.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C baggage: Istio puts the source workload's metadata here.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// RFC 7239: the original client address when a proxy (a waypoint) sits in between.
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Why a CONNECT request was rejected; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("CONNECT has no :authority")]
    MissingAuthority,
    #[error("CONNECT authority {0:?} is not an IP:port")]
    BadAuthority(String),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::MissingAuthority | RequestError::BadAuthority(_) => {
                StatusCode::BAD_REQUEST
            }
        }
    }
}

/// Parses a CONNECT authority: `1.2.3.4:80` or `[fd00::1]:80`, port non-zero.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, RequestError> {
    match authority.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => Err(RequestError::BadAuthority(authority.to_owned())),
    }
}

/// Validates a received request head and returns the destination it asks for.
pub fn validate<B>(req: &Request<B>) -> Result<SocketAddr, RequestError> {
    if req.method() != Method::CONNECT {
        return Err(RequestError::Method(req.method().to_string()));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or(RequestError::MissingAuthority)?;
    parse_authority(authority.as_str())
}

/// What a client puts in a CONNECT request beyond the authority.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders {
    pub traceparent: Option<HeaderValue>,
    pub baggage: Option<HeaderValue>,
    /// Original source IP, sent when the tunnel goes to a waypoint.
    pub forwarded_for: Option<std::net::IpAddr>,
}

impl ConnectHeaders {
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(v) = &self.traceparent {
            headers.insert(TRACEPARENT, v.clone());
        }
        if let Some(v) = &self.baggage {
            headers.insert(BAGGAGE, v.clone());
        }
        if let Some(ip) = self.forwarded_for {
            let v = match ip {
                std::net::IpAddr::V4(v4) => format!("for={v4}"),
                std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
            };
            if let Ok(v) = HeaderValue::try_from(v) {
                headers.insert(FORWARDED, v);
            }
        }
    }
}

/// Builds the CONNECT request head for `dst`.
pub fn connect_request(
    dst: SocketAddr,
    extra: &ConnectHeaders,
) -> Result<Request<()>, http::Error> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(dst.to_string())
        .version(http::Version::HTTP_2)
        .body(())?;
    extra.apply(req.headers_mut());
    Ok(req)
}

/// A fresh W3C `traceparent` (version 00, random ids, sampled flag off).
pub fn new_traceparent() -> HeaderValue {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    let s = format!("00-{trace:032x}-{span:016x}-00");
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("10.0.0.1:80" => Ok("10.0.0.1:80".parse().unwrap()) ; "v4")]
    #[test_case("[fd00::1]:8080" => Ok("[fd00::1]:8080".parse().unwrap()) ; "v6")]
    #[test_case("fd00::1:8080" => matches Err(_) ; "v6 without brackets")]
    #[test_case("example.com:80" => matches Err(_) ; "hostname")]
    #[test_case("10.0.0.1" => matches Err(_) ; "no port")]
    #[test_case("10.0.0.1:0" => matches Err(_) ; "port zero")]
    #[test_case("10.0.0.1:99999" => matches Err(_) ; "port overflow")]
    #[test_case("" => matches Err(_) ; "empty")]
    fn authority(s: &str) -> Result<SocketAddr, RequestError> {
        parse_authority(s)
    }

    #[test]
    fn request_head_round_trips_through_validation() {
        let dst: SocketAddr = "[fd00::7]:9090".parse().unwrap();
        let headers = ConnectHeaders {
            forwarded_for: Some("fd00::1".parse().unwrap()),
            traceparent: Some(new_traceparent()),
            ..Default::default()
        };
        let req = connect_request(dst, &headers).unwrap();
        assert_eq!(req.uri().to_string(), "[fd00::7]:9090");
        assert_eq!(validate(&req).unwrap(), dst);
        assert_eq!(req.headers()[FORWARDED], "for=\"[fd00::1]\"");
        let tp = req.headers()[TRACEPARENT].to_str().unwrap().to_owned();
        assert_eq!(tp.len(), 55);
        assert!(tp.starts_with("00-"));
    }

    #[test]
    fn non_connect_is_405() {
        let req = Request::builder()
            .method(Method::GET)
            .uri("http://10.0.0.1:80/")
            .body(())
            .unwrap();
        let err = validate(&req).unwrap_err();
        assert_eq!(err.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
