//! `/openapi.json` is generated from the handlers; this checks it against what the server really
//! returns: every observed (route, method, status) is documented, and every JSON body conforms to
//! the documented schema.

mod common;

use common::server::{seed_prefixes, Server, TOKEN};
use common::{engine, fixtures_dir};
use serde_json::{json, Value};

/// A small JSON-schema check covering what utoipa emits: $ref, object properties/required,
/// arrays, scalar types (possibly with "null"), oneOf.
fn conforms(v: &Value, schema: &Value, spec: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        return conforms(v, &spec["components"]["schemas"][name], spec, at);
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        return if options.iter().any(|s| conforms(v, s, spec, at).is_ok()) {
            Ok(())
        } else {
            Err(format!("{at}: matches no oneOf branch"))
        };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let ok = types.is_empty()
        || types.contains(&kind)
        || (kind == "integer" && types.contains(&"number"));
    if !ok {
        return Err(format!("{at}: {kind} where the schema says {types:?}"));
    }
    match v {
        Value::Object(map) if schema.get("properties").is_some() => {
            let props = schema["properties"].as_object().unwrap();
            for req in schema["required"].as_array().into_iter().flatten() {
                let req = req.as_str().unwrap();
                if !map.contains_key(req) {
                    return Err(format!("{at}: required field {req:?} missing"));
                }
            }
            for (k, fv) in map {
                let s = props
                    .get(k)
                    .ok_or_else(|| format!("{at}: undocumented field {k:?}"))?;
                conforms(fv, s, spec, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        Value::Array(items) if schema.get("items").is_some() => {
            for (i, item) in items.iter().enumerate() {
                conforms(item, &schema["items"], spec, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[test]
fn documented_statuses_and_shapes_match_the_server() {
    let dir = tempfile::tempdir().unwrap();
    seed_prefixes(dir.path());
    let server = Server::start(dir.path(), &["--max-queue-rows", "4", "--max-inputs", "4"]);
    let spec = server.get("/openapi.json").body;
    assert_eq!(spec["openapi"].as_str().map(|v| &v[..2]), Some("3."));

    let native = prefixd::prefix::peft::import_dir(
        &fixtures_dir().join("proj-p10"),
        &Default::default(),
        engine().model_info(),
    )
    .unwrap()
    .to_bytes()
    .unwrap();
    let classify = |body: Value| server.classify(&body);
    let observed = vec![
        (
            "/v1/classify",
            "post",
            classify(json!({"task": "proj-p10", "inputs": ["a", {"text": "b", "text_pair": "c"}]})),
        ),
        (
            "/v1/classify",
            "post",
            classify(json!({"task": "nope", "inputs": "a"})),
        ),
        (
            "/v1/classify",
            "post",
            classify(json!({"task": "proj-p10", "inputs": 5})),
        ),
        (
            "/v1/classify",
            "post",
            classify(json!({"task": "proj-p10", "inputs": vec!["a"; 5]})),
        ),
        (
            "/v1/classify",
            "post",
            server.post_raw("/v1/classify", "application/json", b"{"),
        ),
        (
            "/v1/classify",
            "post",
            server.post_raw("/v1/classify", "text/plain", b"{}"),
        ),
        ("/v1/tasks", "get", server.get("/v1/tasks")),
        ("/v1/tasks/{task}", "get", server.get("/v1/tasks/proj-p10")),
        ("/v1/tasks/{task}", "get", server.get("/v1/tasks/nope")),
        (
            "/v1/admin/tasks/{task}",
            "put",
            server.put(
                "/v1/admin/tasks/uploaded",
                "application/octet-stream",
                &native,
                None,
            ),
        ),
        (
            "/v1/admin/tasks/{task}",
            "put",
            server.put(
                "/v1/admin/tasks/bad",
                "application/octet-stream",
                b"xx",
                None,
            ),
        ),
        (
            "/v1/admin/tasks/{task}",
            "put",
            server.put(
                "/v1/admin/tasks/-bad",
                "application/octet-stream",
                &native,
                None,
            ),
        ),
        (
            "/v1/admin/tasks/{task}",
            "put",
            server.put(
                "/v1/admin/tasks/x",
                "application/octet-stream",
                &native,
                Some(""),
            ),
        ),
        (
            "/v1/admin/tasks/{task}",
            "put",
            server.put(
                "/v1/admin/tasks/x",
                "application/octet-stream",
                &native,
                Some("Bearer wrong"),
            ),
        ),
        (
            "/v1/admin/tasks/{task}",
            "put",
            server.put(
                "/v1/admin/tasks/x",
                "text/plain",
                &native,
                Some(&format!("Bearer {TOKEN}")),
            ),
        ),
        (
            "/v1/admin/tasks/{task}",
            "delete",
            server.delete("/v1/admin/tasks/uploaded", None),
        ),
        (
            "/v1/admin/tasks/{task}",
            "delete",
            server.delete("/v1/admin/tasks/uploaded", None),
        ),
        ("/health", "get", server.get("/health")),
        ("/ready", "get", server.get("/ready")),
        ("/metrics", "get", server.get("/metrics")),
        ("/info", "get", server.get("/info")),
        ("/v1/tasks", "get", server.get("/v1/tasks?limit=0")),
        ("/v1/tasks/{task}/predict", "post", server.post_json("/v1/tasks/proj-p10/predict", &json!({"inputs": ["a", "b"]}))),
        ("/v1/tasks/{task}/predict", "post", server.post_json("/v1/tasks/nope/predict", &json!({"inputs": "a"}))),
        ("/v1/tasks/{task}/predict", "post", server.post_json("/v1/tasks/proj-p10/predict", &json!({"inputs": "a", "parameters": {"top_k": 0}}))),
        ("/v2", "get", server.get("/v2")),
        ("/v2/models", "get", server.get("/v2/models")),
        ("/v2/models/{task}", "get", server.get("/v2/models/proj-p10")),
        ("/v2/models/{task}", "get", server.get("/v2/models/nope")),
        ("/v2/models/{task}/ready", "get", server.get("/v2/models/proj-p10/ready")),
        ("/v2/models/{task}/ready", "get", server.get("/v2/models/nope/ready")),
        (
            "/v2/models/{task}/infer",
            "post",
            server.post_json("/v2/models/proj-p10/infer", &json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]})),
        ),
        ("/v2/models/{task}/infer", "post", server.post_json("/v2/models/proj-p10/infer", &json!({"inputs": []}))),
        (
            "/v2/models/{task}/infer",
            "post",
            server.post_json("/v2/models/nope/infer", &json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]})),
        ),
    ];
    let mut statuses = std::collections::BTreeSet::new();
    for (path, method, reply) in &observed {
        let op = &spec["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let doc = &op["responses"][reply.status.to_string()];
        assert!(
            doc.is_object(),
            "{method} {path} returned {} which the spec does not list: {}",
            reply.status,
            reply.text
        );
        statuses.insert((path.to_string(), method.to_string(), reply.status));
        if let Some(schema) = doc.pointer("/content/application~1json/schema") {
            conforms(
                &reply.body,
                schema,
                &spec,
                &format!("{method} {path} {}", reply.status),
            )
            .unwrap_or_else(|e| panic!("{e}; body: {}", reply.text));
        }
    }
    // The scenarios reached the statuses that matter most.
    for want in [200, 400, 404, 413, 415, 422] {
        let seen = statuses.contains(&("/v1/classify".into(), "post".into(), want));
        assert!(seen, "classify {want} not observed");
    }
    for want in [200, 204, 400, 401, 403, 404, 415, 422] {
        assert!(
            statuses
                .iter()
                .any(|(p, _, s)| p == "/v1/admin/tasks/{task}" && *s == want),
            "admin {want} not observed"
        );
    }
    // Every documented path exists on the server (no 404 from the fallback on a GET/HEAD probe).
    for path in spec["paths"].as_object().unwrap().keys() {
        let concrete = path.replace("{task}", "proj-p10");
        if spec["paths"][path]["get"].is_object() {
            assert_ne!(
                server.get(&concrete).body["error_type"],
                "not_found",
                "{path}"
            );
        }
    }
}
