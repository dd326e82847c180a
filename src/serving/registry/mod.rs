//! The task registry: every prefix in the prefixes directory, validated and ready to run.
//!
//! [`Registry`] is a cheap-clone handle over `Arc<Shared>` (the mini-redis pattern): HTTP handlers,
//! the admin routes and the directory watcher each hold a clone, and all see one map. Reads take a
//! short read lock and clone an `Arc<Task>`; nothing holds the lock across a forward pass. A row
//! admitted for a task keeps its `Arc<Task>`, so replacing or deleting the task never changes a
//! request already queued.
//!
//! The directory is the source of truth: uploads are validated fully, then persisted atomically
//! (temp file, fsync, rename), then swapped into the map. The watcher (`watch.rs`) reconciles the
//! map with the files on disk, so hand edits take effect and our own writes are recognised (same
//! content hash) and not loaded twice. Files are read by `disk.rs`, which never blocks on one:
//! only regular files, opened non-blocking, size-capped, and never while a lock is held.
//!
//! With a prefix store (`store.rs`, `sync.rs`: `--prefixes s3://…`) the store is the source of
//! truth instead and the directory is this replica's cache of it; uploads and deletes go to the
//! store first, and a sync loop replaces the watcher.
//!
//! A task is known before it is loaded: at start every file's header is read (metadata only, so
//! 10,000 tasks are indexed in a fraction of a second) and the server is ready; the weights load
//! in the background, or on a task's first request, within `--max-resident-bytes`, evicting the
//! least recently used (`resident.rs`). The file stays on disk, so an evicted task reloads.

mod disk;
mod listing;
mod resident;
pub mod store;
mod sync;
mod watch;

pub use listing::{Loaded, Page};
pub use resident::Lookup;
pub use store::{is_store_url, PrefixStore, StoreConfig, StoreError};
pub use sync::{PassReport, StoreStatus, SyncGuard};
pub use watch::WatchGuard;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use crate::engine::Task;
use crate::model::ModelInfo;
use crate::prefix::peft::{self, ImportOptions};
use crate::prefix::{check_meta_against_model, write_atomic, PrefixError, PrefixFile, PrefixMeta};

pub const EXTENSION: &str = "safetensors";

/// `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`: safe as a file name, no path tricks.
pub fn valid_task_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid task name {0:?}: use 1–128 characters from A–Z a–z 0–9 _ . -, starting with a letter or digit")]
    InvalidName(String),
    #[error("no task named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    /// The prefix store could not be written; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a load attempt came from, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOrigin {
    Startup,
    Watch,
    Rescan,
    Upload,
    /// Fetched from the prefix store by a sync pass.
    Store,
    /// A known task's weights, loaded for a request.
    Demand,
}

impl LoadOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Watch => "watch",
            Self::Rescan => "rescan",
            Self::Upload => "upload",
            Self::Store => "store",
            Self::Demand => "demand",
        }
    }
}

/// Called after every load attempt (`ok` or not) and every change in the number of tasks.
pub trait RegistryObserver: Send + Sync {
    fn prefix_load(&self, origin: LoadOrigin, ok: bool);
    fn tasks_loaded(&self, count: usize);
    /// After every pass of the store sync loop.
    fn store_sync(&self, _status: &StoreStatus, _took: std::time::Duration) {}
    /// A request found its task's weights in memory (`hit`) or had them loaded.
    fn task_lookup(&self, _hit: bool) {}
    /// How long loading a task's weights for a request took.
    fn task_load(&self, _took: std::time::Duration) {}
    /// Tasks whose weights were dropped to stay within the resident budget.
    fn tasks_evicted(&self, _count: usize) {}
    /// Tasks with weights in memory, and their bytes.
    fn resident(&self, _tasks: usize, _bytes: usize) {}
}

/// One task in the map.
struct Slot {
    body: Body,
    /// The file as it was when this was loaded or indexed: a rescan skips a file whose stamp is
    /// unchanged without reading it.
    stamp: Option<disk::Stamp>,
    loaded_at: SystemTime,
    /// Tick of the last request (see `resident.rs`).
    last_used: AtomicU64,
}

