//! The CPU inference path: the whole encoder on host buffers, matmuls by the `gemm` crate and
//! everything between them in fused loops.
//!
//! Why a second forward next to the candle one in `bert.rs`: per layer, candle's version runs ~20
//! separate ops (bias adds, permutes, concatenations, scale, mask, softmax, residual adds,
//! LayerNorm), each allocating its output and waking a thread pool; on 2 cores that overhead was
//! half of a forward pass. Here a layer is four matmuls with the bias folded in, one attention
//! loop that reads the prefix and the token keys where they lie (no concatenation), and two fused
//! residual+LayerNorm passes. Numbers agree with the candle path to float32 rounding (tested).
//! The candle path stays for training (autograd) and for GPUs.

use super::gemm::{gemm, gemm_serial, gemm_strided, gemm_strided_t, Epilogue, PackedB};
use super::kernels::exp;
use super::PrefixKv;

/// The SIMD width our reductions accumulate in; any x86 vector unit up to AVX-512 fills it.
pub(crate) const LANES: usize = 16;

/// Runs `$body` compiled for AVX-512, AVX2+FMA or baseline, picked at run time (`isa::active`).
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        dispatch! { $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments, clippy::unused_unit)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { body($($arg),*) }
                // SAFETY: `isa::active` never exceeds what the CPU reports.
                match $crate::model::isa::active() {
                    $crate::model::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::model::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::model::isa::Isa::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}

/// A dense layer: its weight packed once for the micro-kernels (`gemm.rs`), and its bias.
pub(crate) struct Dense {
    pub w: PackedB,
    pub b: Vec<f32>,
}

impl Dense {
    /// `w` is `[in, out]` row-major.
    pub fn new(w: &[f32], b: Vec<f32>, inp: usize, out: usize) -> Self {
        assert_eq!(b.len(), out, "bias is not {out} long");
        Self {
            w: PackedB::pack(w, inp, out),
            b,
        }
    }

    /// `y[rows, out] = x[rows, in] · W + b`.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut Vec<f32>) {
        gemm(x, rows, &self.w, y, Epilogue::Bias(&self.b));
    }

    /// `y = gelu(x · W + b)`, the activation applied as each tile is stored.
    pub fn forward_gelu(&self, x: &[f32], rows: usize, y: &mut Vec<f32>) {
        gemm(x, rows, &self.w, y, Epilogue::BiasGelu(&self.b));
    }
}

pub(crate) struct Norm {
    pub g: Vec<f32>,
    pub b: Vec<f32>,
    pub eps: f32,
}

dispatch! {
    fn norm_row(x: &mut [f32], add: &[f32], g: &[f32], b: &[f32], eps: f32) {
        let n = x.len();
        if !add.is_empty() {
            for (x, a) in x.iter_mut().zip(add) {
                *x += a;
            }
        }
        let mut acc = [0f32; LANES];
        for c in x.chunks_exact(LANES) {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        let mean = (hsum(acc) + x.chunks_exact(LANES).remainder().iter().sum::<f32>()) / n as f32;
        let mut acc = [0f32; LANES];
        for c in x.chunks_exact(LANES) {
            for l in 0..LANES {
                let d = c[l] - mean;
                acc[l] += d * d;
            }
        }
        let rem: f32 = x.chunks_exact(LANES).remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        let inv = 1.0 / ((hsum(acc) + rem) / n as f32 + eps).sqrt();
        for ((x, g), b) in x.iter_mut().zip(g).zip(b) {
            *x = (*x - mean) * inv * g + b;
        }
    }
}

impl Norm {
    /// `x = LayerNorm(x + add)`, row by row; an empty `add` means plain LayerNorm.
    pub fn residual(&self, x: &mut [f32], add: &[f32]) {
        let n = self.g.len();
        const ROWS: usize = 16;
        let rows = x.len() / n;
        assert!(add.is_empty() || add.len() >= rows * n);
        let xp = CtxPtr(x.as_mut_ptr());
        super::pool::for_each(rows.div_ceil(ROWS), |chunk| {
            let (r0, r1) = (chunk * ROWS, ((chunk + 1) * ROWS).min(rows));
            // SAFETY: chunk i owns rows r0..r1 of x, inside its length.
            let xs = unsafe { std::slice::from_raw_parts_mut(xp.at(r0 * n), (r1 - r0) * n) };
            for (i, row) in xs.chunks_exact_mut(n).enumerate() {
                let a = if add.is_empty() {
                    &[][..]
                } else {
                    &add[(r0 + i) * n..(r0 + i + 1) * n]
                };
                norm_row(row, a, &self.g, &self.b, self.eps);
            }
        });
    }
}

/// The shape of one attention call.
pub(crate) struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// One head's reusable buffers: packed queries (transposed) and values, the scores.
struct HeadScratch {
    queries: PackedB,
    values: PackedB,
    scores: Vec<f32>,
}

thread_local! {
    static HEAD: std::cell::RefCell<HeadScratch> = std::cell::RefCell::new(HeadScratch {
        queries: PackedB::empty(),
        values: PackedB::empty(),
        scores: Vec::new(),
    });
}

/// A buffer the parallel items of one region write, each its own disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct CtxPtr(*mut f32);
// SAFETY: every user hands each item a disjoint part (rows, or a head's columns of a row).
unsafe impl Send for CtxPtr {}
unsafe impl Sync for CtxPtr {}

impl CtxPtr {
    pub(crate) fn new(p: *mut f32) -> Self {
        Self(p)
    }

    pub(crate) fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Σ of the lanes as a tree (16 → 8 → 4 → 2 → 1): a plain `iter().sum()` is a chain of 15
/// dependent scalar adds.
#[inline(always)]
pub(crate) fn hsum(mut v: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            v[l] += v[l + w];
        }
        w /= 2;
    }
    v[0]
}

