//! Where each part of a model lives for a device of a given memory, and what that allows.
//!
//! Owns [`LoadOptions`] (LoRAs, the text encoder's place, the attention budget, VAE tiling) and
//! [`plan`]: from a folder's weight sizes and the device's memory it keeps the transformer and
//! the VAE on the device, chooses the text encoder's weights when the folder holds both a
//! full-precision and a quantized one (the quantized one only when the full-precision one would
//! be on the CPU and the quantized one fits the device), and places the text encoder
//! ([`TextEncoderPlace`]): on the device when
//! that costs the market nothing (the largest side up to the protocol's 2048 and the images per
//! job at 1024² up to its 4 are the same as with it elsewhere); else loaded on the device only
//! while prompts are encoded and freed before the transformer runs, when it fits beside the
//! resident weights alone; else on the CPU. What is left is the working memory: each forward's attention
//! chunks take what its other tensors leave of it (at most [`DEFAULT_ATTENTION_BUDGET`],
//! [`crate::transformer::attention_budget_within`]), a VAE decode that would not fit whole is
//! tiled ([`crate::vae_tiling`]), and the plan reports the largest square size with
//! CFG and, for any size, how many images with CFG fit in one batch ([`Plan::max_images`]), by
//! [`crate::memory`]'s formulas.

use std::path::Path;

use candle_core::DType;

use crate::config::TransformerConfig;
use crate::lora::LoraSpec;
use crate::memory::{
    ForwardShape, WeightFormat, forward_peak_bytes_within, text_encoder_encode_bytes,
    text_encoder_weight_bytes, transformer_weight_bytes, vae_decode_bytes, vae_tiled_decode_bytes,
    vae_weight_bytes,
};
use crate::quant::{GGUF_FILE, QuantFormat};
use crate::text_encoder::{TextEncoderConfig, TextEncoderWeights};
use crate::transformer::DEFAULT_ATTENTION_BUDGET;
use crate::vae::VaeConfig;
use crate::vae_tiling::VaeTiling;

/// Device memory held back from the plan for the CUDA context, cuBLAS workspaces and allocator
/// slack, which take 0.5–1 GB on current drivers: 1 GiB, or an eighth of a smaller device's
/// memory (no such card sells; the case is the tiny model planned for a 1 GiB "device" in
/// tests, where a whole-GiB reserve would leave nothing to plan).
pub const RESERVE_BYTES: u64 = 1 << 30;
/// The reserve's share of a device below 8 GiB: one eighth (see [`RESERVE_BYTES`]).
const RESERVE_SHARE: u64 = 8;
/// Largest batch the plan reports: the provider's own batch limit (`max_batch`, 1..=8 jobs) and
/// a job's images (the protocol's 4) are no larger.
pub const MAX_PLANNED_BATCH: usize = 8;
/// VAE tile sides the plan tries, largest first, in latents (1024, 768 and 512 pixels): each is
/// above the exact overlap of the Qwen-Image VAE (32 latents), and smaller tiles would spend
/// most of their work on the overlap.
pub const VAE_TILES: [usize; 3] = [128, 96, 64];
/// Text tokens a job is planned for: the pipeline's most.
const PLANNED_TEXT_TOKENS: usize = crate::tokenizer::MAX_SEQUENCE_LENGTH;

/// The reserve for a device of `memory` bytes ([`RESERVE_BYTES`]).
pub fn reserve_bytes(memory: u64) -> u64 {
    RESERVE_BYTES.min(memory / RESERVE_SHARE)
}

/// Where the text encoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextEncoderPlace {
    /// On the model's device, resident.
    #[default]
    Device,
    /// Loaded on the model's device (memory-mapped from its folder) for each encoding and freed
    /// before the transformer runs: its memory is needed only while no forward is live. Each
    /// encoding a cached prompt does not spare reads the weights again.
    EncodeThenFree,
    /// On the CPU, in the model dtype; the embeddings are moved to the device.
    Cpu,
}

