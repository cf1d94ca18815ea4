//! `pixmarket price`: the metering function on the command line.

use anyhow::Context;
use clap::Args;
use pixmarket_protocol::{MeteredUnits, PriceSchedule, metering};

#[derive(Debug, Args)]
pub(crate) struct PriceArgs {
    /// Image width in pixels (a multiple of 16 in 64..=2048).
    #[arg(long)]
    width: u32,
    /// Image height in pixels (a multiple of 16 in 64..=2048).
    #[arg(long)]
    height: u32,
    /// Denoising steps (1..=100).
    #[arg(long)]
    steps: u32,
    /// Length of the prompt in the model tokenizer's tokens.
    #[arg(long)]
    prompt_tokens: u32,
    /// Number of images (1..=4).
    #[arg(long, default_value_t = 1)]
    images: u32,
    /// The provider's price factor, a decimal such as 1 or 1.25.
    #[arg(long, default_value = "1")]
    price_factor: String,
    /// The provider's floor on the prompt length.
    #[arg(long, default_value_t = 0)]
    min_prompt_tokens: u32,
}

pub(crate) fn run(a: PriceArgs) -> anyhow::Result<()> {
    let price_factor_ppm =
        PriceSchedule::parse_factor(&a.price_factor).context("invalid --price-factor")?;
    let schedule = PriceSchedule {
        price_factor_ppm,
        min_prompt_tokens: a.min_prompt_tokens,
    };
    let units = MeteredUnits {
        width: a.width,
        height: a.height,
        steps: a.steps,
        prompt_tokens: a.prompt_tokens,
        images: a.images,
    };
    let cost = metering::cost(&units, &schedule)?;
    println!("{cost} tokens");
    Ok(())
}
