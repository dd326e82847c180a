//! The Hugging Face text-classification shape, for the clients that speak it (the HF Inference
//! API, `huggingface_hub`'s `InferenceClient`, TEI's `/predict`): `POST /v1/tasks/{task}/predict`
//! with `{"inputs": …, "parameters": {"top_k", "function_to_apply"}}` answers, for each input, the
//! labels with their scores, best first. A thin adapter over the one inference door.

use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use utoipa::ToSchema;

use super::admin::TaskName;
use super::api::{parse_inputs, Books};
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::prefix::ProblemType;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// A text, a `{"text", "text_pair"}` pair, or a non-empty list of either.
    #[schema(value_type = Object)]
    pub inputs: Value,
    #[serde(default)]
    pub parameters: PredictParameters,
    /// Accepted for compatibility with the HF Inference API (`wait_for_model`, …); ignored.
    #[serde(default, rename = "options")]
    #[schema(value_type = Object)]
    pub _options: Option<Value>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictParameters {
    /// Only the k best labels (default: all).
    pub top_k: Option<usize>,
    /// `softmax`, `sigmoid` or `none` (raw logits); default: the task's own (softmax for
    /// single-label tasks, sigmoid for multi-label ones).
    pub function_to_apply: Option<String>,
}

/// One label and its score.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// Classify in the Hugging Face text-classification shape: one list of `{label, score}` per
/// input, best first (a single input still gets a list of one list, as the HF Inference API does).
#[utoipa::path(
    post,
    path = "/v1/tasks/{task}/predict",
    params(("task" = String, Path, description = "Task name")),
    request_body = PredictRequest,
    responses(
        (status = 200, body = Vec<Vec<LabelScore>>),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "Unknown task", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "Not a valid request", body = ErrorBody),
        (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security((), ("api_key" = [])),
    tag = "compatible"
)]
pub async fn predict(
    State(state): State<Arc<AppState>>,
    TaskName(task): TaskName,
    body: Bytes,
) -> axum::response::Response {
    let mut books = Books::start();
    let result = predict_inner(&state, &task, &body, &mut books).await;
    books.finish(&state, result)
}

async fn predict_inner(
    state: &AppState,
    task: &str,
    body: &[u8],
    books: &mut Books,
) -> Result<Json<Vec<Vec<LabelScore>>>, ApiError> {
    let req: PredictRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_input(format!("not a text-classification request: {e}")))?;
    // A lone pair object is one input, as the transformers pipeline reads it.
    let inputs = match &req.inputs {
        Value::Object(_) => Value::Array(vec![req.inputs.clone()]),
        v => v.clone(),
    };
    books.rows(inputs.as_array().map_or(1, Vec::len));
    books.task(state, task)?;
    let apply = match req.parameters.function_to_apply.as_deref() {
        None => None,
        Some("softmax") => Some(Apply::Softmax),
        Some("sigmoid") => Some(Apply::Sigmoid),
        Some("none") => Some(Apply::None),
        Some(other) => {
            return Err(ApiError::invalid_input(format!(
                "parameters.function_to_apply {other:?}: expected softmax, sigmoid or none"
            )))
        }
    };
    if req.parameters.top_k == Some(0) {
        return Err(ApiError::invalid_input(
            "parameters.top_k must be at least 1",
        ));
    }
    let done = state.infer.classify(task, parse_inputs(&inputs)?).await?;
    let apply = apply.unwrap_or(match done.task.problem_type() {
        ProblemType::SingleLabel => Apply::Softmax,
        ProblemType::MultiLabel => Apply::Sigmoid,
    });
    let labels = done.task.labels();
    Ok(Json(
        done.predictions
            .iter()
            .map(|p| {
                let scores = apply.scores(&p.logits);
                let mut out: Vec<LabelScore> = labels
                    .iter()
                    .zip(scores)
                    .map(|(l, score)| LabelScore {
                        label: l.clone(),
                        score,
                    })
                    .collect();
                out.sort_by(|a, b| b.score.total_cmp(&a.score));
                out.truncate(req.parameters.top_k.unwrap_or(usize::MAX));
                out
            })
            .collect(),
    ))
}

#[derive(Debug, Clone, Copy)]
enum Apply {
    Softmax,
    Sigmoid,
    None,
}

impl Apply {
    fn scores(self, logits: &[f32]) -> Vec<f32> {
        match self {
            Apply::None => logits.to_vec(),
            Apply::Sigmoid => logits.iter().map(|&x| crate::engine::sigmoid(x)).collect(),
            Apply::Softmax => crate::engine::softmax(logits),
        }
    }
}
