//! prefixd: serve, train and convert prefix-tuned BERT text classifiers.
//!
//! Layers, each depending only on those below it:
//! - [`model`]: the frozen BERT with prefix-aware attention (pure compute);
//! - [`prefix`]: task prefix files, PEFT import/export, validated [`prefix::Task`]s;
//! - [`engine`]: model + tokenizer; rows of (task, tokens) in, predictions out;
//! - [`training`]: prefix tuning with candle's autograd, evaluation;
//! - [`serving`]: the HTTP server (handlers, batcher, metrics) over the engine;
//! - [`cli`]: the `prefixd` subcommands.

pub mod cli;
pub mod engine;
pub mod model;
pub mod prefix;
pub mod serving;
pub mod training;
