//! The composed libp2p behaviour: identify and ping for liveness and addresses, Kademlia for
//! discovery through bootstrap peers, mDNS on a LAN (optional), gossipsub for adverts (every
//! message validated by the application before it is forwarded), the RPC request-response
//! protocol, connection limits (in total, per peer, and per remote address), a block list
//! (empty unless fault injection partitions the network; see [`super::faults`]), and
//! reachability: the circuit relay v2 client (every node) and server (opt-in), DCUtR hole
//! punching, AutoNAT v2 (client and server) and UPnP port mapping (opt-in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, kad,
    mdns, ping, relay, request_response, upnp,
};

use super::codec::{RPC_PROTOCOL, RpcCodec};

pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/pixmarket/kad/1.0.0");
pub const IDENTIFY_PROTOCOL: &str = "/pixmarket/1.0.0";
/// The gossip topic adverts travel on. Version 2: adverts list devices, step caching, LoRA
/// offers and reachable addresses, which a version-1 node cannot decode; on separate topics
/// the two never score each other's adverts as invalid.
pub const ADVERT_TOPIC: &str = "pixmarket/adverts/v2";

/// A signed advert is at most 16 KiB of body (`CapacityAdvert::MAX_ENCODED`); 20 KiB covers
/// the envelope and gossipsub framing.
pub const MAX_GOSSIP_BYTES: usize = 20 * 1024;
/// The default of [`super::NetConfig::max_connections`]: a gossip mesh of up to 12 peers, a few
/// Kademlia lookups in flight, a relay or two, and the jobs of the moment fit in 32, whatever
/// the market's size. Past it a new connection is denied; idle ones close after the idle timeout.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 32;
pub const MAX_PENDING: u32 = 64;
pub const MAX_PER_PEER: u32 = 4;
/// Jobs take seconds to minutes, but every RPC answers at once (progress travels as separate
/// events), so a minute is generous even for a 64 MiB completed event on a slow link. The
/// default of [`super::NetConfig::request_timeout`]; testnets shorten it.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// RPC streams, inbound and outbound together, one connection may have open at once (past it,
/// libp2p drops a new inbound stream and fails a new outbound request at once). A requester
/// has a few requests in flight per job (the submission, a status or fetch, answers to events)
/// and a provider a few events per job and step; 32 leave room for a batch of jobs both ways,
/// and bound how many frames one peer makes this node read at once (with [`MAX_PER_PEER`]
/// connections, 128). What those frames may buffer is bounded by the codec's byte budgets.
pub const MAX_CONCURRENT_STREAMS: usize = 32;

/// What one invalid (or stale) advert forwarded costs the forwarder's score: past the default
/// graylist threshold (−80) at once, so its messages are ignored and it is pruned from the
/// mesh at the next heartbeat. Honest nodes validate every advert before they forward it.
pub const INVALID_ADVERT_PENALTY: f64 = -100.0;
/// The share of the invalid-advert count kept each second: the penalty halves in about 70 s,
/// so a peer that stops sending bad adverts regains its place within a few minutes.
pub const INVALID_ADVERT_DECAY: f64 = 0.99;

/// Score parameters of the advert topic. Only bad adverts count against a peer: adverts are
/// sparse (one per provider every few seconds), so the rate penalties for mesh deliveries
/// would punish quiet honest peers and are off; delivering an advert first earns a little.
fn advert_topic_score() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 300.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_ADVERT_PENALTY,
        invalid_message_deliveries_decay: INVALID_ADVERT_DECAY,
        ..gossipsub::TopicScoreParams::default()
    }
}

// Not every sub-behaviour implements Debug (gossipsub does not), so neither can this.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
#[behaviour(to_swarm = "BehaviourEvent")]
pub struct Behaviour {
    /// First, so a blocked peer is denied before any other behaviour sees the connection.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    /// Inbound connections per remote address.
    pub per_ip: super::ip_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub gossipsub: gossipsub::Behaviour,
    pub rpc: request_response::Behaviour<RpcCodec>,
    /// Reserves on relays and dials through them; fed by the transport the swarm builder made.
    pub relay_client: relay::client::Behaviour,
    /// Serves reservations and circuits, with `--relay` only.
    pub relay_server: Toggle<relay::Behaviour>,
    pub dcutr: dcutr::Behaviour,
    pub autonat: autonat::v2::client::Behaviour,
    /// Every node answers AutoNAT probes: a probe costs one dial back, rate-limited by libp2p.
    pub autonat_server: autonat::v2::server::Behaviour,
    pub upnp: Toggle<upnp::tokio::Behaviour>,
    /// Passes UPnP-mapped ports to AutoNAT as candidates to test (see `candidates`).
    pub candidates: super::candidates::Behaviour,
}

