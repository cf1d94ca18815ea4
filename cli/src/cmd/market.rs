//! The market form of `pixmarket generate` (without `--local`): start a short-lived requester on
//! the data folder's identity and ledger, reach a provider (`--peer`) or the network
//! (`--bootstrap`), buy the image, and write it with the provider, cost and receipt id printed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pixmarket_node::DataDir;
use pixmarket_node::launch::{self, Overrides};
use pixmarket_node::requester::{GenerateOptions, JobProgress};
use pixmarket_protocol::{JobParams, MicroTokens, Mode};

use super::generate::JobArgs;

/// Defaults when buying: the reference pipeline's.
const MARKET_SIDE: u32 = 1024;
const MARKET_STEPS: u32 = 50;
/// How long to wait for provider adverts when no `--peer` is given.
const ADVERT_WAIT: Duration = Duration::from_secs(8);

/// How to buy it.
#[derive(Debug, Args)]
pub(crate) struct MarketArgs {
    /// Buy from this provider: its address with /p2p/<peer id>, as `pixmarket node` prints it.
    #[arg(long, value_name = "MULTIADDR", conflicts_with = "bootstrap")]
    peer: Option<String>,
    /// Join the network through this peer and pick a provider from the adverts (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// The most to pay for the job, in tokens (e.g. 15 or 2.5).
    #[arg(long, value_name = "TOKENS")]
    max_cost: Option<String>,
}

fn params(job: &JobArgs) -> anyhow::Result<JobParams> {
    let read = |flag: &str, p: &PathBuf| {
        std::fs::read(p).with_context(|| format!("cannot read {flag} {}", p.display()))
    };
    // In (0, 1] × 1000, rounded: 0..=1000 fits u16 without loss of sign or range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let strength_permille = match job.strength {
        None => 1000,
        Some(s) if s.is_finite() && s > 0.0 && s <= 1.0 => ((s * 1000.0).round() as u16).max(1),
        Some(s) => bail!("--strength {s} must be in (0, 1]"),
    };
    let mode = match (&job.init_image, &job.mask) {
        (None, _) => Mode::TextToImage,
        (Some(i), None) => Mode::ImageToImage {
            init_image: read("--init-image", i)?,
            strength_permille,
        },
        (Some(i), Some(m)) => Mode::Inpaint {
            init_image: read("--init-image", i)?,
            mask: read("--mask", m)?,
            strength_permille,
        },
    };
    let p = JobParams {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        width: job.width.unwrap_or(MARKET_SIDE),
        height: job.height.unwrap_or(MARKET_SIDE),
        steps: job.steps.unwrap_or(MARKET_STEPS),
        true_cfg_scale: job.true_cfg_scale,
        seed: job.seed.unwrap_or_else(rand::random),
        images: 1,
        mode,
    };
    p.validate()?;
    Ok(p)
}

pub(crate) fn run(job: &JobArgs, market: &MarketArgs, data_dir: PathBuf) -> anyhow::Result<()> {
    let params = params(job)?;
    let max_cost = match &market.max_cost {
        Some(t) => Some(t.parse::<MicroTokens>().context("invalid --max-cost")?),
        None => None,
    };
    let provider = match &market.peer {
        Some(addr) => Some(launch::peer_id_of("--peer", addr)?),
        None if market.bootstrap.is_empty() => {
            bail!(
                "say where to buy: --peer MULTIADDR (a provider) or --bootstrap MULTIADDR (the network), or --local"
            )
        }
        None => None,
    };
    let dir = DataDir::open(&data_dir)?;
    let mut bootstrap = market.bootstrap.clone();
    bootstrap.extend(market.peer.clone());
    let overrides = Overrides {
        bootstrap,
        client_only: true,
        ..Overrides::default()
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let node = launch::start(&dir, &overrides)
            .await
            .context("node failed to start")?;
        if provider.is_none() {
            let until = tokio::time::Instant::now() + ADVERT_WAIT;
            while node.requester().providers().is_empty() && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let bar = ProgressBar::new(u64::from(params.steps));
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message("asking for a quote");
        let mut on_progress = |p: JobProgress| match p {
            JobProgress::Quoted { cost, .. } => bar.set_message(format!("quoted {cost} tokens")),
            JobProgress::Queued { position, .. } => {
                bar.set_message(format!("queued at position {position}"))
            }
            JobProgress::Step { step, of } => {
                bar.set_length(u64::from(of));
                bar.set_position(u64::from(step));
                bar.set_message("generating");
            }
            JobProgress::FailingOver { reason, .. } => {
                bar.println(format!("provider failed ({reason}); trying another"))
            }
        };
        let options = GenerateOptions {
            max_cost,
            provider,
            ..GenerateOptions::default()
        };
        let result = node
            .requester()
            .generate(params, options, &mut on_progress)
            .await;
        bar.finish_and_clear();
        node.shutdown().await;
        let outcome = result?;
        let receipt = outcome.receipt.verify()?;
        std::fs::write(&job.output, &outcome.images[0])
            .with_context(|| format!("cannot write {}", job.output.display()))?;
        println!("wrote {}", job.output.display());
        println!("provider: {}", outcome.provider);
        println!("cost: {} tokens", outcome.cost);
        println!(
            "receipt: job {} (receipt {})",
            receipt.job_id,
            outcome.receipt.digest()
        );
        anyhow::Ok(())
    })
}
