//! Random prefixes of the right shape, for benchmarks and tests of everything but numerics.

use rand::Rng;

use super::{
    default_labels, BaseModel, HostTensor, PrefixFile, PrefixMeta, Source, FORMAT_VERSION,
};
use crate::model::ModelInfo;

/// Box–Muller: standard normal samples without another dependency.
pub fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// A random prefix file for `model`: prefix values of standard deviation 1 (the scale of MiniLM's
/// own keys and values), a random head with `labels` rows. No fingerprint.
pub fn random_prefix(
    model: &ModelInfo,
    task: &str,
    p: usize,
    labels: usize,
    rng: &mut impl Rng,
) -> super::Result<PrefixFile> {
    let width = model.layers * 2 * model.hidden;
    let mut randn =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| normal(rng) * scale).collect() };
    PrefixFile::new(
        PrefixMeta {
            format_version: FORMAT_VERSION,
            task: task.into(),
            labels: default_labels(labels),
            problem_type: Default::default(),
            num_virtual_tokens: p,
            // No fingerprint: a random prefix fits any model of this shape.
            base_model: BaseModel {
                fingerprint: None,
                hub_id: None,
                ..BaseModel::of(model)
            },
            source: Source {
                kind: "synthetic".into(),
                details: Default::default(),
            },
            max_length: None,
        },
        HostTensor {
            shape: vec![p, width],
            data: randn(p * width, 1.0),
        },
        HostTensor {
            shape: vec![labels, model.hidden],
            data: randn(labels * model.hidden, 0.5),
        },
        HostTensor {
            shape: vec![labels],
            data: vec![0.0; labels],
        },
    )
}
