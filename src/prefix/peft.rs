//! Hugging Face PEFT prefix-tuning adapters: import into the native format and export back.
//!
//! An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with
//! `prompt_embeddings` `[P, L·2·Hd]` (already projected when `prefix_projection` was on) and the
//! classifier head. PEFT saves no label names and no problem type; those come from the caller,
//! or from the `prefixd.json` that our own export writes beside the adapter.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

use super::file::{
    write_atomic, PrefixFile, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, PROMPT_EMBEDDINGS,
};
use super::meta::{default_labels, BaseModel, PrefixMeta, ProblemType, Source, FORMAT_VERSION};
use super::tensors::{self, expect_shape};
use super::{PrefixError, Result};
use crate::model::ModelInfo;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Written by `export-peft` beside the adapter so labels and problem type survive a round trip.
pub const SIDECAR_FILE: &str = "prefixd.json";
/// The model card `export-peft` writes beside the adapter.
pub const CARD_FILE: &str = "README.md";

/// The fields of `adapter_config.json` prefixd reads. Older PEFT versions omit some, newer ones
/// add more; unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: Option<String>,
    pub task_type: Option<String>,
    pub num_virtual_tokens: Option<usize>,
    pub num_layers: Option<usize>,
    pub token_dim: Option<usize>,
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    #[serde(default)]
    pub prefix_projection: Option<bool>,
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub peft_version: Option<String>,
}

/// Labels and problem type as our export records them (PEFT ignores the file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sidecar {
    task: String,
    labels: Vec<String>,
    problem_type: ProblemType,
    #[serde(default)]
    max_length: Option<usize>,
}

/// What the caller knows that the adapter does not say.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Task name; default: the adapter directory's name.
    pub task: Option<String>,
    /// Label names in classifier-row order; default: the sidecar's, else `LABEL_0..`.
    pub labels: Option<Vec<String>>,
    /// Default: the sidecar's, else single-label.
    pub problem_type: Option<ProblemType>,
    /// The truncation length the adapter was trained with (PEFT does not record it); inputs for
    /// the task are cut to it. Default: the sidecar's, else none (the engine's `max_length`).
    pub max_length: Option<usize>,
}

/// Reads a PEFT adapter from its two files' contents, checks it against the model, and builds a
/// native prefix file (not yet written).
pub fn import_bytes(
    config_json: &[u8],
    weights: &[u8],
    sidecar: Option<&[u8]>,
    origin: &str,
    opts: &ImportOptions,
    model: &ModelInfo,
) -> Result<PrefixFile> {
    let cfg: AdapterConfig = serde_json::from_slice(config_json)
        .map_err(|e| PrefixError::Peft(format!("{CONFIG_FILE}: {e}")))?;
    if cfg.peft_type.as_deref() != Some("PREFIX_TUNING") {
        return Err(PrefixError::Peft(format!(
            "peft_type is {:?}, expected \"PREFIX_TUNING\"",
            cfg.peft_type.as_deref().unwrap_or("missing")
        )));
    }
    if let Some(t) = cfg.task_type.as_deref() {
        if t != "SEQ_CLS" {
            return Err(PrefixError::Peft(format!(
                "task_type is {t:?}; prefixd serves sequence classification (\"SEQ_CLS\")"
            )));
        }
    }
    if cfg.num_transformer_submodules.unwrap_or(1) != 1 {
        return Err(PrefixError::Peft(
            "num_transformer_submodules must be 1 (an encoder-only model)".into(),
        ));
    }
    let sidecar: Option<Sidecar> = match sidecar {
        Some(b) => Some(
            serde_json::from_slice(b)
                .map_err(|e| PrefixError::Peft(format!("{SIDECAR_FILE}: {e}")))?,
        ),
        None => None,
    };

    let st = tensors::parse(weights)?;
    let prompt = tensors::read_f32(&st, PROMPT_EMBEDDINGS)?;
    let weight = tensors::read_f32(&st, CLASSIFIER_WEIGHT)?;
    let bias = tensors::read_f32(&st, CLASSIFIER_BIAS)?;

    let p = prompt.shape.first().copied().unwrap_or(0);
    // The config's numbers, when present, must agree with the tensors and the model.
    for (field, value, expected) in [
        ("num_virtual_tokens", cfg.num_virtual_tokens, p),
        ("num_layers", cfg.num_layers, model.layers),
        ("token_dim", cfg.token_dim, model.hidden),
        ("num_attention_heads", cfg.num_attention_heads, model.heads),
    ] {
        if let Some(v) = value {
            if v != expected {
                let against = if field == "num_virtual_tokens" {
                    "the prompt_embeddings rows"
                } else {
                    "the loaded model"
                };
                return Err(PrefixError::Peft(format!(
                    "{field} = {v} in {CONFIG_FILE}, but {against} say{} {expected}",
                    if field == "num_virtual_tokens" {
                        ""
                    } else {
                        "s"
                    }
                )));
            }
        }
    }
    let width = model.layers * 2 * model.hidden;
    expect_shape(
        PROMPT_EMBEDDINGS,
        &prompt,
        &[p, width],
        &format!(
            "P × {} layers · 2 · hidden {} of the loaded model",
            model.layers, model.hidden
        ),
    )?;
    let rows = weight.shape.first().copied().unwrap_or(0);
    let labels = opts
        .labels
        .clone()
        .or_else(|| sidecar.as_ref().map(|s| s.labels.clone()))
        .unwrap_or_else(|| default_labels(rows));
    let task = opts
        .task
        .clone()
        .or_else(|| sidecar.as_ref().map(|s| s.task.clone()))
        .unwrap_or_else(|| "task".into());
    let problem_type = opts
        .problem_type
        .or_else(|| sidecar.as_ref().map(|s| s.problem_type))
        .unwrap_or_default();

    let mut details = serde_json::Map::new();
    details.insert("adapter".into(), origin.into());
    for (k, v) in [
        ("peft_version", cfg.peft_version.clone().map(Into::into)),
        (
            "base_model_name_or_path",
            cfg.base_model_name_or_path.clone().map(Into::into),
        ),
        ("prefix_projection", cfg.prefix_projection.map(Into::into)),
        (
            "encoder_hidden_size",
            cfg.encoder_hidden_size.map(Into::into),
        ),
    ] {
        if let Some(v) = v {
            details.insert(k.into(), v);
        }
    }
    let meta = PrefixMeta {
        format_version: FORMAT_VERSION,
        task,
        labels,
        problem_type,
        num_virtual_tokens: p,
        base_model: BaseModel::of(model),
        source: Source {
            kind: "peft_import".into(),
            details,
        },
        max_length: opts
            .max_length
            .or_else(|| sidecar.as_ref().and_then(|s| s.max_length)),
    };
    let file = PrefixFile::new(meta, prompt, weight, bias)?;
    super::check_against_model(&file, model)?;
    Ok(file)
}

