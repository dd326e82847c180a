//! Prefix tuning in Rust: learn a task's prefix and head on the frozen model with candle's
//! autograd, and write a native prefix file the server loads.
//!
//! The recipe is PEFT's: trainable prefix (optionally through the reparameterization MLP) and
//! classifier head; BERT's dropout; AdamW with a linear schedule and optional warmup; gradient
//! clipping; an evaluation after every epoch, keeping the best. Everything random draws from
//! generators seeded by `seed`, so the same seed and data give the same file.

mod config;
pub mod data;
mod diagnostics;
pub mod evaluate;
mod params;
pub mod plots;
mod trainer;

use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use std::time::Instant;

use crate::engine::{Encoded, Engine, Task};
use crate::prefix::{PrefixFile, Source};
pub use config::{lr_at, EpochReport, StepLog, TrainConfig, TrainReport};
use data::Dataset;
pub use diagnostics::{bench_steps, gradient_norms, GradientNorms};
use evaluate::evaluate;
use params::Params;
use trainer::Trainer;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Prefix(#[from] crate::prefix::PrefixError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// What a training run tells whoever watches it (the CLI draws a progress bar; tests and
/// libraries can stay silent with [`Quiet`]).
pub trait TrainObserver {
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _steps: usize) {}
    /// After each optimizer step: the epoch's mean loss so far and its examples per second.
    fn step_done(&mut self, _mean_loss: f64, _examples_per_s: f64) {}
    fn epoch_done(&mut self, _report: &EpochReport) {}
}

/// Watches nothing.
pub struct Quiet;

impl TrainObserver for Quiet {}

/// Trains a prefix for `train` (and evaluates on `eval` after each epoch, keeping the best
/// epoch). Returns the prefix file to write and the report.
pub fn train(
    engine: &Engine,
    train: &Dataset,
    eval: Option<&Dataset>,
    cfg: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(PrefixFile, TrainReport)> {
    if cfg.batch_size == 0 || cfg.epochs == 0 || cfg.virtual_tokens == 0 {
        return Err(TrainError::Config(
            "--batch-size, --epochs and --virtual-tokens must be at least 1".into(),
        ));
    }
    let p = cfg.virtual_tokens;
    let info = engine.model_info().clone();
    if p + 2 > info.max_positions {
        return Err(TrainError::Config(format!(
            "{p} virtual tokens leave no room on a model with {} positions",
            info.max_positions
        )));
    }
    let text = engine.text_encoder();
    let encoded: Vec<(Encoded, usize)> = train
        .examples
        .iter()
        .map(|e| Ok((text.encode(&e.input, p)?, e.label)))
        .collect::<std::result::Result<_, crate::engine::EngineError>>()?;

    let mut init_rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(2));
    let device = engine.model().device().clone();
    let params = Params::init(
        &info,
        p,
        cfg.projection,
        train.labels.len(),
        &mut init_rng,
        &device,
    )?;
    let mut trainer = Trainer::new(engine, cfg, train.labels.clone(), params)?;

    let steps_per_epoch = encoded.len().div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let mut shuffle_rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    let mut epochs = Vec::new();
    let mut best: Option<(usize, f64, PrefixFile)> = None;
    let start = Instant::now();
    let mut train_time = 0f64;
    let mut t = 0usize;
    let mut steps = Vec::new();
    let (mut window_loss, mut window_n) = (0f64, 0usize);
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut shuffle_rng);
        observer.epoch_started(epoch, cfg.epochs, steps_per_epoch);
        let epoch_start = Instant::now();
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for chunk in order.chunks(cfg.batch_size) {
            let batch: Vec<(&Encoded, usize)> = chunk
                .iter()
                .map(|&i| (&encoded[i].0, encoded[i].1))
                .collect();
            let lr = lr_at(cfg.lr, t, total, warmup);
            let loss = trainer.step(&batch, lr)?;
            t += 1;
            loss_sum += loss * batch.len() as f64;
            seen += batch.len();
            window_loss += loss * batch.len() as f64;
            window_n += batch.len();
            if cfg.log_every > 0 && (t.is_multiple_of(cfg.log_every) || t == total) {
                let entry = StepLog {
                    step: t,
                    epoch,
                    loss: window_loss / window_n as f64,
                    lr,
                };
                tracing::debug!(step = t, epoch, loss = entry.loss, lr, "training");
                steps.push(entry);
                (window_loss, window_n) = (0.0, 0);
            }
            let rate = seen as f64 / epoch_start.elapsed().as_secs_f64();
            observer.step_done(loss_sum / seen as f64, rate);
        }
        let seconds = epoch_start.elapsed().as_secs_f64();
        train_time += seconds;
        let snapshot = trainer.snapshot(Source {
            kind: "train".into(),
            details: Default::default(),
        })?;
        let eval_report = match eval {
            Some(ds) => {
                let task = Task::from_file(&snapshot, &info, &snapshot.to_bytes()?)?;
                Some(evaluate(engine, &task, &ds.examples, 64)?)
            }
            None => None,
        };
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            seconds,
            examples_per_s: seen as f64 / seconds,
            eval: eval_report,
        };
        let score = report.eval.as_ref().map_or(epoch as f64, |e| e.accuracy);
        observer.epoch_done(&report);
        if best.as_ref().is_none_or(|(_, s, _)| score > *s) {
            best = Some((epoch, score, snapshot));
        }
        epochs.push(report);
    }
    let (best_epoch, _, mut file) = best.expect("at least one epoch ran");
    let report = TrainReport {
        settings: cfg.clone(),
        train_data: train.path.display().to_string(),
        train_examples: encoded.len(),
        eval_data: eval.map(|d| d.path.display().to_string()),
        best_epoch,
        train_seconds: start.elapsed().as_secs_f64(),
        examples_per_s: (encoded.len() * cfg.epochs) as f64 / train_time,
        epochs,
        steps,
    };
    file.meta.source = provenance(&report);
    Ok((file, report))
}

/// What the file records about its training: settings, data, and the best epoch's numbers.
fn provenance(report: &TrainReport) -> Source {
    let best = &report.epochs[report.best_epoch - 1];
    let mut details = serde_json::Map::new();
    details.insert(
        "settings".into(),
        serde_json::to_value(&report.settings).unwrap_or_default(),
    );
    details.insert("train_data".into(), report.train_data.clone().into());
    details.insert("train_examples".into(), report.train_examples.into());
    if let Some(e) = &report.eval_data {
        details.insert("eval_data".into(), e.clone().into());
    }
    details.insert("best_epoch".into(), report.best_epoch.into());
    if let Some(e) = &best.eval {
        details.insert(
            "eval".into(),
            serde_json::json!({"accuracy": e.accuracy, "macro_f1": e.macro_f1, "loss": e.loss, "examples": e.examples}),
        );
    }
    details.insert(
        "prefix_projection".into(),
        report.settings.projection.is_some().into(),
    );
    details.insert("prefixd_version".into(), env!("CARGO_PKG_VERSION").into());
    Source {
        kind: "train".into(),
        details,
    }
}
