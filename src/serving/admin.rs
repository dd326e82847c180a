//! Admin routes: upload, replace and delete tasks. Every change is validated in full before the
//! registry or the directory is touched (see `prefix::registry`).

use axum::extract::{FromRequest, FromRequestParts, Multipart, Path, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::Json;
use bytes::Bytes;
use std::sync::Arc;

use super::api::TaskInfo;
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::prefix::peft::{ImportOptions, CONFIG_FILE, WEIGHTS_FILE};
use crate::serving::registry::RegistryError;
use crate::prefix::ProblemType;

/// Proof that the request carries the admin token. Rejects before the body is read.
pub struct AdminAuth;

impl FromRequestParts<Arc<AppState>> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let Some(expected) = state.admin_token.as_deref() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "admin routes are disabled: start the server with --admin-token (or PREFIXD_ADMIN_TOKEN)",
            ));
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing Authorization: Bearer <admin token>",
                )
            })?;
        if !constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "wrong admin token",
            ));
        }
        Ok(AdminAuth)
    }
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Upload or replace a task: a native prefix file, or a PEFT adapter as multipart form data.
#[utoipa::path(
    put,
    path = "/v1/admin/tasks/{task}",
    params(("task" = String, Path, description = "Task name: ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")),
    request_body(
        description = "`application/octet-stream`: a native prefix file. `multipart/form-data`: \
                       fields `adapter_config.json` and `adapter_model.safetensors` (PEFT), optional \
                       `labels` (JSON array of names) and `problem_type` (single_label | multi_label).",
        content_type = "application/octet-stream",
        content = Vec<u8>
    ),
    responses(
        (status = 200, description = "Installed; serving now", body = TaskInfo),
        (status = 400, description = "Bad task name or malformed form", body = ErrorBody),
        (status = 401, description = "No bearer token", body = ErrorBody),
        (status = 403, description = "Wrong token, or admin disabled", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Not a valid prefix for this model", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "admin"
)]
pub async fn put_task(
    _auth: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Json<TaskInfo>, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let registry = state.registry.clone();
    let upload = if content_type.starts_with("multipart/form-data") {
        let form = Multipart::from_request(request, &state).await?;
        let peft = read_peft_form(form).await?;
        Upload::Peft(peft)
    } else if content_type.starts_with("application/octet-stream") || content_type.is_empty() {
        Upload::Native(Bytes::from_request(request, &state).await?)
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {content_type:?}: send application/octet-stream (native prefix file) \
                 or multipart/form-data (PEFT adapter)"
            ),
        ));
    };
    let task_name = name.clone();
    // Validation, fsync and rename are blocking work: keep them off the async workers.
    let result = tokio::task::spawn_blocking(move || match upload {
        Upload::Native(bytes) => registry.put_native(&task_name, &bytes),
        Upload::Peft(f) => registry.put_peft(&task_name, &f.config, &f.weights, &f.options),
    })
    .await
    .map_err(|e| ApiError::internal(format!("upload task failed: {e}")))?;
    let task = result?;
    tracing::info!(task = %name, version = %task.version, "task uploaded");
    let info = state
        .registry
        .info(&name)
        .ok_or_else(|| ApiError::internal("task vanished after upload"))?;
    Ok(Json(TaskInfo::from(&info)))
}

enum Upload {
    Native(Bytes),
    Peft(PeftForm),
}

struct PeftForm {
    config: Bytes,
    weights: Bytes,
    options: ImportOptions,
}

async fn read_peft_form(mut form: Multipart) -> Result<PeftForm, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m);
    let (mut config, mut weights) = (None, None);
    let mut options = ImportOptions::default();
    while let Some(field) = form.next_field().await? {
        // Accept the PEFT file name as the field name or as the part's file name.
        let key = field
            .name()
            .filter(|n| !n.is_empty())
            .or(field.file_name())
            .unwrap_or("")
            .to_string();
        let file_name = field.file_name().unwrap_or("").to_string();
        let data = field.bytes().await?;
        match (key.as_str(), file_name.as_str()) {
            (CONFIG_FILE, _) | (_, CONFIG_FILE) => config = Some(data),
            (WEIGHTS_FILE, _) | (_, WEIGHTS_FILE) => weights = Some(data),
            ("labels", _) => {
                let labels: Vec<String> = serde_json::from_slice(&data)
                    .map_err(|e| bad(format!("labels: expected a JSON array of strings: {e}")))?;
                options.labels = Some(labels);
            }
            ("problem_type", _) => {
                let s = String::from_utf8_lossy(&data);
                options.problem_type = Some(ProblemType::parse(s.trim()).ok_or_else(|| {
                    bad(format!(
                        "problem_type {s:?}: expected single_label or multi_label"
                    ))
                })?);
            }
            _ => return Err(bad(format!("unexpected form field {key:?}"))),
        }
    }
    Ok(PeftForm {
        config: config.ok_or_else(|| bad(format!("missing form field {CONFIG_FILE:?}")))?,
        weights: weights.ok_or_else(|| bad(format!("missing form field {WEIGHTS_FILE:?}")))?,
        options,
    })
}

/// Remove a task from the registry and the prefixes directory.
#[utoipa::path(
    delete,
    path = "/v1/admin/tasks/{task}",
    params(("task" = String, Path, description = "Task name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Bad task name", body = ErrorBody),
        (status = 401, description = "No bearer token", body = ErrorBody),
        (status = 403, description = "Wrong token, or admin disabled", body = ErrorBody),
        (status = 404, description = "Unknown task", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "admin"
)]
pub async fn delete_task(
    _auth: AdminAuth,
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let registry = state.registry.clone();
    let task_name = name.clone();
    tokio::task::spawn_blocking(move || registry.delete(&task_name))
        .await
        .map_err(|e| ApiError::internal(format!("delete task failed: {e}")))?
        .map_err(|e: RegistryError| ApiError::from(e))?;
    tracing::info!(task = %name, "task deleted");
    Ok(StatusCode::NO_CONTENT)
}