/// Imports an adapter directory.
pub fn import_dir(dir: &Path, opts: &ImportOptions, model: &ModelInfo) -> Result<PrefixFile> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| PrefixError::Io { path, source })
    };
    let sidecar = dir
        .join(SIDECAR_FILE)
        .is_file()
        .then(|| read(SIDECAR_FILE))
        .transpose()?;
    let mut opts = opts.clone();
    if opts.task.is_none() && sidecar.is_none() {
        opts.task = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    }
    import_bytes(
        &read(CONFIG_FILE)?,
        &read(WEIGHTS_FILE)?,
        sidecar.as_deref(),
        &dir.display().to_string(),
        &opts,
        model,
    )
}

/// Choices for an export that the prefix file may not settle.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// The base weights' hub id, overriding what the file records.
    pub base_model_id: Option<String>,
}

/// What an export wrote.
#[derive(Debug, Clone)]
#[must_use]
pub struct Exported {
    /// The `base_model_name_or_path` written; `None` when the base model's id is unknown (the
    /// field is then `null`, so that `AutoPeftModel…` fails instead of loading other weights).
    pub base_model_id: Option<String>,
}

/// The hub id an export names, in order of trust: the caller's; the one the file records or its
/// fingerprint is known by; the one an imported adapter's own config named. Never the model's
/// `_name_or_path`, which may name the checkpoint it was derived from.
fn export_base_id(file: &PrefixFile, opts: &ExportOptions) -> Option<String> {
    opts.base_model_id
        .clone()
        .filter(|id| !id.trim().is_empty())
        .or_else(|| file.meta.base_model.resolved_hub_id())
        .or_else(|| {
            (file.meta.source.kind == "peft_import")
                .then(|| {
                    file.meta
                        .source
                        .details
                        .get("base_model_name_or_path")?
                        .as_str()
                        .map(str::to_string)
                })
                .flatten()
        })
}

/// Writes the prefix as a PEFT adapter directory that `PeftModel.from_pretrained` loads onto
/// `BertForSequenceClassification` with `num_labels` = the prefix's label count.
pub fn export_dir(file: &PrefixFile, dir: &Path) -> Result<Exported> {
    export_dir_with(file, dir, &ExportOptions::default())
}

