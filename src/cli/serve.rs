//! `prefixd serve`: the HTTP server. Every flag can also be set by its `PREFIXD_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::ModelArgs;
use crate::serving::registry::is_store_url;
use crate::serving::{
    BatcherConfig, ConnConfig, InputLimits, RequestLimits, ServeConfig, StoreConfig, StoreSettings,
};
use sha2::Digest;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where the tasks are: a directory of native prefix files (<task>.safetensors), loaded at
    /// start and watched; or a prefix store shared by replicas — s3://bucket/path/ (credentials,
    /// region and endpoint from the standard AWS_* variables), gs://…, az://… or file:///dir/ —
    /// that every replica syncs with (see --sync-interval, --prefix-cache).
    #[arg(long, env = "PREFIXD_PREFIXES", default_value = "prefixes")]
    pub prefixes: String,
    /// With a prefix store: the local folder that caches it, so a replica restarted while the
    /// store is unreachable still serves (default: a folder per store under the temp dir).
    #[arg(long, env = "PREFIXD_PREFIX_CACHE")]
    pub prefix_cache: Option<PathBuf>,
    /// With a prefix store: seconds between syncs (list, fetch what changed, drop what is gone).
    #[arg(long, env = "PREFIXD_SYNC_INTERVAL", default_value_t = 5.0)]
    pub sync_interval: f64,
    /// An S3-compatible server's URL (MinIO, Ceph, …), e.g. http://minio:9000; AWS_ENDPOINT_URL
    /// works too.
    #[arg(long, env = "PREFIXD_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// With a prefix store: seconds one request to it may take before the upload fails or the
    /// sync pass is retried later.
    #[arg(long, env = "PREFIXD_STORE_TIMEOUT", default_value_t = 10.0)]
    pub store_timeout: f64,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "PREFIXD_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Bearer token for the /v1/admin routes; without one they are disabled.
    #[arg(long, env = "PREFIXD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// API key that /v1/classify and /v1/tasks require as `Authorization: Bearer <key>`; repeat
    /// the flag (or separate with commas in the variable) for several keys. Without one those
    /// routes are open. Health, readiness, metrics and the API documents stay open.
    #[arg(
        long = "api-key",
        env = "PREFIXD_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,
    /// Most rows in one forward pass.
    #[arg(long, env = "PREFIXD_MAX_BATCH_ROWS", default_value_t = 64)]
    pub max_batch_rows: usize,
    /// Most padded tokens in one forward pass: rows × (longest row + longest prefix).
    #[arg(long, env = "PREFIXD_MAX_BATCH_TOKENS", default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Most rows waiting for the model; requests beyond it get 429.
    #[arg(long, env = "PREFIXD_MAX_QUEUE_ROWS", default_value_t = 2048)]
    pub max_queue_rows: usize,
    /// Most inputs in one classify request.
    #[arg(long, env = "PREFIXD_MAX_INPUTS", default_value_t = 256)]
    pub max_inputs: usize,
    /// Most characters in one text.
    #[arg(long, env = "PREFIXD_MAX_TEXT_CHARS", default_value_t = 100_000)]
    pub max_text_chars: usize,
    /// Most bytes in a classify request body.
    #[arg(long, env = "PREFIXD_MAX_REQUEST_BYTES", default_value_t = 2 << 20)]
    pub max_request_bytes: usize,
    /// Most bytes in an admin upload.
    #[arg(long, env = "PREFIXD_MAX_UPLOAD_BYTES", default_value_t = 64 << 20)]
    pub max_upload_bytes: usize,
    /// Seconds a request body may pause between two pieces before the request gets 408.
    #[arg(long, env = "PREFIXD_BODY_IDLE_TIMEOUT", default_value_t = 10.0)]
    pub body_idle_timeout: f64,
    /// Seconds a whole request body may take.
    #[arg(long, env = "PREFIXD_BODY_TIMEOUT", default_value_t = 300.0)]
    pub body_timeout: f64,
    /// Admin uploads read or installed at once; more get 429.
    #[arg(long, env = "PREFIXD_MAX_CONCURRENT_UPLOADS", default_value_t = 2)]
    pub max_concurrent_uploads: usize,
    /// Most open connections; past it, new clients wait to be accepted.
    #[arg(long, env = "PREFIXD_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers; also how long an idle kept-alive
    /// connection stays open.
    #[arg(long, env = "PREFIXD_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// After SIGTERM/SIGINT: seconds during which /ready answers 503 but requests are still
    /// accepted and served (set it to the load balancer's reaction time, e.g. on Kubernetes).
    #[arg(long, env = "PREFIXD_DRAIN_DELAY", default_value_t = 0.0)]
    pub drain_delay: f64,
    /// Then: seconds that in-flight and queued requests get to finish; rows still queued at the
    /// deadline are answered 503 and the process exits.
    #[arg(long, env = "PREFIXD_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Do not watch the prefixes directory for changes made by hand.
    #[arg(long, env = "PREFIXD_NO_WATCH")]
    pub no_watch: bool,
    /// Seconds between full rescans of the prefixes directory (a safety net under the watcher;
    /// 0 turns them off).
    #[arg(long, env = "PREFIXD_RESCAN_INTERVAL", default_value_t = 30.0)]
    pub rescan_interval: f64,
    /// Most bytes of task weights kept in memory . Past it the
    /// least recently used tasks are dropped from memory and reloaded from their files on their
    /// next request. 0: no limit (every task stays loaded).
    #[arg(long, env = "PREFIXD_MAX_RESIDENT_BYTES", default_value_t = 0)]
    pub max_resident_bytes: usize,
    /// Tasks that get their own series in /metrics (the first ones asked for); requests for the
    /// others are counted under task="other", so /metrics stays small at any task count.
    #[arg(long, env = "PREFIXD_METRICS_MAX_TASKS", default_value_t = crate::serving::DEFAULT_MAX_TASK_LABELS)]
    pub metrics_max_tasks: usize,
}

