//! The random tiny model: written deterministically in the diffusers layout, loaded by the same
//! code as real weights, and generating a 256² PNG with its parameters as text chunks; the same
//! seed gives the same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Fixture numbers are small and checked by the assertions themselves.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device};
use pixmarket_engine::image_io::png_text_chunks;
use pixmarket_engine::pipeline::{GenerateRequest, Mode, QwenImage};
use pixmarket_engine::tiny::{TINY_MODEL_ID, ensure_random_tiny_model, write_tiny_model};
use pixmarket_engine::weights::ComponentWeights;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn tiny_model_is_deterministic_loads_and_draws_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tiny_model(&a).unwrap();
    ensure_random_tiny_model(&b).unwrap();
    let (fa, fb) = (files(&a), files(&b));
    assert_eq!(fa, fb, "two writes differ");
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let total: usize = fa.iter().map(|(_, b)| b.len()).sum();
    println!("tiny model: {} files, {total} bytes", fa.len());
    assert!(total < 8_000_000);
    // The real checkpoint's text-encoder key layout.
    let te = ComponentWeights::open(&a.join("text_encoder"), "model").unwrap();
    assert!(te.names().all(|n| n.starts_with("model.language_model.")));

    let model = QwenImage::load(&a, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.model_id(), TINY_MODEL_ID);
    let mut req = GenerateRequest::text_to_image("a red fox in the snow", 256, 256, 2);
    req.seed = 7;
    req.negative_prompt = " ".into();
    req.true_cfg_scale = 4.0;
    let mut steps = 0;
    let t0 = std::time::Instant::now();
    let img = model
        .generate(std::slice::from_ref(&req), &mut |_| {
            steps += 1;
            ControlFlow::Continue(())
        })
        .unwrap()
        .remove(0);
    println!(
        "tiny 256² × 2 steps with CFG: {:.2?} (debug build)",
        t0.elapsed()
    );
    assert_eq!(steps, 2);
    assert_eq!(
        (img.width, img.height, img.rgb.len()),
        (256, 256, 256 * 256 * 3)
    );
    // Noise, but not a flat or saturated image.
    let distinct: std::collections::BTreeSet<u8> = img.rgb.iter().copied().collect();
    assert!(distinct.len() > 20, "{} levels", distinct.len());
    let png = img.png().unwrap();
    let chunks = png_text_chunks(&png).unwrap();
    let get = |k: &str| {
        chunks
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("prompt"), Some("a red fox in the snow"));
    assert_eq!(get("seed"), Some("7"));
    assert_eq!(get("steps"), Some("2"));
    assert_eq!(get("size"), Some("256x256"));
    assert_eq!(get("true_cfg_scale"), Some("4"));
    assert_eq!(get("model"), Some(TINY_MODEL_ID));

    // Same seed → identical bytes; another seed → another picture.
    let again = model.generate(std::slice::from_ref(&req), &mut |_| {
        ControlFlow::Continue(())
    });
    assert_eq!(again.unwrap().remove(0).png().unwrap(), png);
    req.seed = 8;
    let other = model.generate(&[req], &mut |_| ControlFlow::Continue(()));
    assert_ne!(other.unwrap().remove(0).rgb, img.rgb);
}

#[test]
fn tiny_model_runs_img2img_and_inpaint() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(tmp.path()).unwrap();
    let model = QwenImage::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let init = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/init.png"),
    )
    .unwrap();
    let mask = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/mask.png"),
    )
    .unwrap();
    // The init image is 64×48; the requests are 64×64, so it is resized.
    let mut a = GenerateRequest::text_to_image("a cat", 64, 64, 4);
    a.mode = Mode::ImageToImage {
        init_image: init.clone(),
        strength_permille: 600,
    };
    let mut b = GenerateRequest::text_to_image("a dog", 64, 64, 4);
    b.mode = Mode::Inpaint {
        init_image: init,
        mask,
        strength_permille: 600,
    };
    let mut steps = Vec::new();
    let out = model
        .generate(&[a, b], &mut |p| {
            steps.push(p.step);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out.len(), 2);
    // ⌈4 × 0.6⌉ = 3 steps per group, two groups (img2img and inpaint do not share a batch).
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}
