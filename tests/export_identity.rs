//! A PEFT export names the weights its prefix was made on — by the hub id known for the
//! weights' fingerprint or given with `--base-model-id`, never by the config's `_name_or_path`
//! (all-MiniLM-L6-v2's says `nreimers/MiniLM-L6-H384-uncased`: other weights) — and says so when
//! it cannot know. Labels travel as `id2label`/`label2id` and in a model card.

mod common;

use common::{engine, fixtures_dir, repo_root, tiny};
use prefixd::engine::{Engine, EngineConfig};
use prefixd::prefix::peft::{self, ExportOptions};
use prefixd::prefix::PrefixFile;
use serde_json::Value;
use std::path::Path;

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn card(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("README.md")).unwrap()
}

#[test]
fn the_default_model_is_known_by_its_weights() {
    let info = engine().model_info();
    assert_eq!(info.hub_id.as_deref(), Some(MINILM));
    // The config's own name is the checkpoint it was derived from: the trap this guards against.
    assert_eq!(info.name, "nreimers/MiniLM-L6-H384-uncased");

    // A shipped prefix, trained before files recorded the id: found by its fingerprint.
    let file = PrefixFile::read(&repo_root().join("prefixes/sst2.safetensors")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let done = peft::export_dir(&file, out.path()).unwrap();
    assert_eq!(done.base_model_id.as_deref(), Some(MINILM));
    assert_eq!(
        json(&out.path().join("adapter_config.json"))["base_model_name_or_path"],
        MINILM
    );
    let sidecar = json(&out.path().join("prefixd.json"));
    assert_eq!(
        sidecar["id2label"],
        serde_json::json!({"0": "negative", "1": "positive"})
    );
    assert_eq!(
        sidecar["label2id"],
        serde_json::json!({"negative": 0, "positive": 1})
    );
    assert_eq!(sidecar["max_length"], file.meta.max_length.unwrap());
    let card = card(out.path());
    assert!(
        card.starts_with(&format!(
            "---\nbase_model: \"{MINILM}\"\nlibrary_name: peft\n"
        )),
        "{card}"
    );
    assert!(
        card.contains(r#"id2label = {0: "negative", 1: "positive"}"#),
        "{card}"
    );
    assert!(card.contains("num_labels=2"), "{card}");
}

#[test]
fn an_adapter_claiming_other_weights_is_exported_with_the_weights_it_ran_on() {
    let adapter = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("multi4-p20");
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(src.join(name), adapter.path().join(name)).unwrap();
    }
    let cfg_path = adapter.path().join("adapter_config.json");
    let mut cfg = json(&cfg_path);
    cfg["base_model_name_or_path"] = "nreimers/MiniLM-L6-H384-uncased".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let file =
        peft::import_dir(adapter.path(), &Default::default(), engine().model_info()).unwrap();
    assert_eq!(file.meta.base_model.hub_id.as_deref(), Some(MINILM));
    // The adapter's claim is kept as provenance …
    assert_eq!(
        file.meta.source.details["base_model_name_or_path"],
        "nreimers/MiniLM-L6-H384-uncased"
    );
    // … but the export names the weights the prefix was loaded and checked on.
    let out = tempfile::tempdir().unwrap();
    let _ = peft::export_dir(&file, out.path()).unwrap();
    assert_eq!(
        json(&out.path().join("adapter_config.json"))["base_model_name_or_path"],
        MINILM
    );
}

#[test]
fn unknown_weights_are_said_to_be_unknown_and_can_be_named() {
    let file = tiny::prefix("gamma", 3, 3, 1);
    let out = tempfile::tempdir().unwrap();
    let done = peft::export_dir(&file, out.path()).unwrap();
    assert_eq!(done.base_model_id, None);
    assert_eq!(
        json(&out.path().join("adapter_config.json"))["base_model_name_or_path"],
        Value::Null
    );
    let text = card(out.path());
    assert!(!text.contains("base_model:"), "{text}");
    assert!(text.contains("hub id is unknown"), "{text}");
    assert!(text.contains("num_labels=3"), "{text}");

    let named = ExportOptions {
        base_model_id: Some("acme/tiny-bert".into()),
    };
    let done = peft::export_dir_with(&file, out.path(), &named).unwrap();
    assert_eq!(done.base_model_id.as_deref(), Some("acme/tiny-bert"));
    assert_eq!(
        json(&out.path().join("adapter_config.json"))["base_model_name_or_path"],
        "acme/tiny-bert"
    );
    assert!(card(out.path()).contains("base_model: \"acme/tiny-bert\""));
}

#[test]
fn base_model_id_is_recorded_in_prefixes_made_on_the_model() {
    let engine = Engine::load(&EngineConfig {
        base_model_id: Some("acme/tiny-bert".into()),
        ..EngineConfig::new(tiny::model_dir())
    })
    .unwrap();
    assert_eq!(
        engine.model_info().hub_id.as_deref(),
        Some("acme/tiny-bert")
    );
    // Export a tiny prefix with no id, import it onto the named model: the file records the id.
    let adapter = tempfile::tempdir().unwrap();
    let _ = peft::export_dir(&tiny::prefix("gamma", 3, 2, 1), adapter.path()).unwrap();
    let file = peft::import_dir(adapter.path(), &Default::default(), engine.model_info()).unwrap();
    assert_eq!(
        file.meta.base_model.hub_id.as_deref(),
        Some("acme/tiny-bert")
    );
    let reread = PrefixFile::from_bytes(&file.to_bytes().unwrap()).unwrap();
    assert_eq!(
        reread.meta.base_model.hub_id.as_deref(),
        Some("acme/tiny-bert")
    );
    let out = tempfile::tempdir().unwrap();
    let done = peft::export_dir(&reread, out.path()).unwrap();
    assert_eq!(done.base_model_id.as_deref(), Some("acme/tiny-bert"));
}

#[test]
fn the_cli_warns_when_it_cannot_name_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let native = tmp.path().join("gamma.safetensors");
    tiny::prefix("gamma", 3, 2, 1).write(&native).unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefixd"))
            .args(["export-peft", native.to_str().unwrap(), "-o"])
            .arg(tmp.path().join("out"))
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&[]).contains("hub id is unknown"));
    assert!(!run(&["--base-model-id", "acme/tiny-bert"]).contains("unknown"));
}
