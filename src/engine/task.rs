//! A task ready to run: a prefix file checked against the loaded model, laid out for attention.

use sha2::{Digest, Sha256};

use crate::model::{ModelInfo, PrefixKv};
use crate::prefix::{
    check_against_model, HostTensor, PrefixError, PrefixFile, PrefixMeta, ProblemType,
};

type Result<T> = std::result::Result<T, PrefixError>;

/// The task's classifier head, applied to the pooled vector on the host: a few thousand
/// multiply-adds per row, not worth a device round trip.
#[derive(Debug, Clone)]
pub struct Head {
    /// `[C, Hd]` row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    hidden: usize,
}

impl Head {
    pub fn num_labels(&self) -> usize {
        self.bias.len()
    }

    /// `logits = W · pooled + b`.
    pub fn logits(&self, pooled: &[f32]) -> Vec<f32> {
        debug_assert_eq!(pooled.len(), self.hidden);
        self.weight
            .chunks_exact(self.hidden)
            .zip(&self.bias)
            .map(|(row, b)| row.iter().zip(pooled).map(|(w, x)| w * x).sum::<f32>() + b)
            .collect()
    }
}

/// A loaded, validated task. Immutable: replacing a task builds a new `Task`, and rows already
/// queued keep the `Arc<Task>` they were admitted with.
#[derive(Debug, Clone)]
pub struct Task {
    pub meta: PrefixMeta,
    pub prefix: PrefixKv,
    pub head: Head,
    /// `sha256:<hex>` of the file's bytes: the task's version.
    pub version: String,
    /// Size of the native file in bytes.
    pub size_bytes: usize,
}

impl Task {
    /// Parses and validates native prefix-file bytes against the model.
    pub fn from_bytes(bytes: &[u8], model: &ModelInfo) -> Result<Self> {
        let file = PrefixFile::from_bytes(bytes)?;
        Self::from_file(&file, model, bytes)
    }

    /// Validates a prefix file against the model. `bytes` are the file's serialized form (its
    /// hash is the task version).
    pub fn from_file(file: &PrefixFile, model: &ModelInfo, bytes: &[u8]) -> Result<Self> {
        Self::with_version(file, model, Self::version_of(bytes), bytes.len())
    }

    /// [`Task::from_file`] when the caller already hashed the bytes (`version_of`).
    pub fn with_version(
        file: &PrefixFile,
        model: &ModelInfo,
        version: String,
        size_bytes: usize,
    ) -> Result<Self> {
        check_against_model(file, model)?;
        let meta = file.meta.clone();
        let base = &meta.base_model;
        let prefix = PrefixKv::from_peft_layout(
            &file.prompt_embeddings.data,
            meta.num_virtual_tokens,
            base.layers,
            base.heads,
            base.hidden / base.heads,
        );
        let head = Head {
            weight: file.classifier_weight.data.clone(),
            bias: file.classifier_bias.data.clone(),
            hidden: base.hidden,
        };
        Ok(Self {
            meta,
            prefix,
            head,
            version,
            size_bytes,
        })
    }

    /// Memory the task holds: its prefix keys and values and its head, as f32.
    pub fn resident_bytes(&self) -> usize {
        let base = &self.meta.base_model;
        let prefix = self.meta.num_virtual_tokens * base.layers * 2 * base.hidden;
        (prefix + self.head.weight.len() + self.head.bias.len()) * 4
    }

    /// The version string of a file's bytes: `sha256:<hex>`.
    pub fn version_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    pub fn name(&self) -> &str {
        &self.meta.task
    }

    pub fn labels(&self) -> &[String] {
        &self.meta.labels
    }

    pub fn problem_type(&self) -> ProblemType {
        self.meta.problem_type
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.meta.num_virtual_tokens
    }

    /// Back to the file form (for export): the inverse of the load-time layout.
    pub fn to_file(&self) -> Result<PrefixFile> {
        let p = self.meta.num_virtual_tokens;
        let hd = self.meta.base_model.hidden;
        let width = self.meta.base_model.layers * 2 * hd;
        PrefixFile::new(
            self.meta.clone(),
            HostTensor {
                shape: vec![p, width],
                data: self.prefix.to_peft_layout(),
            },
            HostTensor {
                shape: vec![self.head.num_labels(), hd],
                data: self.head.weight.clone(),
            },
            HostTensor {
                shape: vec![self.head.num_labels()],
                data: self.head.bias.clone(),
            },
        )
    }
}
