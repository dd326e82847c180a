//! Training on the CPU path: the encoder's forward with dropout, keeping what its backward needs,
//! and that backward — to the prefix only. Every weight is frozen, so gradients flow *through*
//! the dense layers (`dX = dY · Wᵀ`) and never into them, and nothing below the first layer's
//! input is needed at all.
//!
//! Why by hand: candle's autograd ran this op by op, one thread for the elementwise work, keeping
//! every intermediate: 0.45× PyTorch's speed at 32 × 64 and 3.9 GB at 32 × 128 (issue 8). Here
//! it is the inference path's GEMM and per-(row, head) attention again, plus:
//! - groups of batch rows, as in inference (`HostBert::encode_by_rows`): rows meet only through
//!   the weights and in the prefix's gradient, so each group goes forward through every layer
//!   and later backward through them on one core, its padding dropped, with no waiting between
//!   steps; the groups' prefix gradients are summed at the end, in group order (deterministic);
//! - dropout masks are not stored: each is a counter-based hash of (seed, site, element), made
//!   again in the backward (`dropout.rs`);
//! - the last layer runs on [CLS] rows only, forward and backward (only they reach the pooler);
//! - what is kept per layer: the QKV projection, the attention probabilities, the feed-forward
//!   activation's derivative, and each LayerNorm's normalized rows and inverse deviations.
//!
//! Checked against candle's autograd of the same model (`tests/train_gradients.rs`).

mod dropout;
mod group;

pub(crate) use dropout::{factors as drop_factors, DropMask};

use super::batch::HostBatch;
use super::cpu::{CtxPtr, HostBert, ITEM_TOKENS};
use super::gemm::{gemm, Epilogue, PackedB};
use super::pool;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// The transposed weights the backward multiplies by (`dX = dY · Wᵀ`), packed like the
/// forward's; built once, when training first needs them.
pub(crate) struct Backward {
    pub layers: Vec<LayerBack>,
    pub pooler: PackedB,
    /// What one step's backward has finished with, for the next forward to fill again (a group
    /// of 128 tokens keeps ~14 MB over MiniLM's 6 layers): fresh from the allocator, that memory
    /// cost page faults on every step.
    pub spare: Mutex<Vec<GroupSaved>>,
}

impl Backward {
    fn take_spare(&self) -> GroupSaved {
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn recycle(&self, groups: Vec<GroupSaved>) {
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(groups);
    }
}

pub(crate) struct LayerBack {
    pub qkv: PackedB,
    pub attn_out: PackedB,
    pub inter: PackedB,
    pub out: PackedB,
}

/// A LayerNorm's output in normalized form, and each row's 1/σ.
#[derive(Default)]
struct LnSaved {
    xhat: Vec<f32>,
    inv: Vec<f32>,
}

/// What one layer's backward needs, for one group.
#[derive(Default)]
struct LayerSaved {
    /// The group's `[tokens, 3·Hd]` QKV projection.
    qkv: Vec<f32>,
    /// Per (row, head), from `probs_at`: softmax probabilities keys × queries, before dropout.
    probs: Vec<f32>,
    probs_at: Vec<usize>,
    ln1: LnSaved,
    /// The feed-forward activation's derivative at its input (the backward needs nothing else
    /// of it).
    gelu_grad: Vec<f32>,
    ln2: LnSaved,
}

/// Which batch rows a group holds, and where each one's tokens start once the padding is
/// dropped (`starts[k]` for its k-th row; `starts[rows]` = its token count).
#[derive(Default, Clone)]
struct Packing {
    rows: Range<usize>,
    starts: Vec<usize>,
}

impl Packing {
    fn tokens(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }
}

/// One group's part of a step: what its backward needs, then the prefix gradient it makes.
#[derive(Default)]
pub(crate) struct GroupSaved {
    pack: Packing,
    layers: Vec<LayerSaved>,
    d_prefix: Vec<f32>,
}

/// Everything the backward needs from one forward.
pub(crate) struct Saved {
    groups: Vec<GroupSaved>,
    pooled: Vec<f32>,
}

/// The shapes of one training batch.
#[derive(Clone, Copy)]
struct Shape {
    seq: usize,
    heads: usize,
    head_dim: usize,
    p: usize,
}

/// One step's fixed inputs, as the groups see them.
struct Step<'a> {
    host: &'a HostBert,
    back: &'a Backward,
    batch: &'a HostBatch,
    /// The trainable prefix, `[L, 2, H, P, D]`.
    prefix: &'a [f32],
    drop: DropMask,
    s: Shape,
}

