//! Truncation per task, end to end: a PEFT adapter imported (CLI or library) or uploaded
//! (multipart) can record the length it was trained with; inputs for that task are cut to it;
//! the length survives export and re-import; without one, a task is served at the server's
//! `--max-length` (default 512) within the model's positions. Tiny model.

mod common;

use common::server::{multipart, Server};
use common::tiny;
use prefixd::prefix::peft::{self, ImportOptions};
use serde_json::json;
use std::path::Path;

fn adapter(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let _ = peft::export_dir(&tiny::prefix("peft", 5, 2, 11), dir).unwrap();
    (
        std::fs::read(dir.join("adapter_config.json")).unwrap(),
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
    )
}

#[test]
fn an_upload_records_its_truncation_and_the_server_cuts_to_it() {
    let prefixes = tempfile::tempdir().unwrap();
    let server = Server::start_tiny(prefixes.path(), &[]); // --max-length 128
    let out = tempfile::tempdir().unwrap();
    let (config, weights) = adapter(out.path());
    let upload = |task: &str, extra: &[(&str, Option<&str>, &[u8])]| {
        let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![
            ("adapter_config.json", Some("adapter_config.json"), &config),
            (
                "adapter_model.safetensors",
                Some("adapter_model.safetensors"),
                &weights,
            ),
        ];
        parts.extend_from_slice(extra);
        let (ct, body) = multipart(&parts);
        server.put(&format!("/v1/admin/tasks/{task}"), &ct, &body, None)
    };
    let r = upload("short", &[("max_length", None, b"6")]);
    assert_eq!(
        (r.status, &r.body["max_length"]),
        (200, &json!(6)),
        "{}",
        r.text
    );
    let r = upload("long", &[]);
    // Without its own: the server's --max-length, within the model's 96 positions less P = 5.
    assert_eq!(
        (r.status, &r.body["max_length"]),
        (200, &json!(91)),
        "{}",
        r.text
    );
    assert_eq!(server.get("/v1/tasks/short").body["max_length"], 6);

    let logits = |task: &str, text: &str| {
        let r = server.classify(&json!({"task": task, "inputs": [text]}));
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["results"][0]["logits"].clone()
    };
    // Four letters are six tokens with [CLS] and [SEP]: the same under both tasks …
    assert_eq!(logits("short", "a b c d"), logits("long", "a b c d"));
    // … and a longer text is cut to those four under "short" only.
    let long = "a b c d e f g h i j k l m n o p";
    assert_eq!(logits("short", long), logits("short", "a b c d"));
    assert_ne!(logits("long", long), logits("long", "a b c d"));

    for bad in [&b"1"[..], b"abc", b"-3", b""] {
        let r = upload("bad", &[("max_length", None, bad)]);
        assert_eq!(
            (r.status, r.body["error_type"].as_str()),
            (400, Some("invalid_request")),
            "{}",
            r.text
        );
        assert!(
            r.body["error"].as_str().unwrap().contains("max_length"),
            "{}",
            r.text
        );
    }
    assert_eq!(server.get("/v1/tasks/bad").status, 404);
}

#[test]
fn truncation_survives_export_and_reimport() {
    let info = tiny::model_info();
    let out = tempfile::tempdir().unwrap();
    let _ = adapter(out.path());
    let plain = peft::import_dir(out.path(), &Default::default(), &info).unwrap();
    assert_eq!(plain.meta.max_length, None);
    let opts = ImportOptions {
        max_length: Some(16),
        ..Default::default()
    };
    let file = peft::import_dir(out.path(), &opts, &info).unwrap();
    assert_eq!(file.meta.max_length, Some(16));

    let again = tempfile::tempdir().unwrap();
    let _ = peft::export_dir(&file, again.path()).unwrap();
    let back = peft::import_dir(again.path(), &Default::default(), &info).unwrap();
    assert_eq!(
        back.meta.max_length,
        Some(16),
        "the prefixd.json sidecar carries it"
    );
    let over = ImportOptions {
        max_length: Some(32),
        ..Default::default()
    };
    assert_eq!(
        peft::import_dir(again.path(), &over, &info)
            .unwrap()
            .meta
            .max_length,
        Some(32)
    );
}

#[test]
fn import_peft_max_length_is_recorded_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = tmp.path().join("adapter");
    let _ = adapter(&adapter_dir);
    let model = tiny::model_dir();
    let import = |extra: &[&str]| {
        let native = tmp.path().join("t.safetensors");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefixd"))
            .args([
                "import-peft",
                adapter_dir.to_str().unwrap(),
                "--device",
                "cpu",
                "--model",
            ])
            .arg(&model)
            .arg("-o")
            .arg(&native)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        prefixd::prefix::PrefixFile::read(&native)
            .unwrap()
            .meta
            .max_length
    };
    assert_eq!(import(&["--max-length", "24"]), Some(24));
    assert_eq!(import(&[]), None);
}
