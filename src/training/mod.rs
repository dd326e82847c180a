//! Prefix tuning in Rust: learn a task's prefix and head on the frozen model with candle's
//! autograd, and write a native prefix file the server loads.
//!
//! The recipe is PEFT's: trainable prefix (optionally through the reparameterization MLP) and
//! classifier head; BERT's dropout; AdamW with a linear schedule and optional warmup; gradient
//! clipping; an evaluation after every epoch, keeping the best. Everything random draws from
//! generators seeded by `seed`, so the same seed and data give the same file.

pub mod data;
pub mod evaluate;
mod params;

use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

use crate::engine::{Encoded, Engine};
use crate::model::Dropout;
use crate::prefix::{BaseModel, PrefixFile, PrefixMeta, ProblemType, Source, Task, FORMAT_VERSION};
use data::Dataset;
use evaluate::{evaluate, EvalReport};
use params::Params;

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

/// Mean cross-entropy of one batch through the training forward: prefix, frozen encoder with
/// dropout, dropout on the pooled vector (as `BertForSequenceClassification` does), head.
fn batch_loss(
    engine: &Engine,
    params: &Params,
    dropout: &mut Dropout,
    batch: &[(&Encoded, usize)],
) -> Result<candle_core::Tensor> {
    let rows: Vec<(&[u32], &[u32])> = batch
        .iter()
        .map(|(e, _)| (e.ids.as_slice(), e.type_ids.as_slice()))
        .collect();
    let targets: Vec<u32> = batch.iter().map(|(_, y)| *y as u32).collect();
    let targets = candle_core::Tensor::from_vec(targets, batch.len(), engine.model().device())?;
    let pooled = engine
        .model()
        .pooled_train(&rows, &params.prompt_embeddings()?, dropout)?;
    let logits = params.head(&dropout.apply(&pooled)?)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

struct Trainer<'a> {
    engine: &'a Engine,
    cfg: &'a TrainConfig,
    labels: Vec<String>,
    params: Params,
    decayed: AdamW,
    not_decayed: AdamW,
    dropout: Dropout,
}

impl<'a> Trainer<'a> {
    fn new(
        engine: &'a Engine,
        cfg: &'a TrainConfig,
        labels: Vec<String>,
        params: Params,
    ) -> Result<Self> {
        let adam = |wd: f64| ParamsAdamW {
            lr: cfg.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd,
        };
        // Dropout masks on a GPU come from the device's own generator: seed it too, so a run
        // repeats there as it does on the CPU.
        let device = engine.model().device();
        if !device.is_cpu() {
            device.set_seed(cfg.seed.wrapping_add(3))?;
        }
        Ok(Self {
            engine,
            cfg,
            labels,
            decayed: AdamW::new(params.decayed(), adam(cfg.weight_decay))?,
            not_decayed: AdamW::new(params.not_decayed(), adam(0.0))?,
            params,
            dropout: Dropout::new(cfg.dropout, cfg.seed.wrapping_add(1)),
        })
    }

    /// The current parameters as a native prefix file.
    fn snapshot(&self, source: Source) -> Result<PrefixFile> {
        let info = self.engine.model_info();
        let (prompt, weight, bias) = self.params.export()?;
        Ok(PrefixFile::new(
            PrefixMeta {
                format_version: FORMAT_VERSION,
                task: self.cfg.task.clone(),
                labels: self.labels.clone(),
                problem_type: ProblemType::SingleLabel,
                num_virtual_tokens: self.cfg.virtual_tokens,
                base_model: BaseModel::of(info),
                source,
                max_length: Some(self.cfg.max_length),
            },
            prompt,
            weight,
            bias,
        )?)
    }

