//! Replicas converge on a shared prefix store.
//!
//! With `--prefixes s3://…` the store is the source of truth and the local folder is a cache:
//! admin uploads and deletes write the store first, then the cache and the map; every replica
//! lists the store every `--sync-interval` and makes its map agree — new and changed objects are
//! fetched (a few at a time), validated exactly like an upload, written to the cache and swapped
//! in; objects gone from the store are dropped. No coordination between replicas is needed: each
//! converges on the store alone.
//!
//! What a pass compares. The manifest maps each task to the store's tag (ETag) of the object it
//! was loaded from and the content hash (`Task::version`) of what is served. A pass takes a
//! snapshot of it first, then lists; a change is applied only if the task's manifest entry is
//! still the snapshot's when the swap happens. So an upload or delete made on this replica while
//! a pass was running (which changes the entry) always wins over the pass's older view, and the
//! next pass settles anything left over.
//!
//! What can go wrong, and what stays serving. A store that is down or refuses us fails the pass:
//! nothing is dropped, the status says stale (metrics, `/v1/tasks`), the next pass retries. A bad
//! object (not a prefix file, wrong model, too large) is logged and counted once per version and
//! not fetched again until it changes; the version loaded before keeps serving. The manifest is
//! kept in the cache folder, so a replica restarted while the store is unreachable serves what it
//! had, and one restarted while the store is up fetches only what changed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::store::{Listed, PrefixStore, StoreError};
use super::{disk, LoadOrigin, Registry, RegistryError};
use crate::engine::Task;
use crate::prefix::{write_atomic, PrefixError, PrefixFile};

/// Objects fetched at once during a pass.
const FETCH_CONCURRENCY: usize = 8;
const MANIFEST_FILE: &str = ".store-manifest.json";

/// What a task was loaded from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Entry {
    /// The store's tag of the object.
    tag: String,
    /// `Task::version` of its content.
    version: String,
}

#[derive(Serialize, Deserialize)]
struct ManifestFile {
    url: String,
    tasks: HashMap<String, Entry>,
}

/// How the last passes went, as `/v1/tasks`, `/info` and the metrics report it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoreStatus {
    /// The store's URL.
    pub url: String,
    /// True when the last pass failed or none succeeded lately: what is served may be behind.
    pub stale: bool,
    /// End of the last successful pass (RFC 3339), if any.
    pub last_sync: Option<String>,
    /// Why the last pass failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds between passes.
    pub sync_interval_s: f64,
}

#[derive(Default)]
struct PassState {
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
    passes: u64,
}

/// The store side of a registry.
pub(super) struct Remote {
    pub(super) store: PrefixStore,
    /// The server's runtime: uploads (on blocking threads) reach the store through it.
    handle: tokio::runtime::Handle,
    interval: Duration,
    manifest: Mutex<HashMap<String, Entry>>,
    manifest_dirty: AtomicBool,
    /// Object versions found bad, so they are reported and fetched once, not every pass.
    rejected: Mutex<HashMap<String, String>>,
    /// Keys that cannot name a task, reported once.
    bad_keys: Mutex<HashSet<String>>,
    state: Mutex<PassState>,
    cache_dir: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Remote {
    pub(super) fn new(
        store: PrefixStore,
        handle: tokio::runtime::Handle,
        interval: Duration,
        cache_dir: PathBuf,
    ) -> Self {
        Self {
            store,
            handle,
            interval,
            manifest: Mutex::new(HashMap::new()),
            manifest_dirty: AtomicBool::new(false),
            rejected: Mutex::new(HashMap::new()),
            bad_keys: Mutex::new(HashSet::new()),
            state: Mutex::new(PassState::default()),
            cache_dir,
        }
    }

    /// Reads the manifest the last run left, keeping the entries of tasks the cache holds; a pass
    /// trusts an entry only while its content hash matches the cached file's.
    pub(super) fn restore_manifest(&self, cached: &HashSet<String>) {
        let path = self.cache_dir.join(MANIFEST_FILE);
        let Ok(text) = std::fs::read(&path) else {
            return;
        };
        match serde_json::from_slice::<ManifestFile>(&text) {
            Ok(file) if file.url == self.store.url() => {
                let mut kept = lock(&self.manifest);
                for (name, entry) in file.tasks {
                    if cached.contains(&name) {
                        kept.insert(name, entry);
                    }
                }
            }
            Ok(file) => tracing::warn!(
                cache = %self.cache_dir.display(), was = %file.url, now = %self.store.url(),
                "the prefix cache was filled from another store; its files are served only until the first sync"
            ),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable store manifest; the cache will be fetched again")
            }
        }
    }

