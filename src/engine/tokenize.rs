//! Text to token ids, exactly as the PEFT fixtures were encoded.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use super::{EngineError, Result};

/// One input: a text, or a text pair for pair tasks (`[CLS] A [SEP] B [SEP]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextInput {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
}

impl TextInput {
    pub fn single(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            text_pair: None,
        }
    }

    pub fn pair(text: impl Into<String>, pair: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            text_pair: Some(pair.into()),
        }
    }
}

/// Token ids and type ids of one input, unpadded, with `[CLS]`/`[SEP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The model's tokenizer with padding off and `longest_first` truncation.
///
/// The truncation limit depends on the task: a row holds at most `max_positions − P` tokens, since
/// its positions start at P. `tokenizers` keeps truncation in the tokenizer itself, so one
/// configured copy is kept per distinct limit (in practice one per distinct P). Cloning this
/// handle is cheap and shares those copies.
#[derive(Clone)]
pub struct TextEncoder {
    inner: Arc<Inner>,
}

struct Inner {
    base: tokenizers::Tokenizer,
    max_length: usize,
    max_positions: usize,
    /// The model's vocabulary size: a tokenizer that is not the model's own can produce ids past
    /// it, which must be refused here rather than index past the embedding table.
    vocab_size: usize,
    by_limit: Mutex<HashMap<usize, Arc<tokenizers::Tokenizer>>>,
}

impl TextEncoder {
    /// Loads `tokenizer.json`. `max_length` caps every input; the model's positions cap it further;
    /// ids must be below `vocab_size`.
    pub fn from_file(
        path: &Path,
        max_length: usize,
        max_positions: usize,
        vocab_size: usize,
    ) -> Result<Self> {
        let mut base = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        // The shipped tokenizer.json pads to 128; padding is the batcher's job, not the tokenizer's.
        base.with_padding(None);
        Ok(Self {
            inner: Arc::new(Inner {
                base,
                max_length: max_length.max(2),
                max_positions,
                vocab_size,
                by_limit: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The most tokens (with `[CLS]`/`[SEP]`) a row of a task with `p` virtual tokens may hold.
    pub fn limit_for(&self, p: usize) -> usize {
        self.inner
            .max_length
            .min(self.inner.max_positions.saturating_sub(p))
    }

    /// The most tokens a row of `task` may hold: its own truncation length (when it records one),
    /// the engine's `max_length`, and the model's positions less its P.
    pub fn limit_for_task(&self, task: &crate::engine::Task) -> usize {
        self.limit_for_meta(&task.meta)
    }

    /// [`Self::limit_for_task`] from a task's metadata alone (a task not loaded yet).
    pub fn limit_for_meta(&self, meta: &crate::prefix::PrefixMeta) -> usize {
        let limit = self.limit_for(meta.num_virtual_tokens);
        meta.max_length.map_or(limit, |n| n.min(limit))
    }

    /// Encodes one input for `task`: its P, and the truncation length it was trained with.
    pub fn encode_for(&self, input: &TextInput, task: &crate::engine::Task) -> Result<Encoded> {
        self.encode_capped(input, task.num_virtual_tokens(), task.meta.max_length)
    }

    pub fn max_length(&self) -> usize {
        self.inner.max_length
    }

    fn tokenizer_for(&self, limit: usize) -> Result<Arc<tokenizers::Tokenizer>> {
        let mut cache = self
            .inner
            .by_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&limit) {
            return Ok(t.clone());
        }
        let mut t = self.inner.base.clone();
        t.with_truncation(Some(TruncationParams {
            max_length: limit,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let t = Arc::new(t);
        cache.insert(limit, t.clone());
        Ok(t)
    }

    /// Encodes one input for a task with `p` virtual tokens.
    pub fn encode(&self, input: &TextInput, p: usize) -> Result<Encoded> {
        self.encode_capped(input, p, None)
    }

    fn encode_capped(&self, input: &TextInput, p: usize, cap: Option<usize>) -> Result<Encoded> {
        let limit = cap.map_or(self.limit_for(p), |c| c.min(self.limit_for(p)));
        let special = if input.text_pair.is_some() { 3 } else { 2 };
        if limit < special {
            return Err(EngineError::Input(format!(
                "a prefix of {p} virtual tokens leaves no room for input"
            )));
        }
        let tok = self.tokenizer_for(limit)?;
        let enc = match &input.text_pair {
            None => tok.encode(input.text.as_str(), true),
            Some(pair) => tok.encode((input.text.as_str(), pair.as_str()), true),
        }
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        if let Some(bad) = enc
            .get_ids()
            .iter()
            .find(|&&id| id as usize >= self.inner.vocab_size)
        {
            return Err(EngineError::Input(format!(
                "the tokenizer produced id {bad}, outside the model's vocabulary of {}: \
                 tokenizer.json does not belong to this model",
                self.inner.vocab_size
            )));
        }
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }
}
