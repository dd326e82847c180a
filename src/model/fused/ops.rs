//! The fused ops of the device path. On a CUDA tensor each is one kernel of `kernels.cu` (two for
//! [`split_qkv`]); anywhere else it is the same math composed of candle ops, which is how the
//! orchestration is tested on machines without a GPU and what the kernels must equal.
//!
//! Storage is the model's dtype (f32, bf16 or f16); the arithmetic inside every op is f32 and the
//! result is rounded once, so the CPU composition and the kernels round at the same points.

use candle_core::{DType, IndexOp, Result, Tensor, D};

/// The shape facts of one layer's attention.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct AttnDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub p_max: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl AttnDims {
    pub fn keys(&self) -> usize {
        self.p_max + self.seq
    }
}

fn in_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// `LayerNorm((word[ids] + type[types]) + pos[positions])`, `[N, Hd]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn embed_ln(
    ids: &Tensor,
    types: &Tensor,
    positions: &Tensor,
    word: &Tensor,
    type_emb: &Tensor,
    pos_emb: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if word.device().is_cuda() {
        return super::cuda::embed_ln(
            ids, types, positions, word, type_emb, pos_emb, gamma, beta, eps,
        );
    }
    let x = (in_f32(&word.index_select(ids, 0)?)? + in_f32(&type_emb.index_select(types, 0)?)?)?
        .add(&in_f32(&pos_emb.index_select(positions, 0)?)?)?;
    layer_norm_f32(&x, gamma, beta, eps)?.to_dtype(word.dtype())
}

fn layer_norm_f32(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    candle_nn::ops::layer_norm(&x.contiguous()?, &in_f32(gamma)?, &in_f32(beta)?, eps)
}

/// `LayerNorm((x + bias) + residual)`, `[N, Hd]`.
pub(crate) fn bias_residual_ln(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::bias_residual_ln(x, bias, residual, gamma, beta, eps);
    }
    let y = in_f32(x)?
        .broadcast_add(&in_f32(bias)?)?
        .add(&in_f32(residual)?)?;
    layer_norm_f32(&y, gamma, beta, eps)?.to_dtype(x.dtype())
}

/// `gelu(x + bias)`, the exact erf form, `[N, I]`.
pub(crate) fn bias_gelu(x: Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::bias_gelu(x, bias);
    }
    in_f32(&x)?
        .broadcast_add(&in_f32(bias)?)?
        .gelu_erf()?
        .to_dtype(x.dtype())
}

/// Every row's task prefix for one batch. Rows of one task share its tensor; nothing is copied
/// per row until [`split_qkv`] writes the keys and values.
pub(crate) enum Prefixes {
    /// The composed path: distinct tasks stacked into `[tasks, L, 2, H, Pmax, D]` (right-aligned,
    /// zero-padded) and a u32 `[B]` index of each row's task.
    Bank { bank: Tensor, row_task: Tensor },
    /// The CUDA path: a per-row pointer into each task's own `[L, 2, H, P, D]` tensor.
    #[cfg(feature = "cuda")]
    Table(super::cuda::PrefixTable),
}

impl Prefixes {
    /// `tasks`: each distinct task's `[L, 2, H, P, D]` on the model's device and dtype;
    /// `row_task`: which task each row uses.
    pub fn new(tasks: Vec<Tensor>, row_task: Vec<u32>, p_max: usize) -> Result<Self> {
        let Some(first) = tasks.first() else {
            candle_core::bail!("a batch needs at least one task")
        };
        let device = first.device().clone();
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            return Ok(Self::Table(super::cuda::PrefixTable::new(
                tasks, &row_task,
            )?));
        }
        let padded = tasks
            .iter()
            .map(|t| {
                let (l, two, h, p, d) = t.dims5()?;
                if p == p_max {
                    return Ok(t.clone());
                }
                let pad = Tensor::zeros((l, two, h, p_max - p, d), t.dtype(), &device)?;
                Tensor::cat(&[&pad, t], 3)
            })
            .collect::<Result<Vec<_>>>()?;
        let n = row_task.len();
        Ok(Self::Bank {
            bank: Tensor::stack(&padded, 0)?,
            row_task: Tensor::from_vec(row_task, n, &device)?,
        })
    }
}

