//! Pure request routing: which mounted route a request path belongs to, and
//! the path the service sees once the mount prefix is removed.
//!
//! A route is a prefix such as `/orders` or `/api/orders`. It matches the path
//! equal to it and every path below it (`/orders/42`), never a sibling that
//! merely starts with the same letters (`/ordersx`). The longest matching route
//! wins, so `/api/orders` is preferred to `/api` for `/api/orders/1`. The route
//! `/` matches everything that no other route claims.

/// A validated mount point: starts with `/`, has no trailing `/` (except the
/// root route itself), no empty, `.` or `..` segments, no query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route(String);

impl Route {
    /// Parses a route, explaining what is wrong with a bad one.
    pub fn parse(route: &str) -> Result<Route, String> {
        if !route.starts_with('/') {
            return Err(format!("route {route:?} must start with \"/\""));
        }
        if route.contains(['?', '#']) {
            return Err(format!(
                "route {route:?} must be a path, without query or fragment"
            ));
        }
        if let Some(bad) = route.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("route {route:?} contains the character {bad:?}"));
        }
        let trimmed = route.trim_end_matches('/');
        if trimmed.is_empty() {
            return Ok(Route("/".to_string()));
        }
        if trimmed[1..]
            .split('/')
            .any(|segment| segment.is_empty() || segment == "." || segment == "..")
        {
            return Err(format!(
                "route {route:?} has an empty, \".\" or \"..\" segment"
            ));
        }
        Ok(Route(trimmed.to_string()))
    }

    /// The default route of a service: `/NAME`.
    pub fn for_service(name: &str) -> Route {
        Route(format!("/{name}"))
    }

    /// The route as text, e.g. `/orders`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first path segment (`api` for `/api/orders`), empty for `/`.
    fn first_segment(&self) -> &str {
        first_segment(&self.0)
    }

    /// If `path` is this route or below it, the rest of the path as the
    /// mounted service sees it (always starting with `/`).
    pub fn strip<'p>(&self, path: &'p str) -> Option<&'p str> {
        if self.0 == "/" {
            return match path {
                "" => Some("/"),
                _ if path.starts_with('/') => Some(path),
                // "*" (OPTIONS *) and other non-paths are nobody's.
                _ => None,
            };
        }
        let rest = path.strip_prefix(self.0.as_str())?;
        if rest.is_empty() {
            Some("/")
        } else if rest.starts_with('/') {
            Some(rest)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn first_segment(path: &str) -> &str {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split('/').next().unwrap_or_default()
}

/// A match: the routed target and the path the target sees.
#[derive(Debug, PartialEq, Eq)]
pub struct Matched<'r, 'p, T> {
    /// The route that matched.
    pub route: &'r Route,
    /// The value registered for the route.
    pub target: &'r T,
    /// The request path with the route prefix removed; starts with `/`.
    pub rest: &'p str,
}

/// An immutable routing table from routes to targets. Lookups allocate
/// nothing: the table is indexed by first path segment, and each bucket is
/// ordered longest route first. It is persistent: a table with one route
/// more or less shares everything else with the one it came from, so a
/// change costs the size of one bucket, not of the table (ten thousand
/// services start in linear time).
#[derive(Debug, Clone)]
pub struct RouteTable<T: Clone> {
    by_segment: imbl::HashMap<String, Vec<(Route, T)>>,
    root: Option<(Route, T)>,
}

impl<T: Clone> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            by_segment: imbl::HashMap::new(),
            root: None,
        }
    }
}

impl<T: Clone> RouteTable<T> {
    /// Builds a table. Two entries for the same route are an error naming it.
    #[cfg(test)]
    pub fn new(entries: impl IntoIterator<Item = (Route, T)>) -> Result<Self, String> {
        entries
            .into_iter()
            .try_fold(RouteTable::default(), |table, (route, target)| {
                table.with_route(route, target, |_| false)
            })
    }

    /// The target mounted at exactly `route`, if any.
    pub fn owner(&self, route: &Route) -> Option<&T> {
        if route.as_str() == "/" {
            return self.root.as_ref().map(|(_, target)| target);
        }
        self.by_segment
            .get(route.first_segment())?
            .iter()
            .find(|(existing, _)| existing == route)
            .map(|(_, target)| target)
    }

