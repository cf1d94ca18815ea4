//! Flow-match Euler sampling as Qwen-Image configures it (spec §3.2–3.3).
//!
//! Owns `scheduler/scheduler_config.json`, the sigma schedule (the pipeline's `linspace(1, 1/N, N)`,
//! the resolution-dependent shift `mu` from the image token count, exponential or linear time
//! shift, stretch to `shift_terminal`, a final 0) and the Euler step `x + (σ_{i+1} − σ_i)·v`.
//!
//! The schedule is computed in f32 like the reference (numpy float32 arrays, `mu` in f64); the
//! step is computed in f32 with the product `dt·v` rounded to the velocity's dtype, and the
//! result stored in the velocity's dtype, as PyTorch does for a bf16 model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Result, Tensor, bail};
use serde::Deserialize;

/// Why a scheduler config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the expected JSON.
    #[error("cannot parse {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A setting this port does not implement.
    #[error("unsupported scheduler setting: {0}")]
    Unsupported(String),
}

/// How the shift is applied to sigmas when `use_dynamic_shifting` is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeShift {
    /// `e^mu / (e^mu + (1/σ − 1))` (Qwen-Image).
    Exponential,
    /// `mu / (mu + (1/σ − 1))`.
    Linear,
}

/// `FlowMatchEulerDiscreteScheduler`'s config. Unknown keys are ignored; missing keys take the
/// diffusers defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerConfig {
    /// Training timesteps; `t = σ · num_train_timesteps`.
    pub num_train_timesteps: usize,
    /// Static shift, used when `use_dynamic_shifting` is off.
    pub shift: f64,
    /// Shift by `mu`, computed from the image token count.
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` tokens.
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len` tokens (the line is not clamped beyond).
    pub max_shift: f64,
    /// Token count of `base_shift`.
    pub base_image_seq_len: usize,
    /// Token count of `max_shift`.
    pub max_image_seq_len: usize,
    /// Stretch the schedule so the last non-zero sigma equals this.
    pub shift_terminal: Option<f64>,
    /// Shape of the dynamic shift.
    pub time_shift_type: TimeShift,
    /// Unsupported when true.
    pub invert_sigmas: bool,
    /// Unsupported when true.
    pub stochastic_sampling: bool,
    /// Unsupported when true.
    pub use_karras_sigmas: bool,
    /// Unsupported when true.
    pub use_exponential_sigmas: bool,
    /// Unsupported when true.
    pub use_beta_sigmas: bool,
}

impl Default for FlowMatchEulerConfig {
    /// The diffusers constructor defaults.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            shift_terminal: None,
            time_shift_type: TimeShift::Exponential,
            invert_sigmas: false,
            stochastic_sampling: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
        }
    }
}

impl FlowMatchEulerConfig {
    /// The config shipped with Qwen/Qwen-Image (spec §3.3).
    pub fn qwen_image() -> Self {
        Self {
            use_dynamic_shifting: true,
            max_shift: 0.9,
            max_image_seq_len: 8192,
            shift_terminal: Some(0.02),
            ..Self::default()
        }
    }

    /// The config the Qwen-Image-Lightning LoRAs (8 and 4 steps, CFG off) are published with
    /// (ModelTC/Qwen-Image-Lightning, `generate_with_diffusers.py`, which its README runs):
    /// `base_shift = max_shift = ln 3` — a constant `mu`, i.e. the static shift 3 the LoRAs were
    /// distilled with — and no `shift_terminal`; the rest as shipped.
    pub fn lightning() -> Self {
        Self {
            use_dynamic_shifting: true,
            base_shift: 3f64.ln(),
            max_shift: 3f64.ln(),
            max_image_seq_len: 8192,
            shift_terminal: None,
            ..Self::default()
        }
    }

    /// Reads `scheduler/scheduler_config.json`.
    pub fn from_file(path: &Path) -> std::result::Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| SchedulerError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The pipeline's `calculate_shift`: `mu` linear in the image token count, unclamped.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// The Euler sampler: a config and the current schedule.
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    cfg: FlowMatchEulerConfig,
    /// `steps + 1` sigmas, the last 0.
    sigmas: Vec<f32>,
}

