//! Shared helpers for the transformer parity tests: fixture paths and the error metric.
#![allow(dead_code, unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// f32 runs: the reference and ours both in f32.
pub const F32_TOL: f64 = 1e-4;
/// bf16 runs: the reference in bf16 vs ours in bf16.
pub const BF16_TOL: f64 = 2e-2;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformer")
}

pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors (regenerate with engine/tools/make_transformer_fixtures.py)")
}

pub fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn get<'a>(r: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    r.get(name)
        .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
}

/// Relative error `max|ours − ref| / max|ref|` over the whole tensor, both taken in f64.
/// One scale for the tensor (not per element) so values near zero do not dominate.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let a = ours
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = reference
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    assert!(diff.is_finite(), "non-finite values");
    if scale == 0.0 { diff } else { diff / scale }
}

/// Asserts and prints (visible with `--nocapture`) one comparison.
pub fn check(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let e = rel_err(ours, reference);
    println!("{what}: rel err {e:.3e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: rel err {e:.3e} > {tol:.0e}");
}
