//! The live set of deployments: an immutable snapshot swapped atomically for
//! lock-free routing of every request, and a serialized writer side that
//! assigns generations and remembers rejections.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use anyhow::{Result, bail};
use arc_swap::ArcSwap;

use crate::deploy::Deployment;
use crate::deploy::router::{Route, RouteTable};

/// An immutable view of every deployed service at one moment. Its maps are
/// persistent: the next snapshot shares all but what changed, so a deploy
/// costs the same among ten thousand services as among ten.
#[derive(Default)]
pub struct Snapshot {
    routes: RouteTable<Arc<Deployment>>,
    services: imbl::OrdMap<String, Arc<Deployment>>,
    /// Each consumer group named by a message trigger, and its service.
    groups: imbl::HashMap<String, String>,
    /// The services with message triggers or schedules, by name.
    triggered: imbl::OrdMap<String, Arc<Deployment>>,
}

impl Snapshot {
    /// The deployment serving `path`, and the path it sees.
    pub fn route<'p>(&self, path: &'p str) -> Option<(&Arc<Deployment>, &'p str)> {
        self.routes.lookup(path).map(|m| (m.target, m.rest))
    }

    /// The current deployment of service `name`.
    pub fn service(&self, name: &str) -> Option<&Arc<Deployment>> {
        self.services.get(name)
    }

    /// The deployment mounted at exactly `route`, if any.
    pub fn route_owner(&self, route: &Route) -> Option<&Arc<Deployment>> {
        self.routes.owner(route)
    }

    /// The service a `NAME.internal` host name calls. Host names are
    /// case-insensitive (and arrive lower-cased), so `users` finds a service
    /// named `Users` when there is no `users`.
    pub fn service_by_host_label(&self, label: &str) -> Option<&Arc<Deployment>> {
        self.services.get(label).or_else(|| {
            self.services
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(label))
                .map(|(_, deployment)| deployment)
        })
    }

    /// Every deployment, by name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.services.values()
    }

    /// The deployments with message triggers or schedules, by name: what
    /// the trigger runner follows, without walking every service.
    pub fn triggered(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.triggered.values()
    }

    /// How many services are deployed.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether no service is deployed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// Why the newest version of a service was not deployed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason, one line.
    pub reason: String,
    /// When it was rejected.
    pub at: SystemTime,
}

/// Writer-side bookkeeping, guarded by one lock.
#[derive(Default)]
struct Book {
    /// Last generation handed out per name; never reused, even after a
    /// removal, so a generation always identifies one version.
    generations: HashMap<String, u64>,
    /// The last rejection per name, cleared by the next successful deploy.
    rejections: HashMap<String, Rejection>,
}

/// The registry of live deployments.
pub struct Registry {
    current: ArcSwap<Snapshot>,
    book: Mutex<Book>,
    /// Counts the snapshots published, for those who follow changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            current: ArcSwap::default(),
            book: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// A receiver that sees a new value whenever the set of deployments
    /// changes (a deploy, replacement or removal).
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The current snapshot; cheap, lock-free, for the request path.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot, owned.
    pub fn snapshot_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // The book is plain data, consistent between statements; a panic
        // elsewhere while holding the lock does not corrupt it.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs a new version of a service, replacing the current one. The
    /// swap is atomic: requests already running keep the old version.
    /// Fails — changing nothing — if another service already has the route.
    /// Returns the installed deployment and the one it replaced.
    pub fn install(
        &self,
        mut deployment: Deployment,
    ) -> Result<(Arc<Deployment>, Option<Arc<Deployment>>)> {
        let mut book = self.book();
        let old = self.current.load_full();
        let name = deployment.name().to_string();
        if let Some(other) = old.route_owner(deployment.route())
            && other.name() != name
        {
            bail!(
                "route {} is already served by service {:?}",
                deployment.route(),
                other.name()
            );
        }
        check_groups(&old, &deployment)?;
        let generation = book.generations.entry(name.clone()).or_insert(0);
        *generation += 1;
        deployment.set_generation(*generation);
        let deployment = Arc::new(deployment);
        let replaced = old.services.get(&name).cloned();
        let next = old.with(deployment.clone(), replaced.as_deref())?;
        self.publish(next);
        book.rejections.remove(&name);
        Ok((deployment, replaced))
    }

