//! Prometheus metrics. Names follow Prometheus practice: a `prefixd_` namespace, base units
//! (`_seconds`), `_total` on counters, no colons.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::serving::registry::{LoadOrigin, RegistryObserver};

/// Tasks that get their own `task` label; every other task is counted as `task="other"`. Keeps
/// `/metrics` bounded (~19 lines a task) at any task count, totals unchanged.
pub const DEFAULT_MAX_TASK_LABELS: usize = 100;

pub struct Metrics {
    registry: Registry,
    /// The tasks labelled so far, in order of first request, at most `max_task_labels`.
    task_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    max_task_labels: usize,
    /// `process_*` (CPU, memory, file descriptors, start time) under their conventional names,
    /// without the `prefixd_` namespace the main registry adds.
    process: Registry,
    build_info: prometheus::IntGaugeVec,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: Histogram,
    pub inference_duration: Histogram,
    pub batch_size: Histogram,
    pub batch_tokens: Histogram,
    pub batch_tasks: Histogram,
    pub queue_depth: IntGauge,
    pub batch_failures: IntCounter,
    pub model_panics: IntCounter,
    pub tasks_loaded: IntGauge,
    pub prefix_loads: IntCounterVec,
    pub store_syncs: IntCounterVec,
    pub store_sync_duration: Histogram,
    pub store_stale: IntGauge,
    pub store_last_sync: prometheus::Gauge,
    pub task_lookups: IntCounterVec,
    pub task_load_duration: Histogram,
    pub tasks_evicted: IntCounter,
    pub resident_tasks: IntGauge,
    pub resident_bytes: IntGauge,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        Self::with_task_labels(DEFAULT_MAX_TASK_LABELS)
    }

    /// `max_task_labels`: how many tasks get their own series (the first to be asked for).
    pub fn with_task_labels(max_task_labels: usize) -> prometheus::Result<Self> {
        Self::build(max_task_labels, false)
    }

    /// Also registers the `prefixd_store_*` series when `with_store`.
    pub fn build(max_task_labels: usize, with_store: bool) -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("prefixd".into()), None)?;
        let seconds = exponential_buckets(0.0005, 2.0, 16)?; // 0.5 ms … 16 s
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("requests_total", "Classify requests by task and HTTP status."),
                &["task", "status"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "request_duration_seconds",
                    "Classify request time, from arrival to response.",
                )
                .buckets(seconds.clone()),
                &["task"],
            )?,
            queue_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "queue_duration_seconds",
                    "Time a row waited in the queue before its batch started.",
                )
                .buckets(seconds.clone()),
            )?,
            inference_duration: Histogram::with_opts(
                HistogramOpts::new("inference_duration_seconds", "Forward pass time per batch.")
                    .buckets(seconds),
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new("batch_size", "Rows per batch.")
                    .buckets(exponential_buckets(1.0, 2.0, 9)?),
            )?,
            batch_tokens: Histogram::with_opts(
                HistogramOpts::new(
                    "batch_tokens",
                    "Padded tokens per batch: rows × (longest row + longest prefix).",
                )
                .buckets(exponential_buckets(16.0, 2.0, 12)?),
            )?,
            batch_tasks: Histogram::with_opts(
                HistogramOpts::new("batch_tasks", "Distinct tasks per batch.")
                    .buckets(exponential_buckets(1.0, 2.0, 9)?),
            )?,
            queue_depth: IntGauge::new("queue_depth", "Rows waiting for a batch.")?,
            batch_failures: IntCounter::new(
                "batch_failures_total",
                "Forward passes that failed (their rows were answered with an error).",
            )?,
            model_panics: IntCounter::new(
                "model_panics_total",
                "Forward passes that panicked (caught; the model thread carried on).",
            )?,
            tasks_loaded: IntGauge::new("tasks_loaded", "Tasks in the registry.")?,
            prefix_loads: IntCounterVec::new(
                Opts::new(
                    "prefix_loads_total",
                    "Prefix load attempts by origin (startup, watch, rescan, upload, store, demand) and result (ok, error).",
                ),
                &["origin", "result"],
            )?,
            store_syncs: IntCounterVec::new(
                Opts::new(
                    "store_syncs_total",
                    "Sync passes with the prefix store, by result (ok, error).",
                ),
                &["result"],
            )?,
            store_sync_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "store_sync_duration_seconds",
                    "Time a sync pass with the prefix store took (list, fetch, validate, swap).",
                )
                .buckets(exponential_buckets(0.001, 4.0, 10)?),
            )?,
            store_stale: IntGauge::new(
                "store_stale",
                "1 while the prefix store cannot be read (the last pass failed): tasks may be behind it.",
            )?,
            store_last_sync: prometheus::Gauge::new(
                "store_last_sync_timestamp_seconds",
                "Unix time of the end of the last successful sync pass with the prefix store.",
            )?,
            task_lookups: IntCounterVec::new(
                Opts::new(
                    "task_lookups_total",
                    "Requests by whether their task's weights were in memory (hit) or loaded (miss).",
                ),
                &["result"],
            )?,
            task_load_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "task_load_duration_seconds",
                    "Time to load a task's weights from its file for a request (a miss).",
                )
                .buckets(exponential_buckets(0.0001, 2.0, 16)?),
            )?,
            tasks_evicted: IntCounter::new(
                "tasks_evicted_total",
                "Tasks whose weights were dropped from memory to stay within --max-resident-bytes.",
            )?,
            resident_tasks: IntGauge::new("resident_tasks", "Tasks with weights in memory.")?,
            resident_bytes: IntGauge::new(
                "resident_bytes",
                "Bytes of task weights in memory (prefix keys/values and heads, f32).",
            )?,
            build_info: prometheus::IntGaugeVec::new(
                Opts::new("build_info", "Always 1; the labels say what is running."),
                &["version", "cuda", "device", "dtype", "cpu_isa", "model", "model_fingerprint"],
            )?,
            process: Registry::new(),
            task_labels: Default::default(),
            max_task_labels,
            registry,
        };
        #[cfg(target_os = "linux")]
        m.process.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let r = &m.registry;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.request_duration.clone()))?;
        r.register(Box::new(m.queue_duration.clone()))?;
        r.register(Box::new(m.inference_duration.clone()))?;
        r.register(Box::new(m.batch_size.clone()))?;
        r.register(Box::new(m.batch_tokens.clone()))?;
        r.register(Box::new(m.batch_tasks.clone()))?;
        r.register(Box::new(m.queue_depth.clone()))?;
        r.register(Box::new(m.batch_failures.clone()))?;
        r.register(Box::new(m.model_panics.clone()))?;
        r.register(Box::new(m.tasks_loaded.clone()))?;
        r.register(Box::new(m.prefix_loads.clone()))?;
        r.register(Box::new(m.build_info.clone()))?;
        r.register(Box::new(m.task_lookups.clone()))?;
        r.register(Box::new(m.task_load_duration.clone()))?;
        r.register(Box::new(m.tasks_evicted.clone()))?;
        r.register(Box::new(m.resident_tasks.clone()))?;
        r.register(Box::new(m.resident_bytes.clone()))?;
        // Only a server with a prefix store has these series.
        if with_store {
            r.register(Box::new(m.store_syncs.clone()))?;
            r.register(Box::new(m.store_sync_duration.clone()))?;
            r.register(Box::new(m.store_stale.clone()))?;
            r.register(Box::new(m.store_last_sync.clone()))?;
        }
        Ok(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Metrics {
    /// The `task` label for a registered task: its name while there is room, else `other`.
    pub fn task_label<'a>(&self, task: &'a str) -> &'a str {
        let mut labels = self.task_labels.lock().unwrap_or_else(|e| e.into_inner());
        if labels.contains(task) {
            return task;
        }
        if labels.len() < self.max_task_labels && task != "other" {
            labels.insert(task.to_string());
            return task;
        }
        "other"
    }

    /// Sets `prefixd_build_info` from what the server runs.
    pub fn build_info(&self, info: &crate::serving::ServerInfo) {
        let m = &info.model;
        let cuda = if info.cuda_build { "true" } else { "false" };
        let model = m.hub_id.as_deref().unwrap_or(&m.name);
        self.build_info
            .with_label_values(&[
                &info.version,
                cuda,
                &m.device,
                &m.dtype,
                &m.cpu_isa,
                model,
                &m.fingerprint,
            ])
            .set(1);
    }
}