/// Prefixed self-attention over a whole batch, one (row, head) at a time and both cores busy.
///
/// Per row b and head h, with its task's P prefix keys/values and its n real tokens (padding is
/// left out, not masked): `scores = Q·[Kp; K]ᵀ` through the GEMM micro-kernels (keys and values
/// read from where they lie: the task's prefix block and the QKV rows), softmax, then
/// `ctx = probs · [Vp; V]` into this head's columns. `qkv`: `[B·S, 3·Hd]`; `ctx`: `[B·S, Hd]`;
/// padding rows are not written (nothing reads them: they are no row's keys). The scores are kept
/// transposed (keys × queries), see below.
///
/// (The first version looped over keys with one dot product each: 31% of a forward pass.)
///
/// `first_only`: only each row's first query ([CLS]) is computed, into row b of `ctx`
/// (`[B, Hd]`): in the last layer nothing else reaches the pooler.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    qkv: &[f32],
    prefixes: &[&PrefixKv],
    lens: &[usize],
    layer: usize,
    s: &AttnShape,
    ctx: &mut [f32],
    first_only: bool,
) {
    let (sl, h, d) = (s.seq, s.heads, s.head_dim);
    let hd = h * d;
    let scale = 1.0 / (d as f32).sqrt();
    let out_rows = if first_only { s.batch } else { s.batch * sl };
    assert!(
        qkv.len() >= s.batch * sl * 3 * hd
            && ctx.len() >= out_rows * hd
            && prefixes.len() == s.batch
    );
    let out = CtxPtr(ctx.as_mut_ptr());
    super::pool::for_each(s.batch * h, |item| {
        let (b, head) = (item / h, item % h);
        let (n, prefix) = (lens[b], prefixes[b]);
        let p = prefix.num_virtual_tokens();
        let t = p + n;
        let (queries, out_row) = if first_only {
            (n.min(1), b)
        } else {
            (n, b * sl)
        };
        let (kp, vp) = (prefix.block(layer, 0, head), prefix.block(layer, 1, head));
        let rows = &qkv[b * sl * 3 * hd..];
        let token = |j: usize, part: usize| &rows[j * 3 * hd + part * hd + head * d..][..d];
        HEAD.with(|scratch| {
            let mut sc = scratch.borrow_mut();
            let sc = &mut *sc;
            sc.values.repack(t, d, |j| {
                if j < p {
                    &vp[j * d..(j + 1) * d]
                } else {
                    token(j - p, 2)
                }
            });
            // SAFETY: `queries` rows from out_row, columns head·D..head·D+D of ctx belong to this
            // item alone; the slice covers them (asserted above).
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out.at(out_row * hd + head * d),
                    (queries.max(1) - 1) * hd + d,
                )
            };
            // Scores as keys × queries (Sᵀ = K·Qᵀ): the keys are the A operand, read where they
            // lie (prefix block, QKV rows), and only the queries are transposed into a packed
            // operand; the softmax then runs down columns, 16 queries a vector, with no
            // horizontal reductions; the context product reads Sᵀ as a transposed A.
            // (Queries × keys spent a third of attention in row softmaxes — latency-bound
            // reductions — and a sixth transposing every key. With a single query, the last
            // layer's [CLS], the 32-wide panel is mostly padding: ~0.2% of a 32 × 64 forward,
            // not worth a second layout.)
            sc.queries.repack_transposed(d, queries, |i| token(i, 0));
            let ld = scores_ld(queries);
            sc.scores.resize(t * ld, 0.0);
            let (by_prefix, by_token) = sc.scores.split_at_mut(p * ld);
            gemm_strided(kp, d, p, &sc.queries, by_prefix, ld);
            gemm_strided(&rows[hd + head * d..], 3 * hd, n, &sc.queries, by_token, ld);
            softmax_cols(&mut sc.scores, t, ld, queries, scale);
            gemm_strided_t(&sc.scores, ld, queries, &sc.values, dst, hd);
        });
    });
}