impl<'a> Step<'a> {
    /// Layer `l`'s prefix keys (`kv` 0) or values (1) for one head: `[P, D]`.
    fn block(&self, l: usize, kv: usize, head: usize) -> &'a [f32] {
        let (h, p, d) = (self.s.heads, self.s.p, self.s.head_dim);
        &self.prefix[(((l * 2 + kv) * h + head) * p) * d..][..p * d]
    }
}

/// Splits a batch into groups of consecutive rows of about ITEM_TOKENS real tokens each (fewer
/// when that would leave a thread without one), for [`EncoderTrain`]'s forward and backward.
fn token_groups(lens: &[usize], seq: usize, threads: usize) -> Vec<Range<usize>> {
    let tokens = |len: usize| len.clamp(1, seq.max(1));
    let total: usize = lens.iter().map(|&l| tokens(l)).sum();
    let target = ITEM_TOKENS.min(total.div_ceil(threads.max(1))).max(1);
    let mut groups = Vec::new();
    let (mut start, mut acc) = (0, 0);
    for (r, &len) in lens.iter().enumerate() {
        acc += tokens(len);
        if acc >= target {
            groups.push(start..r + 1);
            (start, acc) = (r + 1, 0);
        }
    }
    if start < lens.len() {
        groups.push(start..lens.len());
    }
    groups
}

/// The whole training encoder as one candle op on the prefix `[L, 2, H, P, D]`: candle's autograd
/// sees prefix → pooled `[B, Hd]`, and its backward is [`EncoderTrain::backward`]. What the
/// forward keeps for the backward lives in the op, which the autograd graph holds until the
/// step's gradients are taken.
pub(crate) struct EncoderTrain {
    pub host: Arc<HostBert>,
    pub back: Arc<Backward>,
    pub batch: HostBatch,
    pub p: usize,
    pub drop: DropMask,
    pub saved: Mutex<Option<Saved>>,
}

impl EncoderTrain {
    fn step<'a>(&'a self, prefix: &'a [f32]) -> Step<'a> {
        let (hd, heads) = (self.host.hidden, self.host.heads);
        Step {
            host: &self.host,
            back: &self.back,
            batch: &self.batch,
            prefix,
            drop: self.drop,
            s: Shape {
                seq: self.batch.seq_len,
                heads,
                head_dim: hd / heads,
                p: self.p,
            },
        }
    }

    /// The training forward: `[B, Hd]` pooled vectors and what the backward needs.
    fn forward(&self, prefix: &[f32]) -> (Vec<f32>, Saved) {
        let step = self.step(prefix);
        let (b, hd) = (self.batch.rows, self.host.hidden);
        let threads = rayon::current_num_threads().max(1);
        let mut groups: Vec<GroupSaved> =
            token_groups(&self.batch.lens, self.batch.seq_len, threads)
                .into_iter()
                .map(|rows| {
                    let mut g = self.back.take_spare();
                    g.pack.rows = rows;
                    g
                })
                .collect();
        let mut cls = vec![0f32; b * hd];
        let (gp, cp) = (
            CtxPtr::new(groups.as_mut_ptr()),
            CtxPtr::new(cls.as_mut_ptr()),
        );
        pool::for_each(groups.len(), |i| {
            // SAFETY: item i owns group i and its rows of cls (the groups' rows are disjoint,
            // all below b).
            let g = unsafe { &mut *gp.at(i) };
            let rows = g.pack.rows.clone();
            let cls =
                unsafe { std::slice::from_raw_parts_mut(cp.at(rows.start * hd), rows.len() * hd) };
            step.forward_group(g, cls);
        });
        let mut pooled = Vec::new();
        self.host.pooler.forward(&cls, b, &mut pooled);
        for v in pooled.iter_mut() {
            *v = v.tanh();
        }
        (pooled.clone(), Saved { groups, pooled })
    }

