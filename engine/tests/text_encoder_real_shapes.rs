//! The real Qwen2.5-VL-7B language model, built without its 15 GB of weights: the tensors the
//! text encoder asks for under `model.language_model.` must be exactly those of transformers'
//! `Qwen2_5_VLForConditionalGeneration` with the real text config (names and shapes recorded
//! from a meta-device instance in `fixtures/text_encoder/real_shapes.json`): no vision tower, no
//! `lm_head`, nothing missing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use pixmarket_engine::text_encoder::{NESTED_PREFIX, QwenTextEncoder, TextEncoderConfig};

/// Records each request and hands back a zero scalar broadcast to the shape (no allocation).
/// The map is shared so the test keeps a handle after the builder takes the backend.
#[derive(Debug, Default)]
struct ShapeOnly {
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        if seen.insert(name.to_string(), s.dims().to_vec()).is_some() {
            candle_core::bail!("{name} requested twice")
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unchecked get of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn real_config_asks_for_exactly_the_language_model_tensors() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text_encoder/real_shapes.json");
    let real: BTreeMap<String, Vec<usize>> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let backend = ShapeOnly::default();
    let seen = backend.seen.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), DType::BF16, Device::Cpu);
    let cfg = TextEncoderConfig::qwen2_5_vl_7b();
    let te = QwenTextEncoder::new(&cfg, vb.pp(NESTED_PREFIX))?;
    assert_eq!(te.config().head_dim(), 128);
    let seen = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
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
