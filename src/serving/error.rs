//! The HTTP edge of every error: `{"error": "<message>", "error_type": "<snake_case>"}` with the
//! status that says whose fault it was.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::batcher::SubmitError;
use super::infer::InferError;
use crate::serving::registry::RegistryError;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words.
    pub error: String,
    /// A stable snake_case code, e.g. `unknown_task`, `invalid_input`, `overloaded`.
    pub error_type: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503 carry one).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS => Some(1),
            StatusCode::SERVICE_UNAVAILABLE => Some(5),
            _ => None,
        };
        Self {
            status,
            error_type,
            message: message.into(),
            retry_after,
        }
    }

    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", message)
    }

    pub fn unknown_task(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_task",
            format!("no task named {name:?} (GET /v1/tasks lists them)"),
        )
    }

    pub fn draining() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the server is shutting down and takes no new requests",
        )
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
                error_type: self.error_type.to_string(),
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(s) = self.retry_after {
            headers.insert(axum::http::header::RETRY_AFTER, s.into());
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", e.to_string())
            }
            SubmitError::Closed => Self::draining(),
            SubmitError::ModelGone => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                e.to_string(),
            ),
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::UnknownTask(name) => Self::unknown_task(&name),
            InferError::Input(m) => Self::invalid_input(m),
            InferError::TooLarge(m) => Self::too_large(m),
            InferError::Submit(s) => s.into(),
            InferError::Failed(m) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "model_error", m),
            InferError::Shutdown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                InferError::Shutdown.to_string(),
            ),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        use std::io::ErrorKind;
        match &e {
            RegistryError::InvalidName(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_task_name", e.to_string())
            }
            RegistryError::NotFound(name) => Self::unknown_task(name),
            // Server-side file trouble: the client learns what happened, not where (the log has
            // the path).
            RegistryError::Prefix(crate::prefix::PrefixError::Io { path, source }) => {
                tracing::error!(path = %path.display(), error = %source, "storing a prefix file failed");
                match source.kind() {
                    ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                        Self::new(
                            StatusCode::INSUFFICIENT_STORAGE,
                            "insufficient_storage",
                            "no space left to store the prefix file; nothing was changed",
                        )
                    }
                    _ => Self::internal(format!(
                        "storing the prefix file failed ({}); nothing was changed",
                        source.kind()
                    )),
                }
            }
            RegistryError::Prefix(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_prefix",
                e.to_string(),
            ),
            // The store is upstream of us: down, slow or refusing our credentials. Admin-only
            // routes, so the store's own message is given; nothing was changed anywhere.
            RegistryError::Store(store) => {
                tracing::error!(error = %store, "writing to the prefix store failed");
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    "store_unavailable",
                    format!("{store}; nothing was changed"),
                )
            }
        }
    }
}

/// Maps axum's extractor rejections (bad JSON, body too large, bad multipart) to our JSON body,
/// keeping the status axum chose.
pub fn rejection(status: StatusCode, message: String) -> ApiError {
    let error_type = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_input",
        _ => "invalid_request",
    };
    ApiError::new(status, error_type, message)
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<axum::extract::multipart::MultipartError> for ApiError {
    fn from(r: axum::extract::multipart::MultipartError) -> Self {
        rejection(r.status(), r.body_text())
    }
}

impl From<axum::extract::multipart::MultipartRejection> for ApiError {
    fn from(r: axum::extract::multipart::MultipartRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}
