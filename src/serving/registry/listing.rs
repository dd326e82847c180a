//! What the registry says about its tasks: one, all, or a page, without their weights.

use std::sync::Arc;
use std::time::SystemTime;

use super::{disk, Body, Cold, Registry, Slot};
use crate::engine::Task;
use crate::prefix::PrefixMeta;

/// One page of [`Registry::page`].
pub struct Page {
    pub tasks: Vec<Loaded>,
    pub total: usize,
    pub next_after: Option<String>,
}

/// A registered task as listed: what it is, whether its weights are in memory.
#[derive(Clone)]
pub struct Loaded {
    pub meta: PrefixMeta,
    /// `sha256:<hex>` of its file.
    pub version: String,
    pub size_bytes: usize,
    /// When this version was loaded or, if it never was, indexed.
    pub loaded_at: SystemTime,
    /// Whether its weights are in memory (else its next request loads them).
    pub resident: bool,
}

impl Loaded {
    pub fn name(&self) -> &str {
        &self.meta.task
    }
}

impl Registry {
    /// What task `name` is, without its weights. A task never loaded has its file hashed for its
    /// version the first time it is asked for: call from a blocking thread.
    pub fn info(&self, name: &str) -> Option<Loaded> {
        let view = self.read().get(name).map(View::of)?;
        self.finish_view(name, view)
    }

    /// All tasks, sorted by name (see [`Registry::info`] on blocking).
    pub fn list(&self) -> Vec<Loaded> {
        self.page("", None, usize::MAX).tasks
    }

    /// Tasks whose name starts with `prefix` and sorts after `after`, sorted, at most `limit`;
    /// with the number matching `prefix` and where the next page starts.
    pub fn page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Page {
        // The lock is held to pick the page, not to hash files for it.
        let (views, total, more) = {
            let map = self.read();
            let mut names: Vec<&String> = map.keys().filter(|n| n.starts_with(prefix)).collect();
            let total = names.len();
            names.retain(|n| after.is_none_or(|a| n.as_str() > a));
            names.sort_unstable();
            let more = names.len() > limit;
            names.truncate(limit);
            let views: Vec<(String, View)> = names
                .iter()
                .map(|n| (n.to_string(), View::of(&map[*n])))
                .collect();
            (views, total, more)
        };
        let tasks: Vec<Loaded> = views
            .into_iter()
            .filter_map(|(name, view)| self.finish_view(&name, view))
            .collect();
        Page {
            next_after: more
                .then(|| tasks.last().map(|l| l.name().to_string()))
                .flatten(),
            tasks,
            total,
        }
    }

    /// A cold task's version: hashed from its file once.
    fn finish_view(&self, name: &str, view: View) -> Option<Loaded> {
        match view {
            View::Ready(loaded) => Some(loaded),
            View::Cold(cold, loaded_at) => {
                let version = self.cold_version(name, &cold)?;
                Some(Loaded {
                    meta: cold.meta.clone(),
                    version,
                    size_bytes: cold.size,
                    loaded_at,
                    resident: false,
                })
            }
        }
    }

    /// The version served for `name`; a cold task's file is hashed the first time (blocking).
    pub(super) fn version(&self, name: &str) -> Option<String> {
        let cold = match &self.read().get(name)?.body {
            Body::Resident(task) => return Some(task.version.clone()),
            Body::Cold(cold) => cold.clone(),
        };
        self.cold_version(name, &cold)
    }

    /// Hashed from its file once; None if the file is gone or unreadable (the watcher settles it).
    fn cold_version(&self, name: &str, cold: &Cold) -> Option<String> {
        if let Some(v) = cold.version.get() {
            return Some(v.clone());
        }
        let path = self.path_of(name);
        match disk::read_prefix_file(&path, self.shared.max_file_bytes) {
            Ok(Some((bytes, _))) => Some(
                cold.version
                    .get_or_init(|| Task::version_of(&bytes))
                    .clone(),
            ),
            _ => None,
        }
    }

    /// The version served for `name` if known without reading a file.
    pub(super) fn known_version(&self, name: &str) -> Option<String> {
        match &self.read().get(name)?.body {
            Body::Resident(task) => Some(task.version.clone()),
            Body::Cold(cold) => cold.version.get().cloned(),
        }
    }
}

/// A slot read under the lock, finished (hashed, for a cold one) after it is released.
// A short-lived value on the stack, one at a time: boxing `Loaded` would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum View {
    Ready(Loaded),
    Cold(Arc<Cold>, SystemTime),
}

impl View {
    fn of(slot: &Slot) -> Self {
        match &slot.body {
            Body::Resident(task) => View::Ready(Loaded {
                meta: task.meta.clone(),
                version: task.version.clone(),
                size_bytes: task.size_bytes,
                loaded_at: slot.loaded_at,
                resident: true,
            }),
            Body::Cold(cold) => View::Cold(cold.clone(), slot.loaded_at),
        }
    }
}
