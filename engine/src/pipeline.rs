//! The Qwen-Image pipelines: a loaded model folder ([`QwenImage`]) and [`QwenImage::generate`]
//! for text-to-image, image-to-image and inpainting, as diffusers' `QwenImagePipeline`,
//! `QwenImageImg2ImgPipeline` and `QwenImageInpaintPipeline` run them (spec §2.5, §3).
//!
//! Data flow of one `generate` call:
//! 1. validate every request (sizes, steps, strength, latents shape, decodable images);
//! 2. group requests that share (size, steps, steps run, mode kind); each group runs together;
//! 3. prompts → embeddings, one prompt at a time (B = 1, as the reference encodes them), through
//!    a cache bounded in bytes, keyed by the blake3 hash of (model, template, prompt);
//! 4. noise `[1, 16, H/8, W/8]`: the given latents, or [`crate::noise::gaussian`] of the seed;
//!    img2img / inpaint: image latents = the VAE posterior **mean**, normalised (diffusers
//!    samples the posterior; the mean keeps one random stream and parity exact), and the start
//!    `σ·noise + (1 − σ)·image` at the first step run;
//! 5. every step: **one** transformer call over the whole group — all conditional rows, then the
//!    unconditional rows of the requests with CFG — text right-padded with a key-padding mask
//!    when lengths differ; true CFG with norm rescale per request; Euler step; inpaint re-imposes
//!    the re-noised image outside the mask; the progress callback may cancel; with step caching
//!    on ([`crate::step_cache`]) the call may run only the first block for some rows;
//! 6. decode each image with the VAE, `(x/2 + 0.5)` clamped, ×255, rounded half to even to u8.
//!
//! Strength: steps run = `⌈steps × strength⌉` (at least 1) in exact integer per-mille
//! arithmetic, the protocol's metering. diffusers computes `steps − int(steps − steps·strength)`
//! in floating point, which runs one step more for a few inputs (e.g. 25 steps at 0.56: 15, not
//! 14); see `tests/pipeline_parity.rs`.
//!
//! Dtypes: latents live in the model dtype between steps like the reference. The VAE runs on the
//! model's device: in the requested dtype on CUDA, in f32 on the CPU whatever the requested dtype
//! (candle 0.11's CPU conv2d has no bf16 path).

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;

use crate::error::EngineError;
use crate::guidance::true_cfg;
use crate::image_io;
use crate::latents::{pack, unpack};
use crate::preview::{StepPreview, preview_of};
use crate::scheduler::FlowMatchEuler;
use crate::step_cache::{StepCache, StepCacheMode, may_reuse};
use crate::text_encoder::QwenTextEncoder;
use crate::tokenizer::PromptTokenizer;
use crate::transformer::{ForwardInputs, QwenImageTransformer};
use crate::vae::{AutoencoderKLQwenImage, image_to_rgb8, rgb8_to_image};
use pixmarket_protocol::preview::preview_steps;

/// Bytes of one f32: the VAE's decode is estimated in f32 whatever the model dtype.
const F32_BYTES: u64 = 4;

/// A tensor side in pixels as `u32` (sides are at most `MAX_SIDE`; larger saturates).
fn dim_u32(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// Memory the device can give a generation now, in bytes: `MemAvailable` of `/proc/meminfo` for
/// the CPU; `None` (no check) where it cannot be known, e.g. on CUDA, whose allocator fails with
/// an error rather than aborting.
pub fn available_memory(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Pixels per packed token along each side (VAE factor 8 × patch 2); sizes must be multiples.
pub const SIZE_MULTIPLE: u32 = 16;
/// Largest width or height accepted: the protocol's local limit (256 patches per side keeps
/// RoPE positions inside the reference's ±4096 table with room for 512 text tokens). Whether a
/// size fits the device is [`QwenImage::memory_estimate`]'s question.
pub const MAX_SIDE: u32 = pixmarket_protocol::validate::LOCAL_MAX_DIMENSION;
/// Most steps accepted in one request: the protocol's local limit (diffusers has no cap; 1000
/// is the training schedule).
pub const MAX_STEPS: u32 = pixmarket_protocol::validate::LOCAL_MAX_STEPS;
/// Default bound of the prompt-embedding cache: an entry of the real model is `L × 3584` values,
/// ~0.7 MB in bf16 at 100 tokens (3.7 MB at the 512-token cap), so 64 MiB keeps about 90 typical
/// prompts, which covers a provider's repeated themes for < 0.1 % of an H100's memory.
pub const DEFAULT_PROMPT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Latent channels the pipelines draw noise for (`in_channels / 4` of the transformer).
pub const LATENT_CHANNELS: usize = 16;

/// What to do with the request's image inputs: text-to-image, image-to-image (strength) or
/// inpaint (mask, white = repaint). The protocol's type, so a job's mode reaches the engine
/// unchanged; images are encoded PNG or JPEG bytes, strength is in per-mille (1..=1000).
pub use pixmarket_protocol::Mode;

/// Denoising steps run for `steps` at `strength_permille`: `⌈steps·strength⌉`, at least 1. The
/// protocol's function, so the steps the engine runs are exactly the steps a job is billed for.
pub use pixmarket_protocol::effective_steps;

/// One image to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; used only when `true_cfg_scale > 1`.
    pub negative_prompt: String,
    /// Width in pixels, a multiple of 16.
    pub width: u32,
    /// Height in pixels, a multiple of 16.
    pub height: u32,
    /// Denoising steps of the full schedule (img2img / inpaint run fewer, see strength).
    pub steps: u32,
    /// True CFG scale; at most 1 turns CFG off (one transformer row per step).
    pub true_cfg_scale: f32,
    /// Seed of the noise (ignored when `latents` is given).
    pub seed: u64,
    /// Initial noise `[1, 16, H/8, W/8]` (any float dtype, any device), as the reference draws
    /// it before packing; see [`load_latents`].
    pub latents: Option<Tensor>,
    /// Text-to-image, image-to-image or inpaint.
    pub mode: Mode,
}

impl GenerateRequest {
    /// A text-to-image request with the given size and steps, CFG off, seed 0.
    pub fn text_to_image(prompt: impl Into<String>, width: u32, height: u32, steps: u32) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width,
            height,
            steps,
            true_cfg_scale: 1.0,
            seed: 0,
            latents: None,
            mode: Mode::TextToImage,
        }
    }

    /// Steps actually run (see [`effective_steps`]).
    pub fn effective_steps(&self) -> u32 {
        effective_steps(self.steps, self.mode.strength_permille())
    }

    fn uses_cfg(&self) -> bool {
        self.true_cfg_scale > 1.0
    }

    fn latent_hw(&self) -> (usize, usize) {
        (self.height as usize / 8, self.width as usize / 8)
    }
}

