//! `prefixd synth`: random prefix files, for load tests of the registry and the server.

use rand::{rngs::StdRng, SeedableRng};
use std::path::PathBuf;

use super::ModelArgs;
use crate::model::PrefixedBert;
use crate::prefix::synthetic::random_prefix;

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// How many prefix files (named task000, task001, ...).
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Virtual tokens per prefix.
    #[arg(long, default_value_t = 20)]
    pub prefix_len: usize,
    /// Labels per task.
    #[arg(long, default_value_t = 2)]
    pub labels: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created if missing).
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let model = PrefixedBert::load(&args.model.model_dir()?, &candle_core::Device::Cpu)?;
    std::fs::create_dir_all(&args.output)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    for i in 0..args.count {
        let name = format!("task{i:03}");
        let file = random_prefix(model.info(), &name, args.prefix_len, args.labels, &mut rng)?;
        file.write(&args.output.join(format!("{name}.safetensors")))?;
    }
    eprintln!(
        "wrote {} random prefixes to {}",
        args.count,
        args.output.display()
    );
    Ok(())
}
