//! Property tests: whatever bytes or JSON arrive, nothing panics and every refusal says why.
//!
//! Short in CI (`PROPTEST_CASES`, default 256 per property); `scripts/fuzz` runs them long
//! (100,000 cases each). All on the tiny test model.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::tiny;
use prefixd::engine::{Engine, EngineConfig, Task};
use prefixd::prefix::peft::{self, ImportOptions};
use prefixd::prefix::PrefixFile;
use prefixd::serving::registry::Registry;
use prefixd::serving::{AppState, Batcher, BatcherConfig, Infer, Metrics, RequestLimits};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn good_file() -> &'static Vec<u8> {
    static F: OnceLock<Vec<u8>> = OnceLock::new();
    F.get_or_init(|| tiny::prefix("fuzz", 3, 2, 1).to_bytes().unwrap())
}

/// A valid file, then mutated: bytes flipped, a cut, bytes inserted, or its header rewritten.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let n = good_file().len();
    prop_oneof![
        prop::collection::vec((0..n, any::<u8>()), 1..8).prop_map(|flips| {
            let mut b = good_file().clone();
            for (i, v) in flips {
                b[i] = v;
            }
            b
        }),
        (0..n).prop_map(|cut| good_file()[..cut].to_vec()),
        (0..n, prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(at, extra)| {
            let mut b = good_file().clone();
            b.splice(at..at, extra);
            b
        }),
        // Header-level edits: valid JSON, wrong meaning.
        (0..6usize, any::<u32>()).prop_map(|(what, v)| {
            let mut f = PrefixFile::from_bytes(good_file()).unwrap();
            match what {
                0 => f.meta.num_virtual_tokens = v as usize % 50,
                1 => f.meta.max_length = Some(v as usize % 4),
                2 => f.meta.labels.truncate(v as usize % 3),
                3 => f.meta.base_model.hidden = v as usize % 100,
                4 => f.meta.base_model.heads = v as usize % 9,
                _ => f.meta.format_version = v,
            }
            f.to_bytes().unwrap_or_default()
        }),
        prop::collection::vec(any::<u8>(), 0..256),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_prefix_files_never_panic(bytes in mutated()) {
        let info = tiny::model_info();
        match Task::from_bytes(&bytes, &info) {
            Ok(task) => prop_assert!(task.num_virtual_tokens() > 0),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn mutated_peft_adapters_never_panic(
        field in 0..7usize,
        value in prop_oneof![
            Just(json!(null)), Just(json!(-1)), Just(json!(0)), Just(json!(1)), Just(json!(3)),
            Just(json!(1e12)), Just(json!("PREFIX_TUNING")), Just(json!("LORA")), Just(json!([1, 2])),
            Just(json!({"a": 1})), any::<i64>().prop_map(|v| json!(v)), ".*".prop_map(|s| json!(s)),
        ],
        weight_flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        labels in prop::option::of(prop::collection::vec("[a-z]{0,3}", 0..4)),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let file = PrefixFile::from_bytes(good_file()).unwrap();
        let _ = peft::export_dir(&file, dir.path()).unwrap();
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(peft::CONFIG_FILE)).unwrap()).unwrap();
        let key = ["peft_type", "task_type", "num_virtual_tokens", "num_layers", "token_dim",
                   "num_attention_heads", "modules_to_save"][field];
        config[key] = value;
        let mut weights = std::fs::read(dir.path().join(peft::WEIGHTS_FILE)).unwrap();
        for (i, v) in weight_flips {
            let at = i.index(weights.len());
            weights[at] = v;
        }
        let opts = ImportOptions { labels, ..Default::default() };
        let result = peft::import_bytes(
            &serde_json::to_vec(&config).unwrap(), &weights, None, "fuzz", &opts, &tiny::model_info());
        if let Err(e) = result {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// The real router over the tiny model, in process (no sockets): fast enough for many cases.
fn router() -> &'static axum::Router {
    static R: OnceLock<(axum::Router, tempfile::TempDir)> = OnceLock::new();
    &R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        tiny::seed_prefix(dir.path(), "alpha", 4, 2);
        tiny::seed_prefix(dir.path(), "beta", 6, 3);
        let engine = Engine::load(&EngineConfig {
            max_length: 64,
            ..EngineConfig::new(tiny::model_dir())
        })
        .unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let registry =
            Registry::open(dir.path(), engine.model_info().clone(), 1 << 20, None).unwrap();
        let text = engine.text_encoder().clone();
        let limits = RequestLimits::default();
        let (batcher, _thread) =
            Batcher::start(engine, BatcherConfig::default(), metrics.clone()).unwrap();
        let infer = Infer::new(registry, text, batcher, limits.inputs.clone());
        let state = Arc::new(AppState::new(infer, metrics, Some("t".into()), limits));
        (prefixd::serving::router(state), dir)
    })
    .0
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| json!(v)),
        "\\PC{0,40}".prop_map(Value::String),
        Just(json!("alpha")),
        Just(json!("text")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("task".to_string()),
                    Just("inputs".to_string()),
                    Just("text".to_string()),
                    Just("text_pair".to_string()),
                    Just("raw_scores".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..5,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bodies close to valid requests, and anything at all.
fn classify_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (
            prop_oneof![Just("alpha"), Just("beta"), Just("nope"), Just("")],
            json_value(),
            any::<bool>()
        )
            .prop_map(|(t, inputs, raw)| serde_json::to_vec(
                &json!({"task": t, "inputs": inputs, "raw_scores": raw})
            )
            .unwrap()),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_body_gets_a_json_answer_and_no_5xx(
        body in classify_body(),
        method in prop_oneof![Just("POST"), Just("GET"), Just("PUT"), Just("DELETE")],
        path in prop_oneof![
            Just("/v1/classify".to_string()), Just("/v1/tasks".to_string()),
            Just("/v1/tasks/alpha".to_string()), Just("/v1/admin/tasks/alpha".to_string()),
            "/v1/tasks/[A-Za-z0-9%._-]{0,12}", "/[a-z/]{0,16}",
        ],
        content_type in prop_oneof![Just("application/json"), Just("text/plain"), Just("application/octet-stream")],
    ) {
        let request = Request::builder()
            .method(method)
            .uri(&path)
            .header("content-type", content_type)
            .body(Body::from(body));
        let Ok(request) = request else { return Ok(()) }; // not a valid URI: never reaches a server
        let (status, bytes) = runtime().block_on(async {
            let response = router().clone().oneshot(request).await.unwrap();
            let status = response.status();
            (status, axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap())
        });
        prop_assert!(!status.is_server_error(), "{method} {path}: {status}: {}", String::from_utf8_lossy(&bytes));
        if status.is_client_error() {
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("{status} body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes))))?;
            prop_assert!(v["error"].is_string() && v["error_type"].is_string(), "{v}");
        }
        if status == StatusCode::OK && path == "/v1/classify" {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert!(v["results"].as_array().is_some_and(|r| !r.is_empty()));
        }
    }
}
