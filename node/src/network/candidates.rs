//! Hands addresses to the swarm as external address candidates, so that AutoNAT tests them.
//!
//! rust-libp2p's AutoNAT v2 client probes only the addresses the swarm announced as candidates
//! (`FromSwarm::NewExternalAddrCandidate`); identify raises those for the addresses peers saw
//! us at. The UPnP behaviour instead declares the port it mapped confirmed at once, and the
//! swarm drops every later candidate equal to a confirmed address. Left so, a mapping would be
//! tested only if identify happened to propose it before the gateway answered (a race the
//! namespace test once lost on a slow machine), and `doctor` could not tell a mapping that
//! works from one a second NAT in front of the gateway makes useless. So the event loop takes
//! UPnP's confirmation back and proposes each mapped address here. This behaviour has no
//! connections of its own and emits nothing but those candidates.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Candidates waiting for the swarm's next poll. One arrives per UPnP mapping (a node maps one
/// port per transport it listens on), and the swarm takes them at once; past this the oldest
/// is dropped, as a later mapping of the same port supersedes it.
pub const MAX_PENDING: usize = 8;

#[derive(Debug, Default)]
pub struct Behaviour {
    pending: VecDeque<Multiaddr>,
    waker: Option<Waker>,
}

impl Behaviour {
    /// Announces `addr` as a candidate on the swarm's next poll.
    pub fn propose(&mut self, addr: Multiaddr) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(addr);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.pending.pop_front() {
            Some(addr) => Poll::Ready(ToSwarm::NewExternalAddrCandidate(addr)),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/11.0.1.2/udp/{port}/quic-v1")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn next(b: &mut Behaviour) -> Option<Multiaddr> {
        let mut cx = Context::from_waker(Waker::noop());
        match b.poll(&mut cx) {
            Poll::Ready(ToSwarm::NewExternalAddrCandidate(a)) => Some(a),
            Poll::Ready(_) => panic!("only candidates are emitted"),
            Poll::Pending => None,
        }
    }

    #[test]
    fn proposals_come_out_as_candidates_in_order_and_the_queue_is_bounded() {
        let mut b = Behaviour::default();
        assert_eq!(next(&mut b), None);
        b.propose(addr(1));
        b.propose(addr(2));
        assert_eq!(next(&mut b), Some(addr(1)));
        assert_eq!(next(&mut b), Some(addr(2)));
        assert_eq!(next(&mut b), None);
        let extra = 3;
        for port in 0..u16::try_from(MAX_PENDING + extra).unwrap_or(u16::MAX) {
            b.propose(addr(port));
        }
        let out: Vec<_> = std::iter::from_fn(|| next(&mut b)).collect();
        assert_eq!(out.len(), MAX_PENDING);
        assert_eq!(out[0], addr(3), "the oldest are dropped first");
    }
}
