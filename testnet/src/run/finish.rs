//! The end of a run: stopping the nodes in order, checking every book, and the [`RunRecord`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use libp2p::PeerId;
use pixmarket_ledger::Role;
use pixmarket_protocol::PublicKey;
use tokio::task::JoinSet;

use super::config::{EngineKind, TestnetConfig};
use super::faults::fault;
use super::job::{DealtWith, JobRun, unfinished};
use super::market::Market;
use crate::books::{self, Books};
use crate::record::{EngineLabel, FaultRecord, NetworkRecord, RunRecord};
use crate::scenario::Plan;

/// How long a stopping provider's deliveries in flight may still be acknowledged at the end.
const PROVIDER_STOP_GRACE: Duration = Duration::from_secs(3);
/// How long, after a requester's first round of chain syncs at the end, the pairs whose
/// provider did not answer are tried again (a saturated market drops or times out some of
/// them): a chain left short here fails the books check, though the requester would learn its
/// credit notes on its next exchange.
const SYNC_RETRY_DEADLINE: Duration = Duration::from_secs(60);
/// The pause between two rounds of those retries, so a saturated node gets some air.
const SYNC_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Peak resident memory of this process (`VmHWM` on Linux), if the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn finish(
    config: &TestnetConfig,
    plan: Plan,
    market: Market,
    mut runs: Vec<JobRun>,
    dealt_with: Vec<DealtWith>,
    faults: Vec<FaultRecord>,
    network: NetworkRecord,
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
    // All side by side, under one deadline: one after another, 80 providers' graces and
    // 10 × 80 chain syncs took longer than a 90-node run's whole plan.
    let phase = Instant::now();
    let stop_at = tokio::time::Instant::now() + PROVIDER_STOP_GRACE;
    futures::future::join_all(providers.iter().map(|slot| async move {
        let s = slot.lock().await;
        if let Some(node) = &s.node {
            node.stop_providing(stop_at).await;
        }
    }))
    .await;
    let stopped_selling = phase.elapsed();
    // Each requester syncs only with the providers it dealt with (that quoted one of its
    // jobs): no other provider can hold anything of it, so there is nothing to learn there,
    // and asking 80 providers it never met, most of them at their connection bound, cost each
    // requester minutes of denied dials and re-sends. The books check below still reads every
    // provider's and every requester's whole books, so a credit note missed here still fails it.
    let phase = Instant::now();
    let mut syncs = 0usize;
    let mut sync_plan = Vec::with_capacity(requesters.len());
    for (r, _) in requesters.iter().enumerate() {
        let peers = dealt_with
            .get(r)
            .map(|d| {
                d.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .unwrap_or_default();
        let keys: Vec<PublicKey> = provider_keys
            .iter()
            .filter(|k| peers.contains(&k.to_peer_id()))
            .copied()
            .collect();
        syncs += keys.len();
        sync_plan.push(keys);
    }
    let (learned, short): (Vec<usize>, Vec<usize>) =
        futures::future::join_all(requesters.iter().zip(sync_plan).map(
            |((_, _, node), keys)| async move {
                let mut learned = 0usize;
                let mut left = keys;
                let mut retry_until = None;
                loop {
                    let mut short = Vec::new();
                    for key in left {
                        let sync = node.requester().sync_chain(key.to_peer_id(), key).await;
                        learned += sync.learned;
                        if !sync.caught_up {
                            short.push(key);
                        }
                    }
                    let until =
                        *retry_until.get_or_insert_with(|| Instant::now() + SYNC_RETRY_DEADLINE);
                    if short.is_empty() || Instant::now() + SYNC_RETRY_PAUSE >= until {
                        return (learned, short.len());
                    }
                    tokio::time::sleep(SYNC_RETRY_PAUSE).await;
                    left = short;
                }
            },
        ))
        .await
        .into_iter()
        .unzip();
    let (learned, short): (usize, usize) = (learned.iter().sum(), short.iter().sum());
    if short > 0 {
        log(format!(
            "{short} chain syncs did not reach their provider in {} s of retries",
            SYNC_RETRY_DEADLINE.as_secs()
        ));
    }
    let synced = phase.elapsed();
    if learned > 0 {
        log(format!(
            "requesters learned {learned} credit notes at the end"
        ));
    }
    // Nodes stop side by side: each may wait a few seconds for its last responses to go out.
    let phase = Instant::now();
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
    let requesters_stopped = phase.elapsed();
    let phase = Instant::now();
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
    let providers_stopped = phase.elapsed();
    log(format!(
        "finish: providers stopped selling in {:.1} s; {syncs} chain syncs (each requester with \
         the providers it dealt with) in {:.1} s; requesters stopped in {:.1} s, providers in \
         {:.1} s",
        stopped_selling.as_secs_f64(),
        synced.as_secs_f64(),
        requesters_stopped.as_secs_f64(),
        providers_stopped.as_secs_f64()
    ));
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
    let phase = Instant::now();
    let books = tokio::task::spawn_blocking(move || {
        books::check(&provider_books, &requester_books, &delivered, 0)
    })
    .await
    .context("the books check stopped")?;
    log(format!(
        "books: {} (checked in {:.1} s)",
        if books.ok() { "OK" } else { "FAILED" },
        phase.elapsed().as_secs_f64()
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
        network,
    })
}
