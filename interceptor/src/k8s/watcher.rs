//! [`PodWatcher`]: list+watch of this node's pods (kube-rs' watcher: relists after a lost or
//! expired watch, backs off on errors) into an in-memory cache that synchronous code can read
//! and wait on.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::oneshot;

use super::PodMeta;

type Key = (String, String);

#[derive(Default)]
struct Cache {
    /// Keyed by uid: a pod recreated under the same name (a StatefulSet's `web-0`) is another
    /// pod, and a caller that knows the uid must never get its predecessor.
    pods: HashMap<String, PodMeta>,
    /// (namespace, name) → the uid last seen under that name.
    names: HashMap<Key, String>,
    /// The objects of a (re)list in progress, swapped in whole when it completes.
    relist: Option<Vec<PodMeta>>,
    synced: bool,
    /// Bumped on every applied event: what waiters wait on.
    generation: u64,
}

impl Cache {
    fn insert(&mut self, meta: PodMeta) {
        let key = (meta.namespace.clone(), meta.name.clone());
        let uid = meta.uid.clone();
        if let Some(old) = self.names.insert(key, uid.clone()) {
            // The same name for a new pod (a StatefulSet's, recreated): the API holds one pod
            // per name, so the old one is gone even if its DELETED has not arrived yet.
            if old != uid {
                self.pods.remove(&old);
            }
        }
        self.pods.insert(uid, meta);
    }

    fn remove(&mut self, meta: &PodMeta) {
        // A late DELETED of an earlier pod of the same name leaves the new one alone.
        if self.pods.remove(&meta.uid).is_some() {
            let key = (meta.namespace.clone(), meta.name.clone());
            if self.names.get(&key) == Some(&meta.uid) {
                self.names.remove(&key);
            }
        }
    }

    fn by_name(&self, namespace: &str, name: &str) -> Option<&PodMeta> {
        let uid = self.names.get(&(namespace.to_string(), name.to_string()))?;
        self.pods.get(uid)
    }

    fn apply(&mut self, event: Event<Pod>) {
        let meta = |pod: &Pod| {
            let m = PodMeta::from_pod(pod);
            if m.is_none() {
                tracing::warn!(?pod.metadata.name, "pod without namespace, name or uid: ignored");
            }
            m
        };
        match event {
            Event::Apply(pod) => {
                if let Some(m) = meta(&pod) {
                    tracing::debug!(namespace = %m.namespace, name = %m.name, uid = %m.uid, "pod applied");
                    self.insert(m);
                }
            }
            Event::Delete(pod) => {
                if let Some(m) = meta(&pod) {
                    tracing::debug!(namespace = %m.namespace, name = %m.name, uid = %m.uid, "pod deleted");
                    self.remove(&m);
                }
            }
            Event::Init => self.relist = Some(Vec::new()),
            Event::InitApply(pod) => {
                if let Some(m) = meta(&pod) {
                    self.relist.get_or_insert_with(Vec::new).push(m);
                }
            }
            Event::InitDone => {
                // Pods absent from the new list were deleted while no watch was running.
                let listed = self.relist.take().unwrap_or_default();
                self.pods.clear();
                self.names.clear();
                let n = listed.len();
                for m in listed {
                    self.insert(m);
                }
                tracing::info!(pods = n, first = !self.synced, "pod list synced");
                self.synced = true;
            }
        }
        self.generation += 1;
    }
}

struct Shared {
    cache: Mutex<Cache>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the cache: keep serving.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Inner {
    shared: Arc<Shared>,
    node: String,
    /// For the writes repair makes ([`PodWatcher::label`], [`PodWatcher::delete`]), run on the
    /// watch's runtime (a client is bound to the runtime it was built on).
    client: Client,
    runtime: tokio::runtime::Handle,
    /// Dropped with the last handle: the watch task sees it and ends.
    _stop: oneshot::Sender<()>,
}

/// The pods of one node, as the API server reports them, kept current by a list+watch with
/// the field selector `spec.nodeName=<node>`. Cheap to clone; the watch stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct PodWatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PodWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodWatcher")
            .field("node", &self.inner.node)
            .field("synced", &self.is_synced())
            .field("pods", &self.len())
            .finish()
    }
}

