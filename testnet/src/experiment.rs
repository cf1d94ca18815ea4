//! The utilization experiment: the product brief says GPUs bought for a fixed, peak-sized fleet
//! sit under 30 % busy, and that queueing with shared capacity lifts that to about 75 %. One
//! run plays one bursty simulated day of demand, with the same seed and so the same jobs, on
//! three markets side by side (concurrently, so they share the machine's conditions):
//!
//! The requesters are customers in `zones` time zones (3 by default, 8 hours apart), each
//! with its own working day and bursts; that is what sharing buys: one customer's night is
//! another's afternoon.
//!
//! 1. **peak-sized fleet**: what customers buying their own GPUs need: for every zone, enough
//!    heterogeneous simulated GPUs for its highest rate (a burst on top of its peak hour),
//!    summed over the zones (run as one market; selection by estimated finish);
//! 2. **shared fleet, estimated finish**: a fleet sized for the day's *mean* demand at 75 %
//!    busy, requesters choosing by the market's estimated finish time;
//! 3. **shared fleet, random**: the same fleet, requesters choosing uniformly at random.
//!
//! Each arm reports fleet utilization (busy GPU time over fleet time) and the wait and latency
//! percentiles; every arm's books are checked like any run's.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::record::ExperimentRecord;
use crate::run::{self, EngineKind, SelectionRule, TestnetConfig};
use crate::scenario::{self, DAY_MS, Load};
use crate::sim::{GpuKind, as_f64, job_ms};

/// What to run.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    pub out: PathBuf,
    pub seed: u64,
    /// Model seconds per wall second.
    pub speedup: f64,
    /// GPUs of the shared fleet (the peak-sized fleet is derived from the same load).
    pub shared_fleet: usize,
    pub requesters: usize,
    /// Model-time length (one day by default).
    pub duration_ms: u64,
    pub gpu_kinds: Vec<GpuKind>,
    /// The shared fleet's target mean utilization, percent.
    pub target_percent: u32,
    /// Time zones the requesters are spread over (each its own daily curve, shifted).
    pub zones: u32,
}

/// Mean model-time ms of a job of the production mix on `kind`, estimated from a sample plan.
fn mean_job_ms(kind: &GpuKind, seed: u64) -> f64 {
    let spec = scenario::PlanSpec {
        seed,
        load: Load::Steady { per_minute: 60.0 },
        mix: scenario::JobMix::Production,
        duration_ms: 60 * 60_000,
        requesters: 1,
        providers: 1,
        faults: scenario::FaultSpec::default(),
        adversaries: Vec::new(),
    };
    let Ok(plan) = scenario::plan(&spec) else {
        return as_f64(kind.ms_per_standard_image);
    };
    let n = plan.jobs.len().max(1);
    let total: u64 = plan
        .jobs
        .iter()
        .map(|j| job_ms(&j.params, kind.ms_per_standard_image))
        .sum();
    as_f64(total) / as_f64(u64::try_from(n).unwrap_or(1))
}

/// Jobs per model minute a fleet of `n` GPUs (kinds in turn) serves at full load.
fn fleet_rate(kinds: &[GpuKind], n: usize, seed: u64) -> f64 {
    (0..n)
        .map(|i| 60_000.0 / mean_job_ms(&kinds[i % kinds.len()], seed))
        .sum()
}

