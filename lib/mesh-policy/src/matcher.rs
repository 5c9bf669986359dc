//! Istio's value matchers, shared by both hops: the `*` wildcard rule (`abc` exact, `abc*`
//! prefix, `*abc` suffix, `*` presence), Envoy's regex-style namespace matcher, and Envoy URI
//! templates (`{*}`, `{**}`) for `paths`.

use mesh_core::policy::StringMatch;

/// `stringToMatch` (istiod ambient conversion) and `matcher.StringMatcher` (Envoy builder).
pub fn to_string_match(v: &str) -> StringMatch {
    if v == "*" {
        StringMatch::Presence
    } else if let Some(s) = v.strip_prefix('*') {
        StringMatch::Suffix(s.to_string())
    } else if let Some(p) = v.strip_suffix('*') {
        StringMatch::Prefix(p.to_string())
    } else {
        StringMatch::Exact(v.to_string())
    }
}

/// Applies the wildcard rule to `s`; `ignore_case` for hosts.
pub fn wildcard_match(pattern: &str, s: &str, ignore_case: bool) -> bool {
    if ignore_case {
        let (p, s) = (pattern.to_ascii_lowercase(), s.to_ascii_lowercase());
        return to_string_match(&p).matches(&s);
    }
    to_string_match(pattern).matches(s)
}

/// A glob where `*` matches any run of characters (what Envoy's `.*` regexes built from
/// `namespaces` values amount to).
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = s.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Envoy's `namespaces` matcher: regex `.*/ns/<value, * -> .*>/.*` against the peer's URI SAN
/// (`srcNamespaceGenerator`).
pub fn envoy_namespace_match(value: &str, uri_san: &str) -> bool {
    glob_match(&format!("*/ns/{value}/*"), uri_san)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(String),
    /// `{*}`: exactly one non-empty path segment.
    One,
    /// `{**}`: zero or more characters, across segments.
    Any,
}

fn tokenize_template(t: &str) -> Vec<Tok> {
    let mut toks = Vec::new();
    let mut lit = String::new();
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{**}") {
            if !lit.is_empty() {
                toks.push(Tok::Lit(std::mem::take(&mut lit)));
            }
            toks.push(Tok::Any);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{*}") {
            if !lit.is_empty() {
                toks.push(Tok::Lit(std::mem::take(&mut lit)));
            }
            toks.push(Tok::One);
            rest = r;
        } else {
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                lit.push(c);
            }
            rest = chars.as_str();
        }
    }
    if !lit.is_empty() {
        toks.push(Tok::Lit(lit));
    }
    toks
}

fn match_toks(toks: &[Tok], s: &str) -> bool {
    match toks.split_first() {
        None => s.is_empty(),
        Some((Tok::Lit(l), rest)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|r| match_toks(rest, r)),
        Some((Tok::One, rest)) => {
            let seg_end = s.find('/').unwrap_or(s.len());
            // One segment: 1..=seg_end characters (a template literal may follow mid-segment).
            (1..=seg_end).any(|n| s.is_char_boundary(n) && match_toks(rest, &s[n..]))
        }
        Some((Tok::Any, rest)) => {
            (0..=s.len()).any(|n| s.is_char_boundary(n) && match_toks(rest, &s[n..]))
        }
    }
}

/// Envoy `uri_template` matching of a normalized path (query already removed).
pub fn template_match(template: &str, path: &str) -> bool {
    match_toks(&tokenize_template(template), path)
}