/// The row width attention keeps its scores at for `queries` queries (keys × this): a multiple
/// of 32, the widest GEMM panel, so LANES divides it too.
pub(crate) fn scores_ld(queries: usize) -> usize {
    queries.next_multiple_of(32).max(32)
}

dispatch! {
    /// Softmax down each of the first `cols` columns of `x` (`rows` × `ld`, `ld` a multiple of
    /// LANES ≥ `cols`): `x[·][c] = softmax(scale · x[·][c])`, `scale` > 0. Each LANES columns are
    /// one vector per row, so max and sum accumulate lane-wise and never reduce across lanes;
    /// the padding columns up to the next LANES are computed and ignored.
    pub(crate) fn softmax_cols(x: &mut [f32], rows: usize, ld: usize, cols: usize, scale: f32) {
        debug_assert!(scale > 0.0 && ld.is_multiple_of(LANES) && ld >= cols && x.len() >= rows * ld);
        for c0 in (0..cols).step_by(LANES) {
            let mut max = [f32::NEG_INFINITY; LANES];
            for j in 0..rows {
                let r = &x[j * ld + c0..][..LANES];
                for l in 0..LANES {
                    max[l] = if r[l] > max[l] { r[l] } else { max[l] };
                }
            }
            let mut shift = [0f32; LANES];
            for l in 0..LANES {
                shift[l] = max[l] * scale;
            }
            let mut sum = [0f32; LANES];
            for j in 0..rows {
                let r = &mut x[j * ld + c0..][..LANES];
                for l in 0..LANES {
                    r[l] = exp(r[l] * scale - shift[l]);
                    sum[l] += r[l];
                }
            }
            let mut inv = [0f32; LANES];
            for l in 0..LANES {
                inv[l] = 1.0 / sum[l];
            }
            for j in 0..rows {
                let r = &mut x[j * ld + c0..][..LANES];
                for l in 0..LANES {
                    r[l] *= inv[l];
                }
            }
        }
    }
}

/// One encoder layer's weights on the host.
pub(crate) struct Layer {
    pub qkv: Dense,
    pub attn_out: Dense,
    pub attn_norm: Norm,
    pub inter: Dense,
    pub out: Dense,
    pub out_norm: Norm,
}

/// The frozen encoder's weights as host arrays, for [`HostBert::pooled`].
pub(crate) struct HostBert {
    pub word: Vec<f32>,
    pub position: Vec<f32>,
    pub token_type: Vec<f32>,
    pub emb_norm: Norm,
    pub layers: Vec<Layer>,
    pub pooler: Dense,
    pub hidden: usize,
    pub heads: usize,
    /// Activation buffers kept from one forward pass to the next: a 32 × 64 batch needs ~25 MB
    /// of them, and allocating them afresh cost page faults on every batch.
    pub workspace: std::sync::Mutex<Workspace>,
}

