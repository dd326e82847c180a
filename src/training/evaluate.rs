//! Classification quality: accuracy, macro-F1, per-class precision/recall, confusion matrix.

use serde::Serialize;

use super::data::Example;
use crate::engine::Task;
use crate::engine::{Engine, EngineError, TextInput};

#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Mean cross-entropy of the softmax scores against the true labels.
    pub loss: f64,
    pub per_class: Vec<ClassReport>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

impl EvalReport {
    /// `scores[i]` are example i's class probabilities.
    pub fn from_scores(labels: &[String], gold: &[usize], scores: &[Vec<f32>]) -> Self {
        let c = labels.len();
        let mut confusion = vec![vec![0usize; c]; c];
        let mut loss = 0f64;
        for (&g, s) in gold.iter().zip(scores) {
            let pred = crate::engine::argmax(s);
            confusion[g][pred] += 1;
            loss -= (s[g].max(1e-12) as f64).ln();
        }
        let n = gold.len().max(1);
        let correct: usize = (0..c).map(|i| confusion[i][i]).sum();
        let per_class: Vec<ClassReport> = (0..c)
            .map(|k| {
                let tp = confusion[k][k] as f64;
                let predicted: usize = (0..c).map(|i| confusion[i][k]).sum();
                let support: usize = confusion[k].iter().sum();
                let precision = if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                };
                let recall = if support > 0 {
                    tp / support as f64
                } else {
                    0.0
                };
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassReport {
                    label: labels[k].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        Self {
            examples: gold.len(),
            accuracy: correct as f64 / n as f64,
            macro_f1: per_class.iter().map(|r| r.f1).sum::<f64>() / c.max(1) as f64,
            loss: loss / n as f64,
            per_class,
            confusion,
        }
    }

    /// A plain-text summary for terminals.
    pub fn render(&self) -> String {
        let mut out = format!(
            "examples {}  accuracy {:.4}  macro-F1 {:.4}  loss {:.4}\n",
            self.examples, self.accuracy, self.macro_f1, self.loss
        );
        let w = self
            .per_class
            .iter()
            .map(|r| r.label.len())
            .max()
            .unwrap_or(5)
            .max(5);
        out += &format!("{:w$}  precision  recall     f1  support\n", "label");
        for r in &self.per_class {
            out += &format!(
                "{:w$}  {:9.4}  {:6.4}  {:5.4}  {:7}\n",
                r.label, r.precision, r.recall, r.f1, r.support
            );
        }
        out += "confusion (rows: true, columns: predicted)\n";
        for (r, row) in self.per_class.iter().zip(&self.confusion) {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:6}")).collect();
            out += &format!("{:w$} {}\n", r.label, cells.join(""));
        }
        out
    }
}

/// Classifies `examples` with `task` through the engine (the server's path) and scores them.
pub fn evaluate(
    engine: &Engine,
    task: &Task,
    examples: &[Example],
    batch_size: usize,
) -> Result<EvalReport, EngineError> {
    let inputs: Vec<TextInput> = examples.iter().map(|e| e.input.clone()).collect();
    let predictions = engine.classify_texts(task, &inputs, batch_size)?;
    let gold: Vec<usize> = examples.iter().map(|e| e.label).collect();
    let scores: Vec<Vec<f32>> = predictions
        .into_iter()
        .map(|p| crate::engine::softmax(&p.logits))
        .collect();
    Ok(EvalReport::from_scores(task.labels(), &gold, &scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_a_known_confusion() {
        let labels = vec!["a".to_string(), "b".to_string()];
        // gold a,a,b,b ; predicted a,b,b,b
        let gold = [0, 0, 1, 1];
        let scores = vec![
            vec![0.9, 0.1],
            vec![0.4, 0.6],
            vec![0.2, 0.8],
            vec![0.3, 0.7],
        ];
        let r = EvalReport::from_scores(&labels, &gold, &scores);
        assert_eq!(r.confusion, vec![vec![1, 1], vec![0, 2]]);
        assert!((r.accuracy - 0.75).abs() < 1e-12);
        // a: P 1, R .5, F1 2/3; b: P 2/3, R 1, F1 .8
        assert!((r.macro_f1 - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-9);
        let want_loss = -((0.9f64).ln() + (0.4f64).ln() + (0.8f64).ln() + (0.7f64).ln()) / 4.0;
        assert!((r.loss - want_loss).abs() < 1e-6);
    }
}
