//! The clients people already have, against a real server: KServe v2 through `tritonclient`'s
//! HTTP client, the Hugging Face text-classification shape through `huggingface_hub`'s
//! `InferenceClient` (Python, installed by `scripts/clients-env`, which `scripts/test` runs).
//! Each must agree with `/v1/classify` on the same texts. Tiny model.

mod common;

use common::server::Server;
use common::tiny;
use serde_json::{json, Value};
use std::path::PathBuf;

/// The interpreter with the clients: `PREFIXD_CLIENTS_PYTHON`, else `.venv-clients/`.
fn python() -> PathBuf {
    let path = std::env::var_os("PREFIXD_CLIENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join(".venv-clients/bin/python"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/clients-env (scripts/test does) or set PREFIXD_CLIENTS_PYTHON",
        path.display()
    );
    path
}

fn run_client(script: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new(python())
        .arg(common::repo_root().join("tests/clients").join(script))
        .args(args)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny::seed_prefix(dir.path(), "beta", 6, 3);
    dir
}

fn close(a: &Value, b: &Value) {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn tritonclient_speaks_kserve_v2() {
    let dir = folder();
    let server = Server::start_tiny(dir.path(), &[]);
    let texts = ["a b c", "héllo wörld d"];
    let ours = server.classify(&json!({"task": "beta", "inputs": texts}));
    assert_eq!(ours.status, 200, "{}", ours.text);
    let got = run_client("kserve_client.py", &[&server.addr(), "beta"]);

    for flag in ["server_live", "server_ready", "model_ready"] {
        assert_eq!(got[flag], true, "{flag}: {got}");
    }
    assert_eq!(got["unknown_ready"], false);
    assert_eq!(got["server"]["name"], "prefixd");
    let meta = &got["metadata"];
    assert_eq!(meta["name"], "beta");
    assert_eq!(
        meta["inputs"][0],
        json!({"name": "text", "datatype": "BYTES", "shape": [-1]})
    );
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 3]));

    let b = &got["binary"];
    assert_eq!(b["id"], "r-1");
    for (i, r) in ours.body["results"].as_array().unwrap().iter().enumerate() {
        close(&b["logits"][i], &r["logits"]);
        close(&b["probabilities"][i], &r["scores"]);
        assert_eq!(b["label"][i], r["label"]);
        assert_eq!(got["json"]["label"][i], r["label"]);
    }
    assert_eq!(
        got["json"]["outputs"],
        json!(["label"]),
        "only the requested output"
    );
    assert_eq!(got["unknown_task"]["status"], "404", "{got}");
    assert!(
        got["wrong_input"]["message"]
            .as_str()
            .unwrap()
            .contains("pixels"),
        "{got}"
    );
}

#[test]
fn huggingface_hub_inference_client_speaks_the_hf_shape() {
    let dir = folder();
    let server = Server::start_tiny(dir.path(), &["--api-key", "sekret"]);
    let got = run_client("hf_client.py", &[&server.base, "beta", "sekret"]);
    let ours = server.with_auth(
        "/v1/classify",
        Some("Bearer sekret"),
        Some(&json!({"task": "beta", "inputs": ["a b c"]})),
    );
    let r = &ours.body["results"][0];
    // All labels, best first, with the task's scores; top_k = 1 keeps the best.
    let all = got["all"].as_array().unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0][0], r["label"]);
    let labels: Vec<&str> = ["LABEL_0", "LABEL_1", "LABEL_2"].to_vec();
    for pair in all {
        let k = labels
            .iter()
            .position(|l| *l == pair[0].as_str().unwrap())
            .unwrap();
        close(&json!([pair[1]]), &json!([r["scores"][k]]));
    }
    assert!(all.windows(2).all(|w| w[0][1].as_f64() >= w[1][1].as_f64()));
    assert_eq!(got["top1"], json!([all[0]]));
    let raw = got["raw"].as_array().unwrap();
    let k = labels
        .iter()
        .position(|l| *l == raw[0][0].as_str().unwrap())
        .unwrap();
    close(&json!([raw[0][1]]), &json!([r["logits"][k]]));
    assert_eq!(got["unknown_task"]["status"], 404);
    assert_eq!(got["unknown_task"]["body"]["error_type"], "unknown_task");
}

