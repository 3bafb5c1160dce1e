//! Route rules: which [`Requirement`] governs a request, in the router's own path syntax.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::decision::Requirement;

/// One path segment of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// Matches exactly this (decoded) text.
    Literal(Box<str>),
    /// `{name}`: any one segment.
    Param,
    /// `{*name}`: one or more remaining segments.
    Rest,
}

impl Seg {
    /// How specific a segment is, as a router ranks them: literal over parameter over rest.
    fn rank(&self) -> u8 {
        match self {
            Seg::Literal(_) => 2,
            Seg::Param => 1,
            Seg::Rest => 0,
        }
    }
}

/// A rule: an optional method, a path pattern, and what it requires.
#[derive(Debug, Clone)]
struct Rule {
    /// Upper case; `None` for every method.
    method: Option<Box<str>>,
    segs: Box<[Seg]>,
    /// As written, for messages.
    pattern: Box<str>,
    requirement: Arc<Requirement>,
}

/// The rules of one billing core, and the default requirement.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    rules: Vec<Rule>,
    any_head_rule: bool,
    pub(crate) default: Arc<Requirement>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            rules: Vec::new(),
            any_head_rule: false,
            default: Arc::new(Requirement::default()),
        }
    }
}

/// Why a rule was refused. The message says how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleError(pub(crate) String);

fn err(pattern: &str, why: impl std::fmt::Display) -> RuleError {
    RuleError(format!("route rule `{pattern}` cannot match: {why}"))
}

impl Rules {
    /// Adds a rule, or says why it could never govern a request.
    pub(crate) fn add(&mut self, pattern: &str, requirement: Requirement) -> Result<(), RuleError> {
        let (method, path) = match pattern.trim().split_once(' ') {
            Some((m, p)) => (Some(m.trim()), p.trim()),
            None => (None, pattern.trim()),
        };
        let method = match method {
            Some(m) => {
                if Method::from_bytes(m.as_bytes()).is_err() {
                    return Err(err(pattern, format_args!("`{m}` is not an HTTP method")));
                }
                Some(m.to_ascii_uppercase().into_boxed_str())
            }
            None => None,
        };
        let segs = parse_path(pattern, path)?;
        if let Some(earlier) = self
            .rules
            .iter()
            .find(|r| r.method == method && *r.segs == *segs)
        {
            return Err(err(
                pattern,
                format_args!(
                    "`{}` already governs the same requests; write one rule per route",
                    earlier.pattern
                ),
            ));
        }
        self.any_head_rule |= method.as_deref() == Some("HEAD");
        self.rules.push(Rule {
            method,
            segs: segs.into(),
            pattern: pattern.into(),
            requirement: Arc::new(requirement),
        });
        Ok(())
    }

    /// The requirement governing `method` on `path` (the raw request path, split into
    /// segments here as the router splits it). `HEAD` follows `GET`'s rule unless a rule names `HEAD` itself.
    pub(crate) fn requirement(&self, method: &Method, path: &str) -> &Arc<Requirement> {
        if self.rules.is_empty() {
            return &self.default;
        }
        let method = method.as_str();
        let is_head = method.eq_ignore_ascii_case("HEAD");
        let found = if is_head {
            let own = self
                .any_head_rule
                .then(|| self.best(path, |m| m == "HEAD", false))
                .flatten();
            own.or_else(|| self.best(path, |m| m == "GET", true))
        } else {
            self.best(path, |m| m.eq_ignore_ascii_case(method), true)
        };
        found.map_or(&self.default, |r| &r.requirement)
    }

    /// The most specific rule whose path matches and whose method is accepted (or, with
    /// `any_method`, that names no method). At equal paths a rule naming the method wins.
    fn best(&self, path: &str, method: impl Fn(&str) -> bool, any_method: bool) -> Option<&Rule> {
        let mut best: Option<(&Rule, bool)> = None;
        for rule in &self.rules {
            let named = match &rule.method {
                Some(m) if method(m) => true,
                Some(_) => continue,
                None if any_method => false,
                None => continue,
            };
            if !matches(&rule.segs, path) {
                continue;
            }
            let better = match best {
                None => true,
                Some((b, b_named)) => match more_specific(&rule.segs, &b.segs) {
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Less => false,
                    std::cmp::Ordering::Equal => named && !b_named,
                },
            };
            if better {
                best = Some((rule, named));
            }
        }
        best.map(|(r, _)| r)
    }
}

