//! Which of a peer's announced listen addresses go into Kademlia's routing table, which other
//! nodes learn from us and dial.
//!
//! Identify tells us every address a peer listens on, its loopback and home-network ones
//! included. Those are reachable only from the same host or the same network: a node in
//! another home that dials `192.168.1.2` reaches, at best, nothing (a QUIC handshake waits out
//! its timeout) and at worst a stranger's device on its own network. So an address is kept
//! only if it can work from where we saw the peer: loopback ones only for a peer on this host,
//! home-network ones only for a peer reached over a loopback or home-network address, public
//! ones always.
//!
//! Relayed (`/p2p-circuit`) addresses are left out. Every node that looks a peer up dials all
//! its addresses at once, so a peer that has gone leaves each such dial one circuit attempt
//! per relay address (six, with a relay on three addresses and two transports) that waits out
//! the whole dial; two of those peers filled a provider's ten circuit slots on its relay in the
//! NAT test. A provider behind NAT is found through its advert, which carries its circuit
//! addresses, and requesters dial exactly those.

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// How far an address reaches, from the narrowest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// This host only (127.0.0.0/8, ::1).
    Loopback,
    /// One network: private (RFC 1918), link-local, carrier-grade NAT space (100.64.0.0/10),
    /// IPv6 unique-local (fc00::/7) and link-local (fe80::/10).
    Local,
    /// Anywhere: every other address, DNS names and relayed circuits.
    Global,
}

/// The scope of `addr`, or `None` for one that names no place to dial (an unspecified IP).
pub fn scope(addr: &Multiaddr) -> Option<Scope> {
    if is_relayed(addr) {
        // The circuit's first hop is the relay, which is reachable or it could not relay.
        return Some(Scope::Global);
    }
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => {
            let [a, b, ..] = ip.octets();
            if ip.is_unspecified() || ip.is_broadcast() {
                None
            } else if ip.is_loopback() {
                Some(Scope::Loopback)
            } else if ip.is_private() || ip.is_link_local() || (a == 100 && (b & 0xc0) == 64) {
                Some(Scope::Local)
            } else {
                Some(Scope::Global)
            }
        }
        Some(Protocol::Ip6(ip)) => {
            let first = ip.segments()[0];
            if ip.is_unspecified() {
                None
            } else if ip.is_loopback() {
                Some(Scope::Loopback)
            } else if (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80 {
                Some(Scope::Local)
            } else {
                Some(Scope::Global)
            }
        }
        _ => Some(Scope::Global),
    }
}

/// Whether `announced`, a listen address a peer told us of, belongs in the routing table, given
/// that the connection's far end is `seen_at`: an address reaches no further than its scope,
/// so it is kept when its scope is at least as wide as the one we reached the peer in; relayed
/// addresses never are (see the module's doc).
pub fn for_routing_table(seen_at: &Multiaddr, announced: &Multiaddr) -> bool {
    if is_relayed(announced) {
        return false;
    }
    match (scope(seen_at), scope(announced)) {
        (_, None) => false,
        (None, Some(a)) => a == Scope::Global,
        (Some(seen), Some(a)) => a >= seen,
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn scopes_of_the_address_kinds_a_node_announces() {
        let cases = [
            ("/ip4/127.0.0.1/tcp/1", Some(Scope::Loopback)),
            ("/ip6/::1/udp/1/quic-v1", Some(Scope::Loopback)),
            ("/ip4/192.168.1.2/tcp/1", Some(Scope::Local)),
            ("/ip4/10.0.0.7/tcp/1", Some(Scope::Local)),
            ("/ip4/172.16.0.1/tcp/1", Some(Scope::Local)),
            ("/ip4/169.254.3.4/tcp/1", Some(Scope::Local)),
            ("/ip4/100.64.0.1/tcp/1", Some(Scope::Local)),
            ("/ip6/fd00::1/tcp/1", Some(Scope::Local)),
            ("/ip6/fe80::1/tcp/1", Some(Scope::Local)),
            ("/ip4/11.0.0.1/tcp/1", Some(Scope::Global)),
            ("/ip4/100.128.0.1/tcp/1", Some(Scope::Global)),
            ("/ip6/2001:db8::1/tcp/1", Some(Scope::Global)),
            ("/dns4/relay.example/tcp/1", Some(Scope::Global)),
            (
                "/ip4/192.168.1.1/tcp/1/p2p/12D3KooWAnxBqRFmfat9kaYC5QWU6zbx1NpRJKebWQ9i6NrpjEzB/p2p-circuit",
                Some(Scope::Global),
            ),
            ("/ip4/0.0.0.0/tcp/1", None),
            ("/ip6/::/tcp/1", None),
        ];
        for (addr, want) in cases {
            assert_eq!(scope(&a(addr)), want, "{addr}");
        }
    }

    #[test]
    fn a_peer_seen_from_another_network_keeps_only_what_others_can_dial_directly() {
        let loopback = a("/ip4/127.0.0.1/tcp/4101");
        let home = a("/ip4/192.168.1.2/udp/4101/quic-v1");
        let public = a("/ip4/11.0.1.2/tcp/4101");
        let circuit = a(
            "/ip4/11.0.0.1/udp/4001/quic-v1/p2p/12D3KooWAnxBqRFmfat9kaYC5QWU6zbx1NpRJKebWQ9i6NrpjEzB/p2p-circuit",
        );
        let unspecified = a("/ip4/0.0.0.0/tcp/4101");
        let keeps = |seen: &str| {
            [&loopback, &home, &public, &circuit, &unspecified]
                .map(|x| for_routing_table(&a(seen), x))
        };
        // Through the home router's public address (another home, or the internet).
        assert_eq!(
            keeps("/ip4/11.0.1.2/tcp/40000"),
            [false, false, true, false, false]
        );
        // On the same network.
        assert_eq!(
            keeps("/ip4/192.168.1.2/tcp/40000"),
            [false, true, true, false, false]
        );
        // On this host (the testnet): every direct address can work.
        assert_eq!(
            keeps("/ip4/127.0.0.1/tcp/40000"),
            [true, true, true, false, false]
        );
        // Over a relay: the peer is elsewhere.
        assert_eq!(
            keeps(circuit.to_string().as_str()),
            [false, false, true, false, false]
        );
    }
}
