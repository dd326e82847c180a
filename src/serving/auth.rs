//! Who is asking. Two separate credentials, both `Authorization: Bearer …`:
//! - the admin token (`--admin-token`) for the routes that change tasks (see `admin`);
//! - optional API keys (`--api-key`, any number) for inference and task listing. Without keys
//!   those routes are open, as before. Health, readiness, metrics and the API documents stay open
//!   either way: probes and scrapers run inside the cluster and carry no secrets.
//!
//! Both checks run before a body is read (they are the outermost layers of their routes), so a
//! caller without credentials costs no memory.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use super::error::ApiError;
use super::AppState;

/// The token of an `Authorization: Bearer <token>` header value. RFC 9110: the scheme is
/// case-insensitive ("bearer x" is as good as "Bearer x").
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .map(str::trim)
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The keys that inference routes accept; none means the routes are open.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys(Vec<String>);

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        Self(
            keys.into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
        )
    }

    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    fn check(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        if !self.required() {
            return Ok(());
        }
        let given = bearer(authorization).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing Authorization: Bearer <API key>",
            )
        })?;
        // Every key is compared, so the time taken does not say which one came close.
        let hits = self
            .0
            .iter()
            .filter(|k| constant_time_eq(given.as_bytes(), k.as_bytes()))
            .count();
        if hits == 0 {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "wrong API key",
            ));
        }
        Ok(())
    }
}

/// Middleware for the inference and listing routes.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let auth = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.api_keys.check(auth) {
        Ok(()) => next.run(request).await,
        Err(e) => refuse(request, e).await,
    }
}

/// Refuses a request without keeping its body. A client that sends the body without waiting for
/// `100 Continue` would see its connection reset by an early answer; so a little of the body —
/// at most 1 MiB or 2 s, read and thrown away, never stored — is let through first, then the
/// answer goes out and the connection closes.
pub async fn refuse(request: Request, e: ApiError) -> Response {
    use http_body_util::BodyExt;
    const DISCARD_BYTES: usize = 1 << 20;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut body = request.into_body();
    let mut seen = 0usize;
    while seen <= DISCARD_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => seen += frame.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
    let mut r = e.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
