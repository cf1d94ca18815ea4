//! The text encoder in llama.cpp's GGUF layout: reading a Qwen2.5-VL (or Qwen2) language model
//! from one `.gguf` file, and writing ours in that layout.
//!
//! Owns: the name map between llama.cpp's tensor names and the transformers names
//! [`crate::text_encoder`] builds from, the config read from the file's metadata, and the writer
//! `pixmarket model quantize --text-encoder` uses.
//!
//! The layout is what llama.cpp's `convert_hf_to_gguf.py` writes for `Qwen2_5_VLForConditionalGeneration`
//! (architecture `qwen2vl`; `Qwen2ForCausalLM` gives `qwen2`, the same tensors): `token_embd`,
//! `blk.N.{attn_norm, attn_q, attn_k, attn_v (each with a bias), attn_output, ffn_norm, ffn_gate,
//! ffn_up, ffn_down}`, `output_norm`, and `output` (the LM head, never read here). Q and K are
//! **not** permuted for these architectures (only llama.cpp's `llama` architecture reorders them
//! for its interleaved RoPE; Qwen2 uses the NeoX rotate-half convention in both), so the weights are
//! the transformers weights as they are. The config comes from the metadata keys
//! `<arch>.embedding_length`, `.feed_forward_length`, `.block_count`, `.attention.head_count`,
//! `.attention.head_count_kv`, `.attention.layer_norm_rms_epsilon`, `.rope.freq_base`, and the
//! vocabulary from `token_embd`'s rows. GGUF lists dimensions innermost first; candle's reader
//! turns them back, so `[out, in]` is read as transformers stores it.
//!
//! Linears stored in a GGML block type run as `QMatMul` ([`crate::quant::Proj`]); the embedding and
//! norms are read in full precision (dequantized if a file stores them quantized).

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device};

use crate::quant::{GgufWeights, QuantError, QuantFormat, QuantReport};
use crate::text_encoder::{
    FLAT_PREFIX, NESTED_PREFIX, QwenTextEncoder, TextEncoderConfig, TextEncoderLoadError,
};
use crate::weights::ComponentWeights;

/// The architectures read: Qwen2.5-VL's (and Qwen2-VL's) and plain Qwen2's.
pub const ARCHITECTURES: [&str; 2] = ["qwen2vl", "qwen2"];
/// The architecture written.
pub const WRITTEN_ARCHITECTURE: &str = "qwen2vl";
/// The file name [`write_text_encoder`] gives inside `text_encoder/`.
pub const TEXT_ENCODER_GGUF_FILE: &str = "model.gguf";
/// Qwen2.5-VL's context length (`max_position_embeddings`), written when the config has none.
const DEFAULT_CONTEXT_LENGTH: u32 = 128_000;
/// Qwen2.5-VL-7B's M-RoPE sections, written when the config has none (padded to four).
const DEFAULT_MROPE_SECTIONS: [i32; 4] = [16, 24, 24, 0];

/// The per-layer pairs: (llama.cpp name, transformers name under `layers.N.`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Our name (relative to the language model: `layers.3.self_attn.q_proj.weight`) of a llama.cpp
/// tensor name (`blk.3.attn_q.weight`); `None` for tensors the encoder does not read (`output`).
pub fn from_llama_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("embed_tokens.weight".into()),
        "output_norm.weight" => return Some("norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let ours = LAYER_NAMES.iter().find(|(l, _)| *l == module)?.1;
    Some(format!("layers.{layer}.{ours}.{param}"))
}

