//! Dropout as a pure function of (seed, site, element): the backward makes the forward's masks
//! again instead of storing them.

use super::super::cpu::LANES;
use super::Shape;

/// The dropout of one training step.
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
    /// Site `site`'s `(key, threshold, scale)`, or `None` when nothing is dropped: the device
    /// training path (`fused::grad::dropout`) draws its masks with the same hash.
    pub(crate) fn site_params(&self, site: u32) -> Option<(u32, u32, f32)> {
        let s = self.site(site);
        s.on.then_some((s.key, s.threshold, s.scale))
    }

    pub(super) fn site(&self, site: u32) -> Site {
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

/// The factors of elements `0 .. n` of one site: the device training path's mask where it runs
/// on candle's ops (the CUDA kernel `dropout_f32` computes the same).
pub(crate) fn factors(key: u32, threshold: u32, scale: f32, n: usize) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            if hash32(i ^ key) >> 8 >= threshold {
                scale
            } else {
                0.0
            }
        })
        .collect()
}

/// One dropout site (the embeddings, or a layer's attention, attention output or FFN output).
#[derive(Clone, Copy)]
pub(super) struct Site {
    key: u32,
    threshold: u32,
    scale: f32,
    pub on: bool,
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
    pub fn apply(&self, x: &mut [f32], first: u32) {
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
    pub(super) fn drop_apply_cols(site: Site, x: &mut [f32], rows: usize, ld: usize, cols: usize, first: u32, stride: u32) {
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
    pub(super) fn probs_back_cols(
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

/// Site numbers: 0 the embeddings; per layer 0 attention probabilities, 1 attention output,
/// 2 feed-forward output.
pub(super) fn site_of(layer: usize, which: u32) -> u32 {
    1 + layer as u32 * SITES_PER_LAYER + which
}

/// Keys per query in the dropout numbering: P plus the longest row.
pub(super) fn p_max_t(s: &Shape) -> usize {
    s.p + s.seq
}

/// The dropout element index of probability (row, head, query 0, key 0); the others follow
/// with stride [`p_max_t`] per query.
pub(super) fn prob_index(row: usize, head: usize, s: &Shape) -> u32 {
    ((row * s.heads + head) * s.seq * p_max_t(s)) as u32
}
