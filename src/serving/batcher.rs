//! Dynamic batching over one model thread.
//!
//! Handlers tokenize on the blocking pool, then [`Batcher::submit`] queues one [`Job`] per input
//! row. A single thread owns the model (a [`Backend`]): it drains the queue, forms a batch, runs
//! it, answers each row through its oneshot channel, and goes round again. Because batch
//! formation happens only when the model is free, a lone request on an idle server runs at once,
//! and under load the rows that arrived during a forward pass form the next batch (continuous
//! batching). Rows of any tasks mix in one batch; each row carries its own `Arc<Task>`.
//!
//! Admission is counted in rows against `max_queue_rows`; a request that would overflow it is
//! refused as a whole, at once, without touching the channel.
//!
//! The thread has a pulse ([`ModelHealth`]): a forward pass that fails or panics answers its own
//! rows with an error and the thread carries on; readiness reads the health, so a model that keeps
//! failing, or a thread that is gone, takes the replica out of rotation instead of answering
//! every request with a misleading "shutting down".

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::engine::{Encoded, Engine, Prediction, Row, Task};

/// What the model thread needs from a model: one forward pass over rows of any mix of tasks,
/// one prediction per row, in order. The engine is the real one; tests plug in fakes.
pub trait Backend: Send + 'static {
    fn classify(&self, rows: &[Row<'_>]) -> Result<Vec<Prediction>, String>;
}

impl Backend for Engine {
    fn classify(&self, rows: &[Row<'_>]) -> Result<Vec<Prediction>, String> {
        Engine::classify(self, rows).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Most rows in one forward pass.
    pub max_batch_rows: usize,
    /// Most padded tokens in one forward pass: rows × (longest row + longest prefix). A single
    /// row larger than this still runs, alone.
    pub max_batch_tokens: usize,
    /// Most rows waiting; beyond it requests are refused with 429.
    pub max_queue_rows: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch_rows: 64,
            max_batch_tokens: 4096,
            max_queue_rows: 2048,
        }
    }
}

/// Why a row got no prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// The forward pass failed (or panicked) on this row's batch.
    Failed(String),
    /// Still queued when the shutdown deadline came.
    Shutdown,
}

/// One row waiting for the model.
pub struct Job {
    pub task: Arc<Task>,
    pub tokens: Encoded,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Prediction, JobError>>,
    /// The request's span: the parent of the `forward` span of the batch this row runs in.
    pub span: tracing::Span,
    /// Open while the row waits; closed when its batch starts (the `queue` span in traces).
    pub queue: tracing::Span,
}

impl Job {
    fn padded_len(&self) -> usize {
        self.tokens.len() + self.task.num_virtual_tokens()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({queued} rows waiting, limit {limit}); retry later")]
    Overloaded { queued: usize, limit: usize },
    #[error("the server is shutting down")]
    Closed,
    #[error("the model thread has stopped; this replica cannot classify")]
    ModelGone,
}

/// How many failed batches in a row make the model unready.
const UNREADY_AFTER_FAILURES: u32 = 3;

/// The model thread's pulse, read by `/health` and `/ready`.
#[derive(Debug, Default)]
pub struct ModelHealth {
    alive: AtomicBool,
    consecutive_failures: AtomicU32,
}

impl ModelHealth {
    /// The thread runs (liveness).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// `None` when ready to serve, else why not.
    pub fn problem(&self) -> Option<String> {
        if !self.alive() {
            return Some("the model thread has stopped".into());
        }
        let n = self.consecutive_failures.load(Ordering::SeqCst);
        (n >= UNREADY_AFTER_FAILURES).then(|| format!("the last {n} forward passes failed"))
    }
}

/// Cheap-clone handle to the queue; the model thread holds the other end.
#[derive(Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
}

struct Shared {
    // `None` once closed: dropping the sender lets the model thread finish what is queued and exit.
    tx: Mutex<Option<mpsc::Sender<Vec<Job>>>>,
    queued: AtomicUsize,
    /// Set at the shutdown deadline: rows still queued are answered `Shutdown`, not run.
    abort: AtomicBool,
    config: BatcherConfig,
    metrics: Arc<Metrics>,
    health: ModelHealth,
}

