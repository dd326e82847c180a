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
//!
//! Two ways to share the cores: a batch with rows for every core is split into groups of rows,
//! each taken through the whole encoder by one core (`encode_by_rows`); a single request runs
//! layer by layer, each matmul split by columns (`encode_by_layers`).

use super::gemm::{gemm, gemm_serial, Epilogue, PackedB};
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

// (After `dispatch!`: the attention module uses it.)
mod attention;
pub use attention::measure_attention;
use attention::{attend, attention, AttnShape, RowAttn};
pub(crate) use attention::{scores_ld, softmax_cols};

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
            self.rows(
                xs,
                if add.is_empty() {
                    add
                } else {
                    &add[r0 * n..r1 * n]
                },
            );
        });
    }

    /// [`Self::residual`] on the calling thread (`add`: as many rows as `x`, or empty).
    pub fn rows(&self, x: &mut [f32], add: &[f32]) {
        let n = self.g.len();
        for (r, row) in x.chunks_exact_mut(n).enumerate() {
            let a = if add.is_empty() {
                &[][..]
            } else {
                &add[r * n..(r + 1) * n]
            };
            norm_row(row, a, &self.g, &self.b, self.eps);
        }
    }
}

/// A buffer the parallel items of one region write, each its own disjoint part (floats, or
/// training's groups).
pub(crate) struct CtxPtr<T = f32>(*mut T);
// SAFETY: every user hands each item a disjoint part (rows, a head's columns of a row, a group).
unsafe impl<T> Send for CtxPtr<T> {}
unsafe impl<T> Sync for CtxPtr<T> {}

// (By hand: a derive would require `T: Copy`.)
impl<T> Clone for CtxPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for CtxPtr<T> {}

impl<T> CtxPtr<T> {
    pub(crate) fn new(p: *mut T) -> Self {
        Self(p)
    }

    // A method, not a field access: a closure would capture the bare (non-Sync) pointer field.
    pub(crate) fn at(&self, offset: usize) -> *mut T {
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
        let ws = &mut *guard;
        let x = &mut ws.x;
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
        match row_groups(b, sl, rayon::current_num_threads().max(1)) {
            Some(items) => self.encode_by_rows(batch, prefixes, items, ws),
            None => self.encode_by_layers(batch, prefixes, ws),
        }
        // ws.cls is now [B, Hd]: each row's [CLS] after the last layer.
        let mut pooled = Vec::new();
        self.pooler.forward(&ws.cls, b, &mut pooled);
        for v in pooled.iter_mut() {
            *v = v.tanh();
        }
        pooled
    }

    /// The encoder one layer at a time, each step split over the cores: for batches too small to
    /// give every core rows of its own (one request), whose matmuls split by columns instead.
    fn encode_by_layers(
        &self,
        batch: &super::batch::HostBatch,
        prefixes: &[&PrefixKv],
        ws: &mut Workspace,
    ) {
        let (b, sl, hd) = (batch.rows, batch.seq_len, self.hidden);
        let n = b * sl;
        let Workspace {
            x,
            tmp,
            qkv,
            inter,
            ctx,
            cls,
        } = ws;
        let shape = AttnShape {
            batch: b,
            seq: sl,
            heads: self.heads,
            head_dim: hd / self.heads,
        };
        cls.clear();
        cls.resize(b * hd, 0.0);
        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate() {
            layer.qkv.forward(x, n, qkv);
            if l == last {
                // Only [CLS] reaches the pooler: the rest of the last layer runs on B rows.
                ctx.resize(b * hd, 0.0);
                attention(qkv, prefixes, &batch.lens, l, &shape, ctx, true);
                gather_cls(x, hd, (0..b).map(|i| i * sl), cls);
                self.ffn_block(layer, cls, ctx, tmp, inter, b);
                return;
            }
            // Padding rows are not written by attention; whatever they hold stays finite and
            // is nobody's key.
            ctx.resize(n * hd, 0.0);
            attention(qkv, prefixes, &batch.lens, l, &shape, ctx, false);
            self.ffn_block(layer, x, ctx, tmp, inter, n);
        }
        gather_cls(x, hd, (0..b).map(|i| i * sl), cls); // (a model without layers)
    }