impl PodWatcher {
    /// Starts watching `node`'s pods on a tokio runtime of its own, in a background thread
    /// (for synchronous callers such as the daemon). It takes a [`kube::Config`] rather than a
    /// [`Client`] because a client is bound to the runtime it was built on; see
    /// [`crate::k8s::ApiAccess::config`]. Returns at once: see [`Self::wait_synced`].
    pub fn start(config: kube::Config, node: impl Into<String>) -> Result<Self> {
        let node = node.into();
        ensure!(!node.is_empty(), "no node name to watch the pods of");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the pod watcher's runtime")?;
        let client = rt
            .block_on(async { Client::try_from(config) })
            .context("building the Kubernetes client")?;
        let (watcher, task) = Self::new(client, node, rt.handle().clone());
        std::thread::Builder::new()
            .name("pod-watcher".into())
            .spawn(move || rt.block_on(task))
            .context("starting the pod watcher's thread")?;
        Ok(watcher)
    }

    /// Starts watching `node`'s pods on the current tokio runtime (for async callers; panics
    /// outside a runtime, like `tokio::spawn`).
    pub fn spawn(client: Client, node: impl Into<String>) -> Self {
        let handle = tokio::runtime::Handle::current();
        let (watcher, task) = Self::new(client, node.into(), handle);
        tokio::spawn(task);
        watcher
    }

    fn new(
        client: Client,
        node: String,
        runtime: tokio::runtime::Handle,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let writer = client.clone();
        let shared = Arc::new(Shared {
            cache: Mutex::new(Cache::default()),
            changed: Condvar::new(),
        });
        let (stop, stopped) = oneshot::channel();
        let task = {
            let shared = shared.clone();
            let node = node.clone();
            async move {
                tokio::select! {
                    () = watch(client, node.clone(), shared) => {}
                    _ = stopped => tracing::debug!(%node, "pod watcher stopped"),
                }
            }
        };
        let inner = Arc::new(Inner {
            shared,
            node,
            client: writer,
            runtime,
            _stop: stop,
        });
        (Self { inner }, task)
    }

    /// The node whose pods are watched.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// A pod of this node by namespace and name (the one last seen under that name).
    pub fn get(&self, namespace: &str, name: &str) -> Option<PodMeta> {
        self.inner.shared.lock().by_name(namespace, name).cloned()
    }

    /// A pod of this node by uid.
    pub fn by_uid(&self, uid: &str) -> Option<PodMeta> {
        self.inner.shared.lock().pods.get(uid).cloned()
    }

    /// Every cached pod, ordered by (namespace, name).
    pub fn list(&self) -> Vec<PodMeta> {
        let cache = self.inner.shared.lock();
        let mut pods: Vec<PodMeta> = cache.pods.values().cloned().collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        pods
    }

    /// How many pods are cached.
    pub fn len(&self) -> usize {
        self.inner.shared.lock().pods.len()
    }

    /// No pod is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The initial list has completed (the cache stays synced across later relists).
    pub fn is_synced(&self) -> bool {
        self.inner.shared.lock().synced
    }

    /// A counter bumped by every event applied to the cache.
    pub fn generation(&self) -> u64 {
        self.inner.shared.lock().generation
    }

    /// Blocks until the cache has changed since `seen` (a [`Self::generation`]) or `timeout`
    /// has passed; returns the generation then.
    pub fn wait_changed(&self, seen: u64, timeout: Duration) -> u64 {
        let cache = self.inner.shared.lock();
        let (cache, _) = self
            .inner
            .shared
            .changed
            .wait_timeout_while(cache, timeout, |c| c.generation == seen)
            .unwrap_or_else(|e| e.into_inner());
        cache.generation
    }

    /// Blocks until `done(self)` holds (checked now and after every change) or `timeout` has
    /// passed; returns whether it held.
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.generation();
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.wait_changed(seen, left);
        }
    }

    /// Blocks until the initial list has completed; false after `timeout`.
    pub fn wait_synced(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, Self::is_synced)
    }

    /// A pod by namespace and name, waiting up to `timeout` for it to appear (a CNI ADD can
    /// come before the watch event of a pod just bound to this node).
    pub fn wait_for(&self, namespace: &str, name: &str, timeout: Duration) -> Option<PodMeta> {
        let mut found = None;
        self.wait_until(timeout, |w| {
            found = w.get(namespace, name);
            found.is_some()
        });
        found
    }

    /// The pod `namespace/name` with this `uid`, waiting up to `timeout` for it: a CNI ADD can
    /// come before the watch event, and for a pod recreated under the same name the cache can
    /// still hold its predecessor, whose annotations must never be taken for the new pod's.
    pub fn wait_for_uid(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        timeout: Duration,
    ) -> Lookup {
        let mut found = None;
        self.wait_until(timeout, |w| {
            found = w
                .by_uid(uid)
                .filter(|m| m.namespace == namespace && m.name == name);
            found.is_some()
        });
        match found {
            Some(m) => Lookup::Found(Box::new(m)),
            None => match self.get(namespace, name) {
                Some(other) => Lookup::OtherUid(other.uid),
                None => Lookup::Unknown,
            },
        }
    }
}

