//! The two hand-written training backwards — the CPU path (`model/cpu_train.rs`) and the device
//! path GPUs run (`model/fused/train.rs`, here on candle's CPU ops) — against candle's autograd of
//! the same encoder, and against finite differences where dropout is on (the paths draw different
//! masks, so there the only oracle is the function itself).

mod common;

use candle_core::{Device, Tensor, Var};
use prefixd::model::{Dropout, PrefixedBert};
use rand::{rngs::StdRng, Rng, SeedableRng};

type Forward =
    fn(&PrefixedBert, &[(&[u32], &[u32])], &Tensor, &mut Dropout) -> prefixd::model::Result<Tensor>;

/// Rows of different lengths (so padding is exercised), ids below `vocab`, a second segment on
/// the last row.
fn rows(vocab: u32, seed: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    [9usize, 3, 14, 1, 6]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids = (0..n).map(|_| rng.random_range(5..vocab)).collect();
            let types = (0..n).map(|j| u32::from(i == 4 && j >= n / 2)).collect();
            (ids, types)
        })
        .collect()
}

/// `loss = Σ pooled ⊙ weights` and its gradient with respect to the prompt.
fn loss_and_grad(
    model: &PrefixedBert,
    forward: Forward,
    rows: &[(Vec<u32>, Vec<u32>)],
    prompt: &Var,
    weights: &Tensor,
    dropout: Dropout,
) -> (Vec<f32>, f32, Vec<f32>) {
    let rows: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let mut dropout = dropout;
    let pooled = forward(model, &rows, prompt.as_tensor(), &mut dropout).unwrap();
    let loss = (&pooled * weights).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads.get(prompt.as_tensor()).expect("prompt gradient");
    (
        pooled.flatten_all().unwrap().to_vec1().unwrap(),
        loss.to_scalar().unwrap(),
        grad.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn setup(model: &PrefixedBert, p: usize, seed: u64) -> (Var, Tensor) {
    let c = model.config();
    let width = c.num_hidden_layers * 2 * c.hidden_size;
    let prompt = Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (p, width), &Device::Cpu).unwrap() * 0.5).unwrap(),
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<f32> = (0..5 * c.hidden_size)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    (
        prompt,
        Tensor::from_vec(w, (5, c.hidden_size), &Device::Cpu).unwrap(),
    )
}

#[test]
fn real_model_gradients_match_candle_autograd_without_dropout() {
    let model = PrefixedBert::load(&common::model_dir(), &Device::Cpu).unwrap();
    let (prompt, weights) = setup(&model, 8, 1);
    let rows = rows(model.config().vocab_size as u32, 2);
    for fast in [
        PrefixedBert::pooled_train as Forward,
        PrefixedBert::pooled_train_device,
    ] {
        matches_reference(&model, fast, &rows, &prompt, &weights);
    }
}

fn matches_reference(
    model: &PrefixedBert,
    fast: Forward,
    rows: &[(Vec<u32>, Vec<u32>)],
    prompt: &Var,
    weights: &Tensor,
) {
    let (y_fast, l_fast, g_fast) =
        loss_and_grad(model, fast, rows, prompt, weights, Dropout::new(0.0, 0));
    let (y_ref, l_ref, g_ref) = loss_and_grad(
        model,
        PrefixedBert::pooled_train_reference,
        rows,
        prompt,
        weights,
        Dropout::new(0.0, 0),
    );
    let dy = max_diff(&y_fast, &y_ref);
    assert!(dy < 1e-4, "pooled differs by {dy}");
    assert!(
        (l_fast - l_ref).abs() < 1e-3 * l_ref.abs().max(1.0),
        "loss {l_fast} vs {l_ref}"
    );
    let (dg, scale) = (max_diff(&g_fast, &g_ref), max_abs(&g_ref));
    assert!(scale > 0.0, "reference gradient is zero");
    assert!(dg < 1e-3 * scale, "gradient differs by {dg} (max {scale})");
    // Every layer's keys and values get gradient (P rows × L·2·Hd columns).
    let c = model.config();
    let hd = c.hidden_size;
    for block in 0..c.num_hidden_layers * 2 {
        let norm: f32 = g_fast
            .chunks_exact(c.num_hidden_layers * 2 * hd)
            .map(|row| {
                row[block * hd..(block + 1) * hd]
                    .iter()
                    .map(|x| x * x)
                    .sum::<f32>()
            })
            .sum();
        assert!(norm > 0.0, "block {block} got no gradient");
    }
}