/// Parses a path in axum's syntax: `/v1/items/{id}`, `/files/{*rest}`.
fn parse_path(pattern: &str, path: &str) -> Result<Vec<Seg>, RuleError> {
    if !path.starts_with('/') {
        return Err(err(pattern, "the path must start with `/`"));
    }
    if path == "/" {
        return Ok(Vec::new());
    }
    if path.ends_with("/*") || path == "*" {
        let base = path.trim_end_matches('*');
        return Err(err(
            pattern,
            format_args!(
                "a trailing `*` was 0.1's prefix syntax; write `{base}{{*rest}}` as in axum"
            ),
        ));
    }
    if path.ends_with('/') {
        return Err(err(
            pattern,
            format_args!(
                "paths are matched without their trailing slash; write `{}`",
                path.trim_end_matches('/')
            ),
        ));
    }
    let raw: Vec<&str> = path[1..].split('/').collect();
    let mut segs = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        if s.is_empty() {
            return Err(err(
                pattern,
                "empty segments (`//`) are dropped before matching",
            ));
        }
        if *s == "." || *s == ".." {
            return Err(err(pattern, "dot segments are resolved before matching"));
        }
        if let Some(name) = s.strip_prefix(':') {
            return Err(err(
                pattern,
                format_args!("`:{name}` is axum 0.7's syntax; write `{{{name}}}`"),
            ));
        }
        if let Some(inner) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if let Some(name) = inner.strip_prefix('*') {
                if name.is_empty() || i + 1 != raw.len() {
                    return Err(err(
                        pattern,
                        "a `{*rest}` segment must be named and come last",
                    ));
                }
                segs.push(Seg::Rest);
            } else if inner.is_empty() || inner.contains(['{', '}', '*']) {
                return Err(err(pattern, format_args!("`{s}` is not a parameter")));
            } else {
                segs.push(Seg::Param);
            }
            continue;
        }
        if s.contains(['{', '}']) {
            return Err(err(
                pattern,
                format_args!("`{s}`: a parameter must be a whole segment, `{{name}}`"),
            ));
        }
        let decoded = percent_decode(s);
        if decoded.contains('/') {
            return Err(err(pattern, "an encoded `/` is matched as a separator"));
        }
        segs.push(Seg::Literal(decoded.into()));
    }
    Ok(segs)
}

/// Whether `segs` match the raw request `path`, segment by segment as a router splits it:
/// empty segments (`//`, a trailing `/`) are dropped; a literal matches a segment whose
/// percent-decoded text equals it; `{param}` matches any one segment and `{*rest}` one or more,
/// whatever their text (`.`, `..`, `%2e`, `%2F` included). Dot segments are not resolved and an
/// encoded `/` does not split a segment, exactly as the router does not: a spelling that could
/// resolve to another route reaches no handler of that route.
fn matches(segs: &[Seg], path: &str) -> bool {
    let mut parts = path.split('/').filter(|s| !s.is_empty());
    for seg in segs {
        match seg {
            Seg::Literal(text) => match parts.next() {
                Some(raw) if percent_decode(raw) == **text => {}
                _ => return false,
            },
            Seg::Param => {
                if parts.next().is_none() {
                    return false;
                }
            }
            Seg::Rest => return parts.next().is_some(),
        }
    }
    parts.next().is_none()
}

