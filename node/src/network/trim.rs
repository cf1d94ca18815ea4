//! Keeping room under the connection bound: which idle connections to close.
//!
//! The bound ([`super::NetConfig::max_connections`]) denies every connection past it, and
//! without this module nothing would ever close one: gossipsub keeps a long-lived stream open to every peer it
//! talks to, so the swarm's idle timeout never fires. Kademlia's lookups dial new peers, so
//! every node filled up to the bound and stayed there; a requester could then neither dial a
//! provider nor be let in by one, and in a 90-node market all 144 jobs failed that way. So
//! above [`target`] the node closes the connections it has no use for: to a provider (a peer
//! whose advert it accepted; requesters hear adverts only over their connections) not in its
//! gossip mesh, with no request of its own waiting on it, not a relay it reserves on, not
//! relayed, and not opened or used by a request within [`RECENT_USE`]. Kademlia keeps the
//! peers' addresses, so they can be dialed again when needed. A provider keeps a quarter of
//! its bound free for requesters; a requester, which hears adverts only over its connections,
//! keeps [`REQUESTER_ROOM`].
//!
//! That alone left nodes full: Kademlia's walks open connections faster than [`RECENT_USE`]
//! lets them be trimmed (at 80 + 10 nodes most of a full provider's connections were under
//! 30 s old), and a requester's quote was refused at the bound. So every node also keeps
//! [`free_slots`] free whatever the connections' age, closing the least recently used one not
//! kept and older than [`MIN_AGE`]: with it 144 of 144 jobs completed at 90 nodes, 0 before.
//!
//! A peer that never advertised is kept for as long as it stays connected, so the trimming
//! never frees what strangers hold: their connections are bounded by the per-peer and per-IP
//! limits (`behaviour.rs`, [`super::ip_limits`]) and the bound itself, as before it.

use std::time::Duration;

use libp2p::swarm::ConnectionId;
use tokio::time::Instant;

/// A connection opened, or used by a request or response, within this long is kept: a job's
/// messages come seconds apart (a requester asks a silent job's status after each idle
/// timeout), and a Kademlia request ends within its 10 s timeout.
pub const RECENT_USE: Duration = Duration::from_secs(30);

/// Slots a node that does not advertise (a requester) keeps free: room to dial the providers
/// its jobs choose, two at a time. More would cost it connections it hears adverts over
/// (see the module doc).
pub const REQUESTER_ROOM: usize = 2;

/// The number of connections above which idle ones are closed. A provider keeps a quarter of
/// its bound free for the requesters that dial it for jobs; a requester keeps
/// [`REQUESTER_ROOM`] free for its own dials. Never below one connection.
pub fn target(max_connections: u32, provider: bool) -> usize {
    let max = usize::try_from(max_connections).unwrap_or(usize::MAX);
    let room = if provider { max / 4 } else { REQUESTER_ROOM };
    max.saturating_sub(room).max(1)
}

/// One open connection as the trimming sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub id: ConnectionId,
    /// When it was opened or last carried a request or response.
    pub last_used: Instant,
    /// In use in a way an idle time does not show (mesh, pending request, relay, a requester).
    pub kept: bool,
}

/// The connections to close so that at most [`target`] remain, least recently used first;
/// fewer when not enough of them are idle.
pub fn to_close(
    max_connections: u32,
    provider: bool,
    open: &[Candidate],
    now: Instant,
) -> Vec<ConnectionId> {
    let excess = open.len().saturating_sub(target(max_connections, provider));
    if excess == 0 {
        return Vec::new();
    }
    let mut idle: Vec<&Candidate> = open
        .iter()
        .filter(|c| !c.kept && now.saturating_duration_since(c.last_used) >= RECENT_USE)
        .collect();
    idle.sort_by_key(|c| (c.last_used, c.id));
    idle.into_iter().take(excess).map(|c| c.id).collect()
}

/// Slots every node keeps free under its bound, whatever the age of the connections that
/// would fill them: a requester's dial for a quote is refused outright at a full node, and
/// Kademlia's walks (each dials a dozen peers or more) fill a node within seconds, faster than
/// [`RECENT_USE`] lets the idle trimming act. Two, since a requester asks its providers one or
/// two at a time, and a dial refused all the same is re-sent after a backoff. A small bound
/// keeps fewer (see [`free_slots`]).
pub const FREE_SLOTS: usize = 2;

/// One free slot per this many connections of the bound, up to [`FREE_SLOTS`]: a node
/// configured for a handful of connections keeps them all rather than close what it has
/// for a dial that may never come.
pub const CONNECTIONS_PER_FREE_SLOT: usize = 8;

/// The slots a node with bound `max` keeps free: [`FREE_SLOTS`] from a bound of 16, one from
/// 8, none below.
pub fn free_slots(max: usize) -> usize {
    (max / CONNECTIONS_PER_FREE_SLOT).min(FREE_SLOTS)
}

/// A connection opened or used within this long is not closed for [`FREE_SLOTS`] either: the
/// first request on a fresh connection (a requester's quote, a Kademlia query) follows its
/// set-up within milliseconds, and so has marked it used before this passes.
pub const MIN_AGE: Duration = Duration::from_secs(2);

