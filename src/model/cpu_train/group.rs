//! One group of batch rows through the training encoder on the calling core: forward through
//! every layer keeping what the backward needs, then (later in the step) backward to the prefix.
//! Rows are packed without their padding (`Packing`); dropout indices still count positions as
//! in the padded batch, so the masks do not depend on how the batch was grouped.

use super::super::cpu::{gather_cls, scores_ld, softmax_cols, Norm};
use super::super::gemm::{gemm_serial, gemm_strided, gemm_strided_t, Epilogue, PackedB};
use super::super::kernels::gelu_split;
use super::dropout::{drop_apply_cols, p_max_t, prob_index, probs_back_cols, site_of, Site};
use super::{GroupSaved, LnSaved, Packing, Step};

/// A thread's buffers for its groups, kept from one group to the next.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    ctx: Vec<f32>,
    mid: Vec<f32>,
    act: Vec<f32>,
    out: Vec<f32>,
    resid: Vec<f32>,
    d_qkv: Vec<f32>,
    attn: AttnScratch,
}

/// The per-(row, head) attention's buffers.
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
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// `v` resized to exactly `len` (its contents are overwritten by the caller).
fn fit(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len, 0.0);
    v
}

/// `v = 0`, `len` long.
fn zeros(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.clear();
    v.resize(len, 0.0);
    v
}

