//! `prefixd bench`: engine throughput on synthetic inputs, shaped like the PyTorch yardstick's
//! output (`../shared/bench/torch_baseline.py`) so the two can be compared line by line.

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use std::time::{Duration, Instant};

use super::ModelArgs;
use crate::engine::{Encoded, Engine, Row};
use crate::model::ModelInfo;
use crate::prefix::{default_labels, BaseModel, HostTensor, PrefixFile, PrefixMeta, Source, Task};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tokens per row, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Virtual tokens (P) of each synthetic prefix.
    #[arg(long, default_value_t = 20)]
    pub prefix_len: usize,
    /// Distinct random prefixes, spread round-robin over the rows.
    #[arg(long, default_value_t = 1)]
    pub tasks: usize,
    /// Minimum timed seconds (after warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Untimed warm-up passes.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
}

/// Box–Muller: standard normal samples without another dependency.
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// A random task: prefix values of standard deviation 1 (the scale of MiniLM's own keys and
/// values), a random 2-label head.
pub fn random_task(info: &ModelInfo, p: usize, rng: &mut StdRng) -> anyhow::Result<Task> {
    let mut randn =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| normal(rng) * scale).collect() };
    let width = info.layers * 2 * info.hidden;
    let meta = PrefixMeta {
        format_version: crate::prefix::FORMAT_VERSION,
        task: "bench".into(),
        labels: default_labels(2),
        problem_type: Default::default(),
        num_virtual_tokens: p,
        base_model: BaseModel {
            name: info.name.clone(),
            layers: info.layers,
            hidden: info.hidden,
            heads: info.heads,
            fingerprint: None,
        },
        source: Source {
            kind: "synthetic".into(),
            details: Default::default(),
        },
    };
    let file = PrefixFile::new(
        meta,
        HostTensor {
            shape: vec![p, width],
            data: randn(p * width, 1.0),
        },
        HostTensor {
            shape: vec![2, info.hidden],
            data: randn(2 * info.hidden, 0.5),
        },
        HostTensor {
            shape: vec![2],
            data: vec![0.0; 2],
        },
    )?;
    let bytes = file.to_bytes()?;
    Ok(Task::from_file(&file, info, &bytes)?)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.tasks > 0,
        "--batch and --tasks must be at least 1"
    );
    anyhow::ensure!(
        args.seq_len >= 2,
        "--seq-len must be at least 2 ([CLS] and [SEP])"
    );
    let engine = Engine::load(&args.model.engine_config())?;
    let info = engine.model_info().clone();
    anyhow::ensure!(
        args.prefix_len + args.seq_len <= info.max_positions,
        "--prefix-len + --seq-len exceed the model's {} positions",
        info.max_positions
    );
    let mut rng = StdRng::seed_from_u64(0);
    let tasks = (0..args.tasks)
        .map(|_| random_task(&info, args.prefix_len, &mut rng))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let vocab = engine.model().config().vocab_size as u32;
    let encoded: Vec<Encoded> = (0..args.batch)
        .map(|_| {
            let mut ids: Vec<u32> = (0..args.seq_len)
                .map(|_| rng.random_range(1000..vocab))
                .collect();
            ids[0] = 101;
            ids[args.seq_len - 1] = 102;
            Encoded {
                type_ids: vec![0; ids.len()],
                ids,
            }
        })
        .collect();
    let rows: Vec<Row<'_>> = encoded
        .iter()
        .enumerate()
        .map(|(i, tokens)| Row {
            task: &tasks[i % tasks.len()],
            tokens,
        })
        .collect();

    for _ in 0..args.warmup {
        engine.classify(&rows)?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 7 || start.elapsed() < Duration::from_secs_f64(args.seconds) {
        let t0 = Instant::now();
        engine.classify(&rows)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "{}",
        json!({
            "engine": "prefixd",
            "mode": "throughput",
            "batch": args.batch,
            "seq_len": args.seq_len,
            "prefix_len": args.prefix_len,
            "tasks": args.tasks,
            "threads": threads,
            "median_batch_ms": median * 1e3,
            "seq_per_s": args.batch as f64 / median,
            "tokens_per_s": (args.batch * args.seq_len) as f64 / median,
            "calls": times.len(),
        })
    );
    Ok(())
}
