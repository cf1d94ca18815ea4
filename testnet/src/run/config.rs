//! What a run is given: [`TestnetConfig`], its engine and selection rule, and their checks.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::adversary::AdversaryKind;
use crate::scenario::{self, FaultSpec, JobMix, Load, PlanSpec};
use crate::sim::{self, GpuKind};

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

/// An `--engine` value that names no engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "engine {0:?}: allowed are tiny (the real model code, the built-in tiny model) and simulated \
     (a timing model per GPU kind)"
)]
pub struct UnknownEngine(pub String);

impl std::str::FromStr for EngineKind {
    type Err = UnknownEngine;
    fn from_str(s: &str) -> Result<Self, UnknownEngine> {
        match s {
            "tiny" => Ok(EngineKind::Tiny),
            "simulated" => Ok(EngineKind::Simulated),
            other => Err(UnknownEngine(other.to_owned())),
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
    /// Each node's bound on established connections (the node's `max_connections`).
    pub max_connections: u32,
    /// Wall time between set-up and the plan's start in which no job runs and the loopback
    /// traffic is measured (the market's background: gossip, Kademlia, identify, ping); zero:
    /// none.
    pub quiet_window: Duration,
    /// Whether set-up fails when, at its deadline, some requester does not know every
    /// provider. A run that measures a market past what the machine carries turns this off:
    /// the plan then starts anyway, and the record says how many providers each requester
    /// knew ([`crate::record::NetworkRecord::discovery_known`]).
    pub discovery_must_complete: bool,
}

/// The longest quiet window a run may ask for: a few advert intervals are enough.
pub const MAX_QUIET_WINDOW: Duration = Duration::from_secs(600);

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
            max_connections: pixmarket_node::network::DEFAULT_MAX_CONNECTIONS,
            quiet_window: Duration::ZERO,
            discovery_must_complete: true,
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
        if !(1..=pixmarket_node::config::MAX_MAX_CONNECTIONS).contains(&self.max_connections) {
            bail!(
                "max connections {}: allowed is 1..={}",
                self.max_connections,
                pixmarket_node::config::MAX_MAX_CONNECTIONS
            );
        }
        if self.quiet_window > MAX_QUIET_WINDOW {
            bail!(
                "quiet window {} s: allowed is at most {} s",
                self.quiet_window.as_secs(),
                MAX_QUIET_WINDOW.as_secs()
            );
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
