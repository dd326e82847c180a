//! The HTTP server: axum handlers in front of one model thread.
//!
//! Shape (after text-embeddings-inference): handlers validate and tokenize, the [`Batcher`] owns
//! the only thread that runs the model, and the [`Registry`] hands out immutable `Arc<Task>`s.
//! All shared state lives in one [`AppState`] behind an `Arc`, so every handler gets a cheap
//! clone and nothing needs a lock except the registry's short read.

mod admin;
mod api;
mod batcher;
mod body;
mod error;
mod metrics;
mod openapi;
pub mod registry;

pub use api::{ClassifyResponse, ClassifyResult, TaskInfo};
pub use batcher::{Batcher, BatcherConfig};
pub use error::ErrorBody;
pub use metrics::Metrics;
pub use openapi::ApiDoc;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post, put};
use axum::Router;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::engine::{Engine, EngineConfig, Row, TextEncoder, TextInput};
use crate::serving::registry::{Registry, RegistryObserver};
use crate::prefix::synthetic::random_prefix;
use crate::engine::Task;

/// Limits on what one request may ask.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Inputs in one classify request.
    pub max_inputs: usize,
    /// Characters in one text (before tokenization; tokens are truncated anyway).
    pub max_text_chars: usize,
    /// Body size of a classify request.
    pub max_request_bytes: usize,
    /// Body size of an admin upload.
    pub max_upload_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_inputs: 256,
            max_text_chars: 100_000,
            max_request_bytes: 2 << 20,
            max_upload_bytes: 64 << 20,
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
    pub batcher: BatcherConfig,
    pub limits: RequestLimits,
    /// How long queued and in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Watch the prefixes directory for changes made by hand.
    pub watch: bool,
}

/// Everything a handler needs, shared behind one `Arc`.
pub struct AppState {
    pub registry: Registry,
    pub batcher: Batcher,
    pub text: TextEncoder,
    pub metrics: Arc<Metrics>,
    pub admin_token: Option<String>,
    pub limits: RequestLimits,
    draining: AtomicBool,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limits = state.limits.clone();
    let openapi = ApiDoc::openapi();
    // Bodies are buffered (and limited) by `body::buffer_body`, so extractors need no limit of
    // their own.
    let (request_limit, upload_limit) = (limits.max_request_bytes, limits.max_upload_bytes);
    let classify = Router::new()
        .route("/v1/classify", post(api::classify))
        .layer(middleware::from_fn(move |req, next| {
            body::buffer_body(request_limit, req, next)
        }));
    let admin = Router::new()
        .route(
            "/v1/admin/tasks/{task}",
            put(admin::put_task).delete(admin::delete_task),
        )
        .layer(middleware::from_fn(move |req, next| {
            body::buffer_body(upload_limit, req, next)
        }));
    Router::new()
        .merge(classify)
        .merge(admin)
        .route("/v1/tasks", get(api::list_tasks))
        .route("/v1/tasks/{task}", get(api::get_task))
        .route("/health", get(api::health))
        .route("/v2/health/live", get(api::health))
        .route("/ready", get(api::ready))
        .route("/v2/health/ready", get(api::ready))
        .route("/metrics", get(api::metrics))
        .route(
            "/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { axum::Json(doc) }
            }),
        )
        .fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such route (see /openapi.json)",
            )
        })
        .with_state(state)
        .layer(DefaultBodyLimit::disable())
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
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

/// One forward pass so the first request does not pay for lazy initialisation.
fn warm_up(engine: &Engine) -> anyhow::Result<()> {
    let info = engine.model_info().clone();
    let file = random_prefix(&info, "warmup", 4, 2, &mut rand::rng())?;
    let task = Task::from_file(&file, &info, &file.to_bytes()?)?;
    let tokens = engine
        .text_encoder()
        .encode(&TextInput::single("warm up the model"), 4)?;
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
    let metrics = Arc::new(Metrics::new()?);
    let engine_config = config.engine.clone();
    let engine = tokio::task::spawn_blocking(move || -> anyhow::Result<Engine> {
        let engine = Engine::load(&engine_config)?;
        warm_up(&engine)?;
        Ok(engine)
    })
    .await??;
    let info = engine.model_info().clone();
    tracing::info!(model = %info.name, layers = info.layers, hidden = info.hidden, "model loaded");

    let observer: Arc<dyn RegistryObserver> = metrics.clone();
    let dir = config.prefixes_dir.clone();
    let registry = tokio::task::spawn_blocking(move || Registry::open(&dir, info, Some(observer)))
        .await?
        .with_context(|| format!("prefixes directory {}", config.prefixes_dir.display()))?;
    tracing::info!(tasks = registry.len(), dir = %config.prefixes_dir.display(), "prefixes loaded");
    let _watch = if config.watch {
        Some(
            registry
                .watch()
                .context("watching the prefixes directory")?,
        )
    } else {
        None
    };

    let text = engine.text_encoder().clone();
    let (batcher, model_thread) = Batcher::start(engine, config.batcher.clone(), metrics.clone())?;
    let state = Arc::new(AppState {
        registry,
        batcher: batcher.clone(),
        text,
        metrics,
        admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
        limits: config.limits.clone(),
        draining: AtomicBool::new(false),
    });

    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port when --addr ends in :0.
    println!("prefixd listening on http://{addr}");
    tracing::info!(%addr, "serving");

    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let signal_state = state.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested: draining");
        signal_state.draining.store(true, Ordering::SeqCst);
        let _ = drain_tx.send(true);
    });
    let mut graceful_rx = drain_rx.clone();
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(async move {
            let _ = graceful_rx.wait_for(|d| *d).await;
        })
        .into_future();
    let mut deadline_rx = drain_rx;
    let timeout = config.shutdown_timeout;
    tokio::select! {
        result = server => result?,
        _ = async {
            let _ = deadline_rx.wait_for(|d| *d).await;
            tokio::time::sleep(timeout).await;
        } => tracing::warn!("shutdown timeout reached with requests still open"),
    }
    batcher.close();
    let _ = tokio::task::spawn_blocking(move || model_thread.join()).await;
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
