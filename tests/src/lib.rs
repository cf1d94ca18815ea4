//! Shared helpers for the end-to-end tests in `tests/tests/`: real nodes (real libp2p on
//! loopback TCP, real sled ledgers in temporary folders, the real engine with the tiny model).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod evil;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use libp2p::Multiaddr;
use pixmarket_ledger::Ledger;
use pixmarket_node::engine_generator::EngineGenerator;
use pixmarket_node::generator::Generator;
use pixmarket_node::network::NetConfig;
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::{DepositNote, MicroTokens, PriceSchedule, PublicKey, SecretKey, Signed};

/// The tiny model, written once per test process and loaded once.
pub fn tiny_generator() -> Arc<dyn Generator> {
    static DIR: OnceLock<(tempfile::TempDir, Arc<EngineGenerator>)> = OnceLock::new();
    let (_, g) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        pixmarket_engine::tiny::ensure_tiny_model(&model).unwrap();
        let g = EngineGenerator::load(&model, "f32", "cpu").unwrap();
        (dir, Arc::new(g))
    });
    g.clone()
}

/// A node with its own folder (kept until drop).
#[derive(Debug)]
pub struct TestNode {
    pub node: Node,
    pub key: PublicKey,
    pub addr: Multiaddr,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    pub fn ledger_path(dir: &Path) -> PathBuf {
        dir.join("ledger")
    }

    /// Starts a node on 127.0.0.1; a provider when `generator` is given.
    pub async fn start(
        seed: u8,
        bootstrap: Vec<Multiaddr>,
        generator: Option<Arc<dyn Generator>>,
    ) -> Self {
        Self::start_with(seed, bootstrap, generator, PriceSchedule::default()).await
    }

    pub async fn start_with(
        seed: u8,
        bootstrap: Vec<Multiaddr>,
        generator: Option<Arc<dyn Generator>>,
        schedule: PriceSchedule,
    ) -> Self {
        Self::start_custom(seed, bootstrap, generator, |s| s.schedule = schedule).await
    }

    /// Starts a node whose provider settings (the defaults below) `adjust` may change.
    pub async fn start_custom(
        seed: u8,
        bootstrap: Vec<Multiaddr>,
        generator: Option<Arc<dyn Generator>>,
        adjust: impl FnOnce(&mut ProviderSettings),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed(&[seed; 32]);
        let public = key.public();
        let ledger = Arc::new(Ledger::open(&Self::ledger_path(dir.path()), public).unwrap());
        let mut settings = ProviderSettings {
            advert_interval: pixmarket_node::provider::ADVERT_INTERVAL,
            ack_deadline: pixmarket_node::provider::ACK_DEADLINE,
            schedule: PriceSchedule::default(),
            max_queue: 8,
            max_batch: 2,
            ms_per_standard_image: 60_000,
        };
        adjust(&mut settings);
        let options = NodeOptions {
            key,
            ledger,
            net: NetConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                bootstrap,
                ..NetConfig::default()
            },
            provide: generator.map(|g| (vec![g], settings)),
            metrics: None,
        };
        let node = Node::start(options).await.unwrap();
        let addr = loop {
            if let Some(a) = node.addresses().await.unwrap().into_iter().next() {
                break a;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        Self {
            node,
            key: public,
            addr,
            dir,
        }
    }

    /// Records on this (provider) node that `peer` prepaid `tokens`.
    pub fn deposit_from(&self, provider_key_seed: u8, peer: PublicKey, tokens: u64) {
        let sk = SecretKey::from_seed(&[provider_key_seed; 32]);
        let note = DepositNote {
            deposit_id: rand_id(),
            account: peer,
            amount: MicroTokens::from_tokens(tokens).unwrap(),
            memo: "test deposit".into(),
            recorded_at_ms: pixmarket_node::now_ms(),
        };
        self.node
            .ledger()
            .deposit(&Signed::sign(&sk, &note).unwrap())
            .unwrap();
    }
}

fn rand_id() -> [u8; 16] {
    pixmarket_protocol::JobId::random().0
}

/// A small text-to-image job the tiny model runs in well under a second (the testnet's own).
pub use pixmarket_testnet::adversary::small_job;
