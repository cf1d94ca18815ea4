//! Whole-pipeline parity with diffusers (`tools/make_pipeline_fixtures.py`): a small random
//! Qwen-Image saved by `QwenImagePipeline.save_pretrained`, run from given noise in f32 for
//! text-to-image (2 steps, no CFG; 3 steps, CFG 4), image-to-image (4 steps at 0.5) and inpaint
//! (4 steps at 0.75). The final images must be within 1/255 per pixel of the reference.
//! Also: batching equals running alone, cancellation, strength vs diffusers' `get_timesteps`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Fixture numbers are small and checked by the assertions themselves.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use candle_core::{DType, Device};
use pixmarket_engine::pipeline::{GenerateRequest, Mode, QwenImage, effective_steps, load_latents};
use pixmarket_engine::{EngineError, Progress};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

static MODEL: LazyLock<QwenImage> =
    LazyLock::new(|| QwenImage::load(&fixtures().join("model"), DType::F32, &Device::Cpu).unwrap());

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("meta.json")).unwrap()).unwrap()
}

fn request(name: &str) -> GenerateRequest {
    let meta = meta();
    let case = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone();
    let strength = case["strength"]
        .as_f64()
        .map(|s| (s * 1000.0).round() as u16);
    let read = |f: &str| std::fs::read(fixtures().join(f)).unwrap();
    let mode = match case["mode"].as_str().unwrap() {
        "t2i" => Mode::TextToImage,
        "img2img" => Mode::ImageToImage {
            init_image: read("init.png"),
            strength_permille: strength.unwrap(),
        },
        _ => Mode::Inpaint {
            init_image: read("init.png"),
            mask: read("mask.png"),
            strength_permille: strength.unwrap(),
        },
    };
    let cfg = case["cfg"].as_f64().unwrap() as f32;
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        // The reference's CFG needs a negative prompt; with cfg ≤ 1 ours ignores it.
        negative_prompt: case["negative"].as_str().unwrap_or("").to_string(),
        width: meta["width"].as_u64().unwrap() as u32,
        height: meta["height"].as_u64().unwrap() as u32,
        steps: case["steps"].as_u64().unwrap() as u32,
        true_cfg_scale: cfg,
        seed: 0,
        latents: Some(
            load_latents(&fixtures().join(format!("{name}_latents.safetensors"))).unwrap(),
        ),
        mode,
    }
}

