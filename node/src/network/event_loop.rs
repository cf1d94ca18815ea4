//! The task that owns the `Swarm`. It turns commands into swarm calls, swarm events into
//! [`NetEvent`]s and replies, validates every gossiped advert before gossipsub may forward it,
//! and never blocks on the node's services: a full event queue makes it refuse, not wait.
//! Under fault injection it also keeps the swarm's block list equal to the peers the current
//! partition cuts this node off from (closing their connections, denying new ones), and redials
//! them when the partition heals.
//!
//! Reachability: it reserves on relays (see [`super::relays`]), records what AutoNAT, identify,
//! DCUtR and UPnP report in a [`Reachability`], holds a request to a peer reached only through
//! a relay until the hole punch ends (at most [`HOLE_PUNCH_WAIT`]), and once a hole punch
//! connected it directly, closes the relayed connection as soon as no request of ours uses it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use libp2p::metrics::{Metrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionDenied, ConnectionId, DialError, ListenError, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, SwarmBuilder, allow_block_list, dcutr, gossipsub, identify, mdns,
    noise, relay, tcp, upnp, yamux,
};
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{CapacityAdvert, PublicKey, SecretKey, Signed};
use tokio::sync::{mpsc, oneshot, watch};

use super::LinkFaults;
use super::addr_scope;
use super::behaviour::{ADVERT_TOPIC, Behaviour, BehaviourEvent, BehaviourSettings, KAD_PROTOCOL};
use super::codec::{Request, Response};
use super::path::{PathKind, Via};
use super::reachability::{Reachability, RelayState};
use super::relays::{RelayAction, Relays};
use super::{Command, NetConfig, NetError, NetEvent};

/// Highest advert sequence seen per provider, so a replayed older advert is ignored. Bounded:
/// past this many providers the stalest entry is forgotten (it would be expired anyway).
const MAX_TRACKED_PROVIDERS: usize = 10_000;
/// Re-run the Kademlia bootstrap this often so the routing table stays fresh.
const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(60);
/// On shutdown, responses already handed to the swarm (a receipt's ack among them) get this
/// long to reach their peers before the connections close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// What a refused inbound request tells the peer when our services are saturated.
const BUSY_RETRY_MS: u64 = 1_000;
/// How long a request to a peer reached only through a relay waits for the hole punch before
/// it goes over the relay. A punch between two home NATs takes a round trip or two; the
/// requester's quote gives up after 3 s, so the wait stays below it.
const HOLE_PUNCH_WAIT: Duration = Duration::from_secs(2);
/// Requests held for one peer while its hole punch runs; past it they go over the relay.
const MAX_HELD_PER_PEER: usize = 32;
/// Peers whose advertised addresses are kept (the size of the requester's provider table).
const MAX_ADVERT_ADDRS: usize = 1_000;
/// How often the relay watchdog and the hold deadlines are looked at.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// While the node has no connection at all, it dials its bootstrap peers again this often. A
/// bootstrap peer at its connection bound denies the first dial, and Kademlia forgets a peer it
/// could not reach, so without this a node whose bootstrap peers were full (or down) when it
/// started stayed alone for good (two of a 90-node market's requesters did). Five seconds is a
/// dial per bootstrap peer every few of the peer's own connection churns, not a flood.
const BOOTSTRAP_REDIAL: Duration = Duration::from_secs(5);

/// A node walks Kademlia for more peers only below this many connections: half its bound. A
/// gossip mesh wants 6 to 12 peers, so half of the default bound of 32 is ample, and the rest
/// stays free for the connections jobs open.
fn walk_below(max_connections: u32) -> usize {
    usize::try_from(max_connections / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

use crate::now_ms;

/// Owns the swarm; run it with [`EventLoop::run`] on its own task.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<Response, NetError>>)>,
    /// provider → (highest seq, issued_at) of the adverts accepted from it.
    advert_seq: BTreeMap<PublicKey, (u64, u64)>,
    topic: gossipsub::IdentTopic,
    metrics: Metrics,
    bootstrap: Vec<Multiaddr>,
    /// When the bootstrap peers were last dialed (see [`BOOTSTRAP_REDIAL`]).
    bootstrap_dialed_at: tokio::time::Instant,
    /// The bootstrap peers were dialed again after the node was alone: its next connection
    /// starts a Kademlia bootstrap.
    rejoining: bool,
    /// Responses given to the swarm and not yet reported sent or failed.
    responses_in_flight: usize,
    /// The connection bound, for [`super::trim`].
    max_connections: u32,
    /// This node publishes adverts (a provider), for [`super::trim::target`].
    publishing: bool,
    faults: Option<LinkFaults>,
    /// Peers the current partition cuts this node off from (the swarm's block list).
    cut_off: BTreeSet<PeerId>,
    reach: Reachability,
    relays: Relays,
    reserve_on_relays: bool,
    /// Every open connection: whose, and whether relayed.
    connections: HashMap<ConnectionId, Conn>,
    /// Requests waiting for a hole punch (or the first connection) to `peer`, until the deadline.
    held: HashMap<PeerId, Held>,
    /// Peers a hole punch connected directly whose relayed connections close once no request
    /// of ours is pending on them.
    retire_relayed: BTreeSet<PeerId>,
    /// Peers whose relayed connections are being closed: requests to them wait until the
    /// swarm reports them closed, or request-response could still pick one.
    closing_relayed: BTreeSet<PeerId>,
    /// Peers reached only through a relay whose hole punch may still report, until when.
    punch_until: HashMap<PeerId, tokio::time::Instant>,
    /// Peers connected by a hole punch (for [`PathKind::HolePunched`]).
    punched: BTreeSet<PeerId>,
    /// Addresses providers advertised, to dial them by.
    advert_addrs: BTreeMap<PeerId, Vec<Multiaddr>>,
    /// Circuit limits learnt when a peer opened a circuit to us (what its relay lets through).
    circuit_limits: HashMap<PeerId, Option<u64>>,
}

#[derive(Debug, Clone)]
struct Conn {
    peer: PeerId,
    relayed: bool,
    /// When it was opened or last carried a request or response (see [`super::trim`]).
    last_used: tokio::time::Instant,
    /// Requests that came in on it whose responses are not yet sent or failed.
    answering: u32,
    /// This node has asked the swarm to close it (see [`EventLoop::close`]).
    closing: bool,
    /// The address this node dialled, for a direct outbound connection.
    dialed: Option<Multiaddr>,
    /// The connection's far end: the address dialled, or the one an inbound connection came
    /// from (for a peer behind NAT, its router's).
    remote: Multiaddr,
}

/// Where the answer to one request goes.
type Reply = oneshot::Sender<Result<Response, NetError>>;

struct Held {
    deadline: tokio::time::Instant,
    /// The dial to the advertised addresses these wait for, if any.
    dial: Option<ConnectionId>,
    requests: Vec<(Box<Request>, Reply)>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer", self.swarm.local_peer_id())
            .finish()
    }
}

