//! What this node knows about its own reachability, and the verdict drawn from it.
//!
//! The event loop feeds [`Reachability`] what the swarm reports (AutoNAT v2 results per address,
//! addresses peers observed us at, relay reservations, hole-punch outcomes, UPnP mappings); the
//! node writes the snapshot to its data folder and `pixmarket doctor` reads it back. Every list
//! here is bounded.

use std::collections::BTreeMap;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};

/// Addresses with a reachability state kept at once: a node has a handful of listen and
/// observed addresses; past this many the oldest-tested is forgotten.
pub const MAX_ADDRESSES: usize = 16;
/// Peers whose observation of our address is kept: two that differ already tell an
/// endpoint-dependent NAT, and 16 cover the bootstrap set and the gossip mesh's first peers.
pub const MAX_OBSERVERS: usize = 16;
/// Relays whose reservation state is kept (reserving on more than two gains nothing).
pub const MAX_RELAYS: usize = 4;

/// One address this node could be reached at, and what AutoNAT v2 found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressStatus {
    pub addr: String,
    pub state: AddrState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AddrState {
    /// A candidate (a peer saw us there, or UPnP mapped it) not yet probed.
    Untested,
    /// An AutoNAT server dialled back to it and reached us.
    Reachable { confirmed_by: String },
    /// An AutoNAT server's dial back failed.
    Unreachable { tested_by: String, error: String },
}

/// Our reservation on one relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub relay: String,
    /// The `/p2p-circuit` address requesters dial through this relay.
    pub circuit_addr: String,
    pub state: RelayState,
    /// Reservations asked for on this relay since start-up (the first and every renewal after
    /// one was lost).
    pub attempts: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RelayState {
    Reserving,
    /// The relay accepted; circuits through it carry at most `circuit_bytes` bytes for at most
    /// `circuit_secs` seconds (`None`: the relay set no limit).
    Reserved {
        circuit_bytes: Option<u64>,
        circuit_secs: Option<u64>,
    },
    /// The reservation or the connection to the relay ended; it is asked for again.
    Lost {
        reason: String,
    },
}

/// How the NAT in front of this node maps ports, as the addresses peers observed tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// Fewer than two peers observed one transport's address yet.
    Unknown,
    /// Every peer saw the same address and port: hole punching can work.
    EndpointIndependent,
    /// Peers saw different ports for one transport: the NAT picks a port per destination
    /// ("symmetric"), so the port a hole punch aims at is not the one the NAT will use.
    EndpointDependent,
}

/// Hole punches with peers that reached us over a relay (or we them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolePunches {
    pub succeeded: u32,
    pub failed: u32,
    pub last_error: Option<String>,
}

/// The operator's answer: how requesters can reach this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// An address is confirmed reachable from outside.
    Public,
    /// Behind a NAT that keeps ports, with a relay to meet through: requesters connect directly
    /// after a hole punch.
    HolePunchable,
    /// Behind a NAT hole punching cannot cross, or every punch failed: only relayed.
    RelayedOnly,
    /// No address confirmed and no relay reservation: nobody outside can reach this node.
    Unreachable,
    /// Not enough known yet (no AutoNAT answer, no reservation).
    Unknown,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Public => "public",
            Verdict::HolePunchable => "behind NAT, hole-punchable",
            Verdict::RelayedOnly => "relayed only",
            Verdict::Unreachable => "unreachable",
            Verdict::Unknown => "unknown",
        }
    }
}

/// The snapshot: everything `doctor` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reachability {
    pub peer_id: String,
    pub listen: Vec<String>,
    pub addresses: Vec<AddressStatus>,
    /// observer peer id → the address it saw us at (direct connections only).
    pub observed: BTreeMap<String, String>,
    pub relays: Vec<RelayStatus>,
    pub hole_punches: HolePunches,
    /// Whether UPnP is on, and what it did.
    pub upnp: Option<String>,
    /// Whether this node serves as a relay, with its circuit byte limit.
    pub relay_server_circuit_bytes: Option<u64>,
    pub updated_at_ms: u64,
}

/// The transport part of an address that a NAT maps: ("tcp" | "udp", ip, port).
fn socket_of(addr: &Multiaddr) -> Option<(&'static str, String, u16)> {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(a.to_string()),
            Protocol::Ip6(a) => ip = Some(a.to_string()),
            Protocol::Tcp(port) => return ip.map(|i| ("tcp", i, port)),
            Protocol::Udp(port) => return ip.map(|i| ("udp", i, port)),
            Protocol::P2pCircuit => return None,
            _ => {}
        }
    }
    None
}

