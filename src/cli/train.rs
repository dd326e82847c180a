//! `prefixd train` and `prefixd eval`.

use anyhow::Context;
use std::path::PathBuf;

use super::ModelArgs;
use crate::engine::{Engine, EngineConfig};
use crate::prefix::peft;
use crate::training::data::{self, Columns, LabelSpec};
use crate::training::evaluate::evaluate;
use crate::training::{train, EpochReport, Quiet, TrainConfig, TrainObserver};

/// Which columns hold the text, the optional second text, and the label.
#[derive(Debug, Clone, clap::Args)]
pub struct ColumnArgs {
    /// Text column (default: sentence, text or sentence1, whichever exists).
    #[arg(long)]
    pub text_column: Option<String>,
    /// Second-text column for pair tasks (default: sentence2 when the text column is sentence1).
    #[arg(long)]
    pub text_pair_column: Option<String>,
    /// Label column (default: label). Values may be label names or indices.
    #[arg(long)]
    pub label_column: Option<String>,
    /// Skip malformed rows (reported with their line numbers) instead of refusing the file.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

impl ColumnArgs {
    fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            text_pair: self.text_pair_column.clone(),
            label: self.label_column.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Hugging Face BERT directory (config.json, tokenizer.json, model.safetensors), or a hub
    /// model id ORG/NAME[@REVISION] fetched into the standard Hugging Face cache (HF_HOME).
    #[arg(long, env = "PREFIXD_MODEL", default_value = super::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Training data: .tsv (header, tab-separated, no quoting), .csv or .jsonl.
    #[arg(long)]
    pub train: PathBuf,
    /// Evaluation data, scored after every epoch; the best epoch is written.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Task name stored in the file.
    #[arg(long)]
    pub task: String,
    /// Output native prefix file; a <output>.metrics.json is written beside it.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Virtual tokens (P).
    #[arg(long, default_value_t = 20)]
    pub virtual_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Peak learning rate (prefix tuning wants large ones; 5e-4 does not move MiniLM's prefix).
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Truncate inputs to this many tokens (also capped at max_position_embeddings − P).
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// The Hugging Face hub id of the base weights, recorded in the prefix and its PEFT export
    /// (known without it for the default model).
    #[arg(long, env = "PREFIXD_BASE_MODEL_ID")]
    pub base_model_id: Option<String>,
    /// Train through a reparameterization MLP with this hidden size (folded away at export).
    #[arg(long, value_name = "HIDDEN")]
    pub projection: Option<usize>,
    /// AdamW weight decay (not applied to biases).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Fraction of the steps spent warming the learning rate up (then linear decay to 0).
    #[arg(long, default_value_t = 0.06)]
    pub warmup_ratio: f64,
    /// Clip the global gradient norm (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Dropout inside BERT and on the pooled vector while training.
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f32,
    /// Seed for initialisation, shuffling and dropout: the same seed gives the same file.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Use only the first N training rows.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Use only the first N evaluation rows.
    #[arg(long)]
    pub limit_eval: Option<usize>,
    /// Label names in index order, comma-separated (default: labels.txt beside the data, else
    /// the sorted distinct labels found).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Also write the result as a PEFT adapter directory.
    #[arg(long)]
    pub export_peft: Option<PathBuf>,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Record the training loss and learning rate every N optimizer steps (in the metrics JSON
    /// and the learning-curve picture).
    #[arg(long, default_value_t = 20)]
    pub log_every: usize,
    #[command(flatten)]
    pub device: super::DeviceArgs,
}

pub fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let spec = match &args.labels {
        Some(l) => LabelSpec::Names(l.clone()),
        None => LabelSpec::Discover,
    };
    let cols = args.columns.columns();
    let mut train_set = data::load(&args.train, &cols, &spec, args.columns.skip_bad_rows)?;
    if let Some(n) = args.limit_train {
        train_set.examples.truncate(n);
    }
    let eval_set = match &args.eval {
        Some(path) => {
            let mut ds = data::load(
                path,
                &cols,
                &LabelSpec::Names(train_set.labels.clone()),
                args.columns.skip_bad_rows,
            )?;
            if let Some(n) = args.limit_eval {
                ds.examples.truncate(n);
            }
            Some(ds)
        }
        None => None,
    };
    anyhow::ensure!(
        args.device.dtype == crate::model::Precision::F32,
        "training runs in f32 (the prefix's gradients need it); drop --dtype {}",
        args.device.dtype
    );
    let engine = Engine::load(&EngineConfig {
        model_dir: super::hub::resolve_model(&args.model)?,
        max_length: args.max_length,
        device: args.device.device,
        precision: args.device.dtype,
        base_model_id: args.base_model_id.clone(),
    })?;
    let cfg = TrainConfig {
        task: args.task.clone(),
        virtual_tokens: args.virtual_tokens,
        epochs: args.epochs,
        lr: args.lr,
        batch_size: args.batch_size,
        max_length: args.max_length,
        projection: args.projection,
        weight_decay: args.weight_decay,
        warmup_ratio: args.warmup_ratio,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        dropout: args.dropout,
        seed: args.seed,
        log_every: args.log_every,
    };
    eprintln!(
        "training {:?}: {} examples, labels {:?}, P = {}, {} epochs, batch {}, lr {}",
        cfg.task,
        train_set.examples.len(),
        train_set.labels,
        cfg.virtual_tokens,
        cfg.epochs,
        cfg.batch_size,
        cfg.lr
    );
    let mut bar = ProgressOutput::default();
    let observer: &mut dyn TrainObserver = if args.quiet { &mut Quiet } else { &mut bar };
    let (file, report) = train(&engine, &train_set, eval_set.as_ref(), &cfg, observer)?;
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    file.write(&args.output)?;
    let metrics_path = metrics_path(&args.output);
    std::fs::write(&metrics_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("{}", metrics_path.display()))?;
    let curve_path = sibling(&args.output, "curve.svg");
    std::fs::write(
        &curve_path,
        crate::training::plots::learning_curve_svg(&report)?,
    )
    .with_context(|| format!("{}", curve_path.display()))?;
    if let Some(dir) = &args.export_peft {
        super::convert::warn_if_base_unknown(&peft::export_dir(&file, dir)?);
    }
    if let Some(e) = report.epochs[report.best_epoch - 1].eval.as_ref() {
        eprint!(
            "best epoch {} on the eval set:\n{}",
            report.best_epoch,
            e.render()
        );
    }
    eprintln!(
        "wrote {} (best epoch {}, {:.1} s, {:.1} examples/s), {} and {}",
        args.output.display(),
        report.best_epoch,
        report.train_seconds,
        report.examples_per_s,
        metrics_path.display(),
        curve_path.display()
    );
    Ok(())
}

/// A progress bar per epoch and a summary line after it, on stderr.
#[derive(Default)]
struct ProgressOutput {
    bar: Option<indicatif::ProgressBar>,
}

impl TrainObserver for ProgressOutput {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, steps: usize) {
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        self.bar = Some(bar);
    }

