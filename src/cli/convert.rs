//! `import-peft`, `export-peft` and `inspect`: moving prefixes between formats.

use anyhow::{bail, Context};
use std::path::PathBuf;

use super::ModelArgs;
use crate::model::PrefixedBert;
use crate::prefix::peft::{self, ImportOptions};
use crate::prefix::{PrefixFile, ProblemType};

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors). Here
    /// `--max-length` records the truncation the adapter was trained with in the file (default:
    /// the one in a prefixd.json beside it, else none: served at the server's --max-length).
    pub adapter_dir: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Task name stored in the file (default: the adapter directory's name).
    #[arg(long)]
    pub task: Option<String>,
    /// Label names in classifier-row order, comma-separated (default: LABEL_0, LABEL_1, ...).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// single-label (softmax scores) or multi-label (sigmoid scores).
    #[arg(long, value_parser = parse_problem_type)]
    pub problem_type: Option<ProblemType>,
    /// Output native prefix file.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Native prefix file.
    pub file: PathBuf,
    /// Output PEFT adapter directory (created if missing).
    #[arg(short, long)]
    pub output: PathBuf,
    /// The base weights' Hugging Face hub id, when the file does not record it (or to correct it).
    #[arg(long)]
    pub base_model_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Native prefix file.
    pub file: PathBuf,
    /// Print the metadata as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_problem_type(s: &str) -> Result<ProblemType, String> {
    ProblemType::parse(s).ok_or_else(|| format!("{s:?}: expected single-label or multi-label"))
}

pub fn import(args: ImportArgs) -> anyhow::Result<()> {
    if !args.adapter_dir.is_dir() {
        bail!("{}: not a directory", args.adapter_dir.display());
    }
    // Only the model's shape and fingerprint are needed, but loading it also proves it is usable.
    let mut model = PrefixedBert::load(&args.model.model_dir()?, &candle_core::Device::Cpu)?;
    model.set_hub_id(args.model.base_model_id.as_deref());
    let opts = ImportOptions {
        task: args.task,
        labels: args.labels,
        problem_type: args.problem_type,
        // For an import, --max-length is the adapter's training truncation, recorded in the file.
        max_length: args.model.max_length,
    };
    let file = peft::import_dir(&args.adapter_dir, &opts, model.info())
        .with_context(|| format!("{}", args.adapter_dir.display()))?;
    file.write(&args.output)?;
    eprintln!(
        "wrote {} (task {:?}, {} labels, P = {})",
        args.output.display(),
        file.meta.task,
        file.num_labels(),
        file.meta.num_virtual_tokens
    );
    Ok(())
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let file = PrefixFile::read(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let opts = peft::ExportOptions {
        base_model_id: args.base_model_id,
    };
    let done = peft::export_dir_with(&file, &args.output, &opts)?;
    warn_if_base_unknown(&done);
    eprintln!("wrote PEFT adapter {}", args.output.display());
    Ok(())
}

/// An export whose base model is unknown still works with `PeftModel.from_pretrained(base, dir)`,
/// but only on the right weights: say so where the user is looking.
pub fn warn_if_base_unknown(done: &peft::Exported) {
    if done.base_model_id.is_none() {
        tracing::warn!(
            "the base model's hub id is unknown: adapter_config.json has base_model_name_or_path = null \
             and README.md says which weights to load; pass --base-model-id to name them"
        );
    }
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let file =
        PrefixFile::from_bytes(&bytes).with_context(|| format!("{}", args.file.display()))?;
    let m = &file.meta;
    if args.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    let b = &m.base_model;
    let norm = |xs: &[f32]| xs.iter().map(|x| x * x).sum::<f32>().sqrt();
    println!(
        "file:           {} ({} bytes)",
        args.file.display(),
        bytes.len()
    );
    println!("task:           {}", m.task);
    println!("labels:         {}", m.labels.join(", "));
    println!("problem type:   {}", m.problem_type.as_str());
    println!("virtual tokens: {}", m.num_virtual_tokens);
    println!(
        "base model:     {} ({} layers, hidden {}, {} heads)",
        b.name, b.layers, b.hidden, b.heads
    );
    println!(
        "hub id:         {}",
        b.resolved_hub_id().as_deref().unwrap_or("(unknown)")
    );
    println!(
        "fingerprint:    {}",
        b.fingerprint
            .as_deref()
            .unwrap_or("(none: runs on any model of this shape)")
    );
    println!(
        "prefix norm:    {:.3}   head norm: {:.3}",
        norm(&file.prompt_embeddings.data),
        norm(&file.classifier_weight.data)
    );
    println!("source:         {}", m.source.kind);
    for (k, v) in &m.source.details {
        println!("  {k}: {v}");
    }
    Ok(())
}
