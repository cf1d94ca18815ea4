//! The random tiny model: a deterministic, randomly initialised Qwen-Image in the full diffusers
//! layout, for the parity and stress tests that need random weights. **Its pictures are noise.**
//! What `--model tiny` loads is the drawn model ([`crate::drawn`], installed by
//! [`ensure_tiny_model`]); it starts from this module's initialisation and tokenizer format.
//!
//! Owns the small configs, [`write_tiny_model`], [`ensure_random_tiny_model`] and installing a
//! model folder atomically. The folder is loaded by exactly the code that
//! loads real weights ([`crate::pipeline::QwenImage::load`]):
//! - `model_index.json` (`QwenImagePipeline`, `_name_or_path` [`TINY_MODEL_ID`]);
//! - `transformer/`: 2 blocks, 2 heads × 32 (RoPE axes 8 + 12 + 12), joint width 32;
//! - `vae/`: the real block structure (`dim_mult` [1, 2, 4, 4], 2 res blocks) at base width 8;
//! - `text_encoder/`: a Qwen2.5-VL language model, 2 layers, width 32, 4 heads / 2 KV heads, keys
//!   in the `model.language_model.*` layout of the real checkpoint (no vision tower);
//! - `tokenizer/tokenizer.json`: byte-level BPE over the 256 byte symbols, no merges (one token
//!   per UTF-8 byte), the Qwen2 pre-tokenizer and the Qwen special tokens;
//! - `scheduler/scheduler_config.json`: the shipped Qwen-Image schedule.
//!
//! Weights: every tensor the model constructors ask for is drawn from [`crate::noise::gaussian`]
//! seeded by the blake3 hash of its name and [`TINY_SEED`], so the bytes do not depend on the
//! order tensors are built in. Linear and conv weights get std `1/√fan_in`, biases 0.02, norm
//! weights `1 + 0.1·N(0, 1)`, embeddings std 1. Saved in f32 (≈ 3 MB in all).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde_json::json;

use crate::config::TransformerConfig;
use crate::error::EngineError;
use crate::text_encoder::{NESTED_PREFIX, QwenTextEncoder, TextEncoderConfig};
use crate::transformer::QwenImageTransformer;
use crate::vae::{AutoencoderKLQwenImage, VaeConfig};

/// `_name_or_path` of the tiny model's `model_index.json`, its model id.
pub const TINY_MODEL_ID: &str = "pixmarket/tiny-qwen-image-random";
/// Mixed into every tensor's seed; changing it changes every tiny picture.
pub const TINY_SEED: u64 = 0x7069_786d_6b74; // "pixmkt"

/// Special tokens of Qwen2.5-VL in id order (after the byte vocabulary here).
const SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];
/// The Qwen2 pre-tokenizer regex.
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const TEXT_WIDTH: usize = 32;

/// The tiny transformer's config.
pub fn transformer_config() -> TransformerConfig {
    TransformerConfig {
        num_layers: 2,
        attention_head_dim: 32,
        num_attention_heads: 2,
        joint_attention_dim: TEXT_WIDTH,
        axes_dims_rope: [8, 12, 12],
        ..TransformerConfig::qwen_image_20b()
    }
}

/// The tiny VAE's config (real latent statistics, so latents look like the real model's).
pub fn vae_config() -> VaeConfig {
    VaeConfig {
        base_dim: 8,
        ..VaeConfig::default()
    }
}

/// The tiny text encoder's config.
pub fn text_encoder_config() -> TextEncoderConfig {
    TextEncoderConfig {
        hidden_size: TEXT_WIDTH,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 256 + SPECIAL_TOKENS.len(),
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
    }
}

