//! Fault injection at model times: kills and restarts, partitions, message loss and delay.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use pixmarket_node::network::faults::LinkFaults;
use tokio::task::JoinSet;

use super::market::{ProviderSlot, derived_key, open_ledger, start_provider_node};
use crate::record::FaultRecord;
use crate::scenario::{Plan, PlannedFault};
use crate::sim::ModelClock;

pub(super) fn fault(at_ms: u64, kind: &str, detail: String) -> FaultRecord {
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
pub(super) async fn inject_faults(
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
