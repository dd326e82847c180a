//! `prefixd serve` over real HTTP on 127.0.0.1: results equal the CLI's, under concurrency and
//! overload, through a graceful shutdown; metrics move as requests dictate; the OpenAPI document
//! describes what the server actually returns.

mod common;

use common::server::{seed_prefixes, Server};
use common::{cases, max_abs_diff, model_dir, Case, CASES};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

/// Logits from `prefixd classify` for every fixture input, per case.
fn cli_logits() -> &'static HashMap<&'static str, Vec<Vec<f32>>> {
    static CLI: OnceLock<HashMap<&'static str, Vec<Vec<f32>>>> = OnceLock::new();
    CLI.get_or_init(|| {
        let mut out = HashMap::new();
        for case in CASES {
            let mut input = tempfile::NamedTempFile::new().unwrap();
            for c in cases(case) {
                serde_json::to_writer(&mut input, &c.input()).unwrap();
                input.write_all(b"\n").unwrap();
            }
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_prefixd"))
                .args(["classify", "--max-length", "128", "--model"])
                .arg(model_dir())
                .arg("--prefix")
                .arg(common::fixtures_dir().join(case))
                .arg("--input")
                .arg(input.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let logits = String::from_utf8(o.stdout)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    serde_json::from_value(v["logits"].clone()).unwrap()
                })
                .collect();
            out.insert(case, logits);
        }
        out
    })
}

fn start(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    seed_prefixes(dir.path());
    let server = Server::start(dir.path(), extra);
    (dir, server)
}

fn as_json(c: &Case) -> Value {
    match &c.text_pair {
        Some(p) => json!({"text": c.text, "text_pair": p}),
        None => json!(c.text),
    }
}

fn result_logits(r: &Value) -> Vec<f32> {
    serde_json::from_value(r["logits"].clone()).unwrap()
}

/// Checks a classify response against the CLI (≤ 1e-5) and the PEFT fixture (≤ 1e-4).
fn check_results(case: &str, indices: &[usize], body: &Value) {
    let results = body["results"].as_array().expect("results array");
    assert_eq!(results.len(), indices.len(), "{case}: one result per input");
    let cli = &cli_logits()[case];
    let fixture = cases(case);
    for (r, &i) in results.iter().zip(indices) {
        let logits = result_logits(r);
        let d = max_abs_diff(&logits, &cli[i]);
        assert!(d <= 1e-5, "{case} input {i}: HTTP vs CLI differ by {d:e}");
        assert!(max_abs_diff(&logits, &fixture[i].logits) <= 1e-4);
        assert_eq!(r["label_id"], fixture[i].label);
    }
}

#[test]
fn single_strings_lists_and_pairs_equal_the_cli() {
    let (_dir, server) = start(&[]);
    for case in CASES {
        let cs = cases(case);
        // One string at a time.
        for (i, c) in cs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.text_pair.is_none())
            .take(5)
        {
            let r = server.classify(&json!({"task": case, "inputs": c.text}));
            assert_eq!(r.status, 200, "{}", r.text);
            assert_eq!(r.body["task"], case);
            check_results(case, &[i], &r.body);
        }
        // The whole case as one list, pairs included, in order.
        let all: Vec<Value> = cs.iter().map(as_json).collect();
        let r = server.classify(&json!({"task": case, "inputs": all}));
        assert_eq!(r.status, 200, "{}", r.text);
        check_results(case, &(0..cs.len()).collect::<Vec<_>>(), &r.body);
        let version = r.body["version"].as_str().unwrap();
        assert!(version.starts_with("sha256:"));
    }
    // raw_scores: scores are the logits themselves.
    let r =
        server.classify(&json!({"task": "multi4-p20", "inputs": ["hello"], "raw_scores": true}));
    let res = &r.body["results"][0];
    assert_eq!(res["scores"], res["logits"]);
}

