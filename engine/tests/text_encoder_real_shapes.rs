//! The real Qwen2.5-VL-7B language model, built without its 15 GB of weights: the tensors the
//! text encoder asks for under `model.language_model.` must be exactly those of transformers'
//! `Qwen2_5_VLForConditionalGeneration` with the real text config (names and shapes recorded
//! from a meta-device instance in `fixtures/text_encoder/real_shapes.json`): no vision tower, no
//! `lm_head`, nothing missing.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Device};
use pixmarket_engine::text_encoder::{NESTED_PREFIX, QwenTextEncoder, TextEncoderConfig};
use pixmarket_engine::weights::ShapeOnly;

#[test]
fn real_config_asks_for_exactly_the_language_model_tensors() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text_encoder/real_shapes.json");
    let real: BTreeMap<String, Vec<usize>> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let shapes = ShapeOnly::default();
    let vb = shapes.var_builder(DType::BF16, &Device::Cpu);
    let cfg = TextEncoderConfig::qwen2_5_vl_7b();
    let te = QwenTextEncoder::new(&cfg, vb.pp(NESTED_PREFIX))?;
    assert_eq!(te.config().head_dim(), 128);
    let seen = shapes.seen();
    assert_eq!(
        seen, real,
        "requested tensors differ from transformers' language model"
    );
    let params: usize = seen.values().map(|s| s.iter().product::<usize>()).sum();
    println!(
        "real text encoder: {} tensors, {params} parameters",
        seen.len()
    );
    Ok(())
}
