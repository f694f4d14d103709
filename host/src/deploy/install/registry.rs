//! The live set of deployments: an immutable snapshot swapped atomically for
//! lock-free routing of every request, and a serialized writer side that
//! assigns generations and remembers rejections.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use anyhow::{Result, bail};
use arc_swap::ArcSwap;

use crate::deploy::Deployment;
use crate::deploy::router::RouteTable;

/// An immutable view of every deployed service at one moment.
#[derive(Default)]
pub struct Snapshot {
    routes: RouteTable<Arc<Deployment>>,
    services: BTreeMap<String, Arc<Deployment>>,
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
        if let Some(other) = old
            .services
            .values()
            .find(|d| d.name() != name && d.route() == deployment.route())
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
        let mut services = old.services.clone();
        let replaced = services.insert(name.clone(), deployment.clone());
        self.publish(services)?;
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
        let mut services = old.services.clone();
        services.insert(current.name().to_string(), deployment.clone());
        // The same routes as before: no conflict can arise.
        if let Err(err) = self.publish(services) {
            tracing::error!(error = %err, "route table rebuild failed after a tier swap");
            return None;
        }
        Some(deployment)
    }

    /// Removes a service. Requests already running finish on it.
    pub fn remove(&self, name: &str) -> Option<Arc<Deployment>> {
        let mut book = self.book();
        let old = self.current.load_full();
        let mut services = old.services.clone();
        let removed = services.remove(name)?;
        // Removing an entry cannot create a route conflict.
        if let Err(err) = self.publish(services) {
            tracing::error!(error = %err, "route table rebuild failed after removal");
        }
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

    fn publish(&self, services: BTreeMap<String, Arc<Deployment>>) -> Result<()> {
        let routes = RouteTable::new(services.values().map(|d| (d.route().clone(), d.clone())))
            .map_err(anyhow::Error::msg)?;
        self.current.store(Arc::new(Snapshot { routes, services }));
        self.changes.send_modify(|count| *count += 1);
        Ok(())
    }
}

/// Checks that `deployment`'s consumer groups take the same topics as the
/// other services in those groups: a group is one queue with one topic.
fn check_groups(current: &Snapshot, deployment: &Deployment) -> Result<()> {
    for (index, trigger) in deployment.config().triggers.messages.iter().enumerate() {
        for other in current.services.values() {
            if other.name() == deployment.name() {
                continue;
            }
            if other
                .config()
                .triggers
                .messages
                .iter()
                .any(|theirs| theirs.group() == trigger.group())
            {
                bail!(
                    "trigger.message[{index}].group: group {:?} belongs to service {:?}; a group is one service's, so choose another group",
                    trigger.group(),
                    other.name()
                );
            }
        }
    }
    Ok(())
}
