//! Inbound connections per remote IP address: one machine (or one NAT) cannot fill the node's
//! connection table with fresh peer ids. rust-libp2p's `connection_limits` counts per peer and
//! in total, not per address; this counts per address, from the moment a connection is pending
//! until it closes or fails. Loopback is exempt: there the peers are nodes of one machine (a
//! testnet, a lab).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::ListenFailure;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Inbound connections (pending or established) from one IP address. A household behind one
/// NAT runs a few nodes; each node needs at most [`super::behaviour::MAX_PER_PEER`] connections
/// to us. Sixteen covers four such nodes and keeps one address from taking more than a
/// sixteenth of the 256 connections a node holds.
pub const MAX_INBOUND_PER_IP: usize = 16;

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {max} inbound connections, the most one address may have")]
pub struct TooManyFromAddress {
    pub ip: IpAddr,
    pub max: usize,
}

/// The per-address counter; compose it into the behaviour.
#[derive(Debug, Default)]
pub struct Behaviour {
    per_ip: HashMap<IpAddr, usize>,
    by_connection: HashMap<ConnectionId, IpAddr>,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })
}

impl Behaviour {
    /// Inbound connections counted for `ip` now.
    pub fn inbound_from(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    fn admit(
        &mut self,
        connection: ConnectionId,
        remote: &Multiaddr,
    ) -> Result<(), TooManyFromAddress> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        if ip.is_loopback() {
            return Ok(());
        }
        let n = self.per_ip.entry(ip).or_default();
        if *n >= MAX_INBOUND_PER_IP {
            return Err(TooManyFromAddress {
                ip,
                max: MAX_INBOUND_PER_IP,
            });
        }
        *n += 1;
        self.by_connection.insert(connection, ip);
        Ok(())
    }

    fn release(&mut self, connection: ConnectionId) {
        if let Some(ip) = self.by_connection.remove(&connection)
            && let Some(n) = self.per_ip.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.admit(connection_id, remote_addr)
            .map_err(ConnectionDenied::new)
    }

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

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.release(connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap_or_else(|_| Multiaddr::empty())
    }

    #[test]
    fn one_address_gets_its_share_and_gets_it_back() {
        let mut b = Behaviour::default();
        let remote = addr("/ip4/203.0.113.7/tcp/4001");
        let ids: Vec<ConnectionId> = (0..MAX_INBOUND_PER_IP)
            .map(|_| ConnectionId::new_unchecked(rand::random()))
            .collect();
        for id in &ids {
            assert!(b.admit(*id, &remote).is_ok());
        }
        let refused = b.admit(ConnectionId::new_unchecked(rand::random()), &remote);
        assert!(refused.is_err_and(|e| e.to_string().contains("203.0.113.7 already has 16")));
        // Another address is unaffected; loopback is never counted.
        assert!(
            b.admit(
                ConnectionId::new_unchecked(rand::random()),
                &addr("/ip4/198.51.100.1/tcp/1")
            )
            .is_ok()
        );
        for _ in 0..100 {
            assert!(
                b.admit(
                    ConnectionId::new_unchecked(rand::random()),
                    &addr("/ip4/127.0.0.1/tcp/1")
                )
                .is_ok()
            );
        }
        // A closed connection frees its place.
        b.release(ids[0]);
        assert_eq!(
            b.inbound_from("203.0.113.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
            MAX_INBOUND_PER_IP - 1
        );
        assert!(
            b.admit(ConnectionId::new_unchecked(rand::random()), &remote)
                .is_ok()
        );
    }
}
