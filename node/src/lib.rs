//! A pixmarket node: its data folder and configuration now; the libp2p swarm, the provider
//! service and the requester client (issue 7) build on these.

pub mod config;
pub mod data_dir;
pub mod network;

pub use config::{ConfigError, NodeConfig};
pub use data_dir::{DataDir, DataDirError};
