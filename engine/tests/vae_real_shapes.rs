//! The real Qwen-Image VAE config, built without its weights: every tensor the model asks for
//! must be in diffusers' `AutoencoderKLQwenImage()` with the same shape (recorded from a
//! meta-device instance in `fixtures/vae/real_shapes.json`), and every tensor there must be asked
//! for except the resamplers' `time_conv`, which a single frame never uses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use pixmarket_engine::vae::{AutoencoderKLQwenImage, VaeConfig};

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
fn real_config_asks_for_exactly_the_diffusers_tensors() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae/real_shapes.json");
    let real: BTreeMap<String, Vec<usize>> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let backend = ShapeOnly::default();
    let seen = backend.seen.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), DType::BF16, Device::Cpu);
    let vae = AutoencoderKLQwenImage::new(&VaeConfig::default(), vb)?;
    assert_eq!(vae.config().spatial_compression(), 8);
    let seen = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let expected: BTreeMap<String, Vec<usize>> = real
        .into_iter()
        .filter(|(k, _)| !k.contains(".time_conv."))
        .collect();
    let missing: Vec<_> = expected.keys().filter(|k| !seen.contains_key(*k)).collect();
    let extra: Vec<_> = seen.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(missing.is_empty(), "not loaded: {missing:?}");
    assert!(extra.is_empty(), "not in diffusers: {extra:?}");
    for (name, shape) in &seen {
        assert_eq!(Some(shape), expected.get(name), "shape of {name}");
    }
    let params: usize = seen.values().map(|s| s.iter().product::<usize>()).sum();
    println!(
        "real VAE: {} tensors, {params} parameters loaded (time_conv skipped)",
        seen.len()
    );
    Ok(())
}
