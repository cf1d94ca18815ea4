//! What a testnet run records, as plain data: the plan's identity, every job as its requester
//! saw it, every busy interval of every provider's engine, the faults injected, what each
//! adversary tried and got, and the books check. [`crate::report`] turns a record into the
//! terminal table, the JSON file and the chart.
//!
//! Times are milliseconds of *model time* since the run started. With the tiny engine model
//! time is wall time; with the simulated engine it is wall time × `speedup` (the simulated
//! GPU's seconds per real second), and every report says so.

use serde::{Deserialize, Serialize};

/// The engine the providers ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineLabel {
    /// `tiny` (the real Qwen-Image code with the built-in tiny model) or `simulated`.
    pub kind: String,
    /// True when the providers' GPU time is a timing model, not a model run.
    pub simulated: bool,
    /// One line for the reader: what the engine is and where its figures come from.
    pub note: String,
}

/// One provider of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderRecord {
    pub index: usize,
    pub name: String,
    /// The libp2p peer id.
    pub peer: String,
    /// The GPU kind it advertises (`cpu` for the tiny engine).
    pub gpu: String,
    /// Its devices (of that kind), one worker each.
    #[serde(default = "one")]
    pub gpus: u32,
    pub price_factor_ppm: u64,
    /// Model-time milliseconds for one standard image (1024², 50 steps) on this provider.
    pub ms_per_standard_image: u64,
}

/// How one job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum JobOutcome {
    /// Images received, receipt checked, stored and acknowledged.
    Completed,
    /// Nothing delivered and nothing paid; the requester's last word on why.
    Failed { reason: String },
}

/// One job, as its requester saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Position in the plan.
    pub index: usize,
    pub requester: usize,
    /// When the requester submitted it.
    pub submitted_ms: u64,
    /// When the first denoising step was reported (the end of its wait), if it started.
    pub started_ms: Option<u64>,
    /// When it completed or finally failed.
    pub finished_ms: Option<u64>,
    /// The provider that was paid (index into `RunRecord::providers`), or `None`. An
    /// adversary that was tried but not paid never appears here.
    pub provider: Option<usize>,
    /// Providers tried across every submission of this job (1 when the first one served it).
    pub attempts: u32,
    /// Times the job was submitted again after every provider tried had failed or was busy.
    pub resubmissions: u32,
    /// What the requester paid, in micro-tokens (0 unless completed).
    pub cost_micros: u64,
    /// Its images came only when asked again after the fetch deadline, so it had been marked
    /// undelivered in the requester's books, then delivered late.
    #[serde(default)]
    pub delivered_late: bool,
    pub images: u32,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub outcome: JobOutcome,
}

impl JobRecord {
    /// Whether some provider failed it or it had to be resubmitted before it ended.
    pub fn retried(&self) -> bool {
        self.attempts > 1 || self.resubmissions > 0
    }
}

/// A stretch of time one provider's engine was running a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusyInterval {
    pub provider: usize,
    /// Which of the provider's devices ran the batch.
    #[serde(default)]
    pub device: usize,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// A fault the testnet injected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub at_ms: u64,
    /// `kill`, `restart`, `drop`, `delay`, `partition` or `heal`.
    pub kind: String,
    pub detail: String,
}

/// What one adversary tried and what it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdversaryRecord {
    pub name: String,
    /// `overcharger`, `replayer`, `forger`, `silent` or `freerider`.
    pub kind: String,
    /// Cheats attempted (deliveries, replays, forged requests, jobs swallowed).
    pub attempts: u32,
    /// Of those, how many the honest nodes refused or routed around.
    pub refused: u32,
    /// Micro-tokens honest nodes paid it (for a provider) or charged it for cheating requests
    /// beyond what it legitimately bought (for a requester). Zero when the market held.
    pub gained_micros: u64,
    /// Images it received that it never acknowledged (a freerider's take). Zero when the
    /// market held.
    #[serde(default)]
    pub images_received: u32,
    /// What the honest providers' books charge it at the end (a requester-side adversary):
    /// what it acknowledged, nothing else.
    #[serde(default)]
    pub charged_micros: u64,
    pub detail: String,
}

/// The books check over every ledger of the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BooksCheck {
    /// Requester/provider pairs with any business.
    pub pairs: u32,
    /// Pairs whose two ledgers agree on what was charged and on the last receipt.
    pub pairs_agreeing: u32,
    /// Total providers charged, over every provider ledger, in micro-tokens.
    pub charged_micros: u64,
    /// Total requesters paid, over every requester ledger, in micro-tokens.
    pub paid_micros: u64,
    /// Receipts found (distinct job ids) over every ledger.
    pub receipts: u32,
    /// Job ids charged more than once, or jobs of the plan paid more than once.
    pub double_charged: u32,
    /// Receipts whose image hashes were not all delivered to the requester.
    pub receipts_without_image: u32,
    /// Holds still open after the run settled.
    pub open_holds: u32,
    /// Credit notes over the providers' books (receipts taken back, never a rewind).
    #[serde(default)]
    pub credit_notes: u32,
    /// Pairs whose two chains (receipts and credit notes, in order) are equal entry by entry.
    #[serde(default)]
    pub chains_equal: u32,
    /// Acknowledged receipts whose images never reached the requester.
    #[serde(default)]
    pub undelivered: u32,
    /// Ledgers whose `verify` replay succeeded, of `ledgers`.
    pub ledgers_verified: u32,
    pub ledgers: u32,
    /// Every inconsistency, one line each.
    pub problems: Vec<String>,
}