/// A `VarBuilder` backend that invents every tensor asked for and remembers it (clones share
/// the record, so the caller keeps one after the builder is consumed).
#[derive(Debug, Default, Clone)]
struct Recorder {
    tensors: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl Recorder {
    fn make(name: &str, shape: &Shape) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let n = shape.elem_count();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let seed_bytes = blake3::hash(name.as_bytes());
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&seed_bytes.as_bytes()[..8]);
        let g = crate::noise::gaussian(u64::from_le_bytes(seed) ^ TINY_SEED, n);
        let is_norm = leaf == "gamma"
            || (leaf == "weight" && dims.len() == 1)
            || name.contains("norm.weight");
        let data: Vec<f32> = if is_norm {
            g.iter().map(|v| 1.0 + 0.1 * v).collect()
        } else if leaf == "bias" {
            g.iter().map(|v| 0.02 * v).collect()
        } else if name.contains("embed_tokens") {
            g
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let k = 1.0 / (fan_in as f32).sqrt();
            g.iter().map(|v| k * v).collect()
        };
        Tensor::from_vec(data, shape.clone(), &Device::Cpu)
    }

    fn take(&self) -> BTreeMap<String, Tensor> {
        self.tensors
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = Self::make(name, &s)?;
        if let Ok(mut map) = self.tensors.lock() {
            map.insert(name.to_string(), t.clone());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("tiny model: {name} was requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The deterministic initial tensors (see the module doc) of every weight a component's
/// constructor asks for, by checkpoint name: the random tiny model's weights, and the starting
/// point of training the drawn one.
pub(crate) fn initial_tensors(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> Result<BTreeMap<String, Tensor>, EngineError> {
    let (vb, rec) = recorder_vb();
    build(vb)?;
    Ok(rec.take())
}

fn recorder_vb() -> (VarBuilder<'static>, Recorder) {
    let rec = Recorder::default();
    let backend: Box<dyn SimpleBackend> = Box::new(rec.clone());
    (
        VarBuilder::from_backend(backend, DType::F32, Device::Cpu),
        rec,
    )
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(|e| EngineError::io(path, e))
}

pub(crate) fn mkdir(path: &Path) -> Result<(), EngineError> {
    std::fs::create_dir_all(path).map_err(|e| EngineError::io(path, e))
}

pub(crate) fn save(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<(), EngineError> {
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).map_err(EngineError::Compute)
}

/// GPT-2's byte → printable-character map used by byte-level BPE: printable Latin-1 bytes map to
/// themselves, the others to U+0100 onwards in byte order.
fn byte_symbols() -> Vec<char> {
    let keep =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let cp = if keep(b) {
                b
            } else {
                let c = next;
                next += 1;
                c
            };
            char::from_u32(cp).unwrap_or('?')
        })
        .collect()
}

/// The tokenizer.json of a byte-level BPE with no merges and the Qwen special tokens.
fn tokenizer_json() -> serde_json::Value {
    bpe_tokenizer_json(&[])
}

/// Symbols of byte-level BPE for `text`: one printable character per UTF-8 byte.
pub(crate) fn byte_level(text: &str) -> String {
    let symbols = byte_symbols();
    text.bytes().map(|b| symbols[usize::from(b)]).collect()
}

/// Ids of the byte-level vocabulary: 256 byte symbols, then one per merge (its result), then
/// the Qwen special tokens; the vocabulary's size is `256 + merges + 14`.
pub(crate) fn bpe_vocab_size(merges: usize) -> usize {
    256 + merges + SPECIAL_TOKENS.len()
}

/// The tokenizer.json of a byte-level BPE with `merges` (pairs of byte-level symbol strings, in
/// rank order; each result is the next id after the 256 byte symbols) and the Qwen special tokens.
pub(crate) fn bpe_tokenizer_json(merges: &[(String, String)]) -> serde_json::Value {
    let mut vocab: serde_json::Map<String, serde_json::Value> = byte_symbols()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + i));
    }
    let base = 256 + merges.len();
    let merge_list: Vec<serde_json::Value> = merges
        .iter()
        .map(|(a, b)| json!(format!("{a} {b}")))
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": base + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merge_list}
    })
}

/// Writes the tiny model into `dir` (created if needed; existing files are overwritten).
/// Deterministic: the same bytes on every run and machine.
pub fn write_tiny_model(dir: &Path) -> Result<(), EngineError> {
    write_tiny_model_with(dir, &transformer_config())
}

/// Writes `transformer/config.json` for `tc` (created if needed).
pub fn write_transformer_config(dir: &Path, tc: &TransformerConfig) -> Result<(), EngineError> {
    let t = dir.join("transformer");
    mkdir(&t)?;
    write_json(
        &t.join("config.json"),
        &json!({
            "_class_name": "QwenImageTransformer2DModel",
            "_diffusers_version": "0.42.1",
            "patch_size": tc.patch_size, "in_channels": tc.in_channels,
            "out_channels": tc.out_channels, "num_layers": tc.num_layers,
            "attention_head_dim": tc.attention_head_dim,
            "num_attention_heads": tc.num_attention_heads,
            "joint_attention_dim": tc.joint_attention_dim,
            "guidance_embeds": false, "axes_dims_rope": tc.axes_dims_rope,
        }),
    )
}

