//! Prefixed self-attention on the CPU: one (row, head) at a time through the GEMM micro-kernels.

use super::super::gemm::{gemm_strided, gemm_strided_t, PackedB};
use super::super::kernels::exp;
use super::super::PrefixKv;
use super::{CtxPtr, LANES};

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

/// Where one row's attention reads and writes.
pub(crate) struct RowAttn<'a> {
    /// The row's `[S, 3·Hd]` QKV block (at least its `len` tokens).
    pub qkv: &'a [f32],
    pub prefix: &'a PrefixKv,
    /// Real tokens (padding is left out, not masked).
    pub len: usize,
    pub layer: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Prefixed self-attention over a whole batch, one (row, head) at a time and both cores busy.
///
/// `qkv`: `[B·S, 3·Hd]`; `ctx`: `[B·S, Hd]`; padding rows are not written (nothing reads them:
/// they are no row's keys). `first_only`: only each row's first query ([CLS]) is computed, into
/// row b of `ctx` (`[B, Hd]`): in the last layer nothing else reaches the pooler.
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
    let out_rows = if first_only { s.batch } else { s.batch * sl };
    assert!(
        qkv.len() >= s.batch * sl * 3 * hd
            && ctx.len() >= out_rows * hd
            && prefixes.len() == s.batch
    );
    let out = CtxPtr::new(ctx.as_mut_ptr());
    super::super::pool::for_each(s.batch * h, |item| {
        let (b, head) = (item / h, item % h);
        let row = RowAttn {
            qkv: &qkv[b * sl * 3 * hd..],
            prefix: prefixes[b],
            len: lens[b],
            layer,
            heads: h,
            head_dim: d,
        };
        let (queries, out_row) = if first_only {
            (row.len.min(1), b)
        } else {
            (row.len, b * sl)
        };
        // SAFETY: `queries` rows from out_row, columns head·D..head·D+D of ctx belong to this
        // item alone; the slice covers them (asserted above).
        let dst = unsafe {
            std::slice::from_raw_parts_mut(
                out.at(out_row * hd + head * d),
                (queries.max(1) - 1) * hd + d,
            )
        };
        attend(&row, head, queries, dst);
    });
}

/// One head of one row: with its task's P prefix keys/values and the row's n tokens,
/// `scores = Q·[Kp; K]ᵀ` (scaled), softmax, then `ctx = probs · [Vp; V]` for the first `queries`
/// queries, into `dst`: `queries` rows `Hd` apart, this head's D columns each.
///
/// The scores are kept keys × queries (Sᵀ = K·Qᵀ): the keys are the A operand, read where they lie
/// (prefix block, QKV rows), and only the queries are transposed into a packed operand; the
/// softmax then runs down columns, 16 queries a vector, with no horizontal reductions; the context
/// product reads Sᵀ as a transposed A. (Queries × keys spent a third of attention in row
/// softmaxes — latency-bound reductions — and a sixth transposing every key. With a single query,
/// the last layer's [CLS], the 32-wide panel is mostly padding: ~0.2% of a 32 × 64 forward, not
/// worth a second layout. The first version looped over keys with one dot product each: 31% of a
/// forward pass.)
pub(crate) fn attend(row: &RowAttn<'_>, head: usize, queries: usize, dst: &mut [f32]) {
    let (d, n, prefix) = (row.head_dim, row.len, row.prefix);
    let hd = row.heads * d;
    let p = prefix.num_virtual_tokens();
    let t = p + n;
    let scale = 1.0 / (d as f32).sqrt();
    let (kp, vp) = (
        prefix.block(row.layer, 0, head),
        prefix.block(row.layer, 1, head),
    );
    let rows = row.qkv;
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
        sc.queries.repack_transposed(d, queries, |i| token(i, 0));
        let ld = scores_ld(queries);
        sc.scores.resize(t * ld, 0.0);
        let (by_prefix, by_token) = sc.scores.split_at_mut(p * ld);
        gemm_strided(kp, d, p, &sc.queries, by_prefix, ld);
        gemm_strided(&rows[hd + head * d..], 3 * hd, n, &sc.queries, by_token, ld);
        softmax_cols(&mut sc.scores, t, ld, queries, scale);
        gemm_strided_t(&sc.scores, ld, queries, &sc.values, dst, hd);
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
