//! [`Generator`] backed by the Qwen-Image engine: the real model, or the built-in tiny model
//! (trained on drawn scenes, in the same layout, loaded by the same code). Runs each job with
//! the provider's step caching, or exactly when the job requires it
//! ([`StepCaching::for_job`], the same rule the provider signs into the quote and receipt).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use pixmarket_engine::StepCacheMode;
use pixmarket_engine::pipeline::{self, GenerateRequest, QwenImage};
use pixmarket_engine::placement::{self, LoadOptions, TextEncoderPlace};
use pixmarket_engine::preview::StepPreview;
use pixmarket_protocol::{JobParams, StepCaching};

use crate::generator::{CacheStats, GenError, Generator, GeneratorInfo, StepReport};

/// The provider's caching settings (from `config.toml`'s `[provider]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachingSettings {
    /// Step caching for jobs that do not require exact computation.
    pub step_caching: StepCaching,
    /// Run jobs that require exact computation (else they are refused at the quote).
    pub serves_exact: bool,
    /// Bound of the prompt-embedding cache in bytes (0 = off).
    pub prompt_cache_bytes: u64,
}

impl Default for CachingSettings {
    fn default() -> Self {
        Self {
            step_caching: StepCaching::Exact,
            serves_exact: true,
            prompt_cache_bytes: pipeline::DEFAULT_PROMPT_CACHE_BYTES,
        }
    }
}

/// The engine's mode for a job's step caching.
fn engine_mode(c: StepCaching) -> StepCacheMode {
    match c {
        StepCaching::Exact => StepCacheMode::Off,
        StepCaching::FirstBlock { threshold_permille } => {
            StepCacheMode::from_permille(threshold_permille)
        }
    }
}

/// Where `--model tiny` lives inside a data folder.
pub fn tiny_model_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models").join("tiny")
}

/// Resolves `tiny` to the data folder's tiny model (writing it on first use); any other value
/// is a model folder in the diffusers layout.
pub fn resolve_model(model: &str, data_dir: &Path) -> Result<PathBuf, GenError> {
    if model == "tiny" {
        let dir = tiny_model_dir(data_dir);
        pixmarket_engine::tiny::ensure_tiny_model(&dir)
            .map_err(|e| GenError::Failed(e.to_string()))?;
        Ok(dir)
    } else {
        Ok(PathBuf::from(model))
    }
}

/// The engine as a market generator.
#[derive(Debug)]
pub struct EngineGenerator {
    model: QwenImage,
    device_name: String,
    /// The card's memory as the driver reported it at load; 0 when not known (the CPU).
    memory_mib: u64,
    precision: String,
    caching: CachingSettings,
    full_forwards: AtomicU64,
    reused_forwards: AtomicU64,
    /// The largest side the memory plan allows (the protocol's limit without a plan).
    max_side: u32,
    /// The device memory the plan was made for, in MiB (0: none given).
    device_memory_mib: u64,
}

/// How a provider places its model ([`EngineGenerator::load_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    /// Run the text encoder on the CPU.
    pub text_encoder_on_cpu: bool,
    /// The device's memory in GiB: plan the placement for it and advertise the largest size
    /// the plan allows (0: no plan).
    pub device_memory_gib: u32,
}

impl EngineGenerator {
    /// Loads a model folder on `device` (`cpu`, `cuda`, `cuda:N`) in `dtype` (`f32`, `bf16`, `f16`).
    pub fn load(dir: &Path, dtype: &str, device: &str) -> Result<Self, GenError> {
        Self::load_with(dir, dtype, device, Placement::default())
    }

    /// As [`Self::load`], placed as `placement` says. With a device memory, the engine's plan
    /// ([`pixmarket_engine::placement::plan`]) decides whether the text encoder leaves the
    /// device and gives the largest size advertised; it is logged at start.
    pub fn load_with(
        dir: &Path,
        dtype: &str,
        device: &str,
        placement: Placement,
    ) -> Result<Self, GenError> {
        let fail = |e: pixmarket_engine::error::EngineError| GenError::Failed(e.to_string());
        let dt = pipeline::dtype_from_name(dtype).ok_or_else(|| {
            GenError::Failed(format!("unknown dtype {dtype:?}; allowed: f32, bf16, f16"))
        })?;
        let dev = pipeline::device_from_name(device).map_err(fail)?;
        let mut text_encoder_on_cpu = placement.text_encoder_on_cpu;
        let mut max_side = pixmarket_protocol::validate::MAX_DIMENSION;
        if placement.device_memory_gib > 0 {
            let plan =
                placement::plan_folder(dir, dt, u64::from(placement.device_memory_gib) << 30)
                    .ok_or_else(|| {
                        GenError::Failed(format!(
                            "cannot plan {}: its configs are unreadable",
                            dir.display()
                        ))
                    })?;
            tracing::info!(%plan, gib = placement.device_memory_gib, "placement plan");
            text_encoder_on_cpu |= plan.text_encoder == TextEncoderPlace::Cpu;
            let Some(side) = plan.largest_side else {
                return Err(GenError::Failed(format!(
                    "no image size fits {} GiB with this model ({plan})",
                    placement.device_memory_gib
                )));
            };
            max_side = max_side.min(side);
        }
        let opts = LoadOptions {
            text_encoder_on_cpu,
            ..LoadOptions::default()
        };
        let model = QwenImage::load_with(dir, dt, &dev, &opts).map_err(fail)?;
        Ok(Self {
            model,
            device_name: device.to_owned(),
            memory_mib: pixmarket_engine::device_memory::total_mib(&dev).unwrap_or(0),
            precision: dtype.to_owned(),
            caching: CachingSettings::default(),
            full_forwards: AtomicU64::new(0),
            reused_forwards: AtomicU64::new(0),
            max_side,
            device_memory_mib: u64::from(placement.device_memory_gib) * 1024,
        })
    }