impl TextEncoderPlace {
    /// Where, without the subject: `on the device`, `on the CPU`, ….
    fn short(self) -> &'static str {
        match self {
            Self::Device => "on the device",
            Self::EncodeThenFree => "loaded on the device to encode, then freed",
            Self::Cpu => "on the CPU",
        }
    }
}

impl std::fmt::Display for TextEncoderPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "text encoder {}", self.short())
    }
}

/// How to load a model folder.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// LoRAs merged into the transformer (see [`crate::lora`]).
    pub loras: Vec<LoraSpec>,
    /// Where the text encoder runs.
    pub text_encoder: TextEncoderPlace,
    /// Which of the text encoder's weights load (a folder may hold full-precision and
    /// quantized ones).
    pub text_encoder_weights: TextEncoderWeights,
    /// Bytes one attention chunk may take ([`DEFAULT_ATTENTION_BUDGET`] when `None`).
    pub attention_budget: Option<u64>,
    /// Working memory each forward's chunks are sized from (`None`: the budget alone).
    pub working_memory: Option<u64>,
    /// Decode tile by tile the images whose whole decode would not fit (`None`: all whole).
    pub vae_tiling: Option<TiledDecode>,
}

/// When and how the pipeline tiles a VAE decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TiledDecode {
    /// The tiles.
    pub tiling: VaeTiling,
    /// Tile a decode whose whole estimate ([`vae_decode_bytes`], in f32 on the CPU and the
    /// model dtype elsewhere) is above this many bytes: the plan's working memory.
    pub above_bytes: u64,
}

impl TiledDecode {
    /// Whether a `width`×`height` decode of a VAE of base width `base_dim` in a dtype of
    /// `dtype_bytes` is tiled.
    pub fn applies(&self, width: u32, height: u32, base_dim: usize, dtype_bytes: u64) -> bool {
        vae_decode_bytes(width, height, base_dim, dtype_bytes) > self.above_bytes
    }
}

/// Weight bytes of each part of a folder as it would be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// The transformer (quantized if the folder's is).
    pub transformer: u64,
    /// The text encoder's language model (full precision when the folder has both).
    pub text_encoder: u64,
    /// The quantized text encoder's bytes as loaded, when the folder holds one beside the
    /// full-precision weights (the plan may choose it).
    pub text_encoder_quantized: Option<u64>,
    /// The VAE.
    pub vae: u64,
}

impl Footprint {
    /// The full-size model: transformer as `format`, text encoder and VAE in bf16.
    pub fn qwen_image(format: WeightFormat) -> Self {
        Self {
            transformer: transformer_weight_bytes(&TransformerConfig::qwen_image_20b(), format),
            text_encoder: text_encoder_weight_bytes(&TextEncoderConfig::qwen2_5_vl_7b(), 2),
            text_encoder_quantized: None,
            vae: vae_weight_bytes(&VaeConfig::default(), 2),
        }
    }

    /// A folder's footprint in `dtype` (its transformer's GGUF file size if it has one, its text
    /// encoder's GGUF tensors as loaded if it has one: in [`Self::text_encoder_quantized`] when
    /// full-precision weights are beside them, else in [`Self::text_encoder`]).
    pub fn of_folder(dir: &Path, dtype: DType) -> Option<Self> {
        let m = FolderModel::read(dir)?;
        let bytes = dtype.size_in_bytes() as u64;
        let gguf = dir.join("transformer").join(GGUF_FILE);
        let transformer = match std::fs::metadata(&gguf) {
            Ok(meta) => meta.len(),
            Err(_) => transformer_weight_bytes(&m.transformer, WeightFormat::Float(bytes)),
        };
        // A llama.cpp-layout text encoder: its linears as stored, the rest in `dtype`.
        let te_dir = dir.join("text_encoder");
        let te_gguf = crate::text_encoder_gguf::find_gguf(&te_dir).ok()?;
        let quantized = match te_gguf {
            Some(path) => Some(
                crate::text_encoder_gguf::open(&path)
                    .ok()?
                    .0
                    .loaded_bytes(bytes),
            ),
            None => None,
        };
        let full = text_encoder_weight_bytes(&m.text_encoder, bytes);
        let (text_encoder, text_encoder_quantized) = match quantized {
            Some(q) if crate::text_encoder::has_full_precision(&te_dir) => (full, Some(q)),
            Some(q) => (q, None),
            None => (full, None),
        };
        Some(Self {
            transformer,
            text_encoder,
            text_encoder_quantized,
            vae: vae_weight_bytes(&m.vae, bytes),
        })
    }
}

