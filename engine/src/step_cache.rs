//! Step caching in the denoising loop (first-block cache): a transformer call runs its first
//! block, and each row whose first-block residual barely changed since that row's last full
//! step reuses the residual the remaining blocks added then, instead of running them again.
//!
//! The rule, per row (a conditional or an unconditional CFG row: each keeps its own cache):
//! - the signal is the relative L1 change of the first block's image-stream residual
//!   (`block_0(x) − x`), `mean|r_t − r_full| / mean|r_full|`, against `r_full` of the row's last
//!   fully computed step (so skips never compare against an approximation);
//! - below the threshold, the row's output before the head is `block_0(x) + R_full`, with
//!   `R_full` what blocks 1.. added at that full step; otherwise the row runs every block and
//!   becomes the new reference;
//! - the first [`WARMUP_STEPS`] steps run and the last step run always compute fully, and no row
//!   reuses more than [`MAX_CONSECUTIVE_REUSES`] steps in a row.
//!
//! [`StepCacheMode::Off`] never goes through here: the pipeline calls the plain forward, so off
//! is the uncached computation exactly.

use candle_core::{DType, Result, Tensor, bail};

/// Steps at the start of a run that always compute fully: the image's layout is decided in the
/// first, high-noise steps, where consecutive inputs differ most.
pub const WARMUP_STEPS: usize = 2;

/// Most consecutive steps one row may reuse before it must compute fully again: bounds the
/// drift a slowly changing signal could accumulate below the threshold.
pub const MAX_CONSECUTIVE_REUSES: u32 = 3;

/// How the denoising loop treats the transformer's work across steps.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum StepCacheMode {
    /// Every step runs every block: the exact computation.
    #[default]
    Off,
    /// First-block cache with this threshold on the relative L1 change (e.g. 0.1). A threshold
    /// of 0 never reuses, but takes the cached path (which then equals `Off` exactly).
    FirstBlock {
        /// Reuse when the change is strictly below this.
        threshold: f32,
    },
}

impl StepCacheMode {
    /// The mode for a threshold given in per-mille (the protocol's unit); 0 is `Off`.
    pub fn from_permille(permille: u16) -> Self {
        if permille == 0 {
            Self::Off
        } else {
            Self::FirstBlock {
                threshold: f32::from(permille) / 1000.0,
            }
        }
    }
}

/// Whether each step of a run may reuse: not the warm-up steps, not the last one. `step` and
/// `last` are indices into the schedule, `first` the first step this run runs.
pub fn may_reuse(step: usize, first: usize, last: usize) -> bool {
    step >= first + WARMUP_STEPS && step < last
}

/// One row's state: the reference signal and residual of its last full step.
#[derive(Debug)]
struct RowState {
    first_residual: Tensor,
    rest_residual: Tensor,
    reuses_in_a_row: u32,
}

/// The per-row caches of one denoising run, and what they saved.
#[derive(Debug)]
pub struct StepCache {
    threshold: f32,
    rows: Vec<Option<RowState>>,
    /// Row-forwards whose remaining blocks ran.
    pub computed: u64,
    /// Row-forwards that reused a residual.
    pub reused: u64,
}

impl StepCache {
    /// An empty cache for a run with this threshold.
    pub fn new(threshold: f32) -> Self {
        Self {
            threshold,
            rows: Vec::new(),
            computed: 0,
            reused: 0,
        }
    }

    /// A run keeps its rows; a call with a different row count is a caller's bug.
    pub(crate) fn ensure_rows(&mut self, rows: usize) -> Result<()> {
        if self.rows.is_empty() {
            self.rows = (0..rows).map(|_| None).collect();
        } else if self.rows.len() != rows {
            bail!(
                "the step cache holds {} rows, the call has {rows}",
                self.rows.len()
            );
        }
        Ok(())
    }

    /// Per row: reuse (true) or compute. `first_residual`: `[B, S_i, dim]`.
    pub(crate) fn decide(&mut self, first_residual: &Tensor, may_reuse: bool) -> Result<Vec<bool>> {
        let rows = self.rows.len();
        let mut out = vec![false; rows];
        if may_reuse {
            for (r, slot) in self.rows.iter_mut().enumerate() {
                let Some(state) = slot else { continue };
                if state.reuses_in_a_row >= MAX_CONSECUTIVE_REUSES {
                    continue;
                }
                let now = first_residual.narrow(0, r, 1)?.to_dtype(DType::F32)?;
                let then = state.first_residual.to_dtype(DType::F32)?;
                let diff = (&now - &then)?.abs()?.mean_all()?.to_scalar::<f32>()?;
                let base = then.abs()?.mean_all()?.to_scalar::<f32>()?;
                if base > 0.0 && diff / base < self.threshold {
                    state.reuses_in_a_row += 1;
                    out[r] = true;
                }
            }
        }
        let reused = out.iter().filter(|&&b| b).count() as u64;
        self.reused += reused;
        self.computed += rows as u64 - reused;
        Ok(out)
    }

    /// Records the full step of `rows` (in order): their first-block residuals and what the
    /// remaining blocks added, `[rows.len(), S_i, dim]` each.
    pub(crate) fn store(
        &mut self,
        rows: &[usize],
        first_residual: &Tensor,
        rest_residual: &Tensor,
    ) -> Result<()> {
        for (k, &r) in rows.iter().enumerate() {
            let Some(slot) = self.rows.get_mut(r) else {
                bail!("step cache row {r} out of range");
            };
            *slot = Some(RowState {
                first_residual: first_residual.narrow(0, k, 1)?,
                rest_residual: rest_residual.narrow(0, k, 1)?,
                reuses_in_a_row: 0,
            });
        }
        Ok(())
    }

    /// The remaining blocks' residual of row `r`'s last full step.
    pub(crate) fn residual(&self, r: usize) -> Result<Tensor> {
        match self.rows.get(r) {
            Some(Some(s)) => Ok(s.rest_residual.clone()),
            _ => bail!("step cache row {r} has no full step to reuse"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_and_last_steps_never_reuse() {
        // A 10-step run from step 0: steps 0, 1 and 9 compute.
        let allowed: Vec<usize> = (0..10).filter(|&i| may_reuse(i, 0, 9)).collect();
        assert_eq!(allowed, (2..9).collect::<Vec<_>>());
        // img2img from step 4 of 10: 4 and 5 warm up, 9 is last.
        let allowed: Vec<usize> = (4..10).filter(|&i| may_reuse(i, 4, 9)).collect();
        assert_eq!(allowed, vec![6, 7, 8]);
    }

    #[test]
    fn permille_zero_is_off() {
        assert_eq!(StepCacheMode::from_permille(0), StepCacheMode::Off);
        assert_eq!(
            StepCacheMode::from_permille(80),
            StepCacheMode::FirstBlock { threshold: 0.08 }
        );
    }
}