/// Whether `addr`'s IP is a public one (not loopback, private, link-local, shared or
/// documentation space). A relay takes such listen addresses as its external ones at once: its
/// operator put it on a public address, and libp2p's relay server refuses reservations until it
/// knows an external address, which AutoNAT would otherwise take seconds to confirm after every
/// start.
pub fn is_public_ip(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => {
            let [a, b, ..] = ip.octets();
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_documentation()
                || (a == 100 && (b & 0xc0) == 64))
        }
        // Global unicast, 2000::/3.
        Some(Protocol::Ip6(ip)) => (ip.segments()[0] & 0xe000) == 0x2000,
        _ => false,
    }
}

impl Reachability {
    /// Notes an AutoNAT v2 result.
    pub fn tested(&mut self, addr: &Multiaddr, server: String, result: Result<(), String>) {
        let state = match result {
            Ok(()) => AddrState::Reachable {
                confirmed_by: server,
            },
            Err(error) => AddrState::Unreachable {
                tested_by: server,
                error,
            },
        };
        self.set_addr(addr, state);
    }

    /// Notes a candidate address (observed, or mapped by UPnP) unless already known.
    pub fn candidate(&mut self, addr: &Multiaddr) {
        let s = addr.to_string();
        if !self.addresses.iter().any(|a| a.addr == s) {
            self.set_addr(addr, AddrState::Untested);
        }
    }

    fn set_addr(&mut self, addr: &Multiaddr, state: AddrState) {
        let s = addr.to_string();
        if let Some(a) = self.addresses.iter_mut().find(|a| a.addr == s) {
            a.state = state;
            return;
        }
        if self.addresses.len() >= MAX_ADDRESSES {
            self.addresses.remove(0);
        }
        self.addresses.push(AddressStatus { addr: s, state });
    }

    /// Notes where a directly connected peer saw us (a relayed address says nothing about
    /// our NAT's mapping, so it is ignored).
    pub fn observed_by(&mut self, observer: String, addr: &Multiaddr) {
        if addr.iter().any(|p| p == Protocol::P2pCircuit) || socket_of(addr).is_none() {
            return;
        }
        if self.observed.len() >= MAX_OBSERVERS && !self.observed.contains_key(&observer) {
            return;
        }
        self.observed.insert(observer, addr.to_string());
    }