/// Progress of a `generate` call, reported after every denoising step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps finished so far, over all groups of the call.
    pub step: u32,
    /// Steps the whole call runs.
    pub total: u32,
    /// Wall time of the step just finished (one batched transformer call + guidance + Euler).
    pub step_time: Duration,
}

/// A finished image and the parameters that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major 8-bit RGB, `3·width·height` bytes.
    pub rgb: Vec<u8>,
    /// The text chunks its PNG carries, in order.
    pub params: Vec<(&'static str, String)>,
}

impl GeneratedImage {
    /// The PNG file: the pixels plus one text chunk per generation parameter (prompt, negative
    /// prompt, seed, steps, size, true CFG, mode, model).
    pub fn png(&self) -> Result<Vec<u8>, EngineError> {
        image_io::encode_png(&self.rgb, self.width, self.height, &self.params)
    }
}

/// Reads an initial-latents file: a safetensors file with one tensor `latents` of shape
/// `[1, 16, H/8, W/8]`, returned as f32 on the CPU. The shape is checked against the request in
/// [`QwenImage::generate`].
pub fn load_latents(path: &Path) -> Result<Tensor, EngineError> {
    let bad = |reason: String| EngineError::BadLatents {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(bad("no such file".into()));
    }
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(format!("{e}")))?;
    let t = tensors
        .get("latents")
        .ok_or_else(|| bad("no tensor named `latents`".into()))?;
    let dims = t.dims();
    if dims.len() != 4 || dims[0] != 1 || dims[1] != LATENT_CHANNELS {
        return Err(bad(format!(
            "`latents` has shape {dims:?}, expected [1, 16, H/8, W/8]"
        )));
    }
    t.to_dtype(DType::F32).map_err(|e| bad(format!("{e}")))
}

/// Starting latents `[1, 16, height/8, width/8]` (f32 on the CPU) from their values in
/// row-major order, as a market job carries them (`JobParams::latents`).
pub fn latents_from_f32(values: Vec<f32>, width: u32, height: u32) -> Result<Tensor, EngineError> {
    let (h, w) = (height as usize / 8, width as usize / 8);
    if values.len() != LATENT_CHANNELS * h * w {
        return Err(EngineError::InvalidRequest(format!(
            "{} latent values; a {width}×{height} image needs [1, 16, {h}, {w}] = {}",
            values.len(),
            LATENT_CHANNELS * h * w
        )));
    }
    Ok(Tensor::from_vec(
        values,
        (1, LATENT_CHANNELS, h, w),
        &Device::Cpu,
    )?)
}

/// The values of latents in row-major order, as f32 (the inverse of [`latents_from_f32`]).
pub fn latents_to_f32(latents: &Tensor) -> Result<Vec<f32>, EngineError> {
    Ok(latents
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// `model_index.json`: the pipeline class and which components exist.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    #[serde(rename = "_name_or_path")]
    name_or_path: Option<String>,
    #[serde(flatten)]
    components: HashMap<String, serde_json::Value>,
}

const COMPONENTS: [&str; 5] = [
    "transformer",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
];

/// Pipelines that share Qwen-Image's components (and so load here).
const PIPELINE_CLASSES: [&str; 3] = [
    "QwenImagePipeline",
    "QwenImageImg2ImgPipeline",
    "QwenImageInpaintPipeline",
];

/// Prompt embeddings `[1, L, D]` (template prefix already dropped) by the hash of everything
/// that determines them, bounded by their size in bytes; the least recently used go first.
#[derive(Debug)]
struct PromptCache {
    map: HashMap<[u8; 32], Tensor>,
    /// Keys from least to most recently used.
    order: VecDeque<[u8; 32]>,
    bytes: u64,
    capacity_bytes: u64,
    hits: u64,
    misses: u64,
}

impl PromptCache {
    fn new(capacity_bytes: u64) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            capacity_bytes,
            hits: 0,
            misses: 0,
        }
    }

    fn get(&mut self, key: &[u8; 32]) -> Option<Tensor> {
        let Some(t) = self.map.get(key).cloned() else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        if let Some(i) = self.order.iter().position(|k| k == key) {
            self.order.remove(i);
        }
        self.order.push_back(*key);
        Some(t)
    }

    /// Stores `value` unless it alone exceeds the capacity, evicting the least recently used
    /// entries until the total fits.
    fn insert(&mut self, key: [u8; 32], value: Tensor) {
        let size = tensor_bytes(&value);
        if size > self.capacity_bytes || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + size > self.capacity_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(t) = self.map.remove(&old) {
                self.bytes -= tensor_bytes(&t);
            }
        }
        self.bytes += size;
        self.map.insert(key, value);
        self.order.push_back(key);
    }

    fn set_capacity(&mut self, capacity_bytes: u64) {
        self.capacity_bytes = capacity_bytes;
        while self.bytes > self.capacity_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(t) = self.map.remove(&old) {
                self.bytes -= tensor_bytes(&t);
            }
        }
    }

    fn stats(&self) -> PromptCacheStats {
        PromptCacheStats {
            hits: self.hits,
            misses: self.misses,
            entries: self.map.len(),
            bytes: self.bytes,
            capacity_bytes: self.capacity_bytes,
        }
    }
}

/// Bytes a tensor's elements take.
fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() as u64).saturating_mul(t.dtype().size_in_bytes() as u64)
}

/// The prompt-embedding cache's counters and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromptCacheStats {
    /// Prompts answered from the cache.
    pub hits: u64,
    /// Prompts the text encoder ran for.
    pub misses: u64,
    /// Embeddings held.
    pub entries: usize,
    /// Bytes they take.
    pub bytes: u64,
    /// The bound on `bytes`.
    pub capacity_bytes: u64,
}

/// What one generate call computed, beyond its images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunStats {
    /// Transformer row-forwards (one per image and CFG branch and step) whose every block ran.
    pub full_forwards: u64,
    /// Row-forwards that ran only the first block and reused the rest (step caching).
    pub reused_forwards: u64,
}

