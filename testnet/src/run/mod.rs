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

mod config;
mod faults;
mod finish;
mod job;
mod market;
mod sample;

pub use config::{EngineKind, MAX_QUIET_WINDOW, SelectionRule, TestnetConfig, UnknownEngine};
pub use finish::peak_rss_bytes;
pub use sample::{
    MAX_ADVERT_DELAYS, MAX_CONNECTION_SAMPLES, SAMPLE_INTERVAL, loopback_counters, rss_bytes,
};

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::record::RunRecord;
use crate::scenario;
use faults::inject_faults;
use finish::finish;
use job::{DealtWith, run_job};
use market::start_market;
use sample::Sampler;

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
    let rss_before = rss_bytes();
    let market = start_market(config, log).await?;
    if !config.quiet_window.is_zero() {
        log(format!(
            "measuring {} s of background traffic",
            config.quiet_window.as_secs()
        ));
    }
    let setup = sample::measure_setup(
        &market,
        rss_before,
        market.discovery,
        config.quiet_window,
        config.max_connections,
    )
    .await;
    let clock = market.clock;
    let t0 = clock.now_ms();
    let sampler = Sampler::start(&market, t0, setup);
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

    let dealt_with: Vec<DealtWith> = market
        .requesters
        .iter()
        .map(|_| DealtWith::default())
        .collect();
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
        let dealt = dealt_with[job.requester].clone();
        jobs.spawn(async move {
            let r = run_job(job, requester, clock, t0, config, dealt).await;
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
    let network = sampler.finish().await;
    finish(
        config, plan, market, runs, dealt_with, faults, network, t0, end_ms, wall_start, log,
    )
    .await
}
