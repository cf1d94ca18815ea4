//! `pixmarket testnet`: N providers and M requesters in one process, each a real
//! [`pixmarket_node::Node`] with its own key, sled ledger on disk and libp2p swarm on loopback
//! TCP, running a seeded [`Plan`] of jobs, faults and adversaries, then checking every book.
//!
//! Data flow: plan → one task per job at its model time → `Requester::generate` (quote, hold,
//! run, receipt, ack over the network) → a [`JobRecord`]; the fault task kills, restarts and
//! partitions nodes, and sets message loss and delay on the shared [`LinkFaults`]; adversaries
//! join the market as peers of their own. When every job has ended (or the drain limit passes),
//! the nodes stop, and [`crate::books::check`] reads every ledger back.
//!
//! Set-up (starting nodes, deposits, waiting for adverts) is not part of model time: model
//! time zero is the moment the first job may be submitted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use libp2p::{Multiaddr, PeerId};
use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::engine_generator::EngineGenerator;
use pixmarket_node::generator::Generator;
use pixmarket_node::network::NetConfig;
use pixmarket_node::network::faults::LinkFaults;
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::{GenerateOptions, JobProgress, Requester, Selection};
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::{Hash, MicroTokens, PriceSchedule, PublicKey, SecretKey};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::adversary::{Adversary, AdversaryKind};
use crate::books::{self, Books};
use crate::record::{EngineLabel, FaultRecord, JobOutcome, JobRecord, ProviderRecord, RunRecord};
use crate::scenario::{self, FaultSpec, JobMix, Load, Plan, PlanSpec, PlannedFault, PlannedJob};
use crate::sim::{self, BusyLog, GpuKind, ModelClock, Recorded, SimulatedGenerator};

/// Which engine the providers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// The real Qwen-Image code with the built-in tiny model (trained on drawn scenes), on the CPU.
    Tiny,
    /// The timing model of [`crate::sim`].
    Simulated,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Tiny => "tiny",
            EngineKind::Simulated => "simulated",
        }
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(EngineKind::Tiny),
            "simulated" => Ok(EngineKind::Simulated),
            other => Err(format!(
                "engine {other:?}: allowed are tiny (the real model code, the built-in tiny model) \
                 and simulated (a timing model per GPU kind)"
            )),
        }
    }
}

/// How requesters choose providers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectionRule {
    /// The node's market ranking: soonest estimated finish, then price.
    EstimatedFinish,
    /// Uniformly random among the known providers (seeded per job).
    Random,
}

impl SelectionRule {
    pub fn name(self) -> &'static str {
        match self {
            SelectionRule::EstimatedFinish => "estimated finish",
            SelectionRule::Random => "random",
        }
    }
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct TestnetConfig {
    pub name: String,
    pub providers: usize,
    pub requesters: usize,
    pub engine: EngineKind,
    /// Devices of each provider: that many engines and workers on one node, one identity
    /// and one ledger (all of one GPU kind with the simulated engine; CPU workers with the
    /// tiny one).
    pub gpus_per_provider: usize,
    /// GPU kinds of the simulated providers, assigned in turn.
    pub gpu_kinds: Vec<GpuKind>,
    pub load: Load,
    /// Model-time length of the plan.
    pub duration_ms: u64,
    /// Model seconds per wall second (simulated engine only; the tiny engine runs at 1).
    pub speedup: f64,
    pub seed: u64,
    pub faults: FaultSpec,
    pub adversaries: Vec<AdversaryKind>,
    pub selection: SelectionRule,
    /// Where the nodes' data folders (keys are derived from the seed; ledgers on disk) go.
    pub work_dir: PathBuf,
    /// Wall time a job may go without word from its provider before it fails over.
    pub idle_timeout: Duration,
    /// Times a job that every provider tried refused or failed is submitted again.
    pub max_resubmissions: u32,
    /// Model time between resubmissions.
    pub resubmit_after_ms: u64,
    pub max_queue: u32,
    pub max_batch: u32,
    /// Wall time allowed after the plan's end for the last jobs to finish.
    pub drain_limit: Duration,
}