impl FlowMatchEuler {
    /// Checks the config is one this port implements.
    pub fn new(cfg: FlowMatchEulerConfig) -> std::result::Result<Self, SchedulerError> {
        let unsupported = [
            (cfg.invert_sigmas, "invert_sigmas"),
            (cfg.stochastic_sampling, "stochastic_sampling"),
            (cfg.use_karras_sigmas, "use_karras_sigmas"),
            (cfg.use_exponential_sigmas, "use_exponential_sigmas"),
            (cfg.use_beta_sigmas, "use_beta_sigmas"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(SchedulerError::Unsupported(format!("{name} = true")));
        }
        if cfg.max_image_seq_len == cfg.base_image_seq_len && cfg.use_dynamic_shifting {
            return Err(SchedulerError::Unsupported(
                "max_image_seq_len equals base_image_seq_len: mu is undefined".into(),
            ));
        }
        if cfg.shift_terminal.is_some_and(|t| !(0.0..1.0).contains(&t)) {
            return Err(SchedulerError::Unsupported(
                "shift_terminal must be in [0, 1)".into(),
            ));
        }
        Ok(Self {
            cfg,
            sigmas: Vec::new(),
        })
    }

    /// Reads `scheduler_config.json` and checks it.
    pub fn from_file(path: &Path) -> std::result::Result<Self, SchedulerError> {
        Self::new(FlowMatchEulerConfig::from_file(path)?)
    }

    /// The config.
    pub fn config(&self) -> &FlowMatchEulerConfig {
        &self.cfg
    }

    /// Builds the schedule for `steps` steps over an image of `image_seq_len` packed tokens.
    pub fn set_timesteps(&mut self, steps: usize, image_seq_len: usize) -> Result<()> {
        if steps == 0 {
            bail!("at least one step is needed");
        }
        let n = steps as f64;
        // np.linspace(1.0, 1/N, N) in f64, then float32.
        // numpy: y = i·step + start, and the endpoint set exactly.
        let step = if steps > 1 {
            (1.0 / n - 1.0) / (n - 1.0)
        } else {
            0.0
        };
        let base: Vec<f32> = (0..steps)
            .map(|i| if i + 1 == steps { 1.0 / n } else { i as f64 * step + 1.0 } as f32)
            .collect();
        let mut sigmas: Vec<f32> = if self.cfg.use_dynamic_shifting {
            let mu = self.cfg.mu(image_seq_len);
            // f32 arithmetic with the f64 shift rounded to f32, as numpy does for an f32 array.
            let e = match self.cfg.time_shift_type {
                TimeShift::Exponential => mu.exp() as f32,
                TimeShift::Linear => mu as f32,
            };
            base.iter().map(|&s| e / (e + (1.0 / s - 1.0))).collect()
        } else {
            let k = self.cfg.shift as f32;
            base.iter()
                .map(|&s| k * s / (1.0 + (k - 1.0) * s))
                .collect()
        };
        if let Some(terminal) = self.cfg.shift_terminal {
            let last = 1.0 - sigmas[steps - 1];
            let scale = last / (1.0 - terminal as f32);
            for s in &mut sigmas {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        sigmas.push(0.0);
        self.sigmas = sigmas;
        Ok(())
    }

    /// `steps + 1` sigmas of the current schedule (the last is 0); empty before `set_timesteps`.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The model timesteps `σ · num_train_timesteps` for each step (not the final 0).
    pub fn timesteps(&self) -> Vec<f32> {
        let k = self.cfg.num_train_timesteps as f32;
        self.sigmas.iter().take(self.len()).map(|s| s * k).collect()
    }

    /// The transformer's `timestep` input for step `i`, `[batch]` in `dtype`: as the reference
    /// pipeline forms it, `t = σ_i · 1000` cast to `dtype`, then divided by 1000 in `dtype` (so a
    /// bf16 model sees sigma rounded twice).
    pub fn model_timestep(
        &self,
        i: usize,
        batch: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let Some(&t) = self.timesteps().get(i) else {
            bail!("step {i} is outside a schedule of {} steps", self.len());
        };
        let t = Tensor::full(t, batch, device)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?;
        // A true division (not × 0.001), evaluated in f32 and rounded once, as PyTorch does.
        let k = Tensor::full(self.cfg.num_train_timesteps as f32, batch, device)?;
        (t / k)?.to_dtype(dtype)
    }

    /// Number of steps in the schedule.
    pub fn len(&self) -> usize {
        self.sigmas.len().saturating_sub(1)
    }

    /// Whether no schedule is set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Euler step `i`: `sample + (σ_{i+1} − σ_i) · velocity`, returned in the velocity's dtype.
    pub fn step(&self, velocity: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        if i >= self.len() {
            bail!("step {i} is outside a schedule of {} steps", self.len());
        }
        if velocity.dims() != sample.dims() {
            bail!(
                "velocity {:?} and sample {:?} differ",
                velocity.dims(),
                sample.dims()
            );
        }
        let dtype = velocity.dtype();
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        // dt · v rounds to v's dtype (a 0-d tensor does not promote), the sum is in f32.
        let dv = (velocity.to_dtype(DType::F32)? * f64::from(dt))?.to_dtype(dtype)?;
        (sample.to_dtype(DType::F32)? + dv.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_schedule_ends_at_the_terminal_then_zero() {
        let mut s = FlowMatchEuler::new(FlowMatchEulerConfig::qwen_image()).unwrap();
        s.set_timesteps(50, 4096).unwrap();
        let sig = s.sigmas();
        assert_eq!(sig.len(), 51);
        assert_eq!(sig[0], 1.0);
        assert!((sig[49] - 0.02).abs() < 1e-6 && sig[50] == 0.0);
        assert!((s.config().mu(4096) - 0.693_548_387).abs() < 1e-8);
        assert!(
            s.step(
                &Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap(),
                &Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap(),
                50
            )
            .is_err()
        );
    }

    #[test]
    fn unsupported_settings_are_rejected() {
        let cfg = FlowMatchEulerConfig {
            use_karras_sigmas: true,
            ..FlowMatchEulerConfig::qwen_image()
        };
        assert!(FlowMatchEuler::new(cfg).is_err());
    }
}
