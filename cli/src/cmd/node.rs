//! `pixmarket node`: run a node until Ctrl-C, as a provider with `--provide`.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pixmarket_node::DataDir;
use pixmarket_node::launch::{self, Overrides};

use super::DataDirArg;

#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Sell image generation on this machine.
    #[arg(long)]
    provide: bool,
    /// With --provide: a model folder in the diffusers layout, or `tiny` (the built-in tiny
    /// model, random weights: it draws noise) [default: provider.model in config.toml]
    #[arg(long, value_name = "DIR|tiny", requires = "provide")]
    model: Option<String>,
    /// Listen on this libp2p address (repeatable), e.g. /ip4/0.0.0.0/tcp/4001
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Join the network through this peer (repeatable), e.g. /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW…
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
}

pub(crate) fn run(a: NodeArgs) -> anyhow::Result<()> {
    let dir = DataDir::open(&a.data_dir.path()?)?;
    let overrides = Overrides {
        provide: a.provide,
        model: a.model,
        listen: a.listen,
        bootstrap: a.bootstrap,
        metrics: a.metrics,
        no_mdns: a.no_mdns,
        client_only: false,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let node = launch::start(&dir, &overrides)
            .await
            .context("node failed to start")?;
        println!("peer id: {}", node.client().local_peer_id());
        // Listeners report their bound addresses within moments of starting.
        let mut addrs = Vec::new();
        for _ in 0..50 {
            addrs = node.addresses().await?;
            if !addrs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for addr in &addrs {
            println!("listening on {addr}");
        }
        if node.is_provider() {
            println!("providing: accepting jobs (Ctrl-C stops)");
        }
        if let Some(m) = node.metrics_addr() {
            println!("metrics on http://{m}/metrics");
        }
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")?;
        println!("stopping");
        node.shutdown().await;
        anyhow::Ok(())
    })
}
