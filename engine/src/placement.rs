//! Where each part of a model lives for a device of a given memory, and what that allows.
//!
//! Owns [`LoadOptions`] (LoRAs, the text encoder's place, the attention budget) and [`plan`]: from
//! a folder's weight sizes and the device's memory, it keeps the transformer and the VAE on the
//! device, puts the text encoder there too when the rest still fits a 1024² job with CFG, else on
//! the CPU (prompts are encoded there and the embeddings moved over), and reports the largest
//! square size and the batch at 1024² (with CFG) that the memory left allows, by
//! [`crate::memory`]'s formulas. Not done: loading the text encoder only for encoding and freeing
//! it, and a tiled VAE decode — a size whose decode does not fit is simply not offered.

use std::path::Path;

use candle_core::DType;

use crate::config::TransformerConfig;
use crate::lora::LoraSpec;
use crate::memory::{
    ForwardShape, WeightFormat, forward_peak_bytes, text_encoder_weight_bytes,
    transformer_weight_bytes, vae_decode_bytes, vae_weight_bytes,
};
use crate::quant::{GGUF_FILE, QuantFormat};
use crate::text_encoder::TextEncoderConfig;
use crate::transformer::DEFAULT_ATTENTION_BUDGET;
use crate::vae::VaeConfig;

/// Device memory held back from the plan: the CUDA context, cuBLAS workspaces and allocator
/// slack take 0.5–1 GB on current drivers; 1 GiB covers them.
pub const RESERVE_BYTES: u64 = 1 << 30;
/// Largest batch the plan reports (the provider's own batch limit is far below).
pub const MAX_PLANNED_BATCH: usize = 8;
/// Text tokens a job is planned for: the pipeline's most.
const PLANNED_TEXT_TOKENS: usize = crate::tokenizer::MAX_SEQUENCE_LENGTH;

/// Where the text encoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderPlace {
    /// On the model's device.
    Device,
    /// On the CPU, in the model dtype; the embeddings are moved to the device.
    Cpu,
}

/// How to load a model folder.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// LoRAs merged into the transformer (see [`crate::lora`]).
    pub loras: Vec<LoraSpec>,
    /// The text encoder on the CPU instead of the device.
    pub text_encoder_on_cpu: bool,
    /// Bytes one attention chunk may take ([`DEFAULT_ATTENTION_BUDGET`] when `None`).
    pub attention_budget: Option<u64>,
}

/// Weight bytes of each part of a folder as it would be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// The transformer (quantized if the folder's is).
    pub transformer: u64,
    /// The text encoder's language model.
    pub text_encoder: u64,
    /// The VAE.
    pub vae: u64,
}

impl Footprint {
    /// The full-size model: transformer as `format`, text encoder and VAE in bf16.
    pub fn qwen_image(format: WeightFormat) -> Self {
        Self {
            transformer: transformer_weight_bytes(&TransformerConfig::qwen_image_20b(), format),
            text_encoder: text_encoder_weight_bytes(&TextEncoderConfig::qwen2_5_vl_7b(), 2),
            vae: vae_weight_bytes(&VaeConfig::default(), 2),
        }
    }

    /// A folder's footprint in `dtype` (its transformer's GGUF file size if it has one).
    pub fn of_folder(dir: &Path, dtype: DType) -> Option<Self> {
        let bytes = dtype.size_in_bytes() as u64;
        let tcfg = TransformerConfig::from_file(&dir.join("transformer/config.json")).ok()?;
        let gguf = dir.join("transformer").join(GGUF_FILE);
        let transformer = match std::fs::metadata(&gguf) {
            Ok(m) => m.len(),
            Err(_) => transformer_weight_bytes(&tcfg, WeightFormat::Float(bytes)),
        };
        let te_text = std::fs::read_to_string(dir.join("text_encoder/config.json")).ok()?;
        let te = TextEncoderConfig::from_json(&te_text).ok()?;
        let vae = crate::vae::AutoencoderKLQwenImage::load_config(&dir.join("vae")).ok()?;
        Some(Self {
            transformer,
            text_encoder: text_encoder_weight_bytes(&te, bytes),
            vae: vae_weight_bytes(&vae, bytes),
        })
    }
}

/// What a device of some memory can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Where the text encoder goes.
    pub text_encoder: TextEncoderPlace,
    /// Weight bytes on the device.
    pub device_weights: u64,
    /// The largest square side (multiple of 16) one job with CFG fits at; `None` if not even
    /// the smallest does.
    pub largest_side: Option<u32>,
    /// Jobs with CFG at 1024² that fit in one batch (0: not even one).
    pub batch_at_1024: usize,
}

/// Working bytes of `rows` rows at `side`² (the larger of a forward and a decode).
fn working(
    cfg: &TransformerConfig,
    vae_base: usize,
    rows: usize,
    side: u32,
    dtype_bytes: u64,
) -> u64 {
    let shape = ForwardShape::for_size(rows, side, side, PLANNED_TEXT_TOKENS);
    forward_peak_bytes(cfg, shape, dtype_bytes, DEFAULT_ATTENTION_BUDGET).max(vae_decode_bytes(
        side,
        side,
        vae_base,
        dtype_bytes,
    ))
}

