//! The shipped drawn tiny model draws what it is asked, measured from the pixels by
//! [`pixmarket_engine::scenes::check_adherence`] (no model judges a model):
//! - held-out prompts (color–shape–position triples never seen in training), English and Chinese;
//! - img2img at strength 0.3 keeps the input's shapes at their places (against strength 1.0);
//! - inpainting keeps the picture beyond a border around the mask and draws the prompt's shape
//!   inside it.
//!
//! The measured figures are in the engine README ("The drawn tiny model").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device};
use pixmarket_engine::drawn::{
    DRAWN_CFG, DRAWN_MODEL_ID, DRAWN_SIDE, DRAWN_STEPS, install_drawn_model, is_installed,
};
use pixmarket_engine::image_io::encode_png;
use pixmarket_engine::scenes::{Lang, POSITIONS, Scene, check_adherence, held_out_set};
use pixmarket_engine::tiny::{ensure_tiny_model, write_tiny_model};
use pixmarket_engine::{GenerateRequest, Mode, QwenImage};

/// Held-out prompts per language: the floor.
const N: usize = 50;
/// Share of held-out prompts, per language, that must be fully right (background and shape):
/// the bar of 90 %, 45 of 50. The shipped model measures 47 in English and 47 in
/// Chinese at the defaults, 4 steps with CFG 3 (see the engine README).
const MIN_FULLY_RIGHT_PERCENT: usize = 90;
/// img2img inputs (held-out scenes), each prompted with another scene's caption.
const IMG2IMG_INPUTS: usize = 20;
/// Of those, how many must keep every shape at its place in its color at strength 0.3
/// (measured 11 at the defaults, where 0.3 runs 2 of 4 steps; the background mostly follows the
/// other prompt, see the engine README).
const IMG2IMG_MIN_KEPT: usize = 10;
/// At strength 1.0 the input is ignored; its shapes' places then show by chance in at most
/// this many (measured 4), so the floor above measures the strength, not luck.
const IMG2IMG_CONTROL_MAX: usize = 6;
/// Largest mean |Δ| (levels) beyond the inpainting border, any of the 10 images (measured 8.8;
/// 18.4 before the decoder's own training phase).
const INPAINT_OUTSIDE_MAX: f32 = 14.0;
/// Of the 10 inpainted images, how many must show the prompt's shape inside the mask
/// (measured 10).
const INPAINT_MIN_DRAWN: usize = 7;
/// Seed of the held-out set (the README's figures are for this set).
const HELD_OUT_SEED: u64 = 0x4845_4c44;

fn load(dir: &Path) -> QwenImage {
    install_drawn_model(dir).unwrap();
    QwenImage::load(dir, DType::F32, &Device::Cpu).unwrap()
}

fn request(prompt: String, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::text_to_image(prompt, DRAWN_SIDE, DRAWN_SIDE, DRAWN_STEPS);
    r.true_cfg_scale = DRAWN_CFG;
    r.seed = seed;
    r
}

fn run(model: &QwenImage, reqs: &[GenerateRequest]) -> Vec<Vec<u8>> {
    model
        .generate(reqs, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .into_iter()
        .map(|g| g.rgb)
        .collect()
}

fn png(rgb: &[u8]) -> Vec<u8> {
    encode_png(rgb, DRAWN_SIDE, DRAWN_SIDE, &[]).unwrap()
}

#[test]
fn the_tiny_model_is_the_drawn_one_and_replaces_a_random_one() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny");
    write_tiny_model(&tiny).unwrap();
    assert!(!is_installed(&tiny));
    ensure_tiny_model(&tiny).unwrap();
    assert!(is_installed(&tiny));
    let model = QwenImage::load(&tiny, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.model_id(), DRAWN_MODEL_ID);
}

#[test]
fn held_out_prompts_are_drawn_in_english_and_chinese() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&dir.path().join("tiny"));
    let scenes = held_out_set(HELD_OUT_SEED, N);
    assert!(scenes.iter().all(Scene::has_held_out));
    for lang in [Lang::En, Lang::Zh] {
        let reqs: Vec<_> = scenes
            .iter()
            .enumerate()
            .map(|(i, s)| request(s.caption(lang), i as u64))
            .collect();
        let imgs = run(&model, &reqs);
        let failed: Vec<String> = scenes
            .iter()
            .zip(&imgs)
            .filter(|(s, img)| !check_adherence(s, img, DRAWN_SIDE).ok())
            .map(|(s, _)| s.caption(lang))
            .collect();
        let correct = N - failed.len();
        let backgrounds = scenes
            .iter()
            .zip(&imgs)
            .filter(|(s, img)| check_adherence(s, img, DRAWN_SIDE).background_ok)
            .count();
        println!(
            "{lang}: {correct}/{N} held-out prompts fully right, {backgrounds}/{N} backgrounds right"
        );
        // The background is drawn as asked for ≥ 90 % of held-out prompts (the bar).
        assert!(
            backgrounds * 10 >= N * 9,
            "{lang}: {backgrounds}/{N} backgrounds"
        );
        // Background and shape both right: the bar.
        assert!(
            correct * 100 >= N * MIN_FULLY_RIGHT_PERCENT,
            "{lang}: {correct}/{N}; failed: {failed:#?}"
        );
    }
}