/// What a relay this node runs lets through one circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayServerLimits {
    /// Bytes one circuit may carry (both ways together, as libp2p counts them).
    pub max_circuit_bytes: u64,
    /// How long one circuit may stay open.
    pub max_circuit_duration: Duration,
}

/// Enough for a hole punch's coordination (identify, DCUtR's two messages) and a quote, not for
/// results: libp2p's own default. An operator who will carry results raises it.
pub const COORDINATION_CIRCUIT_BYTES: u64 = 128 * 1024;
/// libp2p's default; a hole punch takes seconds.
pub const COORDINATION_CIRCUIT_DURATION: Duration = Duration::from_secs(120);

impl Default for RelayServerLimits {
    fn default() -> Self {
        Self {
            max_circuit_bytes: COORDINATION_CIRCUIT_BYTES,
            max_circuit_duration: COORDINATION_CIRCUIT_DURATION,
        }
    }
}

/// The behaviour's settings that come from [`super::NetConfig`].
#[derive(Clone, Copy, Debug)]
pub struct BehaviourSettings {
    pub mdns: bool,
    pub request_timeout: Duration,
    pub max_connections: u32,
    pub relay_server: Option<RelayServerLimits>,
    pub upnp: bool,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum BehaviourEvent {
    Identify(Box<identify::Event>),
    Ping(ping::Event),
    Kad(kad::Event),
    Mdns(mdns::Event),
    Gossipsub(gossipsub::Event),
    Rpc(request_response::Event<super::codec::Request, super::codec::Response>),
    RelayClient(relay::client::Event),
    RelayServer(Box<relay::Event>),
    Dcutr(dcutr::Event),
    Autonat(autonat::v2::client::Event),
    AutonatServer(autonat::v2::server::Event),
    Upnp(upnp::Event),
}

impl From<relay::client::Event> for BehaviourEvent {
    fn from(e: relay::client::Event) -> Self {
        Self::RelayClient(e)
    }
}
impl From<relay::Event> for BehaviourEvent {
    fn from(e: relay::Event) -> Self {
        Self::RelayServer(Box::new(e))
    }
}
impl From<dcutr::Event> for BehaviourEvent {
    fn from(e: dcutr::Event) -> Self {
        Self::Dcutr(e)
    }
}
impl From<autonat::v2::client::Event> for BehaviourEvent {
    fn from(e: autonat::v2::client::Event) -> Self {
        Self::Autonat(e)
    }
}
impl From<autonat::v2::server::Event> for BehaviourEvent {
    fn from(e: autonat::v2::server::Event) -> Self {
        Self::AutonatServer(e)
    }
}
impl From<upnp::Event> for BehaviourEvent {
    fn from(e: upnp::Event) -> Self {
        Self::Upnp(e)
    }
}

/// connection_limits, the per-address limit and the candidates emit no events; their event
/// type is uninhabited.
impl From<std::convert::Infallible> for BehaviourEvent {
    fn from(v: std::convert::Infallible) -> Self {
        match v {}
    }
}

impl From<identify::Event> for BehaviourEvent {
    fn from(e: identify::Event) -> Self {
        Self::Identify(Box::new(e))
    }
}
impl From<ping::Event> for BehaviourEvent {
    fn from(e: ping::Event) -> Self {
        Self::Ping(e)
    }
}
impl From<kad::Event> for BehaviourEvent {
    fn from(e: kad::Event) -> Self {
        Self::Kad(e)
    }
}
impl From<mdns::Event> for BehaviourEvent {
    fn from(e: mdns::Event) -> Self {
        Self::Mdns(e)
    }
}
impl From<gossipsub::Event> for BehaviourEvent {
    fn from(e: gossipsub::Event) -> Self {
        Self::Gossipsub(e)
    }
}
impl From<request_response::Event<super::codec::Request, super::codec::Response>>
    for BehaviourEvent
{
    fn from(e: request_response::Event<super::codec::Request, super::codec::Response>) -> Self {
        Self::Rpc(e)
    }
}

/// Why the behaviour could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BehaviourError {
    #[error("gossipsub configuration: {0}")]
    Gossipsub(String),
    #[error("mDNS could not start")]
    Mdns(#[source] std::io::Error),
}

impl Behaviour {
    pub fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        settings: BehaviourSettings,
    ) -> Result<Self, BehaviourError> {
        let BehaviourSettings {
            mdns: enable_mdns,
            request_timeout,
            max_connections,
            relay_server,
            upnp: enable_upnp,
        } = settings;
        let peer_id = key.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(max_connections))
            .with_max_pending_incoming(Some(MAX_PENDING))
            .with_max_pending_outgoing(Some(MAX_PENDING))
            .with_max_established_per_peer(Some(MAX_PER_PEER));

        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_secs(1))
            // Adverts carry their provider's own signature, checked by the node before they are
            // accepted or forwarded; a second gossipsub signature per message would double the
            // verification work of every node for no added assurance.
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            // The application checks each advert's signature and freshness, then reports.
            .validate_messages()
            .max_transmit_size(MAX_GOSSIP_BYTES)
            // An advert goes to the mesh (about six peers), which carries it on; flooding it
            // to every connected peer costs a send per connection per advert, and a market of
            // a hundred providers on one machine spent most of its time doing that.
            .flood_publish(false)
            // Identical adverts dedupe by content, not by sender sequence number.
            .message_id_fn(|m: &gossipsub::Message| {
                gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
            })
            .build()
            .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        let mut gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)
                .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        // Many peers behind one address are penalised as a likely Sybil, except on loopback:
        // there they are nodes of one machine (a testnet, a lab), and past ten of them the
        // penalty would silence every advert.
        let mut score_params = gossipsub::PeerScoreParams::default();
        score_params.ip_colocation_factor_whitelist.extend([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
        score_params.topics.insert(
            gossipsub::IdentTopic::new(ADVERT_TOPIC).hash(),
            advert_topic_score(),
        );
        gossipsub
            .with_peer_score(score_params, gossipsub::PeerScoreThresholds::default())
            .map_err(BehaviourError::Gossipsub)?;

        let mdns = if enable_mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(BehaviourError::Mdns)?,
            )
        } else {
            None
        };

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        // The event loop walks the table itself, and only while the node is short of peers:
        // Kademlia's own walk every five minutes dials peers the node does not need, and the
        // gossip streams then keep those connections open for good.
        kad_config.set_periodic_bootstrap_interval(None);
        // The event loop inserts peers itself, and only where their bucket has room
        // (`EventLoop::add_to_routing_table`): with the bound on connections most entries are
        // disconnected, and Kademlia's own insert dials the oldest of a full bucket to see
        // whether it is alive, one more connection (a handshake each side) per peer met.
        kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        kad.set_mode(Some(kad::Mode::Server));

        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            per_ip: super::ip_limits::Behaviour::default(),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_owned(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
            kad,
            mdns: mdns.into(),
            gossipsub,
            rpc: request_response::Behaviour::with_codec(
                RpcCodec::default(),
                [(RPC_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(request_timeout)
                    .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS),
            ),
            relay_client,
            relay_server: relay_server
                .map(|l| {
                    relay::Behaviour::new(
                        peer_id,
                        relay::Config {
                            max_circuit_bytes: l.max_circuit_bytes,
                            max_circuit_duration: l.max_circuit_duration,
                            ..relay::Config::default()
                        },
                    )
                })
                .into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat: autonat::v2::client::Behaviour::default(),
            autonat_server: autonat::v2::server::Behaviour::default(),
            upnp: enable_upnp.then(upnp::tokio::Behaviour::default).into(),
            candidates: super::candidates::Behaviour::default(),
        })
    }
}
