//! The drawn tiny model: a small Qwen-Image trained by the project on the scenes of
//! [`crate::scenes`], shipped in the repository and installed as `--model tiny`.
//!
//! Owns its configs ([`transformer_config`], [`vae_config`], [`text_encoder_config`]), its
//! tokenizer (byte-level BPE whose merges make every word of the scene grammar one token), the
//! files that do not depend on training ([`write_untrained_model`]), the shipped folder
//! (`engine/assets/tiny-drawn/`, embedded with `include_bytes!`) and installing it
//! ([`install_drawn_model`]). Training lives in [`crate::train`].
//!
//! The folder is an ordinary diffusers Qwen-Image folder and loads through
//! [`crate::pipeline::QwenImage::load`] like any other:
//! - `transformer/`: 4 blocks (grown from 2 in training), 4 heads × 32 (RoPE axes 8 + 12 + 12), joint width 32, trained;
//! - `vae/`: the real block structure (`dim_mult` [1, 2, 4, 4]) at base width 8 with one
//!   residual block per level, trained as an autoencoder; `latents_mean` / `latents_std` are
//!   measured on encoded scenes;
//! - `text_encoder/`: a Qwen2.5-VL language model, 2 layers × 32, **random and frozen** (the
//!   random tiny model's initialisation): with one token per word every word gets its own
//!   random vector and the transformer learns to read them, which measured well enough that
//!   training the encoder too (and back-propagating through it every step) was not needed;
//! - `tokenizer/`, `scheduler/`: as the random tiny model's, plus the merges.

use std::path::Path;

use serde_json::json;

use crate::config::TransformerConfig;
use crate::error::EngineError;
use crate::scenes::{COLORS, POSITIONS, RELATIONS, SHAPES, SIZES};
use crate::text_encoder::{NESTED_PREFIX, QwenTextEncoder, TextEncoderConfig};
use crate::tiny::{
    bpe_tokenizer_json, bpe_vocab_size, byte_level, initial_tensors, mkdir, save, write_json,
    write_transformer_config,
};

/// `_name_or_path` of the drawn model's `model_index.json`, its model id.
pub const DRAWN_MODEL_ID: &str = "pixmarket/tiny-qwen-image-drawn";

/// Image side the model is trained at, in pixels: a 4 × 4 grid of packed tokens, which keeps a
/// training step well under a second on two CPU cores. Other multiples of 16 run but were not
/// trained.
pub const DRAWN_SIDE: u32 = 64;
/// Denoising steps chosen by measurement (engine README, "Measured adherence"): with CFG 3,
/// 4 steps drew held-out prompts at least as well as 8 or 20, and a job is metered by its steps.
pub const DRAWN_STEPS: u32 = 4;
/// True CFG scale chosen by measurement (engine README): CFG 3 drew more held-out prompts right
/// than CFG off at every step count. It runs two transformer rows a step, so 4 steps with CFG
/// cost the same compute as 8 without; metering does not price CFG.
pub const DRAWN_CFG: f32 = 3.0;

const TEXT_WIDTH: usize = 32;

/// Transformer blocks of the shipped drawn model.
pub const DRAWN_LAYERS: usize = 4;

/// The shipped drawn transformer's config ([`DRAWN_LAYERS`] blocks).
pub fn transformer_config() -> TransformerConfig {
    transformer_config_with(DRAWN_LAYERS)
}

/// The drawn transformer's config with `layers` blocks (training can grow a model: see
/// [`crate::train::TrainOptions::transformer_layers`]).
pub fn transformer_config_with(layers: usize) -> TransformerConfig {
    TransformerConfig {
        num_layers: layers,
        attention_head_dim: 32,
        num_attention_heads: 4,
        joint_attention_dim: TEXT_WIDTH,
        axes_dims_rope: [8, 12, 12],
        ..TransformerConfig::qwen_image_20b()
    }
}

/// The drawn VAE's config before training (the latent statistics are measured in training).
pub fn vae_config() -> crate::vae::VaeConfig {
    crate::vae::VaeConfig {
        base_dim: 8,
        num_res_blocks: 1,
        latents_mean: vec![0.0; 16],
        latents_std: vec![1.0; 16],
        ..crate::vae::VaeConfig::default()
    }
}

/// The drawn text encoder's config (vocabulary: bytes, the word merges, special tokens).
pub fn text_encoder_config() -> TextEncoderConfig {
    TextEncoderConfig {
        hidden_size: TEXT_WIDTH,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: bpe_vocab_size(word_merges().len()),
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
    }
}

