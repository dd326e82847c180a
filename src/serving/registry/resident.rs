//! Which tasks have their weights in memory.
//!
//! Every registered task has a slot; a slot holds the task's weights (`Resident`) or only what
//! its file's header says (`Cold`). A request for a cold task loads it from its file, on a
//! blocking thread, and the least recently used tasks are dropped back to cold when the weights
//! in memory pass `--max-resident-bytes`. Without a budget everything becomes resident (the
//! background warm-up loads it all) and nothing is evicted.
//!
//! Recency is a global tick stamped on a slot at each lookup (an atomic store under the map's
//! read lock: no writer is involved on the hot path). Eviction sorts the resident slots by tick;
//! it runs only on a load past the budget, and frees a little more than needed (1/16 of the
//! budget) so that a stream of misses does not sort the map on every one. A row already queued
//! keeps its `Arc<Task>`, so evicting a task never touches a request in flight: memory can
//! overshoot the budget by the tasks being used at that instant, never more.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::disk::{self, Stamp};
use super::{Body, Cold, LoadOrigin, Registry, RegistryError, Slot};
use crate::engine::Task;
use crate::prefix::PrefixFile;

pub(super) struct Residency {
    budget: Option<usize>,
    bytes: AtomicUsize,
    tasks: AtomicUsize,
    tick: AtomicU64,
}

impl Residency {
    pub(super) fn new(budget: Option<usize>) -> Self {
        Self {
            budget: budget.filter(|&b| b > 0),
            bytes: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            tick: AtomicU64::new(0),
        }
    }
}

/// What a lookup found.
pub enum Lookup {
    Ready(Arc<Task>),
    /// Registered, weights not in memory: [`Registry::load`] (blocking) brings them in.
    Cold,
    Missing,
}

fn cost(body: &Body) -> (usize, usize) {
    match body {
        Body::Resident(task) => (1, task.resident_bytes()),
        Body::Cold(_) => (0, 0),
    }
}

impl Registry {
    /// The task's weights if in memory (marking it recently used), else whether it exists.
    pub fn lookup(&self, name: &str) -> Lookup {
        let residency = &self.shared.residency;
        let found = match self.read().get(name) {
            Some(slot) => {
                let tick = residency.tick.fetch_add(1, Ordering::Relaxed);
                slot.last_used.store(tick, Ordering::Relaxed);
                match &slot.body {
                    Body::Resident(task) => Lookup::Ready(task.clone()),
                    Body::Cold(_) => Lookup::Cold,
                }
            }
            None => return Lookup::Missing,
        };
        if let Some(o) = &self.shared.observer {
            o.task_lookup(matches!(found, Lookup::Ready(_)));
        }
        found
    }

    /// The task, loading its weights if needed (blocking: call from a blocking thread).
    pub fn get(&self, name: &str) -> Option<Arc<Task>> {
        match self.lookup(name) {
            Lookup::Ready(task) => Some(task),
            Lookup::Cold => self.load(name).ok(),
            Lookup::Missing => None,
        }
    }

    /// Reads, validates and installs a cold task's weights, evicting others past the budget.
    /// A file that turns out bad is dropped from the map (logged and counted) and named in the
    /// error.
    pub fn load(&self, name: &str) -> Result<Arc<Task>, RegistryError> {
        let started = Instant::now();
        let loaded = self.load_as(name, LoadOrigin::Demand);
        if let (Ok(_), Some(o)) = (&loaded, &self.shared.observer) {
            o.task_load(started.elapsed());
        }
        loaded
    }

    fn load_as(&self, name: &str, origin: LoadOrigin) -> Result<Arc<Task>, RegistryError> {
        let path = self.path_of(name);
        // An evicted task's version is known: if its file has not changed since (same stamp),
        // reloading it need not hash it again.
        let known = self.read().get(name).and_then(|slot| match &slot.body {
            Body::Cold(cold) => cold.version.get().cloned().zip(slot.stamp.clone()),
            Body::Resident(_) => None,
        });
        let read = disk::read_prefix_file(&path, self.shared.max_file_bytes);
        let loaded = read.and_then(|read| {
            let Some((bytes, stamp)) = read else {
                return Ok(None);
            };
            let version = match known {
                Some((version, was)) if was == stamp => version,
                _ => Task::version_of(&bytes),
            };
            let mut file = PrefixFile::from_bytes(&bytes)?;
            file.meta.task = name.to_string();
            let task = Task::with_version(&file, self.model(), version, bytes.len())?;
            Ok(Some((task, stamp)))
        });
        let _guard = self.lock_writes();
        let current = self.read().get(name).map(|slot| match &slot.body {
            Body::Resident(task) => Ok(task.clone()),
            Body::Cold(cold) => Err(cold.clone()),
        });
        let cold = match current {
            None => return Err(RegistryError::NotFound(name.to_string())),
            Some(Ok(task)) => return Ok(task), // another request loaded it meanwhile
            Some(Err(cold)) => cold,
        };
        match loaded {
            Ok(Some((task, stamp))) => {
                let task = Arc::new(task);
                let _ = cold.version.set(task.version.clone());
                self.insert(name, task.clone(), Some(stamp));
                self.observe_load(origin, true);
                Ok(task)
            }
            Ok(None) => {
                self.remove(name);
                Err(RegistryError::NotFound(name.to_string()))
            }
            Err(e) => {
                tracing::warn!(task = %name, error = %e, "prefix file rejected on load; task unloaded");
                self.observe_load(origin, false);
                self.remove(name);
                Err(e.into())
            }
        }
    }