impl Batcher {
    /// Starts the model thread, which owns `backend` until the batcher is closed.
    pub fn start<B: Backend>(
        backend: B,
        config: BatcherConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let batcher = Self {
            shared: Arc::new(Shared {
                tx: Mutex::new(Some(tx)),
                queued: AtomicUsize::new(0),
                abort: AtomicBool::new(false),
                config,
                metrics,
                health: ModelHealth::default(),
            }),
        };
        batcher.shared.health.alive.store(true, Ordering::SeqCst);
        let worker = batcher.clone();
        let handle = std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                // Whatever ends the loop (close, or a bug outside the guarded forward pass),
                // the pulse says so.
                struct Dead<'a>(&'a ModelHealth);
                impl Drop for Dead<'_> {
                    fn drop(&mut self) {
                        self.0.alive.store(false, Ordering::SeqCst);
                    }
                }
                let _dead = Dead(&worker.shared.health);
                worker.model_loop(backend, rx)
            })?;
        Ok((batcher, handle))
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.shared.config
    }

    pub fn health(&self) -> &ModelHealth {
        &self.shared.health
    }

    /// Rows admitted and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Queues all of a request's rows, or none of them.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), SubmitError> {
        let n = jobs.len();
        if !self.shared.health.alive() {
            return Err(SubmitError::ModelGone);
        }
        let limit = self.shared.config.max_queue_rows;
        let before = self.shared.queued.fetch_add(n, Ordering::SeqCst);
        if before + n > limit {
            self.shared.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::Overloaded {
                queued: before,
                limit,
            });
        }
        let guard = self.shared.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            self.shared.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::Closed);
        };
        // One message per request, so the model thread never sees half of a request's rows.
        if tx.send(jobs).is_err() {
            self.shared.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::ModelGone);
        }
        drop(guard);
        self.update_depth();
        Ok(())
    }

    /// Stops accepting rows; the model thread finishes those already queued, then exits.
    pub fn close(&self) {
        self.shared
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// The shutdown deadline: stops accepting rows, answers every queued row `Shutdown` (the batch
    /// already running finishes), and lets the model thread exit.
    pub fn abort(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
        self.close();
    }

    fn update_depth(&self) {
        let q = self.shared.queued.load(Ordering::SeqCst);
        self.shared.metrics.queue_depth.set(q as i64);
    }

    fn model_loop<B: Backend>(&self, backend: B, rx: mpsc::Receiver<Vec<Job>>) {
        let mut pending: Vec<Job> = Vec::new();
        loop {
            if pending.is_empty() {
                match rx.recv() {
                    Ok(jobs) => pending.extend(jobs),
                    Err(_) => return, // closed and drained
                }
            }
            pending.extend(rx.try_iter().flatten());
            let before = pending.len();
            if self.shared.abort.load(Ordering::SeqCst) {
                for job in pending.drain(..) {
                    let _ = job.reply.send(Err(JobError::Shutdown));
                }
            }
            // Rows whose client went away are dropped before they cost a forward pass.
            pending.retain(|j| !j.reply.is_closed());
            let batch = take_batch(&mut pending, &self.shared.config);
            self.shared
                .queued
                .fetch_sub(before - pending.len(), Ordering::SeqCst);
            self.update_depth();
            if !batch.is_empty() {
                self.run(&backend, batch);
            }
        }
    }

    fn run<B: Backend>(&self, backend: &B, mut batch: Vec<Job>) {
        let m = &self.shared.metrics;
        let start = Instant::now();
        for job in &mut batch {
            m.queue_duration
                .observe(start.duration_since(job.enqueued).as_secs_f64());
            job.queue = tracing::Span::none();
        }
        // One `forward` span under each request in the batch (spans are off, and free, unless a
        // trace exporter listens).
        let mut forward = Vec::new();
        for job in &batch {
            if job.span.id().is_some() && !forward.iter().any(|(id, _)| *id == job.span.id()) {
                let span =
                    tracing::debug_span!(parent: &job.span, "forward", batch_rows = batch.len());
                forward.push((job.span.id(), span));
            }
        }
        let rows: Vec<Row<'_>> = batch
            .iter()
            .map(|j| Row {
                task: &j.task,
                tokens: &j.tokens,
            })
            .collect();
        let tasks: HashSet<*const Task> = batch.iter().map(|j| Arc::as_ptr(&j.task)).collect();
        // A panic in a forward pass is a bug, but it must cost one batch, not the server.
        let result = match catch_unwind(AssertUnwindSafe(|| backend.classify(&rows))) {
            Ok(Ok(p)) if p.len() == rows.len() => Ok(p),
            Ok(Ok(p)) => Err(format!(
                "the model returned {} predictions for {} rows",
                p.len(),
                rows.len()
            )),
            Ok(Err(e)) => Err(e),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                m.model_panics.inc();
                Err(format!("the model failed on this batch ({what})"))
            }
        };
        drop(rows);
        drop(forward);
        let elapsed = start.elapsed().as_secs_f64();
        m.inference_duration.observe(elapsed);
        m.batch_size.observe(batch.len() as f64);
        m.batch_tokens.observe(padded_cost(&batch) as f64);
        m.batch_tasks.observe(tasks.len() as f64);
        tracing::debug!(
            rows = batch.len(),
            tasks = tasks.len(),
            padded_tokens = padded_cost(&batch),
            ms = elapsed * 1e3,
            "batch"
        );
        let health = &self.shared.health;
        match result {
            Ok(predictions) => {
                health.consecutive_failures.store(0, Ordering::SeqCst);
                for (job, p) in batch.into_iter().zip(predictions) {
                    let _ = job.reply.send(Ok(p));
                }
            }
            Err(msg) => {
                health.consecutive_failures.fetch_add(1, Ordering::SeqCst);
                m.batch_failures.inc();
                tracing::error!(error = %msg, rows = batch.len(), "forward pass failed");
                for job in batch {
                    let _ = job.reply.send(Err(JobError::Failed(msg.clone())));
                }
            }
        }
    }
}

