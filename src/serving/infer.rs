//! The one door to inference. Every route that classifies (`/v1/classify`, and whatever protocol
//! adapters sit beside it) hands a task name and its inputs to [`Infer::classify`]; routes only
//! parse and shape. Behind the door: the task lookup, the input limits, tokenization on the
//! blocking pool, admission to the batcher, and waiting for the model thread's answers.
//!
//! `Infer` is a cheap-clone handle over `Arc<Shared>` (as in mini-redis): handlers clone it freely
//! and all reach the same registry, tokenizer and queue.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::batcher::{Batcher, Job, JobError, SubmitError};
use super::registry::{Lookup, Registry, RegistryError};
use crate::engine::{Prediction, Task, TextEncoder, TextInput};

/// What one classification may ask for.
#[derive(Debug, Clone)]
pub struct InputLimits {
    /// Inputs in one call.
    pub max_inputs: usize,
    /// Characters in one text (before tokenization; tokens are truncated anyway).
    pub max_text_chars: usize,
}

#[derive(Clone)]
pub struct Infer {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Registry,
    text: TextEncoder,
    batcher: Batcher,
    limits: InputLimits,
}

/// A classified request: the exact task version that computed it, and one prediction per input.
pub struct Classified {
    pub task: Arc<Task>,
    pub predictions: Vec<Prediction>,
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("no task named {0:?} (GET /v1/tasks lists them)")]
    UnknownTask(String),
    /// Inputs that cannot be classified (none, or the tokenizer refused one).
    #[error("{0}")]
    Input(String),
    /// Inputs over a limit.
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The forward pass failed on this request's rows.
    #[error("{0}")]
    Failed(String),
    /// Still queued when the shutdown deadline came.
    #[error("the server is shutting down and could not run this request in time; retry")]
    Shutdown,
}

impl Infer {
    pub fn new(
        registry: Registry,
        text: TextEncoder,
        batcher: Batcher,
        limits: InputLimits,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry,
                text,
                batcher,
                limits,
            }),
        }
    }

    /// The tokenizer, for what it says about truncation.
    pub fn text(&self) -> &TextEncoder {
        &self.shared.text
    }

    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    pub fn batcher(&self) -> &Batcher {
        &self.shared.batcher
    }

    pub fn limits(&self) -> &InputLimits {
        &self.shared.limits
    }

    /// Whether a task of that name is registered (its weights need not be loaded).
    pub fn check_task(&self, name: &str) -> Result<(), InferError> {
        if self.shared.registry.contains(name) {
            Ok(())
        } else {
            Err(InferError::UnknownTask(name.to_string()))
        }
    }

    /// The task a name refers to now (the version a call would use); a task whose weights are
    /// not in memory is loaded from its file on a blocking thread.
    pub async fn task(&self, name: &str) -> Result<Arc<Task>, InferError> {
        match self.shared.registry.lookup(name) {
            Lookup::Ready(task) => Ok(task),
            Lookup::Missing => Err(InferError::UnknownTask(name.to_string())),
            Lookup::Cold => {
                let registry = self.shared.registry.clone();
                let owned = name.to_string();
                let span = tracing::debug_span!("load_task", task = name);
                tokio::task::spawn_blocking(move || span.in_scope(|| registry.load(&owned)))
                    .await
                    .map_err(|e| InferError::Failed(format!("loading the task failed: {e}")))?
                    .map_err(|e| match e {
                        RegistryError::NotFound(n) => InferError::UnknownTask(n),
                        e => InferError::Failed(format!("task {name:?} could not be loaded: {e}")),
                    })
            }
        }
    }

    /// Classifies `inputs` with task `name`: all rows are admitted together or refused together,
    /// and every row runs on the task version current at admission.
    pub async fn classify(
        &self,
        name: &str,
        inputs: Vec<TextInput>,
    ) -> Result<Classified, InferError> {
        let task = self.task(name).await?;
        self.check(&inputs)?;
        let text = self.shared.text.clone();
        let for_task = task.clone();
        let tokenize = tracing::debug_span!("tokenize", rows = inputs.len());
        let encoded = tokio::task::spawn_blocking(move || {
            let _in = tokenize.enter();
            inputs
                .iter()
                .map(|i| text.encode_for(i, &for_task))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| InferError::Failed(format!("tokenizer task failed: {e}")))?
        .map_err(|e| InferError::Input(e.to_string()))?;

        let now = Instant::now();
        let span = tracing::Span::current();
        let queue = tracing::debug_span!("queue", rows = encoded.len(), task = %task.name());
        let (jobs, replies): (Vec<Job>, Vec<_>) = encoded
            .into_iter()
            .map(|tokens| {
                let (tx, rx) = oneshot::channel();
                let job = Job {
                    task: task.clone(),
                    tokens,
                    enqueued: now,
                    reply: tx,
                    span: span.clone(),
                    queue: queue.clone(),
                };
                (job, rx)
            })
            .unzip();
        drop(queue); // the jobs hold it open until each one's batch starts
        self.shared.batcher.submit(jobs)?;
        let mut predictions = Vec::with_capacity(replies.len());
        for rx in replies {
            match rx.await {
                Ok(Ok(p)) => predictions.push(p),
                Ok(Err(JobError::Failed(e))) => return Err(InferError::Failed(e)),
                Ok(Err(JobError::Shutdown)) => return Err(InferError::Shutdown),
                // The model thread dropped the row without an answer: it is gone.
                Err(_) => return Err(InferError::Submit(SubmitError::ModelGone)),
            }
        }
        Ok(Classified { task, predictions })
    }

    fn check(&self, inputs: &[TextInput]) -> Result<(), InferError> {
        let l = &self.shared.limits;
        if inputs.is_empty() {
            return Err(InferError::Input("no inputs to classify".into()));
        }
        if inputs.len() > l.max_inputs {
            return Err(InferError::TooLarge(format!(
                "{} inputs in one request; the limit is {}",
                inputs.len(),
                l.max_inputs
            )));
        }
        for (i, input) in inputs.iter().enumerate() {
            for (what, s) in [
                ("text", Some(&input.text)),
                ("text_pair", input.text_pair.as_ref()),
            ] {
                if s.is_some_and(|s| s.chars().count() > l.max_text_chars) {
                    return Err(InferError::TooLarge(format!(
                        "inputs[{i}].{what} is longer than {} characters",
                        l.max_text_chars
                    )));
                }
            }
        }
        Ok(())
    }
}
