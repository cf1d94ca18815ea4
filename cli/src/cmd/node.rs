//! `pixmarket node`: run a node until Ctrl-C, as a provider with `--provide`, serving the HTTP
//! API with `--api`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pixmarket_api::{Api, ApiSettings};
use pixmarket_node::launch::{self, Overrides};
use pixmarket_node::{DataDir, Node};

use super::DataDirArg;
use crate::usage::{out, usage};

#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Sell image generation on this machine.
    #[arg(long)]
    provide: bool,
    /// With --provide: a model folder in the diffusers layout, or `tiny` (the built-in tiny
    /// model, trained on drawn scenes) [default: provider.model in config.toml]
    #[arg(long, value_name = "DIR|tiny", requires = "provide")]
    model: Option<String>,
    /// With --provide: serve on this device (repeatable, one engine and worker each, each
    /// loading its own copy of the weights), e.g. `--device cuda:0 --device cuda:1`
    /// [default: provider.devices in config.toml]
    #[arg(long, value_name = "cpu|cuda|cuda:N", requires = "provide")]
    device: Vec<String>,
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
    /// Serve the HTTP API (OpenAI images, async jobs, operator routes) on HOST:PORT, e.g.
    /// 127.0.0.1:7878; the token is written to <data-dir>/api.token at each start [default:
    /// api in config.toml, empty = off].
    #[arg(long, value_name = "HOST:PORT")]
    api: Option<String>,
    /// Let --api bind an address other than loopback. Anyone who reaches it with a token can
    /// spend this node's credit, and with an admin token change its books, over plain HTTP:
    /// put TLS in front.
    #[arg(long)]
    api_public: bool,
    /// Serve as a relay for nodes behind NAT (on a public address). Circuits carry a hole
    /// punch's coordination only, unless `relay_circuit_bytes` in config.toml allows results.
    #[arg(long)]
    relay: bool,
    /// Ask the router for a port mapping over UPnP.
    #[arg(long)]
    upnp: bool,
}

/// How long a node gives its bootstrap peers to answer before it reports the ones it could not
/// reach: a dial on a LAN or the internet either connects or times out well within it.
const BOOTSTRAP_GRACE: Duration = Duration::from_secs(10);
/// How often the listeners are asked for their bound addresses at start.
const LISTEN_POLL: Duration = Duration::from_millis(20);
/// Listeners report their bound addresses within moments of starting: one second at most.
const LISTEN_POLLS: u32 = 50;

/// The `--bootstrap` addresses whose peer this node is not connected to.
pub(crate) async fn unreached_bootstrap(node: &Node, bootstrap: &[String]) -> Vec<String> {
    let connected = node.client().connected_peers().await.unwrap_or_default();
    bootstrap
        .iter()
        .filter(|b| match launch::peer_id_of("--bootstrap", b) {
            Ok(peer) => !connected.contains(&peer),
            Err(_) => false,
        })
        .cloned()
        .collect()
}

/// Warns on stderr about each `--bootstrap` peer this node could not reach.
pub(crate) async fn report_unreached_bootstrap(node: &Node, bootstrap: &[String]) {
    for b in unreached_bootstrap(node, bootstrap).await {
        if !super::quiet() {
            eprintln!(
                "warning: bootstrap peer {b} is not reachable (is it running, and is the peer id \
                 after /p2p/ its own?)"
            );
        }
    }
}

/// Ctrl-C, listened for from the moment this returns (`tokio::signal::ctrl_c` installs its
/// handler only when first polled, so a signal before that would kill the process).
#[cfg(unix)]
fn interrupt() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sig = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
    Ok(async move {
        sig.recv().await;
    })
}