enum Body {
    Resident(Arc<Task>),
    /// Known from its file's header; the weights are read on demand.
    Cold(Arc<Cold>),
}

struct Cold {
    meta: PrefixMeta,
    size: usize,
    /// Hashed only when asked (listing), once.
    version: OnceLock<String>,
}

#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    model: ModelInfo,
    /// The largest prefix file read from the directory.
    max_file_bytes: usize,
    tasks: RwLock<HashMap<String, Slot>>,
    /// Serialises changes (disk + map) so two uploads of one task cannot interleave.
    writes: Mutex<()>,
    /// Files found bad, by the stamp they had: reported once, not at every rescan.
    refused: Mutex<HashMap<String, disk::Stamp>>,
    observer: Option<Arc<dyn RegistryObserver>>,
    /// The prefix store, when the directory is only its cache.
    remote: Option<sync::Remote>,
    residency: resident::Residency,
}

/// How a registry reads its folder and how much it keeps in memory.
#[derive(Clone, Default)]
pub struct RegistryConfig {
    /// The largest prefix file read from the folder (or the store).
    pub max_file_bytes: usize,
    /// Most bytes of task weights in memory; the least recently used are dropped past it (and
    /// reloaded from their files when asked). None: no limit.
    pub max_resident_bytes: Option<usize>,
    pub observer: Option<Arc<dyn RegistryObserver>>,
}

impl Registry {
    /// Loads every prefix file in `dir` (created if missing) before returning. A bad file is
    /// logged, counted and skipped; the rest still load. Temp files left by a crashed writer are
    /// removed first.
    pub fn open(
        dir: &Path,
        model: ModelInfo,
        max_file_bytes: usize,
        observer: Option<Arc<dyn RegistryObserver>>,
    ) -> std::io::Result<Self> {
        let config = RegistryConfig {
            max_file_bytes,
            max_resident_bytes: None,
            observer,
        };
        let registry = Self::index(dir, model, config, None)?;
        registry.warm_up();
        Ok(registry)
    }

    /// Indexes every prefix file in `dir` (headers only: fast) and returns; the weights load on
    /// first use or when [`Registry::warm_up`] runs (the server runs it in the background).
    pub fn open_lazy(
        dir: &Path,
        model: ModelInfo,
        config: RegistryConfig,
    ) -> std::io::Result<Self> {
        Self::index(dir, model, config, None)
    }

    /// A registry whose source of truth is `store`, with `cache_dir` as its local copy: what the
    /// cache holds is indexed now (so a replica restarted while the store is down still serves);
    /// [`Registry::start_sync`] then converges on the store every `sync_interval`. Must be called
    /// within a tokio runtime (uploads reach the store through it).
    pub fn open_store(
        cache_dir: &Path,
        model: ModelInfo,
        config: RegistryConfig,
        store: PrefixStore,
        sync_interval: std::time::Duration,
    ) -> std::io::Result<Self> {
        let handle = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let remote = sync::Remote::new(store, handle, sync_interval, cache_dir.to_path_buf());
        let registry = Self::index(cache_dir, model, config, Some(remote))?;
        let cached: std::collections::HashSet<String> = registry.read().keys().cloned().collect();
        if let Some(remote) = &registry.shared.remote {
            remote.restore_manifest(&cached);
        }
        Ok(registry)
    }

