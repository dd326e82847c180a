//! A task's prefix keys and values, laid out once at load in the order attention consumes them.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

/// Per-layer prefix keys and values of one task, stored as one flat `[L, 2, H, P, D]` array
/// (layer, key/value, head, virtual token, head dim).
///
/// PEFT stores the prefix as `[P, L·2·Hd]` with columns `[K_0 | V_0 | … ]`. Attention wants, per
/// layer, `[H, P, D]` blocks it can copy next to the batch's own keys, so the permutation is done
/// here, once, rather than on every forward pass. The data is behind an `Arc` so that queued rows
/// can hold the exact prefix they were admitted with at no cost.
#[derive(Clone, Debug)]
pub struct PrefixKv {
    num_virtual_tokens: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    data: Arc<[f32]>,
    /// The same prefix on the model's GPU, uploaded at its first batch and freed with the last
    /// clone of this prefix.
    on_device: Arc<OnceLock<Tensor>>,
}

impl PrefixKv {
    /// Lays out PEFT's `prompt_embeddings` (`[P, L·2·Hd]`, row-major) for attention.
    /// The caller has checked the shape; this only permutes.
    pub fn from_peft_layout(
        prompt_embeddings: &[f32],
        num_virtual_tokens: usize,
        layers: usize,
        heads: usize,
        head_dim: usize,
    ) -> Self {
        let (p, h, d) = (num_virtual_tokens, heads, head_dim);
        let hidden = h * d;
        let row_width = layers * 2 * hidden;
        assert_eq!(
            prompt_embeddings.len(),
            p * row_width,
            "prefix shape checked by caller"
        );
        // Written once, in destination order, straight into the shared allocation: no zeroing
        // pass and no Vec-to-Arc copy (at 10,000 tasks those two were most of the load time).
        let mut data = Arc::<[f32]>::new_uninit_slice(prompt_embeddings.len());
        let out = Arc::get_mut(&mut data).expect("a new Arc is unique");
        let mut at = 0;
        for l in 0..layers {
            for kv in 0..2 {
                for head in 0..h {
                    for t in 0..p {
                        let src = t * row_width + (2 * l + kv) * hidden + head * d;
                        for (o, &x) in out[at..at + d]
                            .iter_mut()
                            .zip(&prompt_embeddings[src..src + d])
                        {
                            o.write(x);
                        }
                        at += d;
                    }
                }
            }
        }
        assert_eq!(at, out.len());
        // SAFETY: the loops above wrote every element exactly once (`at` covered the slice).
        let data = unsafe { data.assume_init() };
        Self {
            num_virtual_tokens: p,
            layers,
            heads: h,
            head_dim: d,
            data,
            on_device: Arc::new(OnceLock::new()),
        }
    }

    /// The inverse of [`PrefixKv::from_peft_layout`]: PEFT's `[P, L·2·Hd]` row-major layout.
    pub fn to_peft_layout(&self) -> Vec<f32> {
        let (p, h, d) = (self.num_virtual_tokens, self.heads, self.head_dim);
        let hidden = h * d;
        let row_width = self.layers * 2 * hidden;
        let mut out = vec![0f32; self.data.len()];
        for l in 0..self.layers {
            for kv in 0..2 {
                for head in 0..h {
                    for t in 0..p {
                        let dst = t * row_width + (2 * l + kv) * hidden + head * d;
                        let src = (((l * 2 + kv) * h + head) * p + t) * d;
                        out[dst..dst + d].copy_from_slice(&self.data[src..src + d]);
                    }
                }
            }
        }
        out
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Identifies the prefix data: clones share it, a reloaded task gets a new one.
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.data) as *const f32 as usize
    }

    /// The prefix as a `[L, 2, H, P, D]` tensor on `device` in `dtype`. On a GPU it is uploaded
    /// once and kept; on the CPU (the composed path, used by tests) it is built each time.
    pub(crate) fn tensor_on(&self, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
        if let Some(t) = self.on_device.get() {
            if t.dtype() == dtype && t.device().same_device(device) {
                return Ok(t.clone());
            }
        }
        let shape = (
            self.layers,
            2,
            self.heads,
            self.num_virtual_tokens,
            self.head_dim,
        );
        let t = Tensor::from_slice(&self.data, shape, device)?.to_dtype(dtype)?;
        if !device.is_cpu() {
            let _ = self.on_device.set(t.clone());
        }
        Ok(t)
    }

    /// The `[P, D]` block of one layer, key (`kv = 0`) or value (`kv = 1`), and head.
    pub(crate) fn block(&self, layer: usize, kv: usize, head: usize) -> &[f32] {
        let len = self.num_virtual_tokens * self.head_dim;
        let start = ((layer * 2 + kv) * self.heads + head) * len;
        &self.data[start..start + len]
    }
}