/// The connections to close so that [`free_slots`] stay free under the bound, least recently
/// used first, among those not kept and not used within [`MIN_AGE`]; fewer when not enough.
pub fn to_free_slots(max_connections: u32, open: &[Candidate], now: Instant) -> Vec<ConnectionId> {
    let max = usize::try_from(max_connections).unwrap_or(usize::MAX);
    let need = (open.len() + free_slots(max)).saturating_sub(max);
    if need == 0 {
        return Vec::new();
    }
    let mut idle: Vec<&Candidate> = open
        .iter()
        .filter(|c| !c.kept && now.saturating_duration_since(c.last_used) >= MIN_AGE)
        .collect();
    idle.sort_by_key(|c| (c.last_used, c.id));
    idle.into_iter().take(need).map(|c| c.id).collect()
}

/// The connection to close so that a dial this node is about to make fits under its bound:
/// the least recently used one that is not kept, however recently used (the node needs the
/// slot now). `None` when every open connection is kept; the bound then denies the dial and
/// the request fails over as it would at any full peer.
pub fn for_a_dial(open: &[Candidate]) -> Option<ConnectionId> {
    open.iter()
        .filter(|c| !c.kept)
        .min_by_key(|c| (c.last_used, c.id))
        .map(|c| c.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(now: Instant, ages_s: &[(u64, bool)]) -> Vec<Candidate> {
        ages_s
            .iter()
            .map(|&(age, kept)| Candidate {
                id: ConnectionId::new_unchecked(usize::try_from(age).unwrap_or(0)),
                last_used: now.checked_sub(Duration::from_secs(age)).unwrap_or(now),
                kept,
            })
            .collect()
    }

    #[test]
    fn a_provider_keeps_a_quarter_free_and_a_requester_two_slots() {
        assert_eq!(target(32, true), 24);
        assert_eq!(target(4, true), 3);
        // Below four, a quarter rounds to nothing: the bound alone.
        assert_eq!(target(3, true), 3);
        assert_eq!(target(1, true), 1);
        assert_eq!(target(32, false), 30);
        assert_eq!(target(2, false), 1);
        assert_eq!(target(1, false), 1);
    }

    #[test]
    fn under_the_target_nothing_closes() {
        let now = Instant::now();
        let open = candidates(now, &[(100, false), (200, false), (300, false)]);
        assert!(to_close(4, true, &open, now).is_empty());
    }

    #[test]
    fn the_least_recently_used_idle_ones_close_down_to_the_target() {
        let now = Instant::now();
        // Bound 4: target 3, five open, so two must go: the oldest idle ones, never a kept
        // one or a recently used one.
        let open = candidates(
            now,
            &[
                (500, true),
                (400, false),
                (5, false),
                (300, false),
                (200, false),
            ],
        );
        let closed = to_close(4, true, &open, now);
        assert_eq!(
            closed,
            vec![
                ConnectionId::new_unchecked(400),
                ConnectionId::new_unchecked(300)
            ]
        );
    }

    #[test]
    fn a_dial_takes_the_least_recently_used_slot_that_is_not_kept() {
        let now = Instant::now();
        let open = candidates(now, &[(500, true), (2, false), (1, false)]);
        assert_eq!(for_a_dial(&open), Some(ConnectionId::new_unchecked(2)));
        let kept = candidates(now, &[(500, true), (400, true)]);
        assert_eq!(for_a_dial(&kept), None);
    }

    #[test]
    fn a_bound_of_sixteen_keeps_two_slots_free_eight_one_and_less_none() {
        assert_eq!(free_slots(32), FREE_SLOTS);
        assert_eq!(free_slots(16), 2);
        assert_eq!(free_slots(15), 1);
        assert_eq!(free_slots(8), 1);
        assert_eq!(free_slots(7), 0);
        assert_eq!(free_slots(1), 0);
    }

    #[test]
    fn free_slots_are_made_from_connections_past_the_minimum_age_only() {
        let now = Instant::now();
        // Bound 16 (two free slots), 15 open: one must go. Kept ones and the one used a
        // second ago stay; of the rest the least recently used goes first.
        let mut ages = vec![(500, true); 11];
        ages.extend([(1, false), (10, false), (20, false), (5, true)]);
        let open = candidates(now, &ages);
        assert_eq!(
            to_free_slots(16, &open, now),
            vec![ConnectionId::new_unchecked(20)]
        );
        // Sixteen open (one more kept): two must go.
        let mut full = open.clone();
        full.extend(candidates(now, &[(600, true)]));
        assert_eq!(
            to_free_slots(16, &full, now),
            vec![
                ConnectionId::new_unchecked(20),
                ConnectionId::new_unchecked(10)
            ]
        );
        // Fourteen open: room enough.
        assert!(to_free_slots(16, &open[..14], now).is_empty());
        // Nothing old enough and unkept: nothing closes, and the bound refuses as before.
        let mut young = vec![(500, true); 14];
        young.extend([(1, false), (0, false)]);
        assert!(to_free_slots(16, &candidates(now, &young), now).is_empty());
        // A bound of four keeps none free: a full small node closes nothing.
        let small = candidates(
            now,
            &[(100, false), (200, false), (300, false), (400, false)],
        );
        assert!(to_free_slots(4, &small, now).is_empty());
    }

    #[test]
    fn kept_and_recent_connections_stay_even_over_the_target() {
        let now = Instant::now();
        let open = candidates(now, &[(500, true), (400, true), (1, false), (2, false)]);
        assert!(to_close(2, true, &open, now).is_empty());
    }
}