/// A loaded Qwen-Image model folder (the diffusers layout), ready to generate.
#[derive(Debug)]
pub struct QwenImage {
    dir: PathBuf,
    model_id: String,
    tokenizer: PromptTokenizer,
    text_encoder: TextEncoderSlot,
    /// The text encoder's config (its weights may not be loaded: [`TextEncoderSlot`]).
    text_encoder_config: crate::text_encoder::TextEncoderConfig,
    /// `None` only while [`Self::set_loras`] reloads it (the old weights are dropped first, so
    /// the device never holds two copies) and after a reload failed.
    transformer: Option<QwenImageTransformer>,
    /// The transformer's config, dtype, attention budget and working memory, kept while it is
    /// reloaded.
    transformer_config: crate::config::TransformerConfig,
    transformer_dtype: DType,
    attention_budget: u64,
    working_memory: Option<u64>,
    vae: AutoencoderKLQwenImage,
    /// Decode tile by tile the images whose whole decode would not fit ([`crate::vae_tiling`]).
    vae_tiling: Option<crate::placement::TiledDecode>,
    scheduler: FlowMatchEuler,
    dtype: DType,
    device: Device,
    prompt_cache: Mutex<PromptCache>,
    /// blake3 of the model's identity and the prompt template: the start of every cache key.
    prompt_key_prefix: Vec<u8>,
}

/// The text encoder as placed ([`crate::placement::TextEncoderPlace`]).
#[derive(Debug)]
enum TextEncoderSlot {
    /// Loaded, on the model's device or the CPU.
    Resident(QwenTextEncoder),
    /// Loaded from `dir` (the weights `which` names) on `device` for each encoding and dropped
    /// after it.
    OnDemand {
        dir: PathBuf,
        dtype: DType,
        device: Device,
        which: crate::text_encoder::TextEncoderWeights,
    },
}

impl TextEncoderSlot {
    /// Runs `f` with the encoder, loading it first (and freeing it after) when on demand.
    fn with<T>(
        &self,
        f: impl FnOnce(&QwenTextEncoder) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        match self {
            Self::Resident(te) => f(te),
            Self::OnDemand {
                dir,
                dtype,
                device,
                which,
            } => {
                let te = QwenTextEncoder::load_weights(dir, *dtype, device, *which)
                    .map_err(|e| EngineError::component("text_encoder", dir.clone(), e))?;
                f(&te)
            }
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` into a device; `cuda` without the `cuda` feature is an error.
pub fn device_from_name(name: &str) -> Result<Device, EngineError> {
    let err = |reason: String| EngineError::Device {
        name: name.to_string(),
        reason,
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| err("the GPU index must be a number".into()))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(err(
                    "this build has no CUDA support (rebuild with `--features cuda`)".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| err(format!("{e}")))
        }
        _ => Err(err("expected cpu, cuda or cuda:N".into())),
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn dtype_from_name(name: &str) -> Option<DType> {
    match name {
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        _ => None,
    }
}

impl QwenImage {
    /// Loads every component of a diffusers Qwen-Image folder (`model_index.json`, `transformer/`,
    /// `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), weights memory-mapped and converted
    /// to `dtype` on `device`. The VAE runs on `device` too, in `dtype` except on the CPU, where
    /// it runs in f32.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        Self::load_with_loras(dir, dtype, device, &[])
    }

    /// The transformer, unless a reload failed ([`Self::set_loras`]).
    fn transformer(&self) -> Result<&QwenImageTransformer, EngineError> {
        self.transformer
            .as_ref()
            .ok_or(EngineError::TransformerMissing)
    }

    /// Reloads the transformer from the folder with `loras` merged (none: its own weights),
    /// keeping the attention budget. The old weights are freed before the new are read, so a
    /// device needs room for one copy; a failed reload leaves no transformer and every later
    /// generation fails with [`EngineError::TransformerMissing`] until one succeeds. The same
    /// files merge to the same bits every time.
    pub fn set_loras(&mut self, loras: &[crate::lora::LoraSpec]) -> Result<(), EngineError> {
        self.transformer = None;
        let dir = self.dir.join("transformer");
        let mut t = QwenImageTransformer::load_with_loras(&dir, self.dtype, &self.device, loras)
            .map_err(|e| EngineError::component("transformer", dir.clone(), e))?;
        t.set_attention_budget(self.attention_budget);
        t.set_working_memory(self.working_memory);
        self.transformer = Some(t);
        Ok(())
    }

    /// Checks that `lora` can be applied to this transformer, full-precision or quantized
    /// (reads the file, matches every adapter to a layer) without loading any weights.
    pub fn check_lora(&self, lora: &crate::lora::LoraSpec) -> Result<(), EngineError> {
        let dir = self.dir.join("transformer");
        crate::lora::LoraSet::load(std::slice::from_ref(lora), &self.transformer_config)
            .map_err(|e| EngineError::component("transformer", dir, e))?;
        Ok(())
    }

    /// The sampler config of the folder's `scheduler/` (what [`Self::load`] starts with).
    pub fn folder_scheduler_config(
        &self,
    ) -> Result<crate::scheduler::FlowMatchEulerConfig, EngineError> {
        let dir = self.dir.join("scheduler");
        crate::scheduler::FlowMatchEulerConfig::from_file(&dir.join("scheduler_config.json"))
            .map_err(|e| EngineError::component("scheduler", dir, e))
    }

    /// Replaces the sampler's config (e.g. [`crate::scheduler::FlowMatchEulerConfig::lightning`]
    /// for the Lightning LoRAs) for every later generation.
    pub fn set_scheduler(
        &mut self,
        cfg: crate::scheduler::FlowMatchEulerConfig,
    ) -> Result<(), crate::scheduler::SchedulerError> {
        self.scheduler = FlowMatchEuler::new(cfg)?;
        Ok(())
    }

    /// As [`Self::load`], with the LoRAs of `loras` merged into the transformer's weights (run
    /// beside the quantized matmuls of a quantized transformer, [`crate::lora_quant`]).
    pub fn load_with_loras(
        dir: &Path,
        dtype: DType,
        device: &Device,
        loras: &[crate::lora::LoraSpec],
    ) -> Result<Self, EngineError> {
        let opts = crate::placement::LoadOptions {
            loras: loras.to_vec(),
            ..Default::default()
        };
        Self::load_with(dir, dtype, device, &opts)
    }