    /// The gradient of the loss with respect to the prefix (`[L, 2, H, P, D]`), given its
    /// gradient with respect to the pooled vectors.
    fn backward(&self, prefix: &[f32], saved: Saved, d_pooled: &[f32]) -> Vec<f32> {
        let step = self.step(prefix);
        let b = self.batch.rows;
        let hd = self.host.hidden;
        // Pooler: pooled = tanh(z), z = cls · W + b.
        let dz: Vec<f32> = d_pooled
            .iter()
            .zip(&saved.pooled)
            .map(|(g, y)| g * (1.0 - y * y))
            .collect();
        let mut d_cls = Vec::new();
        gemm(&dz, b, &self.back.pooler, &mut d_cls, Epilogue::None);
        let mut groups = saved.groups;
        let gp = CtxPtr::new(groups.as_mut_ptr());
        pool::for_each(groups.len(), |i| {
            // SAFETY: item i owns group i.
            let g = unsafe { &mut *gp.at(i) };
            let rows = g.pack.rows.clone();
            step.backward_group(g, &d_cls[rows.start * hd..rows.end * hd]);
        });
        // Every group's share, in group order, so that a seed fixes the result.
        let mut d_prefix = std::mem::take(&mut groups[0].d_prefix);
        for g in &groups[1..] {
            for (x, y) in d_prefix.iter_mut().zip(&g.d_prefix) {
                *x += y;
            }
        }
        self.back.recycle(groups);
        d_prefix
    }
}

impl candle_core::CustomOp1 for EncoderTrain {
    fn name(&self) -> &'static str {
        "prefixd-encoder-train"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("encoder-train: the prefix must be f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("encoder-train: the prefix must be contiguous");
        };
        if self.batch.rows == 0 {
            candle_core::bail!("encoder-train: an empty batch");
        }
        let (pooled, saved) = self.forward(&data[start..end]);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((
            candle_core::CpuStorage::F32(pooled),
            (self.batch.rows, self.host.hidden).into(),
        ))
    }

    fn bwd(
        &self,
        arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("encoder-train: backward ran twice for one forward");
        };
        let prefix: Vec<f32> = arg.flatten_all()?.to_vec1()?;
        let d_pooled: Vec<f32> = grad_res.flatten_all()?.to_vec1()?;
        let d = self.backward(&prefix, saved, &d_pooled);
        Ok(Some(candle_core::Tensor::from_vec(
            d,
            arg.shape(),
            arg.device(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::token_groups;

    #[test]
    fn groups_cover_every_row_once_and_give_each_thread_work() {
        // Full 64-token rows: two rows (128 tokens) a group.
        let g = token_groups(&[64; 32], 64, 2);
        assert_eq!(g.len(), 16);
        assert!(g.iter().all(|r| r.len() == 2));
        // A small batch still makes a group per thread at least.
        let lens = [9, 3, 14, 1, 6];
        let g = token_groups(&lens, 14, 2);
        assert_eq!(g, vec![0..3, 3..5]);
        // One row per group when rows are long; an empty row counts as one token.
        assert_eq!(token_groups(&[200, 0, 200], 256, 2), vec![0..1, 1..3]);
        for threads in 1..4 {
            let g = token_groups(&lens, 14, threads);
            let covered: Vec<usize> = g.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(covered, (0..lens.len()).collect::<Vec<_>>());
        }
    }
}
