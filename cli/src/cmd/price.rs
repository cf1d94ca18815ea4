//! `pixmarket price`: the metering function on the command line, billed on the steps that run
//! (image-to-image and inpaint run ⌈steps × strength⌉ of them), exactly as a provider bills.

use anyhow::Context;
use clap::Args;
use pixmarket_protocol::validate as v;
use pixmarket_protocol::{MeteredUnits, PriceSchedule, effective_steps, metering};

use crate::usage::{out, usage};

#[derive(Debug, Args)]
pub(crate) struct PriceArgs {
    /// Image width in pixels (a multiple of 16 in 64..=2048).
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32)
              .range(i64::from(v::MIN_DIMENSION)..=i64::from(v::MAX_DIMENSION)))]
    width: u32,
    /// Image height in pixels (a multiple of 16 in 64..=2048).
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32)
              .range(i64::from(v::MIN_DIMENSION)..=i64::from(v::MAX_DIMENSION)))]
    height: u32,
    /// Denoising steps of the schedule (1..=100).
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(v::MAX_STEPS)))]
    steps: u32,
    /// Image-to-image or inpaint strength in (0, 1]: ⌈steps × strength⌉ steps run and are
    /// billed [default: text-to-image, every step].
    #[arg(long, value_name = "X", allow_negative_numbers = true,
          value_parser = super::generate::parse_strength)]
    strength: Option<u16>,
    /// Length of the prompt in the model tokenizer's tokens (1..=10000).
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(v::MAX_PROMPT_TOKENS)))]
    prompt_tokens: u32,
    /// Number of images (1..=4).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(v::MAX_IMAGES)))]
    images: u32,
    /// The provider's price factor, a decimal such as 1 or 1.25.
    #[arg(long, default_value = "1", allow_hyphen_values = true)]
    price_factor: String,
    /// The provider's floor on the prompt length.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(v::MAX_PROMPT_TOKENS)))]
    min_prompt_tokens: u32,
}

pub(crate) fn run(a: PriceArgs) -> anyhow::Result<()> {
    let price_factor_ppm = PriceSchedule::parse_factor(&a.price_factor)
        .map_err(|e| usage!("invalid --price-factor: {e}"))?;
    let schedule = PriceSchedule {
        price_factor_ppm,
        min_prompt_tokens: a.min_prompt_tokens,
    };
    let run = effective_steps(a.steps, a.strength);
    let units = MeteredUnits {
        width: a.width,
        height: a.height,
        steps: run,
        prompt_tokens: a.prompt_tokens,
        images: a.images,
    };
    let cost = metering::cost(&units, &schedule)
        .map_err(|e| usage!("{e}"))
        .context("cannot price this job")?;
    if run == a.steps {
        out!("{cost} tokens")?;
    } else {
        out!(
            "{cost} tokens ({run} of {} steps run at this strength)",
            a.steps
        )?;
    }
    Ok(())
}
