//! Previews from the denoising loop with the shipped drawn tiny model: they come at the steps
//! the protocol names, at the protocol's size, change from step to step, come closer to the
//! finished image as the steps go on (they are the model's estimate of it, not noise), and
//! asking for them changes no image.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use pixmarket_engine::drawn::{DRAWN_CFG, DRAWN_SIDE, DRAWN_STEPS, install_drawn_model};
use pixmarket_engine::preview::{StepPreview, preview_of};
use pixmarket_engine::{GenerateRequest, QwenImage, StepCacheMode};
use pixmarket_protocol::preview::{preview_size, preview_steps};

fn request(prompt: &str, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::text_to_image(prompt, DRAWN_SIDE, DRAWN_SIDE, DRAWN_STEPS);
    r.true_cfg_scale = DRAWN_CFG;
    r.seed = seed;
    r
}

fn rgb_of(png: &[u8]) -> Vec<u8> {
    image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
        .into_raw()
}

/// Mean absolute difference per channel, in levels.
fn distance(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    sum as f64 / a.len() as f64
}

#[test]
fn previews_show_the_image_forming_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    install_drawn_model(dir.path()).unwrap();
    let model = QwenImage::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let reqs = [
        request("a red circle on the left", 3),
        request("a blue square", 4),
    ];

    let plain = model
        .generate(&reqs, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let mut made: Vec<(u32, StepPreview)> = Vec::new();
    let (with, _) = model
        .generate_previewing(&reqs, StepCacheMode::Off, &[3, 0], &mut |p, previews| {
            made.extend(previews.into_iter().map(|v| (p.step, v)));
            ControlFlow::Continue(())
        })
        .unwrap();
    // Asking for previews changes no image.
    for (a, b) in plain.iter().zip(&with) {
        assert_eq!(a.rgb, b.rgb);
    }
    // Only the first request asked; its previews come at the protocol's steps, reported with
    // those steps.
    let want = preview_steps(DRAWN_STEPS, 3);
    assert_eq!(want.len(), 3);
    assert!(made.iter().all(|(_, m)| m.request == 0));
    let steps: Vec<u32> = made.iter().map(|(_, m)| m.step).collect();
    assert_eq!(steps, want);
    assert!(made.iter().all(|(at, m)| *at == m.step));
    let (pw, ph) = preview_size(DRAWN_SIDE, DRAWN_SIDE);
    let pictures: Vec<Vec<u8>> = made
        .iter()
        .map(|(_, m)| {
            m.preview.validate(DRAWN_SIDE, DRAWN_SIDE).unwrap();
            assert_eq!((m.preview.width, m.preview.height), (pw, ph));
            rgb_of(&m.preview.png)
        })
        .collect();
    for pair in pictures.windows(2) {
        assert_ne!(pair[0], pair[1], "a preview is the same as the one before");
    }
    // They are the model's estimate of the finished image: the last is closer to the image's
    // own thumbnail than the first, and closer to it than to the other request's image.
    let thumb = |rgb: &[u8]| {
        rgb_of(
            &preview_of(rgb, DRAWN_SIDE, DRAWN_SIDE)
                .unwrap()
                .unwrap()
                .png,
        )
    };
    let final_thumb = thumb(&with[0].rgb);
    let other_thumb = thumb(&with[1].rgb);
    let first = distance(&pictures[0], &final_thumb);
    let last = distance(&pictures[2], &final_thumb);
    println!("distance to the final thumbnail: first {first:.1}, last {last:.1} levels");
    assert!(last < first, "first {first:.1}, last {last:.1}");
    assert!(
        last < distance(&pictures[2], &other_thumb),
        "the last preview is no closer to its own image than to another"
    );
}
