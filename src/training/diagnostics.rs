//! Checks and measurements around training: gradient norms per prefix block (the graph reaches
//! every layer), and the step-time benchmark behind `prefixd bench --train`.

use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

use super::data::Dataset;
use super::params::{self, Params};
use super::trainer::{batch_loss, Trainer};
use super::{Result, TrainConfig};
use crate::engine::{Encoded, Engine};
use crate::model::Dropout;

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
