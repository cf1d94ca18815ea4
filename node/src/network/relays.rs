//! Which relays this node keeps a reservation on, and when to ask again.
//!
//! rust-libp2p's relay client reports a reservation accepted, but a lost one (the relay
//! restarted, the connection dropped, the reservation expired unrenewed) only as a listener
//! that closed, or not at all when the relay never answers. So each wanted relay has a
//! watchdog: no listener, or a reservation asked for and not accepted within
//! [`RESERVE_TIMEOUT`], and the reservation is asked for again after a backoff.
//!
//! rust-libp2p's relay server refuses reservations (and stops announcing its protocol) until it
//! knows an external address: at once for a relay listening on a public IP, only after AutoNAT
//! confirmed one for a relay behind a 1:1 NAT. A retry in that window is refused and the backoff
//! grows; when the relay then announces the relay protocol (identify), [`Relays::ready`] asks at
//! once instead of waiting the backoff out.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::time::Instant;

/// Relays reserved on at once: two keep the node reachable while one restarts; more would only
/// cost their connections.
pub const MAX_RESERVED_RELAYS: usize = 2;
/// A reservation asked for and not accepted in this long is given up and asked for again.
pub const RESERVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before asking again after a loss; it doubles up to [`MAX_RESERVE_BACKOFF`].
pub const FIRST_RESERVE_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two tries: it bounds how long a relay that comes back unannounced
/// (no identify after its restart) waits to be used again, and 8 s keeps a relay that refuses
/// or is down to one try per 8 s from each of its clients.
pub const MAX_RESERVE_BACKOFF: Duration = Duration::from_secs(8);

#[derive(Debug)]
struct Wanted {
    /// `<relay address>/p2p/<relay>/p2p-circuit`: what this node listens on.
    circuit: Multiaddr,
    listener: Option<ListenerId>,
    /// When the current listener was opened (for the watchdog).
    asked_at: Instant,
    reserved: bool,
    next_try: Instant,
    backoff: Duration,
}

/// What the event loop should do for a relay.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayAction {
    /// Open a listener on this circuit address (asks the relay for a reservation).
    Reserve { relay: PeerId, circuit: Multiaddr },
    /// Close this listener (the reservation timed out); a new one follows after the backoff.
    Drop { relay: PeerId, listener: ListenerId },
}

#[derive(Debug, Default)]
pub struct Relays {
    wanted: BTreeMap<PeerId, Wanted>,
    listeners: HashMap<ListenerId, PeerId>,
}

/// The circuit address to listen on through `relay` reached at `addr`.
pub fn circuit_addr(relay: PeerId, addr: &Multiaddr) -> Multiaddr {
    let mut a: Multiaddr = addr
        .iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    a.push(Protocol::P2p(relay));
    a.push(Protocol::P2pCircuit);
    a
}

impl Relays {
    /// Wants a reservation on `relay` (reached at `addr`), unless it is already wanted or
    /// [`MAX_RESERVED_RELAYS`] are. Returns whether it is newly wanted.
    pub fn want(&mut self, relay: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        if self.wanted.contains_key(&relay) || self.wanted.len() >= MAX_RESERVED_RELAYS {
            return false;
        }
        self.wanted.insert(
            relay,
            Wanted {
                circuit: circuit_addr(relay, addr),
                listener: None,
                asked_at: now,
                reserved: false,
                next_try: now,
                backoff: FIRST_RESERVE_BACKOFF,
            },
        );
        true
    }

    pub fn is_wanted(&self, relay: &PeerId) -> bool {
        self.wanted.contains_key(relay)
    }

    /// What to do now: reserve where no listener is and the backoff has passed, drop listeners
    /// whose reservation was not accepted in time.
    pub fn due(&mut self, now: Instant) -> Vec<RelayAction> {
        let mut actions = Vec::new();
        for (relay, w) in &mut self.wanted {
            match w.listener {
                None if w.next_try <= now => actions.push(RelayAction::Reserve {
                    relay: *relay,
                    circuit: w.circuit.clone(),
                }),
                Some(listener) if !w.reserved && now >= w.asked_at + RESERVE_TIMEOUT => {
                    actions.push(RelayAction::Drop {
                        relay: *relay,
                        listener,
                    });
                }
                _ => {}
            }
        }
        actions
    }

    /// A listener was opened for `relay`.
    pub fn listening(&mut self, relay: PeerId, listener: ListenerId, now: Instant) {
        if let Some(w) = self.wanted.get_mut(&relay) {
            w.listener = Some(listener);
            w.asked_at = now;
            w.reserved = false;
            self.listeners.insert(listener, relay);
        }
    }

    /// The relay accepted (or renewed) the reservation.
    pub fn accepted(&mut self, relay: &PeerId) {
        if let Some(w) = self.wanted.get_mut(relay) {
            w.reserved = true;
            w.backoff = FIRST_RESERVE_BACKOFF;
        }
    }

