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

use rayon::prelude::*;

use super::gemm::{gemm, PackedB};
use super::isa::{self, Isa};
use super::kernels::{exp, gelu};

/// The SIMD width our reductions accumulate in; any x86 vector unit up to AVX-512 fills it.
const LANES: usize = 16;

/// Runs `$body` compiled for AVX-512, AVX2+FMA or baseline, picked at run time (`isa::active`).
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                // SAFETY: `isa::active` never exceeds what the CPU reports.
                match isa::active() {
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (
            &a[c * LANES..(c + 1) * LANES],
            &b[c * LANES..(c + 1) * LANES],
        );
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for i in chunks * LANES..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
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

    /// `y[rows, out] = x[rows, in] · W + b`, the bias written first and accumulated into.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut Vec<f32>) {
        y.clear();
        y.reserve(rows * self.w.n());
        for _ in 0..rows {
            y.extend_from_slice(&self.b);
        }
        gemm(x, rows, &self.w, y);
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
        let mean = (acc.iter().sum::<f32>() + x.chunks_exact(LANES).remainder().iter().sum::<f32>()) / n as f32;
        let mut acc = [0f32; LANES];
        for c in x.chunks_exact(LANES) {
            for l in 0..LANES {
                let d = c[l] - mean;
                acc[l] += d * d;
            }
        }
        let rem: f32 = x.chunks_exact(LANES).remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        let inv = 1.0 / ((acc.iter().sum::<f32>() + rem) / n as f32 + eps).sqrt();
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
        if add.is_empty() {
            x.par_chunks_mut(n * ROWS).for_each(|xs| {
                for x in xs.chunks_exact_mut(n) {
                    norm_row(x, &[], &self.g, &self.b, self.eps);
                }
            });
        } else {
            x.par_chunks_mut(n * ROWS)
                .zip(add.par_chunks(n * ROWS))
                .for_each(|(xs, adds)| {
                    for (x, a) in xs.chunks_exact_mut(n).zip(adds.chunks_exact(n)) {
                        norm_row(x, a, &self.g, &self.b, self.eps);
                    }
                });
        }
    }
}

dispatch! {
    fn gelu_rows(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu(*v);
        }
    }
}

pub(crate) fn gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(gelu_rows);
}

/// The shape of one attention call.
pub(crate) struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub p_max: usize,
}

dispatch! {
    /// One row's attention for one head: scores against the prefix keys then the token keys,
    /// masked softmax, weighted sum of the values into `out` (`D` floats).
    fn attend_row(q: &[f32], pk: &[f32], pv: &[f32], qkv: &[f32], row_stride: usize, k_off: usize, v_off: usize, mask: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let d = q.len();
        let p = pk.len() / d;
        let t = mask.len();
        let mut max = f32::NEG_INFINITY;
        for j in 0..t {
            let s = if mask[j] == f32::NEG_INFINITY {
                f32::NEG_INFINITY
            } else if j < p {
                dot(q, &pk[j * d..(j + 1) * d]) * scale
            } else {
                let r = (j - p) * row_stride + k_off;
                dot(q, &qkv[r..r + d]) * scale
            };
            scores[j] = s;
            max = max.max(s);
        }
        let mut sum = 0f32;
        for s in scores[..t].iter_mut() {
            *s = exp(*s - max);
            sum += *s;
        }
        let inv = 1.0 / sum;
        out.fill(0.0);
        for j in 0..t {
            let w = scores[j] * inv;
            if w == 0.0 {
                continue;
            }
            if j < p {
                axpy(w, &pv[j * d..(j + 1) * d], out);
            } else {
                let r = (j - p) * row_stride + v_off;
                axpy(w, &qkv[r..r + d], out);
            }
        }
    }
}

/// Prefixed self-attention over a whole batch.
///
/// `qkv`: `[B·S, 3·Hd]` (queries, keys, values side by side); `prefix`: this layer's
/// `[2, B, H, Pmax, D]`; `mask`: `[B, Pmax + S]` additive. Writes the merged heads `[B·S, Hd]`.
pub(crate) fn attention(qkv: &[f32], prefix: &[f32], mask: &[f32], s: &AttnShape, ctx: &mut [f32]) {
    let (sl, h, d, p) = (s.seq, s.heads, s.head_dim, s.p_max);
    let hd = h * d;
    let t = p + sl;
    let scale = 1.0 / (d as f32).sqrt();
    let block = p * d;
    let kv_stride = s.batch * h * block; // keys → values in the prefix buffer
    ctx.par_chunks_mut(sl * hd)
        .enumerate()
        .for_each(|(b, ctx_b)| {
            let mut scores = vec![0f32; t];
            let rows = &qkv[b * sl * 3 * hd..(b + 1) * sl * 3 * hd];
            let mask_b = &mask[b * t..(b + 1) * t];
            for head in 0..h {
                let pk = &prefix[(b * h + head) * block..(b * h + head + 1) * block];
                let pv = &prefix
                    [kv_stride + (b * h + head) * block..kv_stride + (b * h + head + 1) * block];
                for i in 0..sl {
                    if mask_b[p + i] == f32::NEG_INFINITY {
                        continue; // a padding row: its output is never read
                    }
                    let q = &rows[i * 3 * hd + head * d..i * 3 * hd + (head + 1) * d];
                    let out = &mut ctx_b[i * hd + head * d..i * hd + (head + 1) * d];
                    attend_row(
                        q,
                        pk,
                        pv,
                        rows,
                        3 * hd,
                        hd + head * d,
                        2 * hd + head * d,
                        mask_b,
                        scale,
                        &mut scores,
                        out,
                    );
                }
            }
        });
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
}

impl HostBert {
    /// `[B, Hd]` pooled vectors, row-major. `prefix` is `[L, 2, B, H, Pmax, D]`.
    pub fn pooled(&self, batch: &super::batch::HostBatch, prefix: &[f32]) -> Vec<f32> {
        let (b, sl, hd) = (batch.rows, batch.seq_len, self.hidden);
        let n = b * sl;
        let mut x = vec![0f32; n * hd];
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
        self.emb_norm.residual(&mut x, &[]);
        let shape = AttnShape {
            batch: b,
            seq: sl,
            heads: self.heads,
            head_dim: hd / self.heads,
            p_max: batch.p_max,
        };
        let per_layer = prefix.len() / self.layers.len().max(1);
        let (mut qkv, mut tmp, mut inter) = (Vec::new(), Vec::new(), Vec::new());
        let mut ctx = vec![0f32; n * hd];
        for (l, layer) in self.layers.iter().enumerate() {
            layer.qkv.forward(&x, n, &mut qkv);
            attention(
                &qkv,
                &prefix[l * per_layer..(l + 1) * per_layer],
                &batch.mask,
                &shape,
                &mut ctx,
            );
            layer.attn_out.forward(&ctx, n, &mut tmp);
            layer.attn_norm.residual(&mut tmp, &x);
            std::mem::swap(&mut x, &mut tmp);
            layer.inter.forward(&x, n, &mut inter);
            gelu_in_place(&mut inter);
            layer.out.forward(&inter, n, &mut tmp);
            layer.out_norm.residual(&mut tmp, &x);
            std::mem::swap(&mut x, &mut tmp);
        }
        let cls: Vec<f32> = (0..b)
            .flat_map(|i| x[i * sl * hd..(i * sl + 1) * hd].iter().copied())
            .collect();
        let mut pooled = Vec::new();
        self.pooler.forward(&cls, b, &mut pooled);
        for v in pooled.iter_mut() {
            *v = v.tanh();
        }
        pooled
    }
}
