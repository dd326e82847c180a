//! Training on the CPU path: the encoder's forward with dropout, keeping what its backward needs,
//! and that backward — to the prefix only. Every weight is frozen, so gradients flow *through*
//! the dense layers (`dX = dY · Wᵀ`) and never into them, and nothing below the first layer's
//! input is needed at all.
//!
//! Why by hand: candle's autograd ran this op by op, one thread for the elementwise work, keeping
//! every intermediate: 0.45× PyTorch's speed at 32 × 64 and 3.9 GB at 32 × 128 (issue 8). Here
//! it is the inference path's GEMM, pool and per-(row, head) attention again, plus:
//! - dropout masks are not stored: each is a counter-based hash of (seed, site, element), made
//!   again in the backward;
//! - the last layer runs on [CLS] rows only, forward and backward (only they reach the pooler);
//! - what is kept per layer: the QKV projection, the attention probabilities, the feed-forward's
//!   pre-activation, and each LayerNorm's normalized rows and inverse deviations.
//!
//! Checked against candle's autograd of the same model (`tests/train.rs`).

use super::batch::HostBatch;
use super::cpu::{scores_ld, softmax_cols, CtxPtr, HostBert, LANES};
use super::gemm::{gemm, gemm_strided, gemm_strided_t, Epilogue, PackedB};
use super::kernels::gelu_map;
use super::pool;

/// Dropout as a pure function of (seed, site, element): the same mask in the backward as in the
/// forward, with nothing stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropMask {
    /// Probability of dropping.
    pub p: f32,
    pub seed: u32,
}

#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

impl DropMask {
    fn site(&self, site: u32) -> Site {
        Site {
            key: hash32(self.seed ^ site.wrapping_mul(0x9e37_79b9)),
            // Keep an element when its 24-bit uniform is at least p·2²⁴.
            threshold: (self.p.clamp(0.0, 1.0) * (1u32 << 24) as f32) as u32,
            scale: if self.p > 0.0 {
                1.0 / (1.0 - self.p)
            } else {
                1.0
            },
            on: self.p > 0.0,
        }
    }
}

/// One dropout site (the embeddings, or a layer's attention, attention output or FFN output).
#[derive(Clone, Copy)]
struct Site {
    key: u32,
    threshold: u32,
    scale: f32,
    on: bool,
}

