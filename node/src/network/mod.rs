//! The network: one task (the [`EventLoop`]) owns the libp2p `Swarm`; everything else talks to it
//! through a cloneable [`Client`] and hears from it through a bounded stream of [`NetEvent`]s.
//!
//! Data flow:
//! - `Client::request` → `Command::Request` → swarm → remote; the response or the failure comes
//!   back on the command's oneshot, matched by the libp2p request id.
//! - inbound RPC → `NetEvent::Request { channel }` → the node's services → `Client::respond`.
//! - gossip advert → verified (signature, freshness, sequence) in the loop → accepted and
//!   forwarded to `NetEvent::Advert`, or rejected (the forwarding peer loses score).
//!
//! - reachability: every node reserves on relays it learns (bootstrap peers that serve as
//!   relays) unless AutoNAT confirmed it public, keeps the reservation alive ([`relays`]), hole
//!   punches relayed connections (DCUtR) and tracks what it knows in a [`Reachability`]; a
//!   request to a peer reached only through a relay waits a moment for the hole punch.
//!
//! - with [`NetConfig::faults`] (testnets only): outgoing requests and responses may be lost or
//!   delayed, and partitions cut peers off; see [`faults`].
//!
//! Every channel is bounded. When the node's services fall behind, inbound requests are refused
//! with `Busy` by the loop itself rather than queued without limit.

pub mod addr_scope;
pub mod behaviour;
pub mod candidates;
pub mod codec;
mod event_loop;
pub mod faults;
pub mod inbound_budget;
pub mod ip_limits;
pub mod path;
pub mod reachability;
pub mod relays;
pub mod trim;

use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use pixmarket_protocol::{CapacityAdvert, SecretKey, Signed};
use tokio::sync::{Semaphore, mpsc, oneshot};

pub use behaviour::{
    ADVERT_TOPIC, BehaviourError, COORDINATION_CIRCUIT_BYTES, DEFAULT_MAX_CONNECTIONS, RPC_TIMEOUT,
    RelayServerLimits,
};
pub use codec::{Request, Response};
pub use event_loop::EventLoop;
pub use faults::{FaultError, FaultStats, LinkFaults};
pub use path::{PathKind, Via};
pub use reachability::{Reachability, Verdict};

use faults::Fate;

/// Commands waiting for the event loop. Callers wait when it is full (back-pressure).
const COMMAND_QUEUE: usize = 256;
/// Events waiting for the node's services. When full, inbound requests are refused as busy
/// and adverts are dropped (the next one comes in seconds).
const EVENT_QUEUE: usize = 256;

/// Errors of network operations.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the node has stopped")]
    NodeStopped,
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: String, reason: String },
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    /// No answer within the request timeout: it is not known whether the request arrived.
    #[error("request to {peer} timed out: {reason}")]
    Timeout { peer: PeerId, reason: String },
    #[error("cannot publish advert: {0}")]
    Publish(String),
    #[error("network transport could not be built: {0}")]
    Transport(String),
    #[error("invalid network setting {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error(transparent)]
    Behaviour(#[from] BehaviourError),
}

/// An inbound request's reply handle.
pub type ResponseChannel = libp2p::request_response::ResponseChannel<Response>;

/// What the network tells the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A peer asks something; answer with [`Client::respond`].
    Request {
        peer: PeerId,
        request: Box<Request>,
        channel: ResponseChannel,
        /// Directly or through a relay (and what the relay lets through).
        via: Via,
    },
    /// A verified, fresh advert from a provider.
    Advert {
        advert: Box<CapacityAdvert>,
        signed: Box<Signed<CapacityAdvert>>,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
    Listening(Multiaddr),
}

#[derive(Debug)]
enum Command {
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Request {
        peer: PeerId,
        request: Box<Request>,
        reply: oneshot::Sender<Result<Response, NetError>>,
    },
    Respond {
        channel: ResponseChannel,
        response: Box<Response>,
    },
    Publish {
        advert: Box<Signed<CapacityAdvert>>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    ConnectionCount {
        reply: oneshot::Sender<u32>,
    },
    Reachability {
        reply: oneshot::Sender<Reachability>,
    },
    AdvertisedAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    PathTo {
        peer: PeerId,
        reply: oneshot::Sender<PathKind>,
    },
    GossipStanding {
        peer: PeerId,
        reply: oneshot::Sender<GossipStanding>,
    },
    Shutdown,
}

/// A peer as the advert gossip sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GossipStanding {
    /// Its gossipsub score (`None` before it is known); below −80 its messages are ignored.
    pub score: Option<f64>,
    /// Whether it is in this node's mesh for the advert topic.
    pub in_mesh: bool,
}