    /// Loads cold tasks while the budget allows (all of them without one), on every core.
    /// Blocking; the server runs it on its own thread after it starts serving.
    pub fn warm_up(&self) {
        let started = Instant::now();
        let mut cold: Vec<(String, usize)> = self
            .read()
            .iter()
            .filter_map(|(name, slot)| match &slot.body {
                Body::Cold(c) => Some((name.clone(), c.size)),
                Body::Resident(_) => None,
            })
            .collect();
        cold.sort();
        let budget = self.shared.residency.budget;
        on_every_core(&cold, |(name, size)| {
            let used = self.shared.residency.bytes.load(Ordering::Relaxed);
            if budget.is_some_and(|b| used + size > b) {
                return;
            }
            if matches!(self.peek(name), Some(false)) {
                let _ = self.load_as(name, LoadOrigin::Startup);
            }
        });
        tracing::info!(
            resident = self.shared.residency.tasks.load(Ordering::Relaxed),
            tasks = self.len(),
            seconds = started.elapsed().as_secs_f64(),
            "prefixes loaded"
        );
    }

    /// Whether `name` is resident (Some(true)), cold (Some(false)) or unknown.
    fn peek(&self, name: &str) -> Option<bool> {
        self.read()
            .get(name)
            .map(|s| matches!(s.body, Body::Resident(_)))
    }

    pub fn resident_len(&self) -> usize {
        self.shared.residency.tasks.load(Ordering::Relaxed)
    }

    /// Installs a resident task (caller holds the writers' lock) and keeps within the budget.
    pub(super) fn insert(&self, name: &str, task: Arc<Task>, stamp: Option<Stamp>) {
        self.put_slot(name, Body::Resident(task), stamp);
        self.enforce_budget(name);
    }

    /// Replaces `name`'s slot, keeping the resident counts right.
    pub(super) fn put_slot(&self, name: &str, body: Body, stamp: Option<Stamp>) {
        let residency = &self.shared.residency;
        let (tasks, bytes) = cost(&body);
        let tick = residency.tick.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            body,
            stamp,
            loaded_at: SystemTime::now(),
            last_used: AtomicU64::new(tick),
        };
        let count = {
            let mut map = self.write();
            if let Some(old) = map.insert(name.to_string(), slot) {
                let (t, b) = cost(&old.body);
                residency.tasks.fetch_sub(t, Ordering::Relaxed);
                residency.bytes.fetch_sub(b, Ordering::Relaxed);
            }
            residency.tasks.fetch_add(tasks, Ordering::Relaxed);
            residency.bytes.fetch_add(bytes, Ordering::Relaxed);
            map.len()
        };
        self.observe_counts(count);
    }

    pub(super) fn remove(&self, name: &str) -> bool {
        let residency = &self.shared.residency;
        let (removed, count) = {
            let mut map = self.write();
            let old = map.remove(name);
            if let Some(old) = &old {
                let (t, b) = cost(&old.body);
                residency.tasks.fetch_sub(t, Ordering::Relaxed);
                residency.bytes.fetch_sub(b, Ordering::Relaxed);
            }
            (old.is_some(), map.len())
        };
        self.observe_counts(count);
        removed
    }

    /// A file touched but not changed: remember its new stamp so it is not read again.
    pub(super) fn restamp(&self, name: &str, stamp: Stamp) {
        if let Some(slot) = self.write().get_mut(name) {
            slot.stamp = Some(stamp);
        }
    }

    /// Past the budget: the least recently used resident tasks (never `keep`) go cold.
    fn enforce_budget(&self, keep: &str) {
        let residency = &self.shared.residency;
        let Some(budget) = residency.budget else {
            return;
        };
        if residency.bytes.load(Ordering::Relaxed) <= budget {
            return;
        }
        let target = budget - budget / 16;
        let evicted = {
            let mut map = self.write();
            let mut resident: Vec<(u64, String, usize)> = map
                .iter()
                .filter(|(name, _)| name.as_str() != keep)
                .filter_map(|(name, slot)| match &slot.body {
                    Body::Resident(t) => Some((
                        slot.last_used.load(Ordering::Relaxed),
                        name.clone(),
                        t.resident_bytes(),
                    )),
                    Body::Cold(_) => None,
                })
                .collect();
            resident.sort_unstable();
            let mut evicted = 0;
            for (_, name, bytes) in resident {
                if residency.bytes.load(Ordering::Relaxed) <= target {
                    break;
                }
                let Some(slot) = map.get_mut(&name) else {
                    continue;
                };
                let Body::Resident(task) = &slot.body else {
                    continue;
                };
                let cold = Cold {
                    meta: task.meta.clone(),
                    size: task.size_bytes,
                    version: task.version.clone().into(),
                };
                slot.body = Body::Cold(Arc::new(cold));
                residency.tasks.fetch_sub(1, Ordering::Relaxed);
                residency.bytes.fetch_sub(bytes, Ordering::Relaxed);
                evicted += 1;
            }
            evicted
        };
        if let Some(o) = &self.shared.observer {
            o.tasks_evicted(evicted);
        }
        self.observe_counts(self.len());
    }

    fn observe_counts(&self, count: usize) {
        if let Some(o) = &self.shared.observer {
            let r = &self.shared.residency;
            o.tasks_loaded(count);
            o.resident(
                r.tasks.load(Ordering::Relaxed),
                r.bytes.load(Ordering::Relaxed),
            );
        }
    }
}

/// Runs `f` over `items` on every core (scoped threads pulling the next index).
pub(super) fn on_every_core<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                f(item);
            });
        }
    });
}