impl Site {
    /// The factor element `idx` is multiplied by: 0 or 1/(1 − p).
    #[inline(always)]
    fn factor(&self, idx: u32) -> f32 {
        if !self.on {
            return 1.0;
        }
        if hash32(idx ^ self.key) >> 8 >= self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// `x[i] *= factor(first + i)`.
    fn apply(&self, x: &mut [f32], first: u32) {
        if self.on {
            drop_apply(*self, x, first);
        }
    }
}

dispatch! {
    fn drop_apply(site: Site, x: &mut [f32], first: u32) {
        for (i, v) in x.iter_mut().enumerate() {
            *v *= site.factor(first.wrapping_add(i as u32));
        }
    }
}

dispatch! {
    /// Dropout of probabilities kept keys × queries (`rows` keys × `ld`, the first `cols` queries):
    /// element (key j, query c) gets `factor(first + c·stride + j)`, the index it has in the
    /// queries × keys numbering, so the masks are those of [`Site::apply`] over query rows.
    fn drop_apply_cols(site: Site, x: &mut [f32], rows: usize, ld: usize, cols: usize, first: u32, stride: u32) {
        for j in 0..rows {
            for (c, v) in x[j * ld..j * ld + cols].iter_mut().enumerate() {
                *v *= site.factor(first.wrapping_add((c as u32).wrapping_mul(stride)).wrapping_add(j as u32));
            }
        }
    }
}

dispatch! {
    /// Attention's backward through dropout and softmax, probabilities kept keys × queries (`t`
    /// rows × `ld`; `cols` queries, `ld` a multiple of LANES): with `m` the dropout factors, per
    /// query column `pd = p ⊙ m` (the dropped probabilities, for dV) and
    /// `d ← scale · p ⊙ (d ⊙ m − Σ d⊙m⊙p)` (the scores' gradient), the sum running down the
    /// column, LANES queries a vector — no reduction across lanes. The padding columns up to the
    /// next LANES are computed and ignored.
    fn probs_back_cols(
        site: Site,
        first: u32,
        stride: u32,
        p: &[f32],
        d: &mut [f32],
        pd: &mut [f32],
        t: usize,
        ld: usize,
        cols: usize,
        scale: f32
    ) {
        for c0 in (0..cols).step_by(LANES) {
            let mut dot = [0f32; LANES];
            for j in 0..t {
                let o = j * ld + c0;
                let (p, d, pd) = (&p[o..o + LANES], &mut d[o..o + LANES], &mut pd[o..o + LANES]);
                for l in 0..LANES {
                    let idx = ((c0 + l) as u32).wrapping_mul(stride).wrapping_add(j as u32);
                    let f = site.factor(first.wrapping_add(idx));
                    pd[l] = p[l] * f;
                    d[l] *= f;
                    dot[l] += p[l] * d[l];
                }
            }
            for j in 0..t {
                let o = j * ld + c0;
                let (p, d) = (&p[o..o + LANES], &mut d[o..o + LANES]);
                for l in 0..LANES {
                    d[l] = p[l] * (d[l] - dot[l]) * scale;
                }
            }
        }
    }
}

const SITES_PER_LAYER: u32 = 3;

fn site_of(layer: usize, which: u32) -> u32 {
    1 + layer as u32 * SITES_PER_LAYER + which
}

/// The transposed weights the backward multiplies by (`dX = dY · Wᵀ`), packed like the
/// forward's; built once, when training first needs them.
pub(crate) struct Backward {
    pub layers: Vec<LayerBack>,
    pub pooler: PackedB,
    /// What one step's backward has finished with, for the next forward to fill again: ~30 MB
    /// per layer at 32 × 64, which fresh from the allocator cost page faults on every step.
    pub spare: std::sync::Mutex<Vec<LayerSaved>>,
}

impl Backward {
    fn take_spare(&self) -> LayerSaved {
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn recycle(&self, saved: LayerSaved) {
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(saved);
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

/// What one layer's backward needs.
#[derive(Default)]
pub(crate) struct LayerSaved {
    /// Rows the layer's post-attention half ran on: all B·S, or the B [CLS] rows (last layer).
    rows: usize,
    qkv: Vec<f32>,
    /// Per (row, head): softmax probabilities `[queries, P + n]`, before dropout.
    probs: Vec<Vec<f32>>,
    ln1: LnSaved,
    h_pre: Vec<f32>,
    ln2: LnSaved,
}

/// Everything the backward needs from one forward.
pub(crate) struct Saved {
    layers: Vec<LayerSaved>,
    pooled: Vec<f32>,
}

dispatch! {
    /// `x = LayerNorm(x + add)` for one row, also writing x̂ and returning 1/σ.
    fn norm_row_saving(x: &mut [f32], add: &[f32], g: &[f32], b: &[f32], eps: f32, xhat: &mut [f32]) -> f32 {
        let n = x.len();
        for (x, a) in x.iter_mut().zip(add) {
            *x += a;
        }
        let mean = x.iter().sum::<f32>() / n as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((x, h), g), b) in x.iter_mut().zip(xhat.iter_mut()).zip(g).zip(b) {
            *h = (*x - mean) * inv;
            *x = *h * g + b;
        }
        inv
    }
}

dispatch! {
    /// One row of LayerNorm's backward: `dx = inv · (gγ − mean(gγ) − x̂ · mean(gγ · x̂))`, with
    /// `dy` (the gradient of the output) replaced by dx.
    fn norm_back_row(dy: &mut [f32], xhat: &[f32], gamma: &[f32], inv: f32) {
        let n = dy.len() as f32;
        let (mut m1, mut m2) = (0f32, 0f32);
        for ((d, h), g) in dy.iter().zip(xhat).zip(gamma) {
            let gg = d * g;
            m1 += gg;
            m2 += gg * h;
        }
        let (m1, m2) = (m1 / n, m2 / n);
        for ((d, h), g) in dy.iter_mut().zip(xhat).zip(gamma) {
            *d = inv * (*d * g - m1 - h * m2);
        }
    }
}

fn gelu_slice(src: &[f32], dst: &mut [f32]) {
    gelu_map(src, dst, false);
}

/// `d *= gelu'(pre)`.
fn gelu_back_slice(d: &mut [f32], pre: &[f32]) {
    gelu_map(pre, d, true);
}

/// Runs `f` over `rows` rows of `width` in chunks on the pool; `f(first_row, rows_chunk)`.
fn rows_parallel(x: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    const CHUNK: usize = 16;
    let rows = x.len() / width.max(1);
    let xp = CtxPtr::new(x.as_mut_ptr());
    pool::for_each(rows.div_ceil(CHUNK), |c| {
        let (r0, r1) = (c * CHUNK, ((c + 1) * CHUNK).min(rows));
        // SAFETY: chunk c owns rows r0..r1 of x.
        let chunk = unsafe { std::slice::from_raw_parts_mut(xp.at(r0 * width), (r1 - r0) * width) };
        f(r0, chunk);
    });
}

/// `x = LayerNorm(x + add)` on the pool, saving x̂ and 1/σ.
fn norm_saving(norm: &super::cpu::Norm, x: &mut [f32], add: &[f32], saved: &mut LnSaved) {
    let n = norm.g.len();
    let rows = x.len() / n;
    saved.xhat.resize(x.len(), 0.0);
    saved.inv.resize(rows, 0.0);
    let (hp, ip) = (
        CtxPtr::new(saved.xhat.as_mut_ptr()),
        CtxPtr::new(saved.inv.as_mut_ptr()),
    );
    rows_parallel(x, n, |r0, chunk| {
        for (i, row) in chunk.chunks_exact_mut(n).enumerate() {
            let r = r0 + i;
            // SAFETY: row r of xhat and inv belong to this chunk alone.
            let xhat = unsafe { std::slice::from_raw_parts_mut(hp.at(r * n), n) };
            let inv = norm_row_saving(
                row,
                &add[r * n..(r + 1) * n],
                &norm.g,
                &norm.b,
                norm.eps,
                xhat,
            );
            unsafe { *ip.at(r) = inv };
        }
    });
}

fn norm_backward(dy: &mut [f32], saved: &LnSaved, gamma: &[f32]) {
    let n = gamma.len();
    rows_parallel(dy, n, |r0, chunk| {
        for (i, row) in chunk.chunks_exact_mut(n).enumerate() {
            let r = r0 + i;
            norm_back_row(row, &saved.xhat[r * n..(r + 1) * n], gamma, saved.inv[r]);
        }
    });
}

/// The shapes of one training batch.
#[derive(Clone, Copy)]
struct Shape {
    seq: usize,
    heads: usize,
    head_dim: usize,
    p: usize,
}

/// Reusable per-thread buffers of the attention backward.
#[derive(Default)]
struct AttnScratch {
    b1: Option<PackedB>,
    b2: Option<PackedB>,
    a: Vec<f32>,
    d: Vec<f32>,
    c1: Vec<f32>,
    c2: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<AttnScratch> = std::cell::RefCell::new(AttnScratch::default());
}

/// Key or value `j` of one (row, head): the prefix's first, then the row's tokens.
#[inline(always)]
fn kv_row<'a>(
    prefix_block: &'a [f32],
    qkv_row0: &'a [f32],
    j: usize,
    p: usize,
    part: usize,
    s: &Shape,
    head: usize,
) -> &'a [f32] {
    let (d, hd) = (s.head_dim, s.heads * s.head_dim);
    if j < p {
        &prefix_block[j * d..(j + 1) * d]
    } else {
        &qkv_row0[(j - p) * 3 * hd + part * hd + head * d..][..d]
    }
}

impl HostBert {
    /// The training forward: `[B, Hd]` pooled vectors and what the backward needs. `prefix` is
    /// the trainable prefix as `[L, 2, H, P, D]`.
    pub(crate) fn train_forward(
        &self,
        back: &Backward,
        batch: &HostBatch,
        prefix: &[f32],
        p: usize,
        drop: DropMask,
    ) -> (Vec<f32>, Saved) {
        let (b, sl, hd) = (batch.rows, batch.seq_len, self.hidden);
        let (h, d) = (self.heads, hd / self.heads);
        let n = b * sl;
        let s = Shape {
            seq: sl,
            heads: h,
            head_dim: d,
            p,
        };
        let block = |l: usize, kv: usize, head: usize| {
            &prefix[(((l * 2 + kv) * h + head) * p) * d..][..p * d]
        };
        let mut x = vec![0f32; n * hd];
        for (r, row) in x.chunks_exact_mut(hd).enumerate() {
            let (w, t, q) = (
                batch.ids[r] as usize,
                batch.types[r] as usize,
                batch.positions[r] as usize,
            );
            for i in 0..hd {
                row[i] = (self.word[w * hd + i] + self.token_type[t * hd + i])
                    + self.position[q * hd + i];
            }
        }
        self.emb_norm.residual(&mut x, &[]);
        drop.site(0).apply(&mut x, 0);
        let last = self.layers.len() - 1;
        let mut saved = Vec::with_capacity(self.layers.len());
        let (mut ctx, mut a, mut h_act, mut o) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let mut ls = back.take_spare();
            ls.rows = if l == last { b } else { n };
            let rows = ls.rows;
            layer.qkv.forward(&x, n, &mut ls.qkv);
            // Attention: per (row, head), probabilities kept, dropout applied to a copy.
            ls.probs.resize_with(b * h, Vec::new);
            ctx.clear();
            ctx.resize(rows * hd, 0.0);
            let site = drop.site(site_of(l, 0));
            let (probs_ptr, ctx_ptr) = (
                ProbsPtr(ls.probs.as_mut_ptr()),
                CtxPtr::new(ctx.as_mut_ptr()),
            );
            let qkv = &ls.qkv;
            pool::for_each(b * h, |item| {
                let (row, head) = (item / h, item % h);
                let len = batch.lens[row];
                let t = p + len;
                let queries = if l == last { len.min(1) } else { len };
                let out_row = if l == last { row } else { row * sl };
                let q0 = &qkv[row * sl * 3 * hd..];
                SCRATCH.with(|sc| {
                    let mut sc = sc.borrow_mut();
                    let sc = &mut *sc;
                    // As inference's attention: probabilities kept keys × queries, Pᵀ =
                    // [Kp; K]·Qᵀ with the keys read in place and only the queries transposed,
                    // the softmax down columns (see `cpu::attention`).
                    let qt = sc.b1.get_or_insert_with(PackedB::empty);
                    qt.repack_transposed(d, queries, |qi| &q0[qi * 3 * hd + head * d..][..d]);
                    let ld = scores_ld(queries);
                    // SAFETY: item (row, head) owns its probs entry.
                    let probs = unsafe { &mut *probs_ptr.at(item) };
                    probs.resize(t * ld, 0.0);
                    let (by_prefix, by_token) = probs.split_at_mut(p * ld);
                    gemm_strided(block(l, 0, head), d, p, qt, by_prefix, ld);
                    gemm_strided(&q0[hd + head * d..], 3 * hd, len, qt, by_token, ld);
                    softmax_cols(probs, t, ld, queries, 1.0 / (d as f32).sqrt());
                    // Dropped copy for the values.
                    sc.a.clear();
                    sc.a.extend_from_slice(probs);
                    if site.on {
                        let first = prob_index(row, head, 0, 0, &s);
                        drop_apply_cols(site, &mut sc.a, t, ld, queries, first, p_max_t(&s) as u32);
                    }
                    let values = sc.b2.get_or_insert_with(PackedB::empty);
                    values.repack(t, d, |j| kv_row(block(l, 1, head), q0, j, p, 2, &s, head));
                    // SAFETY: rows out_row.., columns head·D.. of ctx belong to this item.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            ctx_ptr.at(out_row * hd + head * d),
                            (queries.max(1) - 1) * hd + d,
                        )
                    };
                    gemm_strided_t(&sc.a, ld, queries, values, dst, hd);
                });
            });
            // Output dense, dropout, residual, LayerNorm.
            let resid: Vec<f32> = if l == last {
                (0..b)
                    .flat_map(|i| x[i * sl * hd..(i * sl + 1) * hd].iter().copied())
                    .collect()
            } else {
                std::mem::take(&mut x)
            };
            layer.attn_out.forward(&ctx, rows, &mut a);
            drop.site(site_of(l, 1)).apply(&mut a, 0);
            norm_saving(&layer.attn_norm, &mut a, &resid, &mut ls.ln1);
            let x_mid = std::mem::take(&mut a);
            // Feed-forward.
            layer.inter.forward(&x_mid, rows, &mut ls.h_pre);
            h_act.resize(ls.h_pre.len(), 0.0);
            let width = ls.h_pre.len() / rows.max(1);
            let src = &ls.h_pre;
            rows_parallel(&mut h_act, width, |r0, chunk| {
                gelu_slice(&src[r0 * width..r0 * width + chunk.len()], chunk)
            });
            layer.out.forward(&h_act, rows, &mut o);
            drop.site(site_of(l, 2)).apply(&mut o, 0);
            norm_saving(&layer.out_norm, &mut o, &x_mid, &mut ls.ln2);
            x = std::mem::take(&mut o);
            a = x_mid;
            saved.push(ls);
        }
        let mut pooled = Vec::new();
        self.pooler.forward(&x, b, &mut pooled);
        for v in pooled.iter_mut() {
            *v = v.tanh();
        }
        (
            pooled.clone(),
            Saved {
                layers: saved,
                pooled,
            },
        )
    }

    /// The gradient of the loss with respect to the prefix (`[L, 2, H, P, D]`), given its
    /// gradient with respect to the pooled vectors.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn train_backward(
        &self,
        back: &Backward,
        batch: &HostBatch,
        prefix: &[f32],
        p: usize,
        drop: DropMask,
        saved: Saved,
        d_pooled: &[f32],
    ) -> Vec<f32> {
        let (b, sl, hd) = (batch.rows, batch.seq_len, self.hidden);
        let (h, d) = (self.heads, hd / self.heads);
        let n = b * sl;
        let s = Shape {
            seq: sl,
            heads: h,
            head_dim: d,
            p,
        };
        let nl = self.layers.len();
        let last = nl - 1;
        let block = |l: usize, kv: usize, head: usize| {
            &prefix[(((l * 2 + kv) * h + head) * p) * d..][..p * d]
        };
        let mut d_prefix = vec![0f32; nl * 2 * h * p * d];
        // Pooler: pooled = tanh(z), z = cls · W + b.
        let dz: Vec<f32> = d_pooled
            .iter()
            .zip(&saved.pooled)
            .map(|(g, y)| g * (1.0 - y * y))
            .collect();
        let mut dx = Vec::new();
        gemm(&dz, b, &back.pooler, &mut dx, Epilogue::None);
        let (mut dh, mut tmp, mut d_ctx, mut d_qkv) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (l, ls) in saved.layers.into_iter().enumerate().rev() {
            let layer = &self.layers[l];
            let lb = &back.layers[l];
            let rows = ls.rows;
            // Output LayerNorm; the residual's gradient is what comes out of it.
            norm_backward(&mut dx, &ls.ln2, &layer.out_norm.g);
            let mut d_mid = dx.clone();
            drop.site(site_of(l, 2)).apply(&mut dx, 0);
            gemm(&dx, rows, &lb.out, &mut dh, Epilogue::None);
            let width = dh.len() / rows.max(1);
            let pre = &ls.h_pre;
            rows_parallel(&mut dh, width, |r0, chunk| {
                gelu_back_slice(chunk, &pre[r0 * width..r0 * width + chunk.len()])
            });
            gemm(&dh, rows, &lb.inter, &mut tmp, Epilogue::None);
            for (a, t) in d_mid.iter_mut().zip(&tmp) {
                *a += t;
            }
            // Attention output LayerNorm, dropout, dense.
            norm_backward(&mut d_mid, &ls.ln1, &layer.attn_norm.g);
            let resid = d_mid.clone();
            drop.site(site_of(l, 1)).apply(&mut d_mid, 0);
            gemm(&d_mid, rows, &lb.attn_out, &mut d_ctx, Epilogue::None);
            // Attention, per (row, head).
            // The items below write every real row's query, key and value columns (the last
            // layer: only each row's first query); zero just what they leave, not 9 MB per layer.
            d_qkv.resize(n * 3 * hd, 0.0);
            for (row, &len) in batch.lens.iter().enumerate() {
                let rows =
                    d_qkv[row * sl * 3 * hd..(row + 1) * sl * 3 * hd].chunks_exact_mut(3 * hd);
                for (j, r) in rows.enumerate() {
                    if j >= len {
                        r.fill(0.0);
                    } else if l == last && j >= 1 {
                        r[..hd].fill(0.0);
                    }
                }
            }
            let mut d_prefix_items = vec![0f32; b * h * 2 * p * d];
            let site = drop.site(site_of(l, 0));
            let (dq_ptr, dp_ptr) = (
                CtxPtr::new(d_qkv.as_mut_ptr()),
                CtxPtr::new(d_prefix_items.as_mut_ptr()),
            );
            let (qkv, probs, d_ctx_ref) = (&ls.qkv, &ls.probs, &d_ctx);
            let scale = 1.0 / (d as f32).sqrt();
            pool::for_each(b * h, |item| {
                let (row, head) = (item / h, item % h);
                let len = batch.lens[row];
                let t = p + len;
                let queries = if l == last { len.min(1) } else { len };
                if queries == 0 {
                    return;
                }
                let in_row = if l == last { row } else { row * sl };
                let q0 = &qkv[row * sl * 3 * hd..];
                let pr = &probs[item];
                let dctx = &d_ctx_ref[in_row * hd + head * d..];
                SCRATCH.with(|sc| {
                    let mut sc = sc.borrow_mut();
                    let sc = &mut *sc;
                    // Keys × queries throughout, as the forward kept P: dP_dropᵀ = [Vp; V]·dctxᵀ
                    // (values read in place, dctx transposed) [t, ld].
                    let ld = scores_ld(queries);
                    let dct = sc.b1.get_or_insert_with(PackedB::empty);
                    dct.repack_transposed(d, queries, |qi| &dctx[qi * hd..qi * hd + d]);
                    sc.d.clear();
                    sc.d.resize(t * ld, 0.0);
                    let (by_prefix, by_token) = sc.d.split_at_mut(p * ld);
                    gemm_strided(block(l, 1, head), d, p, dct, by_prefix, ld);
                    gemm_strided(&q0[2 * hd + head * d..], 3 * hd, len, dct, by_token, ld);
                    // P_dropᵀ (for dV), then dSᵀ = P ⊙ (dP − Σ dP·P), dP = dP_drop ⊙ mask.
                    sc.c2.clear();
                    sc.c2.resize(t * ld, 0.0);
                    let first = prob_index(row, head, 0, 0, &s);
                    let stride = p_max_t(&s) as u32;
                    probs_back_cols(
                        site, first, stride, pr, &mut sc.d, &mut sc.c2, t, ld, queries, scale,
                    );
                    // dV = P_dropᵀ · dctx  [t, D]
                    let dctx_b = sc.b2.get_or_insert_with(PackedB::empty);
                    dctx_b.repack(queries, d, |qi| &dctx[qi * hd..qi * hd + d]);
                    sc.c1.clear();
                    sc.c1.resize(t * d, 0.0);
                    gemm_strided(&sc.c2, ld, t, dctx_b, &mut sc.c1, d);
                    // dQ = dS · K  [queries, D] (dSᵀ read transposed), into d_qkv's query columns.
                    let k_rows = sc.b1.get_or_insert_with(PackedB::empty);
                    k_rows.repack(t, d, |j| kv_row(block(l, 0, head), q0, j, p, 1, &s, head));
                    // SAFETY: rows of this batch row, head's query columns: this item only.
                    let dq = unsafe {
                        std::slice::from_raw_parts_mut(
                            dq_ptr.at(row * sl * 3 * hd + head * d),
                            (queries - 1) * 3 * hd + d,
                        )
                    };
                    gemm_strided_t(&sc.d, ld, queries, k_rows, dq, 3 * hd);
                    // dK = dSᵀ · Q  [t, D]
                    let q_rows = sc.b2.get_or_insert_with(PackedB::empty);
                    q_rows.repack(queries, d, |qi| &q0[qi * 3 * hd + head * d..][..d]);
                    sc.c2.clear();
                    sc.c2.resize(t * d, 0.0);
                    gemm_strided(&sc.d, ld, t, q_rows, &mut sc.c2, d);
                    // Split keys/values: prefix part → this item's slot, tokens → d_qkv.
                    // SAFETY: item's own d_prefix slot; its row's key/value columns of d_qkv.
                    let dp = unsafe {
                        std::slice::from_raw_parts_mut(dp_ptr.at(item * 2 * p * d), 2 * p * d)
                    };
                    dp[..p * d].copy_from_slice(&sc.c2[..p * d]);
                    dp[p * d..].copy_from_slice(&sc.c1[..p * d]);
                    for j in 0..len {
                        let base = (row * sl + j) * 3 * hd + head * d;
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                sc.c2.as_ptr().add((p + j) * d),
                                dq_ptr.at(base + hd),
                                d,
                            );
                            std::ptr::copy_nonoverlapping(
                                sc.c1.as_ptr().add((p + j) * d),
                                dq_ptr.at(base + 2 * hd),
                                d,
                            );
                        }
                    }
                });
            });
            // The prefix's gradient: every batch row's share, per head.
            for row in 0..b {
                for head in 0..h {
                    let src = &d_prefix_items[(row * h + head) * 2 * p * d..][..2 * p * d];
                    for kv in 0..2 {
                        let dst = &mut d_prefix[(((l * 2 + kv) * h + head) * p) * d..][..p * d];
                        for (x, y) in dst.iter_mut().zip(&src[kv * p * d..(kv + 1) * p * d]) {
                            *x += y;
                        }
                    }
                }
            }
            back.recycle(ls);
            if l == 0 {
                break; // nothing below the first layer learns
            }
            // The layer input's gradient: through Q, K, V, plus the residual.
            gemm(&d_qkv, n, &lb.qkv, &mut dx, Epilogue::None);
            if l == last {
                for i in 0..b {
                    for (x, r) in dx[i * sl * hd..(i * sl + 1) * hd]
                        .iter_mut()
                        .zip(&resid[i * hd..(i + 1) * hd])
                    {
                        *x += r;
                    }
                }
            } else {
                for (x, r) in dx.iter_mut().zip(&resid) {
                    *x += r;
                }
            }
        }
        d_prefix
    }
}

