//! The text encoder in llama.cpp's GGUF layout ([`pixmarket_engine::text_encoder_gguf`]).
//!
//! - `fixtures/text_encoder_gguf/{f32,q8_0}/model.gguf`: the tiny encoder of
//!   `fixtures/text_encoder/sharded/` written by the official `gguf` package as llama.cpp's
//!   converter writes Qwen2.5-VL (`tools/make_text_encoder_gguf_fixtures.py`), against the
//!   safetensors encoder and transformers' hidden states.
//! - Q4_K (which gguf 0.19.0 cannot write, and which needs rows of 256): a wider random encoder
//!   written by our own writer, against its safetensors original.
//! - A model folder whose `text_encoder/` is such a file loads and generates.
//!
//! Metric: relative error `max|ours - ref| / max|ref|` over the hidden states of 3 prompts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use pixmarket_engine::quant::{QuantFormat, quantize_model};
use pixmarket_engine::text_encoder::QwenTextEncoder;
use pixmarket_engine::text_encoder_gguf::{quantize_model_text_encoder, write_text_encoder};
use pixmarket_engine::{GenerateRequest, QwenImage};

/// F32 GGUF against the safetensors encoder: the same weights, so the same bits.
const F32_VS_SAFETENSORS: f32 = 0.0;
/// F32 GGUF against transformers (the bound of `text_encoder_parity`).
const F32_VS_REFERENCE: f32 = 1e-4;
/// The package's Q8_0 file (token_embd and linears in Q8_0, ffn_down in F16) against f32.
/// Measured 5.3e-2: random weights at width 32 amplify the rounding (the same model's bf16 run
/// is 2.1e-2 from f32 in `text_encoder_parity`), and candle's Q8_0 matmul rounds the
/// activations to Q8_0 too, as llama.cpp's does.
const Q8_0_TINY: f32 = 8e-2;
/// Our writer, on the wider encoder: Q8_0 and Q4_K against f32. Measured 1.6e-2 and
/// 1.2e-1 (4-bit weights, activations rounded to Q8_K by candle's matmul).
const Q8_0_WIDE: f32 = 3e-2;
const Q4_K_WIDE: f32 = 1.5e-1;
/// The pipeline fixture with its text encoder in Q8_0 against the same folder with it in f32
/// (transformer Q8_0 in both), max per pixel in 1/255. Measured 6 (the tiny pipeline moves 5
/// levels for one changed prompt character: `pipeline_parity`).
const PIPELINE_LEVELS: u8 = 10;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    anyhow::ensure!(ours.dims() == reference.dims(), "shapes differ");
    let diff = (ours - reference)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

fn load(dir: &Path) -> Result<QwenTextEncoder> {
    QwenTextEncoder::load(dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("load {}", dir.display()))
}

/// The fixture's 3 prompts' ids.
fn fixture_ids() -> Result<Vec<Tensor>> {
    let exp = candle_core::safetensors::load(
        fixtures().join("text_encoder/expected.safetensors"),
        &Device::Cpu,
    )?;
    (0..3)
        .map(|i| {
            let t = exp.get(&format!("ids_{i}")).context("ids")?;
            Ok(t.to_dtype(DType::U32)?)
        })
        .collect()
}

fn hidden(te: &QwenTextEncoder, ids: &Tensor) -> Result<Tensor> {
    let ids = ids.unsqueeze(0)?;
    let mask = Tensor::ones(ids.dims(), DType::U8, &Device::Cpu)?;
    Ok(te.encode(&ids, &mask)?.i(0)?)
}

/// The largest relative error of `a` against `b` over `ids`.
fn worst(a: &QwenTextEncoder, b: &QwenTextEncoder, ids: &[Tensor]) -> Result<f32> {
    let mut worst = 0f32;
    for ids in ids {
        worst = worst.max(rel_err(&hidden(a, ids)?, &hidden(b, ids)?)?);
    }
    Ok(worst)
}