/// [`export_dir`], with options. Besides the adapter it writes `prefixd.json` (labels, problem
/// type, `id2label`/`label2id`, truncation) and a `README.md` model card that names the base
/// model and shows the Python that loads the adapter with its labels.
pub fn export_dir_with(file: &PrefixFile, dir: &Path, opts: &ExportOptions) -> Result<Exported> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PrefixError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let m = &file.meta;
    let d = &m.source.details;
    let projection = d
        .get("prefix_projection")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let base_id = export_base_id(file, opts);
    // The fields PEFT 0.21 writes for PREFIX_TUNING. The prompt embeddings we store are the final
    // projected values, so the adapter is always written with prefix_projection off: PEFT then
    // uses them as they are. The original setting is kept for information in prefixd.json.
    let config = serde_json::json!({
        "auto_mapping": null,
        "base_model_name_or_path": base_id,
        "encoder_hidden_size": m.base_model.hidden,
        "inference_mode": true,
        "init_weights": null,
        "modules_to_save": ["classifier", "score"],
        "num_attention_heads": m.base_model.heads,
        "num_layers": m.base_model.layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": m.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": false,
        "revision": null,
        "task_type": "SEQ_CLS",
        "token_dim": m.base_model.hidden,
    });
    let weights = tensors::serialize(
        &[
            (PROMPT_EMBEDDINGS, &file.prompt_embeddings),
            (CLASSIFIER_WEIGHT, &file.classifier_weight),
            (CLASSIFIER_BIAS, &file.classifier_bias),
        ],
        HashMap::from([("format".to_string(), "pt".to_string())]),
    )?;
    let sidecar = serde_json::json!({
        "task": m.task,
        "labels": m.labels,
        "problem_type": m.problem_type,
        "trained_with_prefix_projection": projection,
        "base_model_fingerprint": m.base_model.fingerprint,
        "base_model_id": base_id,
        "id2label": id2label(&m.labels),
        "label2id": label2id(&m.labels),
        "max_length": m.max_length,
    });
    let pretty = |v: &serde_json::Value| {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
        s.push('\n');
        s.into_bytes()
    };
    let path = dir.join(CONFIG_FILE);
    write_atomic(&path, &pretty(&config))?;
    write_atomic(&dir.join(WEIGHTS_FILE), &weights)?;
    write_atomic(&dir.join(SIDECAR_FILE), &pretty(&sidecar))?;
    write_atomic(
        &dir.join(CARD_FILE),
        model_card(file, base_id.as_deref()).as_bytes(),
    )?;
    Ok(Exported {
        base_model_id: base_id,
    })
}

fn id2label(labels: &[String]) -> serde_json::Map<String, serde_json::Value> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect()
}

fn label2id(labels: &[String]) -> serde_json::Map<String, serde_json::Value> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect()
}

/// A Hugging Face model card: the front matter the Hub and PEFT read (`base_model`,
/// `library_name`), then how to load the adapter with its labels — the one thing PEFT's own
/// files cannot carry.
fn model_card(file: &PrefixFile, base_id: Option<&str>) -> String {
    let m = &file.meta;
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let id2label = m
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{i}: {}", q(l)))
        .collect::<Vec<_>>();
    let problem = match m.problem_type {
        ProblemType::SingleLabel => "single_label_classification",
        ProblemType::MultiLabel => "multi_label_classification",
    };
    let (front, base_expr, base_note) =
        match base_id {
            Some(id) => (format!("base_model: {}\n", q(id)), q(id), String::new()),
            None => (
                String::new(),
                q("PATH/TO/THE/BASE/MODEL"),
                format!(
                "\n**The base model's hub id is unknown** to prefixd (its weights: `{}`, calling \
                 itself {}). Load those exact weights: another checkpoint, even of the same shape, \
                 computes something else. `adapter_config.json` leaves `base_model_name_or_path` \
                 empty for that reason; export with `--base-model-id` to name it.\n",
                m.base_model.fingerprint.as_deref().unwrap_or("no fingerprint recorded"),
                q(&m.base_model.name)
            ),
            ),
        };
    let max_length = m.max_length.map_or(String::new(), |n| {
        format!(", truncation=True, max_length={n}")
    });
    format!(
        "---\n{front}library_name: peft\npipeline_tag: text-classification\ntags:\n- prefix-tuning\n- prefixd\n---\n\n\
         # {task}\n\n\
         A prefix-tuning adapter ({p} virtual tokens) with a classifier head, exported by prefixd.\n\
         Labels, in the head's row order: {labels}. Problem type: `{problem}`.\n{base_note}\n\
         ```python\n\
         from peft import PeftModel\n\
         from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n\
         base_id = {base_expr}\n\
         id2label = {{{id2label}}}\n\
         base = AutoModelForSequenceClassification.from_pretrained(\n\
         \x20   base_id, num_labels={n}, problem_type=\"{problem}\",\n\
         \x20   id2label=id2label, label2id={{v: k for k, v in id2label.items()}})\n\
         model = PeftModel.from_pretrained(base, \"path/to/this/directory\").eval()\n\
         tokenizer = AutoTokenizer.from_pretrained(base_id)\n\
         batch = tokenizer([\"an example\"], padding=True{max_length}, return_tensors=\"pt\")\n\
         print(model(**batch).logits)\n\
         ```\n",
        task = m.task,
        p = m.num_virtual_tokens,
        labels = m.labels.iter().map(|l| format!("`{l}`")).collect::<Vec<_>>().join(", "),
        n = m.labels.len(),
        id2label = id2label.join(", "),
    )
}
