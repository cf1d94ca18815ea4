//! The testnet's engines and clock.
//!
//! - [`ModelClock`]: *model time*. With the tiny engine it is wall time; with the simulated
//!   engine it runs `speedup` times faster than the wall clock, so a simulated day fits in
//!   minutes. Every time a report shows is model time, and reports say which.
//! - [`SimulatedGenerator`]: a [`Generator`] whose GPU time is a timing model per GPU kind
//!   ([`GPU_KINDS`]). It counts prompt tokens with the tiny model's real tokenizer, sleeps the
//!   modelled time step by step (reporting every step and honouring cancellation, like the
//!   engine), and returns a real PNG per image: a small flat picture labelled as simulated in
//!   its text chunk. Everything around it (adverts, quotes, holds, receipts, acks) is the real
//!   node code.
//! - [`Recorded`]: wraps any generator (the tiny engine or the simulated one) and logs when
//!   its batches ran, for the utilization figures.
//!
//! ## The timing model
//!
//! No GPU was measured for this project yet (see `docs/benchmarks.md`), so the per-kind figures
//! are *derived*, not measured: the work of one standard image (1024², 50 steps, true CFG, so
//! 100 transformer passes) is counted from the model spec, and divided by each GPU's datasheet
//! dense BF16 tensor throughput at an assumed 40 % model-FLOPs utilization:
//!
//! - one transformer pass over 4,096 image + ~50 text tokens: 2 × 20.4 G parameters × 4,146
//!   tokens ≈ 169 TFLOP, plus attention 60 blocks × 4 × 4,146² × 3,072 ≈ 13 TFLOP: ≈ 182 TFLOP;
//! - 100 passes: ≈ 18.2 PFLOP; plus ~1.5 % for the text encoder and the VAE decode;
//! - H100 SXM: 989 TFLOP/s × 0.4 ≈ 396 TFLOP/s → ≈ 47 s per standard image.
//!
//! A job's time scales with its work the way the provider's own estimate does: pixels × steps
//! × images, doubled by true CFG (scale > 1). Batches cost the sum of their jobs (no batching
//! gain is assumed). Replace the table with measured figures with `--gpu-table FILE` once
//! `pixmarket-engine-bench` has run on real GPUs.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pixmarket_engine::image_io::encode_png;
use pixmarket_engine::tokenizer::PromptTokenizer;
use pixmarket_node::generator::{GenError, Generator, GeneratorInfo};
use pixmarket_protocol::{Hash, JobParams, effective_steps};
use serde::{Deserialize, Serialize};

use crate::record::BusyInterval;

/// One GPU kind of the timing model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuKind {
    pub name: String,
    pub memory_mib: u64,
    /// Model-time milliseconds for one standard image (1024², 50 steps, true CFG).
    pub ms_per_standard_image: u64,
    /// Where the figure comes from.
    pub source: String,
}

/// Work of one standard image at 40 % utilization, in TFLOP: see the module docs.
const STANDARD_IMAGE_TFLOP: u64 = 18_470;
/// Assumed model-FLOPs utilization, in percent.
const ASSUMED_MFU_PERCENT: u64 = 40;

/// (name, memory MiB, datasheet dense BF16 tensor TFLOP/s) of the GPUs that hold the 20 B
/// transformer in BF16 with room to run it.
const DATASHEET: [(&str, u64, u64); 6] = [
    ("NVIDIA H200", 143_771, 989),
    ("NVIDIA H100 SXM", 81_559, 989),
    ("NVIDIA H100 PCIe", 81_559, 756),
    ("NVIDIA L40S", 46_068, 362),
    ("NVIDIA RTX 6000 Ada", 49_140, 364),
    ("NVIDIA A100 80GB", 81_920, 312),
];

/// The built-in timing model: one entry per GPU kind, derived as the module docs say.
pub fn builtin_gpu_kinds() -> Vec<GpuKind> {
    DATASHEET
        .iter()
        .map(|(name, memory_mib, tflops)| GpuKind {
            name: (*name).to_owned(),
            memory_mib: *memory_mib,
            ms_per_standard_image: STANDARD_IMAGE_TFLOP * 1000 * 100
                / (tflops * ASSUMED_MFU_PERCENT),
            source: format!(
                "derived: {STANDARD_IMAGE_TFLOP} TFLOP per standard image at \
                 {ASSUMED_MFU_PERCENT}% of {tflops} TFLOP/s (datasheet BF16), not measured"
            ),
        })
        .collect()
}