    /// The encoder by groups of batch rows, each group through every layer on one core: rows do
    /// not meet in a BERT except through the weights, so the cores need not wait for each other
    /// between steps, and a group's activations (QKV, context, feed-forward) stay in its core's
    /// L2 from one step to the next. Layer by layer, each core read half its QKV rows and
    /// contexts from the other core's cache: attention ran 1.6× slower than on data of its own
    /// (32 × 64: 3.2 vs 2.0 ms a layer).
    fn encode_by_rows(
        &self,
        batch: &super::batch::HostBatch,
        prefixes: &[&PrefixKv],
        items: usize,
        ws: &mut Workspace,
    ) {
        let (b, sl, hd) = (batch.rows, batch.seq_len, self.hidden);
        assert!(items > 0 && items <= b && prefixes.len() == b && batch.lens.len() == b);
        ws.cls.clear();
        ws.cls.resize(b * hd, 0.0);
        let xp = CtxPtr(ws.x.as_mut_ptr());
        let cp = CtxPtr(ws.cls.as_mut_ptr());
        super::pool::for_each(items, |i| {
            let (r0, r1) = (i * b / items, (i + 1) * b / items);
            // SAFETY: item i owns batch rows r0..r1: their tokens in x, their rows in cls (both
            // sized for b rows above).
            let (x, cls) = unsafe {
                (
                    std::slice::from_raw_parts_mut(xp.at(r0 * sl * hd), (r1 - r0) * sl * hd),
                    std::slice::from_raw_parts_mut(cp.at(r0 * hd), (r1 - r0) * hd),
                )
            };
            self.encode_rows(x, cls, sl, &batch.lens[r0..r1], &prefixes[r0..r1]);
        });
    }

    /// Every layer for a few batch rows on the calling thread: `x` holds their `S` tokens each,
    /// `cls` receives their [CLS] rows after the last layer.
    ///
    /// Padding is dropped first: the rows' real tokens are packed one after another (row r from
    /// `starts[r]`), so no matmul or LayerNorm runs on it. Rows meet only in attention, which
    /// reads each row's own tokens; a batch of mixed lengths costs what its tokens cost.
    fn encode_rows(
        &self,
        x: &mut [f32],
        cls: &mut [f32],
        sl: usize,
        lens: &[usize],
        prefixes: &[&PrefixKv],
    ) {
        let (rows, hd, heads) = (lens.len(), self.hidden, self.heads);
        let d = hd / heads;
        let mut starts = Vec::with_capacity(rows);
        let mut n = 0;
        for (r, &len) in lens.iter().enumerate() {
            // (A row keeps at least its first slot, where its [CLS] is read from.)
            let keep = len.clamp(1, sl);
            starts.push(n);
            x.copy_within(r * sl * hd..(r * sl + keep) * hd, n * hd);
            n += keep;
        }
        GROUP.with(|group| {
            let mut group = group.borrow_mut();
            let (qkv, ctx) = &mut *group;
            grow(qkv, n * 3 * hd);
            grow(ctx, n * hd);
            let last = self.layers.len().saturating_sub(1);
            for (l, layer) in self.layers.iter().enumerate() {
                let qkv_w = &layer.qkv;
                gemm_serial(x, hd, n, &qkv_w.w, qkv, 3 * hd, Epilogue::Bias(&qkv_w.b));
                for (r, (&len, &prefix)) in lens.iter().zip(prefixes).enumerate() {
                    let row = RowAttn {
                        qkv: &qkv[starts[r] * 3 * hd..],
                        prefix,
                        len,
                        layer: l,
                        heads,
                        head_dim: d,
                    };
                    // The last layer: only [CLS], into row r (see `encode_by_layers`).
                    let (queries, out_row) = if l == last {
                        (len.min(1), r)
                    } else {
                        (len, starts[r])
                    };
                    for head in 0..heads {
                        attend(&row, head, queries, &mut ctx[out_row * hd + head * d..]);
                    }
                }
                if l == last {
                    gather_cls(x, hd, starts.iter().copied(), cls);
                    self.ffn_rows(layer, cls, ctx, rows);
                    return;
                }
                self.ffn_rows(layer, x, ctx, n);
            }
            gather_cls(x, hd, starts.iter().copied(), cls);
        });
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
        let threads = rayon::current_num_threads().max(1);
        if rows >= BLOCK_MIN_ROWS * threads {
            // Each core takes whole blocks of rows through all of it: one parallel region
            // instead of five, and the intermediate stays in the core's cache.
            let per = rows.div_ceil(rows.div_ceil(BLOCK_ROWS).next_multiple_of(threads));
            let hd = self.hidden;
            assert!(x.len() >= rows * hd && ctx.len() >= rows * hd);
            let xp = CtxPtr(x.as_mut_ptr());
            super::pool::for_each(rows.div_ceil(per), |item| {
                let (r0, m) = (item * per, per.min(rows - item * per));
                // SAFETY: item i owns rows r0..r0+m of x, inside its length (asserted above).
                let xs = unsafe { std::slice::from_raw_parts_mut(xp.at(r0 * hd), m * hd) };
                self.ffn_rows(layer, xs, &ctx[r0 * hd..], m);
            });
            return;
        }
        layer.attn_out.forward(ctx, rows, tmp);
        layer.attn_norm.residual(tmp, x);
        std::mem::swap(x, tmp);
        layer.inter.forward_gelu(x, rows, inter);
        layer.out.forward(inter, rows, tmp);
        layer.out_norm.residual(tmp, x);
        std::mem::swap(x, tmp);
    }

