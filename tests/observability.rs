//! What operators see: `GET /info`, `prefixd_build_info` and the process metrics, and one access
//! log line per request (here as JSON, `--log-format json`). Real server, tiny model.

mod common;

use common::server::{Server, TOKEN};
use common::tiny;
use serde_json::{json, Value};

fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny::seed_prefix(dir.path(), "alpha", 4, 2);
    tiny::seed_prefix(dir.path(), "beta", 6, 3);
    dir
}

#[test]
fn info_says_what_is_running() {
    let dir = folder();
    let server = Server::start_tiny(dir.path(), &["--api-key", "k", "--max-inputs", "17"]);
    let r = server.get("/info");
    assert_eq!(r.status, 200, "{}", r.text);
    let i = &r.body;
    assert_eq!(i["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(i["model"]["name"], "prefixd-tests/tiny-bert");
    assert_eq!(
        i["model"]["hub_id"],
        Value::Null,
        "unknown weights have no hub id"
    );
    assert!(i["model"]["fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(
        (i["model"]["device"].as_str(), i["model"]["dtype"].as_str()),
        (Some("cpu"), Some("f32"))
    );
    assert_eq!(i["limits"]["max_length"], 128);
    assert_eq!(i["limits"]["max_inputs"], 17);
    assert_eq!(i["tasks"], 2);
    assert_eq!(
        (
            i["api_key_required"].as_bool(),
            i["admin_enabled"].as_bool()
        ),
        (Some(true), Some(true))
    );

    let bytes = tiny::prefix("gamma", 3, 2, 2).to_bytes().unwrap();
    assert_eq!(
        server
            .put(
                "/v1/admin/tasks/gamma",
                "application/octet-stream",
                &bytes,
                None
            )
            .status,
        200
    );
    assert_eq!(
        server.get("/info").body["tasks"],
        3,
        "the task count is live"
    );
    let _ = TOKEN;
}

#[test]
fn metrics_carry_build_info_and_the_process() {
    let dir = folder();
    let server = Server::start_tiny(dir.path(), &[]);
    let text = server.get("/metrics").text;
    let build = text
        .lines()
        .find(|l| l.starts_with("prefixd_build_info{"))
        .expect("build info");
    assert!(build.ends_with(" 1"), "{build}");
    for label in [
        format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        "device=\"cpu\"".into(),
        "dtype=\"f32\"".into(),
    ] {
        assert!(build.contains(&label), "{build} lacks {label}");
    }
    assert!(
        server.metric("process_resident_memory_bytes") > 1e6,
        "{text}"
    );
    assert!(server.metric("process_open_fds") > 0.0, "{text}");
    assert!(text.contains("process_cpu_seconds_total"), "{text}");
}

#[test]
fn each_request_is_one_access_line_in_json() {
    let dir = folder();
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Server::start_with(
        &tiny::model_dir(),
        dir.path(),
        &["--log-format", "json"],
        |c| {
            c.env("RUST_LOG", "warn,prefixd::access=info").stderr(log);
        },
    );
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let post = |id: &str, body: Value| {
        agent
            .post(format!("{}/v1/classify", server.base))
            .header("x-request-id", id)
            .send_json(body)
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        post(
            "req-ok",
            json!({"task": "beta", "inputs": ["a b", "c d", "e"]})
        ),
        200
    );
    assert_eq!(post("req-bad", json!({"task": "alpha", "inputs": []})), 422);
    assert_eq!(server.get("/v1/tasks/alpha").status, 200);

    let lines: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &Value| v["target"] == "prefixd::access")
        .collect();
    let find = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {lines:?}"))
    };
    let ok = find("req-ok");
    assert_eq!(
        (ok["method"].as_str(), ok["route"].as_str()),
        (Some("POST"), Some("/v1/classify"))
    );
    assert_eq!(
        (
            ok["status"].as_u64(),
            ok["task"].as_str(),
            ok["rows"].as_u64()
        ),
        (Some(200), Some("beta"), Some(3))
    );
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    let bad = find("req-bad");
    assert_eq!(
        (
            bad["status"].as_u64(),
            bad["task"].as_str(),
            bad["rows"].as_u64()
        ),
        (Some(422), Some("alpha"), Some(0))
    );
    let route = lines
        .iter()
        .find(|l| l["method"] == "GET")
        .expect("the GET is logged");
    assert_eq!(
        route["route"], "/v1/tasks/{task}",
        "routes are logged as templates"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["route"] == "/v1/classify")
            .count(),
        2,
        "one line per request"
    );
}