impl TestnetConfig {
    /// A small default: 3 providers, 2 requesters, the tiny engine, a steady minute.
    pub fn new(work_dir: PathBuf) -> Self {
        Self {
            name: "steady".into(),
            providers: 3,
            requesters: 2,
            engine: EngineKind::Tiny,
            gpus_per_provider: 1,
            gpu_kinds: sim::builtin_gpu_kinds(),
            load: Load::Steady { per_minute: 12.0 },
            duration_ms: 60_000,
            speedup: 1.0,
            seed: 1,
            faults: FaultSpec::default(),
            adversaries: Vec::new(),
            selection: SelectionRule::EstimatedFinish,
            work_dir,
            idle_timeout: Duration::from_secs(30),
            max_resubmissions: 20,
            resubmit_after_ms: 30_000,
            max_queue: 16,
            max_batch: 2,
            drain_limit: Duration::from_secs(120),
        }
    }

    /// Checks every setting before anything starts (also done by [`run`]); the errors name the
    /// command-line flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=1000).contains(&self.providers) {
            bail!("--providers {}: allowed is 1..=1000", self.providers);
        }
        if !(1..=pixmarket_node::provider::MAX_DEVICES).contains(&self.gpus_per_provider) {
            bail!(
                "--gpus {}: allowed is 1..={} per provider",
                self.gpus_per_provider,
                pixmarket_node::provider::MAX_DEVICES
            );
        }
        if !(1..=1000).contains(&self.requesters) {
            bail!("--requesters {}: allowed is 1..=1000", self.requesters);
        }
        if self.duration_ms == 0 || self.duration_ms > 7 * scenario::DAY_MS {
            bail!(
                "--duration {} s: allowed is more than 0 and at most 7 days",
                self.duration_ms / 1000
            );
        }
        if !(self.speedup.is_finite() && (1.0..=100_000.0).contains(&self.speedup)) {
            bail!("--speedup {}: allowed is 1 to 100000", self.speedup);
        }
        if self.engine == EngineKind::Tiny && self.speedup != 1.0 {
            bail!(
                "--speedup {} with the tiny engine: the real model code runs in real time, so \
                 only 1 is allowed (use --engine simulated to compress time)",
                self.speedup
            );
        }
        if self.gpu_kinds.is_empty() {
            bail!("the GPU table is empty");
        }
        if self.max_queue == 0 || self.max_batch == 0 {
            bail!("max queue and max batch must be at least 1");
        }
        Ok(())
    }

    pub fn plan_spec(&self) -> PlanSpec {
        PlanSpec {
            seed: self.seed,
            load: self.load.clone(),
            mix: match self.engine {
                EngineKind::Tiny => JobMix::Tiny,
                EngineKind::Simulated => JobMix::Production,
            },
            duration_ms: self.duration_ms,
            requesters: self.requesters,
            providers: self.providers,
            faults: self.faults.clone(),
            adversaries: self
                .adversaries
                .iter()
                .map(|a| a.name().to_owned())
                .collect(),
        }
    }
}

/// A key derived from the seed, so a seed names the same market every time.
fn derived_key(seed: u64, role: &str, index: usize) -> SecretKey {
    let mut material = Vec::new();
    material.extend_from_slice(b"pixmarket testnet key");
    material.extend_from_slice(&seed.to_le_bytes());
    material.extend_from_slice(role.as_bytes());
    material.extend_from_slice(&u64::try_from(index).unwrap_or(0).to_le_bytes());
    SecretKey::from_seed(Hash::of(&material).as_bytes())
}

