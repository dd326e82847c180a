//! Opening a Hugging Face BERT directory: finding the weights whatever their key prefix and dtype.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{BertConfig, ModelError, Result};

/// What a prefix must match to run on this model, and how the model identifies itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// A short name: the config's `_name_or_path`, else the directory name.
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub max_positions: usize,
    /// `sha256:<hex>` of `model.safetensors`: the same value `sha256sum` prints.
    pub fingerprint: String,
    /// The Hugging Face hub id these exact weights are published under, when known: from
    /// `--base-model-id`, else from [`KNOWN_MODELS`] by fingerprint. Never taken from
    /// `config.json`'s `_name_or_path`, which names the checkpoint a model was *derived* from
    /// (all-MiniLM-L6-v2 says `nreimers/MiniLM-L6-H384-uncased`, different weights).
    pub hub_id: Option<String>,
}

/// Weights whose hub id is known by their fingerprint.
pub const KNOWN_MODELS: &[(&str, &str)] = &[(
    "sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "sentence-transformers/all-MiniLM-L6-v2",
)];

/// The hub id of the weights with this fingerprint, if they are in [`KNOWN_MODELS`].
pub fn known_hub_id(fingerprint: &str) -> Option<&'static str> {
    KNOWN_MODELS
        .iter()
        .find(|(fp, _)| *fp == fingerprint)
        .map(|(_, id)| *id)
}

/// Reads the checkpoint's tensors by their module path, hiding the `bert.` prefix that
/// `BertFor*` checkpoints carry and plain `BertModel` checkpoints do not, and converting
/// F16/BF16/F32 weights to the dtype the encoder computes in.
pub(crate) struct Weights {
    vb: VarBuilder<'static>,
    path: PathBuf,
}

impl Weights {
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.vb
            .get(shape, name)
            .map_err(|source| ModelError::Weight {
                path: self.path.clone(),
                name: name.to_string(),
                source: Box::new(source),
            })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub(crate) struct Checkpoint {
    pub config: BertConfig,
    pub weights: Weights,
    pub info: ModelInfo,
}

pub(crate) fn open(dir: &Path, device: &Device, dtype: DType) -> Result<Checkpoint> {
    let layout = |message: String| ModelError::Layout {
        dir: dir.to_path_buf(),
        message,
    };
    if !dir.is_dir() {
        return Err(layout(
            "directory does not exist (run scripts/fetch-model for the default model)".into(),
        ));
    }
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let path = dir.join("model.safetensors");
    if !path.is_file() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is not supported: convert it to safetensors)"
        } else {
            ""
        };
        return Err(layout(format!("model.safetensors not found{hint}")));
    }
    // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on nobody
    // truncating the checkpoint while the process runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], dtype, device) }
        .map_err(|e| layout(format!("cannot read model.safetensors: {e}")))?;
    let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
        vb.pp("bert")
    } else if vb.contains_tensor("embeddings.word_embeddings.weight") {
        vb
    } else {
        return Err(layout(
            "no BERT embeddings found (expected embeddings.word_embeddings.weight, with or without \
             a bert. prefix)"
                .into(),
        ));
    };
    let weights = Weights {
        vb,
        path: path.clone(),
    };
    for name in ["pooler.dense.weight", "pooler.dense.bias"] {
        if !weights.contains(name) {
            return Err(ModelError::NoPooler {
                path,
                name: name.into(),
            });
        }
    }
    let name = config
        ._name_or_path
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let fingerprint = fingerprint_file(&path)?;
    let info = ModelInfo {
        name,
        layers: config.num_hidden_layers,
        hidden: config.hidden_size,
        heads: config.num_attention_heads,
        max_positions: config.max_position_embeddings,
        fingerprint: fingerprint.clone(),
        hub_id: known_hub_id(&fingerprint).map(str::to_string),
    };
    Ok(Checkpoint {
        config,
        weights,
        info,
    })
}

/// `sha256:<hex>` of a file, streamed.
pub fn fingerprint_file(path: &Path) -> Result<String> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}
