//! `prefixd classify`: one task, texts from flags or JSON lines, one JSON line per result.

use anyhow::{bail, Context};
use std::io::{BufRead, Write};
use std::path::PathBuf;

use super::ModelArgs;
use crate::engine::{Engine, TextInput};

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A native prefix file (.safetensors) or a PEFT adapter directory.
    #[arg(long)]
    pub prefix: PathBuf,
    /// A text to classify (repeatable).
    #[arg(long)]
    pub text: Vec<String>,
    /// The second text of a pair, for the preceding --text (pair tasks).
    #[arg(long, requires = "text")]
    pub text_pair: Option<String>,
    /// A file of JSON lines {"text": ..., "text_pair": ...}, or - for standard input.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

fn read_inputs(args: &ClassifyArgs) -> anyhow::Result<Vec<TextInput>> {
    let mut inputs: Vec<TextInput> = args.text.iter().map(TextInput::single).collect();
    if let (Some(pair), Some(last)) = (&args.text_pair, inputs.last_mut()) {
        last.text_pair = Some(pair.clone());
    }
    if let Some(path) = &args.input {
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(path).with_context(|| format!("{}", path.display()))?,
            ))
        };
        for (n, line) in reader.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let input: TextInput = serde_json::from_str(&line).with_context(|| {
                format!(
                    "{} line {}: expected {{\"text\": ..., \"text_pair\": ...}}",
                    path.display(),
                    n + 1
                )
            })?;
            inputs.push(input);
        }
    }
    if inputs.is_empty() {
        bail!("nothing to classify: give --text or --input");
    }
    Ok(inputs)
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    let inputs = read_inputs(&args)?;
    let engine = Engine::load(&args.model.engine_config())?;
    let task = engine
        .load_task(&args.prefix)
        .with_context(|| format!("{}", args.prefix.display()))?;
    let predictions = engine.classify_texts(&task, &inputs, args.batch_size)?;
    let mut out = std::io::stdout().lock();
    for p in predictions {
        serde_json::to_writer(&mut out, &p)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