/// What the providers offer everyone: they extend this much credit to any new requester.
const CREDIT_TOKENS: u64 = 1_000_000;
/// How long a stopping provider's deliveries in flight may still be acknowledged at the end.
const PROVIDER_STOP_GRACE: Duration = Duration::from_secs(3);
/// A provider credits an unacknowledged receipt after this many requester idle timeouts: the
/// requester asks a silent job's status after each, so several lost messages fit.
const ACK_DEADLINE_IDLE_TIMEOUTS: u32 = 6;
/// A request stays valid for at least this many idle timeouts (more when the quoted queue is
/// long): room for lost messages, and about the longest a silent provider keeps a requester
/// from failing over.
const REQUEST_VALIDITY_IDLE_TIMEOUTS: u32 = 12;

struct ProviderSlot {
    name: String,
    index: usize,
    key_seed: (u64, usize),
    folder: PathBuf,
    node: Option<Node>,
    /// `None` only while the provider is down after a kill.
    ledger: Option<Arc<Ledger>>,
    /// One per device.
    generators: Vec<Arc<dyn Generator>>,
    settings: ProviderSettings,
    listen: Multiaddr,
    bootstrap: Vec<Multiaddr>,
}

struct Market {
    providers: Vec<Arc<tokio::sync::Mutex<ProviderSlot>>>,
    provider_keys: Vec<PublicKey>,
    requesters: Vec<(String, PublicKey, Node)>,
    adversaries: Vec<Arc<Adversary>>,
    faults: LinkFaults,
    busy: BusyLog,
    clock: ModelClock,
    records: Vec<ProviderRecord>,
}

