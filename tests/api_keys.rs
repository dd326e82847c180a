//! `--api-key`: inference and listing need one of the keys; the admin token stays separate;
//! health, readiness, metrics and the API document stay open. Real server, tiny model.

mod common;

use common::server::{Server, TOKEN};
use common::tiny;
use serde_json::json;

fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny::seed_prefix(dir.path(), "alpha", 4, 2);
    dir
}

fn classify_body() -> serde_json::Value {
    json!({"task": "alpha", "inputs": ["a short text"]})
}

#[test]
fn keys_guard_inference_and_listing_only() {
    let dir = folder();
    let server = Server::start_tiny(
        dir.path(),
        &["--api-key", "key-one", "--api-key", "key-two"],
    );
    let body = classify_body();
    let guarded: [(&str, Option<&serde_json::Value>); 3] = [
        ("/v1/classify", Some(&body)),
        ("/v1/tasks", None),
        ("/v1/tasks/alpha", None),
    ];
    for (path, body) in guarded {
        let r = server.with_auth(path, None, body);
        assert_eq!(
            (r.status, r.body["error_type"].as_str()),
            (401, Some("unauthorized")),
            "{path}: {}",
            r.text
        );
        for wrong in [
            "Bearer key-three",
            "Bearer key-on",
            "Basic key-one",
            "Bearer ",
            TOKEN,
        ] {
            let r = server.with_auth(path, Some(wrong), body);
            assert!(
                matches!(r.status, 401 | 403),
                "{path} {wrong:?}: {}",
                r.text
            );
            assert!(r.body["error"].is_string(), "{path} {wrong:?}: {}", r.text);
        }
        // The admin token is not an API key.
        let r = server.with_auth(path, Some(&format!("Bearer {TOKEN}")), body);
        assert_eq!(
            (r.status, r.body["error_type"].as_str()),
            (403, Some("forbidden")),
            "{path}: {}",
            r.text
        );
        for right in ["Bearer key-one", "bearer key-two"] {
            let r = server.with_auth(path, Some(right), body);
            assert_eq!(r.status, 200, "{path} {right:?}: {}", r.text);
        }
    }
    let r = server.with_auth("/v1/classify", Some("Bearer key-two"), Some(&body));
    assert_eq!(
        r.body["results"][0]["label"]
            .as_str()
            .map(|l| !l.is_empty()),
        Some(true),
        "{}",
        r.text
    );

    for open in [
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
        "/v2/health/ready",
    ] {
        assert_eq!(server.with_auth(open, None, None).status, 200, "{open}");
    }
    // Admin routes take the admin token, not an API key.
    let bytes = tiny::prefix("gamma", 3, 2, 2).to_bytes().unwrap();
    let r = server.put(
        "/v1/admin/tasks/gamma",
        "application/octet-stream",
        &bytes,
        Some("Bearer key-one"),
    );
    assert_eq!(r.status, 403, "{}", r.text);
    let r = server.put(
        "/v1/admin/tasks/gamma",
        "application/octet-stream",
        &bytes,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn keys_come_from_the_environment_too_and_none_means_open() {
    let dir = folder();
    let server = Server::start_with(&tiny::model_dir(), dir.path(), &[], |c| {
        c.env("PREFIXD_API_KEYS", "env-a,env-b");
    });
    let body = classify_body();
    assert_eq!(
        server.with_auth("/v1/classify", None, Some(&body)).status,
        401
    );
    assert_eq!(
        server
            .with_auth("/v1/classify", Some("Bearer env-b"), Some(&body))
            .status,
        200
    );
    assert_eq!(
        server
            .with_auth("/v1/classify", Some("Bearer env-a,env-b"), Some(&body))
            .status,
        403
    );
    drop(server);

    let open = Server::start_tiny(dir.path(), &[]);
    assert_eq!(
        open.with_auth("/v1/classify", None, Some(&body)).status,
        200
    );
    assert_eq!(
        open.with_auth("/v1/tasks", Some("Bearer anything"), None)
            .status,
        200
    );
}

#[test]
fn the_document_says_which_routes_take_a_key() {
    let dir = folder();
    let server = Server::start_tiny(dir.path(), &[]);
    let doc = server.get("/openapi.json").body;
    assert!(
        doc["components"]["securitySchemes"]["api_key"].is_object(),
        "{doc}"
    );
    for (path, method) in [
        ("/v1/classify", "post"),
        ("/v1/tasks", "get"),
        ("/v1/tasks/{task}", "get"),
    ] {
        let security = doc["paths"][path][method]["security"].to_string();
        assert!(security.contains("api_key"), "{path}: {security}");
    }
    assert!(doc["paths"]["/health"]["get"]["security"].is_null());
}
