//! The seam between the market and the model: what a provider needs from an image generator.
//! The real implementation is the Qwen-Image engine ([`crate::engine_generator`]); the tiny
//! model runs the same engine code, so tests exercise the real path.

use std::ops::ControlFlow;

use pixmarket_protocol::{JobParams, Preview, StepCaching};

/// A generator failed (the message is shown to the requester as `FailReason::Engine`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

/// Facts a provider advertises about its model and hardware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorInfo {
    pub model_id: String,
    /// `f32`, `bf16` or `f16`.
    pub precision: String,
    pub device_name: String,
    pub device_memory_mib: u64,
    pub supports_image_to_image: bool,
    pub supports_inpaint: bool,
    /// How jobs that do not require exact computation run.
    pub step_caching: StepCaching,
    /// Whether jobs that require exact computation are run (else refused at the quote).
    pub serves_exact: bool,
}

/// What the generator's caches saved so far (totals since it started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Prompts whose embeddings came from the cache.
    pub prompt_hits: u64,
    /// Prompts the text encoder ran for.
    pub prompt_misses: u64,
    /// Transformer row-forwards that ran every block.
    pub full_forwards: u64,
    /// Row-forwards that ran the first block and reused the rest (step caching).
    pub reused_forwards: u64,
}

/// One step of a [`Generator::generate_previewing`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// Steps finished so far, over the whole call.
    pub step: u32,
    /// Steps the whole call runs.
    pub of: u32,
    /// Previews made at this step: the index of the job in the call, and its preview.
    pub previews: Vec<(usize, Preview)>,
}

/// Runs jobs. Shared between the admission path (token counting) and the worker thread.
pub trait Generator: Send + Sync + 'static {
    fn info(&self) -> GeneratorInfo;

    /// Tokens of the user's prompt in the model tokenizer: the metered prompt length.
    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError>;

    /// The largest width or height this generator's memory allows (with CFG), advertised as
    /// `max_width`/`max_height`; larger jobs are refused at the quote. The protocol's limit
    /// unless a memory plan says less.
    fn max_side(&self) -> u32 {
        pixmarket_protocol::validate::MAX_DIMENSION
    }

    /// Images (with CFG) at `width`×`height` this generator's memory runs in one batch: 0 when
    /// the size does not fit at all, `u32::MAX` when no memory plan bounds it. The provider
    /// refuses a job with more images at the quote and batches no more images together.
    fn max_images(&self, width: u32, height: u32) -> u32 {
        let _ = (width, height);
        u32::MAX
    }

    /// The LoRAs jobs may name, advertised; a job naming another is refused at the quote.
    fn loras(&self) -> Vec<pixmarket_protocol::LoraOffer> {
        Vec::new()
    }

    /// Runs a batch of compatible jobs (same size, steps and mode) and returns, per job, its
    /// PNG images. `progress(step, of)` is called after every step; `Break` cancels.
    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError>;

    /// [`Self::generate`] that also makes previews: job `i` asks for `previews[i]` of its first
    /// image (at the steps [`pixmarket_protocol::preview::preview_steps`] names), and each
    /// step's report carries the ones made at it. A generator that cannot preview runs
    /// [`Self::generate`] and reports none.
    fn generate_previewing(
        &self,
        jobs: &[JobParams],
        previews: &[u8],
        progress: &mut dyn FnMut(StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        let _ = previews;
        self.generate(jobs, &mut |step, of| {
            progress(StepReport {
                step,
                of,
                previews: Vec::new(),
            })
        })
    }

    /// Totals of what the caches saved; a generator without caches reports zeros.
    fn cache_stats(&self) -> CacheStats {
        CacheStats::default()
    }
}