impl Step<'_> {
    /// The group's rows through every layer; their [CLS] rows after the last go to `cls`.
    pub(super) fn forward_group(&self, g: &mut GroupSaved, cls: &mut [f32]) {
        let (host, batch) = (self.host, self.batch);
        let (sl, hd) = (self.s.seq, host.hidden);
        let nl = host.layers.len();
        let pack = &mut g.pack;
        pack.starts.clear();
        let mut n = 0;
        for &len in &batch.lens[pack.rows.clone()] {
            // (A row keeps at least its first slot, where its [CLS] is read from.)
            pack.starts.push(n);
            n += len.clamp(1, sl);
        }
        pack.starts.push(n);
        let pack = &g.pack;
        g.layers.resize_with(nl, Default::default);
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let Scratch {
                x,
                ctx,
                mid,
                act,
                out,
                resid,
                attn,
                ..
            } = &mut *sc;
            let x_rows = fit(x, n * hd);
            for (k, r) in pack.rows.clone().enumerate() {
                for j in 0..pack.starts[k + 1] - pack.starts[k] {
                    let t = r * sl + j;
                    let (w, ty, q) = (
                        batch.ids[t] as usize,
                        batch.types[t] as usize,
                        batch.positions[t] as usize,
                    );
                    let row = &mut x_rows[(pack.starts[k] + j) * hd..][..hd];
                    let (w, ty, q) = (
                        &host.word[w * hd..][..hd],
                        &host.token_type[ty * hd..][..hd],
                        &host.position[q * hd..][..hd],
                    );
                    for (i, v) in row.iter_mut().enumerate() {
                        *v = (w[i] + ty[i]) + q[i];
                    }
                }
            }
            host.emb_norm.rows(x_rows, &[]);
            self.drop_rows(self.drop.site(0), x_rows, pack, false);
            for (l, (layer, ls)) in host.layers.iter().zip(&mut g.layers).enumerate() {
                let last = l + 1 == nl;
                // The last layer's second half runs on [CLS] rows only.
                let rows = if last { pack.rows.len() } else { n };
                let qkv = fit(&mut ls.qkv, n * 3 * hd);
                gemm_serial(
                    x,
                    hd,
                    n,
                    &layer.qkv.w,
                    qkv,
                    3 * hd,
                    Epilogue::Bias(&layer.qkv.b),
                );
                // Attention, per (row, head); probabilities kept.
                ls.probs_at.clear();
                let mut total = 0;
                for &len in &batch.lens[pack.rows.clone()] {
                    let queries = if last { len.min(1) } else { len };
                    for _ in 0..self.s.heads {
                        ls.probs_at.push(total);
                        total += (self.s.p + len) * scores_ld(queries);
                    }
                }
                fit(&mut ls.probs, total);
                let ctx = fit(ctx, rows * hd);
                for (k, r) in pack.rows.clone().enumerate() {
                    let len = batch.lens[r];
                    let (queries, out_row) = if last {
                        (len.min(1), k)
                    } else {
                        (len, pack.starts[k])
                    };
                    if queries == 0 {
                        ctx[out_row * hd..(out_row + 1) * hd].fill(0.0);
                        continue;
                    }
                    let q0 = &ls.qkv[pack.starts[k] * 3 * hd..];
                    for head in 0..self.s.heads {
                        let at = ls.probs_at[k * self.s.heads + head];
                        let t = self.s.p + len;
                        let probs = &mut ls.probs[at..at + t * scores_ld(queries)];
                        let dst = &mut ctx[out_row * hd + head * self.s.head_dim..];
                        self.attend(l, r, head, q0, len, queries, probs, dst, attn);
                    }
                }
                // Output dense, dropout, residual (the layer input: on [CLS] rows in the last
                // layer), LayerNorm.
                let mid = fit(mid, rows * hd);
                let d = &layer.attn_out;
                gemm_serial(ctx, hd, rows, &d.w, mid, hd, Epilogue::Bias(&d.b));
                self.drop_rows(self.drop.site(site_of(l, 1)), mid, pack, last);
                let res: &[f32] = if last {
                    let res = fit(resid, rows * hd);
                    gather_cls(x, hd, pack.starts.iter().copied(), res);
                    res
                } else {
                    x
                };
                norm_saving(&layer.attn_norm, mid, res, &mut ls.ln1);
                // Feed-forward, dropout, residual, LayerNorm.
                let wide = layer.inter.w.n();
                let pre = fit(&mut ls.gelu_grad, rows * wide);
                let d = &layer.inter;
                gemm_serial(mid, hd, rows, &d.w, pre, wide, Epilogue::Bias(&d.b));
                gelu_split(pre, fit(act, rows * wide));
                let o = fit(out, rows * hd);
                let d = &layer.out;
                gemm_serial(act, wide, rows, &d.w, o, hd, Epilogue::Bias(&d.b));
                self.drop_rows(self.drop.site(site_of(l, 2)), o, pack, last);
                norm_saving(&layer.out_norm, o, mid, &mut ls.ln2);
                std::mem::swap(x, out);
            }
            if nl == 0 {
                gather_cls(x, hd, pack.starts.iter().copied(), cls);
            } else {
                cls.copy_from_slice(&x[..cls.len()]);
            }
        });
    }

    /// The group's backward from its [CLS] rows' gradient `d_cls`, adding its share of the
    /// prefix gradient (`[L, 2, H, P, D]`) into `g.d_prefix`.
    pub(super) fn backward_group(&self, g: &mut GroupSaved, d_cls: &[f32]) {
        let host = self.host;
        let (hd, heads, d) = (host.hidden, self.s.heads, self.s.head_dim);
        let nl = host.layers.len();
        let GroupSaved {
            pack,
            layers,
            d_prefix,
        } = g;
        let n = pack.tokens();
        zeros(d_prefix, nl * 2 * heads * self.s.p * d);
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let Scratch {
                x: dx,
                ctx: d_ctx,
                mid: d_mid,
                act: dh,
                out: tmp,
                resid,
                d_qkv,
                attn,
                ..
            } = &mut *sc;
            dx.clear();
            dx.extend_from_slice(d_cls);
            for l in (0..nl).rev() {
                let (layer, lb, ls) = (&host.layers[l], &self.back.layers[l], &layers[l]);
                let last = l + 1 == nl;
                let rows = if last { pack.rows.len() } else { n };
                // Output LayerNorm; the residual's gradient is what comes out of it.
                norm_backward(dx, &ls.ln2, &layer.out_norm.g);
                d_mid.clear();
                d_mid.extend_from_slice(dx);
                self.drop_rows(self.drop.site(site_of(l, 2)), dx, pack, last);
                let wide = lb.out.n();
                let dh = fit(dh, rows * wide);
                gemm_serial(dx, hd, rows, &lb.out, dh, wide, Epilogue::None);
                for (d, g) in dh.iter_mut().zip(&ls.gelu_grad) {
                    *d *= g;
                }
                let tmp = fit(tmp, rows * hd);
                gemm_serial(dh, wide, rows, &lb.inter, tmp, hd, Epilogue::None);
                for (a, t) in d_mid.iter_mut().zip(tmp.iter()) {
                    *a += t;
                }
                // Attention output LayerNorm, dropout, dense.
                norm_backward(d_mid, &ls.ln1, &layer.attn_norm.g);
                resid.clear();
                resid.extend_from_slice(d_mid);
                self.drop_rows(self.drop.site(site_of(l, 1)), d_mid, pack, last);
                let d_ctx = fit(d_ctx, rows * hd);
                gemm_serial(d_mid, hd, rows, &lb.attn_out, d_ctx, hd, Epilogue::None);
                // Attention, per (row, head). It writes every token's key and value columns and
                // each query's columns (the last layer: a row's first query only); each row
                // zeroes just what it leaves, not the whole block per layer.
                let d_qkv = fit(d_qkv, n * 3 * hd);
                for (k, r) in pack.rows.clone().enumerate() {
                    let len = self.batch.lens[r];
                    let tokens = &mut d_qkv[pack.starts[k] * 3 * hd..pack.starts[k + 1] * 3 * hd];
                    if len == 0 {
                        tokens.fill(0.0);
                    } else if last {
                        for t in tokens.chunks_exact_mut(3 * hd).skip(1) {
                            t[..hd].fill(0.0);
                        }
                    }
                    let (queries, in_row) = if last {
                        (len.min(1), k)
                    } else {
                        (len, pack.starts[k])
                    };
                    if queries == 0 {
                        continue;
                    }
                    let at = pack.starts[k] * 3 * hd;
                    for head in 0..heads {
                        let p0 = ls.probs_at[k * heads + head];
                        let probs = &ls.probs[p0..p0 + (self.s.p + len) * scores_ld(queries)];
                        let a = AttnBack {
                            q0: &ls.qkv[at..],
                            len,
                            queries,
                            probs,
                            d_ctx: &d_ctx[in_row * hd + head * d..],
                        };
                        self.attend_back(l, r, head, &a, &mut d_qkv[at..], d_prefix, attn);
                    }
                }
                if l == 0 {
                    break; // nothing below the first layer learns
                }
                // The layer input's gradient: through Q, K, V, plus the residual.
                let dx = fit(dx, n * hd);
                gemm_serial(d_qkv, 3 * hd, n, &lb.qkv, dx, hd, Epilogue::None);
                if last {
                    for (k, r) in resid.chunks_exact(hd).enumerate() {
                        let s = pack.starts[k];
                        for (x, r) in dx[s * hd..(s + 1) * hd].iter_mut().zip(r) {
                            *x += r;
                        }
                    }
                } else {
                    for (x, r) in dx.iter_mut().zip(resid.iter()) {
                        *x += r;
                    }
                }
            }
        });
    }

    /// Dropout over the group's hidden rows: all its tokens, or its [CLS] rows (`cls_only`),
    /// numbered as in the padded batch (`[B, S, Hd]`, or `[B, Hd]`).
    fn drop_rows(&self, site: Site, x: &mut [f32], pack: &Packing, cls_only: bool) {
        if !site.on {
            return;
        }
        let (sl, hd) = (self.s.seq, self.host.hidden);
        for (k, r) in pack.rows.clone().enumerate() {
            if cls_only {
                site.apply(&mut x[k * hd..(k + 1) * hd], (r * hd) as u32);
            } else {
                let (a, b) = (pack.starts[k], pack.starts[k + 1]);
                site.apply(&mut x[a * hd..b * hd], (r * sl * hd) as u32);
            }
        }
    }

    /// Layer `l`'s attention for batch row `r`, one head: `q0` is the row's QKV block; the
    /// softmax probabilities (keys × queries, before dropout) go to `probs`, the context of its
    /// first `queries` queries to `dst` (rows Hd apart).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        l: usize,
        r: usize,
        head: usize,
        q0: &[f32],
        len: usize,
        queries: usize,
        probs: &mut [f32],
        dst: &mut [f32],
        sc: &mut AttnScratch,
    ) {
        let (p, d) = (self.s.p, self.s.head_dim);
        let hd = self.s.heads * d;
        let t = p + len;
        // As inference's attention: probabilities kept keys × queries, Pᵀ = [Kp; K]·Qᵀ with the
        // keys read in place and only the queries transposed, the softmax down columns (see
        // `cpu::attention`).
        let qt = sc.b1.get_or_insert_with(PackedB::empty);
        qt.repack_transposed(d, queries, |qi| &q0[qi * 3 * hd + head * d..][..d]);
        let ld = scores_ld(queries);
        let (by_prefix, by_token) = probs.split_at_mut(p * ld);
        gemm_strided(self.block(l, 0, head), d, p, qt, by_prefix, ld);
        gemm_strided(&q0[hd + head * d..], 3 * hd, len, qt, by_token, ld);
        softmax_cols(probs, t, ld, queries, 1.0 / (d as f32).sqrt());
        // The values see a dropped copy.
        sc.a.clear();
        sc.a.extend_from_slice(probs);
        let site = self.drop.site(site_of(l, 0));
        if site.on {
            let first = prob_index(r, head, &self.s);
            let stride = p_max_t(&self.s) as u32;
            drop_apply_cols(site, &mut sc.a, t, ld, queries, first, stride);
        }
        let values = sc.b2.get_or_insert_with(PackedB::empty);
        values.repack(t, d, |j| self.kv_row(l, q0, j, 2, head));
        gemm_strided_t(&sc.a, ld, queries, values, dst, hd);
    }

    /// [`Self::attend`]'s backward: the gradient of the row's queries, keys and values into its
    /// `d_qkv` block, of the prefix's keys and values added into `d_prefix`.
    #[allow(clippy::too_many_arguments)]
    fn attend_back(
        &self,
        l: usize,
        r: usize,
        head: usize,
        a: &AttnBack<'_>,
        d_qkv: &mut [f32],
        d_prefix: &mut [f32],
        sc: &mut AttnScratch,
    ) {
        let (p, d, heads) = (self.s.p, self.s.head_dim, self.s.heads);
        let hd = heads * d;
        let (len, queries, q0, dctx) = (a.len, a.queries, a.q0, a.d_ctx);
        let t = p + len;
        // Keys × queries throughout, as the forward kept P: dP_dropᵀ = [Vp; V]·dctxᵀ (values
        // read in place, dctx transposed) [t, ld].
        let ld = scores_ld(queries);
        let dct = sc.b1.get_or_insert_with(PackedB::empty);
        dct.repack_transposed(d, queries, |qi| &dctx[qi * hd..qi * hd + d]);
        let dp = zeros(&mut sc.d, t * ld);
        let (by_prefix, by_token) = dp.split_at_mut(p * ld);
        gemm_strided(self.block(l, 1, head), d, p, dct, by_prefix, ld);
        gemm_strided(&q0[2 * hd + head * d..], 3 * hd, len, dct, by_token, ld);
        // P_dropᵀ (for dV), then dSᵀ = P ⊙ (dP − Σ dP·P), dP = dP_drop ⊙ mask.
        let site = self.drop.site(site_of(l, 0));
        let (first, stride) = (prob_index(r, head, &self.s), p_max_t(&self.s) as u32);
        let scale = 1.0 / (d as f32).sqrt();
        let pd = zeros(&mut sc.c2, t * ld);
        probs_back_cols(
            site, first, stride, a.probs, &mut sc.d, pd, t, ld, queries, scale,
        );
        // dV = P_dropᵀ · dctx  [t, D]
        let dctx_b = sc.b2.get_or_insert_with(PackedB::empty);
        dctx_b.repack(queries, d, |qi| &dctx[qi * hd..qi * hd + d]);
        let dv = fit(&mut sc.c1, t * d);
        gemm_strided(&sc.c2, ld, t, dctx_b, dv, d);
        // dQ = dS · K  [queries, D] (dSᵀ read transposed), into the query columns.
        let k_rows = sc.b1.get_or_insert_with(PackedB::empty);
        k_rows.repack(t, d, |j| self.kv_row(l, q0, j, 1, head));
        gemm_strided_t(&sc.d, ld, queries, k_rows, &mut d_qkv[head * d..], 3 * hd);
        // dK = dSᵀ · Q  [t, D]
        let q_rows = sc.b2.get_or_insert_with(PackedB::empty);
        q_rows.repack(queries, d, |qi| &q0[qi * 3 * hd + head * d..][..d]);
        let dk = fit(&mut sc.c2, t * d);
        gemm_strided(&sc.d, ld, t, q_rows, dk, d);
        // Keys and values: the prefix's part into d_prefix, the tokens' into d_qkv.
        for (kv, grad) in [(0, &sc.c2), (1, &sc.c1)] {
            let at = (((l * 2 + kv) * heads + head) * p) * d;
            for (x, y) in d_prefix[at..at + p * d].iter_mut().zip(&grad[..p * d]) {
                *x += y;
            }
            for j in 0..len {
                let dst = j * 3 * hd + (1 + kv) * hd + head * d;
                d_qkv[dst..dst + d].copy_from_slice(&grad[(p + j) * d..(p + j + 1) * d]);
            }
        }
    }

    /// Key (`part` 1) or value (2) `j` of one (row, head): the prefix's first, then the row's
    /// tokens from its QKV block `q0`.
    #[inline(always)]
    fn kv_row<'b>(
        &'b self,
        l: usize,
        q0: &'b [f32],
        j: usize,
        part: usize,
        head: usize,
    ) -> &'b [f32] {
        let (p, d) = (self.s.p, self.s.head_dim);
        if j < p {
            &self.block(l, part - 1, head)[j * d..(j + 1) * d]
        } else {
            let hd = self.s.heads * d;
            &q0[(j - p) * 3 * hd + part * hd + head * d..][..d]
        }
    }
}