impl BooksCheck {
    /// Whether the books are clean.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
            && self.pairs_agreeing == self.pairs
            && self.charged_micros == self.paid_micros
            && self.double_charged == 0
            && self.receipts_without_image == 0
            && self.open_holds == 0
            && self.chains_equal == self.pairs
            && self.undelivered == 0
            && self.ledgers_verified == self.ledgers
    }
}

/// Everything one run recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// What ran, e.g. `steady` or `experiment: estimated finish`.
    pub name: String,
    pub engine: EngineLabel,
    pub seed: u64,
    /// Hex blake3 of the plan (workload, faults, adversaries): equal seeds give equal plans.
    pub plan_hash: String,
    /// Model-time seconds per wall second (1 for the tiny engine).
    pub speedup: f64,
    /// Model-time length of the run, from start to the last job's end.
    pub duration_ms: u64,
    /// Model-time length of the plan (when jobs are submitted); 0 in records from before.
    #[serde(default)]
    pub plan_ms: u64,
    /// How the requesters chose providers: `estimated finish` or `random`.
    pub selection: String,
    pub providers: Vec<ProviderRecord>,
    pub requesters: usize,
    pub jobs: Vec<JobRecord>,
    pub busy: Vec<BusyInterval>,
    pub faults: Vec<FaultRecord>,
    pub adversaries: Vec<AdversaryRecord>,
    pub books: BooksCheck,
    /// Wall-clock seconds the run took, set-up included.
    pub wall_seconds: f64,
    /// Peak resident memory of the whole process (`VmHWM`), when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Connections, memory, advert propagation and gossip traffic of the market's nodes.
    #[serde(default)]
    pub network: NetworkRecord,
}

/// What the market's network looked like, sampled by [`crate::run`] while the plan ran.
/// Nodes are the honest providers and requesters (adversaries are not counted).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// Providers and requesters.
    pub nodes: usize,
    /// Each node's configured bound on established connections.
    pub max_connections: u32,
    /// One per sample: each running node's established connections, as its swarm counts them.
    pub connection_samples: Vec<ConnectionSample>,
    /// Each running node's established connections when the last job had ended, before any
    /// node stopped.
    pub final_connections: Vec<u32>,
    /// Wall milliseconds from a provider dating an advert (`issued_at_ms`, just before it is
    /// signed and published) to a requester's table holding it: one sample per requester,
    /// provider and advert sequence number seen (the sampler sees the latest advert of each
    /// provider at each sample; one replaced between two samples is not counted).
    pub advert_delay_ms: Vec<u64>,
    /// Wall milliseconds from the last requester starting to every requester knowing every
    /// provider (discovery through bootstrap, Kademlia and the gossip mesh).
    pub discovery_ms: u64,
    /// The providers each requester knew when set-up's wait ended, out of
    /// `discovery_providers`: all of them unless the run was let go on without (see
    /// `TestnetConfig::discovery_must_complete`).
    #[serde(default)]
    pub discovery_known: Vec<usize>,
    #[serde(default)]
    pub discovery_providers: usize,
    /// Resident memory of the process before the first node started and once every node had
    /// joined and learnt the market; their difference over `nodes` is the memory per node.
    pub rss_before_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    /// Bytes of one signed advert as gossip carries it (the gossip message's data).
    pub advert_bytes: Option<u64>,
    /// Loopback traffic over a quiet window with no jobs (gossip, Kademlia, identify, ping).
    pub quiet: Option<QuietWindow>,
    /// Adverts the providers published while the plan ran (from their sequence numbers as
    /// the first requester saw them), and the wall time that took.
    pub adverts_during_plan: u64,
    pub plan_wall_ms: u64,
}

/// One sample of every node's connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionSample {
    /// Model time of the sample.
    pub at_ms: u64,
    pub counts: Vec<u32>,
}

/// Loopback bytes over a window of wall time in which no job ran: every node of the market
/// is in this process and talks over loopback, so this is the market's background traffic
/// (each byte counted once, as received), framing and TCP/IP headers included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietWindow {
    pub wall_ms: u64,
    pub loopback_bytes: u64,
    pub loopback_packets: u64,
    /// Adverts the providers published in the window (their advert interval over the window,
    /// counted from the adverts' sequence numbers at the window's two ends).
    pub adverts_published: u64,
}

/// The utilization experiment: the same bursty load on several fleets and selection rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRecord {
    /// What the arms are and how to read them.
    pub note: String,
    pub arms: Vec<RunRecord>,
    /// The offered load over the day: (model-time ms at the bucket start, jobs submitted).
    pub offered: Vec<(u64, u32)>,
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Records written before providers had several devices had one each.
fn one() -> u32 {
    1
}
