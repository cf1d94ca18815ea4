//! The adversaries that attack a node's resources rather than its books, as the testnet runs
//! them ([`crate::adversary::AdversaryKind::Flooder`], `Hog` and `Sybil`). Each records what it
//! tried and what came of it in the adversary's [`Tally`]; none can gain tokens by design, so
//! what a test counts is what the honest peers got meanwhile (jobs completed, books balanced).
//!
//! - [`flood_round`]: quotes, jobs and job events at line rate, all at once, over one ordinary
//!   connection: far past the per-peer rates (`pixmarket_node::rate_limit`), so most are
//!   answered `Busy`. Its jobs offer less than they cost, so none is admitted: the flood costs
//!   the provider a signature check each, never a hold or a GPU second.
//! - [`hog_round`]: [`HOG_CONNECTIONS`] real libp2p connections under one key (the most the
//!   provider keeps per peer), each opening [`HOG_STREAMS`] RPC streams that declare the largest
//!   frame their variant allows (a job, or an event), send all of it but the last byte, and
//!   stall until the provider lets go or [`HOG_HOLD`] passes.
//! - [`spawn_sybil_adverts`]: one swarm publishing, over real gossip, adverts signed by many
//!   fresh keys claiming 1 ms per image and an empty queue, re-published before they expire.
//!   None of the keys can be reached, so a requester that tries one fails over at once.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::future::join_all;
use libp2p::futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};
use pixmarket_node::network::behaviour::{MAX_CONCURRENT_STREAMS, MAX_PER_PEER};
use pixmarket_node::network::codec::{MAX_EVENT_BYTES, MAX_REQUEST_BYTES, RPC_PROTOCOL};
use pixmarket_node::network::{Client, NetError, Request, Response};
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{
    JobEvent, JobId, JobParams, MicroTokens, PriceSchedule, PublicKey, SecretKey, Signed,
};
use tokio::task::JoinHandle;

use crate::adversary::{Tally, fast_advert, job_request, quote_request};

/// Quotes a flooder sends in one round, at once: ten times the per-peer burst a provider
/// answers, so the round shows both what is served and what is refused.
pub const FLOOD_QUOTES: usize = 200;
/// Jobs a flooder sends in one round (each offering less than it costs, so none is admitted).
pub const FLOOD_JOBS: usize = 100;
/// Job events a flooder sends in one round, for jobs the target never bought: a node answers
/// them as a requester, which every node is.
pub const FLOOD_EVENTS: usize = 400;
/// Streams a hog opens on each connection: the most a node serves at once on one connection.
pub const HOG_STREAMS: usize = MAX_CONCURRENT_STREAMS;
/// Connections a hog opens under one key: the most a node keeps with one peer.
pub const HOG_CONNECTIONS: u32 = MAX_PER_PEER;
/// How long a hog holds its streams when the provider does not cut them first: past the small
/// frames' read timeout, short of a test's patience.
pub const HOG_HOLD: Duration = Duration::from_secs(20);
/// How often a hog checks that a stalled stream is still open.
const HOG_PROBE: Duration = Duration::from_millis(250);
/// The bytes a hog writes at a time while it fills a declared frame.
const HOG_CHUNK: usize = 64 * 1024;
/// What a hog writes: shared by every stream, so thousands of them cost the hog no memory.
static ZEROS: [u8; HOG_CHUNK] = [0; HOG_CHUNK];
/// Keys a testnet run's sybil advertises: many times the honest providers of a run, so every
/// fresh requester meets a crowd of them, and few enough that a run's requesters, which start
/// with no record of anyone, get through them within a run (each key costs each requester one
/// failed try). The tests send thousands to one requester (`testnet/tests/adversary.rs`).
pub const SYBIL_KEYS: usize = 200;
/// A sybil re-publishes each key's advert this often: well inside the advert lifetime
/// (30 s), so none of its keys ever drops out of a table.
pub const SYBIL_REPUBLISH: Duration = Duration::from_secs(10);
/// Adverts a sybil publishes between two short pauses, so its own swarm's command queue and
/// the gossip mesh keep up.
const SYBIL_BATCH: usize = 100;
const SYBIL_PAUSE: Duration = Duration::from_millis(50);

/// What a refusal is called in a record: the variant, without numbers that differ per answer.
fn refusal_label(what: &str, reason: &FailReason) -> String {
    match reason {
        FailReason::Busy { .. } => format!("{what} answered busy"),
        // The field only: the value differs per answer (a random job id, say).
        FailReason::Invalid(v) => format!("{what} refused (invalid {})", v.field),
        other => format!("{what} refused ({other})"),
    }
}