/// What [`Step::attend_back`] reads for one (row, head).
struct AttnBack<'a> {
    /// The row's QKV block.
    q0: &'a [f32],
    len: usize,
    queries: usize,
    /// The forward's probabilities, keys × queries.
    probs: &'a [f32],
    /// The context's gradient at the row's first query and this head (rows Hd apart).
    d_ctx: &'a [f32],
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

/// `x = LayerNorm(x + add)` row by row, saving x̂ and 1/σ.
fn norm_saving(norm: &Norm, x: &mut [f32], add: &[f32], saved: &mut LnSaved) {
    let n = norm.g.len();
    let xhat = fit(&mut saved.xhat, x.len());
    let inv = fit(&mut saved.inv, x.len() / n);
    let rows = x.chunks_exact_mut(n).zip(add.chunks_exact(n));
    for ((inv, (row, add)), xhat) in inv.iter_mut().zip(rows).zip(xhat.chunks_exact_mut(n)) {
        *inv = norm_row_saving(row, add, &norm.g, &norm.b, norm.eps, xhat);
    }
}

fn norm_backward(dy: &mut [f32], saved: &LnSaved, gamma: &[f32]) {
    let n = gamma.len();
    let rows = dy.chunks_exact_mut(n).zip(saved.xhat.chunks_exact(n));
    for ((row, xhat), &inv) in rows.zip(&saved.inv) {
        norm_back_row(row, xhat, gamma, inv);
    }
}