/// A cloneable handle to the network.
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    request_timeout: Duration,
    faults: Option<LinkFaults>,
    /// Responses held back by fault injection (delayed or lost) at once, node-wide.
    held_responses: Arc<Semaphore>,
}

/// Network settings, already validated.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Closes connections with no active streams after this long.
    pub idle_timeout: Duration,
    /// An RPC request with no response after this long fails. Must be more than zero.
    pub request_timeout: Duration,
    /// Fault injection shared by a testnet's nodes; `None` (production): no faults.
    pub faults: Option<LinkFaults>,
    /// Connections kept at most (in total); past it new ones are denied. Must be more than zero.
    pub max_connections: u32,
    /// Serve as a relay (`--relay`) with these limits per circuit; `None`: not a relay.
    pub relay_server: Option<RelayServerLimits>,
    /// Reserve on relays learnt from bootstrap peers unless this node is confirmed public.
    pub reserve_on_relays: bool,
    /// Ask the router for a port mapping over UPnP.
    pub upnp: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            idle_timeout: Duration::from_secs(60),
            request_timeout: RPC_TIMEOUT,
            faults: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            relay_server: None,
            reserve_on_relays: true,
            upnp: false,
        }
    }
}

/// Builds the swarm. Returns the handle, the event stream, and the loop to spawn.
pub fn new(
    key: &SecretKey,
    config: &NetConfig,
    registry: Option<&mut prometheus_client::registry::Registry>,
) -> Result<(Client, mpsc::Receiver<NetEvent>, EventLoop), NetError> {
    if config.request_timeout.is_zero() {
        return Err(NetError::InvalidConfig {
            field: "request_timeout",
            reason: "must be more than zero".into(),
        });
    }
    if config.max_connections == 0 {
        return Err(NetError::InvalidConfig {
            field: "max_connections",
            reason: "must be more than zero".into(),
        });
    }
    check_listen_addrs(&config.listen)?;
    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let event_loop = EventLoop::new(key, config, registry, command_rx, event_tx)?;
    let client = Client {
        commands: command_tx,
        local_peer_id: key.public().to_peer_id(),
        request_timeout: config.request_timeout,
        faults: config.faults.clone(),
        held_responses: Arc::new(Semaphore::new(faults::MAX_HELD_RESPONSES)),
    };
    Ok((client, event_rx, event_loop))
}

/// Refuses a listen address whose fixed port is taken, with the operating system's reason.
///
/// libp2p's TCP listeners set `SO_REUSEPORT`, so a second node told to listen on a port a running
/// node holds would bind it too, report "listening", and silently take part of the first one's
/// connections. A plain socket (no `SO_REUSEPORT`) bound here and closed again cannot share the
/// port, so it fails exactly when the port is held. Port 0 (any free port) and DNS names are not
/// checked. Between this check and the real bind another process could take the port; that
/// window is microseconds at start-up.
pub fn check_listen_addrs(addrs: &[Multiaddr]) -> Result<(), NetError> {
    use libp2p::multiaddr::Protocol;
    for addr in addrs {
        let mut ip = None;
        let mut tcp = None;
        let mut udp = None;
        for p in addr.iter() {
            match p {
                Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
                Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
                Protocol::Tcp(port) => tcp = Some(port),
                Protocol::Udp(port) => udp = Some(port),
                _ => {}
            }
        }
        let Some(ip) = ip else { continue };
        let result = match (tcp, udp) {
            (Some(port), _) if port != 0 => std::net::TcpListener::bind((ip, port)).map(drop),
            (_, Some(port)) if port != 0 => std::net::UdpSocket::bind((ip, port)).map(drop),
            _ => Ok(()),
        };
        result.map_err(|e| NetError::Listen {
            addr: addr.to_string(),
            reason: listen_reason(&e),
        })?;
    }
    Ok(())
}

/// The operating system's reason, with what it usually means for a node.
fn listen_reason(e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there, perhaps another pixmarket node; choose another \
             port, or /tcp/0 for any free one)"
        }
        std::io::ErrorKind::AddrNotAvailable => " (no network interface of this machine has it)",
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        _ => "",
    };
    format!("{e}{hint}")
}