/// What the encoder pays for a batch: every row padded to the longest row and longest prefix.
fn padded_cost(jobs: &[Job]) -> usize {
    let s = jobs.iter().map(|j| j.tokens.len()).max().unwrap_or(0);
    let p = jobs
        .iter()
        .map(|j| j.task.num_virtual_tokens())
        .max()
        .unwrap_or(0);
    jobs.len() * (s + p)
}

/// Picks the next batch out of `pending` (arrival order) and removes it.
///
/// The oldest row always goes in, so nothing starves. Around it the batch grows through the rows
/// nearest to it in padded length, one at a time, while the padded cost stays within budget: rows
/// of similar length travel together and little compute goes to padding.
fn take_batch(pending: &mut Vec<Job>, config: &BatcherConfig) -> Vec<Job> {
    if pending.is_empty() {
        return Vec::new();
    }
    let mut by_len: Vec<usize> = (0..pending.len()).collect();
    by_len.sort_by_key(|&i| (pending[i].padded_len(), i));
    let anchor = by_len.iter().position(|&i| i == 0).unwrap_or(0);
    let (mut lo, mut hi) = (anchor, anchor + 1); // window [lo, hi) in by_len
    let (mut max_s, mut max_p) = (
        pending[0].tokens.len(),
        pending[0].task.num_virtual_tokens(),
    );
    let fits = |rows: usize, s: usize, p: usize| {
        rows <= config.max_batch_rows && rows * (s + p) <= config.max_batch_tokens
    };
    let key = |i: usize| pending[by_len[i]].padded_len();
    let target = key(anchor);
    loop {
        let below = (lo > 0).then(|| lo - 1);
        let above = (hi < by_len.len()).then_some(hi);
        let next = match (below, above) {
            (Some(b), Some(a)) => {
                if target - key(b) <= key(a) - target {
                    b
                } else {
                    a
                }
            }
            (Some(b), None) => b,
            (None, Some(a)) => a,
            (None, None) => break,
        };
        let job = &pending[by_len[next]];
        let (s, p) = (
            max_s.max(job.tokens.len()),
            max_p.max(job.task.num_virtual_tokens()),
        );
        if !fits(hi - lo + 1, s, p) {
            break;
        }
        (max_s, max_p) = (s, p);
        if next < lo {
            lo = next;
        } else {
            hi = next + 1;
        }
    }
    let mut take = vec![false; pending.len()];
    for &i in &by_len[lo..hi] {
        take[i] = true;
    }
    let (mut batch, mut rest) = (
        Vec::with_capacity(hi - lo),
        Vec::with_capacity(pending.len()),
    );
    for (job, chosen) in pending.drain(..).zip(take) {
        if chosen {
            batch.push(job);
        } else {
            rest.push(job);
        }
    }
    *pending = rest;
    batch
}

#[cfg(test)]
mod tests;