#[test]
fn mixed_tasks_from_many_concurrent_clients() {
    let (_dir, server) = start(&[]);
    let server = std::sync::Arc::new(server);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let server = server.clone();
            std::thread::spawn(move || {
                for k in 0..6 {
                    let case = CASES[(t + k) % 3];
                    let cs = cases(case);
                    // Each request: a few inputs starting at a client-specific offset.
                    let n = 1 + (t + k) % 4;
                    let idx: Vec<usize> = (0..n).map(|j| (t * 3 + k * 5 + j) % cs.len()).collect();
                    let inputs: Vec<Value> = idx.iter().map(|&i| as_json(&cs[i])).collect();
                    let r = server.classify(&json!({"task": case, "inputs": inputs}));
                    assert_eq!(r.status, 200, "{}", r.text);
                    check_results(case, &idx, &r.body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Rows of different tasks did share batches: some batch held more than one task.
    let batches = server.metric("prefixd_batch_tasks_count");
    let single_task = server.metric("prefixd_batch_tasks_bucket{le=\"1\"}");
    assert!(
        batches > single_task,
        "all {batches} batches held a single task: mixing never happened"
    );
}

#[test]
fn excess_requests_get_429_and_accepted_ones_are_correct() {
    let (_dir, server) = start(&[
        "--max-queue-rows",
        "2",
        "--max-inputs",
        "2",
        "--max-batch-rows",
        "2",
    ]);
    let server = std::sync::Arc::new(server);
    let case = "multi4-p20";
    // The two longest inputs (128 tokens) keep the model busy while others arrive.
    let mut cs: Vec<(usize, Case)> = cases(case).into_iter().enumerate().collect();
    cs.sort_by_key(|(_, c)| std::cmp::Reverse(c.input_ids.len()));
    let idx: Vec<usize> = cs.iter().take(2).map(|(i, _)| *i).collect();
    let inputs: Vec<Value> = cs.iter().take(2).map(|(_, c)| as_json(c)).collect();
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let (server, inputs, idx) = (server.clone(), inputs.clone(), idx.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for _ in 0..4 {
                    let r = server.classify(&json!({"task": case, "inputs": inputs}));
                    match r.status {
                        200 => check_results(case, &idx, &r.body),
                        429 => assert_eq!(r.body["error_type"], "overloaded", "{}", r.text),
                        s => panic!("unexpected status {s}: {}", r.text),
                    }
                    statuses.push(r.status);
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert!(ok > 0, "some requests must be served");
    assert!(
        refused > 0,
        "a queue of 2 rows must overflow under 24 clients"
    );
    assert_eq!(
        server.metric(&format!(
            "prefixd_requests_total{{status=\"429\",task=\"{case}\"}}"
        )) as usize,
        refused
    );
    // A request larger than the queue can never fit: it is refused as too large, not overloaded.
    let r = server.classify(&json!({"task": case, "inputs": ["a", "b", "c"]}));
    assert_eq!(r.status, 413, "{}", r.text);
}

#[test]
fn requests_in_flight_at_sigterm_complete() {
    let (_dir, server) = start(&["--shutdown-timeout", "60"]);
    let server = std::sync::Arc::new(server);
    let case = "sst2-like-p8";
    let cs = cases(case);
    let idx: Vec<usize> = (0..cs.len()).cycle().take(200).collect();
    let inputs: Vec<Value> = idx.iter().map(|&i| as_json(&cs[i])).collect();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (server, inputs, idx) = (server.clone(), inputs.clone(), idx.clone());
            std::thread::spawn(move || {
                let r = server.classify(&json!({"task": case, "inputs": inputs}));
                assert_eq!(r.status, 200, "in-flight request failed: {}", r.text);
                check_results(case, &idx, &r.body);
            })
        })
        .collect();
    // Wait until the work is queued, then ask the server to stop.
    server.eventually("rows queued", |s| s.metric("prefixd_queue_depth") > 0.0);
    server.sigterm();
    for t in threads {
        t.join().unwrap();
    }
    let server = std::sync::Arc::try_unwrap(server).ok().unwrap();
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn the_shutdown_timeout_is_kept_and_queued_rows_get_503() {
    // Seconds of queued work, a 1 s shutdown timeout: the process must exit on time, every
    // request answered: 200 if it ran, 503 with Retry-After if it was still queued.
    let (_dir, server) = start(&[
        "--shutdown-timeout",
        "1",
        "--max-inputs",
        "256",
        "--max-queue-rows",
        "4096",
    ]);
    let server = std::sync::Arc::new(server);
    let case = "multi4-p20";
    let mut cs: Vec<Case> = cases(case);
    cs.sort_by_key(|c| std::cmp::Reverse(c.input_ids.len()));
    let inputs: Vec<Value> = (0..256).map(|i| as_json(&cs[i % 4])).collect();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (server, inputs) = (server.clone(), inputs.clone());
            std::thread::spawn(move || {
                let url = format!("{}/v1/classify", server.base);
                let mut r = server
                    .agent()
                    .post(url)
                    .send_json(json!({"task": case, "inputs": inputs}))
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let body: Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                if status == 503 {
                    assert_eq!(body["error_type"], "shutting_down", "{body}");
                    assert_eq!(retry.as_deref(), Some("5"), "503 without Retry-After");
                } else {
                    assert_eq!(status, 200, "{body}");
                }
                status
            })
        })
        .collect();
    server.eventually("rows queued", |s| s.metric("prefixd_queue_depth") > 1000.0);
    let t0 = std::time::Instant::now();
    server.sigterm();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let server = std::sync::Arc::try_unwrap(server).ok().unwrap();
    let status = server.wait(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    // 1 s timeout + the batch already running + a 2 s grace for the answers.
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "exited after {:?}",
        t0.elapsed()
    );
    assert!(
        statuses.contains(&503),
        "no request was cut by the deadline: {statuses:?}"
    );
}

#[test]
fn bad_requests_get_json_errors_naming_the_problem() {
    let (_dir, server) = start(&["--max-request-bytes", "4096", "--max-text-chars", "1000"]);
    let cases_: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"task": "nope", "inputs": "x"}),
            404,
            "unknown_task",
            "nope",
        ),
        (
            json!({"task": "sst2-like-p8"}),
            422,
            "invalid_input",
            "inputs",
        ),
        (
            json!({"task": "sst2-like-p8", "inputs": []}),
            422,
            "invalid_input",
            "empty",
        ),
        (
            json!({"task": "sst2-like-p8", "inputs": [{"txt": "a"}]}),
            422,
            "invalid_input",
            "inputs[0]",
        ),
        (
            json!({"task": "sst2-like-p8", "inputs": ["ok", 3]}),
            422,
            "invalid_input",
            "inputs[1]",
        ),
        (
            json!({"task": "sst2-like-p8", "inputs": "x", "extra": 1}),
            422,
            "invalid_input",
            "extra",
        ),
        (
            json!({"task": "sst2-like-p8", "inputs": "x".repeat(1001)}),
            413,
            "payload_too_large",
            "1000",
        ),
        (
            json!({"task": "sst2-like-p8", "inputs": vec!["y".repeat(900); 6]}),
            413,
            "payload_too_large",
            "",
        ),
    ];
    for (body, status, error_type, mention) in cases_ {
        let r = server.classify(&body);
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert_eq!(r.body["error_type"], error_type, "{}", r.text);
        assert!(
            r.body["error"].as_str().unwrap().contains(mention),
            "{}",
            r.text
        );
    }
    let r = server.post_raw("/v1/classify", "application/json", b"{\"task\": ");
    assert_eq!(
        (r.status, r.body["error_type"].as_str()),
        (400, Some("invalid_request"))
    );
    let r = server.post_raw("/v1/classify", "text/plain", b"{}");
    assert_eq!(r.status, 415);
    assert!(r.body["error"].is_string());
    // Empty and whitespace-only texts are valid input.
    let r = server.classify(&json!({"task": "sst2-like-p8", "inputs": ["", "   \t "]}));
    assert_eq!(r.status, 200, "{}", r.text);
    check_results("sst2-like-p8", &[2, 3], &r.body);
}