    /// A listener closed; returns the relay it was for (then the reservation is lost and is
    /// asked for again after the backoff).
    pub fn closed(&mut self, listener: ListenerId, now: Instant) -> Option<PeerId> {
        let relay = self.listeners.remove(&listener)?;
        self.lost(&relay, now);
        Some(relay)
    }

    /// The reservation on `relay` is gone (its listener, if any, is closed by the caller).
    pub fn lost(&mut self, relay: &PeerId, now: Instant) -> Option<ListenerId> {
        let w = self.wanted.get_mut(relay)?;
        let listener = w.listener.take();
        if let Some(l) = listener {
            self.listeners.remove(&l);
        }
        w.reserved = false;
        w.next_try = now + w.backoff;
        w.backoff = (w.backoff * 2).min(MAX_RESERVE_BACKOFF);
        listener
    }

    /// `relay` announced (identify) that it serves reservations: a lost one is asked for again
    /// now rather than after the backoff, but never sooner than [`FIRST_RESERVE_BACKOFF`] after
    /// the last try, however often a relay announces itself.
    pub fn ready(&mut self, relay: &PeerId, now: Instant) {
        if let Some(w) = self.wanted.get_mut(relay)
            && w.listener.is_none()
        {
            w.next_try = w
                .next_try
                .min((w.asked_at + FIRST_RESERVE_BACKOFF).max(now));
        }
    }

    pub fn relay_of(&self, listener: &ListenerId) -> Option<PeerId> {
        self.listeners.get(listener).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lost_reservation_is_asked_for_again_with_a_bounded_backoff() {
        let mut r = Relays::default();
        let relay = PeerId::random();
        let addr: Multiaddr = "/ip4/11.0.0.1/tcp/4001"
            .parse()
            .unwrap_or_else(|_| Multiaddr::empty());
        let t0 = Instant::now();
        assert!(r.want(relay, &addr, t0));
        assert!(!r.want(relay, &addr, t0), "wanted once");
        let circuit = circuit_addr(relay, &addr);
        assert_eq!(
            r.due(t0),
            vec![RelayAction::Reserve {
                relay,
                circuit: circuit.clone()
            }]
        );
        let l = ListenerId::next();
        r.listening(relay, l, t0);
        assert!(r.due(t0).is_empty());
        // Never accepted: the watchdog drops it.
        let late = t0 + RESERVE_TIMEOUT;
        assert_eq!(r.due(late), vec![RelayAction::Drop { relay, listener: l }]);
        assert_eq!(r.lost(&relay, late), Some(l));
        assert!(r.due(late).is_empty(), "waits out the backoff");
        assert_eq!(r.due(late + FIRST_RESERVE_BACKOFF).len(), 1);
        // Backoff doubles and stops at the maximum.
        let mut now = late;
        for _ in 0..10 {
            let l = ListenerId::next();
            r.listening(relay, l, now);
            assert_eq!(r.closed(l, now), Some(relay));
            now += MAX_RESERVE_BACKOFF;
            assert_eq!(r.due(now).len(), 1, "due again within the maximum backoff");
        }
        // Accepted: the backoff starts over.
        let l = ListenerId::next();
        r.listening(relay, l, now);
        r.accepted(&relay);
        assert!(r.due(now + RESERVE_TIMEOUT * 10).is_empty());
        r.closed(l, now);
        assert_eq!(r.due(now + FIRST_RESERVE_BACKOFF).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_that_announces_itself_again_is_asked_at_once_but_not_more_often() {
        let mut r = Relays::default();
        let relay = PeerId::random();
        let t0 = Instant::now();
        assert!(r.want(relay, &Multiaddr::empty(), t0));
        // Refused three times in a row (a relay just back, its address not confirmed yet): the
        // next try waits 4 s.
        let mut last = t0;
        for wait in [0, 1, 2] {
            let now = last + FIRST_RESERVE_BACKOFF * wait;
            assert_eq!(r.due(now).len(), 1, "due after {wait} s");
            let l = ListenerId::next();
            r.listening(relay, l, now);
            assert_eq!(r.closed(l, now), Some(relay));
            last = now;
        }
        assert!(r.due(last + Duration::from_secs(3)).is_empty());
        // It announces the relay protocol: asked again once the minimum spacing has passed.
        r.ready(&relay, last);
        assert!(
            r.due(last + FIRST_RESERVE_BACKOFF - Duration::from_millis(1))
                .is_empty()
        );
        let now = last + FIRST_RESERVE_BACKOFF;
        assert_eq!(r.due(now).len(), 1);
        // With a listener in flight, an announcement changes nothing.
        r.listening(relay, ListenerId::next(), now);
        r.ready(&relay, now);
        assert!(r.due(now).is_empty());
    }

    #[test]
    fn at_most_two_relays() {
        let mut r = Relays::default();
        let now = Instant::now();
        let addr = Multiaddr::empty();
        assert!(r.want(PeerId::random(), &addr, now));
        assert!(r.want(PeerId::random(), &addr, now));
        assert!(!r.want(PeerId::random(), &addr, now));
    }
}