    /// This table with `target` mounted at `route`. A route already mounted
    /// is an error naming it, unless `replaces` says its target is the one
    /// `target` takes over from.
    pub fn with_route(
        &self,
        route: Route,
        target: T,
        replaces: impl Fn(&T) -> bool,
    ) -> Result<Self, String> {
        let mut table = self.clone();
        if route.as_str() == "/" {
            if let Some((_, current)) = &table.root
                && !replaces(current)
            {
                return Err("route \"/\" is mounted twice".to_string());
            }
            table.root = Some((route, target));
            return Ok(table);
        }
        let bucket = table
            .by_segment
            .entry(route.first_segment().to_string())
            .or_default();
        match bucket.iter().position(|(existing, _)| *existing == route) {
            Some(at) if replaces(&bucket[at].1) => bucket[at].1 = target,
            Some(_) => return Err(format!("route {route:?} is mounted twice")),
            None => {
                bucket.push((route, target));
                bucket.sort_by_key(|(route, _)| std::cmp::Reverse(route.as_str().len()));
            }
        }
        Ok(table)
    }

    /// This table without whatever is mounted at `route`.
    pub fn without_route(&self, route: &Route) -> Self {
        let mut table = self.clone();
        if route.as_str() == "/" {
            table.root = None;
            return table;
        }
        let segment = route.first_segment();
        if let Some(bucket) = table.by_segment.get_mut(segment) {
            bucket.retain(|(existing, _)| existing != route);
            if bucket.is_empty() {
                table.by_segment.remove(segment);
            }
        }
        table
    }