/// Reads a GPU table (a JSON list of [`GpuKind`]) measured elsewhere.
pub fn load_gpu_kinds(path: &Path) -> anyhow::Result<Vec<GpuKind>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the GPU table {}: {e}", path.display()))?;
    let kinds: Vec<GpuKind> = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a GPU table (a JSON list of {{name, memory_mib, \
             ms_per_standard_image, source}}): {e}",
            path.display()
        )
    })?;
    if kinds.is_empty() {
        anyhow::bail!("the GPU table {} is empty", path.display());
    }
    if let Some(k) = kinds
        .iter()
        .find(|k| k.ms_per_standard_image == 0 || k.name.trim().is_empty())
    {
        anyhow::bail!(
            "GPU kind {:?} in {}: a name and ms_per_standard_image > 0 are required",
            k.name,
            path.display()
        );
    }
    Ok(kinds)
}

/// Model time: wall time since the start, times `speedup`.
#[derive(Clone, Copy, Debug)]
pub struct ModelClock {
    start: Instant,
    speedup: f64,
}

impl ModelClock {
    /// A clock starting now. `speedup` must be finite and ≥ 1 (checked by the caller's
    /// config validation; anything else is clamped to 1).
    pub fn start(speedup: f64) -> Self {
        let speedup = if speedup.is_finite() && speedup >= 1.0 {
            speedup
        } else {
            1.0
        };
        Self {
            start: Instant::now(),
            speedup,
        }
    }

    pub fn speedup(&self) -> f64 {
        self.speedup
    }

    /// Model milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        to_ms(self.start.elapsed().as_secs_f64() * self.speedup * 1000.0)
    }

    /// The wall time that `model_ms` of model time takes.
    pub fn wall(&self, model_ms: u64) -> Duration {
        Duration::from_secs_f64(as_f64(model_ms) / 1000.0 / self.speedup)
    }

    /// The wall instant at which model time reaches `model_ms`.
    pub fn instant_at(&self, model_ms: u64) -> Instant {
        self.start + self.wall(model_ms)
    }
}

/// `u64` → `f64` for durations (exact below 2^53 ms, i.e. always here).
#[allow(clippy::cast_precision_loss)]
pub(crate) fn as_f64(v: u64) -> f64 {
    v as f64
}

/// A non-negative `f64` of milliseconds → `u64`, saturating.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn to_ms(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.min(1.8e19) as u64
    } else {
        0
    }
}

/// Model-time milliseconds `params` take on a GPU doing one standard image in `standard_ms`.
pub fn job_ms(params: &JobParams, standard_ms: u64) -> u64 {
    let px = u128::from(params.width) * u128::from(params.height);
    let steps = u128::from(effective_steps(
        params.steps,
        params.mode.strength_permille(),
    ));
    let cfg = if params.true_cfg_scale > 1.0 { 2 } else { 1 };
    let work = px * steps * u128::from(params.images) * cfg;
    let standard = 1024 * 1024 * 50 * 2;
    u64::try_from(u128::from(standard_ms) * work / standard)
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The simulated engine: see the module docs.
#[derive(Debug)]
pub struct SimulatedGenerator {
    kind: GpuKind,
    clock: ModelClock,
    tokenizer: PromptTokenizer,
}

impl SimulatedGenerator {
    /// A simulated `kind` counting tokens with the tokenizer in `tokenizer_dir` (the tiny
    /// model's `tokenizer/`).
    pub fn new(kind: GpuKind, clock: ModelClock, tokenizer_dir: &Path) -> anyhow::Result<Self> {
        let tokenizer = PromptTokenizer::from_dir(tokenizer_dir).map_err(|e| {
            anyhow::anyhow!("cannot load the tokenizer {}: {e}", tokenizer_dir.display())
        })?;
        Ok(Self {
            kind,
            clock,
            tokenizer,
        })
    }

    /// A small flat picture standing in for the image: its colour comes from the job, its
    /// text chunk says it is simulated.
    fn picture(&self, params: &JobParams, image: u32) -> Result<Vec<u8>, GenError> {
        let w = (params.width / 16).max(1);
        let h = (params.height / 16).max(1);
        let mut seed = Vec::with_capacity(params.prompt.len() + 12);
        seed.extend_from_slice(params.prompt.as_bytes());
        seed.extend_from_slice(&params.seed.to_le_bytes());
        seed.extend_from_slice(&image.to_le_bytes());
        let colour = Hash::of(&seed);
        let rgb: Vec<u8> = colour
            .as_bytes()
            .iter()
            .take(3)
            .copied()
            .cycle()
            .take(3 * usize::try_from(w * h).unwrap_or(0))
            .collect();
        let label = format!(
            "simulated engine: no model ran; {}x{} on a modelled {}",
            params.width, params.height, self.kind.name
        );
        encode_png(&rgb, w, h, &[("pixmarket", label)]).map_err(|e| GenError::Failed(e.to_string()))
    }
}

impl Generator for SimulatedGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            model_id: "qwen-image (simulated)".into(),
            precision: "bf16".into(),
            device_name: format!("{} (simulated)", self.kind.name),
            device_memory_mib: self.kind.memory_mib,
            supports_image_to_image: true,
            supports_inpaint: true,
            step_caching: pixmarket_protocol::StepCaching::Exact,
            serves_exact: true,
        }
    }

    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError> {
        let max = self.tokenizer.max_sequence_length();
        let n = self
            .tokenizer
            .count_tokens(prompt)
            .map_err(|e| GenError::Failed(e.to_string()))?;
        Ok(u32::try_from(n.min(max)).unwrap_or(u32::MAX).max(1))
    }

    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        let Some(first) = jobs.first() else {
            return Ok(Vec::new());
        };
        let total: u64 = jobs
            .iter()
            .map(|p| job_ms(p, self.kind.ms_per_standard_image))
            .sum();
        let steps = effective_steps(first.steps, first.mode.strength_permille()).max(1);
        let per_step = self.clock.wall(total) / steps;
        let started = Instant::now();
        for step in 1..=steps {
            // Sleep to the step's deadline, not by a fixed amount, so late wake-ups don't add up.
            let due = started + per_step * step;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if progress(step, steps).is_break() {
                return Err(GenError::Cancelled);
            }
        }
        jobs.iter()
            .map(|p| (0..p.images).map(|i| self.picture(p, i)).collect())
            .collect()
    }
}