    /// As [`Self::load`], with LoRAs, the text encoder's place and the attention budget of
    /// `opts` ([`crate::placement`]).
    pub fn load_with(
        dir: &Path,
        dtype: DType,
        device: &Device,
        opts: &crate::placement::LoadOptions,
    ) -> Result<Self, EngineError> {
        use crate::placement::TextEncoderPlace;
        let loras = opts.loras.as_slice();
        let te_device = match opts.text_encoder {
            TextEncoderPlace::Cpu => Device::Cpu,
            TextEncoderPlace::Device | TextEncoderPlace::EncodeThenFree => device.clone(),
        };
        if !dir.is_dir() {
            return Err(EngineError::ModelNotFound(dir.to_path_buf()));
        }
        let not_model = |reason: String| EngineError::NotAModel {
            dir: dir.to_path_buf(),
            reason,
        };
        let index_path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| not_model(format!("cannot read model_index.json: {e}")))?;
        let index: ModelIndex = serde_json::from_str(&text)
            .map_err(|e| not_model(format!("bad model_index.json: {e}")))?;
        match index.class_name.as_deref() {
            Some(c) if PIPELINE_CLASSES.contains(&c) => {}
            other => {
                return Err(not_model(format!(
                    "model_index.json names pipeline {other:?}, expected QwenImagePipeline"
                )));
            }
        }
        for c in COMPONENTS {
            if !index.components.contains_key(c) || !dir.join(c).is_dir() {
                return Err(not_model(format!("component {c}/ is missing")));
            }
        }
        let tokenizer = PromptTokenizer::from_dir(&dir.join("tokenizer"))
            .map_err(|e| EngineError::component("tokenizer", dir.join("tokenizer"), e))?;
        let te_dir = dir.join("text_encoder");
        let (text_encoder, text_encoder_config) = match opts.text_encoder {
            TextEncoderPlace::EncodeThenFree => {
                let cfg = QwenTextEncoder::read_config(&te_dir)
                    .map_err(|e| EngineError::component("text_encoder", te_dir.clone(), e))?;
                let slot = TextEncoderSlot::OnDemand {
                    dir: te_dir,
                    dtype,
                    device: te_device,
                    which: opts.text_encoder_weights,
                };
                (slot, cfg)
            }
            TextEncoderPlace::Device | TextEncoderPlace::Cpu => {
                let te = QwenTextEncoder::load_weights(
                    &te_dir,
                    dtype,
                    &te_device,
                    opts.text_encoder_weights,
                )
                .map_err(|e| EngineError::component("text_encoder", te_dir.clone(), e))?;
                let cfg = te.config().clone();
                (TextEncoderSlot::Resident(te), cfg)
            }
        };
        let mut transformer =
            QwenImageTransformer::load_with_loras(&dir.join("transformer"), dtype, device, loras)
                .map_err(|e| EngineError::component("transformer", dir.join("transformer"), e))?;
        if let Some(budget) = opts.attention_budget {
            transformer.set_attention_budget(budget);
        }
        transformer.set_working_memory(opts.working_memory);
        let vae_dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let mut vae = AutoencoderKLQwenImage::load(&dir.join("vae"), vae_dtype, device)
            .map_err(|e| EngineError::component("vae", dir.join("vae"), e))?;
        // The mid-block attention's chunks shrink to the plan's working memory.
        vae.set_working_memory(opts.working_memory);
        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = FlowMatchEuler::from_file(&sched_path)
            .map_err(|e| EngineError::component("scheduler", dir.join("scheduler"), e))?;

