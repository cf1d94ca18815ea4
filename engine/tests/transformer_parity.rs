//! Parity of the transformer against diffusers' `QwenImageTransformer2DModel` on a small random
//! config (fixtures from `engine/tools/make_transformer_fixtures.py`): timestep embedding, RoPE
//! tables, block 0, and the full forward at batch 1 and batch 2 with a padded prompt, in f32
//! (the sharded f32 checkpoint) and bf16 (the single-file bf16 checkpoint).
//!
//! Metric: `max|ours − ref| / max|ref|` per tensor (see `transformer_support::rel_err`).

// A test crate: its helpers may panic on a broken fixture exactly as `#[test]` functions may
// (clippy's allow-*-in-tests covers only the latter); sizes are tiny, so casts cannot truncate.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

mod transformer_support;

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::config::TransformerConfig;
use pixmarket_engine::rope::RopeTables;
use pixmarket_engine::transformer::{QwenImageTransformer, attention_bias, timestep_sinusoid};
use transformer_support::{BF16_TOL, F32_TOL, check, fixtures, get, meta, reference};

fn grid() -> (usize, usize) {
    let m = meta();
    (
        m["grid"][0].as_u64().unwrap() as usize,
        m["grid"][1].as_u64().unwrap() as usize,
    )
}

fn model(tag: &str) -> (QwenImageTransformer, f64) {
    match tag {
        "f32" => {
            let dir = fixtures().join("model_sharded/transformer");
            assert!(
                dir.join("diffusion_pytorch_model.safetensors.index.json")
                    .is_file()
            );
            (
                QwenImageTransformer::load(&dir, DType::F32, &Device::Cpu).unwrap(),
                F32_TOL,
            )
        }
        _ => {
            let dir = fixtures().join("model_single_bf16/transformer");
            assert!(dir.join("diffusion_pytorch_model.safetensors").is_file());
            (
                QwenImageTransformer::load(&dir, DType::BF16, &Device::Cpu).unwrap(),
                BF16_TOL,
            )
        }
    }
}

fn timestep_embedding(tag: &str) {
    let r = reference();
    let (m, tol) = model(tag);
    let t = get(&r, &format!("{tag}.temb.t"));
    let proj = timestep_sinusoid(t).unwrap();
    check(
        &format!("{tag} timestep sinusoid"),
        &proj,
        get(&r, &format!("{tag}.temb.proj")),
        tol,
    );
    let temb = m.timestep_embedding(t).unwrap();
    check(
        &format!("{tag} temb"),
        &temb,
        get(&r, &format!("{tag}.temb.out")),
        tol,
    );
}

#[test]
fn timestep_embedding_f32() {
    timestep_embedding("f32");
}

#[test]
fn timestep_embedding_bf16() {
    timestep_embedding("bf16");
}

#[test]
fn rope_tables_match_tiny_and_real_axes() {
    let r = reference();
    let m = meta();
    let n = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    for name in ["tiny", "real"] {
        let case = &m["rope_cases"][name];
        let axes = [
            n(&case["axes"][0]),
            n(&case["axes"][1]),
            n(&case["axes"][2]),
        ];
        let hw = (n(&case["grid"][0]), n(&case["grid"][1]));
        let t = RopeTables::new(axes, hw, n(&case["txt_len"]), &Device::Cpu).unwrap();
        for (field, ours) in [
            ("img_cos", &t.img_cos),
            ("img_sin", &t.img_sin),
            ("txt_cos", &t.txt_cos),
            ("txt_sin", &t.txt_sin),
        ] {
            check(
                &format!("rope {name} {field}"),
                ours,
                get(&r, &format!("rope.{name}.{field}")),
                F32_TOL,
            );
        }
    }
}

fn block0(tag: &str) {
    let r = reference();
    let (m, tol) = model(tag);
    let k = |s: &str| get(&r, &format!("{tag}.block0.{s}")).clone();
    let mask = get(&r, &format!("{tag}.mask"));
    let (img, txt) = (k("img"), k("txt"));
    let rope = RopeTables::new(
        m.config().axes_dims_rope,
        grid(),
        txt.dim(1).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let bias = attention_bias(mask, img.dim(1).unwrap()).unwrap();
    let (img_out, txt_out) = m.blocks()[0]
        .forward(&img, &txt, &k("temb"), &rope, Some(&bias))
        .unwrap();
    check(&format!("{tag} block0 img"), &img_out, &k("img_out"), tol);
    // Padded text rows attend normally (only their keys are masked), so all rows compare.
    check(&format!("{tag} block0 txt"), &txt_out, &k("txt_out"), tol);
}

#[test]
fn block0_f32() {
    block0("f32");
}

#[test]
fn block0_bf16() {
    block0("bf16");
}

fn full_forward(tag: &str) {
    let r = reference();
    let (m, tol) = model(tag);
    let k = |s: &str| get(&r, &format!("{tag}.{s}")).clone();
    let (img, txt, mask, t) = (k("img"), k("txt"), k("mask"), k("timestep"));
    let first = |x: &Tensor| x.narrow(0, 0, 1).unwrap();
    let out1 = m
        .forward(&first(&img), &first(&txt), None, &first(&t), grid())
        .unwrap();
    assert_eq!(out1.dtype(), m.dtype());
    check(&format!("{tag} forward batch 1"), &out1, &k("out_b1"), tol);
    let out2 = m.forward(&img, &txt, Some(&mask), &t, grid()).unwrap();
    check(
        &format!("{tag} forward batch 2 padded"),
        &out2,
        &k("out_b2"),
        tol,
    );
}

#[test]
fn full_forward_f32() {
    full_forward("f32");
}

#[test]
fn full_forward_bf16() {
    full_forward("bf16");
}

#[test]
fn padding_does_not_change_the_valid_prompt() {
    // Sample 1 has 3 valid tokens: running it alone, unpadded, must give the same image output.
    let r = reference();
    let (m, _) = model("f32");
    let k = |s: &str| get(&r, &format!("f32.{s}")).clone();
    let (img, txt, t) = (k("img"), k("txt"), k("timestep"));
    let second = |x: &Tensor| x.narrow(0, 1, 1).unwrap();
    let alone = m
        .forward(
            &second(&img),
            &second(&txt).narrow(1, 0, 3).unwrap(),
            None,
            &second(&t),
            grid(),
        )
        .unwrap();
    let batched = m.forward(&img, &txt, Some(&k("mask")), &t, grid()).unwrap();
    check("padded vs unpadded", &second(&batched), &alone, 1e-5);
}

#[test]
fn bad_inputs_are_errors() {
    let (m, _) = model("f32");
    let img = Tensor::zeros((1, 12, 16), DType::F32, &Device::Cpu).unwrap();
    let txt = Tensor::zeros((1, 5, 24), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&img, &txt, None, &t, (3, 5)).is_err());
    assert!(m.forward(&img, &img, None, &t, (3, 4)).is_err());
    let mask = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&img, &txt, Some(&mask), &t, (3, 4)).is_err());
}

#[test]
fn config_json_from_save_pretrained_parses() {
    let cfg =
        TransformerConfig::from_file(&fixtures().join("model_sharded/transformer/config.json"))
            .unwrap();
    assert_eq!(
        (cfg.num_layers, cfg.inner_dim(), cfg.out_dim()),
        (2, 48, 16)
    );
}