/// How long a write to the API may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl PodWatcher {
    /// Runs one request on the watch's runtime and waits for it (from a thread outside it).
    fn request<T: Send + 'static>(
        &self,
        what: String,
        fut: impl std::future::Future<Output = kube::Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(WRITE_TIMEOUT)
            .with_context(|| format!("{what}: no answer within {WRITE_TIMEOUT:?}"))?
            .with_context(|| what)
    }

    /// Sets a label on a pod (a JSON merge patch of `metadata.labels`; RBAC: `patch` on pods).
    pub fn label(&self, namespace: &str, name: &str, key: &str, value: &str) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), namespace);
        let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
        let name2 = name.to_string();
        self.request(format!("labelling pod {namespace}/{name}"), async move {
            api.patch(&name2, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        })?;
        Ok(())
    }

    /// Deletes a pod, only if it still has this uid (a precondition: never a pod recreated
    /// under the name). RBAC: `delete` on pods.
    pub fn delete(&self, namespace: &str, name: &str, uid: &str) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let name2 = name.to_string();
        self.request(format!("deleting pod {namespace}/{name}"), async move {
            api.delete(&name2, &params).await
        })?;
        Ok(())
    }
}

/// What [`PodWatcher::wait_for_uid`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The pod with that uid.
    Found(Box<PodMeta>),
    /// Only another pod of that name (this uid): the predecessor of a recreated pod, or the
    /// watch has not caught up.
    OtherUid(String),
    /// No pod of that name or uid.
    Unknown,
}

/// The watch loop: never ends by itself (the watcher retries with backoff after errors).
async fn watch(client: Client, node: String, shared: Arc<Shared>) {
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let config = watcher::Config::default().fields(&selector);
    tracing::info!(%node, "watching this node's pods");
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                shared.lock().apply(event);
                shared.changed.notify_all();
            }
            Err(e) => tracing::warn!(%node, error = %e, "pod watch failed; retrying with backoff"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": name, "uid": uid},
        }))
        .unwrap()
    }

    #[test]
    fn a_recreated_pod_replaces_the_old_uid_and_a_late_delete_keeps_it() {
        let mut c = Cache::default();
        c.apply(Event::Apply(pod("web-0", "old")));
        c.apply(Event::Apply(pod("web-0", "new")));
        assert_eq!(c.pods.len(), 1);
        assert_eq!(c.names.len(), 1);
        assert_eq!(c.names[&("ns".into(), "web-0".into())], "new");
        assert!(!c.pods.contains_key("old"));
        // DELETED of the old pod, seen after the new one: the new one stays.
        c.apply(Event::Delete(pod("web-0", "old")));
        assert_eq!(
            c.by_name("ns", "web-0").map(|p| p.uid.as_str()),
            Some("new")
        );
        c.apply(Event::Delete(pod("web-0", "new")));
        assert!(c.pods.is_empty() && c.names.is_empty());
        assert_eq!(c.generation, 4);
    }

    #[test]
    fn a_relist_replaces_the_cache_whole_when_done() {
        let mut c = Cache::default();
        c.apply(Event::Init);
        c.apply(Event::InitApply(pod("a", "1")));
        assert!(!c.synced && c.pods.is_empty(), "nothing before InitDone");
        c.apply(Event::InitDone);
        assert!(c.synced);
        assert_eq!(c.pods.len(), 1);
        // A relist: served from the old cache until it completes.
        c.apply(Event::Init);
        c.apply(Event::InitApply(pod("b", "2")));
        assert!(c.by_name("ns", "a").is_some());
        c.apply(Event::InitDone);
        let names: Vec<&str> = c.names.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(c.pods.keys().collect::<Vec<_>>(), ["2"]);
    }

    #[test]
    fn objects_without_identity_are_ignored() {
        let mut c = Cache::default();
        let nameless: Pod = serde_json::from_value(serde_json::json!({"metadata": {}})).unwrap();
        c.apply(Event::Apply(nameless));
        assert!(c.pods.is_empty());
    }
}
