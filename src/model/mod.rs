//! The frozen base model: a BERT encoder whose attention accepts per-row prefix keys/values.
//!
//! Pure compute: no tokio, no HTTP, no file formats beyond the checkpoint itself. The engine feeds
//! it rows of token ids, each carrying its own task's [`PrefixKv`], and reads back pooled vectors.

mod batch;
mod bert;
mod config;
#[macro_use]
mod cpu;
mod cpu_train;
pub mod device;
mod fused;
pub mod gemm;
pub mod isa;
mod kernels;
mod pool;
mod prefix_kv;
mod train_ops;
mod weights;

pub use batch::EncoderRow;
pub use bert::PrefixedBert;
pub use config::{Activation, BertConfig};
pub use cpu::measure_attention;
pub use device::{device_name, DeviceSpec, Precision};
pub use prefix_kv::PrefixKv;
pub use train_ops::Dropout;
pub use weights::{fingerprint_file, known_hub_id, ModelInfo, KNOWN_MODELS};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{dir}: not a usable model directory: {message}")]
    Layout { dir: PathBuf, message: String },
    #[error("{path}: missing or malformed weight {name:?}: {source}")]
    Weight {
        path: PathBuf,
        name: String,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error(
        "{path}: this checkpoint has no pooler weights ({name}); PEFT classifier heads read \
             the pooled [CLS] vector, so a base model without a pooler cannot serve them"
    )]
    NoPooler { path: PathBuf, name: String },
    #[error("{0}")]
    Device(String),
    #[error("invalid batch: {0}")]
    Batch(String),
    /// (Boxed, as in `Weight`: a candle error is ~128 bytes, and every `Result` of the model and
    /// the engine would carry that much.)
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
