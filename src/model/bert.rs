//! The prefixed BERT encoder. One struct per checkpoint module, mirroring the key tree
//! (`embeddings.*`, `encoder.layer.N.attention.self.*`, …, `pooler.dense`), as candle's `bert.rs`
//! does, so a reader can map every weight to the code that uses it.
//!
//! What differs from a plain BERT, and why (see `../shared/docs/peft-prefix.md`):
//! - every row brings its own prefix keys/values, concatenated in front of the layer's own;
//! - positions start at the row's prefix length P, as transformers offsets them by the cache length;
//! - the key mask always attends the row's prefix slots and masks the padding ones.
//!
//! Activations are kept flat as `[B·S, Hd]` so that every dense layer is one matmul.
//!
//! The same modules serve training ([`PrefixedBert::pooled_train`]): a `Mode` switches the three
//! fused ops without a backward (dense, LayerNorm, softmax) to their `train_ops` versions and
//! turns dropout on.

use candle_core::{DType, Device, IndexOp, Tensor};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use super::batch::{gather_check, gather_prefixes, Dims, EncoderRow, HostBatch, TokenBatch};
use super::train_ops::{self, Dropout};
use super::weights::{self, Weights};
use super::{cpu, cpu_train};

mod train;
use super::{Activation, BertConfig, ModelError, ModelInfo, Result};

/// Inference, or training with dropout. In training, every op on the path from the prefix to the
/// loss must have a backward (see `train_ops`); in inference, the fastest kernel wins.
type Mode<'a> = Option<&'a mut Dropout>;

fn dropout(x: Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
    match mode {
        Some(d) => Ok(d.apply(&x)?),
        None => Ok(x),
    }
}

/// A dense layer with its weight stored pre-transposed as `[in, out]`, so the forward is a plain
/// `x · W` with both operands contiguous.
pub(super) struct Linear {
    pub(super) weight_t: Tensor,
    pub(super) bias: Tensor,
}

impl Linear {
    fn load(w: &Weights, prefix: &str, input: usize, output: usize) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[output, input])?;
        let bias = w.get(&format!("{prefix}.bias"), &[output])?;
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// Several linears over the same input fused into one `[in, Σout]` matmul (Q, K and V).
    fn fuse(parts: &[Linear]) -> Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|l| &l.weight_t).collect();
        let bs: Vec<&Tensor> = parts.iter().map(|l| &l.bias).collect();
        Ok(Self {
            weight_t: Tensor::cat(&ws, 1)?.contiguous()?,
            bias: Tensor::cat(&bs, 0)?,
        })
    }

    fn to_host(&self) -> Result<cpu::Dense> {
        let (inp, out) = self.weight_t.dims2()?;
        let w: Vec<f32> = self.weight_t.flatten_all()?.to_vec1()?;
        Ok(cpu::Dense::new(&w, self.bias.to_vec1()?, inp, out))
    }

    fn forward(&self, x: &Tensor, mode: &Mode<'_>) -> Result<Tensor> {
        Ok(match mode {
            None => x.matmul(&self.weight_t)?.broadcast_add(&self.bias)?,
            Some(_) => x.contiguous()?.apply_op1(train_ops::FrozenLinear {
                weight_t: self.weight_t.clone(),
                bias: self.bias.clone(),
            })?,
        })
    }
}

pub(super) struct LayerNorm {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) eps: f32,
}

impl LayerNorm {
    fn load(w: &Weights, prefix: &str, size: usize, eps: f64) -> Result<Self> {
        // Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
        let (wn, bn) = if w.contains(&format!("{prefix}.gamma")) {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(Self {
            weight: w.get(&format!("{prefix}.{wn}"), &[size])?,
            bias: w.get(&format!("{prefix}.{bn}"), &[size])?,
            eps: eps as f32,
        })
    }

    fn to_host(&self) -> Result<cpu::Norm> {
        Ok(cpu::Norm {
            g: self.weight.to_vec1()?,
            b: self.bias.to_vec1()?,
            eps: self.eps,
        })
    }

    fn forward(&self, x: &Tensor, mode: &Mode<'_>) -> Result<Tensor> {
        Ok(match mode {
            None => candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)?,
            Some(_) => x.contiguous()?.apply_op1(train_ops::LayerNorm {
                weight: self.weight.clone(),
                bias: self.bias.clone(),
                eps: self.eps,
            })?,
        })
    }
}