    /// What the observations say about the NAT's port mapping.
    pub fn mapping(&self) -> Mapping {
        let mut ports: BTreeMap<(&'static str, String), Vec<u16>> = BTreeMap::new();
        for a in self.observed.values() {
            if let Some((t, ip, port)) = a.parse::<Multiaddr>().ok().as_ref().and_then(socket_of) {
                ports.entry((t, ip)).or_default().push(port);
            }
        }
        let mut seen_two = false;
        for list in ports.values() {
            if list.len() >= 2 {
                seen_two = true;
                if list.iter().any(|p| *p != list[0]) {
                    return Mapping::EndpointDependent;
                }
            }
        }
        if seen_two {
            Mapping::EndpointIndependent
        } else {
            Mapping::Unknown
        }
    }

    pub fn relay_mut(&mut self, relay: &str) -> Option<&mut RelayStatus> {
        self.relays.iter_mut().find(|r| r.relay == relay)
    }

    /// Notes that a reservation on `relay` is being asked for.
    pub fn reserving(&mut self, relay: String, circuit_addr: String) {
        if let Some(r) = self.relay_mut(&relay) {
            r.state = RelayState::Reserving;
            r.circuit_addr = circuit_addr;
            r.attempts = r.attempts.saturating_add(1);
            return;
        }
        if self.relays.len() >= MAX_RELAYS {
            return;
        }
        self.relays.push(RelayStatus {
            relay,
            circuit_addr,
            state: RelayState::Reserving,
            attempts: 1,
        });
    }

    /// The relays that hold a reservation for us now.
    pub fn reserved(&self) -> impl Iterator<Item = &RelayStatus> {
        self.relays
            .iter()
            .filter(|r| matches!(r.state, RelayState::Reserved { .. }))
    }

    pub fn is_public(&self) -> bool {
        self.addresses
            .iter()
            .any(|a| matches!(a.state, AddrState::Reachable { .. }))
    }

    pub fn verdict(&self) -> Verdict {
        if self.is_public() {
            return Verdict::Public;
        }
        let relayed = self.reserved().next().is_some();
        let tested = self
            .addresses
            .iter()
            .any(|a| matches!(a.state, AddrState::Unreachable { .. }));
        if !relayed {
            return if tested || !self.relays.is_empty() {
                Verdict::Unreachable
            } else {
                Verdict::Unknown
            };
        }
        let punches = &self.hole_punches;
        match self.mapping() {
            Mapping::EndpointDependent => Verdict::RelayedOnly,
            _ if punches.succeeded > 0 => Verdict::HolePunchable,
            _ if punches.failed > 0 => Verdict::RelayedOnly,
            Mapping::EndpointIndependent => Verdict::HolePunchable,
            Mapping::Unknown => Verdict::Unknown,
        }
    }

    /// One sentence on what the operator can do.
    pub fn advice(&self) -> String {
        let port = self
            .listen
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .find_map(|a| socket_of(&a).map(|(t, _, p)| format!("{t} port {p}")))
            .unwrap_or_else(|| "a fixed port (set `listen`)".into());
        let relay = self
            .reserved()
            .next()
            .map(|r| r.relay.clone())
            .unwrap_or_default();
        let limit = self.reserved().find_map(|r| match r.state {
            RelayState::Reserved { circuit_bytes, .. } => circuit_bytes,
            _ => None,
        });
        match self.verdict() {
            Verdict::Public => "Nothing to do: requesters reach this node directly.".into(),
            Verdict::HolePunchable => format!(
                "Requesters reach this node by hole punching, meeting through relay {relay}; \
                 to be reachable without it, forward {port} on your router to this machine \
                 (or set `upnp = true`)."
            ),
            Verdict::RelayedOnly => format!(
                "Your NAT changes ports per destination (or every hole punch failed), so \
                 requesters reach you only through relay {relay}, which carries results only up \
                 to {} per circuit; forward {port} on your router to this machine (or set \
                 `upnp = true`) to be reachable directly.",
                limit.map_or("its operator's limit".to_owned(), |b| format!("{b} bytes"))
            ),
            Verdict::Unreachable => format!(
                "Nobody outside can reach this node: no address is confirmed and no relay holds \
                 a reservation; bootstrap from a node that runs with `--relay`, or forward \
                 {port} on your router to this machine."
            ),
            Verdict::Unknown => "Not enough is known yet: keep the node running for a minute \
                                 with at least one bootstrap peer, then ask again."
                .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap_or_else(|_| Multiaddr::empty())
    }

    fn reserved() -> Reachability {
        let mut r = Reachability::default();
        r.reserving("R".into(), "/p2p-circuit".into());
        if let Some(s) = r.relay_mut("R") {
            s.state = RelayState::Reserved {
                circuit_bytes: Some(131_072),
                circuit_secs: Some(120),
            };
        }
        r
    }

    #[test]
    fn same_port_from_two_observers_is_endpoint_independent() {
        let mut r = reserved();
        r.observed_by("A".into(), &addr("/ip4/11.0.0.9/udp/4001/quic-v1"));
        assert_eq!(r.mapping(), Mapping::Unknown);
        r.observed_by("B".into(), &addr("/ip4/11.0.0.9/udp/4001/quic-v1"));
        assert_eq!(r.mapping(), Mapping::EndpointIndependent);
        assert_eq!(r.verdict(), Verdict::HolePunchable);
    }

    #[test]
    fn different_ports_mean_relayed_only_even_after_a_lucky_punch() {
        let mut r = reserved();
        r.observed_by("A".into(), &addr("/ip4/11.0.0.9/tcp/4001"));
        r.observed_by("B".into(), &addr("/ip4/11.0.0.9/tcp/53122"));
        r.hole_punches.succeeded = 1;
        assert_eq!(r.mapping(), Mapping::EndpointDependent);
        assert_eq!(r.verdict(), Verdict::RelayedOnly);
        assert!(r.advice().contains("131072 bytes"), "{}", r.advice());
    }

    #[test]
    fn a_confirmed_address_is_public_whatever_else() {
        let mut r = reserved();
        r.tested(&addr("/ip4/11.0.0.9/tcp/4001"), "S".into(), Ok(()));
        assert_eq!(r.verdict(), Verdict::Public);
    }

    #[test]
    fn no_reservation_and_a_failed_probe_is_unreachable() {
        let mut r = Reachability::default();
        assert_eq!(r.verdict(), Verdict::Unknown);
        r.tested(
            &addr("/ip4/11.0.0.9/tcp/4001"),
            "S".into(),
            Err("dial back failed".into()),
        );
        assert_eq!(r.verdict(), Verdict::Unreachable);
    }

    #[test]
    fn only_public_ips_count_as_public() {
        assert!(is_public_ip(&addr("/ip4/11.0.0.1/udp/4001/quic-v1")));
        assert!(is_public_ip(&addr("/ip6/2001:db9::1/tcp/4001")));
        for a in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/192.168.1.2/tcp/1",
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/169.254.0.1/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/dns4/example.com/tcp/1",
        ] {
            assert!(!is_public_ip(&addr(a)), "{a}");
        }
    }

    #[test]
    fn circuit_observations_are_ignored_and_lists_stay_bounded() {
        let mut r = Reachability::default();
        r.observed_by("C".into(), &addr("/ip4/11.0.0.1/tcp/1/p2p-circuit"));
        assert!(r.observed.is_empty());
        for i in 0..100u16 {
            r.observed_by(format!("P{i}"), &addr(&format!("/ip4/11.0.0.9/tcp/{i}")));
            r.candidate(&addr(&format!("/ip4/11.0.0.9/tcp/{i}")));
        }
        assert_eq!(r.observed.len(), MAX_OBSERVERS);
        assert_eq!(r.addresses.len(), MAX_ADDRESSES);
    }
}
