//! The trainable parameters: the prefix (directly, or through the reparameterization MLP of the
//! prefix-tuning paper) and the classifier head. Nothing else is a variable, so nothing else
//! can change.

use candle_core::{Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;

use crate::model::ModelInfo;
use crate::prefix::synthetic::normal;
use crate::prefix::HostTensor;

pub enum PrefixParams {
    /// `prompt_embeddings` `[P, L·2·Hd]` itself, as PEFT's `Embedding(P, L·2·Hd)`.
    Direct { embedding: Var },
    /// Li & Liang's reparameterization, as PEFT's `prefix_projection`:
    /// `Embedding(P, Hd)` → Linear(Hd → E) → tanh → Linear(E → L·2·Hd).
    Projected {
        embedding: Var,
        w1: Var,
        b1: Var,
        w2: Var,
        b2: Var,
    },
}

pub struct Params {
    pub prefix: PrefixParams,
    /// `[C, Hd]`, `[C]`.
    pub head_weight: Var,
    pub head_bias: Var,
}

fn var(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Var> {
    Var::from_tensor(&Tensor::from_vec(data, shape, device)?)
}

impl Params {
    /// Initialised as PEFT and transformers do: prefix embeddings N(0, 1), projection linears
    /// U(±1/√fan_in) (torch's default), classifier weight N(0, 0.02) and bias 0.
    pub fn init(
        model: &ModelInfo,
        p: usize,
        projection: Option<usize>,
        labels: usize,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let hd = model.hidden;
        let width = model.layers * 2 * hd;
        let mut randn =
            |n: usize, std: f32| -> Vec<f32> { (0..n).map(|_| normal(rng) * std).collect() };
        let head_weight = var(randn(labels * hd, 0.02), &[labels, hd], device)?;
        let prefix = match projection {
            None => PrefixParams::Direct {
                embedding: var(randn(p * width, 1.0), &[p, width], device)?,
            },
            Some(e) => {
                let embedding = var(randn(p * hd, 1.0), &[p, hd], device)?;
                let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
                    let a = 1.0 / (fan_in as f32).sqrt();
                    (0..n).map(|_| rng.random_range(-a..a)).collect()
                };
                PrefixParams::Projected {
                    embedding,
                    w1: var(uniform(e * hd, hd), &[e, hd], device)?,
                    b1: var(uniform(e, hd), &[e], device)?,
                    w2: var(uniform(width * e, e), &[width, e], device)?,
                    b2: var(uniform(width, e), &[width], device)?,
                }
            }
        };
        Ok(Self {
            prefix,
            head_weight,
            head_bias: var(vec![0.0; labels], &[labels], device)?,
        })
    }

    /// The prefix as the encoder consumes it, `[P, L·2·Hd]`, differentiable.
    pub fn prompt_embeddings(&self) -> Result<Tensor> {
        match &self.prefix {
            PrefixParams::Direct { embedding } => Ok(embedding.as_tensor().clone()),
            PrefixParams::Projected {
                embedding,
                w1,
                b1,
                w2,
                b2,
            } => embedding
                .as_tensor()
                .matmul(&w1.as_tensor().t()?)?
                .broadcast_add(b1.as_tensor())?
                .tanh()?
                .matmul(&w2.as_tensor().t()?)?
                .broadcast_add(b2.as_tensor()),
        }
    }

    /// `logits = x · Wᵀ + b`.
    pub fn head(&self, pooled: &Tensor) -> Result<Tensor> {
        pooled
            .matmul(&self.head_weight.as_tensor().t()?)?
            .broadcast_add(self.head_bias.as_tensor())
    }

    /// Weight matrices and embeddings: these get weight decay (as in Hugging Face's Trainer,
    /// which exempts biases).
    pub fn decayed(&self) -> Vec<Var> {
        let mut v = vec![self.head_weight.clone()];
        match &self.prefix {
            PrefixParams::Direct { embedding } => v.push(embedding.clone()),
            PrefixParams::Projected {
                embedding, w1, w2, ..
            } => v.extend([embedding.clone(), w1.clone(), w2.clone()]),
        }
        v
    }

    pub fn not_decayed(&self) -> Vec<Var> {
        let mut v = vec![self.head_bias.clone()];
        if let PrefixParams::Projected { b1, b2, .. } = &self.prefix {
            v.extend([b1.clone(), b2.clone()]);
        }
        v
    }

    pub fn all(&self) -> Vec<Var> {
        let mut v = self.decayed();
        v.extend(self.not_decayed());
        v
    }

    /// The current values as the three tensors of a prefix file (the projection folded away).
    pub fn export(&self) -> Result<(HostTensor, HostTensor, HostTensor)> {
        let host = |t: &Tensor| -> Result<HostTensor> {
            Ok(HostTensor {
                shape: t.dims().to_vec(),
                data: t.flatten_all()?.to_vec1::<f32>()?,
            })
        };
        Ok((
            host(&self.prompt_embeddings()?.detach())?,
            host(self.head_weight.as_tensor())?,
            host(self.head_bias.as_tensor())?,
        ))
    }
}
