//! Routing: host first, then the longest path prefix.
//!
//! Routes with a `host` form virtual hosts: a request whose `Host` matches
//! one is routed among that host's routes; if none of them matches the path
//! (or no host matches), the routes without a host are tried. Within a set,
//! the longest matching `path_prefix` wins. A prefix matches whole path
//! segments: `/api` matches `/api` and `/api/users` but not `/apix`; a
//! prefix ending in `/` matches anything below it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{Action, RouteConfig};
use crate::upstream::Pool;

/// What a matched route does.
#[derive(Debug)]
pub enum Target {
    /// Proxy to this pool.
    Upstream {
        /// The pool (of the configuration the route came from).
        pool: Arc<Pool>,
        /// Remove the prefix before forwarding.
        strip_prefix: bool,
    },
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
pub struct Route {
    /// The prefix.
    pub prefix: String,
    /// What to do.
    pub target: Target,
    /// Bound on the upstream's response headers.
    pub timeout: Duration,
}

/// The routes of one HTTP listener.
///
/// Lookup costs one hash probe per path segment (never a scan of the
/// routes), so a table of 10,000 routes answers as fast as one of ten.
#[derive(Debug, Default)]
pub struct RouteTable {
    hosts: HashMap<String, HashMap<String, Route>>,
    any: HashMap<String, Route>,
    len: usize,
}

impl RouteTable {
    /// Compiles the routes of `listener` from `routes`, with `pools` by name.
    /// The configuration was validated: unknown upstreams cannot occur (a
    /// route naming one is skipped).
    pub fn build(
        listener: &str,
        routes: &[RouteConfig],
        pools: &HashMap<String, Arc<Pool>>,
    ) -> RouteTable {
        let mut table = RouteTable::default();
        for r in routes.iter().filter(|r| r.listener == listener) {
            let target = match &r.action {
                Action::Upstream { name, strip_prefix } => match pools.get(name) {
                    Some(pool) => Target::Upstream {
                        pool: pool.clone(),
                        strip_prefix: *strip_prefix,
                    },
                    None => continue,
                },
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
            let route = Route {
                prefix: r.path_prefix.clone(),
                target,
                timeout: r.timeout,
            };
            let set = match &r.host {
                Some(h) => table.hosts.entry(h.clone()).or_default(),
                None => &mut table.any,
            };
            // Validation refuses duplicates; the first one wins otherwise.
            if !set.contains_key(&r.path_prefix) {
                set.insert(r.path_prefix.clone(), route);
                table.len += 1;
            }
        }
        table
    }

    /// The route for `host` (as sent: may carry a port, any case) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
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

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The route with the longest prefix of `path` (on a segment boundary):
/// tries the whole path, then for each `/` from the last one back, the path
/// up to and including it (`/api/`), then up to it (`/api`).
fn longest<'a>(routes: &'a HashMap<String, Route>, path: &str) -> Option<&'a Route> {
    if routes.is_empty() {
        return None;
    }
    if let Some(r) = routes.get(path) {
        return Some(r);
    }
    let bytes = path.as_bytes();
    for i in (0..bytes.len()).rev() {
        if bytes[i] != b'/' {
            continue;
        }
        if let Some(r) = path.get(..=i).and_then(|p| routes.get(p)) {
            return Some(r);
        }
        if i > 0 {
            if let Some(r) = path.get(..i).and_then(|p| routes.get(p)) {
                return Some(r);
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

/// Whether `prefix` matches `path` on a segment boundary.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/')
        || path.len() == prefix.len()
        || path.as_bytes().get(prefix.len()) == Some(&b'/')
}

/// `path` with `prefix` removed (`/api/users` → `/users`, `/api` → `/`).
pub fn strip(prefix: &str, path: &str) -> String {
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
    fn no_route_is_none() {
        let t = RouteTable::build("web", &[route(None, "/api", "api")], &HashMap::new());
        assert!(t.find(None, "/").is_none());
    }

    #[test]
    fn stripping() {
        assert_eq!(strip("/api", "/api/users"), "/users");
        assert_eq!(strip("/api", "/api"), "/");
        assert_eq!(strip("/api/", "/api/x"), "/x");
        assert_eq!(strip("/", "/x"), "/x");
    }
}
