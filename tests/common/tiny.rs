//! A tiny random BERT made by the tests: a real checkpoint directory (config.json,
//! model.safetensors with a pooler, a WordPiece tokenizer.json) that loads through the same code
//! as the default model, in milliseconds. Serving, registry and format tests use it, so they run
//! without `../shared` or the 87 MB model; parity tests keep the real one.

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const HIDDEN: usize = 32;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const MAX_POSITIONS: usize = 96;

/// Words the tokenizer knows whole; anything else splits into letters.
const WORDS: &[&str] = &[
    "the", "a", "film", "movie", "good", "bad", "great", "awful", "witty", "dull", "and", "is",
    "was", "not", "very", "what", "who", "where", "when", "free", "win", "call", "now", "hello",
    "world", "man", "guitar", "music", "plays", "playing",
];

/// The tokenizer's vocabulary: specials, whole words, letters, digits and punctuation, each also
/// as a `##` continuation.
fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(WORDS.iter().map(|w| w.to_string()));
    let chars: Vec<char> = ('a'..='z')
        .chain('0'..='9')
        .chain(".,!?'-".chars())
        .collect();
    for c in &chars {
        v.push(c.to_string());
    }
    for c in &chars {
        v.push(format!("##{c}"));
    }
    v
}

/// Adds one random tensor: name, shape, spread, mean.
type Put<'a> = dyn FnMut(String, &[usize], f32, f32) + 'a;

/// Writes a tiny BERT into `dir`. `vocab_size` below the tokenizer's makes a model whose
/// tokenizer is not its own (for the "ids past the vocabulary" checks); `None` matches it.
pub fn write_model(dir: &Path, vocab_size: Option<usize>, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let words = vocab();
    let v = vocab_size.unwrap_or(words.len());
    let inter = 2 * HIDDEN;
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": v,
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": inter, "hidden_act": "gelu", "max_position_embeddings": MAX_POSITIONS,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "_name_or_path": "prefixd-tests/tiny-bert",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| mean + std * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    let h = HIDDEN;
    put(
        "embeddings.word_embeddings.weight".into(),
        &[v, h],
        0.5,
        0.0,
    );
    put(
        "embeddings.position_embeddings.weight".into(),
        &[MAX_POSITIONS, h],
        0.5,
        0.0,
    );
    put(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, h],
        0.5,
        0.0,
    );
    let ln = |put: &mut Put<'_>, p: &str| {
        put(format!("{p}.weight"), &[h], 0.1, 1.0);
        put(format!("{p}.bias"), &[h], 0.1, 0.0);
    };
    ln(&mut put, "embeddings.LayerNorm");
    for l in 0..LAYERS {
        let p = format!("encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            put(format!("{p}.attention.self.{m}.weight"), &[h, h], 0.3, 0.0);
            put(format!("{p}.attention.self.{m}.bias"), &[h], 0.1, 0.0);
        }
        put(
            format!("{p}.attention.output.dense.weight"),
            &[h, h],
            0.3,
            0.0,
        );
        put(format!("{p}.attention.output.dense.bias"), &[h], 0.1, 0.0);
        ln(&mut put, &format!("{p}.attention.output.LayerNorm"));
        put(
            format!("{p}.intermediate.dense.weight"),
            &[inter, h],
            0.3,
            0.0,
        );
        put(format!("{p}.intermediate.dense.bias"), &[inter], 0.1, 0.0);
        put(format!("{p}.output.dense.weight"), &[h, inter], 0.3, 0.0);
        put(format!("{p}.output.dense.bias"), &[h], 0.1, 0.0);
        ln(&mut put, &format!("{p}.output.LayerNorm"));
    }
    put("pooler.dense.weight".into(), &[h, h], 0.3, 0.0);
    put("pooler.dense.bias".into(), &[h], 0.1, 0.0);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();

    write_tokenizer(&dir.join("tokenizer.json"), &words);
}

/// A BERT WordPiece `tokenizer.json` in the layout Hugging Face writes (the default model's own,
/// with this vocabulary; padding and truncation off, as prefixd sets them anyway).
fn write_tokenizer(path: &Path, words: &[String]) {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i.into()))
        .collect();
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "special": true, "content": content, "single_word": false,
                           "lstrip": false, "rstrip": false, "normalized": false})
    };
    let seq =
        |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    let tok = |id: &str, type_id: u32| serde_json::json!({"SpecialToken": {"id": id, "type_id": type_id}});
    let t = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"),
                         special(3, "[SEP]"), special(4, "[MASK]")],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [tok("[CLS]", 0), seq("A", 0), tok("[SEP]", 0)],
            "pair": [tok("[CLS]", 0), seq("A", 0), tok("[SEP]", 0), seq("B", 1), tok("[SEP]", 1)],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab},
    });
    std::fs::write(path, serde_json::to_vec_pretty(&t).unwrap()).unwrap();
}

/// The tiny model every test binary shares (written once per process).
pub fn model_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        write_model(d.path(), None, 7);
        d
    })
    .path()
    .to_path_buf()
}

/// The tiny model's identity, for making prefixes that fit it.
pub fn model_info() -> prefixd::model::ModelInfo {
    static INFO: OnceLock<prefixd::model::ModelInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        prefixd::model::PrefixedBert::load(&model_dir(), &Device::Cpu)
            .unwrap()
            .info()
            .clone()
    })
    .clone()
}

/// A random prefix file for the tiny model: task `name`, P virtual tokens, `labels` classes.
pub fn prefix(name: &str, p: usize, labels: usize, seed: u64) -> prefixd::prefix::PrefixFile {
    let mut rng = StdRng::seed_from_u64(seed);
    prefixd::prefix::synthetic::random_prefix(&model_info(), name, p, labels, &mut rng).unwrap()
}

/// Writes `prefix(name, …)` as `dir/<name>.safetensors`.
pub fn seed_prefix(dir: &Path, name: &str, p: usize, labels: usize) {
    prefix(name, p, labels, name.len() as u64)
        .write(&dir.join(format!("{name}.safetensors")))
        .unwrap();
}