/// Compares two rules' paths as a router ranks routes: segment by segment, literal over
/// parameter over rest; a longer path over its prefix.
fn more_specific(a: &[Seg], b: &[Seg]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        match x.rank().cmp(&y.rank()) {
            std::cmp::Ordering::Equal => {}
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

/// Decodes `%XX` escapes (invalid ones are kept as written; bytes that do not form UTF-8 are
/// replaced, so they match no literal).
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[(&str, u32)]) -> Rules {
        let mut r = Rules::default();
        for (p, tier) in list {
            r.add(p, Requirement::new().min_tier(*tier)).unwrap();
        }
        r
    }

    fn tier(r: &Rules, method: &str, path: &str) -> Option<u32> {
        r.requirement(&Method::from_bytes(method.as_bytes()).unwrap(), path)
            .min_tier
    }

    #[test]
    fn axum_syntax_and_priority() {
        let r = rules(&[
            ("GET /v1/items/{id}", 2),
            ("/v1/{*rest}", 1),
            ("GET /v1/items/special", 3),
            ("POST /v1/items/{id}", 4),
        ]);
        assert_eq!(tier(&r, "GET", "/v1/items/42"), Some(2));
        assert_eq!(tier(&r, "GET", "/v1/items/special"), Some(3));
        assert_eq!(tier(&r, "POST", "/v1/items/42"), Some(4));
        assert_eq!(tier(&r, "DELETE", "/v1/items/42"), Some(1));
        assert_eq!(tier(&r, "GET", "/v1/other/deep/path"), Some(1));
        assert_eq!(tier(&r, "GET", "/v2"), None);
        assert_eq!(
            tier(&r, "GET", "/v1"),
            None,
            "a rest segment needs one segment"
        );
    }

    #[test]
    fn spellings_cannot_dodge_a_rule() {
        let r = rules(&[("GET /v1/premium", 2)]);
        for path in [
            "/v1/premium",
            "/v1/premium/",
            "//v1//premium",
            "/v1/%70remium",
            "/v1/%70REMIUM".to_lowercase().as_str(),
        ] {
            assert_eq!(tier(&r, "GET", path), Some(2), "{path}");
        }
        assert_eq!(tier(&r, "get", "/v1/premium"), Some(2), "method case");
        assert_eq!(tier(&r, "HEAD", "/v1/premium"), Some(2), "HEAD follows GET");
        assert_eq!(tier(&r, "head", "/v1/premium/"), Some(2));
        assert_eq!(
            tier(&r, "POST", "/v1/premium"),
            None,
            "another method: default"
        );
    }

    #[test]
    fn head_follows_get_unless_named() {
        let r = rules(&[("GET /a/{*rest}", 1), ("/a/b", 5)]);
        // Any-method `/a/b` is more specific than `GET /a/{*rest}`: it governs GET and HEAD.
        assert_eq!(tier(&r, "HEAD", "/a/b"), Some(5));
        assert_eq!(tier(&r, "HEAD", "/a/c"), Some(1));
        let r = rules(&[("GET /a", 1), ("HEAD /a", 7)]);
        assert_eq!(tier(&r, "HEAD", "/a"), Some(7));
    }

    #[test]
    fn rules_that_cannot_match_are_refused_with_the_fix() {
        for (pattern, fix) in [
            ("/v1/*", "`/v1/{*rest}`"),
            ("GET /v1/items/:id", "`{id}`"),
            ("GET /v1/premium/", "`/v1/premium`"),
            ("GET v1", "start with `/`"),
            ("G@T /v1", "not an HTTP method"),
            ("/a//b", "empty segment"),
            ("/a/{*rest}/b", "come last"),
            ("/a/x{id}", "whole segment"),
        ] {
            let e = Rules::default()
                .add(pattern, Requirement::new())
                .unwrap_err();
            assert!(e.0.contains(fix), "{pattern}: {}", e.0);
        }
        let mut r = Rules::default();
        r.add("GET /v1/items/{id}", Requirement::new()).unwrap();
        let e = r
            .add("get /v1/items/{item}", Requirement::new())
            .unwrap_err();
        assert!(e.0.contains("already governs"), "{}", e.0);
    }

    #[test]
    fn parameters_take_any_segment_as_the_router_does() {
        let r = rules(&[("GET /v1/items/{id}", 2), ("/v1/files/{*rest}", 1)]);
        // axum hands each of these to the `{id}` (or `{*rest}`) handler: so must the rules.
        for path in [
            "/v1/items/.",
            "/v1/items/..",
            "/v1/items/%2e%2e",
            "/v1/items/%2F",
        ] {
            assert_eq!(tier(&r, "GET", path), Some(2), "{path}");
        }
        for path in ["/v1/files/a/..", "/v1/files/%2e", "/v1/files/x/%2e%2e"] {
            assert_eq!(tier(&r, "GET", path), Some(1), "{path}");
        }
        // Spellings the router sends nowhere near the route match no rule of it either.
        assert_eq!(tier(&r, "GET", "/v1/x/../items/1"), None);
        assert_eq!(tier(&r, "GET", "/v1%2Fitems/1"), None);
    }
}
