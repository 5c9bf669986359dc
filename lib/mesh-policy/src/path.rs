//! HTTP path normalization before `paths` matching at the waypoint, as Istio configures Envoy
//! (`meshConfig.pathNormalization`; istio.io docs/reference/config/security/normalization).
//!
//! - `NONE`: the path as received.
//! - `BASE` (default): RFC 3986 dot-segment removal, `\` -> `/`, and decoding of the
//!   unreserved escapes `%2D %2E %30-%39 %41-%5A %5F %61-%7A %7E`; no slash merging, no
//!   `%2F`/`%5C` decoding.
//! - `MERGE_SLASHES`: BASE, then `//` -> `/`.
//! - `DECODE_AND_MERGE_SLASHES`: `%2F`/`%5C` decoded first, then MERGE_SLASHES.
//!
//! The query (`?...`) and fragment are removed before matching. `%00` is rejected (HTTP 400).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    None,
    #[default]
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

/// Why Envoy rejects a path before authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} contains %00; Envoy rejects it with HTTP 400 before authorization")]
    Nul(String),
    #[error("path {0:?} does not start with `/`")]
    NotAbsolute(String),
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Decodes `%XX` escapes for which `keep(byte)` is true; others are kept as written.
fn decode_selected(p: &str, keep: impl Fn(u8) -> bool) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let decoded = hex(b[i + 1]).zip(hex(b[i + 2])).map(|(h, l)| h * 16 + l);
            if let Some(c) = decoded.filter(|c| keep(*c)) {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §5.2.4 remove_dot_segments.
fn remove_dot_segments(path: &str) -> String {
    let mut input = path.to_string();
    let mut output: Vec<String> = Vec::new();
    let mut trailing = false;
    let segments: Vec<&str> = input.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." => trailing = last,
            ".." => {
                output.pop();
                trailing = last;
            }
            s => {
                output.push(s.to_string());
                trailing = false;
            }
        }
    }
    input.clear();
    for s in &output {
        input.push('/');
        input.push_str(s);
    }
    if trailing || input.is_empty() {
        input.push('/');
    }
    input
}

/// The path a waypoint's RBAC `paths` matcher compares against.
pub fn normalize(raw: &str, mode: PathNormalization) -> Result<String, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if path.to_ascii_lowercase().contains("%00") {
        return Err(PathError::Nul(raw.to_string()));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    if mode == PathNormalization::None {
        return Ok(path.to_string());
    }
    let mut p = path.to_string();
    if mode == PathNormalization::DecodeAndMergeSlashes {
        p = decode_selected(&p, |c| c == b'/' || c == b'\\');
    }
    p = decode_selected(&p, unreserved);
    p = p.replace('\\', "/");
    p = remove_dot_segments(&p);
    if matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    ) {
        while p.contains("//") {
            p = p.replace("//", "/");
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;
    use test_case::test_case;

    // istio.io docs/reference/config/security/normalization (the table of examples) and
    // authz-semantics.md §6.2 ("DENY /admin* is bypassed by //admin under default settings").
    #[test_case("/ip?x=1", Base => "/ip" ; "query removed")]
    #[test_case("/a/b/../c", Base => "/a/c" ; "dot dot")]
    #[test_case("/a/./b", Base => "/a/b" ; "dot")]
    #[test_case("/a/%2E%2E/b", Base => "/b" ; "encoded dots")]
    #[test_case("/%61dmin", Base => "/admin" ; "unreserved decoded")]
    #[test_case("/a\\b", Base => "/a/b" ; "backslash")]
    #[test_case("//admin", Base => "//admin" ; "no slash merging by default")]
    #[test_case("/a%2Fb", Base => "/a%2Fb" ; "no slash decoding by default")]
    #[test_case("//admin", MergeSlashes => "/admin" ; "merge slashes")]
    #[test_case("/a%2F%2Fb", MergeSlashes => "/a%2F%2Fb" ; "merge does not decode")]
    #[test_case("/a%2F%2Fb", DecodeAndMergeSlashes => "/a/b" ; "decode and merge")]
    #[test_case("/a%5cb", DecodeAndMergeSlashes => "/a/b" ; "decode backslash")]
    #[test_case("/a/../../b", Base => "/b" ; "above root")]
    #[test_case("/a/..", Base => "/" ; "to root")]
    #[test_case("/a/b/..", Base => "/a/" ; "trailing dot dot")]
    #[test_case("/a/../b", None => "/a/../b" ; "none keeps")]
    #[test_case("/%7euser", Base => "/~user" ; "tilde")]
    #[test_case("/a%20b", Base => "/a%20b" ; "space stays encoded")]
    fn normalizes(raw: &str, mode: PathNormalization) -> String {
        normalize(raw, mode).unwrap()
    }

    #[test]
    fn nul_and_relative_are_rejected() {
        assert!(matches!(normalize("/a%00b", Base), Err(PathError::Nul(_))));
        assert!(matches!(
            normalize("a/b", Base),
            Err(PathError::NotAbsolute(_))
        ));
    }

    #[test]
    fn odd_escapes_never_panic() {
        for p in ["/%", "/%4", "/%zz", "/%e2%82", "/€/%C3%A9"] {
            let _ = normalize(p, DecodeAndMergeSlashes);
        }
        assert_eq!(normalize("/%", Base).unwrap(), "/%");
    }
}