/// `paths` matching: a template if it contains `{*}`/`{**}`, else the wildcard rule.
pub fn path_match(pattern: &str, path: &str) -> bool {
    if crate::validate::is_path_template(pattern) {
        template_match(pattern, path)
    } else {
        wildcard_match(pattern, path, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use test_case::test_case;

    // istio.io docs/reference/config/security/authorization-policy (string matching) and
    // istio/istio pilot/pkg/security/authz/matcher/string_test.go.
    #[test_case("abc", "abc" => true ; "exact")]
    #[test_case("abc", "abcd" => false ; "exact is not prefix")]
    #[test_case("abc*", "abcd" => true ; "prefix")]
    #[test_case("*bcd", "abcd" => true ; "suffix")]
    #[test_case("*", "x" => true ; "presence")]
    #[test_case("*", "" => false ; "presence needs a value")]
    #[test_case("a*b", "axb" => false ; "middle star is literal exact")]
    #[test_case("a*b", "a*b" => true ; "middle star matches itself")]
    fn wildcard(p: &str, s: &str) -> bool {
        wildcard_match(p, s, false)
    }

    #[test]
    fn hosts_ignore_case() {
        assert!(wildcard_match("Example.COM", "example.com", true));
        assert!(!wildcard_match("example.com", "example.com:8080", true));
        assert!(wildcard_match("example.com:*", "example.com:8080", true));
    }

    // istio.io docs/reference/config/security/authorization-policy (paths: URI templates):
    // "/allow/admin/{**}" does not match "/allow/admin"; "/store/{**}/cart" matches
    // "/store//cart" but not "/store/cart" (authz-semantics.md §6.2).
    #[test_case("/foo/{*}", "/foo/bar" => true ; "one segment")]
    #[test_case("/foo/{*}", "/foo/bar/baz" => false ; "one segment only")]
    #[test_case("/foo/{*}", "/foo/" => false ; "one segment non empty")]
    #[test_case("/foo/{*}/baz", "/foo/x/baz" => true ; "one segment middle")]
    #[test_case("/allow/admin/{**}", "/allow/admin" => false ; "glob needs slash")]
    #[test_case("/allow/admin/{**}", "/allow/admin/" => true ; "glob empty")]
    #[test_case("/allow/admin/{**}", "/allow/admin/a/b" => true ; "glob deep")]
    #[test_case("/store/{**}/cart", "/store//cart" => true ; "glob empty middle")]
    #[test_case("/store/{**}/cart", "/store/cart" => false ; "glob middle needs both slashes")]
    #[test_case("/store/{**}/cart", "/store/a/b/cart" => true ; "glob middle deep")]
    #[test_case("/{*}.txt", "/a.txt" => true ; "segment with suffix")]
    fn templates(t: &str, p: &str) -> bool {
        template_match(t, p)
    }

    #[test]
    fn namespace_regex_semantics() {
        let uri = "spiffe://cluster.local/ns/foo/sa/bar";
        assert!(envoy_namespace_match("foo", uri));
        assert!(!envoy_namespace_match("fo", uri));
        assert!(envoy_namespace_match("fo*", uri));
        assert!(envoy_namespace_match("*oo", uri));
        assert!(envoy_namespace_match("*", uri));
    }

    proptest! {
        // Property: `x*` is exactly starts_with, `*x` exactly ends_with, `*` is non-empty,
        // anything without `*` is equality.
        #[test]
        fn prefix_is_starts_with(p in "[a-z/]{1,6}", s in "[a-z/]{0,10}") {
            prop_assert_eq!(wildcard_match(&format!("{p}*"), &s, false), s.starts_with(&p));
        }

        #[test]
        fn suffix_is_ends_with(p in "[a-z/]{1,6}", s in "[a-z/]{0,10}") {
            prop_assert_eq!(wildcard_match(&format!("*{p}"), &s, false), s.ends_with(&p));
        }

        #[test]
        fn exact_is_equality(p in "[a-z/]{1,6}", s in "[a-z/]{0,6}") {
            prop_assert_eq!(wildcard_match(&p, &s, false), p == s);
        }

        #[test]
        fn star_is_presence(s in "[a-z/]{0,6}") {
            prop_assert_eq!(wildcard_match("*", &s, false), !s.is_empty());
        }

        // Property: a glob with no `*` is equality; `*` alone matches everything.
        #[test]
        fn glob_literal_and_star(p in "[a-z/]{0,6}", s in "[a-z/]{0,6}") {
            prop_assert_eq!(glob_match(&p, &s), p == s);
            prop_assert!(glob_match("*", &s));
            let (pat, text) = (format!("{p}*"), format!("{p}{s}"));
            prop_assert!(glob_match(&pat, &text));
        }

        // Property: `{**}` at the end behaves as a prefix match of the literal before it.
        #[test]
        fn trailing_glob_is_prefix(p in "/[a-z]{1,4}/", s in "[a-z/]{0,8}") {
            let t = format!("{p}{{**}}");
            prop_assert_eq!(template_match(&t, &s), s.starts_with(&p));
        }

        // Property: `{*}` never matches across a `/`.
        #[test]
        fn one_segment_never_crosses_slash(a in "[a-z]{1,4}", b in "[a-z]{1,4}") {
            let joined = format!("/x/{a}/{b}");
            let t = "/x/{*}";
            prop_assert!(!template_match(t, &joined));
            let single = format!("/x/{a}");
            prop_assert!(template_match(t, &single));
        }
    }
}
