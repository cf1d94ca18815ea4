//! LoRA parity with diffusers (`tools/make_lora_fixtures.py`): the small random pipeline of
//! `pipeline_parity.rs` with a random LoRA in the diffusers/PEFT layout (alpha from its metadata),
//! one in the kohya layout (`lora_down`/`lora_up` + `alpha`, top-level modules too), and both at
//! once at scales 0.7 and 1.3, as `load_lora_weights` + `set_adapters` applies them; and a
//! Lightning-style run: a `diffusion_model.` + `lora_down`/`lora_up` file (the published
//! Lightning layout), 4 steps, CFG 1, under the Lightning scheduler config. We merge the same
//! files into the weights at load; the images must be within 2/255 per pixel.
//! Also: the LoRA really changes the image, and bad files are typed errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::lora::{LoraError, LoraSpec};
use pixmarket_engine::pipeline::{GenerateRequest, Mode, QwenImage, load_latents};
use pixmarket_engine::scheduler::{FlowMatchEuler, FlowMatchEulerConfig};
use pixmarket_engine::transformer::LoadError;
use pixmarket_engine::{EngineError, Progress};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("pipeline/model")
}

fn lora_meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora/meta.json")).unwrap())
        .unwrap()
}

fn case(name: &str) -> serde_json::Value {
    lora_meta()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn request() -> GenerateRequest {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("pipeline/meta.json")).unwrap(),
    )
    .unwrap();
    let case = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "t2i_2step")
        .unwrap();
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: String::new(),
        width: meta["width"].as_u64().unwrap() as u32,
        height: meta["height"].as_u64().unwrap() as u32,
        steps: case["steps"].as_u64().unwrap() as u32,
        true_cfg_scale: 1.0,
        seed: 0,
        latents: Some(
            load_latents(&fixtures().join("pipeline/t2i_2step_latents.safetensors")).unwrap(),
        ),
        mode: Mode::TextToImage,
    }
}

fn no_progress(_: Progress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn specs(name: &str) -> Vec<LoraSpec> {
    case(name)["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LoraSpec {
            path: fixtures().join("lora").join(l[0].as_str().unwrap()),
            scale: l[1].as_f64().unwrap() as f32,
        })
        .collect()
}

/// Runs one case; returns the max per-pixel difference (u8 levels) from diffusers.
fn check(case_name: &str) -> u8 {
    let case_meta = case(case_name);
    let case = case_name;
    let mut model =
        QwenImage::load_with_loras(&model_dir(), DType::F32, &Device::Cpu, &specs(case)).unwrap();
    if case_meta["scheduler"] == "lightning" {
        model
            .set_scheduler(FlowMatchEulerConfig::lightning())
            .unwrap();
    }
    let steps = case_meta["steps"].as_u64().unwrap() as u32;
    let run = |model: &QwenImage| {
        let req = GenerateRequest { steps, ..request() };
        model
            .generate(&[req], &mut no_progress)
            .unwrap()
            .remove(0)
            .rgb
    };
    let ours = run(&model);
    let want =
        candle_core::safetensors::load(fixtures().join("lora/expected.safetensors"), &Device::Cpu)
            .unwrap()[case]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
    assert_eq!(ours.len(), want.len());
    let err = ours
        .iter()
        .zip(&want)
        .map(|(&a, &b)| a.abs_diff((b * 255.0).round_ties_even() as u8))
        .max()
        .unwrap();
    // The LoRA must move the image well beyond the tolerance, or the check proves nothing.
    let mut base = QwenImage::load(&model_dir(), DType::F32, &Device::Cpu).unwrap();
    if case_meta["scheduler"] == "lightning" {
        base.set_scheduler(FlowMatchEulerConfig::lightning())
            .unwrap();
    }
    let base = run(&base);
    let moved = base
        .iter()
        .zip(&ours)
        .map(|(&a, &b)| a.abs_diff(b))
        .max()
        .unwrap();
    println!(
        "{case}: max |ours - diffusers| = {err} level(s); the LoRA moves pixels by up to {moved}"
    );
    assert!(err <= 2, "{case}: {err} levels from diffusers");
    assert!(moved >= 20, "{case}: the LoRA moved pixels by only {moved}");
    err
}

#[test]
fn peft_layout_matches_diffusers() {
    check("peft");
}

#[test]
fn kohya_layout_matches_diffusers() {
    check("kohya");
}

#[test]
fn two_loras_with_scales_match_diffusers() {
    check("both");
}

#[test]
fn lightning_layout_and_scheduler_match_diffusers() {
    check("lightning");
}

#[test]
fn lightning_sigmas_match_diffusers() {
    for s in lora_meta()["lightning_sigmas"].as_array().unwrap() {
        let steps = s["steps"].as_u64().unwrap() as usize;
        let tokens = s["image_tokens"].as_u64().unwrap() as usize;
        let want: Vec<f32> = s["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let mut sched = FlowMatchEuler::new(FlowMatchEulerConfig::lightning()).unwrap();
        sched.set_timesteps(steps, tokens).unwrap();
        let got = sched.sigmas();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6,
                "{steps} steps, {tokens} tokens: {got:?} vs {want:?}"
            );
        }
    }
}

fn lora_error(specs: &[LoraSpec]) -> LoraError {
    match QwenImage::load_with_loras(&model_dir(), DType::F32, &Device::Cpu, specs) {
        Err(EngineError::Component { source, .. }) => {
            match source.downcast::<LoadError>().map(|b| *b) {
                Ok(LoadError::Lora(e)) => e,
                other => panic!("expected a LoRA error, got {other:?}"),
            }
        }
        Err(e) => panic!("expected a component error, got {e:?}"),
        Ok(_) => panic!("a bad LoRA loaded"),
    }
}

#[test]
fn bad_lora_files_are_typed_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(&str, Tensor)]| {
        let path = dir.path().join(name);
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| ((*k).to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        LoraSpec { path, scale: 1.0 }
    };
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    // A text-encoder LoRA: no such module in the transformer.
    let te = write(
        "te.safetensors",
        &[("lora_te_text_model_q.lora_down.weight", z(&[4, 32]))],
    );
    assert!(matches!(lora_error(&[te]), LoraError::UnknownModule { .. }));
    // A half pair.
    let half = write(
        "half.safetensors",
        &[("transformer.img_in.lora_A.weight", z(&[4, 64]))],
    );
    assert!(matches!(lora_error(&[half]), LoraError::Unpaired { .. }));
    // Another model's shapes (width 64, ours 32).
    let wide = write(
        "wide.safetensors",
        &[
            ("transformer.img_in.lora_A.weight", z(&[4, 64])),
            ("transformer.img_in.lora_B.weight", z(&[64, 4])),
        ],
    );
    let err = lora_error(&[wide]);
    assert!(matches!(err, LoraError::Misshapen { .. }), "{err}");
    assert!(err.to_string().contains("img_in"), "{err}");
    // A full weight, not an adapter.
    let full = write("full.safetensors", &[("img_in.weight", z(&[32, 64]))]);
    assert!(matches!(lora_error(&[full]), LoraError::UnknownKey { .. }));
    // Not a safetensors file.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let err = lora_error(&[LoraSpec {
        path: junk,
        scale: 1.0,
    }]);
    assert!(matches!(err, LoraError::Read { .. }), "{err}");
}
