//! Routing: host first, then the longest path prefix.
//!
//! Routes with a `host` form virtual hosts: a request whose `Host` matches
//! one is routed among that host's routes; if none of them matches the path
//! (or no host matches), the routes without a host are tried. Within a set,
//! the longest matching `path_prefix` wins. A prefix matches whole path
//! segments: `/api` matches `/api` and `/api/users` but not `/apix`; a
//! prefix ending in `/` matches anything below it.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{Action, RouteConfig};
use crate::upstream::Pool;

/// What a matched route does.
#[derive(Debug)]
pub(crate) enum Target {
    /// Proxy to this pool.
    Upstream {
        /// The pool (of the configuration the route came from).
        pool: Arc<Pool>,
        /// Remove the prefix before forwarding.
        strip_prefix: bool,
    },
    /// Proxy to the backend a [`crate::front::Front`] follows at the time.
    Follow(Arc<crate::front::Follow>),
    /// A fixed response.
    Respond {
        /// Status.
        status: http::StatusCode,
        /// Body.
        body: Bytes,
        /// Content type.
        content_type: http::HeaderValue,
    },
}

/// One compiled route.
#[derive(Debug)]
pub(crate) struct Route {
    /// The prefix.
    pub(crate) prefix: String,
    /// What to do.
    pub(crate) target: Target,
    /// Bound on the upstream's response headers.
    pub(crate) timeout: Duration,
}

/// A route in a set keyed by its own prefix: looked up with a `&str`,
/// without a second copy of the prefix as a map key.
#[derive(Debug)]
struct ByPrefix(Route);

impl Borrow<str> for ByPrefix {
    fn borrow(&self) -> &str {
        &self.0.prefix
    }
}

// Hashes and compares as its prefix does, as `Borrow<str>` requires.
impl Hash for ByPrefix {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.prefix.as_str().hash(state);
    }
}

impl PartialEq for ByPrefix {
    fn eq(&self, other: &Self) -> bool {
        self.0.prefix == other.0.prefix
    }
}

impl Eq for ByPrefix {}

type Routes = HashSet<ByPrefix>;

/// The routes of one HTTP listener.
///
/// Lookup costs one hash probe per path segment (never a scan of the
/// routes), so a table of 10,000 routes answers as fast as one of ten.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    hosts: HashMap<String, Routes>,
    any: Routes,
    len: usize,
}

impl RouteTable {
    /// Compiles the routes of `listener` from `routes`, with `pools` by name.
    /// The configuration was validated: unknown upstreams cannot occur (a
    /// route naming one is skipped).
    #[cfg(test)]
    fn build(
        listener: &str,
        routes: &[RouteConfig],
        pools: &HashMap<String, Arc<Pool>>,
    ) -> RouteTable {
        let mine: Vec<&RouteConfig> = routes.iter().filter(|r| r.listener == listener).collect();
        RouteTable::compile(&mine, pools)
    }

    /// Compiles the tables of every listener named in `routes` in one pass
    /// over them (what a reload does: [`build`](Self::build) per listener
    /// would go over all the routes once per listener).
    pub(crate) fn build_all(
        routes: &[RouteConfig],
        pools: &HashMap<String, Arc<Pool>>,
    ) -> HashMap<String, RouteTable> {
        let mut by_listener: Vec<(&str, Vec<&RouteConfig>)> = Vec::new();
        for r in routes {
            // Routes come grouped by listener, or all on one: the last
            // group is nearly always the one.
            match by_listener.iter_mut().rev().find(|(l, _)| *l == r.listener) {
                Some((_, group)) => group.push(r),
                None => by_listener.push((&r.listener, vec![r])),
            }
        }
        by_listener
            .into_iter()
            .map(|(l, group)| (l.to_owned(), RouteTable::compile(&group, pools)))
            .collect()
    }