    fn entry(&self, name: &str) -> Option<Entry> {
        lock(&self.manifest).get(name).cloned()
    }

    fn set_entry(&self, name: &str, entry: Option<Entry>) {
        let mut manifest = lock(&self.manifest);
        match entry {
            Some(e) => manifest.insert(name.to_string(), e),
            None => manifest.remove(name),
        };
        self.manifest_dirty.store(true, Ordering::Relaxed);
    }

    fn save_manifest(&self) {
        if !self.manifest_dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let file = ManifestFile {
            url: self.store.url().to_string(),
            tasks: lock(&self.manifest).clone(),
        };
        let json = serde_json::to_vec(&file).unwrap_or_default();
        if let Err(e) = write_atomic(&self.cache_dir.join(MANIFEST_FILE), &json) {
            self.manifest_dirty.store(true, Ordering::Relaxed);
            tracing::warn!(error = %e, "cannot save the store manifest; a restart fetches more");
        }
    }

    /// Runs a store operation from a blocking thread (an upload's or a delete's).
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.handle.block_on(f)
    }

    pub(super) fn status(&self) -> StoreStatus {
        let state = lock(&self.state);
        // Behind by more than three passes (a pass that hangs is bounded by the store timeouts,
        // but a silent failure to run at all should still show).
        let late = state
            .last_ok
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age > self.interval * 3 + Duration::from_secs(60));
        StoreStatus {
            url: self.store.url().to_string(),
            stale: state.last_error.is_some() || late,
            last_sync: state
                .last_ok
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            error: state.last_error.clone(),
            sync_interval_s: self.interval.as_secs_f64(),
        }
    }

    /// Whether at least one pass has finished (successfully or not).
    pub(super) fn synced_once(&self) -> bool {
        lock(&self.state).passes > 0
    }
}

/// Stops the sync loop when dropped.
pub struct SyncGuard {
    task: tokio::task::AbortHandle,
}

impl Drop for SyncGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub loaded: usize,
    pub removed: usize,
    pub rejected: usize,
}

impl Registry {
    fn remote_or_panic(&self) -> &Remote {
        self.shared
            .remote
            .as_ref()
            .expect("sync is only started on a registry with a store")
    }

    /// The store's status, if this registry has one.
    pub fn store_status(&self) -> Option<StoreStatus> {
        self.shared.remote.as_ref().map(Remote::status)
    }

    /// Ready to serve as far as the prefixes go: no store, or its first pass has finished (so a
    /// new replica does not take traffic with an empty cache while the store is up).
    pub fn synced(&self) -> bool {
        self.shared.remote.as_ref().is_none_or(Remote::synced_once)
    }

    /// Starts syncing with the store: a pass now, then one every interval, until the guard is
    /// dropped. Must be called from within the server's runtime.
    pub fn start_sync(&self) -> SyncGuard {
        let registry = self.clone();
        let interval = self.remote_or_panic().interval;
        let task = tokio::spawn(async move {
            loop {
                let _ = registry.sync_once().await; // logged and counted inside
                tokio::time::sleep(interval).await;
            }
        });
        SyncGuard {
            task: task.abort_handle(),
        }
    }

    /// One pass: list, fetch what changed, drop what is gone. Returns what it did, or why the
    /// store could not be read (then nothing was dropped).
    pub async fn sync_once(&self) -> Result<PassReport, StoreError> {
        let remote = self.remote_or_panic();
        let started = Instant::now();
        let result = self.pass().await;
        let previous_error = {
            let mut state = lock(&remote.state);
            state.passes += 1;
            match &result {
                Ok(_) => {
                    state.last_ok = Some(SystemTime::now());
                    state.last_error.take()
                }
                Err(e) => state.last_error.replace(e.to_string()),
            }
        };
        // A store that stays down is logged when it goes down and when
        // it comes back, not at every pass.
        match &result {
            Ok(r) => {
                if previous_error.is_some() {
                    tracing::info!(store = %remote.store.url(), "prefix store reachable again");
                }
                if *r != PassReport::default() {
                    tracing::info!(
                        loaded = r.loaded,
                        removed = r.removed,
                        rejected = r.rejected,
                        tasks = self.len(),
                        seconds = started.elapsed().as_secs_f64(),
                        "prefix store synced"
                    );
                }
            }
            Err(e) if previous_error.is_none() => {
                tracing::warn!(error = %e, store = %remote.store.url(), "prefix store sync failed; serving what is loaded, retrying every interval")
            }
            Err(e) => tracing::debug!(error = %e, "prefix store sync failed again"),
        }
        if let Some(o) = &self.shared.observer {
            o.store_sync(&remote.status(), started.elapsed());
        }
        let registry = self.clone();
        let _ =
            tokio::task::spawn_blocking(move || registry.remote_or_panic().save_manifest()).await;
        result
    }