    fn step_done(&mut self, mean_loss: f64, examples_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {mean_loss:.4}  {examples_per_s:.1} ex/s"));
            bar.inc(1);
        }
    }

    fn epoch_done(&mut self, r: &EpochReport) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let eval_text = r.eval.as_ref().map_or(String::new(), |e| {
            format!(
                "  eval accuracy {:.4}  macro-F1 {:.4}  loss {:.4}",
                e.accuracy, e.macro_f1, e.loss
            )
        });
        eprintln!(
            "epoch {}: train loss {:.4}  {:.1} ex/s  {:.1} s{eval_text}",
            r.epoch, r.train_loss, r.examples_per_s, r.seconds
        );
    }
}

/// `dir/name.safetensors` → `dir/name.metrics.json`.
pub fn metrics_path(output: &std::path::Path) -> PathBuf {
    sibling(output, "metrics.json")
}

/// `dir/NAME.<suffix>` for an output `dir/NAME.safetensors`.
fn sibling(output: &std::path::Path, suffix: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}.{suffix}"))
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A native prefix file or a PEFT adapter directory.
    #[arg(long)]
    pub prefix: PathBuf,
    /// Labelled data: .tsv, .csv or .jsonl; labels are the prefix's label names or indices.
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Use only the first N rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also draw the confusion matrix into this SVG file.
    #[arg(long, value_name = "FILE")]
    pub confusion_svg: Option<PathBuf>,
}

pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let engine = Engine::load(&args.model.engine_config()?)?;
    let task = engine
        .load_task(&args.prefix)
        .with_context(|| format!("{}", args.prefix.display()))?;
    let mut ds = data::load(
        &args.data,
        &args.columns.columns(),
        &LabelSpec::Names(task.labels().to_vec()),
        args.columns.skip_bad_rows,
    )?;
    if let Some(n) = args.limit {
        ds.examples.truncate(n);
    }
    let report = evaluate(&engine, &task, &ds.examples, args.batch_size)?;
    if let Some(path) = &args.confusion_svg {
        let title = format!("{} on {}", task.name(), args.data.display());
        let svg = crate::training::plots::confusion_svg(&report, task.labels(), &title)?;
        std::fs::write(path, svg).with_context(|| format!("{}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}
