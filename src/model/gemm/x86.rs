//! The x86 micro-kernels (AVX2 + FMA and AVX-512) and the FMA-peak loop, for `gemm.rs`.

use super::super::kernels::simd::{gelu256, gelu512};
use std::arch::x86_64::*;

/// Independent FMA chains per iteration: enough to cover FMA latency × ports.
pub(super) const FMA_CHAINS: usize = 12;

/// How far ahead in B (in k steps) the kernels prefetch. The weights (42 MB for MiniLM) live in
/// L3, not L2: a panel's first tile would otherwise wait on each line, and the hardware
/// prefetcher stops at every 4 KB page. Measured: 8 × 16 +9–11%, 32 × 64 +3–4% (AVX-512), 8 × 16
/// +5% (AVX2); 8, 16 or 32 steps ahead made no difference.
const PF_STEPS: usize = 16;

/// `iters` × FMA_CHAINS independent FMAs on full registers (for [`super::measure_peak`]).
pub(super) unsafe fn fma_loop(isa: super::Isa, iters: usize) -> f32 {
    #[target_feature(enable = "avx512f")]
    unsafe fn z(iters: usize) -> f32 {
        let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); FMA_CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn y(iters: usize) -> f32 {
        let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); FMA_CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut out = [0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
        _mm256_storeu_ps(out.as_mut_ptr(), sum);
        out.iter().sum()
    }
    match isa {
        super::Isa::Avx512 => z(iters),
        _ => y(iters),
    }
}

/// AVX2 + FMA, R ≤ 6 rows × 16 columns: 2R accumulators, 2 B loads and R broadcasts per k.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_x16<const R: usize, const AT: bool>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    gelu: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for p in 0..k {
        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + PF_STEPS) * 16) as *const i8);
        let b0 = _mm256_loadu_ps(b.add(p * 16));
        let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*a.add(super::at::<AT>(i, p, lda)));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    let (bias0, bias1) = if bias.is_null() {
        (_mm256_setzero_ps(), _mm256_setzero_ps())
    } else {
        (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)))
    };
    for (i, row) in acc.iter().enumerate() {
        let out = c.add(i * ldc);
        let (mut v0, mut v1) = (_mm256_add_ps(row[0], bias0), _mm256_add_ps(row[1], bias1));
        if gelu {
            (v0, v1) = (gelu256(v0), gelu256(v1));
        }
        _mm256_storeu_ps(out, v0);
        _mm256_storeu_ps(out.add(8), v1);
    }
}

/// AVX-512, R ≤ 12 rows × 32 columns: 2R accumulators, 2 B loads and R broadcasts per k.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_x32<const R: usize, const AT: bool>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    gelu: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..k {
        // (Prefetches never fault: past the last panel they are harmless.)
        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + PF_STEPS) * 32) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + PF_STEPS) * 32 + 16) as *const i8);
        let b0 = _mm512_loadu_ps(b.add(p * 32));
        let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(super::at::<AT>(i, p, lda)));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    let (bias0, bias1) = if bias.is_null() {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    } else {
        (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)))
    };
    for (i, row) in acc.iter().enumerate() {
        let out = c.add(i * ldc);
        let (mut v0, mut v1) = (_mm512_add_ps(row[0], bias0), _mm512_add_ps(row[1], bias1));
        if gelu {
            (v0, v1) = (gelu512(v0), gelu512(v1));
        }
        _mm512_storeu_ps(out, v0);
        _mm512_storeu_ps(out.add(16), v1);
    }
}
