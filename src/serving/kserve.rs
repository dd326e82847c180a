//! KServe's Open Inference Protocol (v2), for the clients that speak it (`tritonclient`, KServe's
//! own SDK): each task is a model. A thin adapter over the one inference door.
//!
//! - `GET /v2` server metadata; `GET /v2/models` the tasks; `GET /v2/models/{task}` a task's
//!   metadata; `GET /v2/models/{task}/ready`; health stays at `/v2/health/{live,ready}`.
//! - `POST /v2/models/{task}/infer`: input `text` (BYTES, shape `[N]` or `[N, 1]`) and optional
//!   `text_pair` (same shape) → outputs `logits` and `probabilities` (FP32 `[N, labels]`) and
//!   `label` (BYTES `[N]`). Inputs may come as JSON `data` or, as `tritonclient` sends them by
//!   default, in the binary tensor extension (`Inference-Header-Content-Length`); outputs are
//!   always JSON `data`, which every client reads.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::Arc;

use super::admin::TaskName;
use super::api::Books;
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::engine::TextInput;

const BINARY_HEADER: &str = "inference-header-content-length";
const OUTPUTS: [&str; 3] = ["logits", "probabilities", "label"];

/// KServe v2 server metadata.
#[utoipa::path(get, path = "/v2", responses((status = 200, body = Object)), tag = "kserve")]
pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "prefixd",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// KServe v2: every task, as a model with one version (its content hash).
#[utoipa::path(
    get,
    path = "/v2/models",
    responses((status = 200, body = Object), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security((), ("api_key" = [])),
    tag = "kserve"
)]
pub async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    // Tasks never loaded have their files hashed for their versions: off the async workers.
    let registry = state.infer.registry().clone();
    let models: Vec<Value> = tokio::task::spawn_blocking(move || registry.list())
        .await
        .map_err(|e| ApiError::internal(format!("listing failed: {e}")))?
        .iter()
        .map(|l| json!({"name": l.name(), "version": l.version, "state": "READY"}))
        .collect();
    Ok(Json(json!({ "models": models })))
}

/// KServe v2 model metadata: inputs `text` (and `text_pair`), outputs `logits`,
/// `probabilities`, `label`.
#[utoipa::path(
    get,
    path = "/v2/models/{task}",
    params(("task" = String, Path, description = "Task name")),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security((), ("api_key" = [])),
    tag = "kserve"
)]
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    TaskName(name): TaskName,
) -> Result<Json<Value>, ApiError> {
    let task = state.infer.task(&name).await?;
    let labels = task.labels().len();
    Ok(Json(json!({
        "name": name,
        "versions": [task.version],
        "platform": "prefixd",
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
            {"name": "text_pair", "datatype": "BYTES", "shape": [-1], "optional": true},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, labels]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, labels]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"labels": task.labels(), "problem_type": task.problem_type().as_str()},
    })))
}

/// KServe v2 model readiness: 200 while the task is loaded and the server takes requests.
#[utoipa::path(
    get,
    path = "/v2/models/{task}/ready",
    params(("task" = String, Path, description = "Task name")),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security((), ("api_key" = [])),
    tag = "kserve"
)]
pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    TaskName(name): TaskName,
) -> Result<Json<Value>, ApiError> {
    state.infer.check_task(&name)?;
    if state.is_draining() {
        return Err(ApiError::draining());
    }
    Ok(Json(json!({"name": name, "ready": true})))
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
}