/// The llama.cpp name of one of our names (the inverse of [`from_llama_name`]).
pub fn to_llama_name(name: &str) -> Option<String> {
    match name {
        "embed_tokens.weight" => return Some("token_embd.weight".into()),
        "norm.weight" => return Some("output_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let theirs = LAYER_NAMES.iter().find(|(_, o)| *o == module)?.0;
    Some(format!("blk.{layer}.{theirs}.{param}"))
}

/// The one `.gguf` file in `dir`, if there is one; two or more is an error naming them.
pub fn find_gguf(dir: &Path) -> Result<Option<PathBuf>, TextEncoderLoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TextEncoderLoadError::ConfigRead {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(TextEncoderLoadError::Gguf {
            path: dir.to_path_buf(),
            reason: format!(
                "{} .gguf files ({}); a text encoder folder holds at most one",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Opens a llama.cpp-layout file and reads its config from the metadata.
pub fn open(path: &Path) -> Result<(GgufWeights, TextEncoderConfig), TextEncoderLoadError> {
    let bad = |reason: String| TextEncoderLoadError::Gguf {
        path: path.to_path_buf(),
        reason,
    };
    let weights = GgufWeights::open_mapped(path, &from_llama_name)
        .map_err(|e| bad(format!("cannot read the file: {}", error_chain(&e))))?;
    let md = weights.metadata();
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| bad("no general.architecture".into()))?
        .clone();
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(bad(format!(
            "architecture {arch:?}; allowed: {}",
            ARCHITECTURES.join(", ")
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let get_u = |k: &str| -> Result<usize, TextEncoderLoadError> {
        let v = md
            .get(&key(k))
            .ok_or_else(|| bad(format!("metadata {} is missing", key(k))))?;
        let n = v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map_err(|_| bad(format!("metadata {} is not an unsigned integer", key(k))))?;
        usize::try_from(n).map_err(|_| bad(format!("metadata {} = {n} is too large", key(k))))
    };
    let get_f = |k: &str, default: f64| -> Result<f64, TextEncoderLoadError> {
        match md.get(&key(k)) {
            None => Ok(default),
            // GGUF stores these as f32: the shortest decimal that round-trips (1e-6, not
            // 9.99999997e-7) is the config value transformers had.
            Some(v) => v
                .to_f32()
                .map(|f| f.to_string().parse::<f64>().unwrap_or(f64::from(f)))
                .or_else(|_| v.to_f64())
                .map_err(|_| bad(format!("metadata {} is not a float", key(k)))),
        }
    };
    let hidden_size = get_u("embedding_length")?;
    let num_attention_heads = get_u("attention.head_count")?;
    let vocab_size = weights
        .shapes()
        .find(|(n, _, _)| *n == "embed_tokens.weight")
        .map(|(_, s, _)| s.first().copied().unwrap_or(0))
        .ok_or_else(|| bad("no token_embd.weight".into()))?;
    let defaults = TextEncoderConfig::qwen2_5_vl_7b();
    let cfg = TextEncoderConfig {
        hidden_size,
        intermediate_size: get_u("feed_forward_length")?,
        num_hidden_layers: get_u("block_count")?,
        num_attention_heads,
        num_key_value_heads: get_u("attention.head_count_kv").unwrap_or(num_attention_heads),
        vocab_size,
        rms_norm_eps: get_f("attention.layer_norm_rms_epsilon", defaults.rms_norm_eps)?,
        rope_theta: get_f("rope.freq_base", defaults.rope_theta)?,
    };
    Ok((weights, cfg))
}

/// Loads the text encoder from a llama.cpp-layout file, computing in `dtype` on `device`.
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<QwenTextEncoder, TextEncoderLoadError> {
    let (weights, cfg) = open(path)?;
    QwenTextEncoder::new(&cfg, weights.into_var_builder(dtype, device)).map_err(|source| {
        TextEncoderLoadError::Build {
            dir: path.to_path_buf(),
            source,
        }
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Whether our tensor `name` of `shape` is stored in `format` (the 2-D linear weights whose
/// input width is a multiple of the format's block); everything else is kept in f32.
pub fn quantizable(name: &str, shape: &[usize], format: QuantFormat) -> bool {
    match shape {
        [_, inp] => {
            name.starts_with("layers.")
                && name.ends_with(".weight")
                && !name.contains("layernorm")
                && inp % format.ggml().block_size() == 0
        }
        _ => false,
    }
}

/// Writes the language model of the transformers `text_encoder/` folder `src` (safetensors, either
/// key layout) as a llama.cpp-layout GGUF file `out`: linears in `format` where
/// [`quantizable`] (in f32 with `None` or where the width does not fit the block), the embedding,
/// norms and biases in f32; the metadata llama.cpp's loader reads for the architecture
/// (`qwen2vl`), without a tokenizer (ours is read from `tokenizer/`).
pub fn write_text_encoder(
    src: &Path,
    out: &Path,
    format: Option<QuantFormat>,
) -> Result<QuantReport, QuantError> {
    let cfg_path = src.join("config.json");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| QuantError::Io { path, source }
    };
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let cfg = TextEncoderConfig::from_json(&text).map_err(|e| QuantError::Config {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    let (context_length, sections) = context_and_sections(&text);
    let weights = ComponentWeights::open(src, "model")?;
    let nested = format!("{NESTED_PREFIX}.");
    let prefix = if weights.names().any(|n| n.starts_with(&nested)) {
        nested
    } else {
        format!("{FLAT_PREFIX}.")
    };
    let tensor_err = |what: String| move |source| QuantError::Tensor { what, source };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut quantized = 0;
    for name in weights.names() {
        let Some(ours) = name.strip_prefix(&prefix) else {
            continue; // the vision tower, lm_head
        };
        let Some(theirs) = to_llama_name(ours) else {
            continue;
        };
        let t = weights.load(name, None, DType::F32, &Device::Cpu)?;
        let ggml = match format {
            Some(f) if quantizable(ours, t.dims(), f) => {
                quantized += 1;
                f.ggml()
            }
            _ => GgmlDType::F32,
        };
        let q = QTensor::quantize(&t, ggml).map_err(tensor_err(format!("quantizing {name}")))?;
        tensors.push((theirs, q));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let kept = tensors.len() - quantized;
    let u = |n: usize| gguf_file::Value::U32(u32::try_from(n).unwrap_or(u32::MAX));
    let arch = WRITTEN_ARCHITECTURE;
    let metadata: Vec<(String, gguf_file::Value)> = vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(arch.into()),
        ),
        (
            "general.name".into(),
            gguf_file::Value::String("Qwen2.5-VL text encoder".into()),
        ),
        (format!("{arch}.block_count"), u(cfg.num_hidden_layers)),
        (
            format!("{arch}.context_length"),
            gguf_file::Value::U32(context_length),
        ),
        (format!("{arch}.embedding_length"), u(cfg.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u(cfg.intermediate_size),
        ),
        (
            format!("{arch}.attention.head_count"),
            u(cfg.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u(cfg.num_key_value_heads),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            gguf_file::Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.rope.dimension_sections"),
            gguf_file::Value::Array(sections.iter().map(|s| gguf_file::Value::I32(*s)).collect()),
        ),
    ];
    let md_refs: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let file = std::fs::File::create(out).map_err(io(out))?;
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &md_refs, &refs)
        .map_err(tensor_err(format!("writing {}", out.display())))?;
    drop(w);
    let bytes = std::fs::metadata(out).map_err(io(out))?.len();
    Ok(QuantReport {
        quantized,
        kept,
        bytes,
    })
}

/// In a model folder `dst` written by [`crate::quant::quantize_model`] from `src`, replaces the
/// text encoder's safetensors (links to `src`'s) with `text_encoder/model.gguf` in llama.cpp's
/// layout, linears in `format`. `src` is not touched.
pub fn quantize_model_text_encoder(
    src: &Path,
    dst: &Path,
    format: QuantFormat,
) -> Result<QuantReport, QuantError> {
    let out_dir = dst.join("text_encoder");
    let report = write_text_encoder(
        &src.join("text_encoder"),
        &out_dir.join(TEXT_ENCODER_GGUF_FILE),
        Some(format),
    )?;
    let entries = std::fs::read_dir(&out_dir).map_err(|source| QuantError::Io {
        path: out_dir.clone(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_weights = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("model") && n.contains(".safetensors"));
        if is_weights {
            std::fs::remove_file(&path).map_err(|source| QuantError::Io { path, source })?;
        }
    }
    Ok(report)
}

/// `max_position_embeddings` and the M-RoPE sections (padded to four) of a Qwen2.5-VL config,
/// at the top level or in `text_config`, else Qwen2.5-VL-7B's.
fn context_and_sections(config_json: &str) -> (u32, [i32; 4]) {
    let v: serde_json::Value = serde_json::from_str(config_json).unwrap_or_default();
    let levels = [v.get("text_config").cloned().unwrap_or_default(), v];
    let context = levels
        .iter()
        .find_map(|l| l.get("max_position_embeddings")?.as_u64())
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(DEFAULT_CONTEXT_LENGTH);
    let sections = levels
        .iter()
        .find_map(|l| {
            let s = l
                .get("rope_scaling")
                .and_then(|r| r.get("mrope_section"))
                .or_else(|| l.get("rope_parameters")?.get("mrope_section"))?;
            let s: Vec<i32> = s
                .as_array()?
                .iter()
                .filter_map(|x| i32::try_from(x.as_i64()?).ok())
                .collect();
            (s.len() <= 4).then(|| {
                let mut out = [0; 4];
                out[..s.len()].copy_from_slice(&s);
                out
            })
        })
        .unwrap_or(DEFAULT_MROPE_SECTIONS);
    (context, sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (ours, theirs) in [
            ("embed_tokens.weight", "token_embd.weight"),
            ("norm.weight", "output_norm.weight"),
            ("layers.0.self_attn.q_proj.bias", "blk.0.attn_q.bias"),
            (
                "layers.27.self_attn.o_proj.weight",
                "blk.27.attn_output.weight",
            ),
            ("layers.3.input_layernorm.weight", "blk.3.attn_norm.weight"),
            (
                "layers.3.post_attention_layernorm.weight",
                "blk.3.ffn_norm.weight",
            ),
            ("layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
        ] {
            assert_eq!(to_llama_name(ours).as_deref(), Some(theirs));
            assert_eq!(from_llama_name(theirs).as_deref(), Some(ours));
        }
        assert_eq!(from_llama_name("output.weight"), None);
        assert_eq!(from_llama_name("blk.x.attn_q.weight"), None);
        assert_eq!(from_llama_name("blk.0.attn_qkv.weight"), None);
    }

    #[test]
    fn sections_and_context_come_from_the_config() {
        let (c, s) = context_and_sections(
            r#"{"max_position_embeddings": 4096, "rope_scaling": {"mrope_section": [1, 1, 2]}}"#,
        );
        assert_eq!((c, s), (4096, [1, 1, 2, 0]));
        let (c, s) = context_and_sections(
            r#"{"text_config": {"rope_parameters": {"mrope_section": [16, 24, 24]}}}"#,
        );
        assert_eq!((c, s), (DEFAULT_CONTEXT_LENGTH, DEFAULT_MROPE_SECTIONS));
    }
}
