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
/// The full 6-row tile with A in place runs [`loop_6x16`].
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn kernel_x16<const R: usize, const AT: bool>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    next: *const f32,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    gelu: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if R == 6 && !AT {
        let c = loop_6x16(k, a, lda, b, next);
        for (i, row) in acc.iter_mut().enumerate() {
            *row = [c[2 * i], c[2 * i + 1]];
        }
    } else {
        for p in 0..k {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + PF_STEPS) * 16) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(p * 16) as *const i8);
            let b0 = _mm256_loadu_ps(b.add(p * 16));
            let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*a.add(super::at::<AT>(i, p, lda)));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
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
    next: *const f32,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    gelu: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    if R == 12 && !AT {
        let c = loop_12x32(k, a, lda, b, next);
        for (i, row) in acc.iter_mut().enumerate() {
            *row = [c[2 * i], c[2 * i + 1]];
        }
    } else {
        accumulate_x32::<R, AT>(&mut acc, k, a, lda, b);
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

/// [`kernel_x32`]'s k loop for the other tiles (fewer rows, or A transposed).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn accumulate_x32<const R: usize, const AT: bool>(
    acc: &mut [[__m512; 2]; R],
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
) {
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
}

/// One k step of [`loop_12x32`], `$s` steps (0–3) past the pointers (as [`step6x16`]).
#[rustfmt::skip]
macro_rules! step12x32 {
    ($s:literal) => {
        concat!(
            "prefetcht0 [{b} + {pf} + 128*", $s, "]\n",
            "prefetcht0 [{b} + {pf} + 128*", $s, " + 64]\n",
            "prefetcht1 [{pf2} + 64*", $s, "]\n",
            "vmovups zmm24, [{b} + 128*", $s, "]\n",
            "vmovups zmm25, [{b} + 128*", $s, " + 64]\n",
            "vbroadcastss zmm26, dword ptr [{a0} + 4*", $s, "]\n",
            "vfmadd231ps zmm0, zmm24, zmm26\n",
            "vfmadd231ps zmm1, zmm25, zmm26\n",
            "vbroadcastss zmm27, dword ptr [{a0} + {lda} + 4*", $s, "]\n",
            "vfmadd231ps zmm2, zmm24, zmm27\n",
            "vfmadd231ps zmm3, zmm25, zmm27\n",
            "vbroadcastss zmm28, dword ptr [{a0} + {lda}*2 + 4*", $s, "]\n",
            "vfmadd231ps zmm4, zmm24, zmm28\n",
            "vfmadd231ps zmm5, zmm25, zmm28\n",
            "vbroadcastss zmm29, dword ptr [{a0} + {lda3} + 4*", $s, "]\n",
            "vfmadd231ps zmm6, zmm24, zmm29\n",
            "vfmadd231ps zmm7, zmm25, zmm29\n",
            "vbroadcastss zmm30, dword ptr [{a4} + 4*", $s, "]\n",
            "vfmadd231ps zmm8, zmm24, zmm30\n",
            "vfmadd231ps zmm9, zmm25, zmm30\n",
            "vbroadcastss zmm31, dword ptr [{a4} + {lda} + 4*", $s, "]\n",
            "vfmadd231ps zmm10, zmm24, zmm31\n",
            "vfmadd231ps zmm11, zmm25, zmm31\n",
            "vbroadcastss zmm26, dword ptr [{a4} + {lda}*2 + 4*", $s, "]\n",
            "vfmadd231ps zmm12, zmm24, zmm26\n",
            "vfmadd231ps zmm13, zmm25, zmm26\n",
            "vbroadcastss zmm27, dword ptr [{a4} + {lda3} + 4*", $s, "]\n",
            "vfmadd231ps zmm14, zmm24, zmm27\n",
            "vfmadd231ps zmm15, zmm25, zmm27\n",
            "vbroadcastss zmm28, dword ptr [{a8} + 4*", $s, "]\n",
            "vfmadd231ps zmm16, zmm24, zmm28\n",
            "vfmadd231ps zmm17, zmm25, zmm28\n",
            "vbroadcastss zmm29, dword ptr [{a8} + {lda} + 4*", $s, "]\n",
            "vfmadd231ps zmm18, zmm24, zmm29\n",
            "vfmadd231ps zmm19, zmm25, zmm29\n",
            "vbroadcastss zmm30, dword ptr [{a8} + {lda}*2 + 4*", $s, "]\n",
            "vfmadd231ps zmm20, zmm24, zmm30\n",
            "vfmadd231ps zmm21, zmm25, zmm30\n",
            "vbroadcastss zmm31, dword ptr [{a8} + {lda3} + 4*", $s, "]\n",
            "vfmadd231ps zmm22, zmm24, zmm31\n",
            "vfmadd231ps zmm23, zmm25, zmm31\n",
        )
    };
}

