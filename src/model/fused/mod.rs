//! The device path: the encoder as matmuls plus a handful of fused ops, for GPUs (and for the CPU
//! in half precision, or where the host path does not apply).
//!
//! Per layer: QKV matmul → `attention` (bias, heads, each row's prefix placed in front of its
//! keys/values, `q·Kᵀ`, masked softmax, `probs·V`, head merge) → output matmul →
//! `bias_residual_ln` → intermediate matmul → `bias_gelu` → output matmul → `bias_residual_ln`.
//! In half precision on a GPU `attention` is one tensor-core kernel (eight launches a layer); in
//! f32 it is `split_qkv`, batched matmuls and a fused masked softmax (eleven), where candle's
//! op-by-op chain takes over twenty. Every bias, scale, mask and residual rides along with a pass
//! that happens anyway.
//!
//! Training on a GPU (`train.rs`) runs the same ops plus dropout, and its own backward (`grad.rs`).
//!
//! Task prefixes live on the device once per task (`PrefixKv::tensor_on`), so a batch uploads only
//! its token ids, its mask and a per-row table — never the prefixes themselves.

#[cfg(feature = "cuda")]
#[macro_use]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_train;
mod grad;
mod ops;
pub(crate) mod train;

use candle_core::{Device, Tensor};
use std::collections::HashMap;

use super::batch::{EncoderRow, HostBatch};
use super::bert::PrefixedBert;
use super::{Activation, Result};
use ops::{AttnDims, Prefixes};

/// Whether the CUDA kernels can run this model: 16-byte packs need head and intermediate sizes
/// divisible by 8, and a row-per-warp kernel holds at most 1024 values. (Every BERT checkpoint
/// in use qualifies; the others run candle's op-by-op path in f32.)
pub(crate) fn supports(c: &super::BertConfig) -> bool {
    c.head_dim().is_multiple_of(8)
        && c.intermediate_size.is_multiple_of(8)
        && c.hidden_size <= max_keys()
}

/// Most keys (P + S) one attention row may have on the CUDA path.
pub(crate) fn max_keys() -> usize {
    #[cfg(feature = "cuda")]
    {
        cuda::MAX_ROW
    }
    #[cfg(not(feature = "cuda"))]
    {
        usize::MAX
    }
}

/// Each distinct task's prefix once, and which one each row uses.
fn prefixes(m: &PrefixedBert, rows: &[EncoderRow<'_>], p_max: usize) -> Result<Prefixes> {
    let mut index: HashMap<usize, u32> = HashMap::new();
    let mut tasks = Vec::new();
    let mut row_task = Vec::with_capacity(rows.len());
    for r in rows {
        let i = match index.get(&r.prefix.id()) {
            Some(&i) => i,
            None => {
                tasks.push(r.prefix.tensor_on(m.device(), m.dtype())?);
                let i = (tasks.len() - 1) as u32;
                index.insert(r.prefix.id(), i);
                i
            }
        };
        row_task.push(i);
    }
    Ok(Prefixes::new(tasks, row_task, p_max)?)
}

/// A batch already checked by `HostBatch::build`, on the device: its embeddings (word + type +
/// position, LayerNorm) as `[B·S, Hd]` rows and its `[B, Pmax + S]` key mask. Shared by inference
/// and the training op (`train.rs`), whose embeddings need no gradient.
pub(crate) fn embedded(m: &PrefixedBert, batch: &HostBatch) -> Result<(Tensor, Tensor)> {
    let device: &Device = m.device();
    let (b, s) = (batch.rows, batch.seq_len);
    let n = b * s;
    if batch.p_max + s > max_keys() {
        return Err(super::ModelError::Batch(format!(
            "{} keys per row exceed the fused kernels' {}",
            batch.p_max + s,
            max_keys()
        )));
    }
    let ids = Tensor::from_slice(&batch.ids, n, device)?;
    let types = Tensor::from_slice(&batch.types, n, device)?;
    let positions = Tensor::from_slice(&batch.positions, n, device)?;
    let mask = Tensor::from_slice(&batch.mask, (b, batch.p_max + s), device)?;
    let e = &m.embeddings;
    let x = ops::embed_ln(
        &ids,
        &types,
        &positions,
        &e.word_embeddings,
        &e.token_type_embeddings,
        &e.position_embeddings,
        &e.layer_norm.weight,
        &e.layer_norm.bias,
        e.layer_norm.eps,
    )?;
    Ok((x, mask))
}

/// `[B, Hd]` pooled vectors (f32) of a batch already checked by `HostBatch::build`.
pub(crate) fn pooled(
    m: &PrefixedBert,
    rows: &[EncoderRow<'_>],
    batch: &HostBatch,
) -> Result<Vec<Vec<f32>>> {
    let c = m.config();
    let (b, s) = (batch.rows, batch.seq_len);
    let (mut x, mask) = embedded(m, batch)?;
    let prefixes = prefixes(m, rows, batch.p_max)?;
    let dims = AttnDims {
        batch: b,
        seq: s,
        heads: c.num_attention_heads,
        head_dim: c.head_dim(),
        p_max: batch.p_max,
    };
    let scale = 1.0 / (dims.head_dim as f64).sqrt();
    for (l, layer) in m.layers.iter().enumerate() {
        let att = &layer.attention;
        let qkv = x.matmul(&att.qkv.weight_t)?;
        let ctx = ops::attention(&qkv, &att.qkv.bias, &prefixes, l, &dims, &mask, scale)?;
        let out = &layer.attention_output;
        x = ops::bias_residual_ln(
            &ctx.matmul(&out.dense.weight_t)?,
            &out.dense.bias,
            &x,
            &out.layer_norm.weight,
            &out.layer_norm.bias,
            out.layer_norm.eps,
        )?;
        let inter = x.matmul(&layer.intermediate.weight_t)?;
        let hidden = match layer.activation {
            Activation::GeluErf => ops::bias_gelu(inter, &layer.intermediate.bias)?,
            Activation::GeluTanh => inter.broadcast_add(&layer.intermediate.bias)?.gelu()?,
            Activation::Relu => inter.broadcast_add(&layer.intermediate.bias)?.relu()?,
        };
        let out = &layer.output;
        x = ops::bias_residual_ln(
            &hidden.matmul(&out.dense.weight_t)?,
            &out.dense.bias,
            &x,
            &out.layer_norm.weight,
            &out.layer_norm.bias,
            out.layer_norm.eps,
        )?;
    }
    let pooled = ops::pooler(&x, b, s, &m.pooler.weight_t, &m.pooler.bias)?;
    Ok(pooled.to_vec2::<f32>()?)
}