#[test]
fn tiny_model_gradients_match_candle_autograd_and_finite_differences_with_dropout() {
    let model = PrefixedBert::load(&common::tiny::model_dir(), &Device::Cpu).unwrap();
    check_with_dropout(&model, PrefixedBert::pooled_train);
}

#[test]
fn device_training_path_gradients_match_candle_autograd_and_finite_differences_with_dropout() {
    let model = PrefixedBert::load(&common::tiny::model_dir(), &Device::Cpu).unwrap();
    check_with_dropout(&model, PrefixedBert::pooled_train_device);
}

/// `fast` against candle's autograd without dropout; with dropout, same seed same bytes, another
/// seed another mask, and central differences.
fn check_with_dropout(model: &PrefixedBert, fast: Forward) {
    let vocab = model.config().vocab_size as u32;
    let rows = rows(vocab, 3);
    let (prompt, weights) = setup(model, 5, 4);
    let (_, _, g_fast) = loss_and_grad(model, fast, &rows, &prompt, &weights, Dropout::new(0.0, 0));
    let (_, _, g_ref) = loss_and_grad(
        model,
        PrefixedBert::pooled_train_reference,
        &rows,
        &prompt,
        &weights,
        Dropout::new(0.0, 0),
    );
    assert!(max_diff(&g_fast, &g_ref) < 1e-4 * max_abs(&g_ref).max(1e-3));

    // With dropout: the same seed gives the same mask (and bytes), a fresh one another mask.
    let drop = || Dropout::new(0.3, 11);
    let (y1, l1, g1) = loss_and_grad(model, fast, &rows, &prompt, &weights, drop());
    let (y2, _, g2) = loss_and_grad(model, fast, &rows, &prompt, &weights, drop());
    assert_eq!((&y1, &g1), (&y2, &g2), "same seed, different result");
    let (y3, _, _) = loss_and_grad(model, fast, &rows, &prompt, &weights, Dropout::new(0.3, 12));
    assert!(max_diff(&y1, &y3) > 1e-3, "another seed, same mask");
    let (y0, _, _) = loss_and_grad(model, fast, &rows, &prompt, &weights, Dropout::new(0.0, 0));
    assert!(max_diff(&y1, &y0) > 1e-3, "dropout changed nothing");

    // Central differences on the largest-gradient coordinates and a few random ones: the
    // backward undoes the same masks the forward drew.
    let base: Vec<f32> = prompt.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let shape = prompt.as_tensor().shape().clone();
    let mut order: Vec<usize> = (0..g1.len()).collect();
    order.sort_by(|&a, &b| g1[b].abs().total_cmp(&g1[a].abs()));
    let mut rng = StdRng::seed_from_u64(5);
    let mut coords: Vec<usize> = order[..6].to_vec();
    coords.extend((0..6).map(|_| rng.random_range(0..g1.len())));
    let eps = 1e-2f32;
    let scale = max_abs(&g1);
    for &i in &coords {
        let at = |delta: f32| {
            let mut v = base.clone();
            v[i] += delta;
            let var = Var::from_tensor(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            loss_and_grad(model, fast, &rows, &var, &weights, drop()).1
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (numeric - g1[i]).abs() < 2e-2 * scale + 2e-2 * g1[i].abs(),
            "coordinate {i}: analytic {} vs numeric {numeric} (loss {l1}, max grad {scale})",
            g1[i]
        );
    }
}
