//! A pixmarket node: its data folder and configuration, the libp2p network, the provider
//! service that sells generation, and the requester client that buys it.
//!
//! Hooks for testnets (never used by a production node): a provider selection policy
//! ([`requester::Selection`], [`requester::GenerateOptions::max_attempts`]), fault injection on
//! the network ([`network::LinkFaults`] in [`network::NetConfig::faults`]), and an emulated
//! process kill ([`Node::crash`]).

pub mod config;
pub mod data_dir;
pub mod engine_generator;
pub mod engine_loras;
pub mod generator;
pub mod launch;
pub mod metrics;
pub mod network;
pub mod node;
pub mod provider;
pub mod rate_limit;
pub mod reach_file;
pub mod requester;
pub mod token_check;

pub use node::{Node, NodeError, NodeOptions};

/// Milliseconds since the Unix epoch: the protocol's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub use config::{ConfigError, NodeConfig};
pub use data_dir::{DataDir, DataDirError};