    /// Applies the provider's caching settings.
    pub fn with_caching(mut self, caching: CachingSettings) -> Self {
        self.model
            .set_prompt_cache_bytes(caching.prompt_cache_bytes);
        self.caching = caching;
        self
    }

    /// Runs jobs that share one step-caching mode; `jobs` pairs each job with its index in
    /// the whole call and its previews (of its first image), and reports name that index.
    fn run(
        &self,
        jobs: &[(usize, &JobParams, u8)],
        mode: StepCaching,
        progress: &mut dyn FnMut(StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        let mut requests = Vec::new();
        let mut counts = Vec::with_capacity(jobs.len());
        // Per engine request: its job's index in the call, and the previews it makes.
        let mut owners = Vec::new();
        let mut previews = Vec::new();
        for &(index, job, wanted) in jobs {
            counts.push(job.images as usize);
            for i in 0..job.images {
                requests.push(to_request(job, i)?);
                owners.push(index);
                previews.push(if i == 0 { wanted } else { 0 });
            }
        }
        let mut cb = |p: pipeline::Progress, made: Vec<StepPreview>| {
            progress(StepReport {
                step: p.step,
                of: p.total,
                previews: made
                    .into_iter()
                    .filter_map(|m| Some((*owners.get(m.request)?, m.preview)))
                    .collect(),
            })
        };
        let (images, stats) = self
            .model
            .generate_previewing(&requests, engine_mode(mode), &previews, &mut cb)
            .map_err(|e| match e {
                pixmarket_engine::error::EngineError::Cancelled => GenError::Cancelled,
                other => GenError::Failed(other.to_string()),
            })?;
        self.full_forwards
            .fetch_add(stats.full_forwards, Ordering::Relaxed);
        self.reused_forwards
            .fetch_add(stats.reused_forwards, Ordering::Relaxed);
        let mut pngs = images
            .iter()
            .map(|img| img.png().map_err(|e| GenError::Failed(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        Ok(counts
            .into_iter()
            .map(|n| pngs.by_ref().take(n).collect())
            .collect())
    }
}

fn to_request(p: &JobParams, image: u32) -> Result<GenerateRequest, GenError> {
    // Validated at admission: 16 × (H/8) × (W/8) finite values, and only with one image.
    let latents = match p.latents_f32() {
        None => None,
        Some(values) => Some(
            pipeline::latents_from_f32(values, p.width, p.height)
                .map_err(|e| GenError::Failed(e.to_string()))?,
        ),
    };
    Ok(GenerateRequest {
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        width: p.width,
        height: p.height,
        steps: p.steps,
        true_cfg_scale: p.true_cfg_scale,
        // Image i of a job uses seed + i, so a 4-image job is four distinct pictures.
        seed: p.seed.wrapping_add(u64::from(image)),
        latents,
        mode: p.mode.clone(),
    })
}

impl Generator for EngineGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            model_id: self.model.model_id().chars().take(128).collect(),
            precision: self.precision.clone(),
            device_name: self.device_name.clone(),
            // The driver's figure when it reports one, else the memory the plan was made for.
            device_memory_mib: if self.memory_mib > 0 {
                self.memory_mib
            } else {
                self.device_memory_mib
            },
            supports_image_to_image: true,
            supports_inpaint: true,
            step_caching: self.caching.step_caching,
            serves_exact: self.caching.serves_exact,
        }
    }

    fn max_side(&self) -> u32 {
        self.max_side
    }

    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError> {
        // A non-empty prompt is at least one token; metering needs 1..
        Ok(self.model.count_prompt_tokens(prompt).max(1))
    }

    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        self.generate_previewing(jobs, &[], &mut |r| progress(r.step, r.of))
    }

    fn generate_previewing(
        &self,
        jobs: &[JobParams],
        previews: &[u8],
        progress: &mut dyn FnMut(StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        let wanted = |i: usize| previews.get(i).copied().unwrap_or(0);
        // The provider batches only jobs with one `exact` flag; a mixed batch still runs each
        // job in its own mode, as two engine calls.
        let mode = |j: &JobParams| self.caching.step_caching.for_job(j.exact);
        let first = jobs.first().map(mode);
        if jobs.iter().all(|j| Some(mode(j)) == first) {
            let all: Vec<(usize, &JobParams, u8)> = jobs
                .iter()
                .enumerate()
                .map(|(i, j)| (i, j, wanted(i)))
                .collect();
            return self.run(&all, first.unwrap_or(StepCaching::Exact), progress);
        }
        let mut out: Vec<Option<Vec<Vec<u8>>>> = vec![None; jobs.len()];
        for exact in [true, false] {
            let idx: Vec<usize> = (0..jobs.len())
                .filter(|&i| jobs[i].exact == exact)
                .collect();
            let part: Vec<(usize, &JobParams, u8)> =
                idx.iter().map(|&i| (i, &jobs[i], wanted(i))).collect();
            let m = self.caching.step_caching.for_job(exact);
            for (i, pngs) in idx.into_iter().zip(self.run(&part, m, progress)?) {
                out[i] = Some(pngs);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    fn cache_stats(&self) -> CacheStats {
        let p = self.model.prompt_cache_stats();
        CacheStats {
            prompt_hits: p.hits,
            prompt_misses: p.misses,
            full_forwards: self.full_forwards.load(Ordering::Relaxed),
            reused_forwards: self.reused_forwards.load(Ordering::Relaxed),
        }
    }
}