    /// [`Self::ffn_block`] on the calling thread, BLOCK_ROWS rows at a time so that the
    /// feed-forward intermediate (4× the hidden width) stays in L2 between its two products.
    fn ffn_rows(&self, layer: &Layer, x: &mut [f32], ctx: &[f32], rows: usize) {
        let (hd, wide) = (self.hidden, layer.inter.w.n());
        BLOCK.with(|block| {
            let mut block = block.borrow_mut();
            let (tmp, inter) = &mut *block;
            grow(tmp, rows.min(BLOCK_ROWS) * hd);
            grow(inter, rows.min(BLOCK_ROWS) * wide);
            for r0 in (0..rows).step_by(BLOCK_ROWS) {
                let m = BLOCK_ROWS.min(rows - r0);
                let xs = &mut x[r0 * hd..(r0 + m) * hd];
                let dense = |d: &Dense, a: &[f32], lda: usize, c: &mut [f32], gelu: bool| {
                    let e = if gelu {
                        Epilogue::BiasGelu(&d.b)
                    } else {
                        Epilogue::Bias(&d.b)
                    };
                    gemm_serial(a, lda, m, &d.w, c, d.w.n(), e);
                };
                // x = LN(x + add): the sum is the same as add + x, bit for bit.
                dense(&layer.attn_out, &ctx[r0 * hd..], hd, tmp, false);
                layer.attn_norm.rows(xs, &tmp[..m * hd]);
                dense(&layer.inter, xs, hd, inter, true);
                dense(&layer.out, inter, wide, tmp, false);
                layer.out_norm.rows(xs, &tmp[..m * hd]);
            }
        });
    }
}

/// `cls[i] = x[starts[i]]`: each row's first token, its rows starting at `starts` (tokens of `hd`
/// values).
pub(crate) fn gather_cls(
    x: &[f32],
    hd: usize,
    starts: impl Iterator<Item = usize>,
    cls: &mut [f32],
) {
    for (out, start) in cls.chunks_exact_mut(hd).zip(starts) {
        out.copy_from_slice(&x[start * hd..(start + 1) * hd]);
    }
}

/// Makes `v` at least `len` long (its contents are overwritten by the caller).
fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// How many work items [`HostBert::encode_by_rows`] splits a batch of `batch` rows of `seq`
/// tokens into, or None when the layer-by-layer path serves it better: fewer rows than threads
/// (a single request: its matmuls split by columns instead), or items too short to reuse each
/// weight panel loaded (under MIN_ITEM_TOKENS tokens: 2 × 14 tokens measured faster by layers).
fn row_groups(batch: usize, seq: usize, threads: usize) -> Option<usize> {
    if batch < threads || seq == 0 {
        return None;
    }
    let per = ITEM_TOKENS.div_ceil(seq).clamp(1, batch / threads);
    let items = batch.div_ceil(per).next_multiple_of(threads).min(batch);
    (batch * seq / items >= MIN_ITEM_TOKENS).then_some(items)
}

/// Tokens per work item [`row_groups`] aims at: enough rows for each weight panel to serve ~10
/// micro-kernel tiles before the next is loaded.
pub(crate) const ITEM_TOKENS: usize = 128;
const MIN_ITEM_TOKENS: usize = 48;

/// Rows per thread from which [`HostBert::ffn_block`] runs by row blocks.
const BLOCK_MIN_ROWS: usize = 32;

/// Rows per block in [`HostBert::ffn_rows`]: the block's intermediate (`rows` × 1536 for MiniLM,
/// 590 KB at 96) stays in the core's L2 between the two feed-forward products.
const BLOCK_ROWS: usize = 96;

thread_local! {
    /// A group's QKV and attention context ([`HostBert::encode_rows`]).
    static GROUP: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// A row block's dense output and feed-forward intermediate ([`HostBert::ffn_rows`]).
    static BLOCK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}
