//! The native prefix file: one `.safetensors` per task with PEFT's tensor names and prefixd's
//! metadata in the header.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use super::meta::{PrefixMeta, FORMAT_VERSION, META_KEY};
use super::tensors::{self, expect_shape, HostTensor};
use super::{PrefixError, Result};
use crate::model::ModelInfo;

pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
pub const CLASSIFIER_WEIGHT: &str = "base_model.classifier.weight";
pub const CLASSIFIER_BIAS: &str = "base_model.classifier.bias";

/// A prefix file in memory, internally consistent but not yet checked against a model.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixFile {
    pub meta: PrefixMeta,
    /// `[P, L·2·Hd]` in PEFT's layout.
    pub prompt_embeddings: HostTensor,
    /// `[C, Hd]`.
    pub classifier_weight: HostTensor,
    /// `[C]`.
    pub classifier_bias: HostTensor,
}

impl PrefixFile {
    /// Builds a file from its parts and checks that they agree with each other.
    pub fn new(
        meta: PrefixMeta,
        prompt_embeddings: HostTensor,
        classifier_weight: HostTensor,
        classifier_bias: HostTensor,
    ) -> Result<Self> {
        let file = Self {
            meta,
            prompt_embeddings,
            classifier_weight,
            classifier_bias,
        };
        file.check_consistent()?;
        Ok(file)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = tensors::parse(bytes)?;
        let header = tensors::metadata(bytes)?;
        let raw = header.get(META_KEY).ok_or(PrefixError::NoMetadata)?;
        let meta = parse_meta(raw)?;
        Self::new(
            meta,
            tensors::read_f32(&st, PROMPT_EMBEDDINGS)?,
            tensors::read_f32(&st, CLASSIFIER_WEIGHT)?,
            tensors::read_f32(&st, CLASSIFIER_BIAS)?,
        )
    }

    /// The metadata alone, from the safetensors header's JSON (the bytes after its 8-byte length):
    /// what a task is, without reading its tensors.
    pub fn meta_from_header(header_json: &[u8]) -> Result<PrefixMeta> {
        #[derive(serde::Deserialize)]
        struct Header {
            #[serde(rename = "__metadata__", default)]
            metadata: HashMap<String, String>,
        }
        let header: Header = serde_json::from_slice(header_json)
            .map_err(|e| PrefixError::NotSafetensors(format!("header: {e}")))?;
        let raw = header
            .metadata
            .get(META_KEY)
            .ok_or(PrefixError::NoMetadata)?;
        parse_meta(raw)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| PrefixError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta = serde_json::to_string(&self.meta)
            .map_err(|e| PrefixError::BadMetadata(e.to_string()))?;
        // One metadata key only: safetensors writes header metadata in HashMap order, and a file's
        // bytes (its version hash) must not depend on that.
        let header = HashMap::from([(META_KEY.to_string(), meta)]);
        tensors::serialize(
            &[
                (PROMPT_EMBEDDINGS, &self.prompt_embeddings),
                (CLASSIFIER_WEIGHT, &self.classifier_weight),
                (CLASSIFIER_BIAS, &self.classifier_bias),
            ],
            header,
        )
    }