#[test]
fn health_readiness_and_metrics() {
    let (_dir, server) = start(&[]);
    for path in ["/health", "/v2/health/live"] {
        assert_eq!(server.get(path).status, 200);
    }
    for path in ["/ready", "/v2/health/ready"] {
        let r = server.get(path);
        assert_eq!((r.status, r.body["status"].as_str()), (200, Some("ready")));
    }
    let before_ok = server.metric("prefixd_requests_total{status=\"200\",task=\"proj-p10\"}");
    let before_404 = server.metric("prefixd_requests_total{status=\"404\",task=\"unknown\"}");
    let before_batches = server.metric("prefixd_batch_size_count");
    for _ in 0..3 {
        assert_eq!(
            server
                .classify(&json!({"task": "proj-p10", "inputs": ["a", "b"]}))
                .status,
            200
        );
    }
    assert_eq!(
        server
            .classify(&json!({"task": "missing", "inputs": "a"}))
            .status,
        404
    );
    assert_eq!(
        server.metric("prefixd_requests_total{status=\"200\",task=\"proj-p10\"}") - before_ok,
        3.0
    );
    assert_eq!(
        server.metric("prefixd_requests_total{status=\"404\",task=\"unknown\"}") - before_404,
        1.0
    );
    let batches = server.metric("prefixd_batch_size_count") - before_batches;
    assert!(
        (1.0..=3.0).contains(&batches),
        "3 requests ran in {batches} batches"
    );
    assert_eq!(server.metric("prefixd_tasks_loaded"), 3.0);
    // Weights load behind the server (warm-up) or for a request that gets there first: each
    // task's file is loaded once, by one or the other.
    server.eventually("all resident", |s| {
        s.metric("prefixd_resident_tasks") == 3.0
    });
    assert_eq!(
        server.metric("prefixd_prefix_loads_total{origin=\"startup\",result=\"ok\"}")
            + server.metric("prefixd_prefix_loads_total{origin=\"demand\",result=\"ok\"}"),
        3.0
    );
    assert_eq!(
        server.metric("prefixd_request_duration_seconds_count{task=\"proj-p10\"}"),
        3.0
    );
    assert_eq!(server.metric("prefixd_queue_depth"), 0.0);
    let text = server.get("/metrics").text;
    for name in [
        "prefixd_queue_duration_seconds_bucket",
        "prefixd_inference_duration_seconds_bucket",
        "prefixd_batch_tokens_bucket",
        "prefixd_batch_tasks_bucket",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    // Metric names have no colons (label values may: a fingerprint is `sha256:…`).
    assert!(!text
        .lines()
        .any(|l| !l.starts_with('#') && l.split(['{', ' ']).next().unwrap_or("").contains(':')));
}
