//! `prefixd classify`: texts from flags or JSON lines, one JSON line per result.
//!
//! With one `--prefix`, inputs are grouped by length into batches. With several, each JSON line
//! names its task (`"task"`: the prefix's file stem or directory name) and the lines are run in
//! input order, `--batch-size` rows per forward pass whatever their tasks: rows of different
//! tasks share a batch, as they do in the server.

use anyhow::{bail, Context};
use std::io::{BufRead, Write};
use std::path::PathBuf;

use super::ModelArgs;
use crate::engine::Task;
use crate::engine::{Engine, Row, TextInput};

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A native prefix file (.safetensors) or a PEFT adapter directory (repeatable: then each
    /// input line names its task).
    #[arg(long, required = true)]
    pub prefix: Vec<PathBuf>,
    /// A text to classify (repeatable).
    #[arg(long)]
    pub text: Vec<String>,
    /// The second text of a pair, for the preceding --text (pair tasks).
    #[arg(long, requires = "text")]
    pub text_pair: Option<String>,
    /// A file of JSON lines {"text": ..., "text_pair": ..., "task": ...}, or - for standard input.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// One line of `--input`: the text (or pair) and, with several prefixes, its task. Other fields
/// (a label, an id) are ignored, so labelled data can be fed as it is.
#[derive(serde::Deserialize)]
struct Line {
    text: String,
    #[serde(default)]
    text_pair: Option<String>,
    #[serde(default)]
    task: Option<String>,
}

fn read_inputs(args: &ClassifyArgs) -> anyhow::Result<Vec<(Option<String>, TextInput)>> {
    let mut inputs: Vec<(Option<String>, TextInput)> = args
        .text
        .iter()
        .map(|t| (None, TextInput::single(t)))
        .collect();
    if let (Some(pair), Some(last)) = (&args.text_pair, inputs.last_mut()) {
        last.1.text_pair = Some(pair.clone());
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
            let l: Line = serde_json::from_str(&line).with_context(|| {
                format!(
                    "{} line {}: expected {{\"text\": ..., \"text_pair\": ..., \"task\": ...}}",
                    path.display(),
                    n + 1
                )
            })?;
            inputs.push((
                l.task,
                TextInput {
                    text: l.text,
                    text_pair: l.text_pair,
                },
            ));
        }
    }
    if inputs.is_empty() {
        bail!("nothing to classify: give --text or --input");
    }
    Ok(inputs)
}

/// `dir/name.safetensors` or `dir/name/` → `name`.
fn task_key(path: &std::path::Path) -> String {
    let p = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    p.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    let inputs = read_inputs(&args)?;
    let engine = Engine::load(&args.model.engine_config()?)?;
    let mut tasks: Vec<(String, Task)> = Vec::new();
    for path in &args.prefix {
        let task = engine
            .load_task(path)
            .with_context(|| format!("{}", path.display()))?;
        tasks.push((task_key(path), task));
    }
    let mut out = std::io::stdout().lock();
    if tasks.len() == 1 {
        let texts: Vec<TextInput> = inputs.into_iter().map(|(_, i)| i).collect();
        for p in engine.classify_texts(&tasks[0].1, &texts, args.batch_size)? {
            serde_json::to_writer(&mut out, &p)?;
            out.write_all(b"\n")?;
        }
        return Ok(());
    }
    let mut encoded = Vec::with_capacity(inputs.len());
    for (n, (name, input)) in inputs.iter().enumerate() {
        let Some(name) = name else {
            bail!(
                "input {}: with several --prefix, every input names its \"task\"",
                n + 1
            )
        };
        let Some(i) = tasks.iter().position(|(k, _)| k == name) else {
            let known: Vec<&str> = tasks.iter().map(|(k, _)| k.as_str()).collect();
            bail!("input {}: unknown task {name:?} (given: {known:?})", n + 1)
        };
        encoded.push((i, engine.text_encoder().encode_for(input, &tasks[i].1)?));
    }
    for chunk in encoded.chunks(args.batch_size.max(1)) {
        let rows: Vec<Row<'_>> = chunk
            .iter()
            .map(|(i, tokens)| Row {
                task: &tasks[*i].1,
                tokens,
            })
            .collect();
        for ((i, _), p) in chunk.iter().zip(engine.classify(&rows)?) {
            let mut v = serde_json::to_value(&p)?;
            v["task"] = tasks[*i].0.clone().into();
            serde_json::to_writer(&mut out, &v)?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}
