//! The HTTP server: axum handlers in front of one model thread.
//!
//! Shape (after text-embeddings-inference): handlers parse and shape; every classification goes
//! through one door, [`Infer`] (task lookup, limits, tokenization, admission, answers); the
//! [`Batcher`] owns the only thread that runs the model; the [`Registry`] hands out immutable
//! `Arc<Task>`s. Shared state lives in one [`AppState`] behind an `Arc`, so every handler gets a
//! cheap clone and nothing needs a lock except the registry's short read.
//!
//! `server.rs` owns connections (cap, header timeout, drain); `body.rs` reads bodies within bounds
//! and turns every error into JSON; `admin.rs` checks who is asking before any body is read.

mod admin;
mod api;
mod auth;
mod batcher;
mod body;
mod error;
mod hf;
mod infer;
mod kserve;
mod metrics;
mod observe;
mod openapi;
pub mod registry;
mod server;

pub use api::{ClassifyResponse, ClassifyResult, TaskInfo};
pub use auth::ApiKeys;
pub use batcher::{Backend, Batcher, BatcherConfig, Job, JobError, ModelHealth, SubmitError};
pub use body::BodyLimits;
pub use error::ErrorBody;
pub use infer::{Classified, Infer, InferError, InputLimits};
pub use metrics::{Metrics, DEFAULT_MAX_TASK_LABELS};
pub use observe::ServerInfo;
pub use openapi::ApiDoc;
pub use registry::{StoreConfig, StoreStatus};
pub use server::ConnConfig;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post, put};
use axum::Router;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::engine::{Engine, EngineConfig, Row, Task, TextInput};
use crate::prefix::synthetic::random_prefix;
use registry::{Registry, RegistryObserver};

/// Limits on what one request may send or ask.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub inputs: InputLimits,
    /// Body size of a classify request.
    pub max_request_bytes: usize,
    /// Body size of an admin upload, and the largest prefix file read from the prefixes folder.
    pub max_upload_bytes: usize,
    /// Longest gap between two pieces of a request body.
    pub body_idle_timeout: Duration,
    /// Longest time for a whole request body.
    pub body_timeout: Duration,
    /// Uploads read or installed at once.
    pub max_concurrent_uploads: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            inputs: InputLimits {
                max_inputs: 256,
                max_text_chars: 100_000,
            },
            max_request_bytes: 2 << 20,
            max_upload_bytes: 64 << 20,
            body_idle_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(300),
            max_concurrent_uploads: 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub engine: EngineConfig,
    pub prefixes_dir: PathBuf,
    pub addr: SocketAddr,
    /// Admin routes are disabled without one.
    pub admin_token: Option<String>,
    /// Keys that inference and listing routes require; none leaves them open.
    pub api_keys: ApiKeys,
    pub batcher: BatcherConfig,
    pub limits: RequestLimits,
    pub connections: ConnConfig,
    /// After SIGTERM/SIGINT, how long the listener keeps accepting (readiness already 503).
    pub drain_delay: Duration,
    /// Then, how long in-flight and queued requests get to finish.
    pub shutdown_timeout: Duration,
    /// Watch the prefixes directory for changes made by hand.
    pub watch: bool,
    /// Also re-read the whole prefixes directory this often (a safety net under the watcher).
    pub rescan_interval: Option<Duration>,
    /// Tasks with their own series in `/metrics`; the rest are counted as `task="other"`.
    pub metrics_max_tasks: usize,
    /// A prefix store shared by replicas; `prefixes_dir` is then its local cache.
    pub store: Option<StoreSettings>,
    /// Most bytes of task weights in memory (least recently used dropped past it); None: all.
    pub max_resident_bytes: Option<usize>,
}

/// `--prefixes s3://…`: where the store is and how often to converge on it.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub store: registry::StoreConfig,
    pub sync_interval: Duration,
}

/// Everything a handler needs, shared behind one `Arc`.
pub struct AppState {
    pub infer: Infer,
    pub metrics: Arc<Metrics>,
    pub admin: admin::Admin,
    pub api_keys: ApiKeys,
    pub limits: RequestLimits,
    /// What `GET /info` says (its task count is filled in when asked).
    pub info: ServerInfo,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(
        infer: Infer,
        metrics: Arc<Metrics>,
        admin_token: Option<String>,
        limits: RequestLimits,
    ) -> Self {
        Self {
            admin: admin::Admin::new(admin_token, limits.max_concurrent_uploads),
            api_keys: ApiKeys::default(),
            info: ServerInfo::default(),
            infer,
            metrics,
            limits,
            draining: AtomicBool::new(false),
        }
    }

    pub fn with_info(mut self, info: ServerInfo) -> Self {
        self.info = info;
        self
    }

