//! The real Qwen-Image VAE config, built without its weights: every tensor the model asks for
//! must be in diffusers' `AutoencoderKLQwenImage()` with the same shape (recorded from a
//! meta-device instance in `fixtures/vae/real_shapes.json`), and every tensor there must be asked
//! for except the resamplers' `time_conv`, which a single frame never uses.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Device};
use pixmarket_engine::vae::{AutoencoderKLQwenImage, VaeConfig};
use pixmarket_engine::weights::ShapeOnly;

#[test]
fn real_config_asks_for_exactly_the_diffusers_tensors() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae/real_shapes.json");
    let real: BTreeMap<String, Vec<usize>> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let shapes = ShapeOnly::default();
    let vb = shapes.var_builder(DType::BF16, &Device::Cpu);
    let vae = AutoencoderKLQwenImage::new(&VaeConfig::default(), vb)?;
    assert_eq!(vae.config().spatial_compression(), 8);
    let seen = shapes.seen();
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