    async fn pass(&self) -> Result<PassReport, StoreError> {
        let remote = self.remote_or_panic();
        let snapshot = lock(&remote.manifest).clone();
        let listing = remote.store.list().await?;
        {
            let mut reported = lock(&remote.bad_keys);
            for key in &listing.bad_names {
                if !reported.contains(key) {
                    tracing::warn!(key = %key, "store object skipped: its name is not a valid task name");
                }
            }
            *reported = listing.bad_names.iter().cloned().collect();
        }
        let max = self.shared.max_file_bytes as u64;
        let mut report = PassReport::default();
        // Deciding what changed may hash cached files never loaded (after a restart): off the
        // async workers.
        let registry = self.clone();
        let listed = listing.tasks.clone();
        let snap = snapshot.clone();
        let todo = tokio::task::spawn_blocking(move || registry.changed(&listed, &snap))
            .await
            .unwrap_or_default();
        let mut fetches = tokio::task::JoinSet::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(FETCH_CONCURRENCY));
        let mut first_error = None;
        for listed in todo {
            if listed.size > max {
                let why = format!("{} bytes, over the limit of {max}", listed.size);
                self.reject(&listed.task, &listed.tag, &why);
                report.rejected += 1;
                continue;
            }
            let expect = snapshot.get(&listed.task).cloned();
            let (registry, slots) = (self.clone(), slots.clone());
            fetches.spawn(async move {
                let _slot = slots.acquire_owned().await;
                registry.fetch(listed, expect, max).await
            });
        }
        while let Some(done) = fetches.join_next().await {
            match done {
                Ok(Ok(Fetched::Loaded)) => report.loaded += 1,
                Ok(Ok(Fetched::Rejected)) => report.rejected += 1,
                Ok(Ok(Fetched::Unchanged)) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => tracing::error!(error = %e, "a prefix fetch panicked"),
            }
        }
        // Tasks gone from the store (only known from a complete listing).
        let listed: HashSet<&str> = listing.tasks.iter().map(|l| l.task.as_str()).collect();
        let gone: Vec<String> = self
            .read()
            .keys()
            .filter(|name| !listed.contains(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if self.drop_if_unchanged(&name, snapshot.get(&name)) {
                report.removed += 1;
            }
        }
        lock(&remote.rejected).retain(|name, _| listed.contains(name.as_str()));
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// The listed objects that differ from what is served (and were not found bad before).
    fn changed(&self, listed: &[Listed], snapshot: &HashMap<String, Entry>) -> Vec<Listed> {
        let remote = self.remote_or_panic();
        listed
            .iter()
            .filter(|l| {
                let current = snapshot.get(&l.task).is_some_and(|e| {
                    e.tag == l.tag && self.version(&l.task).as_ref() == Some(&e.version)
                });
                !current && lock(&remote.rejected).get(&l.task) != Some(&l.tag)
            })
            .cloned()
            .collect()
    }

    async fn fetch(
        &self,
        listed: Listed,
        expect: Option<Entry>,
        max: u64,
    ) -> Result<Fetched, StoreError> {
        let remote = self.remote_or_panic();
        let (bytes, tag) = match remote.store.get(&listed.task, max).await {
            Ok(got) => got,
            // Deleted since the listing: the next pass sees it gone.
            Err(StoreError::Store(object_store::Error::NotFound { .. })) => {
                return Ok(Fetched::Unchanged)
            }
            Err(StoreError::TooLarge { size, max, .. }) => {
                let why = format!("{size} bytes, over the limit of {max}");
                self.reject(&listed.task, &listed.tag, &why);
                return Ok(Fetched::Rejected);
            }
            Err(e) => return Err(e),
        };
        let registry = self.clone();
        let name = listed.task.clone();
        let adopted =
            tokio::task::spawn_blocking(move || registry.adopt(&name, bytes, tag, expect.as_ref()))
                .await;
        let why = match adopted {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("validation panicked: {e}"),
        };
        self.reject(&listed.task, &listed.tag, &why);
        Ok(Fetched::Rejected)
    }

    /// Validates an object's bytes like an upload and swaps them in, unless this replica changed
    /// the task since the pass began.
    fn adopt(
        &self,
        name: &str,
        bytes: Bytes,
        tag: String,
        expect: Option<&Entry>,
    ) -> Result<Fetched, PrefixError> {
        let remote = self.remote_or_panic();
        let version = Task::version_of(&bytes);
        let entry = Entry {
            tag,
            version: version.clone(),
        };
        if self.known_version(name).as_ref() == Some(&version) {
            // Same content under a new tag (a re-upload of the same file, or a cache restored
            // without its manifest): only the record changes.
            let _guard = self.lock_writes();
            if remote.entry(name).as_ref() == expect {
                remote.set_entry(name, Some(entry));
            }
            return Ok(Fetched::Unchanged);
        }
        let mut file = PrefixFile::from_bytes(&bytes)?;
        file.meta.task = name.to_string();
        let task = Task::with_version(&file, self.model(), version, bytes.len())?;
        drop(file);
        let _guard = self.lock_writes();
        if remote.entry(name).as_ref() != expect {
            return Ok(Fetched::Unchanged); // an upload or delete here won; the next pass checks
        }
        self.install_cached(name, &bytes, Arc::new(task), entry);
        tracing::info!(task = %name, origin = "store", "task loaded");
        self.observe_load(LoadOrigin::Store, true);
        Ok(Fetched::Loaded)
    }

    /// Logs and counts a bad object version once; what was serving stays.
    fn reject(&self, name: &str, tag: &str, why: &str) {
        let remote = self.remote_or_panic();
        let first = lock(&remote.rejected).insert(name.to_string(), tag.to_string())
            != Some(tag.to_string());
        if first {
            let serving = self.known_version(name);
            tracing::warn!(task = %name, tag = %tag, error = %why, serving = ?serving, "store object rejected; the version already loaded (if any) keeps serving");
            self.observe_load(LoadOrigin::Store, false);
        }
    }

    fn drop_if_unchanged(&self, name: &str, expect: Option<&Entry>) -> bool {
        let remote = self.remote_or_panic();
        let _guard = self.lock_writes();
        if remote.entry(name).as_ref() != expect {
            return false;
        }
        if let Err(e) = std::fs::remove_file(self.path_of(name)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(task = %name, error = %e, "cannot remove a cached prefix file");
            }
        }
        remote.set_entry(name, None);
        let removed = self.remove(name);
        if removed {
            tracing::info!(task = %name, "task gone from the store; unloaded");
        }
        removed
    }

