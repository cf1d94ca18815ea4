//! The requester's own tokenizers: a quote may not meter more prompt tokens than we count in the
//! tokenizer of the provider's advertised model (see [`Requester::count_tokens_with`]). A model
//! folder gives its tokenizer without its weights; the built-in tiny model is always known.

use std::path::Path;
use std::sync::Arc;

use pixmarket_engine::EngineError;
use pixmarket_engine::prompt_meter::PromptMeter;

use crate::DataDir;
use crate::requester::Requester;

/// Counts prompts for providers of the model in `model_dir` (a diffusers folder; only its
/// `model_index.json` and `tokenizer/` are read). Returns the model id it counts for.
pub fn count_tokens_of_model(
    requester: &Requester,
    model_dir: &Path,
) -> Result<String, EngineError> {
    let meter = Arc::new(PromptMeter::from_model_dir(model_dir)?);
    let id = meter.model_id().to_owned();
    requester.count_tokens_with(id.clone(), Arc::new(move |p: &str| Some(meter.count(p))));
    Ok(id)
}

/// Counts prompts for providers of the built-in tiny model, installing it in the data folder's
/// `models/tiny` when it is not there yet (a few MB, written once).
pub fn count_tokens_of_tiny(requester: &Requester, dir: &DataDir) -> Result<String, EngineError> {
    let tiny = dir.models_path().join("tiny");
    pixmarket_engine::tiny::ensure_tiny_model(&tiny)?;
    count_tokens_of_model(requester, &tiny)
}