/// The configs of a model folder the plan reads.
struct FolderModel {
    transformer: TransformerConfig,
    text_encoder: TextEncoderConfig,
    vae: VaeConfig,
}

impl FolderModel {
    fn read(dir: &Path) -> Option<Self> {
        let transformer =
            TransformerConfig::from_file(&dir.join("transformer/config.json")).ok()?;
        let text_encoder =
            crate::text_encoder::QwenTextEncoder::read_config(&dir.join("text_encoder")).ok()?;
        let vae = crate::vae::AutoencoderKLQwenImage::load_config(&dir.join("vae")).ok()?;
        Some(Self {
            transformer,
            text_encoder,
            vae,
        })
    }
}

/// What a device of some memory can run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Where the text encoder goes.
    pub text_encoder: TextEncoderPlace,
    /// Which text encoder weights: [`TextEncoderWeights::AsFolder`] when the folder has one
    /// kind; else the full-precision ones, unless they would be on the CPU and the quantized
    /// ones fit the device.
    pub text_encoder_weights: TextEncoderWeights,
    /// Where the full-precision text encoder would have gone, when the quantized one was chosen
    /// instead (said in the summary).
    pub full_precision_place: Option<TextEncoderPlace>,
    /// Weight bytes resident on the device.
    pub device_weights: u64,
    /// Device bytes left beside the resident weights: each forward's attention chunks and each
    /// decode are sized from it.
    pub working_memory: u64,
    /// The tiling of VAE decodes that would not fit whole (`None`: every size fits whole).
    pub vae_tiling: Option<VaeTiling>,
    /// The largest square side (multiple of 16) one image with CFG fits at; `None` if not
    /// even the smallest does.
    pub largest_side: Option<u32>,
    /// Images with CFG at 1024² that fit in one batch (0: not even one).
    pub batch_at_1024: usize,
    /// What [`Self::max_images`] needs.
    budget: Budget,
}

/// The model and the memory a plan divides.
#[derive(Debug, Clone, PartialEq)]
struct Budget {
    transformer: TransformerConfig,
    vae: VaeConfig,
    dtype_bytes: u64,
    /// Device bytes left for working memory once the weights are resident.
    free: u64,
}

impl Budget {
    /// Working bytes of `images` images with CFG at `width`×`height`: the larger of one
    /// forward over all their rows and one image's decode (the pipeline decodes them one by one).
    fn working(&self, images: usize, width: u32, height: u32, tiling: Option<VaeTiling>) -> u64 {
        let shape = ForwardShape::for_size(2 * images, width, height, PLANNED_TEXT_TOKENS);
        let forward = forward_peak_bytes_within(
            &self.transformer,
            shape,
            self.dtype_bytes,
            DEFAULT_ATTENTION_BUDGET,
            Some(self.free),
        );
        forward.max(self.decode(width, height, tiling))
    }

    /// A decode's working bytes: whole when that fits, else tiled by `tiling` if given.
    fn decode(&self, width: u32, height: u32, tiling: Option<VaeTiling>) -> u64 {
        let whole = vae_decode_bytes(width, height, self.vae.base_dim, self.dtype_bytes);
        match tiling {
            Some(t) if whole > self.free => vae_tiled_decode_bytes(
                width,
                height,
                &self.vae,
                t,
                self.dtype_bytes,
                Some(self.free),
            ),
            _ => whole,
        }
    }