    /// Writes the file atomically: a reader sees the old file or the new one, never half of one.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    pub fn num_labels(&self) -> usize {
        self.classifier_bias.shape.first().copied().unwrap_or(0)
    }

    /// The checks that need no model: shapes agree with the metadata and with each other.
    fn check_consistent(&self) -> Result<()> {
        let m = &self.meta;
        let base = &m.base_model;
        let p = m.num_virtual_tokens;
        if p == 0 {
            return Err(PrefixError::BadMetadata("num_virtual_tokens is 0".into()));
        }
        // [CLS] and [SEP] alone take two tokens: a smaller limit would refuse every input.
        if let Some(n) = m.max_length.filter(|&n| n < 2) {
            return Err(PrefixError::BadMetadata(format!(
                "max_length is {n}: every input needs at least 2 tokens ([CLS] and [SEP])"
            )));
        }
        let width = base.layers * 2 * base.hidden;
        expect_shape(
            PROMPT_EMBEDDINGS,
            &self.prompt_embeddings,
            &[p, width],
            &format!(
                "P = {p} virtual tokens × {} layers · 2 · hidden {}, as the metadata says",
                base.layers, base.hidden
            ),
        )?;
        let rows = self.classifier_weight.shape.first().copied().unwrap_or(0);
        expect_shape(
            CLASSIFIER_WEIGHT,
            &self.classifier_weight,
            &[rows, base.hidden],
            &format!("labels × hidden {}", base.hidden),
        )?;
        expect_shape(
            CLASSIFIER_BIAS,
            &self.classifier_bias,
            &[rows],
            "one per classifier row",
        )?;
        if rows != m.labels.len() {
            return Err(PrefixError::LabelCount {
                rows,
                labels: m.labels.len(),
            });
        }
        check_labels(&m.labels)?;
        if base.heads == 0 || !base.hidden.is_multiple_of(base.heads) {
            return Err(PrefixError::BadMetadata(format!(
                "hidden {} is not divisible by {} heads",
                base.hidden, base.heads
            )));
        }
        Ok(())
    }
}

pub(crate) fn check_labels(labels: &[String]) -> Result<()> {
    if labels.is_empty() {
        return Err(PrefixError::BadLabels(
            "at least one label is needed".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for l in labels {
        if l.trim().is_empty() {
            return Err(PrefixError::BadLabels("a label name is empty".into()));
        }
        if !seen.insert(l) {
            return Err(PrefixError::BadLabels(format!("label {l:?} appears twice")));
        }
    }
    Ok(())
}

/// Temp file in the same directory, fsync, rename, fsync the directory: the standard recipe for a
/// file that is either wholly old or wholly new after a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| PrefixError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Checks a prefix file against the loaded model: dimensions, room for input after P positions,
/// and (when recorded) the base weights' fingerprint.
pub fn check_against_model(file: &PrefixFile, model: &ModelInfo) -> Result<()> {
    check_meta_against_model(&file.meta, model)
}

/// The model checks that need only the metadata (shape, positions, fingerprint).
pub fn check_meta_against_model(meta: &PrefixMeta, model: &ModelInfo) -> Result<()> {
    let base = &meta.base_model;
    for (what, prefix, model) in [
        ("layers", base.layers, model.layers),
        ("hidden size", base.hidden, model.hidden),
        ("attention heads", base.heads, model.heads),
    ] {
        if prefix != model {
            return Err(PrefixError::ModelMismatch {
                what,
                prefix,
                model,
            });
        }
    }
    let p = meta.num_virtual_tokens;
    if p + 2 > model.max_positions {
        return Err(PrefixError::TooManyVirtualTokens {
            p,
            max: model.max_positions,
        });
    }
    if let Some(fp) = &base.fingerprint {
        if fp != &model.fingerprint {
            return Err(PrefixError::Fingerprint {
                prefix: fp.clone(),
                model: model.fingerprint.clone(),
            });
        }
    }
    Ok(())
}

/// The `prefixd` metadata JSON, its format version checked first so that a newer file says so
/// instead of failing on a renamed field.
fn parse_meta(raw: &str) -> Result<PrefixMeta> {
    let version = serde_json::from_str::<serde_json::Value>(raw)
        .map_err(|e| PrefixError::BadMetadata(e.to_string()))?
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| PrefixError::BadMetadata("no format_version".into()))?;
    if version != FORMAT_VERSION as u64 {
        return Err(PrefixError::UnsupportedVersion {
            found: version as u32,
        });
    }
    serde_json::from_str(raw).map_err(|e| PrefixError::BadMetadata(e.to_string()))
}
