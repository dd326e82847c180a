//! Turning rows of (tokens, prefix) into the padded tensors one forward pass consumes.
//!
//! Everything is assembled in plain host memory and uploaded once: a batch of 32 rows becomes six
//! tensors, not hundreds of small tensor ops. The token side ([`TokenBatch`]) is shared with
//! training; the prefix side differs (gathered per row here, a trainable tensor there).

use candle_core::{Device, Tensor};

use super::{ModelError, PrefixKv, Result};

/// One row of a forward pass: a tokenized input and the prefix of the task it belongs to.
#[derive(Clone, Copy)]
pub struct EncoderRow<'a> {
    pub input_ids: &'a [u32],
    pub type_ids: &'a [u32],
    pub prefix: &'a PrefixKv,
}

/// The padded token side of a batch in host memory. `S` is the longest row, `Pmax` the longest
/// prefix.
pub(crate) struct HostBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub p_max: usize,
    /// `[B·S]`.
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub positions: Vec<u32>,
    /// `[B, Pmax + S]` additive key mask: 0 where attended, −∞ for padded prefix slots and
    /// padded tokens.
    pub mask: Vec<f32>,
    /// Each row's real tokens (the rest of its S slots is padding).
    pub lens: Vec<usize>,
}

/// The same, as tensors for the candle path.
pub(crate) struct TokenBatch {
    pub rows: usize,
    pub seq_len: usize,
    /// `[B·S]` u32, flattened so embeddings are one gather each.
    pub input_ids: Tensor,
    pub type_ids: Tensor,
    pub position_ids: Tensor,
    /// `[B, 1, 1, Pmax + S]` additive key mask: 0 where attended, −∞ for padded prefix slots
    /// and padded tokens.
    pub key_mask: Tensor,
}

/// The shape facts batch building checks rows against.
pub(crate) struct Dims {
    pub max_positions: usize,
    /// Rows of the word and token-type embedding tables: ids at or past them are refused (a
    /// mismatched tokenizer would otherwise index past the table).
    pub vocab: usize,
    pub type_vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl TokenBatch {
    pub fn new(h: &HostBatch, device: &Device) -> Result<Self> {
        let (b, s) = (h.rows, h.seq_len);
        Ok(Self {
            rows: b,
            seq_len: s,
            input_ids: Tensor::from_slice(&h.ids, b * s, device)?,
            type_ids: Tensor::from_slice(&h.types, b * s, device)?,
            position_ids: Tensor::from_slice(&h.positions, b * s, device)?,
            key_mask: Tensor::from_slice(&h.mask, (b, 1, 1, h.p_max + s), device)?,
        })
    }
}

impl HostBatch {
    /// `rows`: (token ids, type ids, the row's prefix length P).
    pub fn build(rows: &[(&[u32], &[u32], usize)], dims: &Dims) -> Result<Self> {
        if rows.is_empty() {
            return Err(ModelError::Batch("a batch needs at least one row".into()));
        }
        let b = rows.len();
        let s = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let p_max = rows.iter().map(|r| r.2).max().unwrap_or(0);
        let max_positions = dims.max_positions;
        for (i, &(ids, types, p)) in rows.iter().enumerate() {
            let n = ids.len();
            if n == 0 || types.len() != n {
                return Err(ModelError::Batch(format!(
                    "row {i}: {n} token ids and {} type ids (need the same, at least one)",
                    types.len()
                )));
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= dims.vocab) {
                return Err(ModelError::Batch(format!(
                    "row {i}: token id {bad} is outside the model's vocabulary of {} (is the tokenizer the model's own?)",
                    dims.vocab
                )));
            }
            if let Some(bad) = types.iter().find(|&&t| t as usize >= dims.type_vocab) {
                return Err(ModelError::Batch(format!(
                    "row {i}: token type {bad} is outside the model's {} types",
                    dims.type_vocab
                )));
            }
            // Positions start at P: the row's last token sits at P + n − 1.
            if p + n > max_positions {
                return Err(ModelError::Batch(format!(
                    "row {i}: {n} tokens after a prefix of {p} exceed the model's {max_positions} positions"
                )));
            }
        }
        let mut ids = vec![0u32; b * s];
        let mut types = vec![0u32; b * s];
        let mut positions = vec![0u32; b * s];
        let t = p_max + s;
        let mut mask = vec![f32::NEG_INFINITY; b * t];
        for (i, &(row_ids, row_types, p)) in rows.iter().enumerate() {
            let n = row_ids.len();
            ids[i * s..i * s + n].copy_from_slice(row_ids);
            types[i * s..i * s + n].copy_from_slice(row_types);
            for (j, pos) in positions[i * s..(i + 1) * s].iter_mut().enumerate() {
                // Padding slots are masked out, but still need an in-range embedding index.
                *pos = (p + j).min(max_positions - 1) as u32;
            }
            // Prefixes are right-aligned in the Pmax slots: [pad … pad | prefix | tokens | pad …].
            mask[i * t + p_max - p..i * t + p_max + n].fill(0.0);
        }
        Ok(Self {
            rows: b,
            seq_len: s,
            p_max,
            ids,
            types,
            positions,
            mask,
            lens: rows.iter().map(|r| r.0.len()).collect(),
        })
    }
}

/// Every row's prefix must be shaped for this model.
pub(crate) fn gather_check(rows: &[EncoderRow<'_>], dims: &Dims) -> Result<()> {
    let (layers, heads, head_dim) = (dims.layers, dims.heads, dims.head_dim);
    for (i, r) in rows.iter().enumerate() {
        if (r.prefix.layers(), r.prefix.heads(), r.prefix.head_dim()) != (layers, heads, head_dim) {
            return Err(ModelError::Batch(format!(
                "row {i}: prefix shaped for {} layers × {} heads × {} dims, model has {layers} × {heads} × {head_dim}",
                r.prefix.layers(),
                r.prefix.heads(),
                r.prefix.head_dim()
            )));
        }
    }
    Ok(())
}

/// Every row's prefix keys/values, right-aligned in `Pmax` slots (the mask hides the rest):
/// `[L, 2, B, H, Pmax, D]`, so layer `l` is one contiguous `[2, B, H, Pmax, D]` block.
pub(crate) fn gather_prefixes(rows: &[EncoderRow<'_>], dims: &Dims) -> Result<Vec<f32>> {
    gather_check(rows, dims)?;
    let (layers, heads, head_dim) = (dims.layers, dims.heads, dims.head_dim);
    let b = rows.len();
    let p_max = rows
        .iter()
        .map(|r| r.prefix.num_virtual_tokens())
        .max()
        .unwrap_or(0);
    let block = p_max * head_dim;
    let mut kv = vec![0f32; layers * 2 * b * heads * block];
    for l in 0..layers {
        for k in 0..2 {
            for (i, r) in rows.iter().enumerate() {
                let off = (p_max - r.prefix.num_virtual_tokens()) * head_dim;
                for h in 0..heads {
                    let dst = (((l * 2 + k) * b + i) * heads + h) * block;
                    kv[dst + off..dst + block].copy_from_slice(r.prefix.block(l, k, h));
                }
            }
        }
    }
    Ok(kv)
}
