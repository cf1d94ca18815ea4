//! Provider-side caching on the random tiny model, run through the real pipeline:
//! - step caching off is the uncached computation bit for bit, and the cached path with a
//!   threshold that never reuses gives the same bits (so a reuse is the only thing that changes
//!   an image);
//! - a threshold that always allows reuse reuses exactly the steps the rule allows, per row;
//! - the prompt-embedding cache changes no bit of any image, and holds to its bound in bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::pipeline::{GenerateRequest, QwenImage};
use pixmarket_engine::step_cache::{MAX_CONSECUTIVE_REUSES, WARMUP_STEPS, may_reuse};
use pixmarket_engine::tiny::ensure_random_tiny_model;
use pixmarket_engine::{RunStats, StepCacheMode};

fn model() -> (tempfile::TempDir, QwenImage) {
    let tmp = tempfile::tempdir().unwrap();
    ensure_random_tiny_model(tmp.path()).unwrap();
    let m = QwenImage::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    (tmp, m)
}

/// Two requests in one group: one with CFG (two rows), one without, prompts of different
/// lengths (so the text is padded and masked).
fn requests(steps: u32) -> Vec<GenerateRequest> {
    let mut a = GenerateRequest::text_to_image("a red fox in the snow", 64, 64, steps);
    a.seed = 3;
    a.true_cfg_scale = 4.0;
    a.negative_prompt = "blurry".into();
    let mut b = GenerateRequest::text_to_image("a lighthouse", 64, 64, steps);
    b.seed = 9;
    vec![a, b]
}

fn run(m: &QwenImage, reqs: &[GenerateRequest], mode: StepCacheMode) -> (Vec<Vec<f32>>, RunStats) {
    let (latents, stats) = m
        .generate_latents_with(reqs, mode, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let flat = latents
        .iter()
        .map(|t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (flat, stats)
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn off_is_exact_and_a_cache_that_never_reuses_changes_no_bit() {
    let (_dir, m) = model();
    let reqs = requests(6);
    let plain = m
        .generate_latents(&reqs, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let plain: Vec<Vec<f32>> = plain
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let (off, off_stats) = run(&m, &reqs, StepCacheMode::Off);
    assert_eq!(bits(&plain), bits(&off));
    // Three rows (a's two CFG branches and b) × 6 steps, all full.
    assert_eq!(
        off_stats,
        RunStats {
            full_forwards: 18,
            reused_forwards: 0
        }
    );
    let (zero, zero_stats) = run(&m, &reqs, StepCacheMode::FirstBlock { threshold: 0.0 });
    assert_eq!(
        bits(&plain),
        bits(&zero),
        "the cached path itself moved a bit"
    );
    assert_eq!(zero_stats, off_stats);
}

#[test]
fn an_unbounded_threshold_reuses_exactly_what_the_rule_allows() {
    let (_dir, m) = model();
    let steps = 10;
    let reqs = requests(steps);
    let (exact, _) = run(&m, &reqs, StepCacheMode::Off);
    let (cached, stats) = run(
        &m,
        &reqs,
        StepCacheMode::FirstBlock {
            threshold: f32::MAX,
        },
    );
    // The rule, replayed: a step may reuse when allowed and the row has not reused
    // MAX_CONSECUTIVE_REUSES in a row.
    let (mut reused_per_row, mut in_a_row) = (0u64, 0u32);
    for i in 0..steps as usize {
        if may_reuse(i, 0, steps as usize - 1) && in_a_row < MAX_CONSECUTIVE_REUSES {
            reused_per_row += 1;
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
    }
    assert!(WARMUP_STEPS >= 1 && reused_per_row > 0);
    assert_eq!(stats.reused_forwards, 3 * reused_per_row);
    assert_eq!(stats.full_forwards, 3 * (u64::from(steps) - reused_per_row));
    // Reuse changes the image, but only by an approximation: finite, and not the same bits.
    assert_ne!(bits(&exact), bits(&cached));
    for (e, c) in exact.iter().zip(&cached) {
        assert!(c.iter().all(|x| x.is_finite()));
        let err: f32 = e.iter().zip(c).map(|(a, b)| (a - b).abs()).sum::<f32>() / e.len() as f32;
        let scale: f32 = e.iter().map(|a| a.abs()).sum::<f32>() / e.len() as f32;
        assert!(
            err < scale,
            "mean error {err} against mean magnitude {scale}"
        );
    }
}

#[test]
fn the_prompt_cache_changes_no_bit_and_counts_hits() {
    let (_dir, cached) = model();
    let (_dir2, uncached) = model();
    uncached.set_prompt_cache_bytes(0);
    let reqs = requests(2);
    let mut images = Vec::new();
    for m in [&cached, &cached, &uncached] {
        let out = m
            .generate(&reqs, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        images.push(out.into_iter().map(|g| g.rgb).collect::<Vec<_>>());
    }
    assert_eq!(images[0], images[1]);
    assert_eq!(images[0], images[2]);
    // Three prompts a call (a's prompt and negative prompt, b's prompt): the first call misses
    // all three, the second hits all three; the uncached model, run once, misses all three and keeps none.
    let s = cached.prompt_cache_stats();
    assert_eq!((s.hits, s.misses, s.entries), (3, 3, 3));
    let u = uncached.prompt_cache_stats();
    assert_eq!((u.hits, u.misses, u.entries, u.bytes), (0, 3, 0, 0));
}

#[test]
fn the_prompt_cache_holds_to_its_bound_and_evicts_the_least_recently_used() {
    let (_dir, m) = model();
    let one = |p: &str| {
        let r = GenerateRequest::text_to_image(p, 64, 64, 1);
        m.generate_latents(&[r], &mut |_| ControlFlow::Continue(()))
            .unwrap();
    };
    // Same-length prompts, so every entry has the same size.
    one("aaaa");
    let entry = m.prompt_cache_stats().bytes;
    assert!(entry > 0);
    m.set_prompt_cache_bytes(2 * entry);
    one("bbbb");
    one("aaaa"); // a hit: "aaaa" is now the most recently used
    one("cccc"); // evicts "bbbb"
    let s = m.prompt_cache_stats();
    assert_eq!(
        (s.entries, s.bytes, s.capacity_bytes),
        (2, 2 * entry, 2 * entry)
    );
    assert_eq!((s.hits, s.misses), (1, 3));
    one("aaaa");
    assert_eq!(
        m.prompt_cache_stats().hits,
        2,
        "the recently used entry was evicted"
    );
    one("bbbb");
    assert_eq!(
        m.prompt_cache_stats().misses,
        4,
        "the evicted entry was still there"
    );
    // Shrinking evicts at once; an entry larger than the bound is never stored.
    m.set_prompt_cache_bytes(entry - 1);
    let s = m.prompt_cache_stats();
    assert_eq!((s.entries, s.bytes), (0, 0));
    one("dddd");
    assert_eq!(m.prompt_cache_stats().entries, 0);
}