/// Runs img2img on `scenes`, each drawn as the input with the *next* scene's caption as the
/// prompt, and counts (inputs whose shapes stay at their places in their colors, inputs whose
/// background stays as drawn).
fn img2img_kept(model: &QwenImage, scenes: &[Scene], strength_permille: u16) -> (usize, usize) {
    let reqs: Vec<_> = scenes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let other = &scenes[(i + 1) % scenes.len()];
            let mut r = request(other.caption(Lang::En), i as u64);
            r.mode = Mode::ImageToImage {
                init_image: png(&s.render(DRAWN_SIDE)),
                strength_permille,
            };
            r
        })
        .collect();
    let imgs = run(model, &reqs);
    let measured: Vec<_> = scenes
        .iter()
        .zip(&imgs)
        .map(|(s, img)| check_adherence(s, img, DRAWN_SIDE))
        .collect();
    let shapes = measured.iter().filter(|a| a.shapes_ok()).count();
    let backgrounds = measured.iter().filter(|a| a.background_ok).count();
    (shapes, backgrounds)
}

#[test]
fn img2img_at_strength_0_3_keeps_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&dir.path().join("tiny"));
    let scenes = held_out_set(HELD_OUT_SEED ^ 1, IMG2IMG_INPUTS);
    // The prompt describes a different scene, so a shape kept at its place is the strength's
    // doing, not the prompt's; strength 1.0 (the input ignored) is the control.
    let (shapes, backgrounds) = img2img_kept(&model, &scenes, 300);
    let (control_shapes, control_backgrounds) = img2img_kept(&model, &scenes, 1000);
    println!(
        "img2img 0.3: {shapes}/{IMG2IMG_INPUTS} inputs keep their shapes' places and colors, \
         {backgrounds}/{IMG2IMG_INPUTS} their background; strength 1.0: {control_shapes} and \
         {control_backgrounds}"
    );
    assert!(shapes >= IMG2IMG_MIN_KEPT, "{shapes}/{IMG2IMG_INPUTS}");
    assert!(
        control_shapes <= IMG2IMG_CONTROL_MAX,
        "strength 1.0 kept {control_shapes}/{IMG2IMG_INPUTS}: the measure does not tell"
    );
}

/// Pixels farther than this from the mask (in pixels, Chebyshev) must stay as the VAE
/// reconstructs the input: two latent cells, the reach of the decoder's 3×3 convolutions
/// around a changed latent cell.
const INPAINT_BORDER: usize = 16;

#[test]
fn inpainting_keeps_the_picture_beyond_the_mask_border() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&dir.path().join("tiny"));
    let side = DRAWN_SIDE as usize;
    // A scene with its shape on the left; the prompt asks for the same scene with the shape
    // on the right, and the mask covers the right third.
    let mut scenes = held_out_set(HELD_OUT_SEED ^ 2, 10);
    for s in &mut scenes {
        s.first.position = 0;
    }
    let mask_x0 = side * 5 / 8;
    let mask: Vec<u8> = (0..side * side)
        .flat_map(|i| {
            let v = if i % side >= mask_x0 { 255 } else { 0 };
            [v, v, v]
        })
        .collect();
    let mut reqs = Vec::new();
    let mut wanted = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        let mut target = s.clone();
        target.first.position = 1; // right
        // The inpainted image should show the original shape on the left and a new one on
        // the right: describe only the new one, as a user would.
        let mut r = request(target.caption(Lang::En), i as u64);
        r.mode = Mode::Inpaint {
            init_image: png(&s.render(DRAWN_SIDE)),
            mask: png(&mask),
            strength_permille: 1000,
        };
        reqs.push(r);
        wanted.push(target);
    }
    let imgs = run(&model, &reqs);
    let mut drawn = 0;
    let mut worst_outside = 0f32;
    let mut least_inside = f32::INFINITY;
    for ((s, target), img) in scenes.iter().zip(&wanted).zip(&imgs) {
        let input = s.render(DRAWN_SIDE);
        // Outside the mask and its border: as the input, within the VAE's reconstruction error.
        let mut diffs = Vec::new();
        for y in 0..side {
            for x in 0..mask_x0.saturating_sub(INPAINT_BORDER) {
                for c in 0..3 {
                    let i = 3 * (y * side + x) + c;
                    diffs.push((i32::from(img[i]) - i32::from(input[i])).unsigned_abs());
                }
            }
        }
        let mean = diffs.iter().sum::<u32>() as f32 / diffs.len() as f32;
        worst_outside = worst_outside.max(mean);
        let inside: f32 = (0..side)
            .flat_map(|y| (mask_x0..side).map(move |x| (x, y)))
            .flat_map(|(x, y)| (0..3).map(move |c| 3 * (y * side + x) + c))
            .map(|i| f32::from(img[i].abs_diff(input[i])))
            .sum::<f32>()
            / (3 * side * (side - mask_x0)) as f32;
        least_inside = least_inside.min(inside);
        // Inside: the prompt's shape at the right.
        let frac = check_adherence(target, img, DRAWN_SIDE).shape_fractions[0];
        drawn += usize::from(frac >= pixmarket_engine::scenes::SHAPE_FRACTION);
        assert_eq!(POSITIONS[target.first.position].0, "on the right");
    }
    println!(
        "inpaint: {drawn}/10 draw the shape inside the mask; mean |Δ| beyond the border at most \
         {worst_outside:.1} levels, inside the mask at least {least_inside:.1}"
    );
    // Beyond the border the picture stays close to the input (the VAE's own error on these
    // scenes is ≈ 8 levels; its mid-block attention lets every latent cell reach every pixel, so
    // no border makes it exact).
    assert!(worst_outside < INPAINT_OUTSIDE_MAX, "{worst_outside:.1}");
    // Inside the mask the prompt's shape is drawn where the input had none.
    assert!(
        drawn >= INPAINT_MIN_DRAWN,
        "{drawn}/10 shapes drawn in the mask"
    );
}
