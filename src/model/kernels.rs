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
// The explicit comparisons are the form every caller's vector loop was measured with; `f32::clamp`
// (same results, NaN included) would be a codegen change to measure, not a style fix.
#[allow(clippy::manual_clamp)]
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

/// The same GELU on whole registers, for the GEMM epilogue (applied to the accumulators before
/// they are stored) and the training passes: explicit FMAs, and on AVX-512 a reciprocal estimate
/// refined by one Newton step instead of a divide. The scalar code above, vectorized by the
/// compiler, re-read each stored tile and ran mul-then-add chains and a divide: GELU took 11% of
/// the FFN-in product (`prefixd bench --kernels`, `ffn_in+gelu` vs `ffn_in`).
///
/// With `z = |x|/√2`, `t = 1/(1 + p·z)` and `q = ½·|x|·poly(t)·t·e^(−z²)` (so `erf(z) = 1 − 2q/|x|`):
/// `gelu(x) = max(x, 0) − q` — Abramowitz & Stegun 7.1.26 as above, with no sign juggling.
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;

    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        1.061_405_4,
        -1.453_152,
        1.421_413_8,
        -0.284_496_74,
        0.254_829_6,
    ];
    const EXP_P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5e-1,
    ];

    /// e^x for x ≤ 0 (the exponent here is −z²), as `super::exp`.
    #[inline(always)]
    unsafe fn exp_neg512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.3));
        let z = _mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(super::MAGIC),
        );
        let n = _mm512_sub_ps(z, _mm512_set1_ps(super::MAGIC));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let e = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let bias = 127u32.wrapping_sub(super::MAGIC.to_bits()) as i32;
        let two_n = _mm512_slli_epi32(
            _mm512_add_epi32(_mm512_castps_si512(z), _mm512_set1_epi32(bias)),
            23,
        );
        _mm512_mul_ps(e, _mm512_castsi512_ps(two_n))
    }

    /// `(y, e)` with `erf(|x|/√2) = 1 − y` and `e = e^(−x²/2)`.
    #[inline(always)]
    unsafe fn erfc_parts512(x: __m512) -> (__m512, __m512) {
        let z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(super::SQRT_HALF));
        let den = _mm512_fmadd_ps(z, _mm512_set1_ps(P), _mm512_set1_ps(1.0));
        let t0 = _mm512_rcp14_ps(den);
        let t = _mm512_fmadd_ps(t0, _mm512_fnmadd_ps(den, t0, _mm512_set1_ps(1.0)), t0);
        let mut r = _mm512_set1_ps(A[0]);
        for c in &A[1..] {
            r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(*c));
        }
        let e = exp_neg512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z));
        (_mm512_mul_ps(_mm512_mul_ps(r, t), e), e)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn gelu512(x: __m512) -> __m512 {
        let (y, _) = erfc_parts512(x);
        gelu512_of(x, y)
    }

    #[inline(always)]
    unsafe fn gelu512_of(x: __m512, y: __m512) -> __m512 {
        let q = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5), _mm512_abs_ps(x)), y);
        _mm512_sub_ps(_mm512_max_ps(x, _mm512_setzero_ps()), q)
    }

    /// d/dx GELU = Φ(x) + x·φ(x); Φ(x) = 1 − y/2 for x ≥ 0, y/2 below; φ(x) = e/√(2π).
    #[inline(always)]
    unsafe fn gelu_grad512_of(x: __m512, y: __m512, e: __m512) -> __m512 {
        let half = _mm512_mul_ps(_mm512_set1_ps(0.5), y);
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        let cdf = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.0), half), half);
        _mm512_fmadd_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(super::INV_SQRT_2PI)),
            e,
            cdf,
        )
    }

    #[inline(always)]
    unsafe fn exp_neg256(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let z = _mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(super::MAGIC),
        );
        let n = _mm256_sub_ps(z, _mm256_set1_ps(super::MAGIC));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let e = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let bias = 127u32.wrapping_sub(super::MAGIC.to_bits()) as i32;
        let two_n = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_castps_si256(z), _mm256_set1_epi32(bias)),
            23,
        );
        _mm256_mul_ps(e, _mm256_castsi256_ps(two_n))
    }

    /// AVX2: a true divide (its 12-bit reciprocal estimate plus one step is not quite f32).
    #[inline(always)]
    unsafe fn erfc_parts256(x: __m256) -> (__m256, __m256) {
        let z = _mm256_mul_ps(
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), x),
            _mm256_set1_ps(super::SQRT_HALF),
        );
        let den = _mm256_fmadd_ps(z, _mm256_set1_ps(P), _mm256_set1_ps(1.0));
        let t = _mm256_div_ps(_mm256_set1_ps(1.0), den);
        let mut r = _mm256_set1_ps(A[0]);
        for c in &A[1..] {
            r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(*c));
        }
        let e = exp_neg256(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), z));
        (_mm256_mul_ps(_mm256_mul_ps(r, t), e), e)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn gelu256(x: __m256) -> __m256 {
        let (y, _) = erfc_parts256(x);
        gelu256_of(x, y)
    }

    #[inline(always)]
    unsafe fn gelu256_of(x: __m256, y: __m256) -> __m256 {
        let ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
        let q = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), ax), y);
        _mm256_sub_ps(_mm256_max_ps(x, _mm256_setzero_ps()), q)
    }

    #[inline(always)]
    unsafe fn gelu_grad256_of(x: __m256, y: __m256, e: __m256) -> __m256 {
        let half = _mm256_mul_ps(_mm256_set1_ps(0.5), y);
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
        let cdf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0), half), half, neg);
        _mm256_fmadd_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(super::INV_SQRT_2PI)),
            e,
            cdf,
        )
    }

    /// [`super::gelu_split`] over whole vectors; returns how many elements it did.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn split512(buf: &mut [f32], act: &mut [f32]) -> usize {
        let whole = buf.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            let (b, a) = (buf.as_mut_ptr().add(i), act.as_mut_ptr().add(i));
            let x = _mm512_loadu_ps(b);
            let (y, e) = erfc_parts512(x);
            _mm512_storeu_ps(a, gelu512_of(x, y));
            _mm512_storeu_ps(b, gelu_grad512_of(x, y, e));
        }
        whole
    }

    /// [`super::gelu_split`] over whole vectors; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn split256(buf: &mut [f32], act: &mut [f32]) -> usize {
        let whole = buf.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            let (b, a) = (buf.as_mut_ptr().add(i), act.as_mut_ptr().add(i));
            let x = _mm256_loadu_ps(b);
            let (y, e) = erfc_parts256(x);
            _mm256_storeu_ps(a, gelu256_of(x, y));
            _mm256_storeu_ps(b, gelu_grad256_of(x, y, e));
        }
        whole
    }
}

