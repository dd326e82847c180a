//! Admin routes: upload, replace and delete tasks. Every change is validated in full before the
//! registry or the directory is touched (see `prefix::registry`).

use axum::extract::{FromRequest, FromRequestParts, Multipart, Path, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::Semaphore;
use utoipa::ToSchema;

use super::api::TaskInfo;
use super::auth::{bearer, constant_time_eq, refuse};
use super::error::{ApiError, ErrorBody};
use super::registry::{valid_task_name, RegistryError};
use super::AppState;
use crate::prefix::peft::{ImportOptions, CONFIG_FILE, WEIGHTS_FILE};
use crate::prefix::ProblemType;

/// Admin access: the token, and the upload slots.
pub struct Admin {
    /// Admin routes are disabled without one.
    pub token: Option<String>,
    /// One permit per upload being read or installed.
    pub uploads: Arc<Semaphore>,
    pub max_uploads: usize,
}

impl Admin {
    pub fn new(token: Option<String>, max_uploads: usize) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
            uploads: Arc::new(Semaphore::new(max_uploads.max(1))),
            max_uploads: max_uploads.max(1),
        }
    }

    /// Whether `authorization` (the header's value) carries the admin token.
    fn check(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        let Some(expected) = self.token.as_deref() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "admin routes are disabled: start the server with --admin-token (or PREFIXD_ADMIN_TOKEN)",
            ));
        };
        let given = bearer(authorization).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing Authorization: Bearer <admin token>",
            )
        })?;
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "wrong admin token",
            ));
        }
        Ok(())
    }
}

/// Runs before the body is read (it is the outer layer of the admin routes): who is asking, and
/// whether an upload slot is free, are settled first, so an unauthorized or excess upload costs
/// no memory. (Sixteen 60 MB PUTs without a token used to be buffered whole, then refused.)
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let auth = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = state.admin.check(auth) {
        return refuse(request, e).await;
    }
    let _permit = if request.method() == axum::http::Method::PUT {
        match state.admin.uploads.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_uploads",
                    format!(
                        "{} uploads are already in progress (--max-concurrent-uploads); retry",
                        state.admin.max_uploads
                    ),
                );
                return refuse(request, e).await;
            }
        }
    } else {
        None
    };
    next.run(request).await
}

/// A task name from the path, checked against the name rule.
pub struct TaskName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TaskName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_task_name", m);
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                bad(format!(
                    "the task name in the path is unreadable: {}",
                    e.body_text()
                ))
            })?;
        if !valid_task_name(&name) {
            return Err(bad(RegistryError::InvalidName(name).to_string()));
        }
        Ok(TaskName(name))
    }
}

/// A native prefix file, as the body of an upload.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // documentation only
pub struct PrefixFileBody(Vec<u8>);

/// A PEFT adapter, as multipart form data.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct PeftUpload {
    #[schema(rename = "adapter_config.json", value_type = String, format = Binary)]
    adapter_config: Vec<u8>,
    #[schema(rename = "adapter_model.safetensors", value_type = String, format = Binary)]
    adapter_model: Vec<u8>,
    /// JSON array of label names, in classifier-row order (default `LABEL_0`, …).
    #[schema(example = r#"["negative","positive"]"#)]
    labels: Option<String>,
    /// `single_label` (softmax) or `multi_label` (sigmoid).
    #[schema(example = "single_label")]
    problem_type: Option<String>,
    /// The truncation length the adapter was trained with; inputs for the task are cut to it
    /// (default: the server's `--max-length`).
    #[schema(example = "128", minimum = 2)]
    max_length: Option<String>,
}

/// Upload or replace a task: a native prefix file, or a PEFT adapter as multipart form data.
#[utoipa::path(
    put,
    path = "/v1/admin/tasks/{task}",
    params(("task" = String, Path, description = "Task name", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")),
    request_body(
        description = "A native prefix file, or a PEFT adapter (its two files as form fields).",
        content(
            (PrefixFileBody = "application/octet-stream"),
            (PeftUpload = "multipart/form-data"),
        )
    ),
    responses(
        (status = 200, description = "Installed; serving now", body = TaskInfo),
        (status = 400, description = "Bad task name or malformed form", body = ErrorBody),
        (status = 401, description = "No bearer token", body = ErrorBody),
        (status = 403, description = "Wrong token, or admin disabled", body = ErrorBody),
        (status = 408, description = "The body stalled or took too long", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Not a valid prefix for this model", body = ErrorBody),
        (status = 429, description = "Too many uploads at once", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 500, description = "Storing the file failed", body = ErrorBody),
        (status = 507, description = "No space left to store the file", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "admin"
)]
pub async fn put_task(
    State(state): State<Arc<AppState>>,
    TaskName(name): TaskName,
    request: Request,
) -> Result<Json<TaskInfo>, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let registry = state.infer.registry().clone();
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
        .infer
        .registry()
        .info(&name)
        .ok_or_else(|| ApiError::internal("task vanished after upload"))?;
    Ok(Json(TaskInfo::new(&info, state.infer.text())))
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
            ("max_length", _) => {
                let s = String::from_utf8_lossy(&data);
                let n = s
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n >= 2)
                    .ok_or_else(|| {
                        bad(format!(
                            "max_length {s:?}: expected a whole number of tokens, at least 2"
                        ))
                    })?;
                options.max_length = Some(n);
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
    params(("task" = String, Path, description = "Task name", pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")),
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
    State(state): State<Arc<AppState>>,
    TaskName(name): TaskName,
) -> Result<StatusCode, ApiError> {
    let registry = state.infer.registry().clone();
    let task_name = name.clone();
    tokio::task::spawn_blocking(move || registry.delete(&task_name))
        .await
        .map_err(|e| ApiError::internal(format!("delete task failed: {e}")))?
        .map_err(|e: RegistryError| ApiError::from(e))?;
    tracing::info!(task = %name, "task deleted");
    Ok(StatusCode::NO_CONTENT)
}
