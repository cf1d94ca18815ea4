//! The task that owns the `Swarm`. It turns commands into swarm calls, swarm events into
//! [`NetEvent`]s and replies, validates every gossiped advert before gossipsub may forward it,
//! and never blocks on the node's services: a full event queue makes it refuse, not wait.
//! Under fault injection it also keeps the swarm's block list equal to the peers the current
//! partition cuts this node off from (closing their connections, denying new ones), and redials
//! them when the partition heals.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt;
use libp2p::metrics::{Metrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::{ConnectionDenied, DialError, ListenError, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, SwarmBuilder, allow_block_list, gossipsub, identify, mdns, noise,
    tcp, yamux,
};
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{CapacityAdvert, PublicKey, SecretKey, Signed};
use tokio::sync::{mpsc, oneshot, watch};

use super::LinkFaults;
use super::behaviour::{ADVERT_TOPIC, Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::codec::{Request, Response};
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
    /// Responses given to the swarm and not yet reported sent or failed.
    responses_in_flight: usize,
    faults: Option<LinkFaults>,
    /// Peers the current partition cuts this node off from (the swarm's block list).
    cut_off: BTreeSet<PeerId>,
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
        let mdns = config.mdns;
        let request_timeout = config.request_timeout;
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
            .with_bandwidth_metrics(registry)
            .with_behaviour(|k| {
                Behaviour::new(k, mdns, request_timeout)
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
            responses_in_flight: 0,
            faults: config.faults.clone(),
            cut_off: BTreeSet::new(),
        };
        for addr in config.bootstrap.clone() {
            this.dial(addr)?;
        }
        Ok(this)
    }

    /// Runs until a `Shutdown` command or until every [`super::Client`] is dropped; then lets the
    /// responses in flight reach their peers (at most [`DRAIN_TIMEOUT`]) and closes.
    pub async fn run(mut self) {
        let mut bootstrap = tokio::time::interval(BOOTSTRAP_INTERVAL);
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
                    // Fails only when the routing table is empty; the next tick retries.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
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
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, *request);
                self.pending.insert(id, (peer, reply));
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
                if let identify::Event::Received { peer_id, info, .. } = *e
                    && info.protocols.contains(&KAD_PROTOCOL)
                {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
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
                let _ = self.events.try_send(NetEvent::Listening(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if num_established.get() == 1 => {
                let _ = self.events.try_send(NetEvent::PeerConnected(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let _ = self.events.try_send(NetEvent::PeerDisconnected(peer_id));
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
                error: DialError::Denied { cause },
                ..
            } => self.note_denied(&cause),
            _ => {}
        }
    }

    fn on_rpc(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let event = NetEvent::Request {
                        peer,
                        request: Box::new(request),
                        channel,
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
                    if let Some((_, reply)) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
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
            request_response::Event::InboundFailure { peer, error, .. } => {
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
            request_response::Event::ResponseSent { .. } => {
                self.responses_in_flight = self.responses_in_flight.saturating_sub(1);
            }
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
            // Adverts repeat every few seconds: dropping one when the node is busy is harmless.
            let _ = self.events.try_send(NetEvent::Advert {
                advert: Box::new(advert),
                signed: Box::new(signed),
            });
        }
    }

    fn check_advert(
        &mut self,
        data: &[u8],
    ) -> Result<(Signed<CapacityAdvert>, CapacityAdvert), AdvertVerdict> {
        let signed = Signed::<CapacityAdvert>::from_bytes(data)
            .map_err(|e| AdvertVerdict::Invalid(e.to_string()))?;
        let advert = signed
            .verify()
            .map_err(|e| AdvertVerdict::Invalid(e.to_string()))?;
        let now = now_ms();
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