#[test]
fn the_gguf_packages_f32_file_equals_the_safetensors_encoder() -> Result<()> {
    let st = load(&fixtures().join("text_encoder/sharded"))?;
    let gg = load(&fixtures().join("text_encoder_gguf/f32"))?;
    assert_eq!(gg.config(), st.config(), "config from the GGUF metadata");
    let ids = fixture_ids()?;
    let err = worst(&gg, &st, &ids)?;
    println!("f32 GGUF vs safetensors: {err:.3e}");
    assert!(err <= F32_VS_SAFETENSORS, "{err}");
    let exp = candle_core::safetensors::load(
        fixtures().join("text_encoder/expected.safetensors"),
        &Device::Cpu,
    )?;
    for (i, ids) in ids.iter().enumerate() {
        let reference = exp.get(&format!("hidden_{i}")).context("hidden")?;
        let err = rel_err(&hidden(&gg, ids)?, reference)?;
        println!("f32 GGUF vs transformers, prompt {i}: {err:.3e}");
        assert!(err <= F32_VS_REFERENCE, "{err}");
    }
    Ok(())
}

#[test]
fn the_gguf_packages_q8_0_file_is_close_to_f32() -> Result<()> {
    let st = load(&fixtures().join("text_encoder/sharded"))?;
    let q = load(&fixtures().join("text_encoder_gguf/q8_0"))?;
    let err = worst(&q, &st, &fixture_ids()?)?;
    println!("gguf-package Q8_0 vs f32: {err:.3e}");
    assert!(
        err > 0.0,
        "Q8_0 changed nothing: the quantized weights were not used"
    );
    assert!(err <= Q8_0_TINY, "{err}");
    Ok(())
}

/// Hidden 256, MLP 512, 4 heads × 64 with 2 KV heads, 2 layers, 64 tokens: rows of 256 and 512
/// take Q4_K blocks. Weights N(0, 1/fan_in) from the engine's seeded noise, in the `model.*`
/// layout with a `config.json`, as transformers writes it.
fn write_wide_encoder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let (hidden, inter, heads, kv, layers, vocab) = (256usize, 512usize, 4, 2, 2, 64);
    let head_dim = hidden / heads;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut seed = 7u64;
    let mut add = |name: String, shape: &[usize], scale: f32| -> Result<()> {
        seed += 1;
        let n = shape.iter().product();
        let v: Vec<f32> = pixmarket_engine::noise::gaussian(seed, n)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        Ok(())
    };
    let w = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add("model.embed_tokens.weight".into(), &[vocab, hidden], 1.0)?;
    add("model.norm.weight".into(), &[hidden], 0.1)?;
    add("lm_head.weight".into(), &[vocab, hidden], w(hidden))?;
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[hidden], 0.1)?;
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[hidden],
            0.1,
        )?;
        add(
            format!("{p}.self_attn.q_proj.weight"),
            &[heads * head_dim, hidden],
            w(hidden),
        )?;
        add(
            format!("{p}.self_attn.q_proj.bias"),
            &[heads * head_dim],
            0.1,
        )?;
        add(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv * head_dim, hidden],
            w(hidden),
        )?;
        add(format!("{p}.self_attn.k_proj.bias"), &[kv * head_dim], 0.1)?;
        add(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv * head_dim, hidden],
            w(hidden),
        )?;
        add(format!("{p}.self_attn.v_proj.bias"), &[kv * head_dim], 0.1)?;
        add(
            format!("{p}.self_attn.o_proj.weight"),
            &[hidden, heads * head_dim],
            w(hidden),
        )?;
        add(
            format!("{p}.mlp.gate_proj.weight"),
            &[inter, hidden],
            w(hidden),
        )?;
        add(
            format!("{p}.mlp.up_proj.weight"),
            &[inter, hidden],
            w(hidden),
        )?;
        add(
            format!("{p}.mlp.down_proj.weight"),
            &[hidden, inter],
            w(inter),
        )?;
    }
    // Norm weights near 1, as trained models have them.
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("norm.weight") {
            *t = (t.clone() + 1.0)?;
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "model_type": "qwen2_5_vl",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

#[test]
fn our_writer_q8_0_and_q4_k_are_close_to_f32_on_a_wider_encoder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("st");
    write_wide_encoder(&src)?;
    let st = load(&src)?;
    let ids: Vec<Tensor> = [(0u32, 11u32), (1, 40), (2, 3)]
        .iter()
        .map(|&(k, len)| {
            let v: Vec<u32> = (0..len).map(|i| (i * 7 + k * 13) % 64).collect();
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu)
        })
        .collect::<candle_core::Result<_>>()?;
    for (format, quantized, bound) in [
        (None, 0, 0.0),
        (Some(QuantFormat::Q8_0), 14, Q8_0_WIDE),
        (Some(QuantFormat::Q4K), 14, Q4_K_WIDE),
    ] {
        let name = format.map_or("f32", QuantFormat::name);
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let report = write_text_encoder(&src, &dir.join("model.gguf"), format)?;
        // 7 linears per layer; the embedding, norms and biases stay f32; lm_head is dropped.
        assert_eq!(report.quantized, quantized, "{name}: {report:?}");
        assert_eq!(
            report.kept,
            2 + 2 * 5 + 2 * 7 - quantized,
            "{name}: {report:?}"
        );
        let gg = load(&dir)?;
        assert_eq!(gg.config(), st.config());
        let err = worst(&gg, &st, &ids)?;
        println!(
            "our writer, {name} vs f32: {err:.3e} ({} bytes)",
            report.bytes
        );
        if format.is_some() {
            assert!(err > 0.0, "{name} changed nothing");
        }
        assert!(err <= bound, "{name}: {err}");
    }
    Ok(())
}

