//! The real 20B configuration, exercised without its 40 GB of weights: the full module tree is
//! built over a backend that checks every requested name and shape and hands back a broadcast
//! scalar (one element allocated per tensor). The requested tensors must be exactly the ones
//! diffusers' model holds (names, shapes, count 20,430,401,088 — recorded from a meta-device
//! `QwenImageTransformer2DModel()` in `fixtures/transformer/real_20b.json`).

// A test crate: its helpers may panic on a broken fixture exactly as `#[test]` functions may
// (clippy's allow-*-in-tests covers only the latter); sizes are tiny, so casts cannot truncate.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

mod transformer_support;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pixmarket_engine::config::TransformerConfig;
use pixmarket_engine::transformer::QwenImageTransformer;
use pixmarket_engine::weights::ShapeOnly;
use transformer_support::fixtures;

fn real() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("real_20b.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[cfg(target_os = "linux")]
fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

#[test]
fn preset_equals_the_shipped_config() {
    let r = real();
    let parsed = TransformerConfig::from_json(&r["config"].to_string()).unwrap();
    assert_eq!(parsed, TransformerConfig::qwen_image_20b());
    parsed.validate().unwrap();
}

#[test]
fn full_20b_tree_builds_from_shapes_only() {
    let cfg = TransformerConfig::qwen_image_20b();
    let shapes = ShapeOnly::default();
    let vb = shapes.var_builder(DType::BF16, &Device::Cpu);
    let model = QwenImageTransformer::new(&cfg, vb).unwrap();
    assert_eq!(model.blocks().len(), 60);
    #[cfg(target_os = "linux")]
    assert!(
        resident_mib() < 2048,
        "building the tree allocated {} MiB",
        resident_mib()
    );

    let seen = shapes.seen();
    let total: u64 = seen
        .values()
        .map(|s| s.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    let r = real();
    assert_eq!(total, r["total_params"].as_u64().unwrap());
    assert_eq!(total, 20_430_401_088);
    assert_eq!(seen.len() as u64, r["num_tensors"].as_u64().unwrap());
    // Top level and block 0 against diffusers, name by name.
    for (name, shape) in r["shapes"].as_object().unwrap() {
        let want: Vec<usize> = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(seen.get(name), Some(&want), "{name}");
    }
    // Every block requests block 0's names and shapes.
    let block0: Vec<(String, Vec<usize>)> = seen
        .iter()
        .filter_map(|(n, s)| {
            n.strip_prefix("transformer_blocks.0.")
                .map(|k| (k.to_string(), s.clone()))
        })
        .collect();
    for i in 1..60 {
        for (k, s) in &block0 {
            assert_eq!(
                seen.get(&format!("transformer_blocks.{i}.{k}")),
                Some(s),
                "block {i} {k}"
            );
        }
    }
    // The config's own list agrees with what the model asked for.
    let listed: BTreeMap<String, Vec<usize>> = cfg.tensor_shapes().into_iter().collect();
    assert_eq!(listed, seen);
}

#[test]
fn zero_weights_forward_has_the_packed_shape() {
    let cfg = TransformerConfig {
        num_layers: 1,
        attention_head_dim: 8,
        num_attention_heads: 2,
        joint_attention_dim: 12,
        axes_dims_rope: [2, 2, 4],
        ..TransformerConfig::qwen_image_20b()
    };
    let dev = Device::Cpu;
    let model = QwenImageTransformer::new(&cfg, VarBuilder::zeros(DType::F32, &dev)).unwrap();
    let img = Tensor::ones((2, 6, 64), DType::F32, &dev).unwrap();
    let txt = Tensor::ones((2, 4, 12), DType::F32, &dev).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 0., 0.]], &dev).unwrap();
    let t = Tensor::new(&[1f32, 0.5], &dev).unwrap();
    let out = model.forward(&img, &txt, Some(&mask), &t, (2, 3)).unwrap();
    assert_eq!(out.dims(), [2, 6, 64]);
}