    fn index(
        dir: &Path,
        model: ModelInfo,
        config: RegistryConfig,
        remote: Option<sync::Remote>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        disk::remove_stale_temp_files(dir);
        let registry = Self {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                model,
                max_file_bytes: config.max_file_bytes,
                tasks: RwLock::new(HashMap::new()),
                writes: Mutex::new(()),
                refused: Mutex::new(HashMap::new()),
                observer: config.observer,
                remote,
                residency: resident::Residency::new(config.max_resident_bytes),
            }),
        };
        std::fs::read_dir(dir)?; // an unreadable directory is an error, not an empty registry
        registry.rescan(LoadOrigin::Startup);
        Ok(registry)
    }

    /// Whether the directory is only the cache of a prefix store.
    pub fn has_store(&self) -> bool {
        self.shared.remote.is_some()
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn model(&self) -> &ModelInfo {
        &self.shared.model
    }

    /// Whether a task of that name is registered (loaded or not).
    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Validates native prefix-file bytes and installs them as task `name`, replacing any
    /// previous version. On any error, the map and the directory are unchanged.
    pub fn put_native(&self, name: &str, bytes: &[u8]) -> Result<Arc<Task>, RegistryError> {
        check_name(name)?;
        let file = PrefixFile::from_bytes(bytes);
        self.install(name, file)
    }

    /// Imports a PEFT adapter (its two files' contents) as task `name`.
    pub fn put_peft(
        &self,
        name: &str,
        config_json: &[u8],
        weights: &[u8],
        opts: &ImportOptions,
    ) -> Result<Arc<Task>, RegistryError> {
        check_name(name)?;
        let opts = ImportOptions {
            task: Some(name.to_string()),
            ..opts.clone()
        };
        let origin = format!("upload:{name}");
        let file = peft::import_bytes(config_json, weights, None, &origin, &opts, self.model());
        self.install(name, file)
    }

    /// Validates, persists and swaps in an upload; counts the attempt either way. With a store,
    /// this blocks on the store's PUT: call it from a blocking thread.
    fn install(
        &self,
        name: &str,
        file: Result<PrefixFile, PrefixError>,
    ) -> Result<Arc<Task>, RegistryError> {
        let result = file.map_err(RegistryError::from).and_then(|mut file| {
            // The file name is the task's name; the metadata is made to agree before persisting.
            file.meta.task = name.to_string();
            let bytes = file.to_bytes()?;
            let task = Task::from_file(&file, self.model(), &bytes)?;
            drop(file);
            if self.has_store() {
                return self.put_to_store(name, bytes, task);
            }
            let _guard = self.lock_writes();
            let path = self.path_of(name);
            write_atomic(&path, &bytes)?;
            let task = Arc::new(task);
            self.insert(name, task.clone(), disk::stamp(&path));
            Ok(task)
        });
        self.observe_load(LoadOrigin::Upload, result.is_ok());
        result
    }

    /// Removes task `name` from the map and its file from the directory.
    pub fn delete(&self, name: &str) -> Result<(), RegistryError> {
        check_name(name)?;
        if self.has_store() {
            if !self.contains(name) {
                return Err(RegistryError::NotFound(name.to_string()));
            }
            return self.delete_from_store(name);
        }
        let _guard = self.lock_writes();
        if !self.contains(name) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let path = self.path_of(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PrefixError::Io { path, source }.into()),
        }
        self.remove(name);
        Ok(())
    }

    /// Makes the map agree with one file on disk: load it if new or changed, drop it if gone.
    ///
    /// The file is read and validated with no lock held, so a slow or hostile file (a FIFO, a
    /// huge sparse file) holds up this caller only, never uploads, deletes or readers. Only the
    /// swap takes the writers' lock, and only if the file is still the one that was read.
    fn reconcile(&self, path: &Path, origin: LoadOrigin) {
        let Some(name) = task_name_of(path) else {
            return;
        };
        // An unchanged file (same inode, size and mtime) is not read again: a rescan of 100,000
        // files is 100,000 stats, not 35 GB of reads.
        let now = disk::stamp(path);
        if now.is_some() && self.read().get(&name).is_some_and(|s| s.stamp == now) {
            return;
        }
        if now.is_some() && self.refused().get(&name) == now.as_ref() {
            return; // the same bad file, already reported
        }
        if origin == LoadOrigin::Startup {
            return self.index_file(path, name);
        }
        let (bytes, stamp) = match disk::read_prefix_file(path, self.shared.max_file_bytes) {
            Ok(Some(read)) => read,
            Ok(None) => {
                let _guard = self.lock_writes();
                if !path.exists() && self.remove(&name) {
                    tracing::info!(task = %name, "prefix file removed; task unloaded");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "prefix file not loaded; registry unchanged");
                self.observe_load(origin, false);
                self.refuse(&name, now);
                return;
            }
        };
        let version = Task::version_of(&bytes);
        if self.known_version(&name).as_ref() == Some(&version) {
            self.restamp(&name, stamp); // touched, not changed
            return;
        }
        let size = bytes.len();
        let loaded = PrefixFile::from_bytes(&bytes).and_then(|mut file| {
            drop(bytes); // the parsed copy is all that is needed now
            file.meta.task = name.clone();
            Task::with_version(&file, self.model(), version, size)
        });
        match loaded {
            Ok(task) => {
                let _guard = self.lock_writes();
                // Changed since it was read (an upload, or a copy still being written): install
                // nothing; the change brings its own event.
                if disk::stamp(path).as_ref() != Some(&stamp) {
                    return;
                }
                tracing::info!(task = %name, version = %task.version, origin = origin.as_str(), "task loaded");
                self.insert(&name, Arc::new(task), Some(stamp));
                self.observe_load(origin, true);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "prefix file rejected; registry unchanged");
                self.observe_load(origin, false);
                self.refuse(&name, Some(stamp));
            }
        }
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, HashMap<String, disk::Stamp>> {
        self.shared
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers a bad file's stamp so that rescans skip it until it changes.
    fn refuse(&self, name: &str, stamp: Option<disk::Stamp>) {
        let mut refused = self.refused();
        match stamp {
            Some(stamp) => refused.insert(name.to_string(), stamp),
            None => refused.remove(name),
        };
    }

    /// Registers a file from its header alone (at start): its weights load later. Header-level
    /// problems (not a prefix file, another model) are refused here; the rest when it loads.
    fn index_file(&self, path: &Path, name: String) {
        let indexed = disk::read_prefix_header(path, self.shared.max_file_bytes).and_then(|read| {
            let Some((mut meta, stamp)) = read else {
                return Ok(None);
            };
            check_meta_against_model(&meta, self.model())?;
            meta.task = name.clone();
            Ok(Some((meta, stamp)))
        });
        match indexed {
            Ok(Some((meta, stamp))) => {
                let size = stamp.len() as usize;
                let _guard = self.lock_writes();
                let cold = Cold {
                    meta,
                    size,
                    version: OnceLock::new(),
                };
                self.put_slot(&name, Body::Cold(Arc::new(cold)), Some(stamp));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "prefix file rejected; registry unchanged");
                self.observe_load(LoadOrigin::Startup, false);
                self.refuse(&name, disk::stamp(path));
            }
        }
    }

    /// Reconciles every prefix file in the directory and every task whose file is gone.
    fn rescan(&self, origin: LoadOrigin) {
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(&self.shared.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| task_name_of(p).is_some())
                .collect(),
            Err(e) => {
                tracing::warn!(dir = %self.shared.dir.display(), error = %e, "cannot list the prefixes directory");
                return;
            }
        };
        paths.extend(self.read().keys().map(|name| self.path_of(name)));
        paths.sort();
        paths.dedup();
        // Files are independent: read them on every core (the map's lock is only taken for each
        // swap).
        resident::on_every_core(&paths, |path| self.reconcile(path, origin));
        if origin == LoadOrigin::Startup {
            tracing::info!(
                tasks = self.len(),
                files = paths.len(),
                "prefixes directory indexed"
            );
        }
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.shared.dir.join(format!("{name}.{EXTENSION}"))
    }

    fn observe_load(&self, origin: LoadOrigin, ok: bool) {
        if let Some(o) = &self.shared.observer {
            o.prefix_load(origin, ok);
        }
    }

    // A panic while holding a lock cannot leave the map half-updated (each update is one
    // insert/remove), so a poisoned lock is safe to keep using.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Slot>> {
        self.shared.tasks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Slot>> {
        self.shared.tasks.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.shared.writes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn check_name(name: &str) -> Result<(), RegistryError> {
    if valid_task_name(name) {
        Ok(())
    } else {
        Err(RegistryError::InvalidName(name.to_string()))
    }
}

/// `dir/<name>.safetensors` → `name`; temp files (`.name.tmp`) and other files → None.
fn task_name_of(path: &Path) -> Option<String> {
    if path.extension()? != EXTENSION {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    valid_task_name(stem).then(|| stem.to_string())
}
