//! `pixmarket providers`: join the network briefly and list the providers whose adverts arrive,
//! each with an address to paste after `generate --peer` and the cost of a standard image.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use pixmarket_node::DataDir;
use pixmarket_node::launch::{self, Overrides};
use pixmarket_node::requester::ProviderEntry;
use pixmarket_protocol::{MeteredUnits, MicroTokens, metering};

use super::DataDirArg;
use crate::usage::out;

/// The standard image the table prices: the reference pipeline's 1024², 50 steps, with the
/// metering function's reference prompt of 100 tokens (100 tokens at a price factor of 1).
const STANDARD: MeteredUnits = MeteredUnits {
    width: 1024,
    height: 1024,
    steps: 50,
    prompt_tokens: 100,
    images: 1,
};
/// How often `--expect` looks at the adverts heard so far.
const ADVERT_POLL: Duration = Duration::from_millis(100);
/// Longest `--wait`: two minutes is 40 advert rounds; anything longer is a `node`'s job.
const MAX_WAIT_S: u32 = 120;

#[derive(Debug, Args)]
pub(crate) struct ProvidersArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Join the network through this peer (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Seconds to listen for adverts (providers publish every 3 s).
    #[arg(long, default_value_t = 5, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_WAIT_S)))]
    wait: u32,
    /// Stop listening as soon as this many providers have advertised (still at most --wait
    /// seconds): for scripts that know how many to expect.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    expect: Option<u32>,
    /// Print the list as a JSON array on stdout.
    #[arg(long)]
    json: bool,
}

/// An address to paste after `--peer`: the first advertised address that a remote machine can
/// dial (not 0.0.0.0 or ::), else a `--bootstrap` address of this provider; with `/p2p/<id>`.
fn address(p: &ProviderEntry, bootstrap: &[Multiaddr]) -> Option<String> {
    let peer = p.key.to_peer_id();
    let unspecified = |a: &Multiaddr| {
        a.iter().any(|c| match c {
            Protocol::Ip4(ip) => ip.is_unspecified(),
            Protocol::Ip6(ip) => ip.is_unspecified(),
            _ => false,
        })
    };
    let advertised = p
        .advert
        .listen_addrs
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .find(|a| !unspecified(a));
    let given = || {
        bootstrap
            .iter()
            .find(|a| matches!(a.iter().last(), Some(Protocol::P2p(id)) if id == peer))
            .cloned()
    };
    let mut addr = advertised.or_else(given)?;
    if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.push(Protocol::P2p(peer));
    }
    Some(addr.to_string())
}

pub(crate) fn run(a: ProvidersArgs) -> anyhow::Result<()> {
    let dir = DataDir::open(&a.data_dir.path()?)?;
    let bootstrap: Vec<Multiaddr> = a.bootstrap.iter().filter_map(|b| b.parse().ok()).collect();
    let overrides = Overrides {
        bootstrap: a.bootstrap.clone(),
        client_only: true,
        ..Overrides::default()
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let list = rt.block_on(async {
        let node = launch::start(&dir, &overrides)
            .await
            .context("node failed to start")?;
        let until = tokio::time::Instant::now() + Duration::from_secs(u64::from(a.wait));
        match a.expect {
            None => tokio::time::sleep_until(until).await,
            Some(n) => {
                let enough = usize::try_from(n).unwrap_or(usize::MAX);
                while node.requester().providers().len() < enough
                    && tokio::time::Instant::now() < until
                {
                    tokio::time::sleep(ADVERT_POLL).await;
                }
            }
        }
        let list = node.requester().providers();
        super::node::report_unreached_bootstrap(&node, &a.bootstrap).await;
        node.shutdown().await;
        anyhow::Ok(list)
    })?;
    let rows: Vec<_> = list
        .iter()
        .map(|p| {
            let standard = metering::cost(&STANDARD, &p.advert.schedule).ok();
            (p, address(p, &bootstrap), standard)
        })
        .collect();
    if a.json {
        let items: Vec<_> = rows
            .iter()
            .map(|(p, addr, standard)| {
                let ad = &p.advert;
                serde_json::json!({
                    "peer": p.key.to_peer_id().to_string(),
                    "address": addr,
                    "model": ad.model_id,
                    "precision": ad.precision,
                    "price_factor": MicroTokens(ad.schedule.price_factor_ppm).to_string(),
                    "min_prompt_tokens": ad.schedule.min_prompt_tokens,
                    "standard_image_cost": standard.map(|c| c.to_string()),
                    "queue_depth": ad.queue_depth,
                    "max_queue": ad.max_queue,
                    "ms_per_standard_image": ad.ms_per_standard_image,
                    "devices": ad.devices.iter().map(|d| serde_json::json!({
                        "name": d.name,
                        "memory_mib": d.memory_mib,
                        "ms_per_standard_image": d.ms_per_standard_image,
                    })).collect::<Vec<_>>(),
                    "image_to_image": ad.supports_image_to_image,
                    "inpaint": ad.supports_inpaint,
                })
            })
            .collect();
        out!("{}", serde_json::Value::Array(items))?;
        return Ok(());
    }
    if rows.is_empty() {
        out!("no provider advertised within {} s", a.wait)?;
        return Ok(());
    }
    let model_w = rows
        .iter()
        .map(|(p, _, _)| p.advert.model_id.chars().count())
        .max()
        .unwrap_or(0)
        .max("MODEL".len());
    out!(
        "{:<model_w$} {:>7} {:>13} {:>8} {:>4} {:>6}  ADDRESS (paste after --peer)",
        "MODEL",
        "DTYPE",
        "STANDARD IMG",
        "QUEUE",
        "GPUS",
        "S/IMG"
    )?;
    for (p, addr, standard) in &rows {
        let ad = &p.advert;
        #[allow(clippy::cast_precision_loss)]
        let seconds = ad.ms_per_standard_image as f64 / 1000.0;
        out!(
            "{:<model_w$} {:>7} {:>13} {:>8} {:>4} {:>6.1}  {}",
            ad.model_id,
            ad.precision,
            standard.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            format!("{}/{}", ad.queue_depth, ad.max_queue),
            ad.device_count(),
            seconds,
            addr.clone()
                .unwrap_or_else(|| format!("/p2p/{} (no address advertised)", p.key.to_peer_id())),
        )?;
    }
    out!(
        "STANDARD IMG: tokens for one 1024² image, 50 steps, a 100-token prompt; GPUS: devices \
         serving, each S/IMG (the fastest's) per standard image"
    )?;
    Ok(())
}
