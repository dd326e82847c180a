//! Public routes: classify, task listing, health, readiness, metrics.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use utoipa::ToSchema;

use super::admin::TaskName;
use super::error::{ApiError, ErrorBody};
use super::registry::{Loaded, StoreStatus};
use super::AppState;
use crate::engine::{Prediction, TextInput};

/// A classify request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// The task (prefix) to classify with.
    #[schema(example = "sst2", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    pub task: String,
    /// One text, or a non-empty list whose items are texts or `{"text", "text_pair"}` objects.
    #[schema(schema_with = inputs_schema)]
    pub inputs: Value,
    /// Return the raw logits as `scores` instead of softmax/sigmoid probabilities.
    #[serde(default)]
    pub raw_scores: bool,
}

/// `inputs`: a string, or an array (at least one item) of strings and text-pair objects. Parsed
/// by hand (`parse_inputs`) so that a bad item is named by its index; this is its documentation.
fn inputs_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    use utoipa::openapi::Ref;
    let text = || ObjectBuilder::new().schema_type(Type::String);
    OneOfBuilder::new()
        .item(text().description(Some("one text")))
        .item(
            ArrayBuilder::new()
                .min_items(Some(1))
                .items(
                    OneOfBuilder::new()
                        .item(text())
                        .item(Ref::from_schema_name("TextPair")),
                )
                .description(Some("texts and text pairs, classified in order")),
        )
        .build()
        .into()
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextPair {
    pub text: String,
    #[serde(default)]
    pub text_pair: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClassifyResponse {
    pub task: String,
    /// The version (content hash) of the prefix that computed these results.
    pub version: String,
    /// One result per input, in input order.
    pub results: Vec<ClassifyResult>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClassifyResult {
    pub label: String,
    pub label_id: usize,
    pub scores: Vec<f32>,
    pub logits: Vec<f32>,
    /// Multi-label tasks: every label scoring at least 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

impl ClassifyResult {
    fn new(p: Prediction, raw_scores: bool) -> Self {
        Self {
            scores: if raw_scores {
                p.logits.clone()
            } else {
                p.scores
            },
            label: p.label,
            label_id: p.label_id,
            logits: p.logits,
            labels: p.labels,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskInfo {
    pub name: String,
    pub labels: Vec<String>,
    /// `single_label` (softmax scores) or `multi_label` (sigmoid scores).
    pub problem_type: String,
    /// P, the number of virtual tokens.
    pub num_virtual_tokens: usize,
    /// Inputs are truncated to this many tokens (with `[CLS]`/`[SEP]`): the task's own truncation
    /// length when it records one, within the server's `--max-length` and the model's positions.
    pub max_length: usize,
    pub size_bytes: usize,
    /// Provenance: `kind` (`peft_import`, `train`, …) and details.
    #[schema(value_type = Object)]
    pub source: Value,
    /// `sha256:<hex>` of the prefix file.
    pub version: String,
    /// RFC 3339 time this version was loaded (or, if its weights never were, registered).
    pub loaded_at: String,
    /// Whether the task's weights are in memory now; if not, its next request loads them
    /// (see `--max-resident-bytes`).
    pub resident: bool,
}

impl TaskInfo {
    pub fn new(l: &Loaded, text: &crate::engine::TextEncoder) -> Self {
        let m = &l.meta;
        Self {
            max_length: text.limit_for_meta(m),
            name: l.name().to_string(),
            labels: m.labels.clone(),
            problem_type: m.problem_type.as_str().to_string(),
            num_virtual_tokens: m.num_virtual_tokens,
            size_bytes: l.size_bytes,
            source: serde_json::to_value(&m.source).unwrap_or(Value::Null),
            version: l.version.clone(),
            loaded_at: rfc3339(l.loaded_at),
            resident: l.resident,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    /// One page, sorted by name.
    pub tasks: Vec<TaskInfo>,
    /// Tasks matching the query (on every page).
    pub total: usize,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
    /// With a prefix store (`--prefixes s3://…`): whether what is listed is up to date with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
}

/// The most tasks on one page of `GET /v1/tasks`, and the default page size.
pub const MAX_PAGE: usize = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// Only tasks whose name starts with this.
    pub prefix: Option<String>,
    /// Only tasks whose name sorts after this (the previous page's `next_after`).
    pub after: Option<String>,
    /// Page size, 1–1000 (default 1000).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `ok`, `ready`, `starting`, `draining`, `unavailable`.
    pub status: String,
    /// Why the server is not ready or not alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Status {
    fn new(status: &str, reason: Option<String>) -> Json<Self> {
        Json(Self {
            status: status.into(),
            reason,
        })
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses `inputs` by hand so a bad item is named by its index. Limits (count, length) are the
/// inference door's to check, the same for every route.
pub(crate) fn parse_inputs(v: &Value) -> Result<Vec<TextInput>, ApiError> {
    let item = |i: usize, v: &Value| -> Result<TextInput, ApiError> {
        match v {
            Value::String(s) => Ok(TextInput::single(s.clone())),
            Value::Object(_) => {
                let p: TextPair = serde_json::from_value(v.clone()).map_err(|e| {
                    ApiError::invalid_input(format!(
                        "inputs[{i}]: expected {{\"text\": string, \"text_pair\": string}}: {e}"
                    ))
                })?;
                Ok(TextInput {
                    text: p.text,
                    text_pair: p.text_pair,
                })
            }
            _ => Err(ApiError::invalid_input(format!(
                "inputs[{i}]: expected a string or {{\"text\", \"text_pair\"}}, got {}",
                json_kind(v)
            ))),
        }
    };
    match v {
        Value::String(_) => Ok(vec![item(0, v)?]),
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid_input("inputs is empty")),
        Value::Array(items) => items.iter().enumerate().map(|(i, v)| item(i, v)).collect(),
        other => Err(ApiError::invalid_input(format!(
            "inputs: expected a string or an array, got {}",
            json_kind(other)
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Classify inputs with a task.
#[utoipa::path(
    post,
    path = "/v1/classify",
    request_body = ClassifyRequest,
    responses(
        (status = 200, description = "One result per input, in order", body = ClassifyResponse),
        (status = 400, description = "Malformed JSON, or a body that ended early", body = ErrorBody),
        (status = 401, description = "No API key (only when the server has --api-key)", body = ErrorBody),
        (status = 403, description = "Wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown task", body = ErrorBody),
        (status = 408, description = "The body stalled or took too long", body = ErrorBody),
        (status = 413, description = "Body, input count or text too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Well-formed JSON that is not a valid request", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 500, description = "The model failed on this request's batch", body = ErrorBody),
        (status = 503, description = "Shutting down, or the model is unavailable", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    security((), ("api_key" = [])),
    tag = "classify"
)]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ClassifyRequest>, JsonRejection>,
) -> Response {
    let mut books = Books::start();
    let result = classify_inner(&state, body, &mut books).await;
    books.finish(&state, result)
}

/// The bookkeeping every classifying route shares (this one, KServe v2, the Hugging Face
/// shape): request count and duration by task and status, and the access log's task and rows.
pub(super) struct Books {
    start: Instant,
    task: String,
    rows: usize,
}

impl Books {
    pub(super) fn start() -> Self {
        Self {
            start: Instant::now(),
            task: "unknown".into(),
            rows: 0,
        }
    }

    /// Names the task, once it is known to be registered: only registered names become metric
    /// labels, so clients cannot mint new series.
    pub(super) fn task(&mut self, state: &AppState, name: &str) -> Result<(), ApiError> {
        state.infer.check_task(name)?;
        self.task = name.to_string();
        Ok(())
    }

    pub(super) fn rows(&mut self, rows: usize) {
        self.rows = rows;
    }

    pub(super) fn finish(
        self,
        state: &AppState,
        result: Result<impl IntoResponse, ApiError>,
    ) -> Response {
        let status = match &result {
            Ok(_) => StatusCode::OK,
            Err(e) => e.status,
        };
        let m = &state.metrics;
        let label = m.task_label(&self.task);
        m.requests
            .with_label_values(&[label, status.as_str()])
            .inc();
        m.request_duration
            .with_label_values(&[label])
            .observe(self.start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::debug!(task = %self.task, status = %status, error = %e.message, "classify refused");
        }
        let mut response = result.into_response();
        response
            .extensions_mut()
            .insert(super::observe::AccessNote {
                task: self.task,
                rows: self.rows,
            });
        response
    }
}

async fn classify_inner(
    state: &Arc<AppState>,
    body: Result<Json<ClassifyRequest>, JsonRejection>,
    books: &mut Books,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let Json(req) = body?;
    books.rows(match &req.inputs {
        Value::Array(items) => items.len(),
        _ => 1,
    });
    books.task(state, &req.task)?;
    let inputs = parse_inputs(&req.inputs)?;
    let done = state.infer.classify(&req.task, inputs).await?;
    Ok(Json(ClassifyResponse {
        task: req.task,
        version: done.task.version.clone(),
        results: done
            .predictions
            .into_iter()
            .map(|p| ClassifyResult::new(p, req.raw_scores))
            .collect(),
    }))
}

/// List the loaded tasks.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    params(TaskQuery),
    responses(
        (status = 200, body = TaskList),
        (status = 422, description = "A bad query (limit out of range, unknown parameter)", body = ErrorBody),
        (status = 401, description = "No API key (only when the server has --api-key)", body = ErrorBody),
        (status = 403, description = "Wrong API key", body = ErrorBody),
    ),
    security((), ("api_key" = [])),
    tag = "tasks"
)]
pub async fn list_tasks(
    State(state): State<Arc<AppState>>,
    query: Result<axum::extract::Query<TaskQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TaskList>, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid_input(e.body_text()))?;
    let limit = q.limit.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid_input(format!(
            "limit {limit}: expected 1 to {MAX_PAGE}"
        )));
    }
    // A page may name tasks never loaded, whose files are hashed for their versions.
    let registry = state.infer.registry().clone();
    let page = tokio::task::spawn_blocking(move || {
        registry.page(q.prefix.as_deref().unwrap_or(""), q.after.as_deref(), limit)
    })
    .await
    .map_err(|e| ApiError::internal(format!("listing failed: {e}")))?;
    Ok(Json(TaskList {
        tasks: page
            .tasks
            .iter()
            .map(|l| TaskInfo::new(l, state.infer.text()))
            .collect(),
        total: page.total,
        next_after: page.next_after,
        store: state.infer.registry().store_status(),
    }))
}

/// Describe one task.
#[utoipa::path(
    get,
    path = "/v1/tasks/{task}",
    params(("task" = String, Path, description = "Task name", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")),
    responses(
        (status = 200, body = TaskInfo),
        (status = 400, description = "Not a valid task name", body = ErrorBody),
        (status = 401, description = "No API key (only when the server has --api-key)", body = ErrorBody),
        (status = 403, description = "Wrong API key", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security((), ("api_key" = [])),
    tag = "tasks"
)]
pub async fn get_task(
    State(state): State<Arc<AppState>>,
    TaskName(name): TaskName,
) -> Result<Json<TaskInfo>, ApiError> {
    let registry = state.infer.registry().clone();
    let lookup = name.clone();
    tokio::task::spawn_blocking(move || registry.info(&lookup))
        .await
        .map_err(|e| ApiError::internal(format!("task lookup failed: {e}")))?
        .map(|l| Json(TaskInfo::new(&l, state.infer.text())))
        .ok_or_else(|| ApiError::unknown_task(&name))
}

/// Liveness: the process is up and its model thread runs.
#[utoipa::path(
    get,
    path = "/health",
    responses((status = 200, body = Status), (status = 503, body = Status)),
    tag = "health"
)]
pub async fn health(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Status>) {
    if state.infer.batcher().health().alive() {
        (StatusCode::OK, Status::new("ok", None))
    } else {
        let reason = Some("the model thread has stopped".to_string());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Status::new("unavailable", reason),
        )
    }
}

/// Readiness: the model serves and the server is not draining (503 from the moment SIGTERM
/// arrives, while requests are still being served, so load balancers stop sending first).
#[utoipa::path(
    get,
    path = "/ready",
    responses((status = 200, body = Status), (status = 503, body = Status)),
    tag = "health"
)]
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Status>) {
    if state.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Status::new("draining", None),
        );
    }
    if !state.infer.registry().synced() {
        let reason = Some("the first sync with the prefix store has not finished".to_string());
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Status::new("starting", reason),
        );
    }
    match state.infer.batcher().health().problem() {
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Status::new("unavailable", Some(reason)),
        ),
        None => (StatusCode::OK, Status::new("ready", None)),
    }
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)), tag = "health")]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