/// Every word of the English grammar and every character of the Chinese one.
fn grammar_words() -> (Vec<String>, Vec<char>) {
    let mut en: Vec<&str> = vec!["a", "on", "and", "background"];
    let mut zh = String::from("一个色背景上下在的，");
    for (e, z, _) in COLORS {
        en.push(e);
        zh.push_str(z);
    }
    for (e, z) in SHAPES {
        en.push(e);
        zh.push_str(z);
    }
    for (e, z, _) in POSITIONS {
        en.extend(e.split(' '));
        zh.push_str(z);
    }
    for (e, z, _, _) in RELATIONS {
        en.extend(e.split(' '));
        zh.push_str(z);
    }
    for (e, z, _) in SIZES {
        en.push(e);
        zh.push_str(z);
    }
    let mut en: Vec<String> = en.into_iter().map(String::from).collect();
    en.sort();
    en.dedup();
    let mut zh: Vec<char> = zh.chars().collect();
    zh.sort_unstable();
    zh.dedup();
    (en, zh)
}

/// The merges that make each grammar word one token: for an English word, the chain that grows
/// `Ġ` + its first letter one letter at a time (`Ġ r`, `Ġr e`, `Ġre d`); every left part starts
/// with `Ġ` (a space), which occurs only at the start of a pre-tokenizer chunk, so no merge can
/// fire inside another word and each chain runs to the end. For a Chinese character, its three
/// UTF-8 bytes (a lead byte never pairs with a continuation byte before it, so these merges only
/// fire on character boundaries). Words at the start of a prompt without a space stay bytes
/// except `a`, a single byte.
pub(crate) fn word_merges() -> Vec<(String, String)> {
    let (en, zh) = grammar_words();
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut known = std::collections::BTreeSet::new();
    let mut chain = |symbols: Vec<String>, merges: &mut Vec<(String, String)>| {
        let mut left = symbols[0].clone();
        for s in &symbols[1..] {
            let joined = format!("{left}{s}");
            if known.insert(joined.clone()) {
                merges.push((left.clone(), s.clone()));
            }
            left = joined;
        }
    };
    for w in en {
        let symbols: Vec<String> = byte_level(&format!(" {w}"))
            .chars()
            .map(String::from)
            .collect();
        chain(symbols, &mut merges);
    }
    for c in zh {
        let symbols: Vec<String> = byte_level(&c.to_string())
            .chars()
            .map(String::from)
            .collect();
        chain(symbols, &mut merges);
    }
    merges
}

/// Writes the drawn model's folder with everything but trained weights: `model_index.json`,
/// the configs (`vae/config.json` with the given latent statistics), the frozen random text
/// encoder, the tokenizer and the scheduler. Training then writes the transformer and VAE
/// safetensors beside them.
pub fn write_untrained_model(
    dir: &Path,
    latents_mean: &[f32],
    latents_std: &[f32],
    layers: usize,
) -> Result<(), EngineError> {
    mkdir(dir)?;
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "QwenImagePipeline",
            "_diffusers_version": "0.42.1",
            "_name_or_path": DRAWN_MODEL_ID,
            "_pixmarket_note": "pixmarket's built-in tiny model, trained on drawn scenes \
                (engine/src/scenes.rs); `pixmarket model train-tiny` reproduces it",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        }),
    )?;
    write_transformer_config(dir, &transformer_config_with(layers))?;
    let v = dir.join("vae");
    mkdir(&v)?;
    let vc = vae_config();
    write_json(
        &v.join("config.json"),
        &json!({
            "_class_name": "AutoencoderKLQwenImage",
            "_diffusers_version": "0.42.1",
            "base_dim": vc.base_dim, "z_dim": vc.z_dim, "dim_mult": vc.dim_mult,
            "num_res_blocks": vc.num_res_blocks, "attn_scales": vc.attn_scales,
            "temperal_downsample": vc.temperal_downsample, "dropout": 0.0,
            "input_channels": vc.input_channels,
            "latents_mean": latents_mean, "latents_std": latents_std,
        }),
    )?;
    let te = dir.join("text_encoder");
    mkdir(&te)?;
    let ec = text_encoder_config();
    write_json(
        &te.join("config.json"),
        &json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "torch_dtype": "float32",
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "hidden_size": ec.hidden_size, "intermediate_size": ec.intermediate_size,
                "num_hidden_layers": ec.num_hidden_layers,
                "num_attention_heads": ec.num_attention_heads,
                "num_key_value_heads": ec.num_key_value_heads, "vocab_size": ec.vocab_size,
                "rms_norm_eps": ec.rms_norm_eps, "rope_theta": ec.rope_theta,
                "hidden_act": "silu", "max_position_embeddings": 4096,
                "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
            },
        }),
    )?;
    let weights = initial_tensors(|vb| QwenTextEncoder::new(&ec, vb.pp(NESTED_PREFIX)).map(drop))?;
    save(&weights, &te.join("model.safetensors"))?;
    let tok = dir.join("tokenizer");
    mkdir(&tok)?;
    write_json(
        &tok.join("tokenizer.json"),
        &bpe_tokenizer_json(&word_merges()),
    )?;
    write_json(
        &tok.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "bos_token": null, "unk_token": null,
            "model_max_length": 131072, "add_prefix_space": false,
        }),
    )?;
    let s = dir.join("scheduler");
    mkdir(&s)?;
    crate::tiny::write_scheduler_config(&s.join("scheduler_config.json"))
}

