//! Shared test helpers: the real model, the PEFT fixtures, and one engine per test binary.
//!
//! Missing assets fail loudly rather than skip: a test suite that silently skips its oracle would
//! pass while proving nothing.
#![allow(dead_code)]

use prefixd::engine::{Engine, EngineConfig, TextInput};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The base model: `PREFIXD_TEST_MODEL`, else `models/all-minilm-l6-v2` (installed by
/// `scripts/fetch-model`).
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("PREFIXD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/all-minilm-l6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "test model missing at {} — run scripts/fetch-model (or set PREFIXD_TEST_MODEL)",
        dir.display()
    );
    dir
}

/// The PEFT golden fixtures: `PREFIXD_FIXTURES`, else `../shared/fixtures/peft`.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("PREFIXD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/fixtures/peft"));
    assert!(
        dir.join("sst2-like-p8/adapter_config.json").is_file(),
        "PEFT fixtures missing at {} — they are the parity oracle (set PREFIXD_FIXTURES)",
        dir.display()
    );
    dir
}

pub const CASES: [&str; 3] = ["sst2-like-p8", "multi4-p20", "proj-p10"];

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub text: String,
    #[serde(default)]
    pub text_pair: Option<String>,
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub label: usize,
    #[serde(default)]
    pub label_name: Option<String>,
}

impl Case {
    pub fn label_name(&self) -> &str {
        self.label_name.as_deref().expect("case has label names")
    }

    pub fn input(&self) -> TextInput {
        TextInput {
            text: self.text.clone(),
            text_pair: self.text_pair.clone(),
        }
    }
}

pub fn cases(name: &str) -> Vec<Case> {
    let path = fixtures_dir().join(name).join("cases.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("fixture line parses"))
        .collect()
}

/// The fixtures were tokenized with truncation at 128.
pub fn engine_config() -> EngineConfig {
    EngineConfig {
        model_dir: model_dir(),
        max_length: 128,
        ..EngineConfig::new("")
    }
}

pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&engine_config()).expect("engine loads"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(xs: &[f32]) -> usize {
    prefixd::engine::argmax(xs)
}

pub mod s3;
pub mod server;
pub mod tiny;
