//! The GEMM against float64 references: odd and model shapes, strided and transposed operands.

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
fn strided_and_transposed_operands() {
    // c (ldc 40) += a (lda 41) · Kᵀ, K given as rows: the attention-score layout.
    let mut rng = StdRng::seed_from_u64(2);
    let (m, k, n) = (13, 32, 37);
    let a: Vec<f32> = (0..m * 41).map(|_| rng.random_range(-1.0..1.0)).collect();
    let keys: Vec<f32> = (0..n * 40).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut b = PackedB::empty();
    b.repack_transposed(k, n, |j| &keys[j * 40..j * 40 + k]);
    let mut c = vec![0.5f32; m * 40];
    gemm_strided(&a, 41, m, &b, &mut c, 40);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|p| a[i * 41 + p] as f64 * keys[j * 40 + p] as f64)
                .sum::<f64>();
            assert!((c[i * 40 + j] as f64 - want).abs() < 1e-4, "({i}, {j})");
        }
        assert!(
            c[i * 40 + n..i * 40 + 40].iter().all(|&v| v == 0.5),
            "wrote past n"
        );
    }
}

#[test]
fn transposed_a_operand() {
    // c (ldc 35) = A · B with A handed over as its transpose (lda 50 ≥ m), every tile size.
    let mut rng = StdRng::seed_from_u64(3);
    for &(m, k, n) in &[(1, 5, 3), (13, 84, 32), (47, 36, 33), (64, 84, 16)] {
        let lda = m + 3;
        let at: Vec<f32> = (0..k * lda).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b = PackedB::pack(&w, k, n);
        let ldc = n + 2;
        let mut c = vec![0.5f32; m * ldc];
        gemm_strided_t(&at, lda, m, &b, &mut c, ldc);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| at[p * lda + i] as f64 * w[p * n + j] as f64)
                    .sum();
                assert!(
                    (c[i * ldc + j] as f64 - want).abs() < 1e-4,
                    "{m}×{k}×{n} ({i}, {j})"
                );
            }
            assert!(
                c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 0.5),
                "wrote past n"
            );
        }
    }
}

#[test]
fn matches_a_float64_reference_at_odd_and_model_shapes() {
    let mut rng = StdRng::seed_from_u64(1);
    for &(m, k, n) in &[
        (1, 1, 1),
        (5, 7, 3),
        (24, 1, 64),
        (13, 384, 33),
        (14, 384, 1152),
        (97, 50, 70),
        (18, 7, 40),
        (12, 13, 16),
        (200, 64, 384),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let packed = PackedB::pack(&b, k, n);
        let want = reference(&a, &b, m, k, n);
        let (mut c, mut g) = (Vec::new(), Vec::new());
        gemm(&a, m, &packed, &mut c, Epilogue::Bias(&bias));
        gemm(&a, m, &packed, &mut g, Epilogue::BiasGelu(&bias));
        assert_eq!((c.len(), g.len()), (m * n, m * n));
        for (i, w) in want.iter().enumerate() {
            let w = w + bias[i % n] as f64;
            let tol = 1e-4 * (1.0 + k as f64).sqrt();
            assert!(
                ((c[i] as f64) - w).abs() < tol,
                "{m}×{k}×{n} at {i}: {} vs {w}",
                c[i]
            );
            // The epilogue's GELU is the library's (tested against libm's erf in kernels.rs).
            let gw = crate::model::kernels::gelu(c[i]);
            assert!(
                (g[i] - gw).abs() <= 1e-6 * (1.0 + gw.abs()),
                "gelu {m}×{k}×{n} at {i}: {} vs {gw}",
                g[i]
            );
        }
    }
}
