//! Set-up: derived keys, starting the providers, requesters and adversaries on loopback, and
//! waiting until every requester knows every provider.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use libp2p::Multiaddr;
use pixmarket_ledger::Ledger;
use pixmarket_node::engine_generator::EngineGenerator;
use pixmarket_node::generator::Generator;
use pixmarket_node::network::NetConfig;
use pixmarket_node::network::faults::LinkFaults;
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::{Hash, MicroTokens, PriceSchedule, PublicKey, SecretKey};

use super::config::{EngineKind, TestnetConfig};
use crate::adversary::Adversary;
use crate::record::ProviderRecord;
use crate::sim::{BusyLog, ModelClock, Recorded, SimulatedGenerator};

/// A key derived from the seed, so a seed names the same market every time.
pub(super) fn derived_key(seed: u64, role: &str, index: usize) -> SecretKey {
    let mut material = Vec::new();
    material.extend_from_slice(b"pixmarket testnet key");
    material.extend_from_slice(&seed.to_le_bytes());
    material.extend_from_slice(role.as_bytes());
    material.extend_from_slice(&u64::try_from(index).unwrap_or(0).to_le_bytes());
    SecretKey::from_seed(Hash::of(&material).as_bytes())
}

/// What the providers offer everyone: they extend this much credit to any new requester.
const CREDIT_TOKENS: u64 = 1_000_000;

/// A provider credits an unacknowledged receipt after this many requester idle timeouts: the
/// requester asks a silent job's status after each, so several lost messages fit.
const ACK_DEADLINE_IDLE_TIMEOUTS: u32 = 6;

pub(super) struct ProviderSlot {
    pub(super) name: String,
    pub(super) index: usize,
    pub(super) key_seed: (u64, usize),
    pub(super) folder: PathBuf,
    pub(super) node: Option<Node>,
    /// `None` only while the provider is down after a kill.
    pub(super) ledger: Option<Arc<Ledger>>,
    /// One per device.
    pub(super) generators: Vec<Arc<dyn Generator>>,
    pub(super) settings: ProviderSettings,
    pub(super) listen: Multiaddr,
    pub(super) bootstrap: Vec<Multiaddr>,
    pub(super) max_connections: u32,
}

pub(super) struct Market {
    pub(super) providers: Vec<Arc<tokio::sync::Mutex<ProviderSlot>>>,
    pub(super) provider_keys: Vec<PublicKey>,
    pub(super) requesters: Vec<(String, PublicKey, Node)>,
    pub(super) adversaries: Vec<Arc<Adversary>>,
    pub(super) faults: LinkFaults,
    pub(super) busy: BusyLog,
    pub(super) clock: ModelClock,
    pub(super) records: Vec<ProviderRecord>,
    /// The seed the keys were derived from.
    pub(super) seed: u64,
    /// Wall time from the last requester starting to every requester knowing every provider,
    /// or to set-up's deadline when the run goes on without (see
    /// [`TestnetConfig::discovery_must_complete`]).
    pub(super) discovery: Duration,
    /// The providers each requester knew when set-up's wait ended, and how many advertise.
    pub(super) discovery_known: Vec<usize>,
    pub(super) advertisers: usize,
}

fn net_config(
    listen: Multiaddr,
    bootstrap: Vec<Multiaddr>,
    faults: &LinkFaults,
    max_connections: u32,
) -> NetConfig {
    NetConfig {
        max_connections,
        listen: vec![listen],
        bootstrap,
        faults: Some(faults.clone()),
        // A lost message must fail within the testnet's time scale, not in minutes.
        request_timeout: Duration::from_secs(10),
        ..NetConfig::default()
    }
}

