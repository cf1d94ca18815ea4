//! Qwen-Image in candle: config, weight loading from the diffusers layout, text encoder, MMDiT
//! transformer, VAE, flow-match scheduler, pipelines and the built-in tiny model.
//!
//! Knows nothing of tokens or peers. Model code follows `../shared/reference/qwen-image-spec.md`
//! and is proven against the PyTorch reference by the parity tests in `tests/`.

// Tensor shape arithmetic converts between usize, u32 and f32/f64 constantly; every size is
// validated against the config before it reaches a cast.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

pub mod config;
pub mod device_memory;
pub mod drawn;
pub mod error;
pub mod guidance;
pub mod image_io;
pub mod latents;
pub mod lora;
pub mod lora_quant;
pub mod memory;
pub mod noise;
mod ops;
pub mod pipeline;
pub mod placement;
pub mod preview;
pub mod prompt_meter;
pub mod quant;
pub mod rope;
pub mod scenes;
pub mod scheduler;
pub mod step_cache;
pub mod text_encoder;
pub mod text_encoder_gguf;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod transformer;
pub mod vae;
pub mod vae_tiling;
mod weight_average;
pub mod weights;

pub use error::EngineError;
pub use pipeline::{
    GenerateRequest, GeneratedImage, Mode, Progress, PromptCacheStats, QwenImage, RunStats,
};
pub use step_cache::StepCacheMode;
