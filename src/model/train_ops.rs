//! What training needs from the encoder that inference does not: gradients through the frozen
//! model to the prefix, and dropout.
//!
//! candle 0.11's fused `layer_norm` and `softmax_last_dim` have no backward: used in training they
//! silently cut the graph, and the prefix would get no gradient. And a plain `matmul` against a
//! frozen weight still computes the weight's gradient (a wasted second matmul per layer). So the
//! training path uses these custom ops instead: the same fused forward kernels, plus a hand-written
//! backward that returns only the gradient with respect to the activations.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Contiguous F32 data of a custom op's input.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{op}: expected F32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

/// Runs a candle computation on a custom op's input and hands back the result's storage.
/// Costs a copy in and out, which is small next to the matmul it wraps.
pub(crate) fn via_tensor(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(CpuStorage, Shape)> {
    let x = Tensor::from_slice(f32_slice(s, l, op)?, l.shape(), &candle_core::Device::Cpu)?;
    let y = f(&x)?.contiguous()?;
    let shape = y.shape().clone();
    let storage = match &*y.storage_and_layout().0 {
        candle_core::Storage::Cpu(c) => c.clone(),
        _ => candle_core::bail!("{op}: expected CPU storage"),
    };
    Ok((storage, shape))
}

/// The same wrapping for a CUDA input: the op's input copied into a tensor (device to device),
/// the candle computation run on it, its result copied out as the op's storage.
#[cfg(feature = "cuda")]
pub(crate) fn via_tensor_cuda(
    s: &candle_core::CudaStorage,
    l: &Layout,
    op: &str,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::{op::BackpropOp, CudaStorage, Storage};
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous input")
    };
    let dev = s.device.clone();
    // SAFETY: filled by the copy below.
    let mut copy = unsafe { dev.alloc::<f32>(b - a)? };
    dev.memcpy_dtod(&s.as_cuda_slice::<f32>()?.slice(a..b), &mut copy)?;
    let x = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(copy, dev.clone())),
        l.shape(),
        BackpropOp::none(),
        false,
    );
    let y = f(&x)?.contiguous()?;
    let (st, yl) = y.storage_and_layout();
    let (Storage::Cuda(c), Some((ya, yb))) = (&*st, yl.contiguous_offsets()) else {
        candle_core::bail!("{op}: expected a contiguous CUDA result")
    };
    // SAFETY: filled by the copy below.
    let mut out = unsafe { dev.alloc::<f32>(yb - ya)? };
    dev.memcpy_dtod(&c.as_cuda_slice::<f32>()?.slice(ya..yb), &mut out)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), y.shape().clone()))
}

/// `x · Wᵀ + b` with a frozen weight: the backward returns `dy · W` and nothing for W or b.
pub(crate) struct FrozenLinear {
    pub weight_t: Tensor,
    pub bias: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        via_tensor(s, l, self.name(), |x| {
            x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_cuda(s, l, self.name(), |x| {
            x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dy [N, out] · W [out, in]; weight_t is [in, out], so W = weight_tᵀ.
        Ok(Some(grad.matmul(&self.weight_t.t()?)?))
    }
}

/// Softmax over the last dimension; backward `y ⊙ (dy − Σ dy ⊙ y)`.
pub(crate) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        via_tensor(s, l, self.name(), candle_nn::ops::softmax_last_dim)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_cuda(s, l, self.name(), candle_nn::ops::softmax_last_dim)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad.broadcast_sub(&dot)?)?))
    }
}

