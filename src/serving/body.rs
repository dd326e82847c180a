//! Request bodies are read in full, up to a limit, before any handler looks at the request.
//!
//! Why: a server that answers early (a wrong token, a body too large) and closes the connection
//! with request bytes still unread makes the kernel send a TCP reset, and the client then loses
//! the JSON error it was sent and sees "connection reset" instead. Reading first means every
//! refusal arrives. Past the limit the rest is read and discarded, up to a bound in bytes and time,
//! so even a 413 usually reaches the client (nginx calls this lingering close).

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body_util::BodyExt;
use std::time::Duration;

use super::error::ApiError;

/// Most extra bytes read and discarded past the limit, as a multiple of it.
const DISCARD_FACTOR: usize = 4;
const DISCARD_TIME: Duration = Duration::from_secs(10);

pub async fn buffer_body(limit: usize, request: Request, next: Next) -> Response {
    let (parts, mut body) = request.into_parts();
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + DISCARD_TIME;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("reading the request body failed: {e}"),
                )
                .into_response()
            }
            Ok(None) | Err(_) => break,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= limit {
                buf.extend_from_slice(&data);
            } else if total > limit.saturating_mul(DISCARD_FACTOR) {
                break;
            }
        }
    }
    if total > limit {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(buf.freeze())))
        .await
}
