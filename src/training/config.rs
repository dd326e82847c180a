//! What a training run is told (settings) and what it reports.

use serde::Serialize;

use super::evaluate::EvalReport;

/// Training settings. The defaults are the ones that learn on MiniLM (see `prefixes/README.md`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub task: String,
    pub virtual_tokens: usize,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub max_length: usize,
    /// Hidden size of the reparameterization MLP; `None` trains the prefix directly.
    pub projection: Option<usize>,
    pub weight_decay: f64,
    /// Fraction of all steps spent warming the learning rate up from 0.
    pub warmup_ratio: f64,
    /// Clip the global gradient norm to this (Hugging Face's Trainer default is 1.0).
    pub max_grad_norm: Option<f64>,
    /// BERT's hidden and attention dropout during training.
    pub dropout: f32,
    pub seed: u64,
    /// Record the training loss and learning rate every this many optimizer steps (0: never).
    /// Not a training setting: left out of the file's provenance.
    #[serde(skip)]
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            task: "task".into(),
            virtual_tokens: 20,
            epochs: 3,
            lr: 1e-2,
            batch_size: 32,
            max_length: 128,
            projection: None,
            weight_decay: 0.01,
            warmup_ratio: 0.06,
            max_grad_norm: Some(1.0),
            dropout: 0.1,
            seed: 42,
            log_every: 20,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    pub seconds: f64,
    pub examples_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub settings: TrainConfig,
    pub train_data: String,
    pub train_examples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<String>,
    pub epochs: Vec<EpochReport>,
    /// 1-based epoch whose parameters were written.
    pub best_epoch: usize,
    pub train_seconds: f64,
    pub examples_per_s: f64,
    /// The training loss every `log_every` steps, with the learning rate then.
    pub steps: Vec<StepLog>,
}

/// The training loss around one optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    /// 1-based optimizer step.
    pub step: usize,
    pub epoch: usize,
    /// Mean loss over the examples of the steps since the previous entry.
    pub loss: f64,
    /// The learning rate of this step.
    pub lr: f64,
}

/// `lr` at optimizer step `t` of `total`: linear warmup from 0, then linear decay to 0 (the
/// schedule of transformers' `get_linear_schedule_with_warmup`).
pub fn lr_at(lr: f64, t: usize, total: usize, warmup: usize) -> f64 {
    if t < warmup {
        lr * t as f64 / warmup as f64
    } else {
        lr * (total.saturating_sub(t)) as f64 / (total - warmup).max(1) as f64
    }
}
