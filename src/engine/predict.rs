//! From logits to what a caller reads: scores, the winning label.

use serde::{Deserialize, Serialize};

use crate::engine::Task;
use crate::prefix::ProblemType;

/// One classified input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub label: String,
    pub label_id: usize,
    /// Softmax of the logits (single-label) or the sigmoid of each (multi-label).
    pub scores: Vec<f32>,
    pub logits: Vec<f32>,
    /// Multi-label tasks only: every label whose score is at least 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

impl Prediction {
    pub fn from_logits(task: &Task, logits: Vec<f32>) -> Self {
        let scores = match task.problem_type() {
            ProblemType::SingleLabel => softmax(&logits),
            ProblemType::MultiLabel => logits.iter().map(|&x| sigmoid(x)).collect(),
        };
        let label_id = argmax(&logits);
        let names = task.labels();
        let labels = (task.problem_type() == ProblemType::MultiLabel).then(|| {
            scores
                .iter()
                .zip(names)
                .filter(|(s, _)| **s >= 0.5)
                .map(|(_, n)| n.clone())
                .collect()
        });
        Self {
            label: names[label_id].clone(),
            label_id,
            scores,
            logits,
            labels,
        }
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax` does.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

pub fn softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = xs.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