    /// The first tiling (none, then [`VAE_TILES`]) whose decode at `side`² fits.
    fn tiling_for(&self, side: u32) -> Option<Option<VaeTiling>> {
        std::iter::once(None)
            .chain(
                VAE_TILES
                    .iter()
                    .map(|&t| Some(VaeTiling::exact(&self.vae, t))),
            )
            .filter(|t| t.is_none_or(|t| t.tile > t.overlap))
            .find(|&t| self.decode(side, side, t) <= self.free)
    }

    fn fits(&self, images: usize, w: u32, h: u32, t: Option<VaeTiling>) -> bool {
        self.working(images, w, h, t) <= self.free
    }

    /// The largest square side one image with CFG fits at, and the decode tiling it needs.
    fn largest(&self) -> Option<(u32, Option<VaeTiling>)> {
        let step = crate::pipeline::SIZE_MULTIPLE;
        (1..=crate::pipeline::MAX_SIDE / step)
            .rev()
            .map(|k| k * step)
            .find_map(|side| {
                let t = self.tiling_for(side)?;
                self.fits(1, side, side, t).then_some((side, t))
            })
    }

    /// Images with CFG at `width`×`height` in one batch with decodes tiled by `tiling`.
    fn max_images(&self, width: u32, height: u32, tiling: Option<VaeTiling>) -> usize {
        (1..=MAX_PLANNED_BATCH)
            .rev()
            .find(|&n| self.fits(n, width, height, tiling))
            .unwrap_or(0)
    }

    /// What the market can ask of this budget: the largest side up to the protocol's, and the
    /// images per job at 1024² up to the protocol's.
    fn market_reach(&self) -> (Option<u32>, usize) {
        let found = self.largest();
        let side = found.map(|f| f.0.min(pixmarket_protocol::validate::MAX_DIMENSION));
        let images = self.max_images(1024, 1024, found.and_then(|f| f.1));
        (
            side,
            images.min(pixmarket_protocol::validate::MAX_IMAGES as usize),
        )
    }
}

impl Plan {
    /// Images with CFG at `width`×`height` that fit in one batch, at most
    /// [`MAX_PLANNED_BATCH`] (0: not even one).
    pub fn max_images(&self, width: u32, height: u32) -> usize {
        self.budget.max_images(width, height, self.vae_tiling)
    }

    /// The load options that carry the plan out (no LoRAs).
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            loras: Vec::new(),
            text_encoder: self.text_encoder,
            text_encoder_weights: self.text_encoder_weights,
            attention_budget: None,
            working_memory: Some(self.working_memory),
            vae_tiling: self.vae_tiling.map(|tiling| TiledDecode {
                tiling,
                above_bytes: self.budget.free,
            }),
        }
    }
}