/// A local folder, or a store and the folder that caches it.
fn prefix_source(args: &ServeArgs) -> anyhow::Result<(PathBuf, Option<StoreSettings>)> {
    let prefixes = args.prefixes.trim();
    if !is_store_url(prefixes) {
        anyhow::ensure!(
            !prefixes.contains("://"),
            "--prefixes {prefixes:?}: not a folder and not a supported store (s3://, gs://, az://, file://)"
        );
        return Ok((PathBuf::from(prefixes), None));
    }
    let interval = seconds("sync-interval", args.sync_interval)?;
    anyhow::ensure!(
        interval >= Duration::from_millis(100),
        "--sync-interval must be at least 0.1 seconds"
    );
    let timeout = seconds("store-timeout", args.store_timeout)?;
    anyhow::ensure!(!timeout.is_zero(), "--store-timeout must be above 0");
    let cache = args.prefix_cache.clone().unwrap_or_else(|| {
        // One folder per store, so two servers on one machine with different stores never mix.
        let digest = sha2::Sha256::digest(prefixes.as_bytes());
        std::env::temp_dir().join(format!("prefixd-cache-{}", &hex::encode(digest)[..12]))
    });
    let store = StoreSettings {
        store: StoreConfig {
            url: prefixes.to_string(),
            s3_endpoint: args.s3_endpoint.clone(),
            request_timeout: timeout,
        },
        sync_interval: interval,
    };
    Ok((cache, Some(store)))
}

/// Seconds from a flag, refusing negative and non-finite values.
fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v >= 0.0,
        "--{flag} must be a number of seconds ≥ 0, got {v}"
    );
    Ok(Duration::from_secs_f64(v))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_inputs <= args.max_queue_rows,
        "--max-inputs ({}) must not exceed --max-queue-rows ({}): such a request could never be admitted",
        args.max_inputs,
        args.max_queue_rows
    );
    anyhow::ensure!(
        args.max_batch_rows > 0,
        "--max-batch-rows must be at least 1"
    );
    anyhow::ensure!(
        args.max_connections > 0 && args.max_concurrent_uploads > 0,
        "--max-connections and --max-concurrent-uploads must be at least 1"
    );
    let (prefixes_dir, store) = prefix_source(&args)?;
    crate::serving::serve(ServeConfig {
        engine: args.model.engine_config()?,
        prefixes_dir,
        store,
        addr: args.addr,
        admin_token: args.admin_token,
        api_keys: crate::serving::ApiKeys::new(args.api_keys),
        batcher: BatcherConfig {
            max_batch_rows: args.max_batch_rows,
            max_batch_tokens: args.max_batch_tokens,
            max_queue_rows: args.max_queue_rows,
        },
        limits: RequestLimits {
            inputs: InputLimits {
                max_inputs: args.max_inputs,
                max_text_chars: args.max_text_chars,
            },
            max_request_bytes: args.max_request_bytes,
            max_upload_bytes: args.max_upload_bytes,
            body_idle_timeout: seconds("body-idle-timeout", args.body_idle_timeout)?,
            body_timeout: seconds("body-timeout", args.body_timeout)?,
            max_concurrent_uploads: args.max_concurrent_uploads,
        },
        connections: ConnConfig {
            max_connections: args.max_connections,
            header_read_timeout: seconds("header-timeout", args.header_timeout)?,
        },
        drain_delay: seconds("drain-delay", args.drain_delay)?,
        shutdown_timeout: seconds("shutdown-timeout", args.shutdown_timeout)?,
        watch: !args.no_watch,
        rescan_interval: Some(seconds("rescan-interval", args.rescan_interval)?)
            .filter(|d| !d.is_zero()),
        metrics_max_tasks: args.metrics_max_tasks,
        max_resident_bytes: Some(args.max_resident_bytes).filter(|&b| b > 0),
    })
}