    /// Finds the longest route that `path` is at or below.
    pub fn lookup<'r, 'p>(&'r self, path: &'p str) -> Option<Matched<'r, 'p, T>> {
        let found = self
            .by_segment
            .get(first_segment(path))
            .and_then(|bucket| {
                bucket
                    .iter()
                    .find_map(|(route, target)| Some((route, target, route.strip(path)?)))
            })
            .or_else(|| {
                let (route, target) = self.root.as_ref()?;
                Some((route, target, route.strip(path)?))
            });
        found.map(|(route, target, rest)| Matched {
            route,
            target,
            rest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[&str]) -> RouteTable<String> {
        RouteTable::new(
            routes
                .iter()
                .map(|r| (Route::parse(r).unwrap(), r.to_string())),
        )
        .unwrap()
    }

    fn route_of(table: &RouteTable<String>, path: &str) -> Option<(String, String)> {
        table
            .lookup(path)
            .map(|m| (m.target.clone(), m.rest.to_string()))
    }

    #[test]
    fn exact_and_nested_paths_are_stripped() {
        let t = table(&["/hello"]);
        assert_eq!(route_of(&t, "/hello"), Some(("/hello".into(), "/".into())));
        assert_eq!(route_of(&t, "/hello/"), Some(("/hello".into(), "/".into())));
        assert_eq!(
            route_of(&t, "/hello/a/b"),
            Some(("/hello".into(), "/a/b".into()))
        );
    }

    #[test]
    fn a_changed_table_leaves_the_old_one_as_it_was() {
        let route = |r: &str| Route::parse(r).unwrap();
        let old = table(&["/a", "/b"]);
        let new = old
            .with_route(route("/a/deeper"), "deeper".to_string(), |_| false)
            .unwrap()
            .without_route(&route("/b"));
        assert_eq!(route_of(&old, "/b/x"), Some(("/b".into(), "/x".into())));
        assert_eq!(
            route_of(&old, "/a/deeper"),
            Some(("/a".into(), "/deeper".into()))
        );
        assert_eq!(route_of(&new, "/b/x"), None);
        assert_eq!(
            route_of(&new, "/a/deeper/1"),
            Some(("deeper".into(), "/1".into()))
        );
        assert_eq!(new.owner(&route("/a")).map(String::as_str), Some("/a"));
        // A mounted route is taken over only from the target it replaces.
        assert!(
            new.with_route(route("/a"), "other".into(), |_| false)
                .is_err()
        );
        let taken = new
            .with_route(route("/a"), "next".into(), |current| current == "/a")
            .unwrap();
        assert_eq!(route_of(&taken, "/a"), Some(("next".into(), "/".into())));
    }

    #[test]
    fn sibling_with_same_prefix_does_not_match() {
        let t = table(&["/hello"]);
        assert_eq!(route_of(&t, "/helloworld"), None);
        assert_eq!(route_of(&t, "/hell"), None);
        assert_eq!(route_of(&t, "/"), None);
        assert_eq!(route_of(&t, ""), None);
    }

    #[test]
    fn longest_route_wins() {
        let t = table(&["/api", "/api/orders", "/api/orders/v2"]);
        assert_eq!(
            route_of(&t, "/api/orders/1"),
            Some(("/api/orders".into(), "/1".into()))
        );
        assert_eq!(
            route_of(&t, "/api/orders/v2/x"),
            Some(("/api/orders/v2".into(), "/x".into()))
        );
        assert_eq!(
            route_of(&t, "/api/users"),
            Some(("/api".into(), "/users".into()))
        );
    }

    #[test]
    fn root_route_is_the_fallback() {
        let t = table(&["/", "/hello"]);
        assert_eq!(
            route_of(&t, "/hello/x"),
            Some(("/hello".into(), "/x".into()))
        );
        assert_eq!(route_of(&t, "/other"), Some(("/".into(), "/other".into())));
        assert_eq!(route_of(&t, "/"), Some(("/".into(), "/".into())));
        // A bucket exists for "hello", but "/hellox" is not under "/hello".
        assert_eq!(
            route_of(&t, "/hellox"),
            Some(("/".into(), "/hellox".into()))
        );
    }

    #[test]
    fn duplicate_routes_are_rejected() {
        let routes = [
            (Route::parse("/a").unwrap(), 1),
            (Route::parse("/a/").unwrap(), 2),
        ];
        let err = RouteTable::new(routes).unwrap_err();
        assert!(err.contains("\"/a\""), "{err}");
    }

    #[test]
    fn route_parsing_normalises_and_rejects() {
        assert_eq!(Route::parse("/a/b/").unwrap().as_str(), "/a/b");
        assert_eq!(Route::parse("///").unwrap().as_str(), "/");
        assert!(Route::parse("a").unwrap_err().contains("must start with"));
        assert!(Route::parse("/a?x").is_err());
        assert!(Route::parse("/a//b").is_err());
        assert!(Route::parse("/a/../b").is_err());
        assert!(Route::parse("/a b").is_err());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Paths and routes drawn from a small alphabet, so they collide often.
    fn pathish() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[/a-c.?#% ]{0,12}").expect("valid regex")
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_normalises(text in any::<String>()) {
            if let Ok(route) = Route::parse(&text) {
                prop_assert!(route.as_str().starts_with('/'));
                prop_assert!(route.as_str() == "/" || !route.as_str().ends_with('/'));
                prop_assert_eq!(Route::parse(route.as_str()).ok(), Some(route.clone()));
            }
        }

        #[test]
        fn lookup_returns_the_longest_route_that_really_contains_the_path(
            routes in proptest::collection::vec(pathish(), 0..8),
            path in pathish(),
        ) {
            let mut parsed: Vec<Route> = routes.iter().filter_map(|r| Route::parse(r).ok()).collect();
            parsed.sort();
            parsed.dedup();
            let table = RouteTable::new(parsed.iter().map(|r| (r.clone(), r.clone()))).unwrap();
            let matching: Vec<&Route> = parsed.iter().filter(|r| r.strip(&path).is_some()).collect();
            match table.lookup(&path) {
                None => prop_assert!(matching.is_empty(), "{:?} missed {:?}", path, matching),
                Some(found) => {
                    prop_assert!(found.rest.starts_with('/'));
                    prop_assert_eq!(found.route, found.target);
                    prop_assert_eq!(found.route.strip(&path), Some(found.rest));
                    let longest = matching.iter().map(|r| r.as_str().len()).max().unwrap_or(0);
                    prop_assert_eq!(found.route.as_str().len(), longest);
                }
            }
        }
    }
}