impl RegistryObserver for Metrics {
    fn prefix_load(&self, origin: LoadOrigin, ok: bool) {
        self.prefix_loads
            .with_label_values(&[origin.as_str(), if ok { "ok" } else { "error" }])
            .inc();
    }

    fn tasks_loaded(&self, count: usize) {
        self.tasks_loaded.set(count as i64);
    }

    fn task_lookup(&self, hit: bool) {
        self.task_lookups
            .with_label_values(&[if hit { "hit" } else { "miss" }])
            .inc();
    }

    fn task_load(&self, took: std::time::Duration) {
        self.task_load_duration.observe(took.as_secs_f64());
    }

    fn tasks_evicted(&self, count: usize) {
        self.tasks_evicted.inc_by(count as u64);
    }

    fn resident(&self, tasks: usize, bytes: usize) {
        self.resident_tasks.set(tasks as i64);
        self.resident_bytes.set(bytes as i64);
    }

    fn store_sync(
        &self,
        status: &crate::serving::registry::StoreStatus,
        took: std::time::Duration,
    ) {
        let ok = status.error.is_none();
        self.store_syncs
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        self.store_sync_duration.observe(took.as_secs_f64());
        self.store_stale.set(status.stale as i64);
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.store_last_sync.set(now.as_secs_f64());
        }
    }
}
