//! Matrix multiplication for the CPU path: `C[m, n] += A[m, k] · B[k, n]`, B a frozen weight.
//!
//! Why our own: the `gemm` crate reached ~68 GFLOP/s on a 2-core AVX2 machine where OpenBLAS does
//! 120–140 at the encoder's shapes (issue 8), and weights that never change can be laid out once.
//! The structure is the classic one (GotoBLAS/BLIS):
//! - B is packed at load into panels of NR columns, k-major, so the micro-kernel streams it with
//!   unit stride (`PackedB`);
//! - A is packed per call into blocks of MC rows, as micro-panels of MR rows, k-major (one
//!   broadcast per row and k);
//! - a micro-kernel keeps an MR × NR tile of C in registers over the whole k loop: 6 × 16 with
//!   AVX2 + FMA (12 ymm accumulators), 12 × 32 with AVX-512 (24 zmm);
//! - the two cores split row blocks, or, when there are too few rows (a single short request),
//!   column panels.
//! Results are f32 with FMA accumulation in k order: they differ from other BLASes only by
//! rounding (parity with PEFT is unchanged, and tested).

use rayon::prelude::*;
use std::cell::RefCell;

use super::isa::{self, Isa};

/// Rows of A per block: an MC × K block of packed A stays in L2 while all panels pass over it.
const MC: usize = 96;

fn tile(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (12, 32),
        Isa::Avx2 => (6, 16),
        Isa::Baseline => (4, 8),
    }
}

