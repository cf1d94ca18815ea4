//! `pixmarket providers`: join the network briefly and list the providers whose adverts arrive.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pixmarket_node::DataDir;
use pixmarket_node::launch::{self, Overrides};

use super::DataDirArg;

#[derive(Debug, Args)]
pub(crate) struct ProvidersArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Join the network through this peer (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Seconds to listen for adverts (providers publish every 3 s).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    wait: u64,
}

pub(crate) fn run(a: ProvidersArgs) -> anyhow::Result<()> {
    let dir = DataDir::open(&a.data_dir.path()?)?;
    let overrides = Overrides {
        bootstrap: a.bootstrap,
        client_only: true,
        ..Overrides::default()
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let node = launch::start(&dir, &overrides)
            .await
            .context("node failed to start")?;
        tokio::time::sleep(Duration::from_secs(a.wait)).await;
        let list = node.requester().providers();
        if list.is_empty() {
            println!("no provider advertised within {} s", a.wait);
        } else {
            println!(
                "{:<54} {:<22} {:>7} {:>12} {:>6} {:>10}",
                "peer", "model", "dtype", "price factor", "queue", "s/image"
            );
            for p in &list {
                let ad = &p.advert;
                println!(
                    "{:<54} {:<22} {:>7} {:>12} {:>6} {:>10.1}",
                    p.key.to_peer_id(),
                    ad.model_id,
                    ad.precision,
                    pixmarket_protocol::MicroTokens(ad.schedule.price_factor_ppm).to_string(),
                    format!("{}/{}", ad.queue_depth, ad.max_queue),
                    ad.ms_per_standard_image as f64 / 1000.0,
                );
            }
        }
        node.shutdown().await;
        anyhow::Ok(())
    })
}