/// The shipped folder, file by file (relative path, bytes), embedded at build time from
/// `engine/assets/tiny-drawn/`.
pub const SHIPPED_FILES: [(&str, &[u8]); 10] = [
    (
        "model_index.json",
        include_bytes!("../assets/tiny-drawn/model_index.json"),
    ),
    (
        "transformer/config.json",
        include_bytes!("../assets/tiny-drawn/transformer/config.json"),
    ),
    (
        "transformer/diffusion_pytorch_model.safetensors",
        include_bytes!("../assets/tiny-drawn/transformer/diffusion_pytorch_model.safetensors"),
    ),
    (
        "vae/config.json",
        include_bytes!("../assets/tiny-drawn/vae/config.json"),
    ),
    (
        "vae/diffusion_pytorch_model.safetensors",
        include_bytes!("../assets/tiny-drawn/vae/diffusion_pytorch_model.safetensors"),
    ),
    (
        "text_encoder/config.json",
        include_bytes!("../assets/tiny-drawn/text_encoder/config.json"),
    ),
    (
        "text_encoder/model.safetensors",
        include_bytes!("../assets/tiny-drawn/text_encoder/model.safetensors"),
    ),
    (
        "tokenizer/tokenizer.json",
        include_bytes!("../assets/tiny-drawn/tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer/tokenizer_config.json",
        include_bytes!("../assets/tiny-drawn/tokenizer/tokenizer_config.json"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_bytes!("../assets/tiny-drawn/scheduler/scheduler_config.json"),
    ),
];

/// Copies the files of a trained folder `src` that ship ([`SHIPPED_FILES`]) into `dst`, with
/// every weight stored in f16: half the bytes of training's f32, and the loader converts back
/// on load (the adherence figures in the README are measured on the f16 copy).
pub fn export_for_shipping(src: &Path, dst: &Path) -> Result<(), EngineError> {
    for (rel, _) in SHIPPED_FILES {
        let (from, to) = (src.join(rel), dst.join(rel));
        if let Some(parent) = to.parent() {
            mkdir(parent)?;
        }
        if rel.ends_with(".safetensors") {
            let tensors = candle_core::safetensors::load(&from, &candle_core::Device::Cpu)?;
            let half = tensors
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_dtype(candle_core::DType::F16)?)))
                .collect::<Result<std::collections::BTreeMap<_, _>, EngineError>>()?;
            save(&half, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(|e| EngineError::io(&from, e))?;
        }
    }
    Ok(())
}

/// Whether `dir` holds exactly the shipped drawn model (every file present with the shipped
/// bytes), so an older or random tiny model there is replaced.
pub fn is_installed(dir: &Path) -> bool {
    SHIPPED_FILES
        .iter()
        .all(|(rel, bytes)| std::fs::read(dir.join(rel)).is_ok_and(|b| b == *bytes))
}

/// Writes the shipped drawn model into `dir` (created if needed; existing files overwritten).
pub fn write_drawn_model(dir: &Path) -> Result<(), EngineError> {
    for (rel, bytes) in SHIPPED_FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            mkdir(parent)?;
        }
        std::fs::write(&path, bytes).map_err(|e| EngineError::io(&path, e))?;
    }
    std::fs::write(
        dir.join("README.txt"),
        "pixmarket's built-in tiny model, trained on drawn scenes.\n\
         Reproduce it with `pixmarket model train-tiny --out DIR`.\n",
    )
    .map_err(|e| EngineError::io(dir.join("README.txt"), e))
}

/// Installs the shipped drawn model into `dir` unless it is already there. The files are
/// written into a sibling temporary folder and renamed into place, so an interrupted first use
/// leaves no half-written model behind.
pub fn install_drawn_model(dir: &Path) -> Result<(), EngineError> {
    if is_installed(dir) {
        return Ok(());
    }
    crate::tiny::install_atomically(dir, write_drawn_model, is_installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grammar_word_is_one_token() {
        let json = bpe_tokenizer_json(&word_merges()).to_string();
        let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let (en, zh) = grammar_words();
        for w in en {
            let ids = tok.encode(format!(" {w}"), false).unwrap();
            assert_eq!(ids.get_ids().len(), 1, "{w:?} → {:?}", ids.get_tokens());
        }
        for c in zh {
            let ids = tok.encode(format!("在{c}"), false).unwrap();
            assert_eq!(ids.get_ids().len(), 2, "{c:?} → {:?}", ids.get_tokens());
        }
        let all = tok
            .encode(
                "a small red circle above a large blue square on a yellow background",
                false,
            )
            .unwrap();
        assert_eq!(all.get_ids().len(), 13);
        assert!(
            all.get_ids()
                .iter()
                .all(|&i| (i as usize) < text_encoder_config().vocab_size)
        );
    }
}
