//! Hand edits to the prefixes directory take effect without a restart.
//!
//! Events go through `notify-debouncer-full`, which settles each path on its own: a file being
//! copied in is read once, whole, and a busy neighbour cannot postpone it. (The first watcher
//! waited for the whole directory to go quiet; an upload every 150 ms to another task kept 77
//! hand edits from ever loading.) A periodic full rescan is the safety net for events a watcher
//! can miss (overflowed queues, network filesystems).

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use std::sync::mpsc;
use std::time::Duration;

use super::{task_name_of, LoadOrigin, Registry};

/// How long a path must be quiet before its changes are read.
const SETTLE: Duration = Duration::from_millis(200);

/// Keeps the watcher (and the rescan thread) alive.
pub struct WatchGuard {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    /// Dropping it stops the rescan thread.
    _stop_rescan: Option<mpsc::Sender<()>>,
}

impl Registry {
    /// Starts watching the directory, and rescanning it every `rescan` if given; changes take
    /// effect until the guard is dropped.
    pub fn watch(&self, rescan: Option<Duration>) -> notify::Result<WatchGuard> {
        let (tx, rx) = mpsc::channel::<DebounceEventResult>();
        let mut debouncer = new_debouncer(SETTLE, None, tx)?;
        debouncer.watch(self.dir(), RecursiveMode::NonRecursive)?;
        let registry = self.clone();
        std::thread::Builder::new()
            .name("prefix-watch".into())
            .spawn(move || {
                for result in rx {
                    match result {
                        Ok(events) => {
                            let mut paths: Vec<_> = events
                                .into_iter()
                                .flat_map(|e| e.event.paths)
                                .filter(|p| task_name_of(p).is_some())
                                .collect();
                            paths.sort();
                            paths.dedup();
                            for path in paths {
                                registry.reconcile(&path, LoadOrigin::Watch);
                            }
                        }
                        Err(errors) => {
                            for e in errors {
                                tracing::warn!(error = %e, "prefix directory watch error");
                            }
                            // Events may have been lost: look at everything.
                            registry.rescan(LoadOrigin::Rescan);
                        }
                    }
                }
            })
            .map_err(notify::Error::io)?;
        let stop_rescan = match rescan.filter(|d| !d.is_zero()) {
            Some(every) => {
                let (stop, stopped) = mpsc::channel::<()>();
                let registry = self.clone();
                std::thread::Builder::new()
                    .name("prefix-rescan".into())
                    .spawn(move || {
                        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every)
                        {
                            registry.rescan(LoadOrigin::Rescan);
                        }
                    })
                    .map_err(notify::Error::io)?;
                Some(stop)
            }
            None => None,
        };
        Ok(WatchGuard {
            _debouncer: debouncer,
            _stop_rescan: stop_rescan,
        })
    }
}
