//! [`Generator`] backed by the Qwen-Image engine: the real model, or the built-in tiny model
//! (trained on drawn scenes, in the same layout, loaded by the same code).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use pixmarket_engine::pipeline::{self, GenerateRequest, QwenImage};
use pixmarket_engine::placement::{self, LoadOptions, TextEncoderPlace};
use pixmarket_protocol::JobParams;

use crate::generator::{GenError, Generator, GeneratorInfo};

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
    precision: String,
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
            precision: dtype.to_owned(),
            max_side,
            device_memory_mib: u64::from(placement.device_memory_gib) * 1024,
        })
    }
}

fn to_request(p: &JobParams, image: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        width: p.width,
        height: p.height,
        steps: p.steps,
        true_cfg_scale: p.true_cfg_scale,
        // Image i of a job uses seed + i, so a 4-image job is four distinct pictures.
        seed: p.seed.wrapping_add(u64::from(image)),
        latents: None,
        mode: p.mode.clone(),
    }
}

impl Generator for EngineGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            model_id: self.model.model_id().chars().take(128).collect(),
            precision: self.precision.clone(),
            device_name: self.device_name.clone(),
            device_memory_mib: self.device_memory_mib,
            supports_image_to_image: true,
            supports_inpaint: true,
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
        let mut requests = Vec::new();
        let mut counts = Vec::with_capacity(jobs.len());
        for job in jobs {
            counts.push(job.images as usize);
            requests.extend((0..job.images).map(|i| to_request(job, i)));
        }
        let mut cb = |p: pipeline::Progress| progress(p.step, p.total);
        let images = self
            .model
            .generate(&requests, &mut cb)
            .map_err(|e| match e {
                pixmarket_engine::error::EngineError::Cancelled => GenError::Cancelled,
                other => GenError::Failed(other.to_string()),
            })?;
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