/// Plans the model (transformer `cfg`, text encoder `te`, VAE `vae`) with weights `footprint`
/// computing in `dtype_bytes` on a device of `memory` bytes.
pub fn plan(
    cfg: &TransformerConfig,
    te: &TextEncoderConfig,
    vae: &VaeConfig,
    footprint: Footprint,
    dtype_bytes: u64,
    memory: u64,
) -> Plan {
    let usable = memory.saturating_sub(reserve_bytes(memory));
    let resident = footprint.transformer + footprint.vae;
    let budget_with = |free: u64| Budget {
        transformer: cfg.clone(),
        vae: vae.clone(),
        dtype_bytes,
        free,
    };
    let without_te = budget_with(usable.saturating_sub(resident));
    let reach_without = without_te.market_reach();
    // Where a text encoder of `te_bytes` goes, and the budget beside it.
    let place = |te_bytes: u64| {
        let with_te = budget_with(usable.saturating_sub(resident + te_bytes));
        let encode = te_bytes + text_encoder_encode_bytes(te, PLANNED_TEXT_TOKENS);
        let reach = with_te.market_reach();
        if reach.0.is_some() && reach == reach_without {
            (TextEncoderPlace::Device, with_te)
        } else if resident + encode <= usable {
            (TextEncoderPlace::EncodeThenFree, without_te.clone())
        } else {
            (TextEncoderPlace::Cpu, without_te.clone())
        }
    };
    let full = place(footprint.text_encoder);
    let (text_encoder_weights, full_precision_place, te_bytes, (text_encoder, budget)) =
        match footprint.text_encoder_quantized {
            None => (
                TextEncoderWeights::AsFolder,
                None,
                footprint.text_encoder,
                full,
            ),
            Some(q) => match place(q) {
                quantized if full.0 == TextEncoderPlace::Cpu && quantized.0 != full.0 => {
                    (TextEncoderWeights::Quantized, Some(full.0), q, quantized)
                }
                _ => (
                    TextEncoderWeights::FullPrecision,
                    None,
                    footprint.text_encoder,
                    full,
                ),
            },
        };
    let device_weights = match text_encoder {
        TextEncoderPlace::Device => resident + te_bytes,
        TextEncoderPlace::EncodeThenFree | TextEncoderPlace::Cpu => resident,
    };
    let found = budget.largest();
    let mut plan = Plan {
        text_encoder,
        text_encoder_weights,
        full_precision_place,
        device_weights,
        working_memory: budget.free,
        vae_tiling: found.and_then(|f| f.1),
        largest_side: found.map(|f| f.0),
        batch_at_1024: 0,
        budget,
    };
    plan.batch_at_1024 = plan.max_images(1024, 1024);
    plan
}

