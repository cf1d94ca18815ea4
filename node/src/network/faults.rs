//! Fault injection for testnets: lost and late RPC messages, and network partitions.
//!
//! One [`LinkFaults`] handle is shared by every node of a testnet (it is an `Arc` inside) and put
//! in each node's [`super::NetConfig::faults`]; production nodes have none, and then none of this
//! code runs. What it does:
//!
//! - **Drop** ([`LinkFaults::set_drop_ppm`]): each outgoing RPC request and each outgoing RPC
//!   response is lost with this probability. A lost request is never sent: the caller's
//!   [`super::Client::request`] waits the configured request timeout and then fails exactly as a
//!   timed-out request does. A lost response is held (not sent) until the asker's request has
//!   timed out, then its channel is dropped, so the asker also sees a timeout, not a fast error.
//! - **Lost acks** ([`LinkFaults::set_ack_drop_ppm`]): on top of the drop above, each message
//!   that carries a receipt acknowledgement (the answer `EventAck(Some(ack))` to a `Completed`
//!   offer, and a `Fetch`, which carries the ack again) is lost with this probability, the same
//!   way. Counted in [`FaultStats::dropped_acks`] as well.
//! - **Delay** ([`LinkFaults::set_delay`]): each outgoing RPC message waits a uniformly random
//!   time in `[min, max]` before it is handed to the swarm. A request waits in the caller's task;
//!   a response waits in a spawned task (at most [`MAX_HELD_RESPONSES`] per node; past that a
//!   response goes out at once and is counted in [`FaultStats::unheld_responses`]), so neither
//!   the node's dispatcher nor its event loop ever sleeps.
//! - **Partition** ([`LinkFaults::partition`]): peers in different groups cannot reach each
//!   other. Each node's event loop blocks the peers outside its own group (libp2p's
//!   `allow_block_list`): existing connections to them are closed, new ones in either direction
//!   are denied, and gossip, which rides on those connections, does not cross. A request to such
//!   a peer fails at once, like one to an unreachable peer. Peers in no group are unaffected (they
//!   can bridge groups, for gossip too, as a real router would). [`LinkFaults::heal`] lifts the
//!   partition and each node redials the peers it had blocked.
//!
//! Decisions come from one seeded ChaCha8 generator inside the handle, so one seed gives one
//! sequence of decisions; which message gets which decision still depends on the order in which
//! the nodes' tasks happen to ask. Gossip is not dropped or delayed (only partitions affect it),
//! and the event loop's own `Busy` refusals when a node is saturated bypass the faults.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use libp2p::PeerId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;

/// One million parts per million: a drop probability of 1.
pub const PPM_ALWAYS: u32 = 1_000_000;
/// Responses one node may hold back at once (delayed or dropped). Each holds a libp2p response
/// channel and a small task; a testnet with thousands of RPCs in flight stays well under it.
pub const MAX_HELD_RESPONSES: usize = 1024;

/// A fault setting that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("drop probability {ppm} ppm is over {PPM_ALWAYS} (certain loss)")]
    DropOverOne { ppm: u32 },
    #[error("delay range is reversed: min {min:?} is more than max {max:?}")]
    DelayReversed { min: Duration, max: Duration },
    #[error("peer {peer} is in more than one partition group")]
    PeerInTwoGroups { peer: PeerId },
}

/// Counters of what the faults did, summed over every node sharing the handle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// RPC messages lost: `dropped_requests + dropped_responses`.
    pub dropped: u64,
    pub dropped_requests: u64,
    pub dropped_responses: u64,
    /// RPC messages held back before sending.
    pub delayed: u64,
    /// Requests failed at once because their peer was across a partition.
    pub refused_requests: u64,
    /// Connection attempts (either direction) denied because of a partition.
    pub refused_connections: u64,
    /// Peers whose open connections a partition closed (counted once per node and peer).
    pub closed_connections: u64,
    /// Responses sent without their delay or loss because [`MAX_HELD_RESPONSES`] were held.
    pub unheld_responses: u64,
    /// Of the dropped messages, those lost to [`LinkFaults::set_ack_drop_ppm`].
    pub dropped_acks: u64,
}

/// What happens to one outgoing RPC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Sent after this long (zero: at once).
    Send(Duration),
    Drop,
}

struct Settings {
    rng: ChaCha8Rng,
    drop_ppm: u32,
    ack_drop_ppm: u32,
    delay: (Duration, Duration),
    groups: Vec<BTreeSet<PeerId>>,
}