    /// One optimizer step on a batch; returns the batch's mean loss.
    fn step(&mut self, batch: &[(&Encoded, usize)], lr: f64) -> Result<f64> {
        let loss = batch_loss(self.engine, &self.params, &mut self.dropout, batch)?;
        let mut grads = loss.backward()?;
        if let Some(max) = self.cfg.max_grad_norm {
            let mut sq = 0f64;
            for v in self.params.all() {
                if let Some(g) = grads.get(v.as_tensor()) {
                    sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
            let norm = sq.sqrt();
            if norm > max {
                let scale = max / (norm + 1e-6);
                for v in self.params.all() {
                    if let Some(g) = grads.remove(v.as_tensor()) {
                        grads.insert(v.as_tensor(), (g * scale)?);
                    }
                }
            }
        }
        self.decayed.set_learning_rate(lr);
        self.not_decayed.set_learning_rate(lr);
        self.decayed.step(&grads)?;
        self.not_decayed.step(&grads)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }
}

/// Trains a prefix for `train` (and evaluates on `eval` after each epoch, keeping the best
/// epoch). Returns the prefix file to write and the report.
pub fn train(
    engine: &Engine,
    train: &Dataset,
    eval: Option<&Dataset>,
    cfg: &TrainConfig,
    progress: bool,
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
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut shuffle_rng);
        let bar = if progress {
            ProgressBar::new(steps_per_epoch as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{}", cfg.epochs));
        let epoch_start = Instant::now();
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for chunk in order.chunks(cfg.batch_size) {
            let batch: Vec<(&Encoded, usize)> = chunk
                .iter()
                .map(|&i| (&encoded[i].0, encoded[i].1))
                .collect();
            let loss = trainer.step(&batch, lr_at(cfg.lr, t, total, warmup))?;
            t += 1;
            loss_sum += loss * batch.len() as f64;
            seen += batch.len();
            let rate = seen as f64 / epoch_start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4}  {rate:.1} ex/s",
                loss_sum / seen as f64
            ));
            bar.inc(1);
        }
        bar.finish_and_clear();
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
        if progress {
            let eval_text = report.eval.as_ref().map_or(String::new(), |e| {
                format!(
                    "  eval accuracy {:.4}  macro-F1 {:.4}  loss {:.4}",
                    e.accuracy, e.macro_f1, e.loss
                )
            });
            eprintln!(
                "epoch {epoch}: train loss {:.4}  {:.1} ex/s  {:.1} s{eval_text}",
                report.train_loss, report.examples_per_s, report.seconds
            );
        }
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

/// Gradient norms of one training batch, per prefix block and for the head: the check that the
/// graph reaches every layer's prefix keys and values (an op without a backward on the way would
/// leave a block at exactly zero).
#[derive(Debug, Clone, Serialize)]
pub struct GradientNorms {
    /// `[layer][0 = keys, 1 = values]`.
    pub prefix: Vec<[f64; 2]>,
    pub head_weight: f64,
    pub head_bias: f64,
}

pub fn gradient_norms(
    engine: &Engine,
    train: &Dataset,
    cfg: &TrainConfig,
) -> Result<GradientNorms> {
    let info = engine.model_info().clone();
    let device = engine.model().device().clone();
    let p = cfg.virtual_tokens;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let params = Params::init(&info, p, None, train.labels.len(), &mut rng, &device)?;
    let batch: Vec<(Encoded, usize)> = train
        .examples
        .iter()
        .take(cfg.batch_size)
        .map(|e| Ok((engine.text_encoder().encode(&e.input, p)?, e.label)))
        .collect::<std::result::Result<_, crate::engine::EngineError>>()?;
    let refs: Vec<(&Encoded, usize)> = batch.iter().map(|(e, y)| (e, *y)).collect();
    let loss = batch_loss(engine, &params, &mut Dropout::new(0.0, 0), &refs)?;
    let grads = loss.backward()?;
    let norm = |t: Option<&candle_core::Tensor>| -> Result<f64> {
        Ok(match t {
            Some(g) => (g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt(),
            None => 0.0,
        })
    };
    let params::PrefixParams::Direct { embedding } = &params.prefix else {
        unreachable!("initialised without projection")
    };
    let g = grads.get(embedding.as_tensor());
    let hd = info.hidden;
    let mut prefix = Vec::with_capacity(info.layers);
    for l in 0..info.layers {
        let block = |kv: usize| -> Result<f64> {
            norm(
                g.map(|g| g.narrow(1, (2 * l + kv) * hd, hd))
                    .transpose()?
                    .as_ref(),
            )
        };
        prefix.push([block(0)?, block(1)?]);
    }
    Ok(GradientNorms {
        prefix,
        head_weight: norm(grads.get(params.head_weight.as_tensor()))?,
        head_bias: norm(grads.get(params.head_bias.as_tensor()))?,
    })
}

/// Training throughput on synthetic rows (`prefixd bench --train`): `batch` rows of `seq_len`
/// random token ids, one optimizer step per call, as in a real run (dropout, clipping, AdamW).
/// Returns the median seconds per step over `steps` timed steps after 2 warm-up steps.
pub fn bench_steps(
    engine: &Engine,
    batch: usize,
    seq_len: usize,
    cfg: &TrainConfig,
    steps: usize,
) -> Result<f64> {
    use rand::Rng;
    let info = engine.model_info().clone();
    let device = engine.model().device().clone();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let params = Params::init(
        &info,
        cfg.virtual_tokens,
        cfg.projection,
        2,
        &mut rng,
        &device,
    )?;
    let mut trainer = Trainer::new(engine, cfg, crate::prefix::default_labels(2), params)?;
    let vocab = engine.model().config().vocab_size as u32;
    let rows: Vec<(Encoded, usize)> = (0..batch)
        .map(|i| {
            let mut ids: Vec<u32> = (0..seq_len)
                .map(|_| rng.random_range(1000..vocab))
                .collect();
            ids[0] = 101;
            ids[seq_len - 1] = 102;
            (
                Encoded {
                    type_ids: vec![0; seq_len],
                    ids,
                },
                i % 2,
            )
        })
        .collect();
    let refs: Vec<(&Encoded, usize)> = rows.iter().map(|(e, y)| (e, *y)).collect();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        trainer.step(&refs, cfg.lr)?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}
