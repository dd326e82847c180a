//! Training on the device path (GPUs): the whole encoder as one autograd op whose backward is
//! written out by hand, as the CPU path's `cpu_train` is.
//!
//! Why not candle's autograd over the forward's ops: it computes the gradient of both operands of
//! every product (the frozen weights' too) and accumulates every node's gradient into a fresh
//! zero tensor, and at batch 32 a GPU step is bound by its launches: that path ran at 0.77× of
//! PyTorch + PEFT on an H200, this one at 1.9–2.3× (~420 launches a step; bench/README.md, GPU).
//! Here the forward is the inference path's fused ops plus hash dropout, it keeps what the
//! backward needs, and the backward goes straight from d(pooled) to d(prefix) — no weight
//! gradients, nothing below layer 0's attention.
//!
//! Every op is a candle op or one of `ops`/`grad`, so the same code runs on the CPU, where the
//! tests compare its gradients with candle's autograd through the reference forward.

use candle_core::{CpuStorage, CustomOp1, DType, IndexOp, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

use super::super::batch::HostBatch;
use super::super::bert::PrefixedBert;
use super::super::cpu_train::DropMask;
use super::grad::{self, Site};
use super::ops::{self, AttnDims, Prefixes};

/// A layer's frozen weights (cheap clones of the model's tensors), as the op holds them.
struct LayerWeights {
    qkv_w: Tensor,
    qkv_b: Tensor,
    attn_out_w: Tensor,
    attn_out_b: Tensor,
    ln1: (Tensor, Tensor, f32),
    inter_w: Tensor,
    inter_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln2: (Tensor, Tensor, f32),
}

/// What one layer's forward keeps for its backward.
struct LayerSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Softmax output before dropout, `[B, H, S, T]`.
    probs: Tensor,
    /// After dropout: what multiplied V.
    probs_dropped: Tensor,
    /// LayerNorm inputs (after dropout and residual).
    ln1_in: Tensor,
    ln2_in: Tensor,
    /// The intermediate matmul's output, before bias and GELU.
    inter: Tensor,
}

/// The op: prefix `[L, 2, H, P, D]` → pooled `[B, Hd]`, with dropout.
pub(crate) struct EncoderTrainDevice {
    /// The batch's embeddings before dropout (they need no gradient) and its key mask.
    embedded: Tensor,
    mask: Tensor,
    layers: Vec<LayerWeights>,
    pooler: (Tensor, Tensor),
    heads: usize,
    head_dim: usize,
    batch: HostBatch,
    drop: DropMask,
    saved: Mutex<Option<Vec<LayerSaved>>>,
}

impl EncoderTrainDevice {
    /// The op for one step over `batch` (every row with the same prefix of `batch.p_max`).
    pub(crate) fn new(
        m: &PrefixedBert,
        batch: HostBatch,
        drop: DropMask,
    ) -> super::super::Result<Self> {
        let c = m.config();
        let (embedded, mask) = super::embedded(m, &batch)?;
        Ok(Self {
            embedded,
            mask,
            layers: m
                .layers
                .iter()
                .map(|l| {
                    let (a, o) = (&l.attention_output, &l.output);
                    LayerWeights {
                        qkv_w: l.attention.qkv.weight_t.clone(),
                        qkv_b: l.attention.qkv.bias.clone(),
                        attn_out_w: a.dense.weight_t.clone(),
                        attn_out_b: a.dense.bias.clone(),
                        ln1: (
                            a.layer_norm.weight.clone(),
                            a.layer_norm.bias.clone(),
                            a.layer_norm.eps,
                        ),
                        inter_w: l.intermediate.weight_t.clone(),
                        inter_b: l.intermediate.bias.clone(),
                        out_w: o.dense.weight_t.clone(),
                        out_b: o.dense.bias.clone(),
                        ln2: (
                            o.layer_norm.weight.clone(),
                            o.layer_norm.bias.clone(),
                            o.layer_norm.eps,
                        ),
                    }
                })
                .collect(),
            pooler: (m.pooler.weight_t.clone(), m.pooler.bias.clone()),
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            batch,
            drop,
            saved: Mutex::new(None),
        })
    }

    fn dims(&self) -> AttnDims {
        AttnDims {
            batch: self.batch.rows,
            seq: self.batch.seq_len,
            heads: self.heads,
            head_dim: self.head_dim,
            p_max: self.batch.p_max,
        }
    }

