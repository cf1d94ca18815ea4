//! Loading the transformer from a diffusers folder: a missing or misshapen tensor is an error that
//! names the tensor, the expected shape (and the actual one) and the file.

// A test crate: helpers may panic on a broken fixture exactly as `#[test]` functions may.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod transformer_support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::transformer::QwenImageTransformer;
use transformer_support::fixtures;

/// Copies the single-file bf16 fixture into `dir`, letting `edit` change the tensors first.
fn write_model(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let src = fixtures().join("model_single_bf16/transformer");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
}

fn load_error(dir: &Path) -> String {
    let err = QwenImageTransformer::load(dir, DType::F32, &Device::Cpu).unwrap_err();
    // The whole chain, as the CLI prints it.
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    println!("{msg}");
    msg
}

#[test]
fn missing_tensor_names_tensor_shape_and_file() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), |t| {
        t.remove("transformer_blocks.1.attn.norm_added_k.weight");
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("transformer_blocks.1.attn.norm_added_k.weight"),
        "{msg}"
    );
    assert!(msg.contains("[16]"), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}

#[test]
fn misshapen_tensor_names_both_shapes_and_file() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), |t| {
        let bad = Tensor::zeros((48, 23), DType::BF16, &Device::Cpu).unwrap();
        t.insert("txt_in.weight".to_string(), bad);
    });
    let msg = load_error(dir.path());
    assert!(msg.contains("txt_in.weight"), "{msg}");
    assert!(
        msg.contains("[48, 24]") && msg.contains("[48, 23]"),
        "{msg}"
    );
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}

#[test]
fn f16_checkpoints_load_too() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), |t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::F16).unwrap();
        }
    });
    let m = QwenImageTransformer::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.dtype(), DType::F32);
}