/// [`write_tiny_model`] with another transformer config (same text width and latent channels):
/// a deeper random pipeline for the step-caching bench, whose savings grow with the blocks.
pub fn write_tiny_model_with(dir: &Path, tc: &TransformerConfig) -> Result<(), EngineError> {
    mkdir(dir)?;
    let note = "pixmarket's built-in tiny model: random weights, it draws noise";
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "QwenImagePipeline",
            "_diffusers_version": "0.42.1",
            "_name_or_path": TINY_MODEL_ID,
            "_pixmarket_note": note,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        }),
    )?;

    // Transformer.
    let t = dir.join("transformer");
    write_transformer_config(dir, tc)?;
    let (vb, rec) = recorder_vb();
    QwenImageTransformer::new(tc, vb)?;
    save(&rec.take(), &t.join("diffusion_pytorch_model.safetensors"))?;

    // VAE.
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
            "latents_mean": vc.latents_mean, "latents_std": vc.latents_std,
        }),
    )?;
    let (vb, rec) = recorder_vb();
    AutoencoderKLQwenImage::new(&vc, vb)?;
    save(&rec.take(), &v.join("diffusion_pytorch_model.safetensors"))?;

    // Text encoder.
    let te = dir.join("text_encoder");
    mkdir(&te)?;
    let ec = text_encoder_config();
    let text_config = json!({
        "model_type": "qwen2_5_vl_text",
        "hidden_size": ec.hidden_size, "intermediate_size": ec.intermediate_size,
        "num_hidden_layers": ec.num_hidden_layers,
        "num_attention_heads": ec.num_attention_heads,
        "num_key_value_heads": ec.num_key_value_heads, "vocab_size": ec.vocab_size,
        "rms_norm_eps": ec.rms_norm_eps, "rope_theta": ec.rope_theta, "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    });
    write_json(
        &te.join("config.json"),
        &json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "torch_dtype": "float32",
            "text_config": text_config,
        }),
    )?;
    let (vb, rec) = recorder_vb();
    QwenTextEncoder::new(&ec, vb.pp(NESTED_PREFIX))?;
    save(&rec.take(), &te.join("model.safetensors"))?;

    // Tokenizer.
    let tok = dir.join("tokenizer");
    mkdir(&tok)?;
    write_json(&tok.join("tokenizer.json"), &tokenizer_json())?;
    write_json(
        &tok.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "bos_token": null, "unk_token": null,
            "model_max_length": 131072, "add_prefix_space": false,
        }),
    )?;

    // Scheduler: the shipped Qwen-Image config.
    let s = dir.join("scheduler");
    mkdir(&s)?;
    write_scheduler_config(&s.join("scheduler_config.json"))?;
    std::fs::write(
        dir.join("README.txt"),
        format!("{note}.\nRegenerate with `pixmarket model tiny --out DIR`.\n"),
    )
    .map_err(|e| EngineError::io(dir.join("README.txt"), e))
}

/// Writes the shipped Qwen-Image `scheduler_config.json` to `path`.
pub(crate) fn write_scheduler_config(path: &Path) -> Result<(), EngineError> {
    write_json(
        path,
        &json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.42.1",
            "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": true,
            "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
            "max_image_seq_len": 8192, "shift_terminal": 0.02,
            "time_shift_type": "exponential", "invert_sigmas": false,
            "stochastic_sampling": false, "use_karras_sigmas": false,
            "use_exponential_sigmas": false, "use_beta_sigmas": false,
        }),
    )
}

/// Whether `dir` holds a complete model folder (all components present); used to create the
/// tiny model on first use.
pub fn looks_complete(dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
        && [
            "transformer",
            "vae",
            "text_encoder",
            "tokenizer",
            "scheduler",
        ]
        .iter()
        .all(|c| dir.join(c).is_dir())
        && dir.join("scheduler/scheduler_config.json").is_file()
}

/// What `--model tiny` loads: installs the **drawn** tiny model ([`crate::drawn`], trained, it
/// draws what it is asked) into `dir` unless it is already there. A random tiny model or an
/// older drawn one in `dir` is replaced.
pub fn ensure_tiny_model(dir: &Path) -> Result<(), EngineError> {
    crate::drawn::install_drawn_model(dir)
}

/// Writes the random tiny model ([`write_tiny_model`]) into `dir` unless a complete model is
/// already there: for the parity and stress tests that need random weights.
pub fn ensure_random_tiny_model(dir: &Path) -> Result<(), EngineError> {
    if looks_complete(dir) {
        return Ok(());
    }
    install_atomically(dir, write_tiny_model, looks_complete)
}

/// Writes a model with `write` into a sibling temporary folder of `dir` and renames it into
/// place, so an interrupted first use leaves no half-written model behind; `complete` tells
/// whether a concurrent writer already finished.
pub(crate) fn install_atomically(
    dir: &Path,
    write: fn(&Path) -> Result<(), EngineError>,
    complete: fn(&Path) -> bool,
) -> Result<(), EngineError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    mkdir(parent)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tiny".into());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    }
    write(&tmp)?;
    if dir.exists() {
        // An incomplete earlier attempt, or another model to replace.
        std::fs::remove_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    }
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process finished first: keep its copy.
        Err(_) if complete(dir) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(EngineError::io(dir, e)),
    }
}