/// The 12 × 32 AVX-512 tile's k loop (A read in place, not transposed), in assembly: A's 12 rows
/// are addressed from three pointers with `lda` and `3·lda` as scaled indices, so a k step is 24
/// FMAs, 14 loads and 3 prefetches (B ahead; one line of `next` into L2); the five pointers and
/// the counter move once per four steps (see [`loop_6x16`]). LLVM, given the same loop in
/// intrinsics, computed each row's address with a chain of adds per step, ~13 extra integer µops
/// that compete with the FMAs for ports 0 and 5 (`--kernels`: the assembly is 5–15% faster per
/// shape; unrolling it by four added 1–3%).
///
/// # Safety
/// As [`kernel_x32`]: `a` holds 12 rows of `k` floats, `lda` apart; `b` a `k` × 32 panel; `next`
/// any address (only prefetched).
#[target_feature(enable = "avx512f")]
unsafe fn loop_12x32(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    next: *const f32,
) -> [__m512; 24] {
    let mut c = [_mm512_setzero_ps(); 24];
    std::arch::asm!(
        "vpxord zmm0, zmm0, zmm0",
        "vpxord zmm1, zmm1, zmm1",
        "vpxord zmm2, zmm2, zmm2",
        "vpxord zmm3, zmm3, zmm3",
        "vpxord zmm4, zmm4, zmm4",
        "vpxord zmm5, zmm5, zmm5",
        "vpxord zmm6, zmm6, zmm6",
        "vpxord zmm7, zmm7, zmm7",
        "vpxord zmm8, zmm8, zmm8",
        "vpxord zmm9, zmm9, zmm9",
        "vpxord zmm10, zmm10, zmm10",
        "vpxord zmm11, zmm11, zmm11",
        "vpxord zmm12, zmm12, zmm12",
        "vpxord zmm13, zmm13, zmm13",
        "vpxord zmm14, zmm14, zmm14",
        "vpxord zmm15, zmm15, zmm15",
        "vpxord zmm16, zmm16, zmm16",
        "vpxord zmm17, zmm17, zmm17",
        "vpxord zmm18, zmm18, zmm18",
        "vpxord zmm19, zmm19, zmm19",
        "vpxord zmm20, zmm20, zmm20",
        "vpxord zmm21, zmm21, zmm21",
        "vpxord zmm22, zmm22, zmm22",
        "vpxord zmm23, zmm23, zmm23",
        // Four k steps per pass, as in `loop_6x16`.
        "mov {n4}, {k}",
        "shr {n4}, 2",
        "jz 4f",
        ".p2align 5",
        "2:",
        step12x32!("0"),
        step12x32!("1"),
        step12x32!("2"),
        step12x32!("3"),
        "add {a0}, 16",
        "add {a4}, 16",
        "add {a8}, 16",
        "add {b}, 512",
        "add {pf2}, 256",
        "dec {n4}",
        "jnz 2b",
        "4:",
        "and {k}, 3",
        "jz 3f",
        "5:",
        step12x32!("0"),
        "add {a0}, 4",
        "add {a4}, 4",
        "add {a8}, 4",
        "add {b}, 128",
        "add {pf2}, 64",
        "dec {k}",
        "jnz 5b",
        "3:",
        k = inout(reg) k => _,
        n4 = out(reg) _,
        a0 = inout(reg) a => _,
        a4 = inout(reg) a.wrapping_add(4 * lda) => _,
        a8 = inout(reg) a.wrapping_add(8 * lda) => _,
        b = inout(reg) b => _,
        pf2 = inout(reg) next => _,
        lda = in(reg) lda * 4,
        lda3 = in(reg) lda * 12,
        pf = const PF_STEPS * 128,
        out("zmm0") c[0],
        out("zmm1") c[1],
        out("zmm2") c[2],
        out("zmm3") c[3],
        out("zmm4") c[4],
        out("zmm5") c[5],
        out("zmm6") c[6],
        out("zmm7") c[7],
        out("zmm8") c[8],
        out("zmm9") c[9],
        out("zmm10") c[10],
        out("zmm11") c[11],
        out("zmm12") c[12],
        out("zmm13") c[13],
        out("zmm14") c[14],
        out("zmm15") c[15],
        out("zmm16") c[16],
        out("zmm17") c[17],
        out("zmm18") c[18],
        out("zmm19") c[19],
        out("zmm20") c[20],
        out("zmm21") c[21],
        out("zmm22") c[22],
        out("zmm23") c[23],
        out("zmm24") _,
        out("zmm25") _,
        out("zmm26") _,
        out("zmm27") _,
        out("zmm28") _,
        out("zmm29") _,
        out("zmm30") _,
        out("zmm31") _,
        options(nostack, readonly),
    );
    c
}

