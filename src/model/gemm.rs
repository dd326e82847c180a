//! Matrix multiplication for the CPU path: `C[m, n] += A[m, k] · B[k, n]`, B a frozen weight.
//!
//! Why our own: the `gemm` crate reached ~68 GFLOP/s on a 2-core AVX2 machine where OpenBLAS does
//! 120–140 at the encoder's shapes (issue 8), and weights that never change can be laid out once.
//! The structure is the classic one (GotoBLAS/BLIS):
//! - B is packed at load into panels of NR columns, k-major, so the micro-kernel streams it with
//!   unit stride (`PackedB`);
//! - A is read in place (see `block`): each kernel broadcasts from its MR rows;
//! - B streams from L3 at small batches (42 MB of MiniLM weights): the kernels prefetch it ahead
//!   into L1, and the next panel into L2;
//! - the tile's epilogue adds the bias and applies GELU before the store (`Epilogue`), so dense
//!   layers need no separate passes for them;
//! - a micro-kernel keeps an MR × NR tile of C in registers over the whole k loop: 6 × 16 with
//!   AVX2 + FMA (12 ymm accumulators), 12 × 32 with AVX-512 (24 zmm); the full tiles' k loops
//!   are assembly, four k steps a pass (see `x86.rs`);
//! - the two cores split row blocks, or, when there are too few rows (a single short request),
//!   column panels.
//!
//! Results are f32 with FMA accumulation in k order: they differ from other BLASes only by
//! rounding (parity with PEFT is unchanged, and tested).

use super::isa::{self, Isa};
use super::kernels::gelu;

/// Rows of A per block: an MC × K block of packed A stays in L2 while all panels pass over it.
const MC: usize = 96;

fn tile(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (12, 32),
        Isa::Avx2 => (6, 16),
        Isa::Baseline => (4, 8),
    }
}

/// A `[k, n]` right-hand matrix packed for the micro-kernels of the active ISA: a frozen weight
/// (packed once at load), or per call the keys and values of one attention head (repacked into a
/// reused buffer).
pub struct PackedB {
    k: usize,
    n: usize,
    isa: Isa,
    /// `ceil(n / NR)` panels, each `k × NR` floats, k-major; columns past n are zero.
    data: Vec<f32>,
}

impl PackedB {
    pub fn empty() -> Self {
        Self {
            k: 0,
            n: 0,
            isa: isa::active(),
            data: Vec::new(),
        }
    }