#[test]
fn a_model_folder_with_a_gguf_text_encoder_loads_and_generates() -> Result<()> {
    let src = fixtures().join("pipeline/model");
    let tmp = tempfile::tempdir()?;
    let plain = tmp.path().join("plain");
    let both = tmp.path().join("both");
    quantize_model(&src, &plain, QuantFormat::Q8_0)?;
    quantize_model(&src, &both, QuantFormat::Q8_0)?;
    let report = quantize_model_text_encoder(&src, &both, QuantFormat::Q8_0)?;
    assert!(report.quantized > 0, "{report:?}");
    let te_dir = both.join("text_encoder");
    assert!(te_dir.join("model.gguf").is_file());
    assert!(
        std::fs::read_dir(&te_dir)?
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".safetensors")),
        "the safetensors links are gone"
    );
    // The source folder still has its weights.
    assert!(load(&src.join("text_encoder")).is_ok());

    let run = |dir: &Path| -> Result<Vec<u8>> {
        let model = QwenImage::load(dir, DType::F32, &Device::Cpu)?;
        let mut req =
            GenerateRequest::text_to_image("a red circle on a blue background", 64, 48, 2);
        req.seed = 5;
        let images = model.generate(&[req], &mut |_| std::ops::ControlFlow::Continue(()))?;
        Ok(images.into_iter().next().context("an image")?.rgb)
    };
    let (a, b) = (run(&both)?, run(&plain)?);
    let levels = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    println!("pipeline, Q8_0 text encoder vs f32: max {levels} levels");
    assert!(levels <= PIPELINE_LEVELS, "{levels}");

    let fp = pixmarket_engine::placement::Footprint::of_folder(&both, DType::F32)
        .context("footprint")?;
    let fp_plain = pixmarket_engine::placement::Footprint::of_folder(&plain, DType::F32)
        .context("footprint")?;
    println!(
        "text encoder bytes: {} (Q8_0) vs {} (f32)",
        fp.text_encoder, fp_plain.text_encoder
    );
    assert!(fp.text_encoder < fp_plain.text_encoder);
    Ok(())
}

