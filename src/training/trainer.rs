//! One optimizer step: the training forward (prefix, frozen encoder with dropout, head), the loss,
//! its gradients, clipping, AdamW.

use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::params::Params;
use super::{Result, TrainConfig};
use crate::engine::{Encoded, Engine};
use crate::model::Dropout;
use crate::prefix::{BaseModel, PrefixFile, PrefixMeta, ProblemType, Source, FORMAT_VERSION};

/// Mean cross-entropy of one batch through the training forward: prefix, frozen encoder with
/// dropout, dropout on the pooled vector (as `BertForSequenceClassification` does), head.
pub(super) fn batch_loss(
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

pub(super) struct Trainer<'a> {
    engine: &'a Engine,
    cfg: &'a TrainConfig,
    labels: Vec<String>,
    params: Params,
    decayed: AdamW,
    not_decayed: AdamW,
    dropout: Dropout,
}

impl<'a> Trainer<'a> {
    pub(super) fn new(
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
    pub(super) fn snapshot(&self, source: Source) -> Result<PrefixFile> {
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
    pub(super) fn step(&mut self, batch: &[(&Encoded, usize)], lr: f64) -> Result<f64> {
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
