//! Parity with Hugging Face PEFT: every fixture input, one at a time, as one padded batch per
//! case, and all three tasks' inputs interleaved in one mixed batch (P = 8, 20, 10).

mod common;

use common::{argmax, cases, engine, fixtures_dir, max_abs_diff, Case, CASES};
use prefixd::engine::Task;
use prefixd::engine::{Encoded, Row};

const TOL: f32 = 1e-4;

fn load(case: &str) -> Task {
    engine()
        .load_task(&fixtures_dir().join(case))
        .expect("fixture adapter loads")
}

fn check(case: &str, i: usize, expected: &Case, logits: &[f32], how: &str) {
    let err = max_abs_diff(logits, &expected.logits);
    assert!(
        err <= TOL,
        "{case} input {i} ({how}): max |Δlogit| = {err:e} > {TOL:e}; got {logits:?}, want {:?}",
        expected.logits
    );
    assert_eq!(
        argmax(logits),
        expected.label,
        "{case} input {i} ({how}): argmax"
    );
}

#[test]
fn tokenization_matches_fixture_ids() {
    for case in CASES {
        let task = load(case);
        for (i, c) in cases(case).iter().enumerate() {
            let enc = engine()
                .text_encoder()
                .encode(&c.input(), task.num_virtual_tokens())
                .unwrap();
            assert_eq!(enc.ids, c.input_ids, "{case} input {i}: ids");
            assert_eq!(enc.type_ids, c.token_type_ids, "{case} input {i}: type ids");
        }
    }
}

#[test]
fn one_input_at_a_time() {
    for case in CASES {
        let task = load(case);
        for (i, c) in cases(case).iter().enumerate() {
            let preds = engine().classify_texts(&task, &[c.input()], 1).unwrap();
            check(case, i, c, &preds[0].logits, "alone");
        }
    }
}

#[test]
fn each_case_as_one_padded_batch() {
    for case in CASES {
        let task = load(case);
        let cs = cases(case);
        let encoded: Vec<Encoded> = cs
            .iter()
            .map(|c| Encoded {
                ids: c.input_ids.clone(),
                type_ids: c.token_type_ids.clone(),
            })
            .collect();
        // Fixture order is not sorted by length, so short rows sit beside 128-token ones.
        let rows: Vec<Row> = encoded
            .iter()
            .map(|tokens| Row {
                task: &task,
                tokens,
            })
            .collect();
        let preds = engine().classify(&rows).unwrap();
        assert_eq!(preds.len(), cs.len());
        for (i, (c, p)) in cs.iter().zip(&preds).enumerate() {
            check(case, i, c, &p.logits, "padded batch");
        }
    }
}

#[test]
fn all_cases_interleaved_in_one_mixed_batch() {
    let tasks: Vec<Task> = CASES.iter().map(|c| load(c)).collect();
    let all: Vec<Vec<Case>> = CASES.iter().map(|c| cases(c)).collect();
    // Round-robin: row k belongs to task k % 3, so every neighbour has a different P.
    let mut order = Vec::new();
    for i in 0..all.iter().map(Vec::len).max().unwrap() {
        for (t, cs) in all.iter().enumerate() {
            if i < cs.len() {
                order.push((t, i));
            }
        }
    }
    let encoded: Vec<Encoded> = order
        .iter()
        .map(|&(t, i)| Encoded {
            ids: all[t][i].input_ids.clone(),
            type_ids: all[t][i].token_type_ids.clone(),
        })
        .collect();
    let rows: Vec<Row> = order
        .iter()
        .zip(&encoded)
        .map(|(&(t, _), tokens)| Row {
            task: &tasks[t],
            tokens,
        })
        .collect();
    let preds = engine().classify(&rows).unwrap();
    assert_eq!(preds.len(), 60);
    for (&(t, i), p) in order.iter().zip(&preds) {
        check(CASES[t], i, &all[t][i], &p.logits, "mixed batch");
    }
}

#[test]
fn label_names_and_scores_follow_the_problem_type() {
    let task = load("multi4-p20");
    let c = &cases("multi4-p20")[0];
    let p = &engine().classify_texts(&task, &[c.input()], 1).unwrap()[0];
    // A PEFT directory carries no label names: LABEL_i stands in.
    assert_eq!(p.label, format!("LABEL_{}", c.label));
    let sum: f32 = p.scores.iter().sum();
    assert!((sum - 1.0).abs() < 1e-5, "softmax scores sum to {sum}");
    let want = prefixd::engine::softmax(&c.logits);
    assert!(max_abs_diff(&p.scores, &want) < 1e-5);
}

#[test]
fn cpu_kernels_agree_with_the_candle_reference_path() {
    // The CPU path (fused kernels) and candle's op-by-op path, on one mixed batch of all cases.
    let tasks: Vec<Task> = CASES.iter().map(|c| load(c)).collect();
    let all: Vec<(usize, Case)> = CASES
        .iter()
        .enumerate()
        .flat_map(|(t, c)| cases(c).into_iter().map(move |x| (t, x)))
        .collect();
    let rows: Vec<prefixd::model::EncoderRow> = all
        .iter()
        .map(|(t, c)| prefixd::model::EncoderRow {
            input_ids: &c.input_ids,
            type_ids: &c.token_type_ids,
            prefix: &tasks[*t].prefix,
        })
        .collect();
    let model = engine().model();
    let fast = model.pooled(&rows).unwrap();
    let reference = model.pooled_reference(&rows).unwrap();
    let worst = fast
        .iter()
        .zip(&reference)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    assert!(worst < 1e-5, "pooled vectors differ by {worst:e}");
}