        let tcfg = transformer.config();
        if text_encoder_config.hidden_size != tcfg.joint_attention_dim {
            return Err(EngineError::Mismatch(format!(
                "text encoder width {} != transformer joint_attention_dim {}",
                text_encoder_config.hidden_size, tcfg.joint_attention_dim
            )));
        }
        if tcfg.out_channels() != LATENT_CHANNELS
            || vae.config().z_dim != LATENT_CHANNELS
            || tcfg.patch_size != 2
            || vae.config().spatial_compression() != 8
        {
            return Err(EngineError::Mismatch(format!(
                "expected 16 latent channels, patch 2 and VAE factor 8; got transformer out \
                 {} / patch {}, VAE z_dim {} / factor {}",
                tcfg.out_channels(),
                tcfg.patch_size,
                vae.config().z_dim,
                vae.config().spatial_compression()
            )));
        }
        let model_id = crate::prompt_meter::model_id(index.name_or_path, dir);
        let prompt_key_prefix = prompt_key_prefix(&model_id, dir, dtype, &tokenizer);
        Ok(Self {
            dir: dir.to_path_buf(),
            model_id,
            tokenizer,
            text_encoder,
            text_encoder_config,
            transformer_config: transformer.config().clone(),
            transformer_dtype: transformer.dtype(),
            attention_budget: transformer.attention_budget(),
            working_memory: transformer.working_memory(),
            transformer: Some(transformer),
            vae,
            vae_tiling: opts.vae_tiling,
            scheduler,
            dtype,
            device: device.clone(),
            prompt_cache: Mutex::new(PromptCache::new(DEFAULT_PROMPT_CACHE_BYTES)),
            prompt_key_prefix,
        })
    }

    /// The model's name: `_name_or_path` of `model_index.json`, else the folder's name.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The transformer's config (as read from `transformer/config.json`).
    pub fn transformer_config(&self) -> &crate::config::TransformerConfig {
        &self.transformer_config
    }

    /// One line for logs and adverts: name, sizes, dtype and device.
    pub fn description(&self) -> String {
        let t = &self.transformer_config;
        format!(
            "{} ({} blocks × width {}, text encoder {} layers × {}, {:?} on {:?}) from {}",
            self.model_id,
            t.num_layers,
            t.inner_dim(),
            self.text_encoder_config.num_hidden_layers,
            self.text_encoder_config.hidden_size,
            self.dtype,
            self.device,
            self.dir.display()
        )
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokens of the user's prompt alone (no template), capped at the 512 the model sees: the
    /// `prompt_tokens` of the metering formula. A prompt the tokenizer cannot encode (never seen
    /// for valid UTF-8) counts its bytes, capped the same way.
    pub fn count_prompt_tokens(&self, prompt: &str) -> u32 {
        crate::prompt_meter::metered_tokens(&self.tokenizer, prompt)
    }

    /// Prompt embeddings held in the cache.
    pub fn cached_prompts(&self) -> usize {
        self.prompt_cache.lock().map(|c| c.map.len()).unwrap_or(0)
    }

    /// The prompt-embedding cache's hits, misses and size.
    pub fn prompt_cache_stats(&self) -> PromptCacheStats {
        self.prompt_cache
            .lock()
            .map(|c| c.stats())
            .unwrap_or_default()
    }

    /// Bounds the prompt-embedding cache to `bytes` (0 turns it off), evicting the least
    /// recently used entries now if it holds more.
    pub fn set_prompt_cache_bytes(&self, bytes: u64) {
        if let Ok(mut c) = self.prompt_cache.lock() {
            c.set_capacity(bytes);
        }
    }

    /// The VAE (training the drawn tiny model encodes its scenes with it).
    pub(crate) fn vae(&self) -> &AutoencoderKLQwenImage {
        &self.vae
    }

    /// Embeddings `[1, L, D]` of one prompt, from the cache or the text encoder (B = 1). The key
    /// is blake3 of (model, template, prompt); a negative prompt is a prompt like any other, as
    /// the encoder sees no difference.
    pub(crate) fn prompt_embeds(&self, prompt: &str) -> Result<Tensor, EngineError> {
        let mut h = blake3::Hasher::new();
        h.update(&self.prompt_key_prefix);
        h.update(prompt.as_bytes());
        let key = *h.finalize().as_bytes();
        if let Some(t) = self.prompt_cache.lock().ok().and_then(|mut c| c.get(&key)) {
            return Ok(t);
        }
        let tokens = self
            .tokenizer
            .encode_prompt(prompt)
            .map_err(|e| EngineError::InvalidRequest(format!("cannot tokenize the prompt: {e}")))?;
        // The text encoder may run on the CPU, or be loaded for this encoding only
        // (`LoadOptions::text_encoder`).
        let embeds = self
            .text_encoder
            .with(|te| Ok(te.encode_prompts(&[tokens])?.embeds))?
            .to_device(&self.device)?;
        if let Ok(mut c) = self.prompt_cache.lock() {
            c.insert(key, embeds.clone());
        }
        Ok(embeds)
    }

    fn validate(&self, i: usize, r: &GenerateRequest) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidRequest(format!("request {i}: {m}")));
        for (what, v) in [("width", r.width), ("height", r.height)] {
            if v == 0 || v % SIZE_MULTIPLE != 0 || v > MAX_SIDE {
                return bad(format!(
                    "{what} {v} must be a positive multiple of {SIZE_MULTIPLE}, at most {MAX_SIDE}"
                ));
            }
        }
        if r.steps == 0 || r.steps > MAX_STEPS {
            return bad(format!("steps {} must be in 1..={MAX_STEPS}", r.steps));
        }
        if !r.true_cfg_scale.is_finite() || r.true_cfg_scale < 0.0 {
            return bad(format!(
                "true CFG scale {} must be finite and ≥ 0",
                r.true_cfg_scale
            ));
        }
        if let Some(s) = r.mode.strength_permille()
            && !(1..=1000).contains(&s)
        {
            return bad(format!("strength {} ‰ must be in 1..=1000", s));
        }
        if let Some(l) = &r.latents {
            let (h, w) = r.latent_hw();
            if l.dims() != [1, LATENT_CHANNELS, h, w] {
                return bad(format!(
                    "latents have shape {:?}, a {}×{} image needs [1, 16, {h}, {w}]",
                    l.dims(),
                    r.width,
                    r.height
                ));
            }
        }
        match &r.mode {
            Mode::TextToImage => {}
            Mode::ImageToImage { init_image, .. } => {
                image_io::image_size(init_image, "init image")?;
            }
            Mode::Inpaint {
                init_image, mask, ..
            } => {
                image_io::image_size(init_image, "init image")?;
                image_io::image_size(mask, "mask")?;
            }
        }
        Ok(())
    }

    /// Working memory, in bytes, that generating `requests` in one call peaks at beyond the
    /// weights: an upper estimate of the larger of one transformer forward over all their rows
    /// at the longest sequence ([`crate::memory::forward_peak_bytes`]: attention chunked to the
    /// transformer's budget plus the `[B, S, dim]` tensors beside it) and the VAE's decode at
    /// full resolution. Weights are mmapped and counted by the loader, not here.
    pub fn memory_estimate(&self, requests: &[GenerateRequest]) -> u64 {
        let tcfg = &self.transformer_config;
        let text = self.tokenizer.max_sequence_length();
        let mut rows = 0usize;
        let mut image_tokens = 0usize;
        let mut decode: u64 = 0;
        for r in requests {
            rows += if r.uses_cfg() { 2 } else { 1 };
            let shape = crate::memory::ForwardShape::for_size(1, r.width, r.height, text);
            image_tokens = image_tokens.max(shape.image_tokens);
            let vae = self.vae.config();
            let v = match self.vae_tiling {
                Some(t) if t.applies(r.width, r.height, vae.base_dim, F32_BYTES) => {
                    crate::memory::vae_tiled_decode_bytes(
                        r.width,
                        r.height,
                        vae,
                        t.tiling,
                        F32_BYTES,
                        self.working_memory,
                    )
                }
                _ => crate::memory::vae_decode_bytes(r.width, r.height, vae.base_dim, F32_BYTES),
            };
            decode = decode.max(v);
        }
        let shape = crate::memory::ForwardShape {
            rows,
            image_tokens,
            text_tokens: text,
        };
        let attention = crate::memory::forward_peak_bytes_within(
            tcfg,
            shape,
            self.transformer_dtype.size_in_bytes() as u64,
            self.attention_budget,
            self.working_memory,
        );
        attention.max(decode)
    }

    /// Refuses requests whose [`Self::memory_estimate`] exceeds what the device has free.
    fn check_memory(&self, requests: &[GenerateRequest]) -> Result<(), EngineError> {
        let Some(available) = available_memory(&self.device) else {
            return Ok(());
        };
        let needed = self.memory_estimate(requests);
        if needed > available {
            let largest = requests
                .iter()
                .max_by_key(|r| u64::from(r.width) * u64::from(r.height));
            return Err(EngineError::TooLarge {
                width: largest.map_or(0, |r| r.width),
                height: largest.map_or(0, |r| r.height),
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Generates one image per request, in request order. Requests with the same size, steps,
    /// steps run and mode kind share every transformer call. `progress` is called after every
    /// step; returning `Break` stops before the next one with [`EngineError::Cancelled`].
    pub fn generate(
        &self,
        requests: &[GenerateRequest],
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        Ok(self
            .generate_with(requests, StepCacheMode::Off, progress)?
            .0)
    }

    /// [`Self::generate`] with a step-caching mode, and what the transformer computed.
    pub fn generate_with(
        &self,
        requests: &[GenerateRequest],
        step_cache: StepCacheMode,
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Vec<GeneratedImage>, RunStats), EngineError> {
        self.generate_previewing(requests, step_cache, &[], &mut |p, _| progress(p))
    }

    /// [`Self::generate_with`] that also makes previews ([`crate::preview`]): request `i` gets
    /// one after each step [`preview_steps`]`(its steps run, previews[i])` names (a request
    /// past the end of `previews` gets none). `progress` receives, with each step, the
    /// previews made at it.
    pub fn generate_previewing(
        &self,
        requests: &[GenerateRequest],
        step_cache: StepCacheMode,
        previews: &[u8],
        progress: &mut dyn FnMut(Progress, Vec<StepPreview>) -> ControlFlow<()>,
    ) -> Result<(Vec<GeneratedImage>, RunStats), EngineError> {
        let (latents, stats) = self.latents_previewing(requests, step_cache, previews, progress)?;
        let images = requests
            .iter()
            .zip(latents)
            .map(|(r, l)| {
                let rgb = self.decode_to_rgb8(&l)?;
                Ok(GeneratedImage {
                    width: r.width,
                    height: r.height,
                    rgb,
                    params: self.png_params(r),
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok((images, stats))
    }

    fn png_params(&self, r: &GenerateRequest) -> Vec<(&'static str, String)> {
        let mut p = vec![
            ("prompt", r.prompt.clone()),
            ("negative_prompt", r.negative_prompt.clone()),
            (
                "seed",
                if r.latents.is_some() {
                    "given latents".to_string()
                } else {
                    r.seed.to_string()
                },
            ),
            ("steps", r.steps.to_string()),
            ("size", format!("{}x{}", r.width, r.height)),
            ("true_cfg_scale", r.true_cfg_scale.to_string()),
            ("mode", r.mode.name().to_string()),
        ];
        if let Some(s) = r.mode.strength_permille() {
            p.push(("strength", format!("{}", f64::from(s) / 1000.0)));
        }
        p.push(("model", self.model_id.clone()));
        p.push(("software", "pixmarket".to_string()));
        p
    }

    /// Runs the denoising loops and returns the final latents of each request, unpacked,
    /// `[1, 16, H/8, W/8]` in the model dtype. [`Self::generate`] decodes them.
    pub fn generate_latents(
        &self,
        requests: &[GenerateRequest],
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Vec<Tensor>, EngineError> {
        Ok(self
            .generate_latents_with(requests, StepCacheMode::Off, progress)?
            .0)
    }

    /// [`Self::generate_latents`] with a step-caching mode, and what the transformer computed.
    pub fn generate_latents_with(
        &self,
        requests: &[GenerateRequest],
        step_cache: StepCacheMode,
        progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Vec<Tensor>, RunStats), EngineError> {
        self.latents_previewing(requests, step_cache, &[], &mut |p, _| progress(p))
    }

    fn latents_previewing(
        &self,
        requests: &[GenerateRequest],
        step_cache: StepCacheMode,
        previews: &[u8],
        progress: &mut dyn FnMut(Progress, Vec<StepPreview>) -> ControlFlow<()>,
    ) -> Result<(Vec<Tensor>, RunStats), EngineError> {
        for (i, r) in requests.iter().enumerate() {
            self.validate(i, r)?;
        }
        self.check_memory(requests)?;
        // Groups in first-appearance order; BTreeMap-free so the order is the caller's.
        let mut groups: Vec<(GroupKey, Vec<usize>)> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let key = GroupKey {
                width: r.width,
                height: r.height,
                steps: r.steps,
                run: r.effective_steps(),
                inpaint: matches!(r.mode, Mode::Inpaint { .. }),
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let total: u32 = groups.iter().map(|(k, _)| k.run).sum();
        let mut done = 0u32;
        let mut out: Vec<Option<Tensor>> = vec![None; requests.len()];
        let mut stats = RunStats::default();
        for (key, members) in &groups {
            let reqs: Vec<&GenerateRequest> = members.iter().map(|&i| &requests[i]).collect();
            let plans: Vec<(usize, Vec<u32>)> = members
                .iter()
                .map(|&i| {
                    (
                        i,
                        preview_steps(key.run, previews.get(i).copied().unwrap_or(0)),
                    )
                })
                .collect();
            let on_step = &mut |step_time: Duration, made: Vec<StepPreview>| {
                done += 1;
                progress(
                    Progress {
                        step: done,
                        total,
                        step_time,
                    },
                    made,
                )
            };
            let finals = self.run_group(key, &reqs, &plans, step_cache, &mut stats, on_step)?;
            for (&i, l) in members.iter().zip(finals) {
                out[i] = Some(l);
            }
        }
        let latents = out
            .into_iter()
            .map(|l| l.ok_or_else(|| EngineError::InvalidRequest("a request was not run".into())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((latents, stats))
    }

    /// Noise `[1, 16, h, w]` in the model dtype on the device.
    fn noise(&self, r: &GenerateRequest) -> Result<Tensor, EngineError> {
        let (h, w) = r.latent_hw();
        let t = match &r.latents {
            Some(l) => l.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            None => Tensor::from_vec(
                crate::noise::gaussian(r.seed, LATENT_CHANNELS * h * w),
                (1, LATENT_CHANNELS, h, w),
                &Device::Cpu,
            )?,
        };
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// Normalised image latents `[1, 16, h, w]` (posterior mean) in the model dtype.
    fn image_latents(&self, r: &GenerateRequest, bytes: &[u8]) -> Result<Tensor, EngineError> {
        let (w, h) = (r.width as usize, r.height as usize);
        let rgb = image_io::init_image_rgb8(bytes, w, h)?;
        let img = rgb8_to_image(&rgb, w, h, &self.device)?.to_dtype(self.vae.dtype())?;
        let posterior = self.vae.encode(&img)?;
        let z = self.vae.normalize_latents(&posterior.mean)?;
        Ok(z.to_dtype(self.dtype)?)
    }

    /// Runs one group's denoising loop; returns the unpacked final latents per request.
    fn run_group(
        &self,
        key: &GroupKey,
        reqs: &[&GenerateRequest],
        plans: &[(usize, Vec<u32>)],
        step_cache: StepCacheMode,
        stats: &mut RunStats,
        on_step: &mut dyn FnMut(Duration, Vec<StepPreview>) -> ControlFlow<()>,
    ) -> Result<Vec<Tensor>, EngineError> {
        let n = reqs.len();
        let (lat_h, lat_w) = reqs[0].latent_hw();
        let grid = (lat_h / 2, lat_w / 2);
        let seq = grid.0 * grid.1;
        let mut sched = self.scheduler.clone();
        sched.set_timesteps(key.steps as usize, seq)?;
        let start = (key.steps - key.run) as usize;
        let sigmas = sched.sigmas().to_vec();

        // Text rows: every request's prompt, then the negative prompts of the CFG requests.
        let cfg_rows: Vec<usize> = (0..n).filter(|&j| reqs[j].uses_cfg()).collect();
        let mut texts = Vec::with_capacity(n + cfg_rows.len());
        for r in reqs {
            texts.push(self.prompt_embeds(&r.prompt)?);
        }
        for &j in &cfg_rows {
            texts.push(self.prompt_embeds(&reqs[j].negative_prompt)?);
        }
        let (txt, txt_mask) = pad_text(&texts, &self.device)?;

        // Starting latents, the noise and the image latents (packed) per request.
        let mut noises = Vec::with_capacity(n);
        let mut images = Vec::with_capacity(n);
        let mut masks = Vec::with_capacity(n);
        let mut xs = Vec::with_capacity(n);
        for r in reqs {
            let noise = pack(&self.noise(r)?)?;
            let (image, mask) = match &r.mode {
                Mode::TextToImage => (None, None),
                Mode::ImageToImage { init_image, .. } => {
                    (Some(pack(&self.image_latents(r, init_image)?)?), None)
                }
                Mode::Inpaint {
                    init_image, mask, ..
                } => {
                    let m = image_io::mask_latent_data(
                        mask,
                        r.width as usize,
                        r.height as usize,
                        lat_w,
                        lat_h,
                    )?;
                    let m = Tensor::from_vec(m, (1, 1, lat_h, lat_w), &Device::Cpu)?
                        .repeat((1, LATENT_CHANNELS, 1, 1))?
                        .to_dtype(self.dtype)?
                        .to_device(&self.device)?;
                    (
                        Some(pack(&self.image_latents(r, init_image)?)?),
                        Some(pack(&m)?),
                    )
                }
            };
            let x = match &image {
                None => noise.clone(),
                Some(z) => scale_noise(z, &noise, sigmas[start])?,
            };
            xs.push(x);
            noises.push(noise);
            images.push(image);
            masks.push(mask);
        }
        let mut x = Tensor::cat(&xs, 0)?; // [n, S, 64]

        let rows = n + cfg_rows.len();
        let last = key.steps as usize - 1;
        let mut cache = match step_cache {
            StepCacheMode::Off => None,
            StepCacheMode::FirstBlock { threshold } => Some(StepCache::new(threshold)),
        };
        for i in start..key.steps as usize {
            let t0 = Instant::now();
            let ts = sched.model_timestep(i, rows, self.dtype, &self.device)?;
            let img_in = if cfg_rows.is_empty() {
                x.clone()
            } else {
                let idx = Tensor::from_vec(
                    cfg_rows.iter().map(|&j| j as u32).collect::<Vec<_>>(),
                    cfg_rows.len(),
                    &self.device,
                )?;
                Tensor::cat(&[x.clone(), x.index_select(&idx, 0)?], 0)?
            };
            let v = match cache.as_mut() {
                None => {
                    stats.full_forwards += rows as u64;
                    self.transformer()?
                        .forward(&img_in, &txt, txt_mask.as_ref(), &ts, grid)?
                }
                Some(cache) => {
                    let inputs = ForwardInputs {
                        img: &img_in,
                        txt: &txt,
                        txt_mask: txt_mask.as_ref(),
                        timestep: &ts,
                        img_hw: grid,
                    };
                    let (computed, reused) = (cache.computed, cache.reused);
                    let v = self.transformer()?.forward_step_cached(
                        inputs,
                        cache,
                        may_reuse(i, start, last),
                    )?;
                    stats.full_forwards += cache.computed - computed;
                    stats.reused_forwards += cache.reused - reused;
                    v
                }
            };
            let mut preds = Vec::with_capacity(n);
            for (j, r) in reqs.iter().enumerate() {
                let cond = v.narrow(0, j, 1)?;
                preds.push(match cfg_rows.iter().position(|&c| c == j) {
                    Some(k) => {
                        true_cfg(&cond, &v.narrow(0, n + k, 1)?, f64::from(r.true_cfg_scale))?
                    }
                    None => cond,
                });
            }
            let pred = Tensor::cat(&preds, 0)?;
            // This step's previews, from the prediction before the step is taken.
            let local = u32::try_from(i - start + 1).unwrap_or(u32::MAX);
            let mut made = Vec::new();
            let previewing = Instant::now();
            for (j, (request, plan)) in plans.iter().enumerate() {
                if !plan.contains(&local) {
                    continue;
                }
                // x₀ = x_t − σ_t·v, the flow-matching estimate of the clean latents.
                let v = pred.narrow(0, j, 1)?;
                let mut x0 = (x.narrow(0, j, 1)? - (v * f64::from(sigmas[i]))?)?;
                if let (Some(z), Some(m)) = (&images[j], &masks[j]) {
                    // An inpaint keeps the init image outside the mask.
                    x0 = ((m.affine(-1.0, 1.0)? * z)? + (m * x0)?)?;
                }
                let rgb = self.decode_to_rgb8(&unpack(&x0, grid)?)?;
                let r = reqs[j];
                if let Some(preview) = preview_of(&rgb, r.width, r.height)? {
                    made.push(StepPreview {
                        request: *request,
                        step: local,
                        preview,
                    });
                }
            }
            // The step's time is the denoising's own, without the previews' decodes.
            let preview_time = if made.is_empty() {
                Duration::ZERO
            } else {
                previewing.elapsed()
            };
            x = sched.step(&pred, &x, i)?;
            if key.inpaint {
                let mut blended = Vec::with_capacity(n);
                for j in 0..n {
                    let xj = x.narrow(0, j, 1)?;
                    blended.push(match (&images[j], &masks[j]) {
                        (Some(z), Some(m)) => {
                            let proper = if i + 1 < key.steps as usize {
                                scale_noise(z, &noises[j], sigmas[i + 1])?
                            } else {
                                z.clone()
                            };
                            // (1 − m)·proper + m·x, as the reference writes it.
                            ((m.affine(-1.0, 1.0)? * proper)? + (m * xj)?)?
                        }
                        _ => xj,
                    });
                }
                x = Tensor::cat(&blended, 0)?;
            }
            if on_step(t0.elapsed().saturating_sub(preview_time), made).is_break() {
                return Err(EngineError::Cancelled);
            }
        }
        (0..n)
            .map(|j| Ok(unpack(&x.narrow(0, j, 1)?, grid)?))
            .collect()
    }

    /// The VAE decode, tiled when the plan says so and the image is larger than one tile.
    fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        let (h, w) = (latents.dim(D::Minus2)?, latents.dim(D::Minus1)?);
        let vae = self.vae.config();
        let f = vae.spatial_compression();
        let bytes = self.vae.dtype().size_in_bytes() as u64;
        match self.vae_tiling {
            Some(t) if t.applies(dim_u32(w * f), dim_u32(h * f), vae.base_dim, bytes) => Ok(
                crate::vae_tiling::decode_tiled(&self.vae, latents, t.tiling)?,
            ),
            _ => Ok(self.vae.decode(latents)?),
        }
    }

    /// Decodes final latents `[1, 16, H/8, W/8]` to `[H, W, 3]` f32 in [0, 1] on the host: the
    /// reference's `postprocess` (`x·0.5 + 0.5` clamped, in the VAE's dtype) before the u8 step.
    pub fn decode_to_unit(&self, latents: &Tensor) -> Result<Vec<f32>, EngineError> {
        let img = self.decode(latents)?; // [1, 3, H, W] in [-1, 1]
        let unit = img.affine(0.5, 0.0)?.affine(1.0, 0.5)?.clamp(0.0, 1.0)?;
        Ok(unit
            .to_dtype(DType::F32)?
            .squeeze(0)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// Decodes final latents to 8-bit RGB (row-major), rounding as the reference does
    /// ([`crate::vae::image_to_rgb8`]).
    pub fn decode_to_rgb8(&self, latents: &Tensor) -> Result<Vec<u8>, EngineError> {
        let img = self.decode(latents)?;
        image_to_rgb8(&img)?
            .pop()
            .ok_or_else(|| EngineError::InvalidRequest("the VAE returned no image".into()))
    }
}

/// What requests must share to run in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupKey {
    width: u32,
    height: u32,
    steps: u32,
    run: u32,
    inpaint: bool,
}

/// The flow-matching forward process `σ·noise + (1 − σ)·sample` (diffusers `scale_noise`).
fn scale_noise(sample: &Tensor, noise: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    (noise * f64::from(sigma))? + (sample * (1.0 - f64::from(sigma)))?
}

/// blake3 of what, besides the prompt, determines a prompt's embeddings: the model (its name,
/// folder and dtype) and the template with its cut (drop index and length cap). Each field is
/// length-prefixed, so no two field lists hash alike.
fn prompt_key_prefix(
    model_id: &str,
    dir: &Path,
    dtype: DType,
    tokenizer: &PromptTokenizer,
) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    let dir = dir.to_string_lossy();
    let dtype = format!("{dtype:?}");
    let drop = tokenizer.drop_index().to_le_bytes();
    let max = tokenizer.max_sequence_length().to_le_bytes();
    let fields: [&[u8]; 6] = [
        model_id.as_bytes(),
        dir.as_bytes(),
        dtype.as_bytes(),
        crate::tokenizer::PROMPT_TEMPLATE.as_bytes(),
        &drop,
        &max,
    ];
    for f in fields {
        h.update(&(f.len() as u64).to_le_bytes());
        h.update(f);
    }
    h.finalize().as_bytes().to_vec()
}

/// Right-pads `[1, L_i, D]` embeddings to `[B, L_max, D]`; the mask `[B, L_max]` (u8) only when
/// lengths differ (the reference passes none when all tokens are real).
pub(crate) fn pad_text(
    rows: &[Tensor],
    device: &Device,
) -> Result<(Tensor, Option<Tensor>), EngineError> {
    let lens: Vec<usize> = rows.iter().map(|t| t.dim(1)).collect::<Result<_, _>>()?;
    let longest = lens.iter().copied().max().unwrap_or(0);
    let padded = rows
        .iter()
        .zip(&lens)
        .map(|(t, &l)| {
            if l == longest {
                Ok(t.clone())
            } else {
                t.pad_with_zeros(1, 0, longest - l)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let txt = Tensor::cat(&padded, 0)?;
    if lens.iter().all(|&l| l == longest) {
        return Ok((txt, None));
    }
    let mask: Vec<u8> = lens
        .iter()
        .flat_map(|&l| (0..longest).map(move |k| u8::from(k < l)))
        .collect();
    Ok((
        txt,
        Some(Tensor::from_vec(mask, (rows.len(), longest), device)?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_steps_is_the_ceiling() {
        assert_eq!(effective_steps(4, Some(600)), 3);
        assert_eq!(effective_steps(4, Some(500)), 2);
        assert_eq!(effective_steps(50, None), 50);
        assert_eq!(effective_steps(3, Some(1)), 1);
        assert_eq!(effective_steps(25, Some(560)), 14);
    }

    #[test]
    fn the_model_can_be_shared_across_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<QwenImage>();
        shared::<GenerateRequest>();
    }

    #[test]
    fn devices_and_dtypes_parse() {
        assert!(device_from_name("cpu").is_ok());
        assert!(device_from_name("tpu").is_err());
        if !candle_core::utils::cuda_is_available() {
            let e = device_from_name("cuda").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert_eq!(dtype_from_name("bf16"), Some(DType::BF16));
        assert_eq!(dtype_from_name("f64"), None);
    }
}
