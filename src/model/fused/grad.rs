//! The device training path's own ops (f32): dropout as a pure function of (seed, site, element),
//! and the backward passes of the fused ops. On a CUDA tensor each is one kernel
//! (`cuda_train.rs`); anywhere else the same math in candle ops, which is how the training path is
//! tested on machines without a GPU.

use candle_core::{Result, Tensor, D};

use super::super::cpu_train::{drop_factors, DropMask};

/// One dropout site of a step: the embeddings (0), or a layer's attention probabilities,
/// attention output and FFN output (`1 + 3 l + 0, 1, 2`).
#[derive(Clone, Copy)]
pub(crate) struct Site {
    pub mask: DropMask,
    pub site: u32,
}

/// `x` with the site's dropout: each element kept (× 1/(1 − p)) or zeroed by a hash of its flat
/// index, so the backward applies the same mask to the gradient by calling this again.
pub(crate) fn dropout(x: &Tensor, at: Site) -> Result<Tensor> {
    let Some((key, threshold, scale)) = at.mask.site_params(at.site) else {
        return Ok(x.clone());
    };
    let x = x.contiguous()?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda_train::dropout(&x, key, threshold, scale);
    }
    let m = drop_factors(key, threshold, scale, x.elem_count());
    x.mul(&Tensor::from_vec(m, x.shape(), x.device())?)
}

/// `dx` of `y = LayerNorm(x)` with scale `gamma`, given `dy`.
pub(crate) fn ln_grad(x: &Tensor, dy: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda_train::ln_grad(&x.contiguous()?, &dy.contiguous()?, gamma, eps);
    }
    super::super::train_ops::layer_norm_grad(x, &dy.broadcast_mul(gamma)?, eps)
}

/// `dx` of `p = softmax(x · scale + mask)` over the last dimension, given `p` and `dp`.
pub(crate) fn softmax_grad(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() {
        return super::cuda_train::softmax_grad(&p.contiguous()?, &dp.contiguous()?, scale);
    }
    let dot = (dp * p)?.sum_keepdim(D::Minus1)?;
    (p * dp.broadcast_sub(&dot)?)? * scale
}

/// `dx` of `y = gelu(x + bias)` (erf form), given `dy`; `x`, `dy`: `[N, I]`.
pub(crate) fn bias_gelu_grad(x: &Tensor, bias: &Tensor, dy: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda_train::bias_gelu_grad(&x.contiguous()?, bias, &dy.contiguous()?);
    }
    use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
    let u = x.broadcast_add(bias)?;
    let cdf = (((&u * FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    // φ(u) = exp(−u²/2) / √(2π)
    let pdf = ((u.sqr()? * -0.5)?.exp()? * (0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2))?;
    dy * (cdf + (u * pdf)?)?
}