/// `act = gelu(x)` and `buf = gelu'(x)` for `x` the values `buf` held: one pass, as the two
/// share their erf and exp (the training forward keeps the derivative for its backward, not the
/// pre-activation). The vector lanes are those of the GEMM epilogue's GELU; the scalar tail is
/// [`gelu`] and [`gelu_grad`] (the tests hold both to the scalar functions).
pub(crate) fn gelu_split(buf: &mut [f32], act: &mut [f32]) {
    assert_eq!(buf.len(), act.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: each branch runs only on the ISA `isa::active` says the CPU has; the vector loops
    // stay below the slices' length.
    unsafe {
        match super::isa::active() {
            super::isa::Isa::Avx512 => done = simd::split512(buf, act),
            super::isa::Isa::Avx2 => done = simd::split256(buf, act),
            super::isa::Isa::Baseline => {}
        }
    }
    for (x, a) in buf[done..].iter_mut().zip(&mut act[done..]) {
        *a = gelu(*x);
        *x = gelu_grad(*x);
    }
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

    /// The register versions (GEMM epilogue, training's split) against the scalar ones, for every ISA this CPU has,
    /// whichever the process runs: negative, tiny, large and saturating inputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_gelu_matches_scalar() {
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.0037)
            .chain([
                0.0, -0.0, 1e-30, -1e-30, 4.4e-6, -4.4e-6, 30.0, -30.0, 1e4, -1e4,
            ])
            .collect();
        let check = |x: f32, got: f32| {
            let want = gelu(x);
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu({x}) = {got}, scalar {want}"
            );
        };
        let check_grad = |x: f32, got: f32| {
            let want = gelu_grad(x);
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu'({x}) = {got}, scalar {want}"
            );
        };
        if is_x86_feature_detected!("avx512f") {
            for &x in &xs {
                let mut out = [0f32; 16];
                // SAFETY: AVX-512 checked above.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), simd::gelu512(_mm512_set1_ps(x))) };
                check(x, out[0]);
                let (mut buf, mut act) = ([x; 16], [0f32; 16]);
                assert_eq!(unsafe { simd::split512(&mut buf, &mut act) }, 16);
                check(x, act[0]);
                check_grad(x, buf[0]);
            }
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            for &x in &xs {
                let mut out = [0f32; 8];
                // SAFETY: AVX2 and FMA checked above.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), simd::gelu256(_mm256_set1_ps(x))) };
                check(x, out[0]);
                let (mut buf, mut act) = ([x; 8], [0f32; 8]);
                assert_eq!(unsafe { simd::split256(&mut buf, &mut act) }, 8);
                check(x, act[0]);
                check_grad(x, buf[0]);
            }
        }
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
