//! Chunked attention: results equal the unchunked path bit for bit, and the working memory of a
//! forward, measured by a counting allocator, stays under the computed model
//! ([`pixmarket_engine::memory::forward_peak_bytes`]) for the chunk — far under the unchunked
//! score matrices.
//!
//! The tests of this binary share one allocator counter, so they take
//! [`common::SERIAL`] in turn (the allocator is `tests/common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{SERIAL, measured_peak};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pixmarket_engine::config::TransformerConfig;
use pixmarket_engine::memory::{ForwardShape, attention_scores_bytes, forward_peak_bytes};
use pixmarket_engine::noise::gaussian;
use pixmarket_engine::transformer::QwenImageTransformer;

/// A scaled config: one block, 4 heads × 32 (width 128) — the real model's structure.
fn scaled() -> TransformerConfig {
    TransformerConfig {
        num_layers: 1,
        attention_head_dim: 32,
        num_attention_heads: 4,
        joint_attention_dim: 64,
        axes_dims_rope: [4, 14, 14],
        ..TransformerConfig::qwen_image_20b()
    }
}

/// The model with seeded random weights (norm weights near 1).
fn model(cfg: &TransformerConfig, dtype: DType) -> QwenImageTransformer {
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in cfg.tensor_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap() as f32;
        let mut v = gaussian(1000 + i as u64, n);
        if name.contains("norm") {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.2 * *x);
        } else {
            v.iter_mut().for_each(|x| *x /= fan_in.sqrt());
        }
        tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
    QwenImageTransformer::new(cfg, vb).unwrap()
}

struct Inputs {
    img: Tensor,
    txt: Tensor,
    mask: Tensor,
    t: Tensor,
    hw: (usize, usize),
}

/// `rows` rows of an `h`×`w` patch grid and `s_txt` text tokens; row 0 has its last 3 text
/// tokens padded, so the key mask is exercised across chunk boundaries.
fn inputs(cfg: &TransformerConfig, rows: usize, hw: (usize, usize), s_txt: usize) -> Inputs {
    let s_img = hw.0 * hw.1;
    let dev = &Device::Cpu;
    let img = Tensor::from_vec(
        gaussian(1, rows * s_img * cfg.in_channels),
        (rows, s_img, cfg.in_channels),
        dev,
    )
    .unwrap();
    let txt = Tensor::from_vec(
        gaussian(2, rows * s_txt * cfg.joint_attention_dim),
        (rows, s_txt, cfg.joint_attention_dim),
        dev,
    )
    .unwrap();
    let mut mask = vec![1u8; rows * s_txt];
    mask[s_txt - 3..s_txt].iter_mut().for_each(|m| *m = 0);
    let mask = Tensor::from_vec(mask, (rows, s_txt), dev).unwrap();
    let t = Tensor::from_vec(vec![0.7f32; rows], rows, dev).unwrap();
    Inputs {
        img,
        txt,
        mask,
        t,
        hw,
    }
}

fn forward(m: &QwenImageTransformer, x: &Inputs) -> Tensor {
    m.forward(&x.img, &x.txt, Some(&x.mask), &x.t, x.hw)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn chunked_attention_equals_unchunked_bit_for_bit() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = scaled();
    let mut m = model(&cfg, DType::F32);
    let x = inputs(&cfg, 2, (6, 5), 11);
    let s = 30 + 11;
    let whole = values(&forward(&m, &x));
    let per_row = (2 * cfg.num_attention_heads * s * 4 * 2) as u64;
    // One row per chunk, a chunk size that does not divide S (7 rows: 5 full chunks and 6 rows),
    // and half the sequence.
    for rows in [1u64, 7, (s / 2) as u64] {
        m.set_attention_budget(rows * per_row);
        let chunked = values(&forward(&m, &x));
        assert!(
            chunked == whole,
            "{rows}-row chunks differ from the unchunked attention"
        );
    }
}

/// Measures one forward unchunked and in 8 MiB chunks in `dtype` and checks both against the
/// memory model.
fn peak_memory_check(dtype: DType) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = scaled();
    let mut m = model(&cfg, dtype);
    let bytes = dtype.size_in_bytes() as u64;
    // 48×48 patches (768² pixels) and 32 text tokens, one row: S = 2336.
    let x = inputs(&cfg, 1, (48, 48), 32);
    let shape = ForwardShape {
        rows: 1,
        image_tokens: 48 * 48,
        text_tokens: 32,
    };
    let run = |m: &QwenImageTransformer| values(&forward(m, &x).to_dtype(DType::F32).unwrap());

    m.set_attention_budget(u64::MAX);
    let (whole, whole_peak) = measured_peak(|| run(&m));
    let full_scores = attention_scores_bytes(&cfg, shape, u64::MAX);
    let whole_model = forward_peak_bytes(&cfg, shape, bytes, u64::MAX);

    let budget = 8 << 20;
    m.set_attention_budget(budget);
    let (chunked, chunked_peak) = measured_peak(|| run(&m));
    let chunked_model = forward_peak_bytes(&cfg, shape, bytes, budget);
    println!(
        "{dtype:?}, S = {}: unchunked peak {whole_peak} B (model {whole_model} B, scores \
         {full_scores} B); {budget}-B chunks peak {chunked_peak} B (model {chunked_model} B)",
        shape.sequence()
    );
    assert!(chunked == whole, "chunked results differ");
    // The unchunked path really holds the full score matrices; the chunked one stays under the
    // model's bound for its chunk, which is under a fifth of the full matrices here.
    assert!(whole_peak >= full_scores, "{whole_peak} < {full_scores}");
    assert!(chunked_model * 5 < full_scores, "{chunked_model}");
    assert!(
        chunked_peak <= chunked_model,
        "{chunked_peak} > {chunked_model}"
    );
    assert!(whole_peak <= whole_model, "{whole_peak} > {whole_model}");
    // The model is an upper bound, not a loose one: within 1.5× of what was measured.
    assert!(
        chunked_model * 2 <= chunked_peak * 3,
        "model {chunked_model} vs measured {chunked_peak}"
    );
}

#[test]
fn peak_memory_is_bounded_by_the_chunk_f32() {
    peak_memory_check(DType::F32);
}

#[test]
fn peak_memory_is_bounded_by_the_chunk_bf16() {
    peak_memory_check(DType::BF16);
}