/// LayerNorm over the last dimension with frozen scale and shift.
pub(crate) struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        via_tensor(s, l, self.name(), |x| {
            candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_cuda(s, l, self.name(), |x| {
            candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.broadcast_mul(&self.weight)?;
        Ok(Some(layer_norm_grad(arg, &g, self.eps)?))
    }
}

/// `dx` of LayerNorm given its input `x` and `g = dy ⊙ γ`: [`LayerNormGrad`] on the CPU, the same
/// formula in tensor ops elsewhere.
pub(crate) fn layer_norm_grad(x: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    if !x.device().is_cpu() {
        return layer_norm_grad_composed(&x, &g, eps);
    }
    x.apply_op2_no_bwd(&g, &LayerNormGrad { eps })
}

/// `dx` of LayerNorm given `x` and `g = dy ⊙ γ`, row by row:
/// `dx = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let g = f32_slice(gs, gl, self.name())?;
        let n = xl.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; x.len()];
        for ((xr, gr), dr) in x
            .chunks_exact(n)
            .zip(g.chunks_exact(n))
            .zip(dx.chunks_exact_mut(n))
        {
            let mean = xr.iter().sum::<f32>() / n as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            let (mut g_mean, mut gx_mean) = (0f32, 0f32);
            for (xv, gv) in xr.iter().zip(gr) {
                g_mean += gv;
                gx_mean += gv * (xv - mean) * inv;
            }
            g_mean /= n as f32;
            gx_mean /= n as f32;
            for ((d, xv), gv) in dr.iter_mut().zip(xr).zip(gr) {
                *d = (gv - g_mean - (xv - mean) * inv * gx_mean) * inv;
            }
        }
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// [`LayerNormGrad`]'s formula in tensor ops, for devices without its CPU kernel.
fn layer_norm_grad_composed(x: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let inv = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    let x_hat = centered.broadcast_mul(&inv)?;
    let g_mean = g.mean_keepdim(D::Minus1)?;
    let gx_mean = (g * &x_hat)?.mean_keepdim(D::Minus1)?;
    g.broadcast_sub(&g_mean)?
        .sub(&x_hat.broadcast_mul(&gx_mean)?)?
        .broadcast_mul(&inv)
}

/// Inverted dropout with its own seeded generator, so a training run is reproducible.
pub struct Dropout {
    p: f32,
    rng: StdRng,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Self {
        Self {
            p,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A counter-based mask for the CPU training path, its seed drawn from this generator so a
    /// run repeats from the trainer's seed.
    pub(crate) fn next_mask(&mut self) -> super::cpu_train::DropMask {
        super::cpu_train::DropMask {
            p: self.p,
            seed: self.rng.random::<u32>(),
        }
    }

    pub fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        if !x.device().is_cpu() {
            // On a GPU the mask is drawn there (the device's generator, seeded by the trainer):
            // a host-drawn mask would cross the bus on every layer.
            let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
            let mask = (u.ge(self.p as f64)?.to_dtype(x.dtype())? * (1.0 / keep as f64))?;
            return x.mul(&mask);
        }
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if self.rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        x.mul(&mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Central differences of `f` at `x`, one coordinate at a time.
    fn numeric_grad(x: &[f32], shape: &[usize], f: impl Fn(&Tensor) -> f32) -> Vec<f32> {
        let h = 1e-2;
        (0..x.len())
            .map(|i| {
                let mut a = x.to_vec();
                let mut b = x.to_vec();
                a[i] += h;
                b[i] -= h;
                let ta = Tensor::from_vec(a, shape, &Device::Cpu).unwrap();
                let tb = Tensor::from_vec(b, shape, &Device::Cpu).unwrap();
                (f(&ta) - f(&tb)) / (2.0 * h)
            })
            .collect()
    }

    fn check(op_name: &str, apply: impl Fn(&Tensor) -> Tensor) {
        let shape = [3usize, 5];
        let x: Vec<f32> = (0..15).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        // A fixed random-ish weighting makes the loss sensitive to every output.
        let w: Vec<f32> = (0..15).map(|i| ((i * 5 % 7) as f32 - 3.0) / 2.0).collect();
        let w = Tensor::from_vec(w, &shape, &Device::Cpu).unwrap();
        let loss = |t: &Tensor| apply(t).mul(&w).unwrap().sum_all().unwrap();
        let var =
            Var::from_tensor(&Tensor::from_vec(x.clone(), &shape, &Device::Cpu).unwrap()).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let got: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = numeric_grad(&x, &shape, |t| loss(t).to_scalar::<f32>().unwrap());
        for (g, n) in got.iter().zip(&want) {
            assert!(
                (g - n).abs() < 2e-2 * (1.0 + n.abs()),
                "{op_name}: analytic {got:?} vs numeric {want:?}"
            );
        }
    }

    #[test]
    fn custom_ops_have_correct_gradients() {
        let dev = Device::Cpu;
        let wt = Tensor::from_vec(
            (0..20)
                .map(|i| (i as f32 - 10.0) / 10.0)
                .collect::<Vec<_>>(),
            (5, 4),
            &dev,
        )
        .unwrap();
        let b = Tensor::from_vec(vec![0.1f32, -0.2, 0.3, 0.0], 4, &dev).unwrap();
        // FrozenLinear maps [3,5] → [3,4]; pad the loss weighting by summing a projection back.
        let back = Tensor::from_vec(
            (0..20)
                .map(|i| ((i * 3 % 5) as f32 - 2.0) / 4.0)
                .collect::<Vec<_>>(),
            (4, 5),
            &dev,
        )
        .unwrap();
        check("frozen-linear", |x| {
            x.apply_op1(FrozenLinear {
                weight_t: wt.clone(),
                bias: b.clone(),
            })
            .unwrap()
            .matmul(&back)
            .unwrap()
        });
        check("softmax", |x| x.apply_op1(Softmax).unwrap());
        let gamma = Tensor::from_vec(vec![1.0f32, 0.5, -1.0, 2.0, 1.5], 5, &dev).unwrap();
        let beta = Tensor::from_vec(vec![0.0f32, 0.1, 0.2, 0.3, 0.4], 5, &dev).unwrap();
        check("layer-norm", |x| {
            x.apply_op1(LayerNorm {
                weight: gamma.clone(),
                bias: beta.clone(),
                eps: 1e-5,
            })
            .unwrap()
        });
        // The composed backward used off the CPU gives the CPU kernel's gradient.
        let x = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let kernel = x
            .apply_op2_no_bwd(&g, &LayerNormGrad { eps: 1e-5 })
            .unwrap();
        let composed = layer_norm_grad_composed(&x, &g, 1e-5).unwrap();
        let d = (kernel - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn custom_forwards_match_the_definitions() {
        // Each op's forward against its textbook formula, computed here in f64 (not against the
        // candle kernel the op wraps, which would compare the kernel with itself).
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (4, 6), &dev).unwrap();
        let rows: Vec<Vec<f32>> = x.to_vec2().unwrap();
        let got: Vec<Vec<f32>> = x.apply_op1(Softmax).unwrap().to_vec2().unwrap();
        for (r, g) in rows.iter().zip(&got) {
            let max = r.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let sum: f64 = r.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (v, g) in r.iter().zip(g) {
                let want = (*v as f64 - max).exp() / sum;
                assert!((want - *g as f64).abs() < 1e-6, "softmax {g} vs {want}");
            }
        }
        let (gamma, beta) = (
            vec![1.5f32, -0.5, 2.0, 1.0, 0.25, 1.0],
            vec![0.1f32, 0.0, -0.2, 0.3, 0.0, 0.5],
        );
        let ln = x
            .apply_op1(LayerNorm {
                weight: Tensor::new(gamma.as_slice(), &dev).unwrap(),
                bias: Tensor::new(beta.as_slice(), &dev).unwrap(),
                eps: 1e-5,
            })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, g) in rows.iter().zip(&ln) {
            let n = r.len() as f64;
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            for (i, (v, g)) in r.iter().zip(g).enumerate() {
                let want =
                    (*v as f64 - mean) / (var + 1e-5).sqrt() * gamma[i] as f64 + beta[i] as f64;
                assert!((want - *g as f64).abs() < 1e-5, "layer norm {g} vs {want}");
            }
        }
    }
}