/// Splits the fused QKV matmul's output `[B·S, 3·Hd]` (bias not yet added) into queries
/// `[B, H, S, D]` and keys and values `[B, H, Pmax + S, D]`, whose first `Pmax` slots hold each
/// row's own task prefix for `layer`, right-aligned.
pub(crate) fn split_qkv(
    qkv: &Tensor,
    bias: &Tensor,
    prefixes: &Prefixes,
    layer: usize,
    d: &AttnDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (bank, row_task) = match prefixes {
        Prefixes::Bank { bank, row_task } => (bank, row_task),
        #[cfg(feature = "cuda")]
        Prefixes::Table(table) => return super::cuda::split_qkv(qkv, bias, table, layer, d),
    };
    let (b, s, h, hd) = (d.batch, d.seq, d.heads, d.head_dim);
    let dtype = qkv.dtype();
    let tokens = in_f32(qkv)?
        .broadcast_add(&in_f32(bias)?)?
        .to_dtype(dtype)?
        .reshape((b, s, 3, h, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?; // [3, B, H, S, D]
    let prefix = bank
        .i((.., layer))?
        .contiguous()?
        .index_select(row_task, 0)?; // [B, 2, H, Pmax, D]
    let k = Tensor::cat(&[&prefix.i((.., 0))?, &tokens.get(1)?], 2)?;
    let v = Tensor::cat(&[&prefix.i((.., 1))?, &tokens.get(2)?], 2)?;
    Ok((tokens.get(0)?, k.contiguous()?, v.contiguous()?))
}

/// `softmax(scores · scale + mask)` over the last dimension. `scores`: `[B, H, S, T]`; `mask`:
/// `[B, T]` f32, 0 where attended and −∞ elsewhere.
pub(crate) fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() {
        return super::cuda::masked_softmax(scores, mask, scale);
    }
    let (b, _, _, t) = scores.dims4()?;
    let x = (in_f32(scores)? * scale)?.broadcast_add(&mask.reshape((b, 1, 1, t))?)?;
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)?.to_dtype(scores.dtype())
}

/// One layer's attention from the fused QKV matmul's output (bias not yet added):
/// `softmax(q·Kᵀ · scale + mask) · V` with each row's prefix in front of its keys and values, as
/// merged-head rows `[B·S, H·D]`. On a GPU in half precision one tensor-core kernel does all of it
/// ([`attention_kernel_applies`]); elsewhere [`split_qkv`], a batched matmul, the fused masked
/// softmax, a batched matmul and the head merge (in half precision rounded as the kernel rounds).
pub(crate) fn attention(
    qkv: &Tensor,
    bias: &Tensor,
    prefixes: &Prefixes,
    layer: usize,
    d: &AttnDims,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let kernel = attention_kernel_applies(qkv.dtype(), d.head_dim);
    #[cfg(feature = "cuda")]
    if let (true, Prefixes::Table(table)) = (kernel, prefixes) {
        return super::cuda::attention(qkv, bias, table, layer, d, mask, scale);
    }
    let (q, k, v) = split_qkv(qkv, bias, prefixes, layer, d)?;
    if kernel {
        return attention_as_kernel(&q, &k, &v, mask, scale);
    }
    let probs = masked_softmax(&q.matmul(&k.t()?)?, mask, scale)?;
    merge_heads(&probs.matmul(&v)?)
}

/// Whether half-precision attention is the tensor-core kernel (on a GPU) and its composition
/// (elsewhere): bf16/f16 with head size 32 or 64, unless `PREFIXD_ATTENTION=matmul` asks for the
/// batched-matmul path (for comparing the two). f32 keeps the batched matmuls: cuBLAS's f32
/// products match PEFT to 1e-4, where the tensor cores would round the operands.
pub(crate) fn attention_kernel_applies(dtype: DType, head_dim: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("PREFIXD_ATTENTION").is_ok_and(|v| v == "matmul"));
    !off && matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 32 | 64)
}

/// The kernel's math in candle ops, rounding where the kernel rounds, so that half precision on
/// the CPU (and `bench/half-accuracy.sh`) computes what a GPU does: scores, their exponentials
/// and the sum in f32, the probabilities rounded to the storage type unnormalised before `·V`
/// (f32 accumulation), one division and one rounding at the output. (The kernel subtracts a
/// running maximum, chunk by chunk, and rescales; this subtracts the row's maximum once.)
fn attention_as_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, _, t, _) = k.dims4()?;
    let x = (in_f32(q)?.matmul(&in_f32(k)?.t()?)? * scale)?
        .broadcast_add(&mask.reshape((b, 1, 1, t))?)?;
    let p = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    let sum = p.sum_keepdim(D::Minus1)?;
    let rounded = p.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let out = rounded.matmul(&in_f32(v)?)?.broadcast_div(&sum)?;
    merge_heads(&out.to_dtype(dtype)?)
}

/// `[B, H, S, D]` attention output → `[B·S, H·D]` rows.
pub(crate) fn merge_heads(ctx: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if ctx.device().is_cuda() {
        return super::cuda::merge_heads(ctx);
    }
    let (b, h, s, d) = ctx.dims4()?;
    ctx.transpose(1, 2)?.contiguous()?.reshape((b * s, h * d))
}

/// `tanh(W · x + b)` of each row's first token: BERT's pooler, in f32. `x`: `[B·S, Hd]`.
pub(crate) fn pooler(
    x: &Tensor,
    rows: usize,
    seq: usize,
    w_t: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let cls = x.reshape((rows, seq, hd))?.i((.., 0))?.contiguous()?;
    in_f32(&cls.matmul(w_t)?)?
        .broadcast_add(&in_f32(b)?)?
        .tanh()
}