    /// Replaces `current` — still the serving version of its service — by
    /// `deployment`, the same version compiled by another tier, keeping its
    /// generation. The swap is atomic: requests already running finish on
    /// `current`. Returns `None`, changing nothing, if a newer version or a
    /// removal replaced `current` meanwhile.
    pub fn replace_tier(
        &self,
        mut deployment: Deployment,
        current: &Arc<Deployment>,
    ) -> Option<Arc<Deployment>> {
        let _book = self.book();
        let old = self.current.load_full();
        let serving = old.services.get(current.name())?;
        if !Arc::ptr_eq(serving, current) {
            return None;
        }
        deployment.set_generation(current.generation());
        let deployment = Arc::new(deployment);
        // The same route and groups as before: no conflict can arise.
        match old.with(deployment.clone(), Some(current)) {
            Ok(next) => self.publish(next),
            Err(err) => {
                tracing::error!(error = %err, "route table update failed after a tier swap");
                return None;
            }
        }
        Some(deployment)
    }

    /// Removes a service. Requests already running finish on it.
    pub fn remove(&self, name: &str) -> Option<Arc<Deployment>> {
        let mut book = self.book();
        let old = self.current.load_full();
        let removed = old.services.get(name).cloned()?;
        self.publish(old.without(&removed));
        book.rejections.remove(name);
        Some(removed)
    }

    /// Records that the newest version of `name` was rejected.
    pub fn record_rejection(&self, name: &str, reason: String) {
        self.book().rejections.insert(
            name.to_string(),
            Rejection {
                reason,
                at: SystemTime::now(),
            },
        );
    }

    /// Forgets a rejection (the offending file went away).
    pub fn clear_rejection(&self, name: &str) {
        self.book().rejections.remove(name);
    }

    /// The last rejection of `name`, if its newest version was rejected.
    pub fn rejection(&self, name: &str) -> Option<Rejection> {
        self.book().rejections.get(name).cloned()
    }

    /// All current rejections, by name.
    pub fn rejections(&self) -> BTreeMap<String, Rejection> {
        self.book()
            .rejections
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn publish(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
        self.changes.send_modify(|count| *count += 1);
    }
}

impl Snapshot {
    /// This snapshot with `deployment` in, taking over from `replaced` (the
    /// service's current deployment, if any): its route and its groups.
    fn with(&self, deployment: Arc<Deployment>, replaced: Option<&Deployment>) -> Result<Snapshot> {
        let name = deployment.name().to_string();
        let mut routes = self.routes.clone();
        let mut groups = self.groups.clone();
        if let Some(replaced) = replaced {
            if replaced.route() != deployment.route() {
                routes = routes.without_route(replaced.route());
            }
            for group in groups_of(replaced) {
                groups.remove(group);
            }
        }
        let routes = routes
            .with_route(deployment.route().clone(), deployment.clone(), |current| {
                current.name() == name
            })
            .map_err(anyhow::Error::msg)?;
        for group in groups_of(&deployment) {
            groups.insert(group.to_string(), name.clone());
        }
        let triggered = if has_triggers(&deployment) {
            self.triggered.update(name.clone(), deployment.clone())
        } else {
            self.triggered.without(&name)
        };
        Ok(Snapshot {
            routes,
            services: self.services.update(name, deployment),
            groups,
            triggered,
        })
    }

    /// This snapshot without `removed`, its route and its groups.
    fn without(&self, removed: &Deployment) -> Snapshot {
        let mut groups = self.groups.clone();
        for group in groups_of(removed) {
            groups.remove(group);
        }
        Snapshot {
            routes: self.routes.without_route(removed.route()),
            services: self.services.without(removed.name()),
            groups,
            triggered: self.triggered.without(removed.name()),
        }
    }
}

/// Whether `deployment` runs on messages or on a clock.
fn has_triggers(deployment: &Deployment) -> bool {
    let triggers = &deployment.config().triggers;
    !triggers.messages.is_empty() || !triggers.schedules.is_empty()
}

/// The consumer groups `deployment`'s message triggers join.
fn groups_of(deployment: &Deployment) -> impl Iterator<Item = &str> {
    deployment
        .config()
        .triggers
        .messages
        .iter()
        .map(|trigger| trigger.group())
}

/// Checks that none of `deployment`'s consumer groups belongs to another
/// service: a group is one service's queue.
fn check_groups(current: &Snapshot, deployment: &Deployment) -> Result<()> {
    for (index, trigger) in deployment.config().triggers.messages.iter().enumerate() {
        if let Some(owner) = current.groups.get(trigger.group())
            && owner != deployment.name()
        {
            bail!(
                "trigger.message[{index}].group: group {:?} belongs to service {:?}; a group is one service's, so choose another group",
                trigger.group(),
                owner
            );
        }
    }
    Ok(())
}