impl EventLoop {
    pub(super) fn new(
        key: &SecretKey,
        config: &NetConfig,
        registry: Option<&mut prometheus_client::registry::Registry>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<NetEvent>,
    ) -> Result<Self, NetError> {
        let mut scratch = prometheus_client::registry::Registry::default();
        let registry = registry.unwrap_or(&mut scratch);
        let settings = BehaviourSettings {
            mdns: config.mdns,
            request_timeout: config.request_timeout,
            max_connections: config.max_connections,
            relay_server: config.relay_server,
            upnp: config.upnp,
        };
        let transport = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
        let mut swarm = SwarmBuilder::with_existing_identity(key.to_libp2p_keypair())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| transport(&e))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| transport(&e))?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|k, relay_client| {
                Behaviour::new(k, relay_client, settings)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            })
            .map_err(|e| transport(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
            .build();
        let metrics = Metrics::new(registry);
        let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| NetError::Publish(e.to_string()))?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
        }
        let mut this = Self {
            swarm,
            commands,
            events,
            pending: HashMap::new(),
            advert_seq: BTreeMap::new(),
            topic,
            metrics,
            bootstrap: config.bootstrap.clone(),
            bootstrap_dialed_at: tokio::time::Instant::now(),
            rejoining: false,
            responses_in_flight: 0,
            max_connections: config.max_connections,
            publishing: false,
            faults: config.faults.clone(),
            cut_off: BTreeSet::new(),
            reach: Reachability::default(),
            relays: Relays::default(),
            reserve_on_relays: config.reserve_on_relays && config.relay_server.is_none(),
            connections: HashMap::new(),
            held: HashMap::new(),
            retire_relayed: BTreeSet::new(),
            closing_relayed: BTreeSet::new(),
            punched: BTreeSet::new(),
            punch_until: HashMap::new(),
            advert_addrs: BTreeMap::new(),
            circuit_limits: HashMap::new(),
        };
        this.reach.peer_id = this.swarm.local_peer_id().to_string();
        this.reach.relay_server_circuit_bytes = config.relay_server.map(|l| l.max_circuit_bytes);
        this.reach.upnp = config
            .upnp
            .then(|| "asked the router for a mapping".to_owned());
        for addr in config.bootstrap.clone() {
            this.dial(addr)?;
        }
        Ok(this)
    }

    /// Runs until a `Shutdown` command or until every [`super::Client`] is dropped; then lets the
    /// responses in flight reach their peers (at most [`DRAIN_TIMEOUT`]) and closes.
    pub async fn run(mut self) {
        let mut bootstrap = tokio::time::interval(BOOTSTRAP_INTERVAL);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut partition = self.faults.as_ref().map(LinkFaults::subscribe);
        self.apply_partition();
        loop {
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    None | Some(Command::Shutdown) => break,
                    Some(c) => self.on_command(c),
                },
                Some(()) = partition_changed(&mut partition) => self.apply_partition(),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = bootstrap.tick(), if !self.bootstrap.is_empty() => {
                    // A walk dials the peers it meets, and gossip keeps what it opened open:
                    // walk only while the node has fewer connections than it wants.
                    if self.connections.len() < walk_below(self.max_connections) {
                        // Fails only when the routing table is empty; the next tick retries.
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while self.responses_in_flight > 0 {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => self.on_swarm_event(event),
                Err(_) => break,
            }
        }
        // Close connections gracefully so what was written is flushed to the peers; dropping
        // the swarm would cut them with data still in the muxer's buffers.
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        while self.swarm.connected_peers().next().is_some() {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => self.on_swarm_event(event),
                Err(_) => break,
            }
        }
        for (peer, held) in self.held.drain() {
            for (_, reply) in held.requests {
                let _ = reply.send(Err(NetError::Request {
                    peer,
                    reason: "node stopped".into(),
                }));
            }
        }
        for (_, (peer, reply)) in self.pending.drain() {
            let _ = reply.send(Err(NetError::Request {
                peer,
                reason: "node stopped".into(),
            }));
        }
        tracing::debug!(peer = %self.swarm.local_peer_id(), "network event loop stopped");
    }

    /// Makes the block list match the partition: newly cut-off peers are blocked (the block
    /// list closes their connections), reachable-again peers are unblocked and redialled.
    fn apply_partition(&mut self) {
        let Some(faults) = &self.faults else {
            return;
        };
        let local = *self.swarm.local_peer_id();
        let now = faults.cut_off_from(&local);
        for peer in now.difference(&self.cut_off) {
            if self.swarm.is_connected(peer) {
                faults.count_closed_connection();
            }
            self.swarm.behaviour_mut().blocked.block_peer(*peer);
        }
        let healed: Vec<PeerId> = self.cut_off.difference(&now).copied().collect();
        for peer in healed {
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            // Uses the addresses Kademlia and identify know; fails harmlessly without any.
            let _ = self.swarm.dial(peer);
        }
        self.cut_off = now;
    }

    /// Counts a connection the partition's block list denied.
    fn note_denied(&self, cause: &ConnectionDenied) {
        if let Some(faults) = &self.faults
            && cause.downcast_ref::<allow_block_list::Blocked>().is_some()
        {
            faults.count_refused_connection();
        }
    }

    fn dial(&mut self, addr: Multiaddr) -> Result<(), NetError> {
        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
            self.swarm.add_peer_address(peer, addr.clone());
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        self.swarm.dial(addr.clone()).map_err(|e| {
            if let DialError::Denied { cause } = &e {
                self.note_denied(cause);
            }
            NetError::Dial {
                addr: addr.to_string(),
                reason: e.to_string(),
            }
        })
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => {
                let r =
                    self.swarm
                        .listen_on(addr.clone())
                        .map(|_| ())
                        .map_err(|e| NetError::Listen {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        });
                let _ = reply.send(r);
            }
            Command::Dial { addr, reply } => {
                let _ = reply.send(self.dial(addr));
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                // The client checks too; this covers a partition set while the command queued.
                if self.cut_off.contains(&peer) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: "peer unreachable: cut off by a network partition".into(),
                    }));
                    return;
                }
                self.request(peer, request, reply);
            }
            Command::Respond { channel, response } => {
                // Fails only if the peer went away or the stream timed out: nothing to do.
                // Counted until the swarm reports it sent or failed, so shutdown drains it.
                if self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, *response)
                    .is_ok()
                {
                    self.responses_in_flight += 1;
                }
            }
            Command::Publish { advert, reply } => {
                self.publishing = true;
                let r = match advert.to_bytes() {
                    Ok(bytes) => match self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(self.topic.clone(), bytes)
                    {
                        // Nobody to tell yet, or the same advert again: not an error.
                        Ok(_)
                        | Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
                        | Err(gossipsub::PublishError::Duplicate) => Ok(()),
                        Err(e) => Err(NetError::Publish(e.to_string())),
                    },
                    Err(e) => Err(NetError::Publish(e.to_string())),
                };
                let _ = reply.send(r);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::ConnectionCount { reply } => {
                let info = self.swarm.network_info();
                let _ = reply.send(info.connection_counters().num_established());
            }
            Command::Reachability { reply } => {
                let mut r = self.reach.clone();
                r.updated_at_ms = now_ms();
                let _ = reply.send(r);
            }
            Command::AdvertisedAddrs { reply } => {
                let _ = reply.send(self.advertised_addrs());
            }
            Command::PathTo { peer, reply } => {
                let _ = reply.send(self.path_to(&peer));
            }
            Command::GossipStanding { peer, reply } => {
                let gossip = &self.swarm.behaviour().gossipsub;
                let topic = gossipsub::IdentTopic::new(super::behaviour::ADVERT_TOPIC).hash();
                let _ = reply.send(super::GossipStanding {
                    score: gossip.peer_score(&peer),
                    in_mesh: gossip.mesh_peers(&topic).any(|p| p == &peer),
                });
            }
            Command::Shutdown => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(e)) => self.on_rpc(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => {
                self.metrics.record(&e);
                if let gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                } = e
                {
                    self.on_gossip(propagation_source, message_id, message);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => {
                self.metrics.record(&*e);
                if let identify::Event::Received {
                    peer_id,
                    info,
                    connection_id,
                } = *e
                {
                    self.on_identified(peer_id, connection_id, &info);
                    if info.protocols.contains(&KAD_PROTOCOL)
                        && let Some(conn) = self.connections.get(&connection_id)
                    {
                        // Only direct addresses that others who see the peer as we do can
                        // dial: the routing table is shared with them (see `addr_scope`).
                        let seen_at = conn.remote.clone();
                        for addr in info.listen_addrs {
                            if addr_scope::for_routing_table(&seen_at, &addr) {
                                self.add_to_routing_table(peer_id, addr);
                            }
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.on_relay_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(e)) => {
                tracing::debug!(event = ?e, "relay");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => self.on_dcutr(e),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(e)) => {
                tracing::debug!(addr = %e.tested_addr, server = %e.server, ok = e.result.is_ok(), "autonat probe");
                self.reach.tested(
                    &e.tested_addr,
                    e.server.to_string(),
                    e.result.map_err(|e| e.to_string()),
                );
            }
            SwarmEvent::Behaviour(BehaviourEvent::AutonatServer(e)) => {
                tracing::debug!(client = %e.client, addr = %e.tested_addr, ok = e.result.is_ok(), "served autonat probe");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Upnp(e)) => self.on_upnp(e),
            SwarmEvent::NewExternalAddrCandidate { address } => self.reach.candidate(&address),
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self.relays.closed(listener_id, tokio::time::Instant::now()) {
                    let reason = match reason {
                        Ok(()) => "the relay closed the reservation".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    tracing::info!(%relay, %reason, "relay reservation lost; asking again");
                    self.set_relay_state(&relay, RelayState::Lost { reason });
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let a = address.to_string();
                self.reach.listen.retain(|l| *l != a);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    self.swarm.add_peer_address(peer, addr);
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.metrics.record(&e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.metrics.record(&e),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(_)) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                let relayed = address.iter().any(|p| p == Protocol::P2pCircuit);
                if !relayed
                    && self.reach.relay_server_circuit_bytes.is_some()
                    && super::reachability::is_public_ip(&address)
                {
                    // A relay serves reservations only once it knows an external address.
                    self.swarm.add_external_address(address.clone());
                }
                if !relayed && self.reach.listen.len() < super::reachability::MAX_ADDRESSES {
                    self.reach.listen.push(address.to_string());
                }
                let _ = self.events.try_send(NetEvent::Listening(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                let direct_before = self
                    .connections
                    .values()
                    .any(|c| c.peer == peer_id && !c.relayed);
                if relayed && !direct_before {
                    // DCUtR starts on a new relayed connection at once.
                    self.punch_until
                        .insert(peer_id, tokio::time::Instant::now() + HOLE_PUNCH_WAIT);
                }
                self.connections.insert(
                    connection_id,
                    Conn {
                        peer: peer_id,
                        relayed,
                        last_used: tokio::time::Instant::now(),
                        answering: 0,
                        closing: false,
                        dialed: match &endpoint {
                            libp2p::core::ConnectedPoint::Dialer { address, .. } if !relayed => {
                                Some(address.clone())
                            }
                            _ => None,
                        },
                        remote: endpoint.get_remote_address().clone(),
                    },
                );
                if let Some(held) = self.held.get_mut(&peer_id) {
                    if relayed {
                        // Give the hole punch its moment; DCUtR's outcome releases them earlier.
                        held.deadline = tokio::time::Instant::now() + HOLE_PUNCH_WAIT;
                    } else {
                        self.release(peer_id);
                    }
                }
                if num_established.get() == 1 {
                    let _ = self.events.try_send(NetEvent::PeerConnected(peer_id));
                }
                if std::mem::take(&mut self.rejoining) {
                    // Back from being alone: look for the rest of the network now, not at the
                    // next periodic bootstrap (up to a minute away).
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.connections.remove(&connection_id);
                if self.closing_relayed.contains(&peer_id)
                    && !self
                        .connections
                        .values()
                        .any(|c| c.peer == peer_id && c.relayed)
                {
                    self.closing_relayed.remove(&peer_id);
                    self.release(peer_id);
                }
                if num_established == 0 {
                    self.circuit_limits.remove(&peer_id);
                    self.punched.remove(&peer_id);
                    self.punch_until.remove(&peer_id);
                    self.retire_relayed.remove(&peer_id);
                    if let Some(listener) = self.relays.lost(&peer_id, tokio::time::Instant::now())
                    {
                        self.swarm.remove_listener(listener);
                        let reason = match cause {
                            Some(e) => format!("the connection to the relay closed: {e}"),
                            None => "the connection to the relay closed".to_owned(),
                        };
                        tracing::info!(relay = %peer_id, %reason, "relay reservation lost; asking again");
                        self.set_relay_state(&peer_id, RelayState::Lost { reason });
                    }
                    let _ = self.events.try_send(NetEvent::PeerDisconnected(peer_id));
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                if let ListenError::Denied { cause } = &error {
                    self.note_denied(cause);
                }
                tracing::debug!(%send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::OutgoingConnectionError {
                error,
                peer_id,
                connection_id,
            } => {
                if let DialError::Denied { cause } = &error {
                    self.note_denied(cause);
                }
                // Our dial to the advertised addresses failed: the held requests go out now and
                // fail (or dial again) with the real reason. Another dial's failure (Kademlia's)
                // leaves ours running.
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                    && self
                        .held
                        .get(&peer)
                        .is_some_and(|h| h.dial == Some(connection_id))
                {
                    tracing::debug!(%peer, %error, "dial to the advertised addresses failed");
                    self.release(peer);
                }
            }
            _ => {}
        }
    }

    fn on_rpc(&mut self, event: request_response::Event<Request, Response>) {
        if let request_response::Event::Message {
            connection_id,
            message,
            ..
        } = &event
            && let Some(c) = self.connections.get_mut(connection_id)
        {
            c.last_used = tokio::time::Instant::now();
            if matches!(message, request_response::Message::Request { .. }) {
                c.answering = c.answering.saturating_add(1);
            }
        }
        match event {
            request_response::Event::Message {
                peer,
                message,
                connection_id,
            } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let via = match self.connections.get(&connection_id) {
                        Some(c) if c.relayed => Via::Relayed {
                            circuit_bytes: self.circuit_limits.get(&peer).copied().flatten(),
                        },
                        _ => Via::Direct,
                    };
                    let event = NetEvent::Request {
                        peer,
                        request: Box::new(request),
                        channel,
                        via,
                    };
                    if let Err(e) = self.events.try_send(event) {
                        let (reason, event) = match e {
                            mpsc::error::TrySendError::Full(ev) => (
                                FailReason::Busy {
                                    retry_after_ms: BUSY_RETRY_MS,
                                },
                                ev,
                            ),
                            mpsc::error::TrySendError::Closed(ev) => (FailReason::ShuttingDown, ev),
                        };
                        if let NetEvent::Request {
                            channel, request, ..
                        } = event
                        {
                            tracing::warn!(%peer, kind = request.kind(), "refusing request: node saturated");
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .rpc
                                .send_response(channel, Response::Refused(reason));
                        }
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some((peer, reply)) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                        self.maybe_retire(peer);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    self.maybe_retire(peer);
                    let reason = error.to_string();
                    let _ = reply.send(Err(
                        if matches!(error, request_response::OutboundFailure::Timeout) {
                            NetError::Timeout { peer, reason }
                        } else {
                            NetError::Request { peer, reason }
                        },
                    ));
                }
            }
            request_response::Event::InboundFailure {
                peer,
                error,
                connection_id,
                ..
            } => {
                self.answered(connection_id);
                // A response handed to the swarm ends as `ResponseSent` or as one of these; a
                // request we never answered (omission, unsupported) was never counted. A
                // timeout or a closed connection can also hit a request still being handled,
                // which the saturating count then under-waits for by one.
                if !matches!(
                    error,
                    request_response::InboundFailure::ResponseOmission
                        | request_response::InboundFailure::UnsupportedProtocols
                ) {
                    self.responses_in_flight = self.responses_in_flight.saturating_sub(1);
                }
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { connection_id, .. } => {
                self.answered(connection_id);
                self.responses_in_flight = self.responses_in_flight.saturating_sub(1);
            }
        }
    }

    /// Whether `peer` is a provider whose advert this node accepted. A peer that never
    /// advertised is (most likely) a requester: one whose grafts providers with full meshes
    /// refuse, so it hears adverts only through the IHAVE gossip of the peers it is connected
    /// to. Closing those connections would cut it off the market, so trimming leaves them
    /// alone.
    fn advertised(&self, peer: &PeerId) -> bool {
        PublicKey::from_peer_id(peer).is_ok_and(|k| self.advert_seq.contains_key(&k))
    }

    /// A request that came in on `connection` got its response out (or failed).
    fn answered(&mut self, connection: ConnectionId) {
        if let Some(c) = self.connections.get_mut(&connection) {
            c.answering = c.answering.saturating_sub(1);
            c.last_used = tokio::time::Instant::now();
        }
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let verdict = self.check_advert(&message.data);
        let acceptance = match &verdict {
            Ok(_) => gossipsub::MessageAcceptance::Accept,
            Err(AdvertVerdict::Stale) => gossipsub::MessageAcceptance::Ignore,
            Err(AdvertVerdict::Invalid(reason)) => {
                tracing::warn!(%source, %reason, "rejecting invalid advert");
                gossipsub::MessageAcceptance::Reject
            }
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        if let Ok((signed, advert)) = verdict {
            self.note_advert_addrs(signed.signer().to_peer_id(), &advert.listen_addrs);
            // Adverts repeat every few seconds: dropping one when the node is busy is harmless.
            let _ = self.events.try_send(NetEvent::Advert {
                advert: Box::new(advert),
                signed: Box::new(signed),
            });
        }
    }

    /// Gives Kademlia `addr` of `peer` if the peer is in its routing table already or its
    /// bucket has room. Into a full bucket Kademlia would insert it pending and dial the
    /// bucket's oldest entry to see whether it is still alive: under the connection bound that
    /// entry is usually only disconnected, and each such dial is a handshake on both sides.
    fn add_to_routing_table(&mut self, peer: PeerId, addr: Multiaddr) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let room = kad.kbucket(peer).is_some_and(|bucket| {
            bucket.num_entries() < libp2p::kad::K_VALUE.get()
                || bucket.iter().any(|e| *e.node.key.preimage() == peer)
        });
        if room {
            kad.add_address(&peer, addr);
        }
    }

    fn check_advert(
        &mut self,
        data: &[u8],
    ) -> Result<(Signed<CapacityAdvert>, CapacityAdvert), AdvertVerdict> {
        let signed = Signed::<CapacityAdvert>::from_bytes(data)
            .map_err(|e| AdvertVerdict::Invalid(e.to_string()))?;
        let now = now_ms();
        // A signature check is most of an advert's cost, and under load many adverts arrive
        // after a newer one from the same provider or past their lifetime: those are dropped
        // unforwarded before it. Only the refusal rests on the unchecked body (a forged stale
        // advert is ignored, not scored); everything accepted is checked below.
        if let Ok(claimed) = signed.decode_unverified()
            && (claimed
                .issued_at_ms
                .saturating_add(pixmarket_protocol::validate::ADVERT_TTL_MS)
                < now
                || self
                    .advert_seq
                    .get(&signed.signer())
                    .is_some_and(|(seq, _)| claimed.seq <= *seq))
        {
            return Err(AdvertVerdict::Stale);
        }
        let advert = signed
            .verify()
            .map_err(|e| AdvertVerdict::Invalid(e.to_string()))?;
        if let Err(e) = advert.validate(now) {
            return Err(if e.field == "issued_at" {
                AdvertVerdict::Stale
            } else {
                AdvertVerdict::Invalid(e.to_string())
            });
        }
        let signer = signed.signer();
        if let Some((seq, _)) = self.advert_seq.get(&signer)
            && advert.seq <= *seq
        {
            return Err(AdvertVerdict::Stale);
        }
        if self.advert_seq.len() >= MAX_TRACKED_PROVIDERS && !self.advert_seq.contains_key(&signer)
        {
            let oldest = self
                .advert_seq
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.advert_seq.remove(&k);
            }
        }
        self.advert_seq
            .insert(signer, (advert.seq, advert.issued_at_ms));
        Ok((signed, advert))
    }
}

impl EventLoop {
    /// Sends `request` to `peer`, or holds it while a hole punch to the peer runs (or while the
    /// first connection to a provider known by its advert is being made).
    fn request(
        &mut self,
        peer: PeerId,
        request: Box<Request>,
        reply: oneshot::Sender<Result<Response, NetError>>,
    ) {
        if let Some(held) = self.held.get_mut(&peer)
            && held.requests.len() < MAX_HELD_PER_PEER
        {
            held.requests.push((request, reply));
            return;
        }
        let connected = self.swarm.is_connected(&peer);
        let relayed_only = connected
            && !self
                .connections
                .values()
                .any(|c| c.peer == peer && !c.relayed);
        let punching = (relayed_only
            && self
                .punch_until
                .get(&peer)
                .is_some_and(|t| *t > tokio::time::Instant::now()))
            || self.closing_relayed.contains(&peer);
        if !connected {
            self.make_room_for_a_dial();
        }
        if !connected && let Some(addrs) = self.advert_addrs.get(&peer) {
            // Even while another dial runs (Kademlia's, to addresses it learnt, which behind a
            // NAT are private ones): ours uses the addresses the provider advertised.
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::Disconnected)
                .addresses(addrs.clone())
                .build();
            let dial = opts.connection_id();
            if self.swarm.dial(opts).is_ok() {
                self.held.insert(
                    peer,
                    Held {
                        // Until the first connection; a relayed one then gives the punch its wait.
                        deadline: tokio::time::Instant::now() + HOLE_PUNCH_WAIT,
                        dial: Some(dial),
                        requests: vec![(request, reply)],
                    },
                );
                return;
            }
        }
        if punching {
            self.held.insert(
                peer,
                Held {
                    deadline: tokio::time::Instant::now() + HOLE_PUNCH_WAIT,
                    dial: None,
                    requests: vec![(request, reply)],
                },
            );
            return;
        }
        self.send_now(peer, request, reply);
    }

    fn send_now(
        &mut self,
        peer: PeerId,
        request: Box<Request>,
        reply: oneshot::Sender<Result<Response, NetError>>,
    ) {
        let id = self.swarm.behaviour_mut().rpc.send_request(&peer, *request);
        self.pending.insert(id, (peer, reply));
    }

    /// Sends every request held for `peer`.
    fn release(&mut self, peer: PeerId) {
        if let Some(held) = self.held.remove(&peer) {
            for (request, reply) in held.requests {
                self.send_now(peer, request, reply);
            }
        }
    }

    /// The relay watchdog and the held requests' deadlines.
    /// Dials the bootstrap peers again when the node has no connection and none is being
    /// made, at most every [`BOOTSTRAP_REDIAL`].
    fn redial_bootstrap_if_alone(&mut self, now: tokio::time::Instant) {
        let info = self.swarm.network_info();
        let alone = info.num_peers() == 0 && info.connection_counters().num_pending() == 0;
        if !alone || self.bootstrap.is_empty() || now < self.bootstrap_dialed_at + BOOTSTRAP_REDIAL
        {
            return;
        }
        self.bootstrap_dialed_at = now;
        self.rejoining = true;
        for addr in self.bootstrap.clone() {
            if let Err(e) = self.dial(addr) {
                tracing::debug!(error = %e, "bootstrap redial failed");
            }
        }
    }

    /// Closes idle connections above [`super::trim::target`], then connections not in use until
    /// [`super::trim::free_slots`] are free under the bound, so a requester dialling in for a
    /// quote is let in. The candidates are gathered once, and only when either has work.
    fn trim_connections(&mut self, now: tokio::time::Instant) {
        let max = usize::try_from(self.max_connections).unwrap_or(usize::MAX);
        let open = self.open_count();
        if open <= super::trim::target(self.max_connections, self.publishing)
            && open + super::trim::free_slots(max) <= max
        {
            return;
        }
        let mut candidates = self.trim_candidates();
        let idle = super::trim::to_close(self.max_connections, self.publishing, &candidates, now);
        candidates.retain(|c| !idle.contains(&c.id));
        let for_slots = super::trim::to_free_slots(self.max_connections, &candidates, now);
        for id in idle.into_iter().chain(for_slots) {
            self.close(id);
        }
    }

    /// Connections open and not being closed by this node.
    fn open_count(&self) -> usize {
        self.connections.values().filter(|c| !c.closing).count()
    }

    /// Starts closing `id`; until the swarm reports it closed it no longer counts as open for
    /// the trimming, so one that is slow to close is not answered by closing another.
    fn close(&mut self, id: ConnectionId) {
        if let Some(c) = self.connections.get_mut(&id) {
            c.closing = true;
        }
        self.swarm.close_connection(id);
    }

    /// Before dialing a peer for a request: at the bound, one connection not in use goes, so
    /// the dial is not denied by this node's own bound (a requester going from provider to
    /// provider would otherwise wait out [`super::trim::RECENT_USE`] per dial).
    fn make_room_for_a_dial(&mut self) {
        let max = usize::try_from(self.max_connections).unwrap_or(usize::MAX);
        if self.open_count() < max {
            return;
        }
        if let Some(id) = super::trim::for_a_dial(&self.trim_candidates()) {
            self.close(id);
        }
    }

    /// Every open connection as [`super::trim`] sees it.
    fn trim_candidates(&self) -> Vec<super::trim::Candidate> {
        let mesh: BTreeSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_mesh_peers()
            .copied()
            .collect();
        let waiting: BTreeSet<PeerId> = self
            .pending
            .values()
            .map(|(p, _)| *p)
            .chain(self.held.keys().copied())
            .collect();
        self.connections
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(id, c)| super::trim::Candidate {
                id: *id,
                last_used: c.last_used,
                kept: c.relayed
                    || c.answering > 0
                    || !self.advertised(&c.peer)
                    || mesh.contains(&c.peer)
                    || waiting.contains(&c.peer)
                    || self.relays.is_wanted(&c.peer),
            })
            .collect()
    }

    fn housekeeping(&mut self) {
        let now = tokio::time::Instant::now();
        self.redial_bootstrap_if_alone(now);
        self.trim_connections(now);
        let due: Vec<PeerId> = self
            .held
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            self.release(peer);
        }
        for action in self.relays.due(now) {
            match action {
                RelayAction::Reserve { relay, circuit } => {
                    match self.swarm.listen_on(circuit.clone()) {
                        Ok(id) => {
                            tracing::debug!(%relay, "asking for a relay reservation");
                            self.relays.listening(relay, id, now);
                            self.reach.reserving(relay.to_string(), circuit.to_string());
                        }
                        Err(e) => {
                            self.relays.lost(&relay, now);
                            self.set_relay_state(
                                &relay,
                                RelayState::Lost {
                                    reason: e.to_string(),
                                },
                            );
                        }
                    }
                }
                RelayAction::Drop { relay, listener } => {
                    self.swarm.remove_listener(listener);
                    self.relays.lost(&relay, now);
                    self.set_relay_state(
                        &relay,
                        RelayState::Lost {
                            reason: format!(
                                "no answer to the reservation within {} s",
                                super::relays::RESERVE_TIMEOUT.as_secs()
                            ),
                        },
                    );
                }
            }
        }
    }

    fn set_relay_state(&mut self, relay: &PeerId, state: RelayState) {
        if let Some(r) = self.reach.relay_mut(&relay.to_string()) {
            r.state = state;
        }
    }

    /// A peer told us who it is: where it saw us (on a direct connection), and whether it
    /// serves as a relay we should reserve on.
    fn on_identified(&mut self, peer: PeerId, connection: ConnectionId, info: &identify::Info) {
        let Some(conn) = self.connections.get(&connection).cloned() else {
            return;
        };
        if conn.relayed {
            return;
        }
        self.reach
            .observed_by(peer.to_string(), &info.observed_addr);
        if !self.reserve_on_relays || !info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            return;
        }
        let now = tokio::time::Instant::now();
        if self.relays.is_wanted(&peer) {
            // A relay back from a restart announces the protocol once it can serve again.
            self.relays.ready(&peer, now);
            self.housekeeping();
        } else if let Some(addr) = conn.dialed
            && self.relays.want(peer, &addr, now)
        {
            tracing::info!(relay = %peer, "reserving on relay");
            self.housekeeping();
        }
    }

    fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                limit,
                renewal,
            } => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                self.relays.accepted(&relay_peer_id);
                self.set_relay_state(
                    &relay_peer_id,
                    RelayState::Reserved {
                        circuit_bytes: limit.and_then(|l| l.data_in_bytes()),
                        circuit_secs: limit.and_then(|l| l.duration()).map(|d| d.as_secs()),
                    },
                );
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, limit } => {
                // One entry per connected peer; removed when its last connection closes.
                self.circuit_limits
                    .insert(src_peer_id, limit.and_then(|l| l.data_in_bytes()));
            }
            relay::client::Event::OutboundCircuitEstablished { .. } => {}
        }
    }

    fn on_dcutr(&mut self, event: dcutr::Event) {
        let peer = event.remote_peer_id;
        self.punch_until.remove(&peer);
        match event.result {
            Ok(_) => {
                tracing::info!(%peer, "hole punch connected directly");
                self.reach.hole_punches.succeeded =
                    self.reach.hole_punches.succeeded.saturating_add(1);
                self.punched.insert(peer);
                self.retire_relayed.insert(peer);
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "hole punch failed; staying relayed");
                self.reach.hole_punches.failed = self.reach.hole_punches.failed.saturating_add(1);
                self.reach.hole_punches.last_error = Some(e.to_string());
            }
        }
        // Closing the relayed connections first keeps the held requests off them.
        self.maybe_retire(peer);
        if !self.closing_relayed.contains(&peer) {
            self.release(peer);
        }
    }

    /// Closes the relayed connections to a hole-punched peer once no request of ours is
    /// pending (request-response spreads requests over a peer's connections, and a relayed
    /// one would carry only a coordination-sized share).
    fn maybe_retire(&mut self, peer: PeerId) {
        if !self.retire_relayed.contains(&peer)
            || self.held.contains_key(&peer)
            || self.pending.values().any(|(p, _)| *p == peer)
        {
            return;
        }
        self.retire_relayed.remove(&peer);
        let relayed: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, c)| c.peer == peer && c.relayed)
            .map(|(id, _)| *id)
            .collect();
        if relayed.is_empty() {
            return;
        }
        for id in relayed {
            self.swarm.close_connection(id);
        }
        self.closing_relayed.insert(peer);
        if let Some(held) = self.held.get_mut(&peer) {
            held.deadline = tokio::time::Instant::now() + HOLE_PUNCH_WAIT;
        }
    }

    fn on_upnp(&mut self, event: upnp::Event) {
        let note = match event {
            upnp::Event::NewExternalAddr {
                external_addr,
                local_addr,
            } => {
                self.reach.candidate(&external_addr);
                // UPnP has just declared the mapping confirmed, and the swarm passes no
                // candidate on to AutoNAT that equals a confirmed address. Take the
                // confirmation back and propose the address instead: it is advertised once
                // AutoNAT has reached it from outside, whichever of UPnP and identify was first.
                self.swarm.remove_external_address(&external_addr);
                self.swarm
                    .behaviour_mut()
                    .candidates
                    .propose(external_addr.clone());
                format!("mapped {local_addr} to {external_addr}")
            }
            upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                format!("the mapping to {external_addr} expired")
            }
            upnp::Event::GatewayNotFound => "no UPnP gateway answered".to_owned(),
            upnp::Event::NonRoutableGateway => {
                "the UPnP gateway is itself behind another NAT".to_owned()
            }
        };
        tracing::info!(%note, "upnp");
        self.reach.upnp = Some(note);
    }

    /// Confirmed direct addresses and reserved circuit addresses, `/p2p/<self>` appended, as
    /// many as an advert carries.
    fn advertised_addrs(&self) -> Vec<Multiaddr> {
        let me = *self.swarm.local_peer_id();
        let direct = self
            .swarm
            .external_addresses()
            .filter(|a| !a.iter().any(|p| p == Protocol::P2pCircuit));
        let relayed = self
            .swarm
            .listeners()
            .filter(|a| a.iter().any(|p| p == Protocol::P2pCircuit));
        direct
            .chain(relayed)
            .map(|a| {
                let mut a = a.clone();
                if !matches!(a.iter().last(), Some(Protocol::P2p(p)) if p == me) {
                    a.push(Protocol::P2p(me));
                }
                a
            })
            .filter(|a| {
                a.to_string().chars().count() <= pixmarket_protocol::validate::MAX_ADDR_CHARS
            })
            .take(pixmarket_protocol::validate::MAX_LISTEN_ADDRS)
            .collect()
    }

    fn path_to(&self, peer: &PeerId) -> PathKind {
        let mut relayed = false;
        for c in self.connections.values().filter(|c| c.peer == *peer) {
            if !c.relayed {
                return if self.punched.contains(peer) {
                    PathKind::HolePunched
                } else {
                    PathKind::Direct
                };
            }
            relayed = true;
        }
        if relayed {
            PathKind::Relayed
        } else {
            PathKind::NotConnected
        }
    }

    fn note_advert_addrs(&mut self, peer: PeerId, addrs: &[String]) {
        let parsed: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if parsed.is_empty() {
            return;
        }
        if self.advert_addrs.len() >= MAX_ADVERT_ADDRS && !self.advert_addrs.contains_key(&peer) {
            self.advert_addrs.pop_first();
        }
        self.advert_addrs.insert(peer, parsed);
    }
}

/// Resolves when the partition changes; never, without fault injection (or once the handle's
/// sender is gone), so the `select!` branch is then disabled.
async fn partition_changed(rx: &mut Option<watch::Receiver<u64>>) -> Option<()> {
    match rx {
        Some(rx) => rx.changed().await.ok(),
        None => None,
    }
}

enum AdvertVerdict {
    /// Old, expired or already seen: not forwarded, but not the forwarder's fault.
    Stale,
    /// Badly signed or malformed: the forwarder is penalised.
    Invalid(String),
}
