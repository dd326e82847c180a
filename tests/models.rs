//! Other BERT checkpoints load too: `bert.`-prefixed keys, F16/BF16 weights; a checkpoint without
//! a pooler is refused with a clear message.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{cases, fixtures_dir, max_abs_diff, model_dir};
use prefixd::engine::{Engine, EngineConfig, TextInput};
use std::collections::HashMap;
use std::path::Path;

/// Writes a copy of the default model with its tensors renamed/converted by `f`.
fn variant(dest: &Path, f: impl Fn(&str, Tensor) -> Option<(String, Tensor)>) {
    std::fs::create_dir_all(dest).unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(model_dir().join(name), dest.join(name)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let out: HashMap<String, Tensor> = tensors.into_iter().filter_map(|(k, t)| f(&k, t)).collect();
    candle_core::safetensors::save(&out, dest.join("model.safetensors")).unwrap();
}

fn logits(dir: &Path) -> Vec<Vec<f32>> {
    let engine = Engine::load(&EngineConfig {
        model_dir: dir.to_path_buf(),
        max_length: 128,
        ..EngineConfig::new("")
    })
    .unwrap();
    let task = engine
        .load_task(&fixtures_dir().join("sst2-like-p8"))
        .unwrap();
    let inputs: Vec<TextInput> = cases("sst2-like-p8").iter().map(|c| c.input()).collect();
    engine
        .classify_texts(&task, &inputs, 8)
        .unwrap()
        .into_iter()
        .map(|p| p.logits)
        .collect()
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

#[test]
fn bert_prefixed_and_half_precision_checkpoints_load() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = logits(&model_dir());

    let prefixed = tmp.path().join("bert-prefixed");
    variant(&prefixed, |k, t| Some((format!("bert.{k}"), t)));
    assert_eq!(
        worst(&logits(&prefixed), &reference),
        0.0,
        "same weights, other key names"
    );

    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
        let dir = tmp.path().join(format!("{dtype:?}"));
        variant(&dir, |k, t| {
            let t = if t.dtype() == DType::F32 {
                t.to_dtype(dtype).unwrap()
            } else {
                t
            };
            Some((k.to_string(), t))
        });
        let err = worst(&logits(&dir), &reference);
        assert!(err < tol, "{dtype:?} weights: max |Δlogit| {err} ≥ {tol}");
    }
}

#[test]
fn checkpoint_without_pooler_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("no-pooler");
    variant(&dir, |k, t| {
        (!k.starts_with("pooler.")).then(|| (k.to_string(), t))
    });
    let err = Engine::load(&EngineConfig::new(&dir))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("no pooler weights"), "{err}");
}

#[test]
fn missing_model_directory_says_how_to_get_one() {
    let err = Engine::load(&EngineConfig::new("/nonexistent/model"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fetch-model"), "{err}");
}
