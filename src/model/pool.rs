//! The CPU path's own fork-join: `for_each(n, f)` runs `f(0..n)` on the calling thread and the
//! pool's helpers, and returns when all are done.
//!
//! Why not rayon for this: a forward pass is ~30 short parallel regions (each matmul, each
//! attention layer, each LayerNorm), and rayon's idle workers go to sleep between them; waking
//! them through the kernel cost a quarter of a single short request's time (futex, scheduler,
//! `sched_yield` in the profile). Here the helpers spin for a moment after each region — long
//! enough to catch the next one in a forward pass, short enough to leave the core alone when the
//! server is idle — and only then park. The caller always works on its own region too.
//!
//! One region at a time: a call made while another thread's region runs, or from inside a region,
//! simply runs sequentially on its caller.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for the next region before parking.
const SPIN: Duration = Duration::from_micros(200);

/// The work of one region, its lifetime erased: `run` never returns before every helper has
/// finished with it (see `for_each`), so the borrow it hides is never used after it ends.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}
// SAFETY: the pointee is Sync, and outlives every use (see above).
unsafe impl Send for Job {}

struct Shared {
    /// Bumped for every new region; helpers watch it.
    epoch: AtomicUsize,
    job: Mutex<Option<Job>>,
    /// The next item to take.
    next: AtomicUsize,
    /// Helpers still working on the current region.
    busy: AtomicUsize,
    /// Held by the thread whose region is running.
    running: AtomicBool,
}

struct Pool {
    shared: Arc<Shared>,
    helpers: Vec<std::thread::Thread>,
}

thread_local! {
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            running: AtomicBool::new(false),
        });
        // As many threads as rayon would use (RAYON_NUM_THREADS, else the cores), the caller
        // being one of them.
        let helpers = (1..rayon::current_num_threads().max(1))
            .filter_map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("prefixd-cpu-{i}"))
                    .spawn(move || helper(&shared))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Pool { shared, helpers }
    })
}

fn helper(shared: &Shared) {
    INSIDE.with(|i| i.set(true));
    // The epoch the pool was created with, not whatever it is by the time this thread runs: a
    // region posted before then must still be seen (it was: a start-up deadlock).
    let mut seen = 0;
    loop {
        let start = Instant::now();
        while shared.epoch.load(Ordering::Acquire) == seen {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::park_timeout(Duration::from_millis(100));
            }
        }
        seen = shared.epoch.load(Ordering::Acquire);
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            // SAFETY: the caller of `for_each` waits for `busy` to reach 0 before returning.
            let f = unsafe { &*job.f };
            work(f, job.n, &shared.next);
        }
        shared.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes items until none are left.
fn work(f: &(dyn Fn(usize) + Sync), n: usize, next: &AtomicUsize) {
    loop {
        let i = next.fetch_add(1, Ordering::AcqRel);
        if i >= n {
            return;
        }
        f(i);
    }
}

/// Runs `f(i)` for every `i < n` on the calling thread and the pool's helpers; returns when all
/// have run. A panic in `f` propagates to the caller (the helpers catch nothing: the model thread
/// catches panics around the whole forward pass).
pub(crate) fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    let p = pool();
    let s = &p.shared;
    let sequential = n == 1
        || p.helpers.is_empty()
        || INSIDE.with(|i| i.get())
        || s.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err();
    if sequential {
        (0..n).for_each(f);
        return;
    }
    let f: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: erases the borrow's lifetime; it is not used after this function returns (below,
    // every helper has decremented `busy` before we do).
    let job = Job {
        f: unsafe {
            std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(f)
        },
        n,
    };
    s.next.store(0, Ordering::Release);
    s.busy.store(p.helpers.len(), Ordering::Release);
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
    s.epoch.fetch_add(1, Ordering::AcqRel);
    for h in &p.helpers {
        h.unpark();
    }
    INSIDE.with(|i| i.set(true));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(f, n, &s.next)));
    INSIDE.with(|i| i.set(false));
    // Helpers may still be on their last items: wait for all (even if ours panicked).
    while s.busy.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    s.running.store(false, Ordering::Release);
    if let Err(panic) = caught {
        std::panic::resume_unwind(panic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_from_many_callers() {
        let callers: Vec<_> = (0..4)
            .map(|c| {
                std::thread::spawn(move || {
                    for round in 0..200 {
                        let n = 1 + (round * 7 + c) % 50;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        for_each(n, |i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                            // Nested calls run inline.
                            for_each(3, |_| {});
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }
}
