//! Where a rule looks for tokens, and taking them out of a request, as Envoy's jwt_authn
//! `ExtractorImpl` does for one provider:
//!
//! - locations: `fromHeaders` (name + value prefix), `fromParams`, `fromCookies`; a rule with
//!   none of them uses `Authorization: Bearer <token>` and the `access_token` query parameter;
//! - order: headers (sorted by name then prefix, duplicates merged), then parameters, then
//!   cookies (each sorted by name);
//! - a header's values are joined with `,`; with a prefix, the prefix may appear anywhere in
//!   the value and the token is the run of Base64url characters and dots after it (the whole
//!   value if there is none); without a prefix the whole value is the token;
//! - a parameter is percent-decoded; a cookie value loses surrounding double quotes; the first
//!   occurrence of a name counts;
//! - after a token is accepted and `forwardOriginalToken` is false, the header it came from is
//!   removed. Parameters and cookies are left in place (Envoy does not remove them either).

use std::collections::BTreeSet;

use http::{HeaderMap, HeaderName, Uri};

/// One place a token may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

/// A token found in a request, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    pub token: String,
    pub location: Location,
}

/// The ordered, de-duplicated locations of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Locations {
    headers: Vec<(HeaderName, String)>,
    params: Vec<String>,
    cookies: Vec<String>,
}

impl Locations {
    pub fn new(
        headers: Vec<(HeaderName, String)>,
        params: Vec<String>,
        cookies: Vec<String>,
    ) -> Self {
        if headers.is_empty() && params.is_empty() && cookies.is_empty() {
            return Locations {
                headers: vec![(http::header::AUTHORIZATION, "Bearer ".to_string())],
                params: vec!["access_token".to_string()],
                cookies: Vec::new(),
            };
        }
        let sort = |v: Vec<String>| v.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        let headers: BTreeSet<(String, String)> = headers
            .into_iter()
            .map(|(n, p)| (n.as_str().to_string(), p))
            .collect();
        Locations {
            headers: headers
                .into_iter()
                .filter_map(|(n, p)| HeaderName::try_from(n).ok().map(|n| (n, p)))
                .collect(),
            params: sort(params),
            cookies: sort(cookies),
        }
    }

    /// Every token this rule would check, in Envoy's extraction order.
    pub fn extract(&self, headers: &HeaderMap, uri: &Uri) -> Vec<Found> {
        let mut out = Vec::new();
        for (name, prefix) in &self.headers {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if values.is_empty() {
                continue;
            }
            let joined = values.join(",");
            let token = if prefix.is_empty() {
                joined
            } else {
                let Some(pos) = joined.find(prefix.as_str()) else {
                    continue;
                };
                token_after(&joined, pos + prefix.len()).to_string()
            };
            out.push(Found {
                token,
                location: Location::Header {
                    name: name.clone(),
                    prefix: prefix.clone(),
                },
            });
        }
        if !self.params.is_empty() {
            let query = uri.query().unwrap_or_default();
            for p in &self.params {
                if let Some(v) = query_param(query, p) {
                    out.push(Found {
                        token: v,
                        location: Location::Param(p.clone()),
                    });
                }
            }
        }
        for c in &self.cookies {
            if let Some(v) = cookie(headers, c) {
                out.push(Found {
                    token: v,
                    location: Location::Cookie(c.clone()),
                });
            }
        }
        out
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// Envoy's `extractJWT`: skip to the first Base64url/dot character, take the run of them.
fn token_after(value: &str, after: usize) -> &str {
    let rest = &value[after..];
    let Some(start) = rest.find(is_token_char) else {
        return value;
    };
    let rest = &rest[start..];
    let end = rest.find(|c| !is_token_char(c)).unwrap_or(rest.len());
    &rest[..end]
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim_start().split_once('=')?;
            if k != name {
                return None;
            }
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some(v.to_string())
        })
}

/// Remove an accepted token from the request when it is not to be forwarded.
pub(crate) fn remove(headers: &mut HeaderMap, location: &Location) {
    if let Location::Header { name, .. } = location {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn hdrs(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::try_from(*k).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn default_locations() -> Locations {
        Locations::new(vec![], vec![], vec![])
    }

    #[test_case(&[("authorization", "Bearer a.b.c")], "/", &["a.b.c"] ; "bearer")]
    #[test_case(&[("authorization", "Basic a.b.c")], "/", &[] ; "other scheme")]
    #[test_case(&[("authorization", "bearer a.b.c")], "/", &[] ; "prefix is case sensitive")]
    #[test_case(&[("authorization", "Bearer  a.b.c, other")], "/", &["a.b.c"] ; "run of token characters")]
    #[test_case(&[], "/p?x=1&access_token=a.b.c", &["a.b.c"] ; "access_token param")]
    #[test_case(&[("authorization", "Bearer h.h.h")], "/p?access_token=q.q.q", &["h.h.h", "q.q.q"] ; "both default locations")]
    #[test_case(&[], "/p?access_token=a%2Eb.c", &["a.b.c"] ; "param is percent decoded")]
    fn default_extraction(h: &[(&str, &str)], uri: &str, want: &[&str]) {
        let got: Vec<String> = default_locations()
            .extract(&hdrs(h), &uri.parse().unwrap())
            .into_iter()
            .map(|f| f.token)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn custom_locations_replace_the_defaults_and_keep_envoy_order() {
        let l = Locations::new(
            vec![
                (HeaderName::from_static("x-b"), String::new()),
                (HeaderName::from_static("x-a"), "Token ".into()),
                (HeaderName::from_static("x-b"), String::new()),
            ],
            vec!["tok".into()],
            vec!["session".into()],
        );
        let h = hdrs(&[
            ("authorization", "Bearer ignored.x.y"),
            ("x-b", " raw value"),
            ("x-a", "Token a.a.a"),
            ("cookie", "other=1; session=\"c.c.c\""),
        ]);
        let got: Vec<String> = l
            .extract(&h, &"/?access_token=no&tok=p.p.p".parse().unwrap())
            .into_iter()
            .map(|f| f.token)
            .collect();
        assert_eq!(got, ["a.a.a", " raw value", "p.p.p", "c.c.c"]);
    }

    #[test]
    fn repeated_header_values_are_joined() {
        let l = Locations::new(
            vec![(HeaderName::from_static("x-jwt"), String::new())],
            vec![],
            vec![],
        );
        let h = hdrs(&[("x-jwt", "a"), ("x-jwt", "b")]);
        let got = l.extract(&h, &"/".parse().unwrap());
        assert_eq!(got[0].token, "a,b");
    }

    #[test]
    fn removal_is_for_headers_only() {
        let mut h = hdrs(&[("authorization", "Bearer a.b.c"), ("cookie", "s=x")]);
        remove(&mut h, &Location::Cookie("s".into()));
        remove(&mut h, &Location::Param("access_token".into()));
        assert_eq!(h.len(), 2);
        remove(
            &mut h,
            &Location::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
        );
        assert!(!h.contains_key(http::header::AUTHORIZATION));
    }
}