/// One k step of [`loop_6x16`], `$s` steps (0–3) past the pointers: B's row at `64·$s` bytes,
/// A's column at `4·$s`, the prefetches as far ahead.
#[rustfmt::skip]
macro_rules! step6x16 {
    ($s:literal) => {
        concat!(
            "prefetcht0 [{b} + {pf} + 64*", $s, "]\n",
            "prefetcht1 [{pf2} + 64*", $s, "]\n",
            "vmovups ymm12, [{b} + 64*", $s, "]\n",
            "vmovups ymm13, [{b} + 64*", $s, " + 32]\n",
            "vbroadcastss ymm14, dword ptr [{a0} + 4*", $s, "]\n",
            "vfmadd231ps ymm0, ymm12, ymm14\n",
            "vfmadd231ps ymm1, ymm13, ymm14\n",
            "vbroadcastss ymm15, dword ptr [{a0} + {lda} + 4*", $s, "]\n",
            "vfmadd231ps ymm2, ymm12, ymm15\n",
            "vfmadd231ps ymm3, ymm13, ymm15\n",
            "vbroadcastss ymm14, dword ptr [{a0} + {lda}*2 + 4*", $s, "]\n",
            "vfmadd231ps ymm4, ymm12, ymm14\n",
            "vfmadd231ps ymm5, ymm13, ymm14\n",
            "vbroadcastss ymm15, dword ptr [{a3} + 4*", $s, "]\n",
            "vfmadd231ps ymm6, ymm12, ymm15\n",
            "vfmadd231ps ymm7, ymm13, ymm15\n",
            "vbroadcastss ymm14, dword ptr [{a3} + {lda} + 4*", $s, "]\n",
            "vfmadd231ps ymm8, ymm12, ymm14\n",
            "vfmadd231ps ymm9, ymm13, ymm14\n",
            "vbroadcastss ymm15, dword ptr [{a3} + {lda}*2 + 4*", $s, "]\n",
            "vfmadd231ps ymm10, ymm12, ymm15\n",
            "vfmadd231ps ymm11, ymm13, ymm15\n",
        )
    };
}

/// The 6 × 16 AVX2 tile's k loop (A read in place), in assembly like [`loop_12x32`]: rows 0–2
/// and 3–5 from two pointers with `lda` as a scaled index. Four k steps a pass: the pointers and
/// the counter move once per pass and immediate offsets address the steps between, 1.25 integer
/// µops a step where the one-step loop had 5 (and LLVM's intrinsics 7). On Intel cores the
/// integer ALUs share ports 0 and 1 with the 256-bit FMAs, so these µops took FMA slots:
/// unrolled, `--kernels` +3–6% per shape (93–95% of `fma_peak`), the AVX2 forward +6–7%.
///
/// # Safety
/// As [`kernel_x16`]: `a` holds 6 rows of `k` floats, `lda` apart; `b` a `k` × 16 panel; `next`
/// any address (only prefetched).
#[target_feature(enable = "avx2,fma")]
unsafe fn loop_6x16(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    next: *const f32,
) -> [__m256; 12] {
    let mut c = [_mm256_setzero_ps(); 12];
    std::arch::asm!(
        "vxorps ymm0, ymm0, ymm0",
        "vxorps ymm1, ymm1, ymm1",
        "vxorps ymm2, ymm2, ymm2",
        "vxorps ymm3, ymm3, ymm3",
        "vxorps ymm4, ymm4, ymm4",
        "vxorps ymm5, ymm5, ymm5",
        "vxorps ymm6, ymm6, ymm6",
        "vxorps ymm7, ymm7, ymm7",
        "vxorps ymm8, ymm8, ymm8",
        "vxorps ymm9, ymm9, ymm9",
        "vxorps ymm10, ymm10, ymm10",
        "vxorps ymm11, ymm11, ymm11",
        // Four k steps per pass: the row and panel pointers move once per four steps (an
        // immediate offset addresses the others), so the FMA ports see 1.25 integer µops a
        // step instead of 5. The last k % 4 steps run one at a time.
        "mov {n4}, {k}",
        "shr {n4}, 2",
        "jz 4f",
        ".p2align 5",
        "2:",
        step6x16!("0"),
        step6x16!("1"),
        step6x16!("2"),
        step6x16!("3"),
        "add {a0}, 16",
        "add {a3}, 16",
        "add {b}, 256",
        "add {pf2}, 256",
        "dec {n4}",
        "jnz 2b",
        "4:",
        "and {k}, 3",
        "jz 3f",
        "5:",
        step6x16!("0"),
        "add {a0}, 4",
        "add {a3}, 4",
        "add {b}, 64",
        "add {pf2}, 64",
        "dec {k}",
        "jnz 5b",
        "3:",
        k = inout(reg) k => _,
        n4 = out(reg) _,
        a0 = inout(reg) a => _,
        a3 = inout(reg) a.wrapping_add(3 * lda) => _,
        b = inout(reg) b => _,
        pf2 = inout(reg) next => _,
        lda = in(reg) lda * 4,
        pf = const PF_STEPS * 64,
        out("ymm0") c[0],
        out("ymm1") c[1],
        out("ymm2") c[2],
        out("ymm3") c[3],
        out("ymm4") c[4],
        out("ymm5") c[5],
        out("ymm6") c[6],
        out("ymm7") c[7],
        out("ymm8") c[8],
        out("ymm9") c[9],
        out("ymm10") c[10],
        out("ymm11") c[11],
        out("ymm12") _,
        out("ymm13") _,
        out("ymm14") _,
        out("ymm15") _,
        options(nostack, readonly),
    );
    c
}