    // A `ByPrefix` hashes its prefix only, which never changes; the
    // interior mutability clippy sees is the pool's counters.
    #[allow(clippy::mutable_key_type)]
    fn compile(routes: &[&RouteConfig], pools: &HashMap<String, Arc<Pool>>) -> RouteTable {
        let mut table = RouteTable {
            hosts: HashMap::new(),
            // Sized once: growing a set of 10,000 rehashes every prefix again.
            any: HashSet::with_capacity(routes.iter().filter(|r| r.host.is_none()).count()),
            len: 0,
        };
        // Consecutive routes mostly name the same upstream: look it up once.
        let mut last_pool: Option<(&str, &Arc<Pool>)> = None;
        for r in routes {
            let target = match &r.action {
                Action::Upstream { name, strip_prefix } => {
                    let pool = match last_pool {
                        Some((n, p)) if n == name.as_str() => p,
                        _ => match pools.get(name) {
                            Some(p) => {
                                last_pool = Some((name, p));
                                p
                            }
                            None => continue,
                        },
                    };
                    Target::Upstream {
                        pool: pool.clone(),
                        strip_prefix: *strip_prefix,
                    }
                }
                Action::Respond {
                    status,
                    body,
                    content_type,
                } => Target::Respond {
                    status: http::StatusCode::from_u16(*status).unwrap_or(http::StatusCode::OK),
                    body: Bytes::from(body.clone()),
                    content_type: http::HeaderValue::from_str(content_type)
                        .unwrap_or(http::HeaderValue::from_static("text/plain")),
                },
            };
            let route = ByPrefix(Route {
                prefix: r.path_prefix.clone(),
                target,
                timeout: r.timeout,
            });
            let set = match &r.host {
                Some(h) => {
                    if !table.hosts.contains_key(h.as_str()) {
                        table.hosts.insert(h.clone(), HashSet::new());
                    }
                    match table.hosts.get_mut(h.as_str()) {
                        Some(set) => set,
                        None => continue,
                    }
                }
                None => &mut table.any,
            };
            // Validation refuses duplicates; the first one wins otherwise.
            if set.insert(route) {
                table.len += 1;
            }
        }
        table
    }

    /// The route for `host` (as sent: may carry a port, any case) and `path`.
    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        if !self.hosts.is_empty() {
            if let Some(h) = host.map(normalize_host) {
                if let Some(routes) = self.hosts.get(h.as_str()) {
                    if let Some(r) = longest(routes, path) {
                        return Some(r);
                    }
                }
            }
        }
        longest(&self.any, path)
    }

    /// A table with one route, `/` for any host, to what `follow` follows.
    #[allow(clippy::mutable_key_type)] // see `compile`
    pub(crate) fn follow(follow: Arc<crate::front::Follow>, timeout: Duration) -> RouteTable {
        let mut any = HashSet::with_capacity(1);
        any.insert(ByPrefix(Route {
            prefix: "/".to_owned(),
            target: Target::Follow(follow),
            timeout,
        }));
        RouteTable {
            hosts: HashMap::new(),
            any,
            len: 1,
        }
    }

    /// Number of routes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// The route with the longest prefix of `path` (on a segment boundary):
/// tries the whole path, then for each `/` from the last one back, the path
/// up to and including it (`/api/`), then up to it (`/api`).
#[allow(clippy::mutable_key_type)] // see `RouteTable::compile`
fn longest<'a>(routes: &'a Routes, path: &str) -> Option<&'a Route> {
    if routes.is_empty() {
        return None;
    }
    if let Some(r) = routes.get(path) {
        return Some(&r.0);
    }
    let bytes = path.as_bytes();
    for i in (0..bytes.len()).rev() {
        if bytes[i] != b'/' {
            continue;
        }
        if let Some(r) = path.get(..=i).and_then(|p| routes.get(p)) {
            return Some(&r.0);
        }
        if i > 0 {
            if let Some(r) = path.get(..i).and_then(|p| routes.get(p)) {
                return Some(&r.0);
            }
        }
    }
    None
}

/// Lowercase, without the port (`[::1]:80` → `[::1]`).
fn normalize_host(h: &str) -> String {
    let h = h.trim();
    let without_port = if h.starts_with('[') {
        match h.find(']') {
            Some(i) => &h[..=i],
            None => h,
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => h,
        }
    };
    without_port.to_ascii_lowercase()
}

/// Why a request path cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadPath {
    /// A `%` not followed by two hexadecimal digits.
    #[error("invalid percent-encoding in the path")]
    Encoding,
    /// More `..` segments than there are segments above them.
    #[error("the path climbs above the root")]
    AboveRoot,
}