    /// Requires one of `keys` on the inference and listing routes.
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = keys;
        self
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Readiness turns 503; requests are still served.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limits = state.limits.clone();
    let openapi = ApiDoc::openapi();
    let body = |max_bytes| BodyLimits {
        max_bytes,
        idle_timeout: limits.body_idle_timeout,
        total_timeout: limits.body_timeout,
    };
    let (request_body, upload_body) = (
        body(limits.max_request_bytes),
        body(limits.max_upload_bytes),
    );
    // Layers run outermost-last-added: the API key is checked before the body is read.
    // Every classifying route (ours, the Hugging Face shape, KServe v2) goes through one door:
    // `Infer::classify`.
    let classify = Router::new()
        .route("/v1/classify", post(api::classify))
        .route("/v1/tasks/{task}/predict", post(hf::predict))
        .route("/v2/models/{task}/infer", post(kserve::infer))
        .layer(middleware::from_fn(move |req, next| {
            body::buffer_body(request_body, req, next)
        }))
        .route("/v1/tasks", get(api::list_tasks))
        .route("/v1/tasks/{task}", get(api::get_task))
        .route("/v2/models", get(kserve::list_models))
        .route("/v2/models/{task}", get(kserve::model_metadata))
        .route("/v2/models/{task}/ready", get(kserve::model_ready))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    // The admin token, not an API key, guards these.
    let admin = Router::new()
        .route(
            "/v1/admin/tasks/{task}",
            put(admin::put_task).delete(admin::delete_task),
        )
        .layer(middleware::from_fn(move |req, next| {
            body::buffer_body(upload_body, req, next)
        }))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            admin::authorize,
        ));
    Router::new()
        .merge(classify)
        .merge(admin)
        .route("/health", get(api::health))
        .route("/v2/health/live", get(api::health))
        .route("/ready", get(api::ready))
        .route("/v2/health/ready", get(api::ready))
        .route("/metrics", get(api::metrics))
        .route("/info", get(observe::info))
        .route("/v2", get(kserve::server_metadata))
        // The playground and the docs are static, served from the binary: no network needed.
        .route("/", get(playground))
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such route (see /openapi.json)",
            )
        })
        .with_state(state)
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(body::json_errors))
        .layer(middleware::from_fn(observe::access_log))
        .layer(
            // Failures are logged where they happen, with their reason; a 503 at shutdown or a
            // 500 the model thread already reported is not news worth a second ERROR line.
            TraceLayer::new_for_http().on_failure(()).make_span_with(|req: &axum::http::Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::debug_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// `GET /`: a page to try the tasks from a browser (list, classify, scores as bars, the curl).
async fn playground() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("assets/playground.html"))
}

/// What `GET /info` and `prefixd_build_info` say about this server.
fn describe(engine: &Engine, config: &ServeConfig) -> ServerInfo {
    let m = engine.model_info();
    let model = engine.model();
    ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        cuda_build: cfg!(feature = "cuda"),
        model: observe::ModelDescription {
            name: m.name.clone(),
            hub_id: m.hub_id.clone(),
            fingerprint: m.fingerprint.clone(),
            layers: m.layers,
            hidden: m.hidden,
            heads: m.heads,
            max_positions: m.max_positions,
            device: crate::model::device_name(model.device()),
            dtype: format!("{:?}", model.dtype()).to_lowercase(),
            cpu_isa: crate::model::isa::active().name().to_string(),
        },
        limits: observe::LimitsDescription {
            max_length: engine.text_encoder().max_length(),
            max_inputs: config.limits.inputs.max_inputs,
            max_text_chars: config.limits.inputs.max_text_chars,
            max_request_bytes: config.limits.max_request_bytes,
            max_upload_bytes: config.limits.max_upload_bytes,
            max_batch_rows: config.batcher.max_batch_rows,
            max_batch_tokens: config.batcher.max_batch_tokens,
            max_queue_rows: config.batcher.max_queue_rows,
        },
        tasks: 0,
        resident_tasks: 0,
        api_key_required: config.api_keys.required(),
        admin_enabled: config.admin_token.as_deref().is_some_and(|t| !t.is_empty()),
        store: None, // filled in when asked
    }
}

/// One forward pass so the first request does not pay for lazy initialisation.
fn warm_up(engine: &Engine) -> anyhow::Result<()> {
    let info = engine.model_info().clone();
    let file = random_prefix(&info, "warmup", 4, 2, &mut rand::rng())?;
    let task = Task::from_file(&file, &info, &file.to_bytes()?)?;
    // The empty text is [CLS] [SEP]: in every vocabulary, whatever the tokenizer.
    let tokens = engine.text_encoder().encode(&TextInput::single(""), 4)?;
    engine.classify(&[Row {
        task: &task,
        tokens: &tokens,
    }])?;
    Ok(())
}