#[derive(Debug, Default)]
struct Counters {
    dropped_acks: AtomicU64,
    dropped_requests: AtomicU64,
    dropped_responses: AtomicU64,
    delayed: AtomicU64,
    refused_requests: AtomicU64,
    refused_connections: AtomicU64,
    closed_connections: AtomicU64,
    unheld_responses: AtomicU64,
}

struct Shared {
    settings: Mutex<Settings>,
    counters: Counters,
    /// Bumped on every partition change; each node's event loop watches it.
    partition_version: watch::Sender<u64>,
}

/// A shared, cloneable fault-injection handle; see the module docs.
#[derive(Clone)]
pub struct LinkFaults {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LinkFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.settings();
        f.debug_struct("LinkFaults")
            .field("drop_ppm", &s.drop_ppm)
            .field("delay", &s.delay)
            .field("groups", &s.groups.len())
            .finish_non_exhaustive()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl LinkFaults {
    /// No faults yet; every later decision is drawn from a generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        let (partition_version, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                settings: Mutex::new(Settings {
                    rng: ChaCha8Rng::seed_from_u64(seed),
                    drop_ppm: 0,
                    ack_drop_ppm: 0,
                    delay: (Duration::ZERO, Duration::ZERO),
                    groups: Vec::new(),
                }),
                counters: Counters::default(),
                partition_version,
            }),
        }
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        // Nothing in this module panics while holding the lock; a poisoned one is still valid.
        self.shared
            .settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Probability, in parts per million, that an outgoing RPC request or response is lost.
    pub fn set_drop_ppm(&self, ppm: u32) -> Result<(), FaultError> {
        if ppm > PPM_ALWAYS {
            return Err(FaultError::DropOverOne { ppm });
        }
        self.settings().drop_ppm = ppm;
        Ok(())
    }

    /// Probability, in parts per million, that a message carrying a receipt acknowledgement is
    /// lost, on top of [`LinkFaults::set_drop_ppm`].
    pub fn set_ack_drop_ppm(&self, ppm: u32) -> Result<(), FaultError> {
        if ppm > PPM_ALWAYS {
            return Err(FaultError::DropOverOne { ppm });
        }
        self.settings().ack_drop_ppm = ppm;
        Ok(())
    }

    /// Every outgoing RPC message is held a uniformly random time in `[min, max]`.
    /// `(Duration::ZERO, Duration::ZERO)` turns delays off.
    pub fn set_delay(&self, min: Duration, max: Duration) -> Result<(), FaultError> {
        if min > max {
            return Err(FaultError::DelayReversed { min, max });
        }
        self.settings().delay = (min, max);
        Ok(())
    }

    /// Splits the network: peers in different groups cannot reach each other; peers in no
    /// group are unaffected. Replaces any earlier partition.
    pub fn partition(&self, groups: Vec<BTreeSet<PeerId>>) -> Result<(), FaultError> {
        let mut seen = BTreeSet::new();
        for peer in groups.iter().flatten() {
            if !seen.insert(*peer) {
                return Err(FaultError::PeerInTwoGroups { peer: *peer });
            }
        }
        self.settings().groups = groups.into_iter().filter(|g| !g.is_empty()).collect();
        self.shared.partition_version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Lifts the partition; nodes redial the peers they had cut off.
    pub fn heal(&self) {
        self.settings().groups.clear();
        self.shared.partition_version.send_modify(|v| *v += 1);
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (req, resp) = (get(&c.dropped_requests), get(&c.dropped_responses));
        FaultStats {
            dropped: req.saturating_add(resp),
            dropped_requests: req,
            dropped_responses: resp,
            delayed: get(&c.delayed),
            refused_requests: get(&c.refused_requests),
            refused_connections: get(&c.refused_connections),
            closed_connections: get(&c.closed_connections),
            unheld_responses: get(&c.unheld_responses),
            dropped_acks: get(&c.dropped_acks),
        }
    }

    /// Whether `a` and `b` are in different groups of the current partition.
    pub fn separated(&self, a: &PeerId, b: &PeerId) -> bool {
        let s = self.settings();
        let group_of = |p: &PeerId| s.groups.iter().position(|g| g.contains(p));
        matches!((group_of(a), group_of(b)), (Some(x), Some(y)) if x != y)
    }

    /// The peers `local` may not reach under the current partition.
    pub(crate) fn cut_off_from(&self, local: &PeerId) -> BTreeSet<PeerId> {
        let s = self.settings();
        match s.groups.iter().position(|g| g.contains(local)) {
            None => BTreeSet::new(),
            Some(mine) => s
                .groups
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != mine)
                .flat_map(|(_, g)| g.iter().copied())
                .collect(),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.partition_version.subscribe()
    }

    /// Draws the fate of one outgoing RPC message and counts it; `carries_ack` for a message
    /// with a receipt acknowledgement in it.
    pub(crate) fn fate(&self, is_response: bool, carries_ack: bool) -> Fate {
        let fate = {
            let mut s = self.settings();
            let (drop_ppm, ack_ppm) = (s.drop_ppm, s.ack_drop_ppm);
            let (min, max) = s.delay;
            if carries_ack && ack_ppm > 0 && s.rng.gen_range(0..PPM_ALWAYS) < ack_ppm {
                bump(&self.shared.counters.dropped_acks);
                Fate::Drop
            } else if drop_ppm > 0 && s.rng.gen_range(0..PPM_ALWAYS) < drop_ppm {
                Fate::Drop
            } else if max.is_zero() {
                Fate::Send(Duration::ZERO)
            } else {
                Fate::Send(Duration::from_nanos(
                    s.rng.gen_range(nanos(min)..=nanos(max)),
                ))
            }
        };
        let c = &self.shared.counters;
        match fate {
            Fate::Drop if is_response => bump(&c.dropped_responses),
            Fate::Drop => bump(&c.dropped_requests),
            Fate::Send(d) if !d.is_zero() => bump(&c.delayed),
            Fate::Send(_) => {}
        }
        fate
    }

    pub(crate) fn count_refused_request(&self) {
        bump(&self.shared.counters.refused_requests);
    }

    pub(crate) fn count_refused_connection(&self) {
        bump(&self.shared.counters.refused_connections);
    }

    pub(crate) fn count_closed_connection(&self) {
        bump(&self.shared.counters.closed_connections);
    }

    pub(crate) fn count_unheld_response(&self) {
        bump(&self.shared.counters.unheld_responses);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        pixmarket_protocol::SecretKey::from_seed(&[n; 32])
            .public()
            .to_peer_id()
    }

    #[test]
    fn bad_settings_are_one_clear_error() {
        let f = LinkFaults::new(1);
        assert_eq!(
            f.set_drop_ppm(PPM_ALWAYS + 1),
            Err(FaultError::DropOverOne {
                ppm: PPM_ALWAYS + 1
            })
        );
        let (a, b) = (Duration::from_millis(2), Duration::from_millis(1));
        assert!(matches!(
            f.set_delay(a, b),
            Err(FaultError::DelayReversed { .. })
        ));
        let g = BTreeSet::from([peer(1)]);
        assert!(matches!(
            f.partition(vec![g.clone(), g]),
            Err(FaultError::PeerInTwoGroups { .. })
        ));
    }

    #[test]
    fn partition_separates_groups_only() {
        let f = LinkFaults::new(1);
        f.partition(vec![
            BTreeSet::from([peer(1), peer(2)]),
            BTreeSet::from([peer(3)]),
        ])
        .unwrap_or_default();
        assert!(f.separated(&peer(1), &peer(3)));
        assert!(!f.separated(&peer(1), &peer(2)));
        assert!(!f.separated(&peer(1), &peer(4)), "no group: unaffected");
        assert_eq!(f.cut_off_from(&peer(3)), BTreeSet::from([peer(1), peer(2)]));
        assert!(f.cut_off_from(&peer(4)).is_empty());
        f.heal();
        assert!(!f.separated(&peer(1), &peer(3)));
    }

    #[test]
    fn decisions_follow_the_seed() {
        let draw = |seed| {
            let f = LinkFaults::new(seed);
            f.set_drop_ppm(500_000).unwrap_or_default();
            f.set_delay(Duration::from_millis(1), Duration::from_millis(9))
                .unwrap_or_default();
            (0..64).map(|_| f.fate(false, false)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let fates = draw(7);
        assert!(fates.contains(&Fate::Drop));
        assert!(fates.iter().all(|f| match f {
            Fate::Drop => true,
            Fate::Send(d) => *d >= Duration::from_millis(1) && *d <= Duration::from_millis(9),
        }));
    }
}
