//! `pixmarket demo`: a small local market (three providers, one requester, the tiny model) that
//! buys a few images and shows who served them, what they cost, and every ledger's books.

use std::path::PathBuf;

use crate::usage::out;
use anyhow::Context;
use clap::Args;
use pixmarket_testnet::demo::{self, DemoConfig};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Where the nodes' data folders, the tiny model and the images go.
    #[arg(long, value_name = "DIR", default_value = "pixmarket-demo")]
    out: PathBuf,
    /// Images to buy (1..=16).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    jobs: u16,
    /// Denoising steps per image (1..=50) [default: the drawn tiny model's measured default].
    #[arg(long, default_value_t = pixmarket_engine::drawn::DRAWN_STEPS, value_parser = clap::value_parser!(u32).range(1..=50))]
    steps: u32,
}

pub(crate) fn run(a: DemoArgs) -> anyhow::Result<()> {
    let config = DemoConfig {
        out: a.out,
        jobs: usize::from(a.jobs),
        // The size the drawn tiny model was trained at.
        width: pixmarket_engine::drawn::DRAWN_SIDE,
        height: pixmarket_engine::drawn::DRAWN_SIDE,
        steps: a.steps,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = rt
        .block_on(demo::run(&config, &mut |line| {
            let _ = out!("  {line}");
        }))
        .context("demo failed")?;

    // A failed verify is reported whatever happens to stdout (a closed pipe ends the printing).
    let all_ok = report.verified.iter().all(|(_, r)| r.is_ok());
    let printed = (|| -> std::io::Result<()> {
        out!()?;
        out!(
            "{:<4} {:<12} {:>12} {:>8}  prompt",
            "job",
            "provider",
            "cost",
            "seconds"
        )?;
        for (i, j) in report.jobs.iter().enumerate() {
            out!(
                "{:<4} {:<12} {:>12} {:>8.1}  {}",
                i + 1,
                j.provider,
                j.cost.to_string(),
                j.seconds,
                j.prompt
            )?;
        }
        out!()?;
        out!(
            "{:<12} {:<12} {:>12} {:>12} {:>12} {:>12}",
            "ledger of",
            "account",
            "deposits",
            "charged",
            "held",
            "available"
        )?;
        for b in &report.balances {
            out!(
                "{:<12} {:<12} {:>12} {:>12} {:>12} {:>12}",
                b.ledger,
                b.peer,
                b.deposits.to_string(),
                b.charged.to_string(),
                b.held.to_string(),
                b.available.to_string()
            )?;
        }
        out!()?;
        for (name, r) in &report.verified {
            match r {
                Ok(s) => out!("verify {name}: {s}")?,
                Err(e) => out!("verify {name}: FAILED: {e}")?,
            }
        }
        out!()?;
        out!("images: {}", config.out.join("images").display())?;
        out!("done in {:.1} s", report.total_seconds)?;
        out!(
            "The tiny model is trained on drawn scenes: it gets backgrounds right, and the named shape's\n\
             color at its place for more than nine in ten prompts it never saw, the shapes still\n\
             mostly round blobs (engine/README.md has the figures); the market around it is real.\n\
             For real pictures, run a provider with Qwen-Image weights saved by diffusers:\n\
             pixmarket node --provide --model /path/to/Qwen-Image (see README.md)."
        )?;
        Ok(())
    })();
    anyhow::ensure!(all_ok, "a ledger did not verify");
    printed?;
    Ok(())
}