async fn first_address(node: &Node) -> anyhow::Result<Multiaddr> {
    for _ in 0..500 {
        if let Some(a) = node.addresses().await?.into_iter().next() {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("a node did not start listening within 5 s")
}

pub(super) fn open_ledger(folder: &Path, key: &PublicKey) -> anyhow::Result<Arc<Ledger>> {
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    Ok(Arc::new(
        Ledger::open(&folder.join("ledger"), *key)
            .with_context(|| format!("cannot open the ledger in {}", folder.display()))?,
    ))
}

pub(super) async fn start_provider_node(
    slot: &ProviderSlot,
    listen: Multiaddr,
    faults: &LinkFaults,
) -> anyhow::Result<Node> {
    let key = derived_key(slot.key_seed.0, "provider", slot.key_seed.1);
    let Some(ledger) = slot.ledger.clone() else {
        bail!("{} has no open ledger", slot.name);
    };
    Ok(Node::start(NodeOptions {
        key,
        ledger,
        net: net_config(listen, slot.bootstrap.clone(), faults, slot.max_connections),
        provide: Some((slot.generators.clone(), slot.settings.clone())),
        metrics: None,
    })
    .await?)
}

/// Strips `/p2p/...` so the address can be listened on again after a restart.
fn listen_part(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

/// Bootstrap peers a market node gets: two earlier providers, the one just before `i` and the
/// one at half its index (a binary tree over the start order). Each provider is then the
/// bootstrap peer of about three others; when every node bootstrapped from the same two, those
/// two reached their connection bound and denied every later node, which then knew no one (a
/// 90-node market's requesters knew none of its 80 providers).
fn bootstrap_peers(started: &[Multiaddr], i: usize) -> Vec<Multiaddr> {
    let n = started.len().min(i);
    let mut out: Vec<Multiaddr> = Vec::new();
    for j in [n.checked_sub(1), n.checked_sub(1).map(|k| k / 2)]
        .into_iter()
        .flatten()
    {
        if let Some(a) = started.get(j).filter(|a| !out.contains(a)) {
            out.push(a.clone());
        }
    }
    out
}

/// The start position the `i`-th requester or adversary bootstraps as, among `n` providers:
/// spread over the start order so no provider takes them all.
fn spread(i: usize, n: usize) -> usize {
    1 + i.wrapping_mul(7_919).wrapping_add(1) % n.max(1)
}

/// Spread start positions whose bootstrap peers a requester gets (two providers each).
/// A requester starts after every provider, when their gossip meshes are full (a full mesh
/// refuses a newcomer's graft), so it hears adverts only through the IHAVE gossip of the
/// providers it is connected to: with two positions the first requesters of a 90-node market
/// were denied or left out of every mesh and heard no advert; with two and providers closing
/// idle connections to each other (node/src/network/trim.rs), one of ten requesters still knew
/// 3 of 80 providers after 70 s in one run of three. Four gives it about eight.
const REQUESTER_BOOTSTRAP_POSITIONS: usize = 4;

/// A requester's bootstrap peers: those of [`REQUESTER_BOOTSTRAP_POSITIONS`] spread start
/// positions.
fn requester_bootstrap(started: &[Multiaddr], r: usize, requesters: usize) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    for k in 0..REQUESTER_BOOTSTRAP_POSITIONS {
        for a in bootstrap_peers(started, spread(r + k * requesters, started.len())) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

pub(super) async fn start_market(
    config: &TestnetConfig,
    log: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<Market> {
    let model = config.work_dir.join("tiny-model");
    pixmarket_engine::tiny::ensure_tiny_model(&model).context("cannot write the tiny model")?;
    let faults = LinkFaults::new(config.seed);
    let busy = BusyLog::default();
    let clock = ModelClock::start(config.speedup);
    let nodes_dir = config.work_dir.join("nodes");

    let mut providers = Vec::new();
    let mut provider_keys = Vec::new();
    // The requesters count prompt tokens themselves, with the providers' own tokenizers (one
    // per model id), so an inflated quote would be refused.
    let mut counters: BTreeMap<String, Arc<dyn Generator>> = BTreeMap::new();
    let mut records = Vec::new();
    // Every provider's address, in start order: later nodes bootstrap from earlier ones.
    let mut started: Vec<Multiaddr> = Vec::new();
    for i in 0..config.providers {
        let key = derived_key(config.seed, "provider", i).public();
        let name = format!("provider-{}", i + 1);
        let folder = nodes_dir.join(&name);
        let mut generators: Vec<Arc<dyn Generator>> = Vec::new();
        let (mut gpu, mut model_ms) = (String::new(), 0);
        for device in 0..config.gpus_per_provider {
            let (inner, name, ms): (Arc<dyn Generator>, String, u64) = match config.engine {
                EngineKind::Tiny => (
                    Arc::new(
                        EngineGenerator::load(&model, "f32", "cpu")
                            .map_err(|e| anyhow::anyhow!("cannot load the tiny model: {e}"))?,
                    ),
                    "cpu".into(),
                    60_000,
                ),
                EngineKind::Simulated => {
                    let kind = config.gpu_kinds[i % config.gpu_kinds.len()].clone();
                    let (name, ms) = (kind.name.clone(), kind.ms_per_standard_image);
                    (
                        Arc::new(SimulatedGenerator::new(
                            kind,
                            clock,
                            &model.join("tokenizer"),
                        )?),
                        name,
                        ms,
                    )
                }
            };
            (gpu, model_ms) = (name, ms);
            let generator: Arc<dyn Generator> =
                Arc::new(Recorded::new(inner, (i, device), clock, busy.clone()));
            counters
                .entry(generator.info().model_id)
                .or_insert_with(|| generator.clone());
            generators.push(generator);
        }
        let settings = ProviderSettings {
            schedule: PriceSchedule {
                price_factor_ppm: 1_000_000,
                min_prompt_tokens: 0,
            },
            max_queue: config.max_queue,
            max_batch: config.max_batch,
            // Gossip grows with providers × nodes: a big market on one machine publishes less
            // often (the advert lifetime is 30 s, so 10 s still leaves room for a lost one).
            advert_interval: if config.providers > 20 {
                Duration::from_secs(10)
            } else {
                pixmarket_node::provider::ADVERT_INTERVAL
            },
            // A requester asks for a silent job's status after its idle timeout; a few rounds
            // of that (with lost messages) fit before a receipt is credited back.
            ack_deadline: config.idle_timeout * ACK_DEADLINE_IDLE_TIMEOUTS,
            // The provider measures wall time; it starts from the model's figure.
            ms_per_standard_image: (u64::try_from(clock.wall(model_ms).as_millis())
                .unwrap_or(u64::MAX))
            .max(1),
        };
        let ledger = open_ledger(&folder, &key)?;
        ledger.set_default_credit(
            MicroTokens::from_tokens(CREDIT_TOKENS).context("credit amount")?,
        )?;
        let mut slot = ProviderSlot {
            name: name.clone(),
            index: i,
            key_seed: (config.seed, i),
            folder,
            node: None,
            ledger: Some(ledger),
            generators,
            settings,
            listen: "/ip4/127.0.0.1/tcp/0".parse()?,
            bootstrap: bootstrap_peers(&started, i),
            max_connections: config.max_connections,
        };
        let node = start_provider_node(&slot, slot.listen.clone(), &faults).await?;
        let addr = first_address(&node).await?;
        slot.listen = listen_part(&addr);
        slot.node = Some(node);
        started.push(addr);
        records.push(ProviderRecord {
            index: i,
            name,
            peer: key.to_peer_id().to_string(),
            gpu,
            gpus: u32::try_from(config.gpus_per_provider).unwrap_or(u32::MAX),
            price_factor_ppm: 1_000_000,
            ms_per_standard_image: model_ms,
        });
        provider_keys.push(key);
        providers.push(Arc::new(tokio::sync::Mutex::new(slot)));
    }
    log(format!("{} providers up", config.providers));

    let mut requesters = Vec::new();
    for r in 0..config.requesters {
        let secret = derived_key(config.seed, "requester", r);
        let key = secret.public();
        let name = format!("requester-{}", r + 1);
        let ledger = open_ledger(&nodes_dir.join(&name), &key)?;
        let node = Node::start(NodeOptions {
            key: secret,
            ledger,
            net: net_config(
                "/ip4/127.0.0.1/tcp/0".parse()?,
                requester_bootstrap(&started, r, config.requesters),
                &faults,
                config.max_connections,
            ),
            provide: None,
            metrics: None,
        })
        .await?;
        for (model, g) in &counters {
            let g = g.clone();
            node.requester().count_tokens_with(
                model.clone(),
                Arc::new(move |p: &str| g.count_prompt_tokens(p).ok()),
            );
        }
        requesters.push((name, key, node));
    }
    log(format!("{} requesters up", config.requesters));
    let requesters_up = Instant::now();

    let mut adversaries = Vec::new();
    for (i, kind) in config.adversaries.iter().enumerate() {
        let generator: Arc<dyn Generator> = Arc::new(SimulatedGenerator::new(
            config.gpu_kinds[0].clone(),
            clock,
            &model.join("tokenizer"),
        )?);
        let a = Adversary::start(
            *kind,
            format!("{}-{}", kind.name(), i + 1),
            derived_key(config.seed, "adversary", i),
            bootstrap_peers(&started, spread(i, started.len())),
            generator,
        )
        .await?;
        adversaries.push(Arc::new(a));
    }
    if !adversaries.is_empty() {
        log(format!("{} adversaries joined", adversaries.len()));
    }

    // Every requester must know every honest provider (and the adversaries that advertise)
    // before the plan starts, or the first jobs all land on whoever was heard first.
    let advertisers = config.providers
        + config
            .adversaries
            .iter()
            .filter(|a| a.is_provider())
            .count();
    let limit = Duration::from_secs(30 + u64::try_from(config.providers / 2).unwrap_or(0));
    let deadline = Instant::now() + limit;
    // The providers each requester knows when the wait ends: the loop's last count, so the
    // record and the log say what the decision to start was made on.
    let discovery_known = loop {
        let known: Vec<usize> = requesters
            .iter()
            .map(|(_, _, n)| n.requester().providers().len())
            .collect();
        let least = known.iter().copied().min().unwrap_or(0);
        if least >= advertisers {
            log(format!(
                "every requester knows all {advertisers} providers ({} ms after the last requester started)",
                requesters_up.elapsed().as_millis()
            ));
            break known;
        }
        if Instant::now() > deadline {
            if !config.discovery_must_complete {
                log(format!(
                    "set-up's {} s are up: the requester knowing fewest knew {least} of {advertisers} providers; the plan starts anyway",
                    limit.as_secs()
                ));
                break known;
            }
            // Each requester's count and connections, so a lone isolated requester is told
            // apart from adverts that reach no one.
            let mut each = Vec::with_capacity(requesters.len());
            for ((name, _, n), k) in requesters.iter().zip(&known) {
                let conns = n.client().connection_count().await.ok();
                each.push(format!("{name}: {k} known, {conns:?} connections"));
            }
            bail!(
                "after {} s a requester knew only {least} of {advertisers} providers ({})",
                limit.as_secs(),
                each.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let discovery = requesters_up.elapsed();
    Ok(Market {
        providers,
        provider_keys,
        requesters,
        adversaries,
        faults,
        busy,
        clock,
        records,
        seed: config.seed,
        discovery,
        discovery_known,
        advertisers,
    })
}
