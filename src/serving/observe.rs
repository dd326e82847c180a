//! What operators look at: `GET /info` (what is running, with which limits) and one access-log
//! line per request. Metrics live in `metrics`.

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;
use utoipa::ToSchema;

use super::AppState;

/// What a handler tells the access log about its request (carried in the response's
/// extensions, so the log line is written in one place for every route).
#[derive(Debug, Clone)]
pub struct AccessNote {
    pub task: String,
    pub rows: usize,
}

/// One `prefixd::access` line per request: method, route, status, task, rows, duration and
/// request id. At INFO; silence it with `RUST_LOG=…,prefixd::access=off`.
pub async fn access_log(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    // The route template (`/v1/tasks/{task}`), so that logs group by route; the raw path for
    // what matched none.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    let id = request_id(request.headers());
    let response = next.run(request).await;
    let note = response.extensions().get::<AccessNote>();
    tracing::info!(
        target: "prefixd::access",
        method = %method,
        route = %route,
        status = response.status().as_u16(),
        task = note.map_or("", |n| n.task.as_str()),
        rows = note.map_or(0, |n| n.rows),
        duration_ms = (start.elapsed().as_secs_f64() * 1e3 * 1000.0).round() / 1000.0,
        request_id = %id,
        "request"
    );
    response
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The model a server runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ModelDescription {
    /// What the model's `config.json` calls itself.
    pub name: String,
    /// The hub id of these exact weights, when known.
    pub hub_id: Option<String>,
    /// `sha256:<hex>` of `model.safetensors`.
    pub fingerprint: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub max_positions: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// The CPU kernels in use (`avx512`, `avx2`, `scalar`); on a GPU, what the host uses.
    pub cpu_isa: String,
}

/// The limits a client must stay within.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct LimitsDescription {
    /// Inputs are truncated to this many tokens (a task may record a shorter length).
    pub max_length: usize,
    pub max_inputs: usize,
    pub max_text_chars: usize,
    pub max_request_bytes: usize,
    pub max_upload_bytes: usize,
    pub max_batch_rows: usize,
    pub max_batch_tokens: usize,
    pub max_queue_rows: usize,
}

/// `GET /info`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    pub version: String,
    /// Whether this binary was built with the `cuda` feature.
    pub cuda_build: bool,
    pub model: ModelDescription,
    pub limits: LimitsDescription,
    /// Tasks being served now.
    pub tasks: usize,
    /// Of those, tasks whose weights are in memory (the rest load on their next request).
    #[serde(default)]
    pub resident_tasks: usize,
    /// Whether `/v1/classify` and `/v1/tasks` need an API key.
    pub api_key_required: bool,
    /// Whether the admin routes are enabled.
    pub admin_enabled: bool,
    /// The prefix store and how its sync goes, when `--prefixes` names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::serving::registry::StoreStatus>,
}

/// What is running: version, model, device, precision and limits.
#[utoipa::path(get, path = "/info", responses((status = 200, body = ServerInfo)), tag = "health")]
pub async fn info(State(state): State<Arc<AppState>>) -> Json<ServerInfo> {
    let mut info = state.info.clone();
    info.tasks = state.infer.registry().len();
    info.resident_tasks = state.infer.registry().resident_len();
    info.store = state.infer.registry().store_status();
    Json(info)
}
