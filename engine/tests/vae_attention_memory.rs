//! The VAE's mid-block attention in query chunks sized from a memory budget
//! ([`pixmarket_engine::vae::attention_query_chunk`]), on the random fixture VAE (base 6) in f32
//! on the CPU: the head of a decode (post-quant conv, `conv_in`, mid block) gives the same bits
//! unchunked, at the default budget and at 1 MiB; its measured peak with a small working memory
//! stays under [`vae_head_bytes_within`] and far under the unchunked run's, which really holds
//! the whole score matrices.
//!
//! The tests of this binary share one allocator counter, so they take
//! [`common::SERIAL`] in turn (the allocator is `tests/common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{SERIAL, measured_peak};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::memory::vae_head_bytes_within;
use pixmarket_engine::noise::gaussian;
use pixmarket_engine::vae::{AutoencoderKLQwenImage, attention_query_chunk};

/// 64×48 latents (512×384 px): 3072 tokens (more than the default chunk's 2048 rows), whose
/// full f32 score matrices (3 of them) are 113 MB, while a 1 MiB chunk holds 28 query rows.
const LATENT_H: usize = 64;
const LATENT_W: usize = 48;

fn vae() -> AutoencoderKLQwenImage {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae");
    AutoencoderKLQwenImage::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

fn latents() -> Tensor {
    let n = 16 * LATENT_H * LATENT_W;
    Tensor::from_vec(gaussian(3, n), (1, 16, LATENT_H, LATENT_W), &Device::Cpu).unwrap()
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
        .to_scalar::<f32>()
        .unwrap()
}

/// Relative difference allowed between chunked and unchunked heads: f32 rounding of a sum
/// taken in another order (many-row chunks measure exactly 0).
const ROUNDING: f32 = 1e-6;

#[test]
fn chunked_head_equals_unchunked() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let z = latents();
    let mut v = vae();
    let tokens = LATENT_H * LATENT_W;
    v.set_attention_budget(Some(u64::MAX));
    assert_eq!(attention_query_chunk(u64::MAX, 1, tokens), tokens);
    let whole = v.decode_head(&z).unwrap();
    for budget in [None, Some(1 << 20), Some(1)] {
        v.set_attention_budget(budget);
        let chunked = v.decode_head(&z).unwrap();
        let d = max_diff(&chunked, &whole);
        println!(
            "budget {budget:?} B: {} rows per chunk, max |chunked - unchunked| = {d:e}",
            pixmarket_engine::vae::attention_rows(budget, None, 0, 1, tokens)
        );
        // Chunks of many rows give the same bits; a 1-row chunk runs candle's matrix-vector
        // path, whose sums round differently (measured 2.6e-7 relative).
        let scale = whole.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let rel = d / scale.to_scalar::<f32>().unwrap();
        println!("  relative {rel:e}");
        assert!(rel <= ROUNDING, "budget {budget:?}: {rel}");
    }
}

#[test]
fn head_peak_is_bounded_by_the_chunk() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let z = latents();
    let mut v = vae();
    let cfg = v.config().clone();
    let w_px = u32::try_from(LATENT_W * 8).unwrap();
    let h_px = u32::try_from(LATENT_H * 8).unwrap();
    let tokens = (LATENT_H * LATENT_W) as u64;
    // Two full score matrices are alive at once unchunked (the scaled scores, then the
    // probabilities beside them); the formula counts three to bound the softmax's temporaries.
    let full_scores = 2 * tokens * tokens * 4;

    v.set_attention_budget(Some(u64::MAX));
    let (_, unchunked) = measured_peak(|| v.decode_head(&z).unwrap());

    // 8 MiB of working memory: what the head's frame tensors leave of it sizes the chunk.
    let working = 8u64 << 20;
    v.set_attention_budget(None);
    v.set_working_memory(Some(working));
    let (_, chunked) = measured_peak(|| v.decode_head(&z).unwrap());
    let bound = vae_head_bytes_within(w_px, h_px, &cfg, 4, Some(working));
    let unbounded = vae_head_bytes_within(w_px, h_px, &cfg, 4, None);
    println!(
        "head at {w_px}x{h_px} px: unchunked peak {unchunked} B (full scores {full_scores} B); \
         8 MiB working memory: peak {chunked} B, formula {bound} B (default budget: {unbounded} B)"
    );
    assert!(
        unchunked >= full_scores,
        "the unchunked run held the whole scores"
    );
    assert!(chunked <= bound, "measured {chunked} > formula {bound}");
    assert!(
        bound <= working + (1 << 20),
        "the formula keeps within the working memory"
    );
    assert!(chunked * 8 < unchunked, "chunking bounded the peak");
}