/// One round of a flood against `provider`: [`FLOOD_QUOTES`] quotes, [`FLOOD_JOBS`] jobs and
/// [`FLOOD_EVENTS`] events, each kind sent all at once. Every answer is tallied: a quote
/// answered is served (not refused), anything else is refused.
pub async fn flood_round(
    client: &Client,
    secret: &SecretKey,
    provider: PublicKey,
    params: &JobParams,
    tally: &Tally,
) -> anyhow::Result<()> {
    let to = provider.to_peer_id();
    let mut requests = Vec::with_capacity(FLOOD_QUOTES + FLOOD_JOBS + FLOOD_EVENTS);
    for _ in 0..FLOOD_QUOTES {
        requests.push((
            "quotes",
            Request::Quote(quote_request(secret, provider, params)?),
        ));
    }
    for _ in 0..FLOOD_JOBS {
        // One micro-token offered: refused as over budget, after a signature check.
        let req = job_request(provider, params.clone(), MicroTokens(1));
        requests.push(("jobs", Request::Job(Signed::sign(secret, &req)?)));
    }
    for _ in 0..FLOOD_EVENTS {
        requests.push((
            "events",
            Request::Event(JobEvent {
                job_id: JobId::random(),
                kind: JobEventKind::Accepted {
                    queue_position: 0,
                    eta_ms: 0,
                },
            }),
        ));
    }
    let answers = join_all(
        requests
            .into_iter()
            .map(|(what, request)| async move { (what, client.request(to, request).await) }),
    )
    .await;
    for (what, answer) in answers {
        match answer {
            Ok(Response::Quote(_)) => tally.attempt(false, &format!("{what} answered")),
            Ok(Response::Accepted { .. }) => tally.attempt(false, &format!("{what} admitted")),
            Ok(Response::Refused(reason)) => tally.attempt(true, &refusal_label(what, &reason)),
            Ok(_) => tally.attempt(true, &format!("{what} answered otherwise")),
            Err(NetError::NodeStopped) => bail!("the flooder's own node stopped"),
            Err(_) => tally.attempt(true, &format!("{what} unanswered")),
        }
    }
    Ok(())
}

/// A stream a hog opens: the variant's tag and the length it declares.
#[derive(Clone, Copy, Debug)]
struct Declared {
    tag: u8,
    len: usize,
}

/// Writes a frame header declaring `len` bytes of variant `tag`, then all of the body but its
/// last byte, then waits for the stream to be cut: it never completes a frame.
#[derive(Clone, Copy, Debug, Default)]
struct HogCodec;

impl request_response::Codec for HogCodec {
    type Protocol = StreamProtocol;
    type Request = Declared;
    type Response = ();

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> io::Result<Declared>
    where
        T: AsyncRead + Unpin + Send,
    {
        Err(io::Error::other("a hog serves nothing"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, _: &mut T) -> io::Result<()>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(())
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Declared,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let len = u32::try_from(req.len).map_err(|_| io::Error::other("declared too long"))?;
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(&[req.tag]).await?;
        // The tag is the body's first byte; one more stays unsent.
        let mut left = req.len.saturating_sub(2);
        while left > 0 {
            let n = left.min(HOG_CHUNK);
            io.write_all(&ZEROS[..n]).await?;
            left -= n;
        }
        io.flush().await?;
        // Hold the stream until the provider cuts it or our own request timeout ends it. An
        // empty write carries no byte of the frame and fails once the provider has reset the
        // stream, so a cut is seen as one.
        loop {
            tokio::time::sleep(HOG_PROBE).await;
            if io.write(&[]).await? != 0 {
                return Err(io::Error::other("an empty write wrote bytes"));
            }
        }
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, _: &mut T, _: ()) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Ok(())
    }
}

/// How one hog stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HogEnd {
    /// The provider closed or reset it (a read timeout, a refused stream, a closed connection).
    Cut,
    /// It stayed open until the hog's own [`HOG_HOLD`].
    Held,
}

