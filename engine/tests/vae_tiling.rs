//! Tiled VAE decode ([`pixmarket_engine::vae_tiling`]) on the small random VAE of
//! `fixtures/vae/` (diffusers' random init, base width 6, the real block structure), in f32:
//! tiled equals untiled within [`TOLERANCE`]; the measured peak of the tiled part stays under
//! the computed bound for one tile ([`vae_tiles_bytes`]), well under the untiled tail's; the head
//! at latent resolution (whose mid-block attention sees the whole frame, so no tile bounds it)
//! stays under its own bound ([`vae_head_bytes`]).
//!
//! The tests of this binary share one allocator counter, so they take
//! [`common::SERIAL`] in turn (the allocator is `tests/common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{SERIAL, measured_peak};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::memory::{vae_decode_bytes, vae_head_bytes, vae_tiles_bytes};
use pixmarket_engine::noise::gaussian;
use pixmarket_engine::vae::AutoencoderKLQwenImage;
use pixmarket_engine::vae_tiling::{VaeTiling, decode_tiled, decode_tiles, min_overlap};

/// Largest difference allowed between a tiled and the untiled decode, on images in [-1, 1].
/// Every weighted pixel of a tile is the untiled value in exact arithmetic, so only float
/// rounding of the weighted sum separates them: 1e-5 is 1/400 of one 8-bit level.
const TOLERANCE: f32 = 1e-5;

fn vae() -> AutoencoderKLQwenImage {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae");
    AutoencoderKLQwenImage::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

fn latents(seed: u64, h: usize, w: usize) -> Tensor {
    Tensor::from_vec(gaussian(seed, 16 * h * w), (1, 16, h, w), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn tiled_equals_untiled() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vae = vae();
    let overlap = min_overlap(vae.config());
    // 48×40 latents (384×320 px): the least overlap with 36-latent tiles (four by two tiles,
    // the last of each axis shifted back), and 40-latent tiles (two by one).
    let z = latents(7, 48, 40);
    let whole = vae.decode(&z).unwrap();
    for tile in [overlap + 4, overlap + 8] {
        let t = VaeTiling { tile, overlap };
        let tiled = decode_tiled(&vae, &z, t).unwrap();
        let d = max_diff(&tiled, &whole);
        println!("tile {tile}, overlap {overlap} latents: max |tiled − untiled| = {d:e}");
        assert!(d <= TOLERANCE, "tile {tile}: {d} > {TOLERANCE}");
    }
    // An image within one tile decodes whole.
    let small = latents(8, 24, 32);
    let d = max_diff(
        &decode_tiled(&vae, &small, VaeTiling { tile: 40, overlap }).unwrap(),
        &vae.decode(&small).unwrap(),
    );
    assert!(d <= TOLERANCE, "{d}");
}

#[test]
fn an_overlap_below_the_receptive_field_is_refused() {
    let vae = vae();
    let z = latents(9, 48, 48);
    let overlap = min_overlap(vae.config());
    for t in [
        VaeTiling {
            tile: 40,
            overlap: overlap - 1,
        },
        VaeTiling {
            tile: overlap,
            overlap,
        },
    ] {
        let e = decode_tiled(&vae, &z, t).unwrap_err().to_string();
        assert!(e.contains("the overlap must be at least"), "{e}");
    }
}

#[test]
fn tiled_peak_is_bounded_by_the_tile() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vae = vae();
    let cfg = vae.config().clone();
    // 32×256 latents (256×2048 px) against 36-latent tiles (288 px): seven tiles along the
    // long side.
    let z = latents(11, 32, 256);
    let t = VaeTiling {
        tile: min_overlap(&cfg) + 4,
        overlap: min_overlap(&cfg),
    };
    let (head, head_peak) = measured_peak(|| vae.decode_head(&z).unwrap());
    let (whole, whole_peak) = measured_peak(|| vae.decode_tail(&head).unwrap());
    let (tiled, tiled_peak) = measured_peak(|| decode_tiles(&vae, &head, t).unwrap());
    let head_model = vae_head_bytes(2048, 256, &cfg, 4);
    let whole_model = vae_decode_bytes(2048, 256, cfg.base_dim, 4);
    let tiled_model = vae_tiles_bytes(2048, 256, &cfg, t, 4);
    println!(
        "2048×256, f32: head peak {head_peak} B (model {head_model} B); untiled tail peak \
         {whole_peak} B (model {whole_model} B); {}-px tiles peak {tiled_peak} B (model \
         {tiled_model} B)",
        t.tile * 8
    );
    let whole = whole.clamp(-1f32, 1f32).unwrap();
    assert!(max_diff(&whole, &tiled) <= TOLERANCE);
    assert!(head_peak <= head_model, "{head_peak} > {head_model}");
    assert!(tiled_peak <= tiled_model, "{tiled_peak} > {tiled_model}");
    assert!(whole_peak <= whole_model, "{whole_peak} > {whole_model}");
    // The tile bounds the tiled part: under half the untiled tail's peak.
    assert!(tiled_peak * 2 < whole_peak, "{tiled_peak} vs {whole_peak}");
}