#[derive(Default)]
pub(crate) struct Workspace {
    x: Vec<f32>,
    tmp: Vec<f32>,
    qkv: Vec<f32>,
    inter: Vec<f32>,
    ctx: Vec<f32>,
    cls: Vec<f32>,
}

impl HostBert {
    /// `[B, Hd]` pooled vectors, row-major; `prefixes[i]` is row i's task prefix.
    pub fn pooled(&self, batch: &super::batch::HostBatch, prefixes: &[&PrefixKv]) -> Vec<f32> {
        let (b, sl, hd) = (batch.rows, batch.seq_len, self.hidden);
        let n = b * sl;
        let mut guard = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let Workspace {
            x,
            tmp,
            qkv,
            inter,
            ctx,
            cls,
        } = &mut *guard;
        x.clear();
        x.resize(n * hd, 0.0);
        for (r, row) in x.chunks_exact_mut(hd).enumerate() {
            let (w, t, p) = (
                batch.ids[r] as usize,
                batch.types[r] as usize,
                batch.positions[r] as usize,
            );
            let (w, t, p) = (
                &self.word[w * hd..(w + 1) * hd],
                &self.token_type[t * hd..(t + 1) * hd],
                &self.position[p * hd..(p + 1) * hd],
            );
            for i in 0..hd {
                row[i] = (w[i] + t[i]) + p[i];
            }
        }
        self.emb_norm.residual(x, &[]);
        let shape = AttnShape {
            batch: b,
            seq: sl,
            heads: self.heads,
            head_dim: hd / self.heads,
        };
        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate() {
            layer.qkv.forward(x, n, qkv);
            if l == last {
                // Only [CLS] reaches the pooler: the rest of the last layer runs on B rows.
                ctx.resize(b * hd, 0.0);
                attention(qkv, prefixes, &batch.lens, l, &shape, ctx, true);
                cls.clear();
                cls.extend((0..b).flat_map(|i| x[i * sl * hd..(i * sl + 1) * hd].iter().copied()));
                std::mem::swap(x, cls);
                self.ffn_block(layer, x, ctx, tmp, inter, b);
                break;
            }
            // Padding rows are not written by attention; whatever they hold stays finite and
            // is nobody's key.
            ctx.resize(n * hd, 0.0);
            attention(qkv, prefixes, &batch.lens, l, &shape, ctx, false);
            self.ffn_block(layer, x, ctx, tmp, inter, n);
        }
        // x is now [B, Hd]: each row's [CLS] (or [B·S, Hd] for a model without layers).
        if self.layers.is_empty() {
            cls.clear();
            cls.extend((0..b).flat_map(|i| x[i * sl * hd..(i * sl + 1) * hd].iter().copied()));
            std::mem::swap(x, cls);
        }
        let mut pooled = Vec::new();
        self.pooler.forward(x, b, &mut pooled);
        for v in pooled.iter_mut() {
            *v = v.tanh();
        }
        pooled
    }

    /// The rest of a layer after attention, on `rows` rows: output dense + residual + LayerNorm,
    /// feed-forward, dense + residual + LayerNorm. `x` (the layer's input) becomes its output.
    fn ffn_block(
        &self,
        layer: &Layer,
        x: &mut Vec<f32>,
        ctx: &[f32],
        tmp: &mut Vec<f32>,
        inter: &mut Vec<f32>,
        rows: usize,
    ) {
        if rows >= FUSED_MIN_ROWS * rayon::current_num_threads().max(1) {
            return self.ffn_by_blocks(layer, x, ctx, rows);
        }
        layer.attn_out.forward(ctx, rows, tmp);
        layer.attn_norm.residual(tmp, x);
        std::mem::swap(x, tmp);
        layer.inter.forward_gelu(x, rows, inter);
        layer.out.forward(inter, rows, tmp);
        layer.out_norm.residual(tmp, x);
        std::mem::swap(x, tmp);
    }
}

/// Rows per thread from which [`HostBert::ffn_block`] runs by row blocks.
const FUSED_MIN_ROWS: usize = 32;