impl Client {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Whether the event loop has stopped (every request would fail with `NodeStopped`).
    pub fn is_stopped(&self) -> bool {
        self.commands.is_closed()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::NodeStopped)?;
        rx.await.map_err(|_| NetError::NodeStopped)
    }

    pub async fn listen(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| Command::Listen { addr, reply }).await?
    }

    /// Dials an address; with a `/p2p/<peer>` suffix the peer is also added to Kademlia.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| Command::Dial { addr, reply }).await?
    }

    /// Sends a request and waits for its response (at most the configured request timeout).
    /// Under fault injection the request may first wait its delay, fail at once (peer across a
    /// partition), or be lost (then this fails after the request timeout, as a lost one would).
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, NetError> {
        if let Some(faults) = &self.faults {
            if self.commands.is_closed() {
                return Err(NetError::NodeStopped);
            }
            if faults.separated(&self.local_peer_id, &peer) {
                faults.count_refused_request();
                return Err(NetError::Request {
                    peer,
                    reason: "peer unreachable: cut off by a network partition".into(),
                });
            }
            // Both waits end early if the node stops, as a real request's would.
            match faults.fate(false, matches!(request, Request::Fetch(_))) {
                Fate::Drop => {
                    tokio::select! {
                        () = tokio::time::sleep(self.request_timeout) => {}
                        () = self.commands.closed() => return Err(NetError::NodeStopped),
                    }
                    return Err(NetError::Timeout {
                        peer,
                        reason: "no response (the request was lost to fault injection)".into(),
                    });
                }
                Fate::Send(delay) if !delay.is_zero() => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.commands.closed() => return Err(NetError::NodeStopped),
                    }
                }
                Fate::Send(_) => {}
            }
        }
        self.call(|reply| Command::Request {
            peer,
            request: Box::new(request),
            reply,
        })
        .await?
    }

    /// Hands a response to the swarm. Under fault injection a delayed or lost response is held
    /// in a spawned task (bounded), so the caller never waits for the delay.
    pub async fn respond(
        &self,
        channel: ResponseChannel,
        response: Response,
    ) -> Result<(), NetError> {
        if let Some(faults) = &self.faults {
            let fate = faults.fate(true, matches!(response, Response::EventAck(Some(_))));
            if fate != Fate::Send(Duration::ZERO) {
                match self.held_responses.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let this = self.clone();
                        tokio::spawn(async move {
                            match fate {
                                // Held until the asker's own timeout has passed, so it sees a
                                // timeout rather than a stream closed early.
                                Fate::Drop => {
                                    tokio::time::sleep(this.request_timeout).await;
                                    drop(channel);
                                }
                                Fate::Send(delay) => {
                                    tokio::time::sleep(delay).await;
                                    let _ = this.send_response(channel, response).await;
                                }
                            }
                            drop(permit);
                        });
                        return Ok(());
                    }
                    Err(_) => faults.count_unheld_response(),
                }
            }
        }
        self.send_response(channel, response).await
    }

    async fn send_response(
        &self,
        channel: ResponseChannel,
        response: Response,
    ) -> Result<(), NetError> {
        self.commands
            .send(Command::Respond {
                channel,
                response: Box::new(response),
            })
            .await
            .map_err(|_| NetError::NodeStopped)
    }

    pub async fn publish(&self, advert: Signed<CapacityAdvert>) -> Result<(), NetError> {
        self.call(|reply| Command::Publish {
            advert: Box::new(advert),
            reply,
        })
        .await?
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.call(|reply| Command::ConnectedPeers { reply }).await
    }

    /// Established connections, as the swarm counts them (several to one peer count each).
    pub async fn connection_count(&self) -> Result<u32, NetError> {
        self.call(|reply| Command::ConnectionCount { reply }).await
    }

    /// What this node knows about its own reachability.
    pub async fn reachability(&self) -> Result<Reachability, NetError> {
        self.call(|reply| Command::Reachability { reply }).await
    }

    /// The addresses a requester can use to reach this node: those AutoNAT confirmed, and the
    /// circuit addresses of the relays holding a reservation, each ending in `/p2p/<self>`.
    pub async fn advertised_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.call(|reply| Command::AdvertisedAddrs { reply }).await
    }

    /// How this node is connected to `peer` now.
    pub async fn path_to(&self, peer: PeerId) -> Result<PathKind, NetError> {
        self.call(|reply| Command::PathTo { peer, reply }).await
    }

    /// How the advert gossip sees `peer`: its score and whether it is in our advert mesh.
    pub async fn gossip_standing(&self, peer: PeerId) -> Result<GossipStanding, NetError> {
        self.call(|reply| Command::GossipStanding { peer, reply })
            .await
    }

    /// Asks the loop to stop; it closes every connection and returns.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}