#[test]
fn both_cpu_work_splits_agree_with_the_candle_reference_path() {
    // The CPU path shares the cores two ways (model/cpu.rs): a single request runs layer by
    // layer (short: matmuls split by columns; long: feed-forward by row blocks), a batch with
    // rows for every core by groups of rows, each through the whole encoder on one core. Each
    // shape below takes one of them; every row must match candle's op-by-op path.
    let tasks: Vec<Task> = CASES.iter().map(|c| load(c)).collect();
    // Token ids from the fixtures, cycled to any length: [CLS] … [SEP].
    let pool: Vec<u32> = CASES
        .iter()
        .flat_map(|c| cases(c))
        .flat_map(|c| c.input_ids[1..c.input_ids.len() - 1].to_vec())
        .collect();
    let ids = |len: usize, salt: usize| -> Vec<u32> {
        let mut v = vec![101];
        v.extend((0..len - 2).map(|i| pool[(i * 7 + salt * 131) % pool.len()]));
        v.push(102);
        v
    };
    let model = engine().model();
    // (rows, lengths): one short request; one long one; two short ones; a mixed batch with
    // padding (lengths differ) and every task.
    let shapes: [&[usize]; 4] = [
        &[14],
        &[150],
        &[14, 9],
        &[64, 17, 40, 64, 3, 33, 64, 50, 28, 61, 12, 64],
    ];
    for lens in shapes {
        let all_ids: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| ids(n, i)).collect();
        let types: Vec<Vec<u32>> = all_ids.iter().map(|v| vec![0; v.len()]).collect();
        let rows: Vec<prefixd::model::EncoderRow> = all_ids
            .iter()
            .zip(&types)
            .enumerate()
            .map(|(i, (ids, types))| prefixd::model::EncoderRow {
                input_ids: ids,
                type_ids: types,
                prefix: &tasks[i % tasks.len()].prefix,
            })
            .collect();
        let fast = model.pooled(&rows).unwrap();
        let reference = model.pooled_reference(&rows).unwrap();
        assert_eq!(fast.len(), rows.len());
        for (i, (a, b)) in fast.iter().zip(&reference).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d < 1e-5,
                "lengths {lens:?}, row {i}: pooled vectors differ by {d:e}"
            );
        }
    }
}

/// All 60 fixture inputs of the three tasks (P = 8, 20, 10) as one interleaved batch of rows.
fn mixed_rows<'a>(
    tasks: &'a [Task],
    all: &'a [(usize, Case)],
) -> Vec<prefixd::model::EncoderRow<'a>> {
    all.iter()
        .map(|(t, c)| prefixd::model::EncoderRow {
            input_ids: &c.input_ids,
            type_ids: &c.token_type_ids,
            prefix: &tasks[*t].prefix,
        })
        .collect()
}

fn all_cases() -> Vec<(usize, Case)> {
    // Interleave the tasks so neighbouring rows use different prefixes of different lengths.
    let per: Vec<Vec<Case>> = CASES.iter().map(|c| cases(c)).collect();
    let n = per.iter().map(Vec::len).max().unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        for (t, cs) in per.iter().enumerate() {
            if let Some(c) = cs.get(i) {
                out.push((t, c.clone()));
            }
        }
    }
    out
}

#[test]
fn fused_device_path_agrees_with_the_candle_reference_path() {
    // The GPU's orchestration (per-task prefix tensors, split/softmax/LayerNorm as fused ops),
    // here with each fused op composed of candle ops on the CPU.
    let tasks: Vec<Task> = CASES.iter().map(|c| load(c)).collect();
    let all = all_cases();
    let rows = mixed_rows(&tasks, &all);
    let model = engine().model();
    let fused = model.pooled_fused(&rows).unwrap();
    let reference = model.pooled_reference(&rows).unwrap();
    let worst = fused
        .iter()
        .zip(&reference)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    assert!(worst < 1e-5, "pooled vectors differ by {worst:e}");
}

#[test]
fn half_precision_stays_close_to_float32() {
    // bf16 storage on the fused path (CPU-composed here): every logit near PEFT's, and the
    // argmax kept on the fixture inputs whose top two logits are not near-ties.
    let config = prefixd::engine::EngineConfig {
        precision: prefixd::model::Precision::Bf16,
        ..common::engine_config()
    };
    let half = prefixd::engine::Engine::load(&config).unwrap();
    assert_eq!(half.model().dtype(), candle_core::DType::BF16);
    for case in CASES {
        let task = half.load_task(&fixtures_dir().join(case)).unwrap();
        let cs = cases(case);
        let inputs: Vec<_> = cs.iter().map(|c| c.input()).collect();
        let preds = half.classify_texts(&task, &inputs, 32).unwrap();
        for (c, p) in cs.iter().zip(&preds) {
            let d = max_abs_diff(&p.logits, &c.logits);
            assert!(
                d < 0.15,
                "{case}: bf16 logits {:?} vs PEFT {:?}",
                p.logits,
                c.logits
            );
            let mut sorted = c.logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted.len() > 1 && sorted[0] - sorted[1] > 0.3 {
                assert_eq!(common::argmax(&p.logits), c.label, "{case}: {:?}", p.logits);
            }
        }
    }
}