    /// Packs `w`, `[k, n]` row-major.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} × {n}");
        let mut b = Self::empty();
        b.repack(k, n, |p| &w[p * n..(p + 1) * n]);
        b
    }

    fn reset(&mut self, k: usize, n: usize) -> usize {
        let (_, nr) = tile(self.isa);
        self.k = k;
        self.n = n;
        self.data.clear();
        self.data.resize(n.div_ceil(nr) * k * nr, 0.0);
        nr
    }

    /// B[p][·] = `row(p)` (n values each), p < k.
    pub fn repack<'a>(&mut self, k: usize, n: usize, row: impl Fn(usize) -> &'a [f32]) {
        let nr = self.reset(k, n);
        for p in 0..k {
            let src = row(p);
            for (j, panel) in self.data.chunks_exact_mut(k * nr).enumerate() {
                let cols = nr.min(n - j * nr);
                panel[p * nr..p * nr + cols].copy_from_slice(&src[j * nr..j * nr + cols]);
            }
        }
    }

    /// The transpose: B[p][j] = `col(j)[p]` — `col(j)` is column j, k values (attention's keys:
    /// B = Kᵀ with `col(t)` the key of token t).
    pub fn repack_transposed<'a>(&mut self, k: usize, n: usize, col: impl Fn(usize) -> &'a [f32]) {
        let nr = self.reset(k, n);
        for j in 0..n {
            let (panel, c) = (j / nr, j % nr);
            let dst = &mut self.data[panel * k * nr..(panel + 1) * k * nr];
            for (p, &v) in col(j)[..k].iter().enumerate() {
                dst[p * nr + c] = v;
            }
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// What the kernel does to a finished tile before storing it: `C = A·B`, `+ bias` (one value per
/// column), and then the exact GELU. Done while the tile is in registers or L1, so a dense layer
/// needs no separate pass to add its bias or apply its activation.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    None,
    Bias(&'a [f32]),
    BiasGelu(&'a [f32]),
}

impl Epilogue<'_> {
    fn bias(&self) -> Option<&[f32]> {
        match self {
            Self::None => None,
            Self::Bias(b) | Self::BiasGelu(b) => Some(b),
        }
    }

    fn gelu(&self) -> bool {
        matches!(self, Self::BiasGelu(_))
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

/// `c[m, n] = epilogue(a[m, k] · b)`; `a` row-major with `k` columns, `c` row-major with `n`
/// columns (resized to fit). Both cores share the work.
pub fn gemm(a: &[f32], m: usize, b: &PackedB, c: &mut Vec<f32>, epilogue: Epilogue<'_>) {
    let (k, n) = (b.k, b.n);
    // The kernels below index by these lengths through raw pointers.
    assert!(a.len() >= m * k, "gemm: A too small for {m}×{k}");
    if let Some(bias) = epilogue.bias() {
        assert_eq!(bias.len(), n, "gemm: bias is not {n} long");
    }
    // Every element is overwritten below; only growth costs a fill (the callers reuse `c`).
    c.resize(m * n, 0.0);
    if m == 0 || n == 0 {
        return;
    }
    let nr = tile(b.isa).1;
    let panels = n.div_ceil(nr);
    let threads = rayon::current_num_threads().max(1);
    // Many rows: blocks of MC rows, each over all panels, spread over the threads. Few rows
    // (up to two blocks per thread): one block of all rows, its panels split in 2 chunks per
    // thread — row blocks would leave a core idle (128 rows made blocks of 96 and 32).
    let (mc, panel_chunks) = if m > MC * threads * 2 {
        (MC, 1)
    } else {
        (m.max(1), (2 * threads).min(panels))
    };
    let row_blocks = m.div_ceil(mc);
    let per_chunk = panels.div_ceil(panel_chunks);
    let items = row_blocks * panel_chunks;
    let cp = CPtr(c.as_mut_ptr());
    let work = |item: usize| {
        let (rb, pc) = (item / panel_chunks, item % panel_chunks);
        let (r0, rows) = (rb * mc, mc.min(m - rb * mc));
        let (p0, p1) = (pc * per_chunk, ((pc + 1) * per_chunk).min(panels));
        if p0 < p1 {
            // SAFETY: this item owns rows r0..r0+rows × panels p0..p1 of C; bounds asserted above.
            unsafe { block::<false>(&a[r0 * k..], k, rows, b, p0..p1, cp.at(r0 * n), n, epilogue) };
        }
    };
    if items == 1 || m * n * k < 1 << 15 {
        (0..items).for_each(work);
    } else {
        super::pool::for_each(items, work);
    }
}

/// `c = a · b` on the calling thread, for small products inside work that is already parallel
/// (attention heads): `a` is `m` rows of `b.k` values, `lda` apart; `c` is `m` rows, `ldc` apart.
pub fn gemm_strided(a: &[f32], lda: usize, m: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    gemm_serial(a, lda, m, b, c, ldc, Epilogue::None);
}

/// [`gemm_strided`] with an epilogue: `c = epilogue(a · b)` on the calling thread (a row block
/// of a layer that is already parallel over row blocks).
pub fn gemm_serial(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && ldc >= n && a.len() >= (m - 1) * lda + k && c.len() >= (m - 1) * ldc + n,
        "gemm_serial: buffers too small for {m}×{k}·{k}×{n}"
    );
    if let Some(bias) = epilogue.bias() {
        assert_eq!(bias.len(), n, "gemm_serial: bias is not {n} long");
    }
    let panels = n.div_ceil(tile(b.isa).1);
    // SAFETY: c holds m rows of n floats, ldc apart (asserted); nothing else writes it.
    unsafe { block::<false>(a, lda, m, b, 0..panels, c.as_mut_ptr(), ldc, epilogue) };
}

/// [`gemm_strided`] with A given transposed: `at` holds A's `b.k` columns, `lda` apart, so
/// `A[i][p] = at[p·lda + i]`, i < m. (The micro-kernels then broadcast a tile's A values from
/// consecutive addresses.)
pub fn gemm_strided_t(at: &[f32], lda: usize, m: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        k > 0
            && lda >= m
            && at.len() >= (k - 1) * lda + m
            && ldc >= n
            && c.len() >= (m - 1) * ldc + n,
        "gemm_strided_t: buffers too small for {m}×{k}·{k}×{n}"
    );
    let panels = n.div_ceil(tile(b.isa).1);
    // SAFETY: c holds m rows of n floats, ldc apart (asserted); nothing else writes it.
    unsafe {
        block::<true>(
            at,
            lda,
            m,
            b,
            0..panels,
            c.as_mut_ptr(),
            ldc,
            Epilogue::None,
        )
    };
}

/// Runs every micro-kernel of `rows` rows of A (`lda` apart) against panels `panels` of B.
///
/// A is read in place: a tile's kernel broadcasts from its rows directly (short sequential
/// streams, in L1 for K = 384). Packing A first, as BLAS libraries do, cost 6% of a forward pass
/// and measured no faster at these shapes. The last rows run a kernel of their own size; a
/// partial last panel writes through a scratch tile.
///
/// # Safety
/// `c` addresses `rows` rows of at least `b.n` writable floats, `ldc` apart, that no one else
/// touches meanwhile; `a` holds the rows.
#[allow(clippy::too_many_arguments)]
unsafe fn block<const AT: bool>(
    a: &[f32],
    lda: usize,
    rows: usize,
    b: &PackedB,
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    epilogue: Epilogue<'_>,
) {
    let (k, n) = (b.k, b.n);
    let (mr, nr) = tile(b.isa);
    let mut scratch = [0f32; 12 * 32];
    let all = n.div_ceil(nr);
    for j in panels {
        let bp = b.data[j * k * nr..].as_ptr();
        let cols = nr.min(n - j * nr);
        let bias = epilogue.bias().map(|bias| &bias[j * nr..j * nr + cols]);
        for r0 in (0..rows).step_by(mr) {
            let live = mr.min(rows - r0);
            // The panel's first tiles also pull the next panel into L2, one line per k step
            // (a panel is k × NR/16 lines: NR/16 tiles cover it); the rest prefetch their own
            // panel, already there. From L3 the next panel's first tile stalled (8 × 16: +7%).
            let t = r0 / mr;
            let next = if t < nr / 16 && j + 1 < all {
                b.data[(j + 1) * k * nr + t * k * 16..].as_ptr()
            } else {
                bp
            };
            let ap = a.as_ptr().add(if AT { r0 } else { r0 * lda });
            let cp = c.add(r0 * ldc + j * nr);
            // A full panel is stored in place with its epilogue; the last, partial one goes to a
            // full-width scratch tile, whose live columns are finished below.
            let full = cols == nr;
            let (dst, ld, tile_bias, tile_gelu) = if full {
                let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
                (cp, ldc, bias, epilogue.gelu())
            } else {
                (scratch.as_mut_ptr(), nr, std::ptr::null(), false)
            };
            kernel::<AT>(
                b.isa, live, k, ap, lda, bp, next, dst, ld, tile_bias, tile_gelu,
            );
            if full {
                continue;
            }
            for i in 0..live {
                for jj in 0..cols {
                    let mut v = scratch[i * nr + jj] + bias.map_or(0.0, |b| b[jj]);
                    if epilogue.gelu() {
                        v = gelu(v);
                    }
                    *cp.add(i * ldc + jj) = v;
                }
            }
        }
    }
}

/// One tile of `rows` ≤ MR rows × NR columns, A read in place: `C = Ã·B̃ (+ bias) (then
/// GELU)`. Each row count has its own kernel, so the last rows of a product cost what they are,
/// not a whole padded tile (a 14-row request is one 12-row and one 2-row tile). `bias` is null
/// or NR values.
///
/// `next` is where the kernel prefetches into L2 from, one 64-byte line per k step (a hint: any
/// address will do).
///
/// # Safety
/// `a`: `rows` rows of k floats, `lda` apart; `b`: a k × NR panel; `c`: `rows` rows of NR
/// writable floats, `ldc` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const AT: bool>(
    isa: Isa,
    rows: usize,
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
    macro_rules! by_rows {
        ($f:ident, $($r:literal)*) => {
            match rows {
                $($r => x86::$f::<$r, AT>(k, a, lda, b, next, c, ldc, bias, gelu),)*
                _ => unreachable!("tile rows checked by the caller"),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => by_rows!(kernel_x32, 1 2 3 4 5 6 7 8 9 10 11 12),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_rows!(kernel_x16, 1 2 3 4 5 6),
        _ => kernel_4x8::<AT>(rows, k, a, lda, b, c, ldc, bias, gelu),
    }
}

/// The portable kernel (and the baseline x86-64 one), up to 4 rows × 8 columns: plain loops the
/// compiler vectorizes.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_4x8<const AT: bool>(
    rows: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    gelu: bool,
) {
    let mut acc = [[0f32; 8]; 4];
    for p in 0..k {
        let bv = std::slice::from_raw_parts(b.add(p * 8), 8);
        for (i, row) in acc.iter_mut().enumerate().take(rows) {
            let av = *a.add(at::<AT>(i, p, lda));
            for (x, &y) in row.iter_mut().zip(bv) {
                *x += av * y;
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(rows) {
        for (j, v) in row.iter().enumerate() {
            *c.add(i * ldc + j) = finish(*v, bias, j, gelu);
        }
    }
}

/// Where A's element (row i, column p) lies: rows `lda` apart, or, transposed (`AT`), columns
/// `lda` apart (attention's probabilities, kept keys × queries).
#[inline(always)]
fn at<const AT: bool>(i: usize, p: usize, lda: usize) -> usize {
    if AT {
        p * lda + i
    } else {
        i * lda + p
    }
}

#[inline(always)]
unsafe fn finish(v: f32, bias: *const f32, j: usize, apply_gelu: bool) -> f32 {
    let v = if bias.is_null() { v } else { v + *bias.add(j) };
    if apply_gelu {
        gelu(v)
    } else {
        v
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// GFLOP/s of [`gemm`] at `m × k × n` with random data (with a bias and the GELU epilogue when
/// `gelu`), best of `reps` calls after one warm-up (`prefixd bench --kernels`: what the matrix
/// kernels do on this CPU, apart from the model).
pub fn measure(m: usize, k: usize, n: usize, gelu: bool, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let b = PackedB::pack(&w, k, n);
    let bias = vec![0.1f32; n];
    let epilogue = if gelu {
        Epilogue::BiasGelu(&bias)
    } else {
        Epilogue::None
    };
    let mut c = Vec::new();
    gemm(&a, m, &b, &mut c, epilogue);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        gemm(&a, m, &b, &mut c, epilogue);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (m * k * n) as f64 / best / 1e9
}

/// GFLOP/s of independent FMAs alone on `threads` threads with the active ISA's registers: the
/// ceiling the kernels are measured against (`prefixd bench --kernels`, shape `fma_peak`). None
/// without AVX2.
pub fn measure_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = isa::active();
        let lanes = match isa {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Baseline => return None,
        };
        const ITERS: usize = 25_000_000;
        let flops = (threads.max(1) * ITERS * x86::FMA_CHAINS * lanes * 2) as f64;
        // Best of three, as the kernels' figures are best-of.
        let best = (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads.max(1) {
                        // SAFETY: the ISA is the active one, which the CPU has.
                        s.spawn(move || std::hint::black_box(unsafe { x86::fma_loop(isa, ITERS) }));
                    }
                });
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        Some(flops / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

#[cfg(test)]
mod tests;
