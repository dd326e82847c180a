//! Request bodies are read in full, up to a limit and within time bounds, before a handler looks
//! at them; and every error response leaves the server as JSON.
//!
//! Why buffer first: a server that answers a body-carrying request early and closes the connection
//! with request bytes still unread makes the kernel send a TCP reset, and the client then loses
//! the JSON error it was sent. Reading first means every refusal arrives. Past the limit the rest
//! is read and discarded, up to a bound in bytes, so even a 413 usually reaches the client
//! (nginx calls this lingering close). Who may send a body at all is checked before any of this
//! (admin routes authorize first: see `admin::authorize`).
//!
//! Time: the body must keep arriving (no gap longer than `idle_timeout`) and be complete within
//! `total_timeout`. Running out of time is a 408 and a closed connection — never a parse of half
//! a body (a slow upload used to be cut at a fixed deadline and rejected as "not a valid
//! safetensors file").

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body_util::BodyExt;
use std::time::Duration;
use tokio::time::Instant;

use super::error::ApiError;

/// Most extra bytes read and discarded past the limit, as a multiple of it.
const DISCARD_FACTOR: usize = 4;

#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// Longest gap between two pieces of the body.
    pub idle_timeout: Duration,
    /// Longest time for the whole body.
    pub total_timeout: Duration,
}

fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

pub async fn buffer_body(limits: BodyLimits, request: Request, next: Next) -> Response {
    let (parts, mut body) = request.into_parts();
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    let end = Instant::now() + limits.total_timeout;
    loop {
        let wait = (Instant::now() + limits.idle_timeout).min(end);
        let frame = match tokio::time::timeout_at(wait, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let message = format!("reading the request body failed (it ended early?): {e}");
                return closing(
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
                        .into_response(),
                );
            }
            Err(_) => {
                let message = if wait == end {
                    format!(
                        "the request body was not complete within {} s",
                        limits.total_timeout.as_secs_f64()
                    )
                } else {
                    format!(
                        "the request body stalled: nothing arrived for {} s ({total} bytes received)",
                        limits.idle_timeout.as_secs_f64()
                    )
                };
                return closing(
                    ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
                        .into_response(),
                );
            }
        };
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= limits.max_bytes {
                buf.extend_from_slice(&data);
            } else {
                // Past the limit: keep nothing, stop reading at the discard bound.
                buf = BytesMut::new();
                if total > limits.max_bytes.saturating_mul(DISCARD_FACTOR) {
                    break;
                }
            }
        }
    }
    if total > limits.max_bytes {
        let message = format!(
            "the request body exceeds the limit of {} bytes",
            limits.max_bytes
        );
        return closing(ApiError::too_large(message).into_response());
    }
    next.run(Request::from_parts(parts, Body::from(buf.freeze())))
        .await
}

/// Every error response is `{"error", "error_type"}`: axum's own refusals (405, a path that is
/// not UTF-8, a missing content type) come as empty or text bodies, and are rewritten here with
/// their status and headers (e.g. `Allow`) kept.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 << 10).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let error_type = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let api = ApiError::new(status, error_type, text).into_response();
    let (new_parts, new_body) = api.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (k, v) in new_parts.headers.iter() {
        parts.headers.insert(k, v.clone());
    }
    Response::from_parts(parts, new_body)
}