/// One connection's worth of hogging: a swarm of its own under `key`, [`HOG_STREAMS`] streams.
async fn hog_connection(key: &SecretKey, target: Multiaddr) -> anyhow::Result<Vec<HogEnd>> {
    let Some(Protocol::P2p(peer)) = target.iter().last() else {
        bail!("{target} does not end in /p2p/<peer id>")
    };
    let config = request_response::Config::default()
        .with_request_timeout(HOG_HOLD)
        .with_max_concurrent_streams(HOG_STREAMS);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.to_libp2p_keypair())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .context("the hog's transport")?
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                HogCodec,
                [(RPC_PROTOCOL, ProtocolSupport::Outbound)],
                config,
            )
        })
        .context("the hog's behaviour")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(HOG_HOLD))
        .build();
    swarm.add_peer_address(peer, target.clone());
    let mut pending = std::collections::HashSet::new();
    for i in 0..HOG_STREAMS {
        // Half the streams declare a whole job (a large frame), half a whole event (the
        // largest small frame).
        let declared = if i % 2 == 0 {
            Declared {
                tag: 1,
                len: MAX_REQUEST_BYTES,
            }
        } else {
            Declared {
                tag: 2,
                len: MAX_EVENT_BYTES,
            }
        };
        pending.insert(swarm.behaviour_mut().send_request(&peer, declared));
    }
    let mut ends = Vec::with_capacity(HOG_STREAMS);
    let deadline = tokio::time::Instant::now() + HOG_HOLD + Duration::from_secs(5);
    while !pending.is_empty() {
        let Ok(event) = tokio::time::timeout_at(deadline, swarm.select_next_some()).await else {
            ends.extend(pending.iter().map(|_| HogEnd::Held));
            break;
        };
        match event {
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) if pending.remove(&request_id) => ends.push(match error {
                request_response::OutboundFailure::Timeout => HogEnd::Held,
                _ => HogEnd::Cut,
            }),
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            }) if pending.remove(&request_id) => ends.push(HogEnd::Cut),
            _ => {}
        }
    }
    Ok(ends)
}

/// One round of hogging `target` (an address ending in `/p2p/<peer id>`) under `key`:
/// [`HOG_CONNECTIONS`] connections of [`HOG_STREAMS`] stalled maximum-length frames each, held
/// until the provider cuts them or [`HOG_HOLD`] passes. Every stream is tallied: cut by the
/// provider counts as refused, held to the end as not.
pub async fn hog_round(key: &SecretKey, target: &Multiaddr, tally: &Tally) -> anyhow::Result<()> {
    let connections = (0..HOG_CONNECTIONS).map(|_| hog_connection(key, target.clone()));
    for ends in join_all(connections).await {
        for end in ends? {
            match end {
                HogEnd::Cut => tally.attempt(true, "stalled frames cut by the provider"),
                HogEnd::Held => tally.attempt(false, "stalled frames held to the end"),
            }
        }
    }
    Ok(())
}

/// The key of a sybil's `i`-th identity, derived from its own key so a run is reproducible.
fn sybil_key(base: &PublicKey, i: usize) -> SecretKey {
    let mut seed = base.to_bytes();
    for (s, b) in seed
        .iter_mut()
        .zip(u64::try_from(i).unwrap_or(u64::MAX).to_le_bytes())
    {
        *s ^= b;
    }
    // Never the base key itself (i = 0 would give it back).
    seed[31] ^= 0x5b;
    SecretKey::from_seed(&seed)
}

/// Publishes, over `client`'s gossip, an advert claiming 1 ms per standard image and an empty
/// queue for each of `keys` fresh keys, every [`SYBIL_REPUBLISH`], until the node stops.
pub fn spawn_sybil_adverts(
    client: Client,
    base: PublicKey,
    keys: usize,
    tally: Arc<Tally>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let secrets: Vec<SecretKey> = (0..keys).map(|i| sybil_key(&base, i)).collect();
        let schedule = PriceSchedule::default();
        for seq in 1.. {
            let started = tokio::time::Instant::now();
            for (n, secret) in secrets.iter().enumerate() {
                if seq == 1 {
                    // Each key is one try at a place in the requesters' tables and a job.
                    tally.attempt(false, "fresh keys advertised");
                }
                let advert = fast_advert(seq, schedule);
                match Signed::sign(secret, &advert) {
                    Ok(signed) => match client.publish(signed).await {
                        Ok(()) => tally.note("adverts published"),
                        Err(NetError::NodeStopped) => return,
                        Err(_) => tally.note("adverts the mesh did not take"),
                    },
                    Err(_) => tally.note("adverts it could not sign"),
                }
                if (n + 1) % SYBIL_BATCH == 0 {
                    tokio::time::sleep(SYBIL_PAUSE).await;
                }
            }
            tokio::time::sleep_until(started + SYBIL_REPUBLISH).await;
        }
    })
}

/// The public keys a sybil started from `base` advertises, in order.
pub fn sybil_keys(base: &PublicKey, keys: usize) -> Vec<PublicKey> {
    (0..keys).map(|i| sybil_key(base, i).public()).collect()
}
