//! Task prefix files: the native format and PEFT import/export.
//!
//! A prefix file is checked twice: on its own (it parses, shapes agree with its metadata, values
//! are finite) when read, and against a loaded model (dimensions, positions, fingerprint) when it
//! becomes an [`crate::engine::Task`]. Every failure names the file's problem in words a user can act on.

mod file;
mod meta;
pub mod peft;
pub mod synthetic;
mod tensors;

pub use file::{check_against_model, check_meta_against_model, write_atomic, PrefixFile};
pub use meta::{
    default_labels, BaseModel, PrefixMeta, ProblemType, Source, FORMAT_VERSION, META_KEY,
};
pub use tensors::HostTensor;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a valid safetensors file: {0}")]
    NotSafetensors(String),
    #[error("not a regular file (a FIFO, device or directory named like a prefix file)")]
    NotRegularFile,
    #[error("the file is {size} bytes; prefix files may be at most {max} (--max-upload-bytes)")]
    FileTooLarge { size: u64, max: u64 },
    #[error(
        "not a prefixd prefix file: its header has no {META_KEY:?} metadata (a PEFT adapter \
             directory can be imported with `prefixd import-peft`)"
    )]
    NoMetadata,
    #[error("malformed prefix metadata: {0}")]
    BadMetadata(String),
    #[error("prefix file format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?} ({why})")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        why: String,
    },
    #[error("tensor {name:?} has dtype {dtype}, expected F32, F16 or BF16")]
    DType { name: String, dtype: String },
    #[error("tensor {name:?} holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("the classifier has {rows} output rows but {labels} label names are given")]
    LabelCount { rows: usize, labels: usize },
    #[error("invalid label names: {0}")]
    BadLabels(String),
    #[error(
        "prefix was made for a model with {what} = {prefix}, but the loaded model has {model}"
    )]
    ModelMismatch {
        what: &'static str,
        prefix: usize,
        model: usize,
    },
    #[error("prefix was made for base model weights {prefix}, but the loaded model's are {model}")]
    Fingerprint { prefix: String, model: String },
    #[error("{p} virtual tokens leave no room for input on a model with {max} positions (need P + 2 ≤ {max})")]
    TooManyVirtualTokens { p: usize, max: usize },
    #[error("invalid PEFT adapter: {0}")]
    Peft(String),
}

pub type Result<T> = std::result::Result<T, PrefixError>;