    /// An upload in store mode: the store first (no lock held), then the cache and the map.
    pub(super) fn put_to_store(
        &self,
        name: &str,
        bytes: Vec<u8>,
        task: Task,
    ) -> Result<Arc<Task>, RegistryError> {
        let remote = self.remote_or_panic();
        let bytes = Bytes::from(bytes);
        let tag = remote.block_on(remote.store.put(name, bytes.clone()))?;
        let entry = Entry {
            tag,
            version: task.version.clone(),
        };
        let task = Arc::new(task);
        let _guard = self.lock_writes();
        self.install_cached(name, &bytes, task.clone(), entry);
        Ok(task)
    }

    /// What the store has, in the cache, the map and the manifest (caller holds the writers'
    /// lock). A cache that cannot be written only costs a restart while the store is down.
    fn install_cached(&self, name: &str, bytes: &[u8], task: Arc<Task>, entry: Entry) {
        let remote = self.remote_or_panic();
        let path = self.path_of(name);
        if let Err(e) = write_atomic(&path, bytes) {
            tracing::warn!(task = %name, error = %e, "prefix cache not written (the store has it)");
        }
        self.insert(name, task, disk::stamp(&path));
        remote.set_entry(name, Some(entry));
        lock(&remote.rejected).remove(name);
    }

    /// A delete in store mode: the store first, then the cache and the map.
    pub(super) fn delete_from_store(&self, name: &str) -> Result<(), RegistryError> {
        let remote = self.remote_or_panic();
        remote.block_on(remote.store.delete(name))?;
        let _guard = self.lock_writes();
        let _ = std::fs::remove_file(self.path_of(name));
        remote.set_entry(name, None);
        self.remove(name);
        Ok(())
    }
}

enum Fetched {
    Loaded,
    Rejected,
    Unchanged,
}