#[cfg(not(unix))]
fn interrupt() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// The API's settings from `--api`/`--api-public` and config.toml, checked before the node
/// starts; `None` when the API is off.
fn api_settings(a: &NodeArgs, dir: &DataDir) -> anyhow::Result<Option<ApiSettings>> {
    let config = dir.config()?;
    let (flag, text) = match &a.api {
        Some(t) => ("--api", t.clone()),
        None if !config.api.is_empty() => ("api in config.toml", config.api.clone()),
        None => return Ok(None),
    };
    let bind: SocketAddr = text
        .parse()
        .map_err(|_| usage!("{flag} {text:?} is not HOST:PORT (e.g. 127.0.0.1:7878)"))?;
    if !bind.ip().is_loopback() && !a.api_public {
        return Err(usage!(
            "{flag} {bind} is not a loopback address: anyone who can reach it with a token could \
             spend this node's credit and, with an admin token, change its books, over plain \
             HTTP; pass --api-public to bind it anyway (put TLS in front), or use 127.0.0.1:PORT"
        ));
    }
    let mut settings = ApiSettings::new(bind, dir.root().to_owned());
    settings.allow_public = a.api_public;
    settings.named_tokens = config
        .api_tokens
        .iter()
        .map(|t| (t.name.clone(), t.token.clone(), t.scopes.clone()))
        .collect();
    if a.provide {
        // `--device` replaces the config's devices for this run, as the node itself does.
        settings.devices = if a.device.is_empty() {
            config.provider.device_list()
        } else {
            a.device.clone()
        };
    }
    Ok(Some(settings))
}

pub(crate) fn run(a: NodeArgs) -> anyhow::Result<()> {
    let dir = DataDir::open(&a.data_dir.path()?)?;
    let api_settings = api_settings(&a, &dir)?;
    let mut config_bootstrap = dir.config().map(|c| c.bootstrap).unwrap_or_default();
    config_bootstrap.extend(a.bootstrap.iter().cloned());
    let overrides = Overrides {
        provide: a.provide,
        model: a.model,
        devices: a.device,
        listen: a.listen,
        bootstrap: a.bootstrap,
        metrics: a.metrics,
        no_mdns: a.no_mdns,
        client_only: false,
        relay: a.relay,
        upnp: a.upnp,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        // Listen for Ctrl-C before anything is printed: a signal that comes once the node has
        // said "listening" stops it in order instead of killing it.
        let stop = interrupt()?;
        let node = launch::start(&dir, &overrides)
            .await
            .context("node failed to start")?;
        if api_settings.is_none() {
            // This node holds the ledger, so no other node serves this folder: API files here
            // were left by one that was killed, and would send the CLI to a dead port.
            for f in [pixmarket_api::TOKEN_FILE, pixmarket_api::ADDR_FILE] {
                let _ = std::fs::remove_file(dir.root().join(f));
            }
        }
        out!("peer id: {}", node.client().local_peer_id())?;
        let mut addrs = Vec::new();
        for _ in 0..LISTEN_POLLS {
            addrs = node.addresses().await?;
            if !addrs.is_empty() {
                break;
            }
            tokio::time::sleep(LISTEN_POLL).await;
        }
        for addr in &addrs {
            out!("listening on {addr}")?;
        }
        if node.is_provider() {
            out!("providing: accepting jobs (Ctrl-C stops)")?;
        }
        if let Some(m) = node.metrics_addr() {
            out!("metrics on http://{m}/metrics")?;
        }
        let api = match api_settings {
            Some(settings) => {
                // The API buys: its quotes are checked with the tiny model's tokenizer, as the
                // CLI's market `generate` checks them.
                if let Err(e) =
                    pixmarket_node::token_check::count_tokens_of_tiny(node.requester(), &dir)
                {
                    node.shutdown().await;
                    return Err(
                        anyhow::Error::new(e).context("cannot install the tiny model's tokenizer")
                    );
                }
                let public = !settings.bind.ip().is_loopback();
                match Api::start(&node, dir.identity()?, settings).await {
                    Ok(api) => {
                        out!(
                            "api on http://{} (token in {})",
                            api.addr(),
                            dir.root().join(pixmarket_api::TOKEN_FILE).display()
                        )?;
                        if public && !super::quiet() {
                            eprintln!(
                                "warning: the API at {} is reachable from other machines over \
                                 plain HTTP; a token holder can spend this node's credit",
                                api.addr()
                            );
                        }
                        Some(api)
                    }
                    Err(e) => {
                        node.shutdown().await;
                        return Err(anyhow::Error::new(e).context("the API failed to start"));
                    }
                }
            }
            None => None,
        };
        let bootstrap = config_bootstrap;
        tokio::pin!(stop);
        tokio::select! {
            () = &mut stop => {}
            () = tokio::time::sleep(BOOTSTRAP_GRACE) => {
                report_unreached_bootstrap(&node, &bootstrap).await;
                stop.await;
            }
        }
        out!("stopping")?;
        if let Some(api) = api {
            api.shutdown().await;
        }
        node.shutdown().await;
        anyhow::Ok(())
    })
}