/// Busy intervals kept per run; past this, intervals are counted but not kept.
const MAX_INTERVALS: usize = 1_000_000;

/// Every batch any provider ran, in model time.
#[derive(Clone, Debug, Default)]
pub struct BusyLog {
    inner: Arc<Mutex<(Vec<BusyInterval>, u64)>>,
}

impl BusyLog {
    fn push(&self, interval: BusyInterval) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if g.0.len() < MAX_INTERVALS {
            g.0.push(interval);
        } else {
            g.1 += 1;
        }
    }

    /// The intervals kept, and how many were not kept.
    pub fn snapshot(&self) -> (Vec<BusyInterval>, u64) {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (g.0.clone(), g.1)
    }
}

/// A generator whose batches are logged as busy time of one device of one provider.
pub struct Recorded {
    inner: Arc<dyn Generator>,
    /// (provider, device).
    index: (usize, usize),
    clock: ModelClock,
    log: BusyLog,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded")
            .field("index", &self.index)
            .finish()
    }
}

impl Recorded {
    /// Logs `inner`'s batches as busy time of device `index.1` of provider `index.0`.
    pub fn new(
        inner: Arc<dyn Generator>,
        index: (usize, usize),
        clock: ModelClock,
        log: BusyLog,
    ) -> Self {
        Self {
            inner,
            index,
            clock,
            log,
        }
    }
}

impl Generator for Recorded {
    fn info(&self) -> GeneratorInfo {
        self.inner.info()
    }

    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError> {
        self.inner.count_prompt_tokens(prompt)
    }

    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        let start_ms = self.clock.now_ms();
        let result = self.inner.generate(jobs, progress);
        self.log.push(BusyInterval {
            provider: self.index.0,
            device: self.index.1,
            start_ms,
            end_ms: self.clock.now_ms(),
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixmarket_protocol::Mode;

    fn params(w: u32, h: u32, steps: u32, images: u32, cfg: f32) -> JobParams {
        JobParams {
            prompt: "a cat".into(),
            negative_prompt: String::new(),
            width: w,
            height: h,
            steps,
            true_cfg_scale: cfg,
            seed: 1,
            images,
            mode: Mode::TextToImage,
            exact: false,
            lora: None,
            latents: None,
        }
    }

    #[test]
    fn the_builtin_table_gives_about_47_s_per_standard_image_on_an_h100() {
        let kinds = builtin_gpu_kinds();
        let h100 = kinds.iter().find(|k| k.name == "NVIDIA H100 SXM").unwrap();
        assert!((46_000..48_000).contains(&h100.ms_per_standard_image));
        let a100 = kinds.iter().find(|k| k.name == "NVIDIA A100 80GB").unwrap();
        assert!(a100.ms_per_standard_image > 3 * h100.ms_per_standard_image);
        assert!(kinds.iter().all(|k| k.source.contains("not measured")));
    }

    #[test]
    fn job_time_scales_with_pixels_steps_images_and_cfg() {
        assert_eq!(job_ms(&params(1024, 1024, 50, 1, 4.0), 40_000), 40_000);
        assert_eq!(job_ms(&params(1024, 1024, 50, 1, 1.0), 40_000), 20_000);
        assert_eq!(job_ms(&params(512, 512, 50, 2, 4.0), 40_000), 20_000);
        assert_eq!(job_ms(&params(1024, 1024, 25, 4, 4.0), 40_000), 80_000);
    }

    #[test]
    fn the_model_clock_runs_speedup_times_faster() {
        let c = ModelClock::start(1000.0);
        assert_eq!(c.wall(60_000), Duration::from_millis(60));
        assert_eq!(ModelClock::start(f64::NAN).speedup(), 1.0);
        assert_eq!(ModelClock::start(0.5).speedup(), 1.0);
    }
}