#[derive(Debug, Serialize)]
struct OutputTensor {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<usize>,
    data: Value,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

/// KServe v2 inference: BYTES input `text` (and `text_pair`) as JSON `data` or binary tensor
/// data (`Inference-Header-Content-Length`) → FP32 `logits`, `probabilities`, BYTES `label`.
#[utoipa::path(
    post,
    path = "/v2/models/{task}/infer",
    params(("task" = String, Path, description = "Task name")),
    request_body(content = Object, description = "An Open Inference Protocol v2 request"),
    responses(
        (status = 200, body = Object),
        (status = 400, description = "Malformed binary data or body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "Unknown task", body = ErrorBody),
        (status = 408, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "Not a valid request for this model", body = ErrorBody),
        (status = 429, body = ErrorBody),
        (status = 500, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security((), ("api_key" = [])),
    tag = "kserve"
)]
pub async fn infer(
    State(state): State<Arc<AppState>>,
    TaskName(task): TaskName,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let mut books = Books::start();
    let result = infer_inner(&state, &task, &headers, body, &mut books).await;
    books.finish(&state, result)
}

async fn infer_inner(
    state: &AppState,
    task: &str,
    headers: &HeaderMap,
    body: Bytes,
    books: &mut Books,
) -> Result<Json<Value>, ApiError> {
    // The binary extension: a JSON header of the given length, then the tensors' bytes in order.
    let json_len = match headers.get(BINARY_HEADER) {
        None => body.len(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n <= body.len())
            .ok_or_else(|| {
                bad(format!(
                    "{BINARY_HEADER} must be a byte count within the body"
                ))
            })?,
    };
    let req: InferRequest = serde_json::from_slice(&body[..json_len])
        .map_err(|e| ApiError::invalid_input(format!("not an inference request: {e}")))?;
    let mut binary = body.slice(json_len..);
    let (mut texts, mut pairs) = (None, None);
    for input in &req.inputs {
        if input.datatype != "BYTES" {
            return Err(ApiError::invalid_input(format!(
                "input {:?}: datatype {} (expected BYTES: texts)",
                input.name, input.datatype
            )));
        }
        let strings = read_strings(input, &mut binary)?;
        let rows = match input.shape.as_slice() {
            [n] | [n, 1] => usize::try_from(*n).ok(),
            _ => None,
        };
        if rows != Some(strings.len()) {
            return Err(ApiError::invalid_input(format!(
                "input {:?}: shape {:?} does not match its {} elements (expected [N] or [N, 1])",
                input.name,
                input.shape,
                strings.len()
            )));
        }
        match input.name.as_str() {
            "text" => texts = Some(strings),
            "text_pair" => pairs = Some(strings),
            other => {
                return Err(ApiError::invalid_input(format!(
                    "unexpected input {other:?}: this model takes \"text\" and optionally \"text_pair\""
                )))
            }
        }
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data belong to no input",
            binary.len()
        )));
    }
    let texts = texts.ok_or_else(|| ApiError::invalid_input("missing input \"text\""))?;
    books.rows(texts.len());
    books.task(state, task)?;
    if texts.is_empty() {
        return Err(ApiError::invalid_input("input \"text\" is empty"));
    }
    let inputs: Vec<TextInput> = match pairs {
        None => texts.into_iter().map(TextInput::single).collect(),
        Some(p) if p.len() == texts.len() => texts
            .into_iter()
            .zip(p)
            .map(|(text, pair)| TextInput {
                text,
                text_pair: Some(pair),
            })
            .collect(),
        Some(p) => {
            return Err(ApiError::invalid_input(format!(
                "\"text_pair\" has {} elements, \"text\" {}",
                p.len(),
                texts.len()
            )))
        }
    };
    let wanted: Vec<&str> = match &req.outputs {
        None => OUTPUTS.to_vec(),
        Some(list) => list
            .iter()
            .map(|o| {
                OUTPUTS
                    .iter()
                    .copied()
                    .find(|n| *n == o.name)
                    .ok_or_else(|| {
                        ApiError::invalid_input(format!(
                            "unknown output {:?}: expected one of {OUTPUTS:?}",
                            o.name
                        ))
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let done = state.infer.classify(task, inputs).await?;
    let (n, c) = (done.predictions.len(), done.task.labels().len());
    let outputs: Vec<OutputTensor> = wanted
        .into_iter()
        .map(|name| {
            let p = &done.predictions;
            let (datatype, shape, data) = match name {
                "logits" => (
                    "FP32",
                    vec![n, c],
                    json!(p
                        .iter()
                        .flat_map(|x| x.logits.clone())
                        .collect::<Vec<f32>>()),
                ),
                "probabilities" => (
                    "FP32",
                    vec![n, c],
                    json!(p
                        .iter()
                        .flat_map(|x| x.scores.clone())
                        .collect::<Vec<f32>>()),
                ),
                _ => (
                    "BYTES",
                    vec![n],
                    json!(p.iter().map(|x| x.label.clone()).collect::<Vec<_>>()),
                ),
            };
            OutputTensor {
                name,
                datatype,
                shape,
                data,
            }
        })
        .collect();
    let mut response = json!({
        "model_name": task,
        "model_version": done.task.version,
        "outputs": outputs,
    });
    if let Some(id) = req.id {
        response["id"] = id.into();
    }
    Ok(Json(response))
}

/// The strings of one BYTES input: its JSON `data` (flat, or nested one level for `[N, 1]`), or
/// its share of the binary section (each element a little-endian u32 length, then the bytes).
fn read_strings(input: &InferInput, binary: &mut Bytes) -> Result<Vec<String>, ApiError> {
    let size = input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
        .map(|v| {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad("binary_data_size must be a byte count"))
        })
        .transpose()?;
    let name = &input.name;
    match (size, &input.data) {
        (Some(_), Some(_)) => Err(bad(format!(
            "input {name:?} has both data and binary_data_size"
        ))),
        (None, None) => Err(ApiError::invalid_input(format!(
            "input {name:?} has no data"
        ))),
        (None, Some(data)) => {
            let flat: Vec<&Value> = match data {
                Value::Array(items) => items
                    .iter()
                    .flat_map(|v| match v {
                        Value::Array(inner) => inner.iter().collect::<Vec<_>>(),
                        v => vec![v],
                    })
                    .collect(),
                v => vec![v],
            };
            flat.into_iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid_input(format!(
                            "input {name:?} element {i}: expected a string"
                        ))
                    })
                })
                .collect()
        }
        (Some(size), None) => {
            if size > binary.len() {
                return Err(bad(format!(
                    "input {name:?}: binary_data_size {size} exceeds the bytes sent"
                )));
            }
            let mut own = binary.split_to(size);
            let mut out = Vec::new();
            while !own.is_empty() {
                if own.len() < 4 {
                    return Err(bad(format!("input {name:?}: truncated element length")));
                }
                let len = u32::from_le_bytes([own[0], own[1], own[2], own[3]]) as usize;
                let _ = own.split_to(4);
                if len > own.len() {
                    return Err(bad(format!(
                        "input {name:?}: element of {len} bytes runs past its data"
                    )));
                }
                let bytes = own.split_to(len);
                out.push(String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ApiError::invalid_input(format!(
                        "input {name:?} element {}: not UTF-8 text",
                        out.len()
                    ))
                })?);
            }
            Ok(out)
        }
    }
}