fn expected(name: &str) -> Vec<f32> {
    let t = candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn no_progress(_: Progress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// Runs one case; returns (max |float error|, max |u8 error| in levels).
fn check(name: &str) -> (f32, u8) {
    let req = request(name);
    let latents = MODEL
        .generate_latents(std::slice::from_ref(&req), &mut no_progress)
        .unwrap();
    let ours = MODEL.decode_to_unit(&latents[0]).unwrap();
    let want = expected(name);
    assert_eq!(ours.len(), want.len());
    let float_err = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let image = MODEL.generate(&[req], &mut no_progress).unwrap().remove(0);
    let u8_err = image
        .rgb
        .iter()
        .zip(&want)
        .map(|(&a, &b)| a.abs_diff((b * 255.0).round_ties_even() as u8))
        .max()
        .unwrap();
    println!("{name}: max |ours - diffusers| = {float_err:.3e} (float), {u8_err} level(s) (u8)");
    assert!(float_err <= 1.0 / 255.0, "{name}: float error {float_err}");
    assert!(u8_err <= 1, "{name}: u8 error {u8_err}");
    (float_err, u8_err)
}

#[test]
fn text_to_image_2_steps_matches_diffusers() {
    check("t2i_2step");
}

#[test]
fn text_to_image_3_steps_with_cfg_matches_diffusers() {
    check("t2i_3step_cfg");
}

#[test]
fn image_to_image_matches_diffusers() {
    check("img2img");
}

#[test]
fn inpaint_matches_diffusers() {
    check("inpaint");
}

#[test]
fn a_batch_equals_each_request_alone() {
    // Same size and steps, different prompt lengths (padding + mask), one with CFG.
    let mut a = request("t2i_3step_cfg");
    let mut b = request("t2i_3step_cfg");
    b.prompt = "a much longer prompt about a small red boat on a quiet green river".into();
    b.true_cfg_scale = 1.0;
    a.latents = None;
    a.seed = 5;
    let alone_a = MODEL
        .generate_latents(std::slice::from_ref(&a), &mut no_progress)
        .unwrap();
    let alone_b = MODEL
        .generate_latents(std::slice::from_ref(&b), &mut no_progress)
        .unwrap();
    let mut steps_seen = Vec::new();
    let both = MODEL
        .generate_latents(&[a, b], &mut |p: Progress| {
            steps_seen.push((p.step, p.total));
            ControlFlow::Continue(())
        })
        .unwrap();
    // One group: 3 steps, each one batched transformer call.
    assert_eq!(steps_seen, [(1, 3), (2, 3), (3, 3)]);
    for (alone, batched) in [(&alone_a[0], &both[0]), (&alone_b[0], &both[1])] {
        let d = (alone - batched)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("batched vs alone: max |Δlatent| = {d:.3e}");
        assert!(d < 1e-4, "{d}");
    }
}

#[test]
fn cancelling_stops_at_the_next_step() {
    let req = request("t2i_3step_cfg");
    let mut calls = 0;
    let err = MODEL
        .generate(&[req], &mut |p: Progress| {
            calls += 1;
            if p.step == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err}");
    assert_eq!(calls, 1);
}

#[test]
fn prompts_are_cached_and_counted() {
    let n = MODEL.count_prompt_tokens("A red cat");
    assert!(n > 0);
    let req = request("t2i_2step");
    MODEL
        .generate_latents(std::slice::from_ref(&req), &mut no_progress)
        .unwrap();
    let cached = MODEL.cached_prompts();
    assert!(cached >= 1);
    MODEL.generate_latents(&[req], &mut no_progress).unwrap();
    assert_eq!(MODEL.cached_prompts(), cached);
}

#[test]
fn bad_requests_are_rejected_with_a_reason() {
    let mut r = request("t2i_2step");
    r.width = 60;
    let e = MODEL
        .generate(&[r], &mut no_progress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 16"), "{e}");
    let mut r = request("t2i_2step");
    r.width = 128;
    let e = MODEL
        .generate(&[r], &mut no_progress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("latents have shape"), "{e}");
    let mut r = request("img2img");
    r.mode = Mode::ImageToImage {
        init_image: b"not a png".to_vec(),
        strength_permille: 500,
    };
    let e = MODEL.generate(&[r], &mut no_progress).unwrap_err();
    assert!(matches!(e, EngineError::BadImage { .. }), "{e}");
    let e = load_latents(&fixtures().join("init.png"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad latents file"), "{e}");
}

/// diffusers' `get_timesteps`: `steps − int(steps − steps·strength)` in floating point.
fn diffusers_steps(steps: u32, permille: u16) -> u32 {
    let n = f64::from(steps);
    let init = (n * (f64::from(permille) / 1000.0)).min(n);
    let t_start = (n - init).max(0.0) as u32;
    steps - t_start
}

#[test]
fn strength_steps_match_diffusers_except_float_rounding_cases() {
    // Our count is the exact ceiling; diffusers' float arithmetic runs one more step where
    // steps·strength lands just above an integer (e.g. 25 × 0.56 = 14.000000000000002).
    let mut differ = Vec::new();
    for steps in 1..=200u32 {
        for p in 1..=1000u16 {
            let (ours, theirs) = (effective_steps(steps, Some(p)), diffusers_steps(steps, p));
            if ours != theirs {
                assert_eq!(theirs, ours + 1, "{steps} steps at {p}‰");
                differ.push((steps, p));
            }
        }
    }
    println!(
        "{} of 200 000 (steps, strength) pairs differ: {differ:?}",
        differ.len()
    );
    assert!(differ.contains(&(25, 560)));
    assert_eq!(differ.len(), 15);
    for (steps, p) in [(4, 500), (4, 750), (50, 600), (30, 800)] {
        assert_eq!(effective_steps(steps, Some(p)), diffusers_steps(steps, p));
    }
}

/// The tolerance means something only if the picture depends on what is checked: a changed
/// prompt, strength or mask must move some pixel by well over 1/255.
#[test]
fn the_fixture_images_depend_on_prompt_strength_and_mask() {
    let max_diff = |req: GenerateRequest, name: &str| {
        let l = MODEL.generate_latents(&[req], &mut no_progress).unwrap();
        let ours = MODEL.decode_to_unit(&l[0]).unwrap();
        ours.iter()
            .zip(expected(name))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let mut r = request("t2i_2step");
    r.prompt = "A red cat sitting on a blue chairs".into();
    let d_prompt = max_diff(r, "t2i_2step");
    let mut r = request("t2i_3step_cfg");
    r.negative_prompt = "blurry!".into();
    let d_negative = max_diff(r, "t2i_3step_cfg");
    let mut r = request("img2img");
    r.mode = match r.mode {
        Mode::ImageToImage { init_image, .. } => Mode::ImageToImage {
            init_image,
            strength_permille: 1000,
        },
        m => m,
    };
    let d_strength = max_diff(r, "img2img");
    let mut r = request("inpaint");
    r.mode = match r.mode {
        Mode::Inpaint {
            init_image,
            strength_permille,
            ..
        } => Mode::Inpaint {
            mask: std::fs::read(fixtures().join("init.png")).unwrap(),
            init_image,
            strength_permille,
        },
        m => m,
    };
    let d_mask = max_diff(r, "inpaint");
    println!(
        "sensitivity: prompt {d_prompt:.3}, negative {d_negative:.3}, strength {d_strength:.3}, mask {d_mask:.3}"
    );
    for d in [d_prompt, d_negative, d_strength, d_mask] {
        assert!(d > 5.0 / 255.0, "{d}");
    }
}