#[test]
fn bad_gguf_folders_are_refused_with_a_reason() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Two files: which one is meant?
    let two = tmp.path().join("two");
    std::fs::create_dir_all(&two)?;
    for n in ["a.gguf", "b.gguf"] {
        std::fs::copy(
            fixtures().join("text_encoder_gguf/q8_0/model.gguf"),
            two.join(n),
        )?;
    }
    let err = format!("{:#}", anyhow::Error::new(load_err(&two)?));
    assert!(
        err.contains("2 .gguf files") && err.contains("a.gguf"),
        "{err}"
    );
    // Another architecture.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other)?;
    let arch = candle_core::quantized::gguf_file::Value::String("llama".into());
    let t = candle_core::quantized::QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu)?,
        candle_core::quantized::GgmlDType::F32,
    )?;
    let mut f = std::fs::File::create(other.join("model.gguf"))?;
    candle_core::quantized::gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )?;
    drop(f);
    let err = format!("{:#}", anyhow::Error::new(load_err(&other)?));
    assert!(
        err.contains("\"llama\"") && err.contains("qwen2vl"),
        "{err}"
    );
    Ok(())
}

fn load_err(dir: &Path) -> Result<pixmarket_engine::text_encoder::TextEncoderLoadError> {
    match QwenTextEncoder::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => anyhow::bail!("{} loaded", dir.display()),
        Err(e) => Ok(e),
    }
}

/// A folder holding both text encoders: the plan keeps the full-precision one while it fits the
/// device and chooses the quantized one at a memory where it alone does; loading follows the
/// plan (the image equals the quantized-only folder's under the same options, and differs from
/// the full-precision encoder's).
#[test]
fn the_plan_chooses_the_quantized_text_encoder_when_the_full_one_would_not_fit() -> Result<()> {
    use pixmarket_engine::placement::{Footprint, TextEncoderPlace, plan_folder};
    use pixmarket_engine::text_encoder::TextEncoderWeights;
    let src = fixtures().join("pipeline/model");
    let tmp = tempfile::tempdir()?;
    let only_q = tmp.path().join("only-q");
    quantize_model(&src, &only_q, QuantFormat::Q8_0)?;
    quantize_model_text_encoder(&src, &only_q, QuantFormat::Q8_0)?;
    let both = tmp.path().join("both");
    quantize_model(&src, &both, QuantFormat::Q8_0)?;
    write_text_encoder(
        &src.join("text_encoder"),
        &both.join("text_encoder/model.gguf"),
        Some(QuantFormat::Q8_0),
    )?;
    let fp = Footprint::of_folder(&both, DType::F32).context("footprint")?;
    let q_bytes = fp.text_encoder_quantized.context("both kinds are seen")?;
    assert!(q_bytes < fp.text_encoder, "{fp:?}");
    assert_eq!(
        Footprint::of_folder(&only_q, DType::F32)
            .context("footprint")?
            .text_encoder_quantized,
        None
    );

    // The smallest memory (in 16 KiB steps) where the plan picks the quantized encoder.
    let step = 16 << 10;
    let mut chosen = None;
    for k in 1..40_000u64 {
        let p = plan_folder(&both, DType::F32, k * step).context("plan")?;
        if p.text_encoder_weights == TextEncoderWeights::Quantized {
            chosen = Some(p);
            break;
        }
    }
    let p = chosen.context("no memory made the plan choose the quantized text encoder")?;
    println!("{p}");
    assert_ne!(p.text_encoder, TextEncoderPlace::Cpu);
    assert!(p.to_string().starts_with("quantized text encoder"), "{p}");
    let big = plan_folder(&both, DType::F32, 1 << 30).context("plan")?;
    assert_eq!(
        big.text_encoder_weights,
        TextEncoderWeights::FullPrecision,
        "{big}"
    );

    let run = |dir: &Path, which: TextEncoderWeights| -> Result<Vec<u8>> {
        let mut opts = p.load_options();
        opts.text_encoder_weights = which;
        let model = QwenImage::load_with(dir, DType::F32, &Device::Cpu, &opts)?;
        let mut req =
            GenerateRequest::text_to_image("a red circle on a blue background", 64, 48, 2);
        req.seed = 5;
        let images = model.generate(&[req], &mut |_| std::ops::ControlFlow::Continue(()))?;
        Ok(images.into_iter().next().context("an image")?.rgb)
    };
    let planned = run(&both, p.text_encoder_weights)?;
    assert_eq!(planned, run(&only_q, TextEncoderWeights::AsFolder)?);
    assert_ne!(planned, run(&both, TextEncoderWeights::FullPrecision)?);
    Ok(())
}
