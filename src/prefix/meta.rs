//! What a prefix file says about itself: the metadata stored in its safetensors header.

use serde::{Deserialize, Serialize};

/// The native format's version. Bumped on any change a older reader would misread.
pub const FORMAT_VERSION: u32 = 1;

/// The key under which [`PrefixMeta`] is stored, as JSON, in the safetensors header metadata.
pub const META_KEY: &str = "prefixd";

/// How scores are derived from logits. PEFT does not record this, so prefixd must.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProblemType {
    /// One label per input: scores are the softmax of the logits (Hugging Face
    /// `single_label_classification`).
    #[default]
    #[serde(alias = "single_label_classification", alias = "single-label")]
    SingleLabel,
    /// Any number of labels per input: scores are the sigmoid of each logit
    /// (`multi_label_classification`).
    #[serde(alias = "multi_label_classification", alias = "multi-label")]
    MultiLabel,
}

impl ProblemType {
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SingleLabel => "single_label",
            Self::MultiLabel => "multi_label",
        }
    }
}

/// The base model a prefix was made for. The shape must match the loaded model; the fingerprint,
/// when present, must too (a prefix tuned on other weights computes something else).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    /// `sha256:<hex>` of the base model's `model.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The hub id of those weights, when known (see `ModelInfo::hub_id`); PEFT exports name it
    /// as `base_model_name_or_path`. `name` is only the model's own label for itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_id: Option<String>,
}

impl BaseModel {
    /// The loaded model's shape and fingerprint.
    pub fn of(model: &crate::model::ModelInfo) -> Self {
        Self {
            name: model.name.clone(),
            layers: model.layers,
            hidden: model.hidden,
            heads: model.heads,
            fingerprint: Some(model.fingerprint.clone()),
            hub_id: model.hub_id.clone(),
        }
    }

    /// The hub id of the weights this prefix was made on: recorded, else known by fingerprint.
    pub fn resolved_hub_id(&self) -> Option<String> {
        self.hub_id.clone().or_else(|| {
            self.fingerprint
                .as_deref()
                .and_then(crate::model::known_hub_id)
                .map(str::to_string)
        })
    }
}

/// Where the prefix came from: `kind` is `peft_import` or `train`; the rest is free-form
/// provenance (adapter path and PEFT version, or training settings and eval numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub kind: String,
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixMeta {
    pub format_version: u32,
    pub task: String,
    pub labels: Vec<String>,
    pub problem_type: ProblemType,
    pub num_virtual_tokens: usize,
    pub base_model: BaseModel,
    pub source: Source,
    /// The truncation length the prefix was trained with. Inputs for this task are truncated to
    /// it (as well as to the engine's own limit), so serving sees what training saw. Absent for
    /// imported PEFT adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

/// Label names PEFT would show when none were given: `LABEL_0`, `LABEL_1`, ….
pub fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}