/// Keys per query in the dropout numbering: P plus the longest row.
fn p_max_t(s: &Shape) -> usize {
    s.p + s.seq
}

/// The dropout element index of probability (row, head, query, key).
#[inline(always)]
fn prob_index(row: usize, head: usize, query: usize, key: usize, s: &Shape) -> u32 {
    ((((row * s.heads + head) * s.seq + query) * p_max_t(s)) + key) as u32
}

/// Per-item access to the per-(row, head) probability buffers.
#[derive(Clone, Copy)]
struct ProbsPtr(*mut Vec<f32>);
// SAFETY: each pool item touches only its own entry.
unsafe impl Send for ProbsPtr {}
unsafe impl Sync for ProbsPtr {}

impl ProbsPtr {
    // A method, not a field access: a closure would capture the bare (non-Sync) pointer field.
    fn at(&self, i: usize) -> *mut Vec<f32> {
        self.0.wrapping_add(i)
    }
}

/// The whole training encoder as one candle op on the prefix `[L, 2, H, P, D]`: candle's autograd
/// sees prefix → pooled `[B, Hd]`, and its backward is [`HostBert::train_backward`]. What the
/// forward keeps for the backward lives in the op, which the autograd graph holds until the
/// step's gradients are taken.
pub(crate) struct EncoderTrain {
    pub host: std::sync::Arc<HostBert>,
    pub back: std::sync::Arc<Backward>,
    pub batch: HostBatch,
    pub p: usize,
    pub drop: DropMask,
    pub saved: std::sync::Mutex<Option<Saved>>,
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
        let (pooled, saved) = self.host.train_forward(
            &self.back,
            &self.batch,
            &data[start..end],
            self.p,
            self.drop,
        );
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
        let d = self.host.train_backward(
            &self.back,
            &self.batch,
            &prefix,
            self.p,
            self.drop,
            saved,
            &d_pooled,
        );
        Ok(Some(candle_core::Tensor::from_vec(
            d,
            arg.shape(),
            arg.device(),
        )?))
    }
}