pub(super) struct BertEmbeddings {
    pub(super) word_embeddings: Tensor,
    pub(super) position_embeddings: Tensor,
    pub(super) token_type_embeddings: Tensor,
    pub(super) layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn load(w: &Weights, c: &BertConfig) -> Result<Self> {
        let hd = c.hidden_size;
        Ok(Self {
            word_embeddings: w.get("embeddings.word_embeddings.weight", &[c.vocab_size, hd])?,
            position_embeddings: w.get(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, hd],
            )?,
            token_type_embeddings: w.get(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, hd],
            )?,
            layer_norm: LayerNorm::load(w, "embeddings.LayerNorm", hd, c.layer_norm_eps)?,
        })
    }

    fn forward(&self, inputs: &TokenBatch, mode: &mut Mode<'_>) -> Result<Tensor> {
        let words = self.word_embeddings.index_select(&inputs.input_ids, 0)?;
        let types = self
            .token_type_embeddings
            .index_select(&inputs.type_ids, 0)?;
        let positions = self
            .position_embeddings
            .index_select(&inputs.position_ids, 0)?;
        let x = self
            .layer_norm
            .forward(&((words + types)? + positions)?, mode)?;
        dropout(x, mode)
    }
}

/// `attention.self`: Q, K, V (fused into one matmul at load) and the prefixed attention.
pub(super) struct BertSelfAttention {
    pub(super) qkv: Linear,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
}

impl BertSelfAttention {
    fn load(w: &Weights, prefix: &str, c: &BertConfig) -> Result<Self> {
        let hd = c.hidden_size;
        let parts = ["query", "key", "value"]
            .iter()
            .map(|n| Linear::load(w, &format!("{prefix}.{n}"), hd, hd))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            qkv: Linear::fuse(&parts)?,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        })
    }

    /// `x`: `[B·S, Hd]`; `prefix_kv`: `[2, B, H, Pmax, D]`. Returns the merged heads `[B·S, Hd]`.
    fn forward(
        &self,
        x: &Tensor,
        prefix_kv: &Tensor,
        inputs: &TokenBatch,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let (b, s, h, d) = (inputs.rows, inputs.seq_len, self.heads, self.head_dim);
        let qkv = self
            .qkv
            .forward(x, mode)?
            .reshape((b, s, 3, h, d))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?; // [3, B, H, S, D]
        let q = qkv.get(0)?;
        let prefix_k = prefix_kv.get(0)?.contiguous()?;
        let prefix_v = prefix_kv.get(1)?.contiguous()?;
        let k = Tensor::cat(&[&prefix_k, &qkv.get(1)?], 2)?; // [B, H, Pmax+S, D]
        let v = Tensor::cat(&[&prefix_v, &qkv.get(2)?], 2)?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&inputs.key_mask)?;
        let probs = match mode {
            None => candle_nn::ops::softmax_last_dim(&scores)?,
            Some(_) => dropout(scores.contiguous()?.apply_op1(train_ops::Softmax)?, mode)?,
        };
        let context = probs.matmul(&v)?; // [B, H, S, D]
        Ok(context
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * s, h * d))?)
    }
}

/// `attention.output` and `output`: dense, residual, LayerNorm.
pub(super) struct DenseResidualNorm {
    pub(super) dense: Linear,
    pub(super) layer_norm: LayerNorm,
}

