//! Quantized parity: a small random pipeline whose transformer is 256 wide (so Q4_K's 256-weight
//! super-blocks fit every block weight), saved as safetensors, quantized by
//! `quant::quantize_model` to Q8_0 and Q4_K, loaded back, and run against the f32 original:
//! the transformer's velocity (relative error) and the final image (u8 levels), both asserted at
//! the bounds `engine/README.md` states from the measured run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::config::TransformerConfig;
use pixmarket_engine::memory::{WeightFormat, transformer_weight_bytes};
use pixmarket_engine::noise::gaussian;
use pixmarket_engine::pipeline::{GenerateRequest, Mode, QwenImage};
use pixmarket_engine::quant::{GGUF_FILE, QuantFormat, quantize_model};
use pixmarket_engine::transformer::QwenImageTransformer;

/// Q8_0: bounds on the velocity's relative error (max |Δ| / max |v|) and on the image's largest
/// per-pixel difference. Measured on x86-64 (the inputs are seeded, so the run is repeatable):
/// 5.26e-3 and 1 level (mean 0.046). The bounds leave about 2× for other CPUs' and CUDA's
/// kernels.
const Q8_0_VELOCITY: f64 = 1e-2;
const Q8_0_LEVELS: u8 = 2;
/// Q4_K: measured 3.25e-2 and 7 levels (mean 0.452).
const Q4_K_VELOCITY: f64 = 5e-2;
const Q4_K_LEVELS: u8 = 10;

fn cfg() -> TransformerConfig {
    TransformerConfig {
        num_layers: 2,
        attention_head_dim: 128,
        num_attention_heads: 2,
        joint_attention_dim: 32,
        axes_dims_rope: [16, 56, 56],
        ..TransformerConfig::qwen_image_20b()
    }
}

const CONFIG_JSON: &str = r#"{"_class_name": "QwenImageTransformer2DModel", "patch_size": 2,
 "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 128,
 "num_attention_heads": 2, "joint_attention_dim": 32, "guidance_embeds": false,
 "axes_dims_rope": [16, 56, 56]}"#;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let t = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

/// The pipeline fixture's tokenizer, text encoder, VAE and scheduler with a random 256-wide
/// transformer, in `dir`.
fn write_model(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/model");
    copy_dir(&fixture, dir);
    let t = dir.join("transformer");
    std::fs::remove_dir_all(&t).unwrap();
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("config.json"), CONFIG_JSON).unwrap();
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in cfg().tensor_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap() as f32;
        let mut v = gaussian(500 + i as u64, n);
        if name.contains("norm") && shape.len() == 1 {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.2 * *x);
        } else if shape.len() == 1 {
            v.iter_mut().for_each(|x| *x *= 0.05);
        } else {
            v.iter_mut().for_each(|x| *x /= fan_in.sqrt());
        }
        tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&tensors, t.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
}

fn velocity(dir: &Path) -> Tensor {
    let m = QwenImageTransformer::load(&dir.join("transformer"), DType::F32, &Device::Cpu).unwrap();
    let dev = &Device::Cpu;
    let (h, w, s_txt) = (4, 6, 9);
    let img = Tensor::from_vec(gaussian(1, h * w * 64), (1, h * w, 64), dev).unwrap();
    let txt = Tensor::from_vec(gaussian(2, s_txt * 32), (1, s_txt, 32), dev).unwrap();
    let t = Tensor::new(&[0.6f32], dev).unwrap();
    m.forward(&img, &txt, None, &t, (h, w)).unwrap()
}

fn image(dir: &Path) -> Vec<u8> {
    let model = QwenImage::load(dir, DType::F32, &Device::Cpu).unwrap();
    let req = GenerateRequest {
        prompt: "A red cat sitting on a blue chair".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 48,
        steps: 4,
        true_cfg_scale: 1.0,
        seed: 9,
        latents: None,
        mode: Mode::TextToImage,
    };
    model
        .generate(&[req], &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .remove(0)
        .rgb
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    f64::from(diff / scale)
}

fn check(format: QuantFormat, max_velocity: f64, max_levels: u8) {
    let tmp = tempfile::tempdir().unwrap();
    let full: PathBuf = tmp.path().join("full");
    write_model(&full);
    let q = tmp.path().join(format.name());
    let report = quantize_model(&full, &q, format).unwrap();
    // 14 weights per block (2 modulation, 8 attention, 4 feed-forward), every one 256 wide or
    // more: all quantized; biases, norms and the top-level layers kept.
    assert_eq!(report.quantized, 2 * 14, "{report:?}");
    assert!(q.join("transformer").join(GGUF_FILE).is_file());
    // The memory model's weight bytes are the file's, less its header (names, shapes, alignment).
    let computed = transformer_weight_bytes(&cfg(), WeightFormat::Quantized(format));
    assert!(
        report.bytes >= computed && report.bytes <= computed + (64 << 10),
        "file {} B, computed {computed} B",
        report.bytes
    );
    assert!(
        !q.join("transformer/diffusion_pytorch_model.safetensors")
            .exists()
    );
    let v_err = rel_err(&velocity(&q), &velocity(&full));
    let (a, b) = (image(&q), image(&full));
    let levels = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let mean = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / a.len() as f64;
    println!(
        "{}: {} bytes; velocity rel err {v_err:.2e}; image max {levels} levels, mean {mean:.3}",
        format.name(),
        report.bytes
    );
    assert!(
        v_err > 0.0,
        "quantization changed nothing: the test proves nothing"
    );
    assert!(v_err <= max_velocity, "{}: velocity {v_err}", format.name());
    assert!(levels <= max_levels, "{}: {levels} levels", format.name());
}

#[test]
fn q8_0_matches_f32() {
    check(QuantFormat::Q8_0, Q8_0_VELOCITY, Q8_0_LEVELS);
}

#[test]
fn q4_k_matches_f32() {
    check(QuantFormat::Q4K, Q4_K_VELOCITY, Q4_K_LEVELS);
}

#[test]
fn a_lora_on_a_quantized_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    write_model(&full);
    let q = tmp.path().join("q");
    quantize_model(&full, &q, QuantFormat::Q8_0).unwrap();
    let lora = pixmarket_engine::lora::LoraSpec {
        path: tmp.path().join("any.safetensors"),
        scale: 1.0,
    };
    let err = QwenImage::load_with_loras(&q, DType::F32, &Device::Cpu, &[lora])
        .err()
        .unwrap();
    let mut chain = Vec::new();
    let mut e: Option<&dyn std::error::Error> = Some(&err);
    while let Some(x) = e {
        chain.push(x.to_string());
        e = x.source();
    }
    assert!(
        chain.iter().any(|m| m.contains("full-precision")),
        "{chain:?}"
    );
    // A second quantize into a non-empty folder is refused.
    assert!(quantize_model(&full, &q, QuantFormat::Q4K).is_err());
}
