//! The HTTP edge of every error: `{"error": "<message>", "error_type": "<snake_case>"}` with the
//! status that says whose fault it was.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::batcher::SubmitError;
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
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
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
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
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
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::InvalidName(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_task_name", e.to_string())
            }
            RegistryError::NotFound(name) => Self::unknown_task(name),
            RegistryError::Prefix(crate::prefix::PrefixError::Io { .. }) => {
                Self::internal(e.to_string())
            }
            RegistryError::Prefix(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_prefix",
                e.to_string(),
            ),
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
