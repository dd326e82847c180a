//! Hand-written CPU kernels where candle's are slow: GELU (erf form).
//!
//! candle's `gelu_erf` calls scalar libm `erf` per element (~11% of a forward pass, ~13% of a
//! training step, measured). These loops use only multiply-add, divide, compare and integer bit
//! tricks, so the compiler vectorizes them. The erf approximation is the one PyTorch's vectorized
//! CPU GELU uses (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7), so it costs no parity.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `1.5 · 2²³`: adding it to |x| < 2²² rounds x to the nearest integer (ties to even) and leaves
/// that integer in the low bits of the sum's representation.
const MAGIC: f32 = 12_582_912.0;

/// `e^x` for f32 to within a few ulp, branch-free: `x = n·ln2 + r`, a degree-6 polynomial for
/// `e^r`, and `2^n` built in the exponent bits. Every step is a plain float or integer vector
/// operation: no `mul_add` (a libm call without FMA in the target), no `as i32` (Rust's
/// saturating cast made the compiler fall back to scalar code, one element at a time).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = if x < -87.3 {
        -87.3
    } else if x > 88.7 {
        88.7
    } else {
        x
    };
    let z = x * std::f32::consts::LOG2_E + MAGIC;
    let n = z - MAGIC;
    let r = x - n * 0.693_359_4;
    let r = r + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * (r * r) + r + 1.0;
    // z's bits are MAGIC's plus n: add the exponent bias, shift into place.
    let two_n = z
        .to_bits()
        .wrapping_add(127u32.wrapping_sub(MAGIC.to_bits()))
        << 23;
    e * f32::from_bits(two_n)
}

#[inline(always)]
fn erf(x: f32) -> f32 {
    let sign = x.to_bits() & 0x8000_0000;
    let a = f32::from_bits(x.to_bits() & 0x7fff_ffff);
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let mut r = 1.061_405_4f32 * t - 1.453_152;
    r = r * t + 1.421_413_8;
    r = r * t - 0.284_496_74;
    r = r * t + 0.254_829_6;
    let y = 1.0 - r * t * exp(-a * a);
    f32::from_bits(y.to_bits() | sign)
}

const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * SQRT_HALF))
}

/// d/dx of x·Φ(x): Φ(x) + x·φ(x).
#[inline(always)]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * SQRT_HALF)) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

/// `dst[i] = f(src[i])`, compiled once per instruction set and picked at run time, so the same
/// binary uses AVX-512 where the CPU has it and still runs on any x86-64.
macro_rules! elementwise {
    ($name:ident, $f:ident) => {
        fn $name(src: &[f32]) -> Vec<f32> {
            #[inline(always)]
            fn body(src: &[f32], dst: &mut [f32]) {
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = $f(x);
                }
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(src: &[f32], dst: &mut [f32]) {
                body(src, dst)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(src: &[f32], dst: &mut [f32]) {
                body(src, dst)
            }
            fn run(src: &[f32], dst: &mut [f32]) {
                #[cfg(target_arch = "x86_64")]
                {
                    // SAFETY: `isa::active` never exceeds what the CPU reports.
                    match super::isa::active() {
                        super::isa::Isa::Avx512 => return unsafe { avx512(src, dst) },
                        super::isa::Isa::Avx2 => return unsafe { avx2(src, dst) },
                        super::isa::Isa::Baseline => {}
                    }
                }
                body(src, dst)
            }
            let mut dst = vec![0f32; src.len()];
            // Large inputs are split over rayon's pool (the one gemm uses), small ones stay put.
            const CHUNK: usize = 1 << 15;
            use rayon::prelude::*;
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| run(s, d));
            dst
        }
    };
}

elementwise!(gelu_slice, gelu);
elementwise!(gelu_grad_slice, gelu_grad);

fn map(
    s: &CpuStorage,
    l: &Layout,
    name: &str,
    f: fn(&[f32]) -> Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    let data = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{name}: expected F32"),
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{name}: expected a contiguous input")
    };
    Ok((CpuStorage::F32(f(&data[a..b])), l.shape().clone()))
}

/// GELU, erf form (BERT's `"gelu"`), with a backward.
pub(crate) struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map(s, l, self.name(), gelu_slice)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.contiguous()?.apply_op1_no_bwd(&GeluGrad)?;
        Ok(Some(grad.mul(&d)?))
    }
}

struct GeluGrad;

impl CustomOp1 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map(s, l, self.name(), gelu_grad_slice)
    }
}

/// GELU (erf form) of a tensor: the fast kernel on CPU, candle's elsewhere.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let (e, want) = (exp(x), x.exp());
            assert!(
                ((e - want) / want).abs() < 5e-7,
                "exp({x}) = {e}, want {want}"
            );
            let want = libm_erf(x);
            assert!(
                (erf(x) - want).abs() < 5e-7,
                "erf({x}) = {}, want {want}",
                erf(x)
            );
        }
    }

    /// Reference erf from candle's scalar kernel.
    fn libm_erf(x: f32) -> f32 {
        let t = Tensor::new(&[x], &candle_core::Device::Cpu).unwrap();
        // gelu_erf(x) = x/2 (1 + erf(x/√2))  ⇒  erf(y) = 2·gelu(√2 y)/(√2 y) − 1
        if x == 0.0 {
            return 0.0;
        }
        let z = x * std::f32::consts::SQRT_2;
        let g = (t * std::f64::consts::SQRT_2)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        2.0 * g / z - 1.0
    }

    #[test]
    fn gelu_grad_matches_finite_differences() {
        for i in -60..=60 {
            let x = i as f32 * 0.1;
            let h = 1e-2f32;
            let numeric = (gelu(x + h) - gelu(x - h)) / (2.0 * h);
            assert!((gelu_grad(x) - numeric).abs() < 1e-3, "x = {x}");
        }
    }
}