fn net_config(listen: Multiaddr, bootstrap: Vec<Multiaddr>, faults: &LinkFaults) -> NetConfig {
    NetConfig {
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

fn open_ledger(folder: &Path, key: &PublicKey) -> anyhow::Result<Arc<Ledger>> {
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    Ok(Arc::new(
        Ledger::open(&folder.join("ledger"), *key)
            .with_context(|| format!("cannot open the ledger in {}", folder.display()))?,
    ))
}

async fn start_provider_node(
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
        net: net_config(listen, slot.bootstrap.clone(), faults),
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

async fn start_market(
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
    let mut bootstrap: Vec<Multiaddr> = Vec::new();
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
            bootstrap: bootstrap.clone(),
        };
        let node = start_provider_node(&slot, slot.listen.clone(), &faults).await?;
        let addr = first_address(&node).await?;
        slot.listen = listen_part(&addr);
        slot.node = Some(node);
        if bootstrap.len() < 2 {
            bootstrap.push(addr);
        }
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
            net: net_config("/ip4/127.0.0.1/tcp/0".parse()?, bootstrap.clone(), &faults),
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
            bootstrap.clone(),
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
    loop {
        let least = requesters
            .iter()
            .map(|(_, _, n)| n.requester().providers().len())
            .min()
            .unwrap_or(0);
        if least >= advertisers {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after {} s a requester knew only {least} of {advertisers} providers",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log(format!("every requester knows all {advertisers} providers"));
    Ok(Market {
        providers,
        provider_keys,
        requesters,
        adversaries,
        faults,
        busy,
        clock,
        records,
    })
}

/// Per job: what the job task learns.
struct JobRun {
    record: JobRecord,
    /// The provider that was paid.
    paid: Option<PeerId>,
    /// Hashes of the images received.
    images: Vec<Hash>,
}

fn lock_opt(m: &Mutex<Option<u64>>) -> Option<u64> {
    *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The record of `job` before anything happened to it: submitted at `submitted_ms`, failed
/// for `reason` unless something better is learnt.
fn unfinished(job: &PlannedJob, submitted_ms: u64, reason: &str) -> JobRecord {
    JobRecord {
        index: job.index,
        requester: job.requester,
        submitted_ms,
        started_ms: None,
        finished_ms: None,
        provider: None,
        attempts: 0,
        resubmissions: 0,
        cost_micros: 0,
        images: job.params.images,
        width: job.params.width,
        height: job.params.height,
        steps: job.params.steps,
        outcome: JobOutcome::Failed {
            reason: reason.to_owned(),
        },
    }
}

/// Runs one planned job to its end: generate through the market, and when every provider
/// tried failed or was busy, submit again later, up to the configured limits.
async fn run_job(
    job: PlannedJob,
    requester: Requester,
    clock: ModelClock,
    t0: u64,
    config: Arc<TestnetConfig>,
) -> JobRun {
    let submitted_ms = clock.now_ms().saturating_sub(t0);
    let mut attempts = 0u32;
    let mut resubmissions = 0u32;
    let started: Arc<Mutex<Option<u64>>> = Arc::default();
    let mut record = unfinished(&job, submitted_ms, "");
    let job_seed = u64::try_from(job.index)
        .unwrap_or(0)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (outcome, paid, images) = loop {
        let selection = match config.selection {
            SelectionRule::EstimatedFinish => Selection::EstimatedFinish,
            SelectionRule::Random => Selection::Random {
                seed: config.seed ^ job_seed ^ u64::from(resubmissions),
            },
        };
        let options = GenerateOptions {
            idle_timeout: config.idle_timeout,
            selection,
            request_validity: config.idle_timeout * REQUEST_VALIDITY_IDLE_TIMEOUTS,
            ..GenerateOptions::default()
        };
        let first_step = started.clone();
        let mut tried = 0u32;
        let mut progress = |p: JobProgress| match p {
            JobProgress::Quoted { .. } => tried += 1,
            JobProgress::Step { .. } => {
                let mut s = first_step
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if s.is_none() {
                    *s = Some(clock.now_ms().saturating_sub(t0));
                }
            }
            _ => {}
        };
        let result = requester
            .generate(job.params.clone(), options, &mut progress)
            .await;
        attempts += tried.max(1);
        match result {
            Ok(o) => {
                record.cost_micros = o.cost.0;
                let images = o.images.iter().map(|i| Hash::of(i)).collect();
                break (JobOutcome::Completed, Some(o.provider), images);
            }
            Err(e) => {
                let now = clock.now_ms().saturating_sub(t0);
                let out_of_time = now > config.duration_ms.saturating_mul(2);
                if resubmissions >= config.max_resubmissions || out_of_time {
                    break (
                        JobOutcome::Failed {
                            reason: e.to_string(),
                        },
                        None,
                        Vec::new(),
                    );
                }
                resubmissions += 1;
                tokio::time::sleep(clock.wall(config.resubmit_after_ms)).await;
            }
        }
    };
    record.finished_ms = Some(clock.now_ms().saturating_sub(t0));
    record.attempts = attempts;
    record.resubmissions = resubmissions;
    record.started_ms = lock_opt(&started);
    record.outcome = outcome;
    JobRun {
        record,
        paid,
        images,
    }
}

/// Peak resident memory of this process (`VmHWM` on Linux), if the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn fault(at_ms: u64, kind: &str, detail: String) -> FaultRecord {
    FaultRecord {
        at_ms,
        kind: kind.into(),
        detail,
    }
}

/// Kills provider `slot` abruptly and, `down_ms` of model time later, restarts it from its
/// data folder with the same key (on the same port when the kernel lets it go).
async fn kill_and_restart(
    slot: Arc<tokio::sync::Mutex<ProviderSlot>>,
    down_ms: u64,
    clock: ModelClock,
    t0: u64,
    faults: LinkFaults,
    out: Arc<Mutex<Vec<FaultRecord>>>,
) {
    let push = |r: FaultRecord| {
        out.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(r);
    };
    let mut s = slot.lock().await;
    let Some(node) = s.node.take() else {
        return;
    };
    let holds = s
        .ledger
        .as_ref()
        .and_then(|l| l.holds().ok())
        .map_or(0, |h| h.len());
    let crashed = node.crash().await;
    // Our handle goes too: the books are reopened from disk, as after a real crash.
    s.ledger = None;
    push(fault(
        clock.now_ms().saturating_sub(t0),
        "kill",
        format!(
            "{} killed with {holds} jobs held{}",
            s.name,
            crashed
                .err()
                .map(|e| format!(" (crash: {e})"))
                .unwrap_or_default()
        ),
    ));
    drop(s);
    tokio::time::sleep(clock.wall(down_ms)).await;
    let mut s = slot.lock().await;
    let key = derived_key(s.key_seed.0, "provider", s.key_seed.1).public();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reopened = loop {
        match open_ledger(&s.folder, &key) {
            Ok(l) => break Ok(l),
            Err(e) if Instant::now() > deadline => break Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let detail = match reopened {
        Err(e) => format!("{} could not reopen its ledger: {e:#}", s.name),
        Ok(ledger) => {
            s.ledger = Some(ledger);
            let mut result = start_provider_node(&s, s.listen.clone(), &faults).await;
            if result.is_err() {
                // The old port may still be held by the kernel; any port will do.
                if let Ok(any) = "/ip4/127.0.0.1/tcp/0".parse() {
                    result = start_provider_node(&s, any, &faults).await;
                }
            }
            match result {
                Ok(node) => {
                    let open = s
                        .ledger
                        .as_ref()
                        .and_then(|l| l.holds().ok())
                        .map_or(0, |h| h.len());
                    s.node = Some(node);
                    format!(
                        "{} restarted from its data folder; {open} holds left open",
                        s.name
                    )
                }
                Err(e) => format!("{} could not restart: {e:#}", s.name),
            }
        }
    };
    push(fault(clock.now_ms().saturating_sub(t0), "restart", detail));
}

/// Runs the faults of the plan at their model times; returns what it did.
async fn inject_faults(
    plan: Plan,
    providers: Vec<Arc<tokio::sync::Mutex<ProviderSlot>>>,
    groups: (BTreeSet<PeerId>, BTreeSet<PeerId>),
    clock: ModelClock,
    t0: u64,
    faults: LinkFaults,
) -> Vec<FaultRecord> {
    let out: Arc<Mutex<Vec<FaultRecord>>> = Arc::default();
    let push = |r: FaultRecord| {
        out.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(r);
    };
    if plan.drop_ppm > 0 {
        match faults.set_drop_ppm(plan.drop_ppm) {
            Ok(()) => push(fault(
                0,
                "drop",
                format!(
                    "every RPC message lost with probability {} ppm",
                    plan.drop_ppm
                ),
            )),
            Err(e) => push(fault(0, "drop", format!("not set: {e}"))),
        }
    }
    if plan.ack_drop_ppm > 0 {
        match faults.set_ack_drop_ppm(plan.ack_drop_ppm) {
            Ok(()) => push(fault(
                0,
                "lose-acks",
                format!(
                    "every message carrying a receipt ack lost with probability {} ppm",
                    plan.ack_drop_ppm
                ),
            )),
            Err(e) => push(fault(0, "lose-acks", format!("not set: {e}"))),
        }
    }
    if let Some((lo, hi)) = plan.delay_ms {
        // Delays are given in model time and applied on the wall clock.
        match faults.set_delay(clock.wall(lo), clock.wall(hi)) {
            Ok(()) => push(fault(
                0,
                "delay",
                format!("every RPC message held {lo}–{hi} ms (model time)"),
            )),
            Err(e) => push(fault(0, "delay", format!("not set: {e}"))),
        }
    }
    let mut tasks = JoinSet::new();
    let mut events: Vec<(u64, &PlannedFault)> = plan
        .faults
        .iter()
        .map(|f| match f {
            PlannedFault::Kill { at_ms, .. } | PlannedFault::Partition { at_ms, .. } => (*at_ms, f),
        })
        .collect();
    events.sort_by_key(|(at, _)| *at);
    for (at, f) in events {
        tokio::time::sleep_until(clock.instant_at(t0 + at).into()).await;
        match f {
            PlannedFault::Kill {
                provider, down_ms, ..
            } => {
                if let Some(slot) = providers.get(*provider) {
                    tasks.spawn(kill_and_restart(
                        slot.clone(),
                        *down_ms,
                        clock,
                        t0,
                        faults.clone(),
                        out.clone(),
                    ));
                }
            }
            PlannedFault::Partition { until_ms, .. } => {
                let (a, b) = (groups.0.clone(), groups.1.clone());
                let detail = format!(
                    "{} peers cut off from {} peers until {} s",
                    a.len(),
                    b.len(),
                    until_ms / 1000
                );
                match faults.partition(vec![a, b]) {
                    Ok(()) => push(fault(
                        clock.now_ms().saturating_sub(t0),
                        "partition",
                        detail,
                    )),
                    Err(e) => push(fault(at, "partition", format!("not set: {e}"))),
                }
                let faults = faults.clone();
                let out = out.clone();
                let until = *until_ms;
                tasks.spawn(async move {
                    tokio::time::sleep_until(clock.instant_at(t0 + until).into()).await;
                    faults.heal();
                    out.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(fault(
                            clock.now_ms().saturating_sub(t0),
                            "heal",
                            "the partition healed".into(),
                        ));
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut list = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    list.sort_by_key(|f| f.at_ms);
    list
}

/// Jobs in flight at once; beyond this, submissions wait (and their wait counts).
const MAX_JOBS_IN_FLIGHT: usize = 4096;

/// Runs one testnet: builds the plan, starts the market, runs the plan, checks the books.
/// `log` receives progress lines as the run goes.
pub async fn run(
    config: &TestnetConfig,
    log: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<RunRecord> {
    config.validate()?;
    let wall_start = Instant::now();
    let plan = scenario::plan(&config.plan_spec())?;
    log(format!(
        "plan {}: {} jobs over {} s of model time, {} faults, {} adversaries (seed {})",
        &plan.hash()[..16],
        plan.jobs.len(),
        plan.duration_ms / 1000,
        plan.faults.len()
            + usize::from(plan.drop_ppm > 0)
            + usize::from(plan.ack_drop_ppm > 0)
            + usize::from(plan.delay_ms.is_some()),
        plan.adversaries.len(),
        plan.seed
    ));
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create {}", config.work_dir.display()))?;
    let market = start_market(config, log).await?;
    let clock = market.clock;
    let t0 = clock.now_ms();
    let shared = Arc::new(config.clone());

    // Partition groups: the first half of the providers with the even requesters, and the rest.
    let mut groups = (BTreeSet::new(), BTreeSet::new());
    for (i, k) in market.provider_keys.iter().enumerate() {
        let split = config.providers / 2;
        if i < split {
            groups.0.insert(k.to_peer_id());
        } else {
            groups.1.insert(k.to_peer_id());
        }
    }
    for (i, (_, k, _)) in market.requesters.iter().enumerate() {
        if i % 2 == 0 {
            groups.0.insert(k.to_peer_id());
        } else {
            groups.1.insert(k.to_peer_id());
        }
    }
    let injector = tokio::spawn(inject_faults(
        plan.clone(),
        market.providers.clone(),
        groups,
        clock,
        t0,
        market.faults.clone(),
    ));

    // Requester-side adversaries attack the honest providers in turn, through the run.
    let mut attacks = JoinSet::new();
    for (i, a) in market.adversaries.iter().enumerate() {
        if a.kind().is_provider() || market.provider_keys.is_empty() {
            continue;
        }
        let target = market.provider_keys[i % market.provider_keys.len()];
        // A hog dials its target itself.
        if let Some(slot) = market.providers.get(i % market.providers.len()) {
            let listen = slot.lock().await.listen.clone();
            a.learn_address(listen.with(libp2p::multiaddr::Protocol::P2p(target.to_peer_id())));
        }
        let a = a.clone();
        attacks.spawn(async move { a.attack(target, 3).await });
    }

    let slots = Arc::new(Semaphore::new(MAX_JOBS_IN_FLIGHT));
    let mut jobs = JoinSet::new();
    let mut last_note = Instant::now();
    let total = plan.jobs.len();
    let mut runs = Vec::with_capacity(total);
    for (n, job) in plan.jobs.iter().cloned().enumerate() {
        tokio::time::sleep_until(clock.instant_at(t0 + job.at_ms).into()).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let requester = market.requesters[job.requester].2.requester().clone();
        let config = shared.clone();
        jobs.spawn(async move {
            let r = run_job(job, requester, clock, t0, config).await;
            drop(permit);
            r
        });
        while let Some(done) = jobs.try_join_next() {
            match done {
                Ok(r) => runs.push(r),
                Err(e) => log(format!("a job task failed: {e}")),
            }
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            last_note = Instant::now();
            log(format!(
                "t = {} s (model): {} of {total} jobs submitted, {} ended",
                clock.now_ms().saturating_sub(t0) / 1000,
                n + 1,
                runs.len()
            ));
        }
    }
    let drain_until = clock.instant_at(t0 + plan.duration_ms) + config.drain_limit;
    let drain_until = drain_until.max(Instant::now() + Duration::from_secs(5));
    loop {
        match tokio::time::timeout_at(drain_until.into(), jobs.join_next()).await {
            Ok(Some(Ok(r))) => runs.push(r),
            Ok(Some(Err(e))) => log(format!("a job task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                log(format!(
                    "{} jobs still running at the drain limit; they count as failed",
                    jobs.len()
                ));
                jobs.abort_all();
                break;
            }
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            last_note = Instant::now();
            log(format!(
                "t = {} s (model): {} of {total} jobs ended",
                clock.now_ms().saturating_sub(t0) / 1000,
                runs.len()
            ));
        }
    }
    let end_ms = clock.now_ms().saturating_sub(t0);
    let faults = injector.await.unwrap_or_default();
    while attacks.join_next().await.is_some() {}
    // Let the last acknowledgements land before the nodes stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    finish(
        config, plan, market, runs, faults, t0, end_ms, wall_start, log,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    config: &TestnetConfig,
    plan: Plan,
    market: Market,
    mut runs: Vec<JobRun>,
    faults: Vec<FaultRecord>,
    t0: u64,
    end_ms: u64,
    wall_start: Instant,
    log: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<RunRecord> {
    let Market {
        providers,
        provider_keys,
        requesters,
        adversaries,
        faults: link_faults,
        busy,
        records,
        ..
    } = market;
    let mut adversary_records: Vec<_> = adversaries.iter().map(|a| a.record()).collect();
    let adversary_keys: Vec<PublicKey> = adversaries.iter().map(|a| a.public()).collect();
    for a in adversaries {
        // The attack tasks have ended, so this is the last handle.
        if let Ok(a) = Arc::try_unwrap(a) {
            a.shutdown().await;
        }
    }
    // Providers stop selling first, with every network still up: deliveries in flight get a
    // grace, receipts never acknowledged are credited back, and each requester then learns the
    // credit notes it missed by asking for its chains, as it would on its next exchange.
    for slot in &providers {
        let s = slot.lock().await;
        if let Some(node) = &s.node {
            node.stop_providing(tokio::time::Instant::now() + PROVIDER_STOP_GRACE)
                .await;
        }
    }
    let mut learned = 0usize;
    for (_, _, node) in &requesters {
        for key in &provider_keys {
            learned += node.requester().sync_chain(key.to_peer_id(), *key).await;
        }
    }
    if learned > 0 {
        log(format!(
            "requesters learned {learned} credit notes at the end"
        ));
    }
    // Nodes stop side by side: each may wait a few seconds for its last responses to go out.
    let mut stopping = JoinSet::new();
    let mut requester_books = Vec::new();
    for (name, key, node) in requesters {
        requester_books.push(Books {
            name,
            key,
            ledger: node.ledger().clone(),
        });
        stopping.spawn(node.shutdown());
    }
    while stopping.join_next().await.is_some() {}
    let mut provider_books = Vec::new();
    for slot in &providers {
        let mut s = slot.lock().await;
        if let Some(node) = s.node.take() {
            stopping.spawn(node.shutdown());
        }
        if let Some(ledger) = s.ledger.clone() {
            provider_books.push(Books {
                name: s.name.clone(),
                key: provider_keys[s.index],
                ledger,
            });
        }
    }
    while stopping.join_next().await.is_some() {}
    let stats = link_faults.stats();
    let mut faults = faults;
    if plan.drop_ppm > 0
        || plan.ack_drop_ppm > 0
        || plan.delay_ms.is_some()
        || !plan.faults.is_empty()
    {
        faults.push(fault(end_ms, "network", format!("{stats:?}")));
    }

    // Jobs aborted at the drain limit have no record of their own.
    let seen: BTreeSet<usize> = runs.iter().map(|r| r.record.index).collect();
    for job in plan.jobs.iter().filter(|j| !seen.contains(&j.index)) {
        runs.push(JobRun {
            record: unfinished(job, job.at_ms, "still running when the run ended"),
            paid: None,
            images: Vec::new(),
        });
    }
    runs.sort_by_key(|r| r.record.index);
    let index_of: BTreeMap<PeerId, usize> = provider_keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.to_peer_id(), i))
        .collect();
    let mut delivered = BTreeSet::new();
    let mut jobs = Vec::with_capacity(runs.len());
    for r in runs {
        delivered.extend(r.images.iter().copied());
        let mut rec = r.record;
        rec.provider = r.paid.and_then(|p| index_of.get(&p).copied());
        jobs.push(rec);
    }
    // What the honest providers' books charge each requester-side adversary: only what it
    // acknowledged (a freerider: nothing).
    for (rec, key) in adversary_records.iter_mut().zip(&adversary_keys) {
        rec.charged_micros = provider_books
            .iter()
            .filter_map(|b| b.ledger.account(Role::Provider, key).ok().flatten())
            .map(|a| a.charged.0)
            .sum();
    }
    let books = tokio::task::spawn_blocking(move || {
        books::check(&provider_books, &requester_books, &delivered, 0)
    })
    .await
    .context("the books check stopped")?;
    log(format!(
        "books: {}",
        if books.ok() { "OK" } else { "FAILED" }
    ));

    let (intervals, _) = busy.snapshot();
    let duration_ms = end_ms.max(plan.duration_ms);
    let busy: Vec<_> = intervals
        .into_iter()
        .filter_map(|mut b| {
            // Model time zero is the plan's start; set-up time is not counted.
            b.start_ms = b.start_ms.saturating_sub(t0);
            b.end_ms = b.end_ms.saturating_sub(t0);
            (b.end_ms > b.start_ms).then_some(b)
        })
        .collect();
    let simulated = config.engine == EngineKind::Simulated;
    Ok(RunRecord {
        name: config.name.clone(),
        engine: EngineLabel {
            kind: config.engine.name().into(),
            simulated,
            note: if simulated {
                format!(
                    "{}; images are flat stand-ins",
                    config
                        .gpu_kinds
                        .first()
                        .map_or("no kinds", |k| k.source.as_str())
                )
            } else {
                "the real Qwen-Image code with the built-in tiny model (trained on drawn \
                 scenes)"
                    .into()
            },
        },
        seed: config.seed,
        plan_hash: plan.hash(),
        speedup: config.speedup,
        duration_ms,
        plan_ms: plan.duration_ms,
        selection: config.selection.name().into(),
        providers: records,
        requesters: config.requesters,
        jobs,
        busy,
        faults,
        adversaries: adversary_records,
        books,
        wall_seconds: wall_start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}
