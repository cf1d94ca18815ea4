//! [`Generator`] backed by the Qwen-Image engine: the real model, or the built-in tiny model
//! (trained on drawn scenes, in the same layout, loaded by the same code). Runs each job with
//! the provider's step caching, or exactly when the job requires it
//! ([`StepCaching::for_job`], the same rule the provider signs into the quote and receipt).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use pixmarket_engine::StepCacheMode;
use pixmarket_engine::pipeline::{self, GenerateRequest, QwenImage};
use pixmarket_engine::placement::{self, LoadOptions, TextEncoderPlace};
use pixmarket_engine::preview::StepPreview;
use pixmarket_protocol::{Hash, JobParams, LoraOffer, StepCaching};

use crate::engine_loras::{Applied, OfferedLora};
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
    /// Written only to merge another LoRA in, between batches (by the device's one worker);
    /// admission's token counts read it meanwhile.
    model: RwLock<QwenImage>,
    /// The LoRAs jobs may name.
    loras: Vec<OfferedLora>,
    /// The LoRA merged now.
    applied: Mutex<Applied>,
    device_name: String,
    /// The card's memory as the driver reported it at load; 0 when not known (the CPU).
    memory_mib: u64,
    precision: String,
    caching: CachingSettings,
    full_forwards: AtomicU64,
    reused_forwards: AtomicU64,
    /// The memory plan (`None`: no device memory given, the protocol's limits hold).
    plan: Option<placement::Plan>,
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
    /// ([`pixmarket_engine::placement::plan`]) decides where the text encoder runs, the
    /// attention chunks and the VAE tiling, and bounds the size and the batch advertised and
    /// accepted; it is logged at start.
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
        let mut opts = LoadOptions::default();
        let mut planned = None;
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
            if plan.largest_side.is_none() {
                return Err(GenError::Failed(format!(
                    "no image size fits {} GiB with this model ({plan})",
                    placement.device_memory_gib
                )));
            }
            opts = plan.load_options();
            planned = Some(plan);
        }
        if placement.text_encoder_on_cpu {
            opts.text_encoder = TextEncoderPlace::Cpu;
        }
        let model = QwenImage::load_with(dir, dt, &dev, &opts).map_err(fail)?;
        Ok(Self {
            model: RwLock::new(model),
            loras: Vec::new(),
            applied: Mutex::new(None),
            device_name: device.to_owned(),
            memory_mib: pixmarket_engine::device_memory::total_mib(&dev).unwrap_or(0),
            precision: dtype.to_owned(),
            caching: CachingSettings::default(),
            full_forwards: AtomicU64::new(0),
            reused_forwards: AtomicU64::new(0),
            plan: planned,
            device_memory_mib: u64::from(placement.device_memory_gib) * 1024,
        })
    }

    /// Applies the provider's caching settings.
    pub fn with_caching(mut self, caching: CachingSettings) -> Self {
        if let Ok(m) = self.model.read() {
            m.set_prompt_cache_bytes(caching.prompt_cache_bytes);
        }
        self.caching = caching;
        self
    }

    /// Offers `loras` to jobs: each must fit this transformer (checked now, so a bad file
    /// fails the start, not a job) and the hashes must differ.
    pub fn with_loras(mut self, loras: Vec<OfferedLora>) -> Result<Self, GenError> {
        {
            let m = self.model.read().map_err(|_| poisoned())?;
            for (i, l) in loras.iter().enumerate() {
                if let Some(other) = loras[..i].iter().find(|o| o.offer.hash == l.offer.hash) {
                    return Err(GenError::Failed(format!(
                        "LoRAs {:?} and {:?} are the same file",
                        other.offer.name, l.offer.name
                    )));
                }
                m.check_lora(&l.spec(1000)).map_err(|e| {
                    GenError::Failed(format!("LoRA {:?}: {}", l.offer.name, chain(&e)))
                })?;
            }
        }
        self.loras = loras;
        Ok(self)
    }

    /// The offered LoRA with file hash `hash`.
    fn offered(&self, hash: &Hash) -> Option<&OfferedLora> {
        self.loras.iter().find(|l| l.offer.hash == *hash)
    }

    /// Merges the LoRA `want` names (or none) into the transformer unless it is there already,
    /// and sets the scheduler it runs with.
    fn apply(&self, want: Applied) -> Result<(), GenError> {
        let mut applied = self.applied.lock().map_err(|_| poisoned())?;
        if *applied == want {
            return Ok(());
        }
        let (specs, lightning) = match &want {
            None => (Vec::new(), false),
            Some(choice) => {
                let l = self.offered(&choice.hash).ok_or_else(|| {
                    GenError::Failed(format!(
                        "LoRA {} is not offered here",
                        choice.hash.fmt_short()
                    ))
                })?;
                (vec![l.spec(choice.scale_permille)], l.lightning)
            }
        };
        let mut m = self.model.write().map_err(|_| poisoned())?;
        // Whatever happens next, the merged state is no longer what `applied` says.
        *applied = Some(pixmarket_protocol::LoraChoice {
            hash: Hash::ZERO,
            scale_permille: 0,
        });
        m.set_loras(&specs)
            .map_err(|e| GenError::Failed(chain(&e)))?;
        let scheduler = if lightning {
            pixmarket_engine::scheduler::FlowMatchEulerConfig::lightning()
        } else {
            m.folder_scheduler_config()
                .map_err(|e| GenError::Failed(chain(&e)))?
        };
        m.set_scheduler(scheduler)
            .map_err(|e| GenError::Failed(e.to_string()))?;
        *applied = want;
        Ok(())
    }

    /// Runs jobs that share one step-caching mode and one LoRA; `jobs` pairs each job with its index in
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
        self.apply(jobs.first().and_then(|&(_, j, _)| j.lora))?;
        let model = self.model.read().map_err(|_| poisoned())?;
        let (images, stats) = model
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

