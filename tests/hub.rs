//! `--model ORG/NAME`: the standard Hugging Face cache is read (no network when the files are
//! there), a missing model is downloaded from the hub (`HF_ENDPOINT`; here a small stand-in hub
//! on 127.0.0.1 speaking the `resolve` protocol), and an unreachable hub is a clear error. A
//! local directory always wins. Tiny model.

mod common;

use axum::extract::Path as UrlPath;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::tiny;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const UNREACHABLE: &str = "http://127.0.0.1:9";

fn classify(model: &str, hf_home: &Path, endpoint: &str, prefix: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_prefixd"))
        .args([
            "classify", "--device", "cpu", "--model", model, "--text", "a b c", "--prefix",
        ])
        .arg(prefix)
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .output()
        .unwrap()
}

fn prefix_file(dir: &Path) -> PathBuf {
    let path = dir.join("t.safetensors");
    tiny::prefix("t", 3, 2, 1).write(&path).unwrap();
    path
}

/// The tiny model laid out as the Hugging Face cache keeps a snapshot.
fn seed_cache(hf_home: &Path, id: &str, reference: &str) {
    let repo = hf_home
        .join("hub")
        .join(format!("models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(tiny::model_dir().join(f), snapshot.join(f)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(reference), COMMIT).unwrap();
}

fn ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap()
}

#[test]
fn the_cache_is_read_without_a_network() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix_file(tmp.path());
    seed_cache(tmp.path(), "acme/tiny-bert", "main");
    seed_cache(tmp.path(), "acme/tiny-bert", "v1");
    let local = ok(&classify(
        tiny::model_dir().to_str().unwrap(),
        tmp.path(),
        UNREACHABLE,
        &prefix,
    ));
    for model in ["acme/tiny-bert", "acme/tiny-bert@v1"] {
        let out = classify(model, tmp.path(), UNREACHABLE, &prefix);
        assert_eq!(
            ok(&out)["logits"],
            local["logits"],
            "{model}: the same model as the directory"
        );
    }
}

#[test]
fn an_unreachable_hub_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix_file(tmp.path());
    let out = classify("acme/missing-bert", tmp.path(), UNREACHABLE, &prefix);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for words in [
        "acme/missing-bert",
        "Hugging Face model id",
        "config.json",
        "127.0.0.1:9",
    ] {
        assert!(err.contains(words), "{words:?} missing from: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    let out = classify("not-an-id", tmp.path(), UNREACHABLE, &prefix);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such directory"));
}

/// A stand-in for the hub's `GET /{org}/{name}/resolve/{revision}/{file}`: ranges, the commit
/// and the etag, as hf-hub reads them.
async fn resolve(
    UrlPath((org, name, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
    log: axum::extract::State<Arc<Mutex<Vec<String>>>>,
) -> axum::response::Response {
    log.lock().unwrap().push(format!("{org}/{name}/{file}"));
    let Ok(bytes) = std::fs::read(tiny::model_dir().join(&file)) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let size = bytes.len();
    let (start, end) = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .map(|(a, b)| {
            (
                a.parse().unwrap_or(0),
                b.parse().map_or(size - 1, |e: usize| e.min(size - 1)),
            )
        })
        .unwrap_or((0, size - 1));
    let etag = format!("\"{:x}\"", bytes.len() * 7919 + file.len());
    (
        StatusCode::PARTIAL_CONTENT,
        [
            ("x-repo-commit", COMMIT.to_string()),
            ("etag", etag),
            ("content-range", format!("bytes {start}-{end}/{size}")),
        ],
        bytes[start..=end].to_vec(),
    )
        .into_response()
}

#[test]
fn a_missing_model_is_downloaded_into_the_cache() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route(
            "/{org}/{name}/resolve/{rev}/{file}",
            axum::routing::get(resolve),
        )
        .with_state(log.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            })
    });

    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix_file(tmp.path());
    let local = ok(&classify(
        tiny::model_dir().to_str().unwrap(),
        tmp.path(),
        UNREACHABLE,
        &prefix,
    ));
    let fetched = ok(&classify("acme/fresh-bert", tmp.path(), &endpoint, &prefix));
    assert_eq!(fetched["logits"], local["logits"]);
    let asked = log.lock().unwrap().clone();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(
            asked.contains(&format!("acme/fresh-bert/{f}")),
            "{f} not fetched: {asked:?}"
        );
    }
    let snapshot = tmp
        .path()
        .join("hub/models--acme--fresh-bert/snapshots")
        .join(COMMIT);
    assert!(
        snapshot.join("model.safetensors").exists(),
        "the standard cache layout"
    );
    // Now cached: the hub is not needed any more.
    let again = ok(&classify(
        "acme/fresh-bert",
        tmp.path(),
        UNREACHABLE,
        &prefix,
    ));
    assert_eq!(again["logits"], local["logits"]);
}