/// Loads the model and the prefixes, binds, serves until SIGTERM/SIGINT, drains, returns.
pub fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()?;
    runtime.block_on(serve_async(config))
}

async fn serve_async(config: ServeConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::build(
        config.metrics_max_tasks,
        config.store.is_some(),
    )?);
    let engine_config = config.engine.clone();
    let engine = tokio::task::spawn_blocking(move || -> anyhow::Result<Engine> {
        let engine = Engine::load(&engine_config)?;
        warm_up(&engine)?;
        Ok(engine)
    })
    .await??;
    let info = engine.model_info().clone();
    tracing::info!(model = %info.name, layers = info.layers, hidden = info.hidden, "model loaded");
    let server_info = describe(&engine, &config);
    metrics.build_info(&server_info);

    let observer: Arc<dyn RegistryObserver> = metrics.clone();
    let dir = config.prefixes_dir.clone();
    let max_file = config.limits.max_upload_bytes;
    let registry_config = registry::RegistryConfig {
        max_file_bytes: max_file,
        max_resident_bytes: config.max_resident_bytes,
        observer: Some(observer),
    };
    let (registry, _sync) = match &config.store {
        None => {
            let registry = tokio::task::spawn_blocking(move || {
                Registry::open_lazy(&dir, info, registry_config)
            })
            .await?
            .with_context(|| format!("prefixes directory {}", config.prefixes_dir.display()))?;
            tracing::info!(tasks = registry.len(), dir = %config.prefixes_dir.display(), "prefixes indexed");
            (registry, None)
        }
        Some(settings) => {
            let store = registry::PrefixStore::open(&settings.store)?;
            let interval = settings.sync_interval;
            let registry = tokio::task::spawn_blocking(move || {
                Registry::open_store(&dir, info, registry_config, store, interval)
            })
            .await?
            .with_context(|| format!("prefix cache {}", config.prefixes_dir.display()))?;
            tracing::info!(
                cached_tasks = registry.len(), cache = %config.prefixes_dir.display(),
                store = %settings.store.url, "prefix cache loaded; syncing with the store"
            );
            // Readiness waits for the first pass; requests for cached tasks are served already.
            let sync = registry.start_sync();
            (registry, Some(sync))
        }
    };
    // Serving starts now; the weights load behind it (a request for a task not loaded yet
    // loads that one first).
    {
        let registry = registry.clone();
        std::thread::Builder::new()
            .name("prefix-warm-up".into())
            .spawn(move || registry.warm_up())?;
    }
    let _watch = if config.watch && config.store.is_none() {
        Some(
            registry
                .watch(config.rescan_interval)
                .context("watching the prefixes directory")?,
        )
    } else {
        None
    };

    let text = engine.text_encoder().clone();
    let (batcher, model_thread) = Batcher::start(engine, config.batcher.clone(), metrics.clone())?;
    let infer = Infer::new(
        registry,
        text,
        batcher.clone(),
        config.limits.inputs.clone(),
    );
    let state = Arc::new(
        AppState::new(
            infer,
            metrics,
            config.admin_token.clone(),
            config.limits.clone(),
        )
        .with_api_keys(config.api_keys.clone())
        .with_info(server_info),
    );
    if !state.api_keys.required() {
        tracing::info!(
            "no --api-key: classify and task listing are open to anyone who can connect"
        );
    }

    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port when --addr ends in :0. Written, not
    // `println!`ed: an unwritable stdout must not stop the server from starting.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "prefixd listening on http://{addr}").and_then(|_| out.flush());
    }
    tracing::info!(%addr, "serving");
    let mut listener =
        server::Listener::start(listener, router(state.clone()), config.connections.clone());

    shutdown_signal().await;
    state.start_draining();
    tracing::info!(
        drain_delay_s = config.drain_delay.as_secs_f64(),
        "shutdown requested: readiness 503, still serving"
    );
    tokio::time::sleep(config.drain_delay).await;
    tracing::info!("listener closed; finishing in-flight requests");
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    if !listener.close(deadline).await {
        let queued = batcher.queued();
        tracing::warn!(
            queued_rows = queued,
            "shutdown timeout: queued rows get 503"
        );
        batcher.abort();
        // The 503s (and the batch already running) still have to reach their clients.
        listener
            .close(tokio::time::Instant::now() + Duration::from_secs(2))
            .await;
    }
    batcher.close();
    // The model thread exits after the batch it is running; do not wait on it for ever.
    let joined = tokio::task::spawn_blocking(move || model_thread.join());
    let _ = tokio::time::timeout(Duration::from_secs(5), joined).await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