/// [`plan`] for the model folder `dir` computing in `dtype` on a device of `memory` bytes;
/// `None` when its configs cannot be read.
pub fn plan_folder(dir: &Path, dtype: DType, memory: u64) -> Option<Plan> {
    let footprint = Footprint::of_folder(dir, dtype)?;
    let m = FolderModel::read(dir)?;
    Some(plan(
        &m.transformer,
        &m.text_encoder,
        &m.vae,
        footprint,
        dtype.size_in_bytes() as u64,
        memory,
    ))
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.text_encoder_weights == TextEncoderWeights::Quantized {
            f.write_str("quantized ")?;
        }
        write!(f, "{}", self.text_encoder)?;
        if let Some(full) = self.full_precision_place {
            write!(f, " (the full-precision one would be {})", full.short())?;
        }
        write!(
            f,
            "; {:.1} GB of weights on the device, {:.1} GB left for attention chunks and \
             decodes; ",
            self.device_weights as f64 / 1e9,
            self.working_memory as f64 / 1e9
        )?;
        match self.vae_tiling {
            Some(t) => write!(
                f,
                "VAE decode in tiles of {} px where whole would not fit; ",
                t.tile * self.budget.vae.spatial_compression()
            )?,
            None => f.write_str("VAE decode whole; ")?,
        }
        match self.largest_side {
            Some(s) => write!(
                f,
                "up to {s}×{s} with CFG, {} image(s) per batch at 1024²",
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
            &TextEncoderConfig::qwen2_5_vl_7b(),
            &VaeConfig::default(),
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
        // 24 GB (4090, 3090): Q8_0 with the text encoder on the CPU reaches 1328² with CFG
        // once its attention chunks shrink to what is left, with a tiled decode.
        let p = plan_for("q8_0", 24 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu);
        assert!(p.largest_side.is_some_and(|s| s >= 1328), "{p}");
        assert!(p.max_images(1328, 1328) >= 1);
        let p = plan_for("q5_k", 24 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu);
        assert!(p.largest_side.is_some_and(|s| s >= 1328), "{p}");
        // 16 GB (4080, 4060 Ti 16 GB): Q4_K at 1024² with CFG, text encoder on the CPU.
        let p = plan_for("q4_k", 16 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu);
        assert!(p.largest_side.is_some_and(|s| s >= 1024), "{p}");
        assert!(p.batch_at_1024 >= 1);
        // 80 GB (A100, H100): bf16 with the text encoder on the device, 2048² (the market's
        // largest) with CFG, whole decode and the default chunks.
        let p = plan_for("bf16", 80 * GB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Device);
        assert!(p.largest_side.is_some_and(|s| s >= 2048), "{p}");
        // bf16 on a 24 GB card: nothing fits.
        let p = plan_for("bf16", 24 * GIB);
        assert_eq!(p.largest_side, None);
        assert_eq!(p.max_images(256, 256), 0);
    }

    /// Q8_0 on a 36 GiB device: the text encoder fits beside the resident weights but not
    /// beside a 1024² job too, so it is loaded to encode and freed.
    #[test]
    fn encode_then_free_between_device_and_cpu() {
        let p = plan_for("q8_0", 36 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::EncodeThenFree, "{p}");
        assert_eq!(
            p.device_weights,
            Footprint::qwen_image(table_formats()[1].1).transformer
                + Footprint::qwen_image(table_formats()[1].1).vae
        );
        assert_eq!(
            plan_for("q8_0", 44 * GIB).text_encoder,
            TextEncoderPlace::Device
        );
        assert_eq!(
            plan_for("q8_0", 30 * GIB).text_encoder,
            TextEncoderPlace::Cpu
        );
    }

    /// A folder with both text encoders: the full-precision one where it fits the device, the
    /// quantized one where the full-precision one would be on the CPU and it is not, said in
    /// the summary.
    #[test]
    fn a_quantized_text_encoder_is_chosen_when_the_full_one_would_be_on_the_cpu() {
        let q4 = table_formats()[3].1;
        // Q4_K's text encoder as loaded in bf16: 4.76 GB.
        let te_q4 = crate::memory::text_encoder_quantized_bytes(
            &TextEncoderConfig::qwen2_5_vl_7b(),
            QuantFormat::Q4K,
            2,
        );
        let both = Footprint {
            text_encoder_quantized: Some(te_q4),
            ..Footprint::qwen_image(q4)
        };
        let plan_with = |f: Footprint, memory: u64| {
            let p = plan(
                &TransformerConfig::qwen_image_20b(),
                &TextEncoderConfig::qwen2_5_vl_7b(),
                &VaeConfig::default(),
                f,
                2,
                memory,
            );
            println!("{:.0} GiB: {p}", memory as f64 / GIB as f64);
            p
        };
        let p = plan_with(both, 24 * GIB);
        assert_eq!(p.text_encoder_weights, TextEncoderWeights::Quantized, "{p}");
        assert_ne!(p.text_encoder, TextEncoderPlace::Cpu, "{p}");
        assert_eq!(p.full_precision_place, Some(TextEncoderPlace::Cpu));
        assert_eq!(
            p.load_options().text_encoder_weights,
            TextEncoderWeights::Quantized
        );
        let shown = p.to_string();
        assert!(
            shown.starts_with("quantized text encoder ")
                && shown.contains("(the full-precision one would be on the CPU)"),
            "{shown}"
        );
        // Without the quantized file the same card puts the text encoder on the CPU.
        let p = plan_with(Footprint::qwen_image(q4), 24 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu);
        assert_eq!(p.text_encoder_weights, TextEncoderWeights::AsFolder);
        // 80 GB: the full-precision one fits, and is kept.
        let p = plan_with(both, 80 * GB);
        assert_eq!(
            p.text_encoder_weights,
            TextEncoderWeights::FullPrecision,
            "{p}"
        );
        assert_eq!(p.text_encoder, TextEncoderPlace::Device);
        assert_eq!(p.full_precision_place, None);
        // 12 GiB: the full one on the CPU, and the quantized one does not fit either: kept full.
        let p = plan_with(both, 12 * GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Cpu, "{p}");
        assert_eq!(p.text_encoder_weights, TextEncoderWeights::FullPrecision);
    }

    fn tiny_plan(memory: u64) -> Plan {
        let t = crate::tiny::transformer_config();
        let te = crate::tiny::text_encoder_config();
        let vae = crate::tiny::vae_config();
        let f = Footprint {
            transformer: transformer_weight_bytes(&t, WeightFormat::Float(4)),
            text_encoder: text_encoder_weight_bytes(&te, 4),
            text_encoder_quantized: None,
            vae: vae_weight_bytes(&vae, 4),
        };
        let p = plan(&t, &te, &vae, f, 4, memory);
        println!("tiny on {} MiB: {p}", memory >> 20);
        p
    }

    /// Regression: a 1 GiB plan of the tiny model found no size at all, because the whole GiB
    /// was the reserve and a whole 1 GiB attention chunk was counted on top of every forward.
    /// The reserve is now an eighth of a small device and each forward's chunks are sized
    /// from what is left.
    #[test]
    fn tiny_model_on_one_gib() {
        let p = tiny_plan(GIB);
        assert_eq!(p.text_encoder, TextEncoderPlace::Device);
        assert!(p.largest_side.is_some_and(|s| s >= 1024), "{p}");
        assert!(p.batch_at_1024 >= 1, "{p}");
    }

    /// The plan counts the VAE's mid-block attention at the chunk the VAE sizes from the working
    /// memory at run time (`vae::attention_rows`), no thinner than
    /// `vae::MIN_PLANNED_ATTENTION_ROWS`: the tiny model on 1 GiB now reaches the largest side
    /// (it stopped at 1904 while the head was counted at the default 2048-row chunk), and on
    /// every memory the largest admitted side's chunk, as the VAE will size it, has at least
    /// that many rows.
    #[test]
    fn vae_attention_is_planned_at_the_budgeted_chunk() {
        assert_eq!(tiny_plan(GIB).largest_side, Some(crate::pipeline::MAX_SIDE));
        let vae = crate::tiny::vae_config();
        let f = vae.spatial_compression() as u64;
        let head_width = (vae.base_dim * vae.dim_mult.last().copied().unwrap_or(1)) as u64;
        let mut thinnest = usize::MAX;
        for mib in [64u64, 96, 128, 192, 256, 384, 512, 768, 1024] {
            let p = tiny_plan(mib << 20);
            let Some(side) = p.largest_side else { continue };
            if p.vae_tiling.is_none()
                || !p
                    .load_options()
                    .vae_tiling
                    .is_some_and(|t| t.applies(side, side, vae.base_dim, 4))
            {
                continue;
            }
            let tokens = (u64::from(side) / f).pow(2);
            let live = tokens * head_width * 4 * crate::vae::ATTENTION_LIVE_TENSORS;
            let t = usize::try_from(tokens).unwrap();
            let rows = crate::vae::attention_rows(None, Some(p.working_memory), live, 1, t);
            assert!(
                rows >= crate::vae::MIN_PLANNED_ATTENTION_ROWS.min(t),
                "{mib} MiB: {side}² runs {rows}-row chunks"
            );
            thinnest = thinnest.min(rows);
        }
        // At least one memory put the chunk below the default 2048 rows: the floor was met,
        // not just untouched.
        assert!(
            thinnest < crate::vae::DEFAULT_ATTENTION_QUERY_ROWS,
            "{thinnest}"
        );
    }

    /// The batch bound: more images fit at smaller sizes, none above the largest side, and the
    /// count at the largest side is at least one.
    #[test]
    fn batch_is_capped_by_size() {
        for p in [
            tiny_plan(GIB),
            plan_for("q4_k", 16 * GIB),
            plan_for("q8_0", 24 * GIB),
        ] {
            let side = p.largest_side.unwrap();
            assert!(p.max_images(side, side) >= 1, "{p}");
            if side < crate::pipeline::MAX_SIDE {
                assert_eq!(p.max_images(side + 16, side + 16), 0, "{p}");
            }
            let mut last = MAX_PLANNED_BATCH;
            for s in (256..=side).step_by(256) {
                let n = p.max_images(s, s);
                assert!(n <= last && n >= 1, "{s}: {n} after {last}");
                last = n;
            }
        }
        // A 16 GiB Q4_K card runs fewer 1024² images per batch than the protocol's 4.
        assert!(plan_for("q4_k", 16 * GIB).batch_at_1024 < 4);
    }
}