/// Runs the three arms concurrently and gathers their records.
pub async fn run(
    config: &ExperimentConfig,
    log: &mut (dyn FnMut(String) + Send),
) -> anyhow::Result<ExperimentRecord> {
    if config.gpu_kinds.is_empty() || config.shared_fleet == 0 || config.requesters == 0 {
        anyhow::bail!("the experiment needs GPU kinds, at least one GPU and one requester");
    }
    if !(10..=100).contains(&config.target_percent) {
        anyhow::bail!(
            "target utilization {}%: allowed is 10..=100",
            config.target_percent
        );
    }
    let started = Instant::now();
    let shared_rate = fleet_rate(&config.gpu_kinds, config.shared_fleet, config.seed);
    // Mean demand = target × shared capacity; the curve's mean is `daily_mean + bursts` of its
    // peak, so the peak rate follows.
    let burst_share = 3.0 * 2.0 * 15.0 / (24.0 * 60.0);
    let mean_share = scenario::daily_mean() + burst_share;
    let peak = shared_rate * f64::from(config.target_percent) / 100.0 / mean_share;
    // The highest rate of the day: a burst (+2 × peak) during the peak hour.
    let highest = 3.0 * peak;
    let mut peak_fleet = config.shared_fleet;
    while fleet_rate(&config.gpu_kinds, peak_fleet, config.seed) < highest && peak_fleet < 1000 {
        peak_fleet += 1;
    }
    log(format!(
        "demand peaks at {peak:.2} jobs/min ({highest:.2} in a burst); shared fleet {} GPUs \
         ({shared_rate:.2} jobs/min at full load), peak-sized fleet {peak_fleet} GPUs",
        config.shared_fleet
    ));

    let arm = |name: &str, providers: usize, selection: SelectionRule, folder: &str| {
        let mut c = TestnetConfig::new(config.out.join(folder));
        c.name = name.into();
        c.providers = providers;
        c.requesters = config.requesters;
        c.engine = EngineKind::Simulated;
        c.gpu_kinds = config.gpu_kinds.clone();
        c.load = Load::Daily {
            peak_per_minute: peak,
            zones: config.zones,
        };
        c.duration_ms = config.duration_ms;
        c.speedup = config.speedup;
        c.seed = config.seed;
        c.selection = selection;
        // Queue deep enough that a burst waits in queues rather than being turned away.
        c.max_queue = 256;
        c.max_batch = 1;
        // A queued job hears nothing until it starts; allow for hours of model-time queueing.
        c.idle_timeout = Duration::from_secs(600);
        c.max_resubmissions = 1000;
        c.resubmit_after_ms = 5 * 60_000;
        c.drain_limit = Duration::from_secs(300);
        c
    };
    let arms = [
        arm(
            "peak-sized fleet, estimated finish",
            peak_fleet,
            SelectionRule::EstimatedFinish,
            "peak-sized",
        ),
        arm(
            "shared fleet, estimated finish",
            config.shared_fleet,
            SelectionRule::EstimatedFinish,
            "shared-finish",
        ),
        arm(
            "shared fleet, random choice",
            config.shared_fleet,
            SelectionRule::Random,
            "shared-random",
        ),
    ];
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let mut handles = Vec::new();
    for a in arms {
        let tx = tx.clone();
        handles.push(tokio::spawn(async move {
            let label = a.name.clone();
            run::run(&a, &mut |line| {
                let _ = tx.try_send(format!("[{label}] {line}"));
            })
            .await
        }));
    }
    drop(tx);
    while let Some(line) = rx.recv().await {
        log(line);
    }
    let mut records = Vec::new();
    for h in handles {
        records.push(h.await??);
    }
    let offered = offered_load(&records, config.duration_ms);
    Ok(ExperimentRecord {
        note: format!(
            "One simulated day ({} h) of bursty demand from customers in {} time zones, the \
             same jobs (seed {}) on three markets run side by side. Simulation: GPU time is a timing model per GPU kind \
             ({}); times are model time at {}x wall time. Utilization = busy GPU time / \
             (GPUs × duration).",
            config.duration_ms / 3_600_000,
            config.zones,
            config.seed,
            config
                .gpu_kinds
                .first()
                .map_or("no kinds", |k| k.source.as_str()),
            config.speedup
        ),
        arms: records,
        offered,
        wall_seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes: run::peak_rss_bytes(),
    })
}

/// Jobs submitted per model hour (from the first arm: every arm runs the same plan).
fn offered_load(records: &[crate::record::RunRecord], duration_ms: u64) -> Vec<(u64, u32)> {
    let hours = duration_ms.div_ceil(3_600_000).max(1);
    let mut buckets = vec![0u32; usize::try_from(hours).unwrap_or(1)];
    if let Some(first) = records.first() {
        for j in &first.jobs {
            let h = usize::try_from(j.submitted_ms / 3_600_000).unwrap_or(usize::MAX);
            if let Some(b) = buckets.get_mut(h) {
                *b += 1;
            }
        }
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(h, n)| (u64::try_from(h).unwrap_or(0) * 3_600_000, n))
        .collect()
}

/// The default day: 24 model hours.
pub const DEFAULT_DURATION_MS: u64 = DAY_MS;