/// The path routes are matched against, and that is forwarded:
///
/// 1. `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded
///    (`/%61dmin` → `/admin`); every other `%XX` stays as it came (so
///    `%2F` is not a separator); a `%` without two hex digits is an error;
/// 2. runs of `/` are merged into one (`//admin` → `/admin`);
/// 3. `.` and `..` segments are removed as RFC 3986 §5.2.4 says
///    (`/x/../admin` → `/admin`, `/a/.` → `/a/`); a `..` above the root is
///    an error (nginx answers 400 too).
///
/// A path needing none of this is returned as it is, without allocating.
/// `path` is the part of an origin-form target before `?` (`*` is left
/// alone).
pub(crate) fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, BadPath> {
    use std::borrow::Cow;
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || is_normal(b) {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Percent-decoding of unreserved characters.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                return Err(BadPath::Encoding);
            };
            let c = (hi * 16 + lo) as u8;
            if is_unreserved(c) {
                decoded.push(c as char);
            } else {
                decoded.push_str(&path[i..i + 3]);
            }
            i += 3;
        } else {
            let start = i;
            while i < b.len() && b[i] != b'%' {
                i += 1;
            }
            decoded.push_str(&path[start..i]);
        }
    }
    // 2 and 3. Merged slashes, dot segments.
    let mut out = String::with_capacity(decoded.len());
    let mut trailing_slash = false;
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => trailing_slash = true,
            ".." => {
                let Some(cut) = out.rfind('/') else {
                    return Err(BadPath::AboveRoot);
                };
                out.truncate(cut);
                trailing_slash = true;
            }
            s => {
                out.push('/');
                out.push_str(s);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Whether `path` (starting with `/`) is already normal: no `%`, no `//`,
/// no `.` or `..` segment. One pass, no allocation.
fn is_normal(b: &[u8]) -> bool {
    // Each segment follows a `/` (the path starts with one).
    let mut segs = b.split(|c| *c == b'/').skip(1).peekable();
    while let Some(seg) = segs.next() {
        // An empty segment other than a final one is `//`.
        let last = segs.peek().is_none();
        if (seg.is_empty() && !last) || seg == b"." || seg == b".." || seg.contains(&b'%') {
            return false;
        }
    }
    true
}

/// Whether `prefix` matches `path` on a segment boundary (the model the
/// tests check the table against).
#[cfg(test)]
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/')
        || path.len() == prefix.len()
        || path.as_bytes().get(prefix.len()) == Some(&b'/')
}