/// Rows per block at most in [`HostBert::ffn_by_blocks`]: the block's intermediate (`rows` ×
/// 1536 for MiniLM, 590 KB at 96) stays in the core's L2 between the two feed-forward products.
const BLOCK_ROWS: usize = 96;

thread_local! {
    /// A row block's dense output and feed-forward intermediate.
    static BLOCK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl HostBert {
    /// [`Self::ffn_block`] for many rows: everything after attention is row by row, so each core
    /// takes whole blocks of rows through all of it (output dense, residual + LayerNorm,
    /// feed-forward, residual + LayerNorm) — one parallel region instead of five, and the
    /// intermediate, 4× the hidden width, never leaves the core's cache.
    fn ffn_by_blocks(&self, layer: &Layer, x: &mut [f32], ctx: &[f32], rows: usize) {
        let hd = self.hidden;
        let wide = layer.inter.w.n();
        let threads = rayon::current_num_threads().max(1);
        // Equal blocks, as many as a multiple of the threads, so no core waits at the end.
        let per = rows.div_ceil(rows.div_ceil(BLOCK_ROWS).next_multiple_of(threads));
        assert!(x.len() >= rows * hd && ctx.len() >= rows * hd);
        let xp = CtxPtr(x.as_mut_ptr());
        super::pool::for_each(rows.div_ceil(per), |item| {
            let (r0, m) = (item * per, per.min(rows - item * per));
            // SAFETY: item i owns rows r0..r0+m of x, inside its length (asserted above).
            let xs = unsafe { std::slice::from_raw_parts_mut(xp.at(r0 * hd), m * hd) };
            BLOCK.with(|block| {
                let mut block = block.borrow_mut();
                let (tmp, inter) = &mut *block;
                tmp.resize(tmp.len().max(m * hd), 0.0);
                inter.resize(inter.len().max(m * wide), 0.0);
                let dense = |d: &Dense, a: &[f32], lda: usize, c: &mut [f32], gelu: bool| {
                    let e = if gelu {
                        Epilogue::BiasGelu(&d.b)
                    } else {
                        Epilogue::Bias(&d.b)
                    };
                    gemm_serial(a, lda, m, &d.w, c, d.w.n(), e);
                };
                let norm = |xs: &mut [f32], add: &[f32], n: &Norm| {
                    // x = LN(x + add): the sum is the same as add + x, bit for bit.
                    for (row, add) in xs.chunks_exact_mut(hd).zip(add.chunks_exact(hd)) {
                        norm_row(row, add, &n.g, &n.b, n.eps);
                    }
                };
                dense(&layer.attn_out, &ctx[r0 * hd..], hd, tmp, false);
                norm(xs, tmp, &layer.attn_norm);
                dense(&layer.inter, xs, hd, inter, true);
                dense(&layer.out, inter, wide, tmp, false);
                norm(xs, tmp, &layer.out_norm);
            });
        });
    }
}

/// GFLOP/s of [`attention`] (score and context products, softmax, key/value packing) on a
/// `batch × seq` batch of one task with `p` virtual tokens, MiniLM's 12 heads of 32: best of
/// `reps` calls after one warm-up (`prefixd bench --kernels`).
pub fn measure_attention(batch: usize, seq: usize, p: usize, reps: usize) -> f64 {
    let (heads, d) = (12, 32);
    let hd = heads * d;
    let fill = |n: usize, salt: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * salt) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let prefix = PrefixKv::from_peft_layout(&fill(p * 2 * hd, 7919), p, 1, heads, d);
    let qkv = fill(batch * seq * 3 * hd, 104729);
    let mut ctx = vec![0f32; batch * seq * hd];
    let lens = vec![seq; batch];
    let prefixes = vec![&prefix; batch];
    let shape = AttnShape {
        batch,
        seq,
        heads,
        head_dim: d,
    };
    let mut best = f64::INFINITY;
    for i in 0..=reps.max(1) {
        let t = std::time::Instant::now();
        attention(&qkv, &prefixes, &lens, 0, &shape, &mut ctx, false);
        if i > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&ctx);
    // Two products per (row, head): [seq × d]·[d × (p + seq)] and [seq × (p + seq)]·[(p + seq) × d].
    let flops = 2.0 * 2.0 * (batch * heads * seq * (p + seq) * d) as f64;
    flops / best / 1e9
}