/// Plans the full-size model (transformer `cfg`, VAE base width `vae_base`) with weights
/// `footprint` computing in `dtype_bytes` on a device of `memory` bytes.
pub fn plan(
    cfg: &TransformerConfig,
    vae_base: usize,
    footprint: Footprint,
    dtype_bytes: u64,
    memory: u64,
) -> Plan {
    let usable = memory.saturating_sub(RESERVE_BYTES);
    let resident = footprint.transformer + footprint.vae;
    let job_1024 = working(cfg, vae_base, 2, 1024, dtype_bytes);
    let (text_encoder, device_weights) = if resident + footprint.text_encoder + job_1024 <= usable {
        (TextEncoderPlace::Device, resident + footprint.text_encoder)
    } else {
        (TextEncoderPlace::Cpu, resident)
    };
    let free = usable.saturating_sub(device_weights);
    let step = crate::pipeline::SIZE_MULTIPLE;
    let largest_side = (1..=crate::pipeline::MAX_SIDE / step)
        .rev()
        .map(|k| k * step)
        .find(|&side| working(cfg, vae_base, 2, side, dtype_bytes) <= free);
    let batch_at_1024 = (1..=MAX_PLANNED_BATCH)
        .rev()
        .find(|&n| working(cfg, vae_base, 2 * n, 1024, dtype_bytes) <= free)
        .unwrap_or(0);
    Plan {
        text_encoder,
        device_weights,
        largest_side,
        batch_at_1024,
    }
}

/// [`plan`] for the model folder `dir` computing in `dtype` on a device of `memory` bytes;
/// `None` when its configs cannot be read.
pub fn plan_folder(dir: &Path, dtype: DType, memory: u64) -> Option<Plan> {
    let footprint = Footprint::of_folder(dir, dtype)?;
    let tcfg = TransformerConfig::from_file(&dir.join("transformer/config.json")).ok()?;
    let vae = crate::vae::AutoencoderKLQwenImage::load_config(&dir.join("vae")).ok()?;
    Some(plan(
        &tcfg,
        vae.base_dim,
        footprint,
        dtype.size_in_bytes() as u64,
        memory,
    ))
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let te = match self.text_encoder {
            TextEncoderPlace::Device => "text encoder on the device",
            TextEncoderPlace::Cpu => "text encoder on the CPU",
        };
        write!(
            f,
            "{te}; {:.1} GB of weights on the device; ",
            self.device_weights as f64 / 1e9
        )?;
        match self.largest_side {
            Some(s) => write!(
                f,
                "up to {s}×{s} with CFG, {} job(s) per batch at 1024²",
                self.batch_at_1024
            ),
            None => write!(f, "no size fits"),
        }
    }
}

/// The quantized footprints of the table in `docs/memory.md`, by format name.
pub fn table_formats() -> [(&'static str, WeightFormat); 4] {
    [
        ("bf16", WeightFormat::Float(2)),
        ("q8_0", WeightFormat::Quantized(QuantFormat::Q8_0)),
        ("q5_k", WeightFormat::Quantized(QuantFormat::Q5K)),
        ("q4_k", WeightFormat::Quantized(QuantFormat::Q4K)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;
    const GIB: u64 = 1 << 30;

    fn plan_for(format: &str, memory: u64) -> Plan {
        let (_, f) = table_formats()
            .into_iter()
            .find(|(n, _)| *n == format)
            .unwrap();
        let p = plan(
            &TransformerConfig::qwen_image_20b(),
            VaeConfig::default().base_dim,
            Footprint::qwen_image(f),
            2,
            memory,
        );
        println!("{format} on {:.1} GiB: {p}", memory as f64 / GIB as f64);
        p
    }

    /// The rows `docs/memory.md` states for the consumer cards.
    #[test]
    fn consumer_cards() {
        // 24 GB (4090, 3090): Q8_0 with the text encoder on the CPU fits 1024² with CFG but
        // not 1328²; Q5_K fits 1328².
        let p = plan_for("q8_0", 24 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu);
        assert!(
            p.largest_side.is_some_and(|s| (1024..1328).contains(&s)),
            "{p}"
        );
        let p = plan_for("q5_k", 24 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu);
        assert!(p.largest_side.is_some_and(|s| s >= 1328), "{p}");
        // 16 GB (4080, 4060 Ti 16 GB): Q4_K at 1024² with CFG, text encoder on the CPU.
        let p = plan_for("q4_k", 16 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu);
        assert!(p.largest_side.is_some_and(|s| s >= 1024), "{p}");
        assert!(p.batch_at_1024 >= 1);
        // 80 GB (A100, H100): bf16 with the text encoder on the device, 2048² (the market's
        // largest) with CFG.
        let p = plan_for("bf16", 80 * GB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Device);
        assert!(p.largest_side.is_some_and(|s| s >= 2048), "{p}");
        // bf16 on a 24 GB card: nothing fits.
        assert_eq!(plan_for("bf16", 24 * GIB).largest_side, None);
    }
}