impl DenseResidualNorm {
    fn load(w: &Weights, prefix: &str, input: usize, c: &BertConfig) -> Result<Self> {
        Ok(Self {
            dense: Linear::load(w, &format!("{prefix}.dense"), input, c.hidden_size)?,
            layer_norm: LayerNorm::load(
                w,
                &format!("{prefix}.LayerNorm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
        })
    }

    fn forward(&self, x: &Tensor, residual: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let y = dropout(self.dense.forward(x, mode)?, mode)?;
        self.layer_norm.forward(&(y + residual)?, mode)
    }
}

pub(super) struct BertLayer {
    pub(super) attention: BertSelfAttention,
    pub(super) attention_output: DenseResidualNorm,
    pub(super) intermediate: Linear,
    pub(super) activation: Activation,
    pub(super) output: DenseResidualNorm,
}

impl BertLayer {
    fn load(w: &Weights, i: usize, c: &BertConfig) -> Result<Self> {
        let p = format!("encoder.layer.{i}");
        Ok(Self {
            attention: BertSelfAttention::load(w, &format!("{p}.attention.self"), c)?,
            attention_output: DenseResidualNorm::load(
                w,
                &format!("{p}.attention.output"),
                c.hidden_size,
                c,
            )?,
            intermediate: Linear::load(
                w,
                &format!("{p}.intermediate.dense"),
                c.hidden_size,
                c.intermediate_size,
            )?,
            activation: c.activation(),
            output: DenseResidualNorm::load(w, &format!("{p}.output"), c.intermediate_size, c)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        prefix_kv: &Tensor,
        inputs: &TokenBatch,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let attended = self.attention.forward(x, prefix_kv, inputs, mode)?;
        let x = self.attention_output.forward(&attended, x, mode)?;
        let hidden = self.intermediate.forward(&x, mode)?;
        let hidden = match self.activation {
            Activation::GeluErf => super::kernels::gelu_erf(&hidden)?,
            Activation::GeluTanh => hidden.gelu()?,
            Activation::Relu => hidden.relu()?,
        };
        self.output.forward(&hidden, &x, mode)
    }
}

/// `PREFIXD_REFERENCE_PATH=1` runs candle's op-by-op path instead of the fused one off the CPU: a
/// debugging switch for comparing the two on a GPU (scripts/gpu-check uses it).
fn reference_path_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os("PREFIXD_REFERENCE_PATH").is_some_and(|v| v == "1"))
}

/// The frozen base model with prefix-aware attention.
pub struct PrefixedBert {
    pub(super) embeddings: BertEmbeddings,
    pub(super) layers: Vec<BertLayer>,
    pub(super) pooler: Linear,
    /// The same weights as host arrays for the CPU inference path (`None` on other devices).
    host: Option<Arc<cpu::HostBert>>,
    /// The transposed weights the CPU training backward needs, packed on first use.
    backward: OnceLock<Arc<cpu_train::Backward>>,
    config: BertConfig,
    info: ModelInfo,
    device: Device,
    dtype: DType,
}

impl PrefixedBert {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face BERT directory, in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, DType::F32)
    }

    /// Loads with the encoder's weights (and so its arithmetic's storage) in `dtype`: f32, or
    /// bf16/f16 for the opt-in half-precision mode. Pooled vectors are f32 either way.
    pub fn load_as(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let ckpt = weights::open(dir, device, dtype)?;
        let (c, w) = (&ckpt.config, &ckpt.weights);
        tracing::debug!(path = %w.path().display(), ?dtype, "loading BERT weights");
        let layers = (0..c.num_hidden_layers)
            .map(|i| BertLayer::load(w, i, c))
            .collect::<Result<Vec<_>>>()?;
        let mut model = Self {
            embeddings: BertEmbeddings::load(w, c)?,
            layers,
            pooler: Linear::load(w, "pooler.dense", c.hidden_size, c.hidden_size)?,
            host: None,
            backward: OnceLock::new(),
            config: ckpt.config.clone(),
            info: ckpt.info,
            device: device.clone(),
            dtype,
        };
        if dtype != DType::F32 && !super::fused::supports(c) {
            return Err(ModelError::Device(format!(
                "{}: half precision runs on the fused kernels, which need head and intermediate \
                 sizes divisible by 8; use --dtype f32",
                dir.display()
            )));
        }
        // The host path implements BERT's erf GELU in f32 only; the rest uses the fused path.
        if device.is_cpu() && dtype == DType::F32 && c.activation() == Activation::GeluErf {
            model.host = Some(Arc::new(model.host_weights()?));
        }
        Ok(model)
    }