/// `path` with `prefix` removed (`/api/users` → `/users`, `/api` → `/`).
pub(crate) fn strip(prefix: &str, path: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.get(prefix.len()..).unwrap_or("");
    if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str, body: &str) -> RouteConfig {
        RouteConfig {
            listener: "web".into(),
            host: host.map(str::to_owned),
            path_prefix: prefix.into(),
            action: Action::Respond {
                status: 200,
                body: body.into(),
                content_type: "text/plain".into(),
            },
            timeout: Duration::from_secs(1),
        }
    }

    fn body(t: &RouteTable, host: Option<&str>, path: &str) -> Option<String> {
        t.find(host, path).map(|r| match &r.target {
            Target::Respond { body, .. } => String::from_utf8_lossy(body).into_owned(),
            Target::Upstream { .. } => "upstream".into(),
            Target::Follow(_) => "follow".into(),
        })
    }

    #[test]
    fn host_then_longest_prefix() {
        let routes = vec![
            route(None, "/", "root"),
            route(None, "/api", "api"),
            route(None, "/api/v2", "api2"),
            route(Some("a.example"), "/api", "a-api"),
            route(Some("a.example"), "/", "a-root"),
        ];
        let t = RouteTable::build("web", &routes, &HashMap::new());
        assert_eq!(body(&t, None, "/api/v2/x").as_deref(), Some("api2"));
        assert_eq!(body(&t, None, "/api/v3").as_deref(), Some("api"));
        assert_eq!(body(&t, None, "/apix").as_deref(), Some("root"));
        assert_eq!(
            body(&t, Some("A.Example:8080"), "/api/v2").as_deref(),
            Some("a-api")
        );
        assert_eq!(
            body(&t, Some("a.example"), "/other").as_deref(),
            Some("a-root")
        );
        assert_eq!(body(&t, Some("b.example"), "/api").as_deref(), Some("api"));
    }

    #[test]
    fn hashed_lookup_agrees_with_the_longest_matching_prefix() {
        let prefixes = ["/", "/a", "/a/", "/a/b", "/ab", "/a/b/c/", "/x/y"];
        let routes: Vec<RouteConfig> = prefixes.iter().map(|p| route(None, p, p)).collect();
        let t = RouteTable::build("web", &routes, &HashMap::new());
        assert_eq!(t.len(), prefixes.len());
        for path in [
            "/", "/a", "/a/", "/a/b", "/a/bc", "/a/b/", "/a/b/c", "/a/b/c/", "/a/b/c/d", "/ab",
            "/abc", "/x", "/x/y", "/x/yz", "/x/y/z", "//", "/a//b",
        ] {
            let brute = prefixes
                .iter()
                .filter(|p| prefix_matches(p, path))
                .max_by_key(|p| p.len())
                .map(|p| p.to_string());
            assert_eq!(body(&t, None, path), brute, "{path}");
        }
    }

    #[test]
    fn build_all_gives_each_listener_its_own_routes() {
        let mut routes = vec![
            route(None, "/", "web-root"),
            route(Some("a.example"), "/", "web-a"),
        ];
        let mut other = route(None, "/", "admin-root");
        other.listener = "admin".into();
        routes.insert(1, other);
        routes.push(route(None, "/", "duplicate: the first one wins"));
        let mut all = RouteTable::build_all(&routes, &HashMap::new());
        assert_eq!(all.len(), 2);
        let web = all.remove("web").unwrap();
        let admin = all.remove("admin").unwrap();
        assert_eq!((web.len(), admin.len()), (2, 1));
        assert_eq!(body(&web, None, "/x").as_deref(), Some("web-root"));
        assert_eq!(
            body(&web, Some("A.example"), "/x").as_deref(),
            Some("web-a")
        );
        assert_eq!(body(&admin, None, "/x").as_deref(), Some("admin-root"));
        let single = RouteTable::build("web", &routes, &HashMap::new());
        assert_eq!(single.len(), web.len());
    }

    #[test]
    fn no_route_is_none() {
        let t = RouteTable::build("web", &[route(None, "/api", "api")], &HashMap::new());
        assert!(t.find(None, "/").is_none());
    }

    #[test]
    fn paths_are_normalised_before_routing() {
        let cases: &[(&str, Result<&str, BadPath>)] = &[
            // Already normal: unchanged.
            ("/", Ok("/")),
            ("/admin", Ok("/admin")),
            ("/a/b/", Ok("/a/b/")),
            ("/.well-known/x", Ok("/.well-known/x")),
            ("/a..b/c.", Ok("/a..b/c.")),
            // Dot segments (RFC 3986 §5.2.4).
            ("/x/../admin", Ok("/admin")),
            ("/x/./admin", Ok("/x/admin")),
            ("/a/b/..", Ok("/a/")),
            ("/a/.", Ok("/a/")),
            ("/a/b/../../c", Ok("/c")),
            ("/a/..", Ok("/")),
            ("/.", Ok("/")),
            // Merged slashes.
            ("//admin", Ok("/admin")),
            ("/a///b//", Ok("/a/b/")),
            ("//", Ok("/")),
            // Unreserved characters decoded, any hex case; others kept.
            ("/%61dmin", Ok("/admin")),
            ("/%41%7a%2d%2E%5f%7E", Ok("/Az-._~")),
            ("/a%2Fb", Ok("/a%2Fb")),
            ("/a%2fb/%20", Ok("/a%2fb/%20")),
            ("/%2e%2e/admin", Err(BadPath::AboveRoot)),
            ("/x/%2e%2E/admin", Ok("/admin")),
            ("/x/.%2e/admin", Ok("/admin")),
            ("/x/%2e/admin", Ok("/x/admin")),
            // Above the root, bad encodings.
            ("/..", Err(BadPath::AboveRoot)),
            ("/../admin", Err(BadPath::AboveRoot)),
            ("/a/../../admin", Err(BadPath::AboveRoot)),
            ("/%", Err(BadPath::Encoding)),
            ("/%6", Err(BadPath::Encoding)),
            ("/%zz", Err(BadPath::Encoding)),
            // Not origin form: left alone.
            ("*", Ok("*")),
        ];
        for (path, want) in cases {
            let got = normalize_path(path);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{path}");
        }
        // Normal paths cost no allocation.
        assert!(matches!(
            normalize_path("/api/v1/users/"),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
        // Idempotent.
        for (path, want) in cases {
            if let Ok(w) = want {
                assert_eq!(normalize_path(w).as_deref(), Ok(*w), "{path}");
            }
        }
    }

    #[test]
    fn stripping() {
        assert_eq!(strip("/api", "/api/users"), "/users");
        assert_eq!(strip("/api", "/api"), "/");
        assert_eq!(strip("/api/", "/api/x"), "/x");
        assert_eq!(strip("/", "/x"), "/x");
    }
}
