//! The `prefixd` command line. Each subcommand is a config struct (its clap arguments) and a
//! `run` function in its own module.

mod bench;
mod classify;
mod convert;
mod hub;
mod serve;
mod synth;
mod telemetry;

pub use telemetry::{init_tracing, LogFormat, Telemetry};
mod train;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Serve, train and convert prefix-tuned BERT text classifiers.
#[derive(Debug, Parser)]
#[command(name = "prefixd", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as text, or as one JSON object each (for log collectors).
    #[arg(long, env = "PREFIXD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Send OpenTelemetry traces over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318):
    /// a span per request, with tokenize, queue and forward spans inside.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve many tasks over one model on HTTP (classify, tasks, admin, health, metrics).
    Serve(serve::ServeArgs),
    /// Learn a task prefix (and head) on the frozen model from labelled data.
    Train(train::TrainArgs),
    /// Score a prefix on labelled data: accuracy, macro-F1, per-class figures, confusion.
    Eval(train::EvalArgs),
    /// Classify texts with one task prefix (a native file or a PEFT adapter directory).
    Classify(classify::ClassifyArgs),
    /// Convert a PEFT prefix-tuning adapter directory into a native prefix file.
    ImportPeft(convert::ImportArgs),
    /// Write a native prefix file out as a PEFT adapter directory.
    ExportPeft(convert::ExportArgs),
    /// Print a human-readable summary of a prefix file.
    Inspect(convert::InspectArgs),
    /// Measure engine throughput on synthetic inputs; prints one JSON object.
    Bench(bench::BenchArgs),
    /// Write random prefix files (for load tests of the server).
    Synth(synth::SynthArgs),
}

/// Where and in what precision the model runs; shared by every command that runs it.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N, or auto (the GPU when this build has CUDA and one is present).
    #[arg(long, env = "PREFIXD_DEVICE", default_value = "auto")]
    pub device: crate::model::DeviceSpec,
    /// The encoder's precision: f32, or bf16/f16 (opt-in, for GPUs; changes results slightly).
    #[arg(long, env = "PREFIXD_DTYPE", default_value = "f32")]
    pub dtype: crate::model::Precision,
}

/// The base model directory argument shared by every command that runs the model.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Hugging Face BERT directory (config.json, tokenizer.json, model.safetensors), or a hub
    /// model id ORG/NAME[@REVISION] fetched into the standard Hugging Face cache (HF_HOME).
    #[arg(long, env = "PREFIXD_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Truncate inputs to this many tokens [default: 512]. Tasks that record their own
    /// truncation length (trained ones, and imports given one) are cut to theirs as well, and
    /// every row to max_position_embeddings − P.
    #[arg(long, env = "PREFIXD_MAX_LENGTH")]
    pub max_length: Option<usize>,
    /// The Hugging Face hub id of these exact weights, recorded in prefixes and PEFT exports
    /// (known without it for the default model; otherwise exports say the base is unknown).
    #[arg(long, env = "PREFIXD_BASE_MODEL_ID")]
    pub base_model_id: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Where `scripts/fetch-model` puts the default model.
pub const DEFAULT_MODEL: &str = "models/all-minilm-l6-v2";

impl ModelArgs {
    /// The model directory: `--model` itself, or the hub snapshot it names.
    pub fn model_dir(&self) -> anyhow::Result<PathBuf> {
        hub::resolve_model(&self.model)
    }

    pub fn engine_config(&self) -> anyhow::Result<crate::engine::EngineConfig> {
        Ok(crate::engine::EngineConfig {
            model_dir: self.model_dir()?,
            max_length: self.max_length.unwrap_or(crate::engine::DEFAULT_MAX_LENGTH),
            device: self.device.device,
            precision: self.device.dtype,
            base_model_id: self.base_model_id.clone(),
        })
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Classify(a) => classify::run(a),
        Command::Train(a) => train::run_train(a),
        Command::Eval(a) => train::run_eval(a),
        Command::ImportPeft(a) => convert::import(a),
        Command::ExportPeft(a) => convert::export(a),
        Command::Inspect(a) => convert::inspect(a),
        Command::Bench(a) => bench::run(a),
        Command::Synth(a) => synth::run(a),
    }
}