/// A frozen `[k, n]` weight packed for the micro-kernels of the ISA chosen at load.
pub struct PackedB {
    k: usize,
    n: usize,
    isa: Isa,
    /// `ceil(n / NR)` panels, each `k × NR` floats, k-major; columns past n are zero.
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `w`, `[k, n]` row-major.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} × {n}");
        let isa = isa::active();
        let (_, nr) = tile(isa);
        let panels = n.div_ceil(nr);
        let mut data = vec![0f32; panels * k * nr];
        for (j, panel) in data.chunks_exact_mut(k * nr).enumerate() {
            let cols = nr.min(n - j * nr);
            for p in 0..k {
                panel[p * nr..p * nr + cols].copy_from_slice(&w[p * n + j * nr..p * n + j * nr + cols]);
            }
        }
        Self { k, n, isa, data }
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// A raw pointer to C that work items share: each writes a disjoint set of rows or columns.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: items write disjoint tiles (see `gemm`); the pointer outlives the parallel scope.
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl CPtr {
    /// (A method, so closures capture the wrapper, not the bare pointer.)
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

thread_local! {
    /// Each thread's packed-A buffer, reused from call to call.
    static PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `c[m, n] += a[m, k] · b`; `a` row-major with `k` columns, `c` row-major with `n` columns.
pub fn gemm(a: &[f32], m: usize, b: &PackedB, c: &mut [f32]) {
    let (k, n) = (b.k, b.n);
    // The kernels below index by these lengths through raw pointers.
    assert!(a.len() >= m * k && c.len() >= m * n, "gemm: buffers too small for {m}×{k}·{k}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    let (mr, nr) = tile(b.isa);
    let panels = n.div_ceil(nr);
    let threads = rayon::current_num_threads().max(1);
    // Row blocks of up to MC rows (a multiple of MR); with fewer blocks than threads, each
    // block's panels are split between threads instead.
    let mc = MC.min(m.div_ceil(mr) * mr).max(mr);
    let row_blocks = m.div_ceil(mc);
    let panel_chunks = if row_blocks >= threads { 1 } else { threads.min(panels) };
    let per_chunk = panels.div_ceil(panel_chunks);
    let items = row_blocks * panel_chunks;
    let cp = CPtr(c.as_mut_ptr());
    let work = |item: usize| {
        let (rb, pc) = (item / panel_chunks, item % panel_chunks);
        let (r0, rows) = (rb * mc, mc.min(m - rb * mc));
        let (p0, p1) = (pc * per_chunk, ((pc + 1) * per_chunk).min(panels));
        if p0 >= p1 {
            return;
        }
        PACK.with(|buf| {
            let mut buf = buf.borrow_mut();
            let blocks = rows.div_ceil(mr);
            buf.clear();
            buf.resize(blocks * mr * k, 0.0);
            pack_a(&a[r0 * k..(r0 + rows) * k], rows, k, mr, &mut buf);
            for j in p0..p1 {
                let bp = &b.data[j * k * nr..(j + 1) * k * nr];
                let cols = nr.min(n - j * nr);
                for blk in 0..blocks {
                    let ap = &buf[blk * mr * k..(blk + 1) * mr * k];
                    let row = r0 + blk * mr;
                    let live = mr.min(m - row);
                    // SAFETY: rows row..row+live and columns j·NR..j·NR+cols of C belong to
                    // this item alone; `micro` writes no more than that.
                    unsafe { micro(b.isa, k, ap, bp, cp.at(row * n + j * nr), n, live, cols) };
                }
            }
        });
    };
    if items == 1 || m * n * k < 1 << 15 {
        (0..items).for_each(work);
    } else {
        (0..items).into_par_iter().for_each(work);
    }
}

/// `rows × k` of A into micro-panels of MR rows, k-major; rows past the end are zero.
fn pack_a(a: &[f32], rows: usize, k: usize, mr: usize, out: &mut [f32]) {
    for (blk, panel) in out.chunks_exact_mut(mr * k).enumerate() {
        for i in 0..mr {
            let r = blk * mr + i;
            if r >= rows {
                for p in 0..k {
                    panel[p * mr + i] = 0.0;
                }
                continue;
            }
            let src = &a[r * k..(r + 1) * k];
            for (p, &v) in src.iter().enumerate() {
                panel[p * mr + i] = v;
            }
        }
    }
}

/// One MR × NR tile: `C += Ã · B̃`. A partial tile (fewer live rows or columns) goes through a
/// scratch tile so the kernel itself never needs bounds.
///
/// # Safety
/// `c` addresses `live` rows of `cols` writable floats, `ldc` apart; `a` and `b` hold `k·MR` and
/// `k·NR` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(isa: Isa, k: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, live: usize, cols: usize) {
    let (mr, nr) = tile(isa);
    if live == mr && cols == nr {
        return kernel(isa, k, a.as_ptr(), b.as_ptr(), c, ldc);
    }
    let mut scratch = [0f32; 12 * 32];
    for i in 0..live {
        for j in 0..cols {
            scratch[i * nr + j] = *c.add(i * ldc + j);
        }
    }
    kernel(isa, k, a.as_ptr(), b.as_ptr(), scratch.as_mut_ptr(), nr);
    for i in 0..live {
        for j in 0..cols {
            *c.add(i * ldc + j) = scratch[i * nr + j];
        }
    }
}

/// # Safety
/// As [`micro`], with a full MR × NR tile.
unsafe fn kernel(isa: Isa, k: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::kernel_12x32(k, a, b, c, ldc),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::kernel_6x16(k, a, b, c, ldc),
        _ => kernel_4x8(k, a, b, c, ldc),
    }
}

/// The portable kernel (and the baseline x86-64 one): plain loops the compiler vectorizes.
unsafe fn kernel_4x8(k: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    let mut acc = [[0f32; 8]; 4];
    for p in 0..k {
        let bv = std::slice::from_raw_parts(b.add(p * 8), 8);
        for (i, row) in acc.iter_mut().enumerate() {
            let av = *a.add(p * 4 + i);
            for (x, &y) in row.iter_mut().zip(bv) {
                *x += av * y;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            *c.add(i * ldc + j) += v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 6 rows × 16 columns: 12 accumulators, 2 B loads and 6 broadcasts per k.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_6x16(k: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        for p in 0..k {
            let b0 = _mm256_loadu_ps(b.add(p * 16));
            let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
            let ap = a.add(p * 6);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*ap.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let out = c.add(i * ldc);
            _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), row[0]));
            _mm256_storeu_ps(out.add(8), _mm256_add_ps(_mm256_loadu_ps(out.add(8)), row[1]));
        }
    }

    /// AVX-512, 12 rows × 32 columns: 24 accumulators, 2 B loads and 12 broadcasts per k.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_12x32(k: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; 12];
        for p in 0..k {
            let b0 = _mm512_loadu_ps(b.add(p * 32));
            let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
            let ap = a.add(p * 12);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let out = c.add(i * ldc);
            _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), row[0]));
            _mm512_storeu_ps(out.add(16), _mm512_add_ps(_mm512_loadu_ps(out.add(16)), row[1]));
        }
    }
}

/// GFLOP/s of [`gemm`] at `m × k × n` with random data, best of `reps` calls after one warm-up
/// (`prefixd bench --kernels`: what the matrix kernels do on this CPU, apart from the model).
pub fn measure(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let b = PackedB::pack(&w, k, n);
    let mut c = vec![0f32; m * n];
    gemm(&a, m, &b, &mut c);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        gemm(&a, m, &b, &mut c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (m * k * n) as f64 / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    #[test]
    fn matches_a_float64_reference_at_odd_and_model_shapes() {
        let mut rng = StdRng::seed_from_u64(1);
        for &(m, k, n) in &[(1, 1, 1), (5, 7, 3), (13, 384, 33), (14, 384, 1152), (97, 50, 70), (200, 64, 384)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut c: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
            gemm(&a, m, &PackedB::pack(&b, k, n), &mut c);
            let want = reference(&a, &b, m, k, n);
            for (i, (&got, w)) in c.iter().zip(&want).enumerate() {
                let w = w + bias[i % n] as f64;
                assert!(((got as f64) - w).abs() < 1e-4 * (1.0 + k as f64).sqrt(), "{m}×{k}×{n} at {i}: {got} vs {w}");
            }
        }
    }
}
