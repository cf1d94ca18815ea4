//! Starting a node from a data folder: identity, `config.toml`, the ledger, and the command
//! line's overrides become validated [`NodeOptions`]. Everything is checked before anything
//! starts; errors name the flag or config key.

use std::path::PathBuf;
use std::sync::Arc;

use libp2p::Multiaddr;
use pixmarket_ledger::Ledger;
use pixmarket_protocol::MicroTokens;

use crate::config::ConfigError;
use crate::data_dir::{DataDir, DataDirError};
use crate::engine_generator::{CachingSettings, EngineGenerator, resolve_model};
use crate::generator::{GenError, Generator};
use crate::network::NetConfig;
use crate::node::{Node, NodeError, NodeOptions};
use crate::provider::ProviderSettings;

/// What the command line may change for one run.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Sell generation.
    pub provide: bool,
    /// Model folder or `tiny` (overrides `provider.model`).
    pub model: Option<String>,
    /// Devices to serve on, one worker each (replace `provider.devices` when non-empty).
    pub devices: Vec<String>,
    /// Listen addresses (replace `listen` when non-empty).
    pub listen: Vec<String>,
    /// Extra bootstrap peers (added to `bootstrap`).
    pub bootstrap: Vec<String>,
    /// `HOST:PORT` for metrics (overrides `metrics`).
    pub metrics: Option<String>,
    /// Turn mDNS off.
    pub no_mdns: bool,
    /// A short-lived client (e.g. one `generate`): listens only on ports the system picks
    /// (hole punching dials from a listening port), without mDNS.
    pub client_only: bool,
    /// Serve as a relay (overrides `relay`).
    pub relay: bool,
    /// Ask the router for a port mapping (overrides `upnp`).
    pub upnp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{flag} {value:?} is not a libp2p multiaddress (e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW…)"
    )]
    Addr { flag: &'static str, value: String },
    #[error("{flag} {value:?} is not HOST:PORT (e.g. 127.0.0.1:9464)")]
    HostPort { flag: &'static str, value: String },
    #[error("{flag} {value} must end with /p2p/<peer id>, as `pixmarket node` prints it")]
    NoPeerId { flag: &'static str, value: String },
    #[error(
        "cannot open the ledger in {path} (is another pixmarket process using this data folder?)"
    )]
    Ledger {
        path: PathBuf,
        #[source]
        source: pixmarket_ledger::OpenError,
    },
    #[error("ledger")]
    Books(#[from] pixmarket_ledger::LedgerError),
    /// `value` is what was wrong, already quoted where it is a name.
    #[error("{flag} {value}: {allowed}")]
    Device {
        flag: &'static str,
        value: String,
        allowed: String,
    },
    #[error("cannot load the model: {0}")]
    Model(GenError),
    #[error("cannot load the model on {device}: {source}")]
    ModelOn { device: String, source: GenError },
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl LaunchError {
    /// Whether the error is in a command-line value (a flag), not in the data folder, the
    /// config file or the node.
    pub fn is_flag_error(&self) -> bool {
        matches!(
            self,
            LaunchError::Addr { .. }
                | LaunchError::HostPort { .. }
                | LaunchError::NoPeerId { .. }
                | LaunchError::Device { .. }
        )
    }
}

/// The peer id at the end of a provider's address (`…/p2p/12D3KooW…`).
pub fn peer_id_of(flag: &'static str, addr: &str) -> Result<libp2p::PeerId, LaunchError> {
    let ma: Multiaddr = addr.parse().map_err(|_| LaunchError::Addr {
        flag,
        value: addr.to_owned(),
    })?;
    match ma.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Ok(peer),
        _ => Err(LaunchError::NoPeerId {
            flag,
            value: addr.to_owned(),
        }),
    }
}

fn addrs(flag: &'static str, values: &[String]) -> Result<Vec<Multiaddr>, LaunchError> {
    values
        .iter()
        .map(|v| {
            v.parse().map_err(|_| LaunchError::Addr {
                flag,
                value: v.clone(),
            })
        })
        .collect()
}

/// Builds and starts a node for `dir` with `overrides`.
pub async fn start(dir: &DataDir, overrides: &Overrides) -> Result<Node, LaunchError> {
    // The command line's values first, so their errors name the flag rather than a config key.
    addrs("--listen", &overrides.listen)?;
    addrs("--bootstrap", &overrides.bootstrap)?;
    if let Some(m) = &overrides.metrics
        && m.parse::<std::net::SocketAddr>().is_err()
    {
        return Err(LaunchError::HostPort {
            flag: "--metrics",
            value: m.clone(),
        });
    }
    if !overrides.devices.is_empty() {
        crate::config::check_devices(&overrides.devices).map_err(
            |crate::config::DeviceError { got, allowed }| LaunchError::Device {
                flag: "--device",
                value: got,
                allowed,
            },
        )?;
    }
    let mut config = dir.config()?;
    if let Some(m) = &overrides.model {
        config.provider.model = m.clone();
    }
    if !overrides.devices.is_empty() {
        config.provider.device = None;
        config.provider.devices = Some(overrides.devices.clone());
    }
    if !overrides.listen.is_empty() {
        config.listen = overrides.listen.clone();
    }
    if overrides.client_only {
        config.listen = vec![
            "/ip4/0.0.0.0/tcp/0".into(),
            "/ip4/0.0.0.0/udp/0/quic-v1".into(),
        ];
    }
    config.relay |= overrides.relay;
    config.upnp |= overrides.upnp;
    config.bootstrap.extend(overrides.bootstrap.iter().cloned());
    if let Some(m) = &overrides.metrics {
        config.metrics = m.clone();
    }
    if overrides.no_mdns || overrides.client_only {
        config.mdns = false;
    }
    config.validate()?;
    let schedule = config.schedule()?;
    let listen = addrs("--listen", &config.listen)?;
    let bootstrap = addrs("--bootstrap", &config.bootstrap)?;
    let metrics = if config.metrics.is_empty() {
        None
    } else {
        config.metrics.parse().ok()
    };
    let key = dir.identity()?;
    let ledger_path = dir.ledger_path();
    let ledger =
        Ledger::open(&ledger_path, key.public()).map_err(|source| LaunchError::Ledger {
            path: ledger_path.clone(),
            source,
        })?;
    let provide = if overrides.provide {
        let credit: MicroTokens = config.provider.new_peer_credit.parse().map_err(
            |e: pixmarket_protocol::TokenAmountError| ConfigError::Invalid {
                key: "provider.new_peer_credit",
                got: config.provider.new_peer_credit.clone(),
                allowed: e.to_string(),
            },
        )?;
        // The config's value wins only when it changed since the ledger last followed it, so
        // `ledger default-credit` is not undone by an unchanged config at the next start.
        let value = config.provider.new_peer_credit.trim();
        if dir.applied_peer_credit().as_deref() != Some(value) {
            if ledger.default_credit()? != credit {
                ledger.set_default_credit(credit)?;
            }
            dir.set_applied_peer_credit(value)?;
        }
        let model_dir =
            resolve_model(&config.provider.model, dir.root()).map_err(LaunchError::Model)?;
        let caching = CachingSettings {
            step_caching: crate::config::parse_step_cache_threshold(
                &config.provider.step_cache_threshold,
            )?,
            serves_exact: config.provider.serve_exact,
            prompt_cache_bytes: config.provider.prompt_cache_bytes,
        };
        let placement = crate::engine_generator::Placement {
            text_encoder_on_cpu: config.provider.text_encoder_on_cpu,
            device_memory_gib: config.provider.device_memory_gib,
        };
        // Each offered LoRA is hashed once; every device offers them all.
        let loras = config
            .provider
            .loras
            .iter()
            .map(|l| {
                crate::engine_loras::OfferedLora::open(
                    &l.name,
                    std::path::Path::new(&l.file),
                    l.lightning,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(LaunchError::Model)?;
        // One engine per device, each with its own copy of the weights, loaded one after the
        // other (loading is bounded by the disk, not the devices).
        let mut generators: Vec<Arc<dyn Generator>> = Vec::new();
        for device in config.provider.device_list() {
            let generator =
                EngineGenerator::load_with(&model_dir, &config.provider.dtype, &device, placement)
                    .and_then(|g| g.with_caching(caching).with_loras(loras.clone()))
                    .map_err(|source| LaunchError::ModelOn {
                        device: device.clone(),
                        source,
                    })?;
            generators.push(Arc::new(generator));
        }
        let settings = ProviderSettings {
            advert_interval: crate::provider::ADVERT_INTERVAL,
            ack_deadline: crate::provider::ACK_DEADLINE,
            schedule,
            max_queue: config.provider.max_queue,
            max_batch: config.provider.max_batch,
            // A first guess for the tiny model on a CPU; replaced by measurement after one job.
            ms_per_standard_image: 60_000,
        };
        Some((generators, settings))
    } else {
        None
    };
    let options = NodeOptions {
        key,
        ledger: Arc::new(ledger),
        net: NetConfig {
            listen,
            bootstrap,
            mdns: config.mdns,
            max_connections: config.max_connections,
            relay_server: config.relay.then_some(crate::network::RelayServerLimits {
                max_circuit_bytes: config.relay_circuit_bytes,
                ..crate::network::RelayServerLimits::default()
            }),
            upnp: config.upnp,
            // A short-lived client is reached over the connection it opens; it needs no relay.
            reserve_on_relays: !overrides.client_only,
            ..NetConfig::default()
        },
        provide,
        metrics,
    };
    let node = Node::start(options).await?;
    tokio::spawn(crate::reach_file::keep_written(
        node.client().clone(),
        dir.root().to_path_buf(),
    ));
    Ok(node)
}