/// A lock was poisoned: a thread panicked while holding the model.
fn poisoned() -> GenError {
    GenError::Failed("the engine's lock was poisoned by an earlier failure".into())
}

/// An error with its sources, in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
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
            model_id: self
                .model
                .read()
                .map(|m| m.model_id().chars().take(128).collect())
                .unwrap_or_default(),
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
        let most = pixmarket_protocol::validate::MAX_DIMENSION;
        self.plan
            .as_ref()
            .and_then(|p| p.largest_side)
            .map_or(most, |s| s.min(most))
    }

    fn loras(&self) -> Vec<LoraOffer> {
        self.loras.iter().map(|l| l.offer.clone()).collect()
    }

    fn max_images(&self, width: u32, height: u32) -> u32 {
        self.plan.as_ref().map_or(u32::MAX, |p| {
            u32::try_from(p.max_images(width, height)).unwrap_or(u32::MAX)
        })
    }

    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError> {
        // A non-empty prompt is at least one token; metering needs 1..
        let m = self.model.read().map_err(|_| poisoned())?;
        Ok(m.count_prompt_tokens(prompt).max(1))
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
        // The provider batches only jobs with one LoRA; a mixed batch runs job by job.
        if jobs.iter().any(|j| j.lora != jobs[0].lora) {
            let mut out = Vec::with_capacity(jobs.len());
            for (i, j) in jobs.iter().enumerate() {
                let m = self.caching.step_caching.for_job(j.exact);
                out.extend(self.run(&[(i, j, wanted(i))], m, progress)?);
            }
            return Ok(out);
        }
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
        let p = self
            .model
            .read()
            .map(|m| m.prompt_cache_stats())
            .unwrap_or_default();
        CacheStats {
            prompt_hits: p.hits,
            prompt_misses: p.misses,
            full_forwards: self.full_forwards.load(Ordering::Relaxed),
            reused_forwards: self.reused_forwards.load(Ordering::Relaxed),
        }
    }
}
