//! The requester's prompt meter counts as the provider's pipeline meters: same model id, same
//! count, from the tokenizer alone; a folder that is not a model is a typed error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device};
use pixmarket_engine::EngineError;
use pixmarket_engine::pipeline::QwenImage;
use pixmarket_engine::prompt_meter::PromptMeter;
use pixmarket_engine::tiny::ensure_tiny_model;

#[test]
fn the_meter_counts_what_the_pipeline_meters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    ensure_tiny_model(&dir).unwrap();
    let model = QwenImage::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let meter = PromptMeter::from_model_dir(&dir).unwrap();
    assert_eq!(meter.model_id(), model.model_id());
    let long = "a red circle on the left ".repeat(200);
    for prompt in [
        "a large red circle on the left on a yellow background",
        "蓝色背景上，一个白色大星星在中间",
        "x",
        long.as_str(),
    ] {
        assert_eq!(
            meter.count(prompt),
            model.count_prompt_tokens(prompt).max(1),
            "{prompt}"
        );
    }
    // The long prompt is capped at what the encoder keeps, as the pipeline caps it.
    assert!(meter.count(&long) < u32::try_from(long.len()).unwrap());
}

#[test]
fn a_folder_that_is_not_a_model_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing here");
    assert!(matches!(
        PromptMeter::from_model_dir(&missing),
        Err(EngineError::ModelNotFound(_))
    ));
    let err = PromptMeter::from_model_dir(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("model_index.json"), "{err}");
}