    fn host_weights(&self) -> Result<cpu::HostBert> {
        let e = &self.embeddings;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        Ok(cpu::HostBert {
            word: flat(&e.word_embeddings)?,
            position: flat(&e.position_embeddings)?,
            token_type: flat(&e.token_type_embeddings)?,
            emb_norm: e.layer_norm.to_host()?,
            layers: self
                .layers
                .iter()
                .map(|l| {
                    Ok(cpu::Layer {
                        qkv: l.attention.qkv.to_host()?,
                        attn_out: l.attention_output.dense.to_host()?,
                        attn_norm: l.attention_output.layer_norm.to_host()?,
                        inter: l.intermediate.to_host()?,
                        out: l.output.dense.to_host()?,
                        out_norm: l.output.layer_norm.to_host()?,
                    })
                })
                .collect::<Result<_>>()?,
            pooler: self.pooler.to_host()?,
            hidden: self.config.hidden_size,
            heads: self.config.num_attention_heads,
            workspace: Default::default(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Names the hub id these weights are published under (`--base-model-id`), overriding the
    /// fingerprint lookup; it is written into the prefixes made on this model. `None` or a blank
    /// id changes nothing.
    pub fn set_hub_id(&mut self, id: Option<&str>) {
        let Some(id) = id.map(str::trim).filter(|id| !id.is_empty()) else {
            return;
        };
        if let Some(known) = self.info.hub_id.as_deref().filter(|k| *k != id) {
            tracing::warn!(given = %id, known, "--base-model-id differs from the id known for these weights; using the given one");
        }
        self.info.hub_id = Some(id.to_string());
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the encoder's weights are stored and its activations kept in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn dims(&self) -> Dims {
        let c = &self.config;
        Dims {
            max_positions: c.max_position_embeddings,
            vocab: c.vocab_size,
            type_vocab: c.type_vocab_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        }
    }

    /// Embeddings, every layer with its prefix, and the pooler: `[B, Hd]`.
    /// `prefix_kv(l)` gives layer `l`'s `[2, B, H, P, D]` prefix keys and values.
    fn encode(
        &self,
        inputs: &TokenBatch,
        prefix_kv: impl Fn(usize) -> Result<Tensor>,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let hd = self.config.hidden_size;
        let mut x = self.embeddings.forward(inputs, mode)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &prefix_kv(l)?, inputs, mode)?;
        }
        let cls = x
            .reshape((inputs.rows, inputs.seq_len, hd))?
            .i((.., 0))?
            .contiguous()?;
        Ok(self.pooler.forward(&cls, mode)?.tanh()?)
    }

    /// Runs the rows through the encoder and the pooler: `tanh(pooler(h[:, 0]))`, `[B, Hd]` F32.
    /// Each row's result depends only on its own tokens and prefix, never on the batch's padding.
    /// Uses the CPU kernels (`cpu.rs`) for f32 on the CPU, the fused device path (`fused/`)
    /// otherwise.
    pub fn pooled(&self, rows: &[EncoderRow<'_>]) -> Result<Vec<Vec<f32>>> {
        match &self.host {
            Some(host) => {
                let batch = self.host_batch(rows)?;
                let prefixes: Vec<&super::PrefixKv> = rows.iter().map(|r| r.prefix).collect();
                let hd = self.config.hidden_size;
                Ok(host
                    .pooled(&batch, &prefixes)
                    .chunks_exact(hd)
                    .map(<[f32]>::to_vec)
                    .collect())
            }
            None if self.dtype == DType::F32
                && (reference_path_forced() || !super::fused::supports(&self.config)) =>
            {
                self.pooled_reference(rows)
            }
            None => self.pooled_fused(rows),
        }
    }

    /// The fused device path on whatever device the model is on (on the CPU its fused ops are
    /// composed of candle ops: that is how it is tested without a GPU).
    pub fn pooled_fused(&self, rows: &[EncoderRow<'_>]) -> Result<Vec<Vec<f32>>> {
        let batch = self.host_batch(rows)?;
        super::fused::pooled(self, rows, &batch)
    }

    /// The rows, checked against the model, as one padded host batch.
    fn host_batch(&self, rows: &[EncoderRow<'_>]) -> Result<HostBatch> {
        let dims = self.dims();
        gather_check(rows, &dims)?;
        let tokens: Vec<(&[u32], &[u32], usize)> = rows
            .iter()
            .map(|r| (r.input_ids, r.type_ids, r.prefix.num_virtual_tokens()))
            .collect();
        HostBatch::build(&tokens, &dims)
    }

    /// The same computation through candle's tensor ops, on any device. On the CPU it is the
    /// reference the fast path is tested against.
    pub fn pooled_reference(&self, rows: &[EncoderRow<'_>]) -> Result<Vec<Vec<f32>>> {
        let (batch, prefixes) = self.host_inputs(rows)?;
        let inputs = TokenBatch::new(&batch, &self.device)?;
        let c = &self.config;
        let prefixes = Tensor::from_vec(
            prefixes,
            (
                c.num_hidden_layers,
                2,
                batch.rows,
                c.num_attention_heads,
                batch.p_max,
                c.head_dim(),
            ),
            &self.device,
        )?;
        let pooled = self.encode(&inputs, |l| Ok(prefixes.get(l)?), &mut None)?;
        Ok(pooled.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    fn host_inputs(&self, rows: &[EncoderRow<'_>]) -> Result<(HostBatch, Vec<f32>)> {
        let dims = self.dims();
        let tokens: Vec<(&[u32], &[u32], usize)> = rows
            .iter()
            .map(|r| (r.input_ids, r.type_ids, r.prefix.num_virtual_tokens()))
            .collect();
        Ok((
            HostBatch::build(&tokens, &dims)?,
            gather_prefixes(rows, &dims)?,
        ))
    }
}
