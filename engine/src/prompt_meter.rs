//! A prompt's metered token count without a model's weights: what a requester needs to check a
//! provider's quote against its own count. Reads only `model_index.json` (for the model's name,
//! the id providers advertise) and `tokenizer/`, and counts as [`QwenImage::count_prompt_tokens`]
//! does.
//!
//! [`QwenImage::count_prompt_tokens`]: crate::QwenImage::count_prompt_tokens

use std::path::Path;

use serde::Deserialize;

use crate::EngineError;
use crate::tokenizer::PromptTokenizer;

/// Counts prompts in one model's tokenizer.
#[derive(Debug)]
pub struct PromptMeter {
    model_id: String,
    tokenizer: PromptTokenizer,
}

/// The one field of `model_index.json` the meter needs.
#[derive(Deserialize)]
struct IndexName {
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
}

impl PromptMeter {
    /// Reads the model folder `dir` (the diffusers layout a provider loads).
    pub fn from_model_dir(dir: &Path) -> Result<Self, EngineError> {
        let not_model = |reason: String| EngineError::NotAModel {
            dir: dir.to_path_buf(),
            reason,
        };
        if !dir.is_dir() {
            return Err(EngineError::ModelNotFound(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(dir.join("model_index.json"))
            .map_err(|e| not_model(format!("cannot read model_index.json: {e}")))?;
        let index: IndexName = serde_json::from_str(&text)
            .map_err(|e| not_model(format!("bad model_index.json: {e}")))?;
        let tokenizer = PromptTokenizer::from_dir(&dir.join("tokenizer"))
            .map_err(|e| EngineError::component("tokenizer", dir.join("tokenizer"), e))?;
        Ok(Self {
            model_id: model_id(index.name_or_path, dir),
            tokenizer,
        })
    }

    /// The model's id, as its providers advertise it.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The prompt's tokens as a provider of this model meters them: the pipeline's count, and
    /// at least one (the node's generator bills a prompt as one token or more).
    pub fn count(&self, prompt: &str) -> u32 {
        metered_tokens(&self.tokenizer, prompt).max(1)
    }
}

/// A model's id: `_name_or_path` of its `model_index.json`, else its folder's name.
pub(crate) fn model_id(name_or_path: Option<String>, dir: &Path) -> String {
    name_or_path.unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "qwen-image".into())
    })
}

/// The metered count of `prompt`: its tokens without the template, at most the sequence length
/// the encoder keeps (a byte count if the tokenizer cannot encode it, which overstates).
pub(crate) fn metered_tokens(tokenizer: &PromptTokenizer, prompt: &str) -> u32 {
    let max = tokenizer.max_sequence_length();
    let n = tokenizer.count_tokens(prompt).unwrap_or(prompt.len());
    u32::try_from(n.min(max)).unwrap_or(u32::MAX)
}