/// The same routes by hand: the request shapes the clients do not send, and bad input.
#[test]
fn compatible_routes_by_hand() {
    let dir = folder();
    let server = Server::start_tiny(dir.path(), &[]);
    let post = |path: &str, body: Value| server.post_json(path, &body);

    // HF: a pair, and a list of inputs (one list of labels each).
    let r = post(
        "/v1/tasks/beta/predict",
        json!({"inputs": {"text": "a b", "text_pair": "c d"}}),
    );
    assert_eq!(
        (r.status, r.body.as_array().map(Vec::len)),
        (200, Some(1)),
        "{}",
        r.text
    );
    let r = post(
        "/v1/tasks/beta/predict",
        json!({"inputs": ["a", "b", "c d"], "parameters": {"top_k": 2}}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.body
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l.as_array().unwrap().len() == 2),
        "{}",
        r.text
    );
    for (body, words) in [
        (json!({"inputs": "a", "parameters": {"top_k": 0}}), "top_k"),
        (
            json!({"inputs": "a", "parameters": {"function_to_apply": "relu"}}),
            "function_to_apply",
        ),
        (json!({"inputs": "a", "evil": 1}), "evil"),
        (json!({"inputs": []}), "empty"),
    ] {
        let r = post("/v1/tasks/beta/predict", body);
        assert_eq!(
            (r.status, r.body["error_type"].as_str()),
            (422, Some("invalid_input")),
            "{}",
            r.text
        );
        assert!(r.text.contains(words), "{}", r.text);
    }

    // KServe: pairs, and malformed tensors.
    let infer = |body: Value| post("/v2/models/beta/infer", body);
    let r = infer(json!({"inputs": [
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
        {"name": "text_pair", "shape": [2], "datatype": "BYTES", "data": ["c", "d"]}]}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["outputs"][0]["shape"], json!([2, 3]));
    let ours =
        server.classify(&json!({"task": "beta", "inputs": [{"text": "a", "text_pair": "c"}]}));
    close(
        &json!(r.body["outputs"][0]["data"].as_array().unwrap()[..3]),
        &ours.body["results"][0]["logits"],
    );
    for (body, words) in [
        (
            json!({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}),
            "shape",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
            "BYTES",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [7]}]}),
            "string",
        ),
        (json!({"inputs": []}), "missing input"),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                "outputs": [{"name": "hidden"}]}),
            "hidden",
        ),
    ] {
        let r = infer(body);
        assert_eq!(
            (r.status, r.body["error_type"].as_str()),
            (422, Some("invalid_input")),
            "{}",
            r.text
        );
        assert!(r.text.contains(words), "{words}: {}", r.text);
    }
    // A binary section that lies about its size.
    let header = br#"{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":50}}]}"#;
    let mut body = header.to_vec();
    body.extend_from_slice(&[3, 0, 0, 0, b'a', b'b']);
    let r = server.post_raw_with(
        "/v2/models/beta/infer",
        "application/octet-stream",
        &body,
        &[("inference-header-content-length", &header.len().to_string())],
    );
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (400, Some("invalid_request")),
        "{}",
        r.text
    );
    let r = server.get("/v2/models");
    assert_eq!(r.body["models"][0]["name"], "beta", "{}", r.text);
    assert_eq!(server.get("/v2/models/nope/ready").status, 404);
    // The metrics count these routes' requests under their task, like /v1/classify's.
    assert!(server.metric("prefixd_requests_total{status=\"200\",task=\"beta\"}") >= 4.0);
}