    fn site(&self, site: u32) -> Site {
        Site {
            mask: self.drop,
            site,
        }
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `tanh(pooler(h[:, 0]))` of the encoder run with prefix `kv`, keeping what the backward needs.
    fn forward(&self, kv: &Tensor) -> Result<Tensor> {
        let (bt, d, mask) = (&self.batch, self.dims(), &self.mask);
        let mut x = grad::dropout(&self.embedded, self.site(0))?;
        let prefixes = Prefixes::new(vec![kv.contiguous()?], vec![0; bt.rows], bt.p_max)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        for (l, w) in self.layers.iter().enumerate() {
            let site = 1 + 3 * l as u32;
            let (q, k, v) = ops::split_qkv(&x.matmul(&w.qkv_w)?, &w.qkv_b, &prefixes, l, &d)?;
            let probs = ops::masked_softmax(&q.matmul(&k.t()?)?, mask, self.scale())?;
            let probs_dropped = grad::dropout(&probs, self.site(site))?;
            let ctx = ops::merge_heads(&probs_dropped.matmul(&v)?)?;
            let a = ctx.matmul(&w.attn_out_w)?.broadcast_add(&w.attn_out_b)?;
            let ln1_in = (grad::dropout(&a, self.site(site + 1))? + &x)?;
            let x1 = candle_nn::ops::layer_norm(&ln1_in, &w.ln1.0, &w.ln1.1, w.ln1.2)?;
            let inter = x1.matmul(&w.inter_w)?;
            let hidden = ops::bias_gelu(inter.clone(), &w.inter_b)?;
            let o = hidden.matmul(&w.out_w)?.broadcast_add(&w.out_b)?;
            let ln2_in = (grad::dropout(&o, self.site(site + 2))? + &x1)?;
            x = candle_nn::ops::layer_norm(&ln2_in, &w.ln2.0, &w.ln2.1, w.ln2.2)?;
            saved.push(LayerSaved {
                q,
                k,
                v,
                probs,
                probs_dropped,
                ln1_in,
                ln2_in,
                inter,
            });
        }
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let hd = self.heads * self.head_dim;
        let cls = x
            .reshape((bt.rows, bt.seq_len, hd))?
            .i((.., 0))?
            .contiguous()?;
        cls.matmul(&self.pooler.0)?
            .broadcast_add(&self.pooler.1)?
            .tanh()
    }

    /// d(prefix) `[L, 2, H, P, D]` from d(pooled), through the saved forward.
    fn backward(&self, pooled: &Tensor, d_pooled: &Tensor) -> Result<Tensor> {
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("encoder backward without its forward (or run twice)")
        };
        let (b, s, p) = (self.batch.rows, self.batch.seq_len, self.batch.p_max);
        let (h, hd_) = (self.heads, self.head_dim);
        let hd = h * hd_;
        let n = b * s;
        // tanh' = 1 − tanh²; then the pooler's matmul; only each row's [CLS] has a gradient.
        let d_pre = (d_pooled * (1.0 - pooled.sqr()?)?)?;
        let d_cls = d_pre.matmul(&self.pooler.0.t()?)?.unsqueeze(1)?;
        let mut dx = if s > 1 {
            let rest = Tensor::zeros((b, s - 1, hd), DType::F32, d_cls.device())?;
            Tensor::cat(&[&d_cls, &rest], 1)?.reshape((n, hd))?
        } else {
            d_cls.reshape((n, hd))?
        };
        let mut d_kv = Vec::with_capacity(self.layers.len());
        for (l, (w, sv)) in self.layers.iter().zip(&saved).enumerate().rev() {
            let site = 1 + 3 * l as u32;
            // x2 = LN(drop(hidden·Wo + bo) + x1); hidden = gelu(x1·Wi + bi).
            let d_ln2 = grad::ln_grad(&sv.ln2_in, &dx, &w.ln2.0, w.ln2.2)?;
            let d_o = grad::dropout(&d_ln2, self.site(site + 2))?;
            let d_hidden = d_o.matmul(&w.out_w.t()?)?;
            let d_inter = grad::bias_gelu_grad(&sv.inter, &w.inter_b, &d_hidden)?;
            let d_x1 = (d_inter.matmul(&w.inter_w.t()?)? + &d_ln2)?;
            // x1 = LN(drop(ctx·Wa + ba) + x).
            let d_ln1 = grad::ln_grad(&sv.ln1_in, &d_x1, &w.ln1.0, w.ln1.2)?;
            let d_a = grad::dropout(&d_ln1, self.site(site + 1))?;
            let d_ctx = d_a
                .matmul(&w.attn_out_w.t()?)?
                .reshape((b, s, h, hd_))?
                .transpose(1, 2)?
                .contiguous()?; // [B, H, S, D]

            // ctx = drop(softmax(q·Kᵀ·scale + mask))·V.
            let d_v = sv.probs_dropped.t()?.matmul(&d_ctx)?; // [B, H, T, D]
            let d_dropped = d_ctx.matmul(&sv.v.t()?)?;
            let d_probs = grad::dropout(&d_dropped, self.site(site))?;
            let d_scores = grad::softmax_grad(&sv.probs, &d_probs, self.scale())?;
            let d_k = d_scores.t()?.matmul(&sv.q)?; // [B, H, T, D]

            // Every row shares the prefix: its gradient is the sum over rows of the first P keys.
            d_kv.push(Tensor::stack(
                &[d_k.narrow(2, 0, p)?.sum(0)?, d_v.narrow(2, 0, p)?.sum(0)?],
                0,
            )?); // [2, H, P, D]
            if l == 0 {
                break; // nothing below layer 0's keys and values has a prefix
            }
            let d_q = d_scores.matmul(&sv.k)?; // [B, H, S, D]
            let d_qkv = Tensor::stack(&[&d_q, &d_k.narrow(2, p, s)?, &d_v.narrow(2, p, s)?], 0)?
                .permute((1, 3, 0, 2, 4))?
                .contiguous()?
                .reshape((n, 3 * hd))?; // [B·S, 3·Hd]: queries | keys | values
            dx = (d_qkv.matmul(&w.qkv_w.t()?)? + &d_ln1)?;
        }
        d_kv.reverse();
        Tensor::stack(&d_kv, 0)
    }
}

impl CustomOp1 for EncoderTrainDevice {
    fn name(&self) -> &'static str {
        "encoder-train-device"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        super::super::train_ops::via_tensor(s, l, self.name(), |kv| self.forward(kv))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::super::train_ops::via_tensor_cuda(s, l, self.name(), |kv| self.forward(kv))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(res, grad)?))
    }
}
