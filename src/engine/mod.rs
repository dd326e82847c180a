//! The engine: the frozen model plus tokenizer, classifying rows of many tasks in one pass.
//!
//! This is the contract the server and the CLI share: a batch of (task, tokens) rows in, one
//! [`Prediction`] per row out. It owns no threads and knows nothing of HTTP; the server runs it on
//! a dedicated model thread.

mod predict;
mod task;
mod tokenize;

pub use predict::{argmax, sigmoid, softmax, Prediction};
pub use task::{Head, Task};
pub use tokenize::{Encoded, TextEncoder, TextInput};

use std::path::{Path, PathBuf};

use crate::model::{DeviceSpec, EncoderRow, ModelError, ModelInfo, Precision, PrefixedBert};
use crate::prefix::PrefixError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// The engine's truncation length when none is given: BERT's position count.
pub const DEFAULT_MAX_LENGTH: usize = 512;

/// How to build an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A Hugging Face BERT directory: `config.json`, `tokenizer.json`, `model.safetensors`.
    pub model_dir: PathBuf,
    /// Inputs are truncated to `min(max_length, max_position_embeddings − P)` tokens.
    pub max_length: usize,
    /// Where the model runs.
    pub device: DeviceSpec,
    /// The encoder's precision (half precision is opt-in).
    pub precision: Precision,
    /// The hub id the base weights are published under, when they are not in
    /// [`crate::model::KNOWN_MODELS`]; recorded in prefixes and PEFT exports.
    pub base_model_id: Option<String>,
}

impl EngineConfig {
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            max_length: DEFAULT_MAX_LENGTH,
            device: DeviceSpec::Cpu,
            precision: Precision::F32,
            base_model_id: None,
        }
    }
}

/// A row to classify: a task and one of its tokenized inputs.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    pub task: &'a Task,
    pub tokens: &'a Encoded,
}

pub struct Engine {
    model: PrefixedBert,
    text: TextEncoder,
}

impl Engine {
    pub fn load(config: &EngineConfig) -> Result<Self> {
        let device = config.device.open()?;
        let mut model =
            PrefixedBert::load_as(&config.model_dir, &device, config.precision.dtype())?;
        model.set_hub_id(config.base_model_id.as_deref());
        let text = TextEncoder::from_file(
            &config.model_dir.join("tokenizer.json"),
            config.max_length,
            model.config().max_position_embeddings,
            model.config().vocab_size,
        )?;
        Ok(Self { model, text })
    }

    pub fn model(&self) -> &PrefixedBert {
        &self.model
    }

    pub fn model_info(&self) -> &ModelInfo {
        self.model.info()
    }

    /// The tokenizer handle; cheap to clone, so callers can tokenize off the model thread.
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }

    /// Loads a task from a native prefix file or a PEFT adapter directory.
    pub fn load_task(&self, path: &Path) -> Result<Task> {
        let info = self.model_info();
        if path.is_dir() {
            let file = crate::prefix::peft::import_dir(path, &Default::default(), info)?;
            let bytes = file.to_bytes()?;
            Ok(Task::from_file(&file, info, &bytes)?)
        } else {
            let bytes = std::fs::read(path).map_err(|source| PrefixError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(Task::from_bytes(&bytes, info)?)
        }
    }

    /// One forward pass over rows of any mix of tasks.
    pub fn classify(&self, rows: &[Row<'_>]) -> Result<Vec<Prediction>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let encoder_rows: Vec<EncoderRow<'_>> = rows
            .iter()
            .map(|r| EncoderRow {
                input_ids: &r.tokens.ids,
                type_ids: &r.tokens.type_ids,
                prefix: &r.task.prefix,
            })
            .collect();
        let pooled = self.model.pooled(&encoder_rows)?;
        Ok(rows
            .iter()
            .zip(pooled)
            .map(|(r, x)| Prediction::from_logits(r.task, r.task.head.logits(&x)))
            .collect())
    }

    /// Tokenizes and classifies many inputs of one task, `batch_size` rows per forward pass.
    /// Inputs are grouped by length so little compute goes to padding; results come back in
    /// input order.
    pub fn classify_texts(
        &self,
        task: &Task,
        inputs: &[TextInput],
        batch_size: usize,
    ) -> Result<Vec<Prediction>> {
        let encoded = inputs
            .iter()
            .map(|i| self.text.encode_for(i, task))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let mut out: Vec<Option<Prediction>> = vec![None; encoded.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<Row<'_>> = chunk
                .iter()
                .map(|&i| Row {
                    task,
                    tokens: &encoded[i],
                })
                .collect();
            for (&i, pred) in chunk.iter().zip(self.classify(&rows)?) {
                out[i] = Some(pred);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}
