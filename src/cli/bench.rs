//! `prefixd bench`: engine throughput on synthetic inputs, shaped like the PyTorch yardstick's
//! output (`../shared/bench/torch_baseline.py`) so the two can be compared line by line.

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use std::time::{Duration, Instant};

use super::ModelArgs;
use crate::engine::Task;
use crate::engine::{Encoded, Engine, Row, TextInput};
use crate::prefix::synthetic::random_prefix;

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
    /// Measure the latency of one short request (tokenize + forward + argmax) instead.
    #[arg(long)]
    pub latency: bool,
    /// Measure training steps instead (forward, backward, AdamW; one task, dropout on).
    #[arg(long, conflicts_with = "latency")]
    pub train: bool,
    /// Measure the CPU matrix kernels alone at the encoder's shapes (GFLOP/s).
    #[arg(long, conflicts_with_all = ["latency", "train"])]
    pub kernels: bool,
}

/// The sentence `torch_baseline.py --latency` uses (14 tokens with [CLS] and [SEP]).
const SENTENCE: &str = "This movie was surprisingly good, I would watch it again!";

/// Calls `f` `warmup` times, then until both `min_calls` and `seconds` are reached; sorted times.
fn timed(
    warmup: usize,
    min_calls: usize,
    seconds: f64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_calls || start.elapsed() < Duration::from_secs_f64(seconds) {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times)
}

/// Where and in what precision the engine ran, and which CPU kernels, for every JSON line.
fn placement(engine: &Engine) -> serde_json::Value {
    let m = engine.model();
    json!({
        "device": crate::model::device::describe(m.device()),
        "dtype": format!("{:?}", m.dtype()).to_ascii_lowercase(),
        "isa": crate::model::isa::active().name(),
        "cpu_isa": crate::model::isa::detected().name(),
    })
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn latency(engine: &Engine, task: &Task, args: &BenchArgs) -> anyhow::Result<()> {
    let input = TextInput::single(SENTENCE);
    let p = task.num_virtual_tokens();
    let tokens = engine.text_encoder().encode(&input, p)?.len();
    let times = timed(args.warmup.max(20), 200, args.seconds, || {
        let enc = engine.text_encoder().encode(&input, p)?;
        let pred = engine.classify(&[Row { task, tokens: &enc }])?;
        std::hint::black_box(pred[0].label_id);
        Ok(())
    })?;
    let ms: Vec<f64> = times.iter().map(|t| t * 1e3).collect();
    let pct = |q: f64| {
        ms[((q * ms.len() as f64) as usize)
            .saturating_sub(1)
            .min(ms.len() - 1)]
    };
    println!(
        "{}",
        json!({
            "engine": "prefixd",
            "mode": "latency",
            "prefix_len": p,
            "tokens": tokens,
            "threads": threads(),
            "median_ms": ms[ms.len() / 2],
            "p90_ms": pct(0.9),
            "p99_ms": pct(0.99),
            "calls": ms.len(),
            "placement": placement(engine),
        })
    );
    Ok(())
}

/// GFLOP/s of the CPU matmul at the shapes one forward pass of the default model uses (rows =
/// batch × seq_len; QKV, attention output, FFN in, FFN out).
fn kernels(args: &BenchArgs) -> anyhow::Result<()> {
    let m = args.batch * args.seq_len;
    for (name, k, n, gelu) in [
        ("qkv", 384, 1152, false),
        ("attn_out", 384, 384, false),
        ("ffn_in", 384, 1536, false),
        ("ffn_in+gelu", 384, 1536, true),
        ("ffn_out", 1536, 384, false),
    ] {
        // About a second of calls (a ~200 GFLOP/s budget), at least 20.
        let reps = ((2e11 / (2.0 * (m * k * n) as f64)) as usize).clamp(20, 5000);
        println!(
            "{}",
            json!({
                "engine": "prefixd",
                "mode": "kernels",
                "shape": name,
                "m": m, "k": k, "n": n,
                "isa": crate::model::isa::active().name(),
                "threads": threads(),
                "gflops": crate::model::gemm::measure(m, k, n, gelu, reps),
            })
        );
    }
    // What the FMA units alone reach on as many threads: the kernels' ceiling.
    println!(
        "{}",
        json!({
            "engine": "prefixd",
            "mode": "kernels",
            "shape": "fma_peak",
            "isa": crate::model::isa::active().name(),
            "threads": threads(),
            "gflops": crate::model::gemm::measure_peak(threads()),
        })
    );
    // Attention at this batch shape with P = --prefix-len: small products per (row, head).
    let reps = ((2e11 / (4.0 * (m * 12 * (args.prefix_len + args.seq_len) * 32) as f64)) as usize)
        .clamp(20, 5000);
    println!(
        "{}",
        json!({
            "engine": "prefixd",
            "mode": "kernels",
            "shape": "attention",
            "batch": args.batch, "seq_len": args.seq_len, "prefix_len": args.prefix_len,
            "isa": crate::model::isa::active().name(),
            "threads": threads(),
            "gflops": crate::model::measure_attention(args.batch, args.seq_len, args.prefix_len, reps),
        })
    );
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.kernels {
        return kernels(&args);
    }
    anyhow::ensure!(
        args.batch > 0 && args.tasks > 0,
        "--batch and --tasks must be at least 1"
    );
    anyhow::ensure!(
        args.seq_len >= 2,
        "--seq-len must be at least 2 ([CLS] and [SEP])"
    );
    let engine = Engine::load(&args.model.engine_config()?)?;
    let info = engine.model_info().clone();
    anyhow::ensure!(
        args.prefix_len + args.seq_len <= info.max_positions,
        "--prefix-len + --seq-len exceed the model's {} positions",
        info.max_positions
    );
    let mut rng = StdRng::seed_from_u64(0);
    let tasks = (0..args.tasks)
        .map(|i| -> anyhow::Result<Task> {
            let file = random_prefix(&info, &format!("bench{i}"), args.prefix_len, 2, &mut rng)?;
            Ok(Task::from_file(&file, &info, &file.to_bytes()?)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.latency {
        return latency(&engine, &tasks[0], &args);
    }
    if args.train {
        let cfg = crate::training::TrainConfig {
            virtual_tokens: args.prefix_len,
            ..Default::default()
        };
        let steps = (args.seconds.max(1.0) * 2.0) as usize + 3;
        let step = crate::training::bench_steps(&engine, args.batch, args.seq_len, &cfg, steps)?;
        println!(
            "{}",
            json!({
                "engine": "prefixd",
                "mode": "train",
                "batch": args.batch,
                "seq_len": args.seq_len,
                "prefix_len": args.prefix_len,
                "threads": threads(),
                "median_step_ms": step * 1e3,
                "examples_per_s": args.batch as f64 / step,
                "steps": steps,
                "placement": placement(&engine),
            })
        );
        return Ok(());
    }
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

    let times = timed(args.warmup, 7, args.seconds, || {
        engine.classify(&rows)?;
        Ok(())
    })?;
    let median = times[times.len() / 2];
    println!(
        "{}",
        json!({
            "engine": "prefixd",
            "mode": "throughput",
            "batch": args.batch,
            "seq_len": args.seq_len,
            "prefix_len": args.prefix_len,
            "tasks": args.tasks,
            "threads": threads(),
            "median_batch_ms": median * 1e3,
            "seq_per_s": args.batch as f64 / median,
            "tokens_per_s": (args.batch * args.seq_len) as f64 / median,
            "calls": times.len(),
            "placement": placement(&engine),
        })
    );
    Ok(())
}
