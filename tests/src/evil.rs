//! Misbehaving peers for the adversarial tests. Both are real libp2p nodes built with
//! [`pixmarket_node::network::new`] on loopback TCP; they answer requests themselves instead of
//! running the node's provider or requester services. The parts they share with the testnet's
//! long-running adversaries (the bare swarm, the fast advert, honest quoting and metering,
//! receipt spoiling, the event pump) live in [`pixmarket_testnet::adversary`]; this module adds
//! the test-only parts: panicking helpers, verbatim frames and the warning capture.
//!
//! - [`RawPeer`]: a bare network client. It sends whatever request a test builds (forged,
//!   replayed, expired, misaddressed), answers progress events itself, and hands every other
//!   job event, with its reply channel, to the test.
//! - [`EvilProvider`]: quotes honestly (the real tokenizer and the real metering function),
//!   accepts the job, runs it on the real tiny engine, then delivers the images with a receipt
//!   spoiled in one chosen way ([`Cheat`]). It advertises a very fast speed so an unpinned
//!   requester tries it first, and reports how the requester answered each delivery.
//! - [`send_verbatim_frames`]: a real libp2p peer (TCP, noise, yamux) that opens real
//!   `/pixmarket/rpc/1` streams and writes bytes of the test's choosing on them (any length
//!   prefix, any body), so the receiver's framing and size limits are what is tested.
//! - [`Warnings`]: every warning the nodes in this test process log, so a test can check that
//!   a refusal was not only typed but also logged (a small `tracing` subscriber of its own:
//!   the workspace has no `tracing-subscriber` built).

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use pixmarket_node::generator::Generator;
use pixmarket_node::network::codec::{MAX_RESPONSE_BYTES, RPC_PROTOCOL};
use pixmarket_node::network::{Client, NetError, Request, Response, ResponseChannel};
use pixmarket_protocol::{
    JobEvent, JobParams, JobRequest, MeteredUnits, MicroTokens, PriceSchedule, PublicKey, Quote,
    SecretKey,
};
pub use pixmarket_testnet::adversary::Cheat;
use pixmarket_testnet::adversary::{
    self, DishonestProvider, ProviderPlay, Tally, spawn_event_pump, spawn_fast_adverts, start_bare,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Job events a test has not read yet; a test sends a handful of jobs at most.
const EVENT_QUEUE: usize = 64;
/// How long a test waits for anything from the network before it fails with a message.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 50 ms until it holds, or fails naming `what` after `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The units and cost an honest provider with `schedule` meters for `params`.
pub fn honest_meter(
    generator: &dyn Generator,
    params: &JobParams,
    schedule: &PriceSchedule,
) -> (MeteredUnits, MicroTokens) {
    adversary::honest_meter(generator, params, schedule).unwrap()
}

/// A bare requester-side network client driven by the test.
#[derive(Debug)]
pub struct RawPeer {
    seed: u8,
    pub client: Client,
    pub addr: Multiaddr,
    events: mpsc::Receiver<(JobEvent, ResponseChannel)>,
    tasks: [JoinHandle<()>; 2],
}

impl RawPeer {
    /// Starts a bare node with the key of `seed`, dialing `bootstrap`.
    pub async fn start(seed: u8, bootstrap: Vec<Multiaddr>) -> Self {
        let bare = start_bare(&SecretKey::from_seed(&[seed; 32]), bootstrap)
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let pump = spawn_event_pump(bare.client.clone(), bare.events, tx);
        Self {
            seed,
            client: bare.client,
            addr: bare.addr,
            events: rx,
            tasks: [bare.task, pump],
        }
    }

    /// This peer's signing key (recreated from its seed: secret keys are not `Clone`).
    pub fn secret(&self) -> SecretKey {
        SecretKey::from_seed(&[self.seed; 32])
    }

    pub fn public(&self) -> PublicKey {
        self.secret().public()
    }

    pub fn peer_id(&self) -> PeerId {
        self.client.local_peer_id()
    }

    pub async fn request(&self, to: PeerId, request: Request) -> Result<Response, NetError> {
        self.client.request(to, request).await
    }

    /// Asks `provider` for a signed quote and checks its signer.
    pub async fn quote(&self, provider: PublicKey, params: &JobParams) -> Quote {
        adversary::fetch_quote(&self.client, &self.secret(), provider, params)
            .await
            .unwrap()
    }

    /// A well-formed request for `provider`, valid for ten minutes, with a fresh job id.
    pub fn job_request(
        provider: PublicKey,
        params: JobParams,
        max_cost: MicroTokens,
    ) -> JobRequest {
        adversary::job_request(provider, params, max_cost)
    }

    /// The next job event that is not progress, or a panic naming what was awaited.
    pub async fn next_event(&mut self, what: &str) -> (JobEvent, ResponseChannel) {
        match tokio::time::timeout(WAIT, self.events.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("raw peer stopped while waiting for {what}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }

    pub async fn shutdown(self) {
        self.client.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// A provider that meters honestly and cheats on the receipt: the testnet's
/// [`DishonestProvider`] with the test reading how the requester answered each delivery.
#[derive(Debug)]
pub struct EvilProvider {
    pub key: PublicKey,
    pub addr: Multiaddr,
    client: Client,
    /// The requester's answer to each `Completed` event, in order.
    answers: mpsc::Receiver<Result<Response, NetError>>,
    /// See [`DishonestProvider::hand_over`].
    hand_over: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl EvilProvider {
    pub async fn start(seed: u8, cheat: Cheat, generator: Arc<dyn Generator>) -> Self {
        Self::start_play(seed, ProviderPlay::Deliver(cheat), generator).await
    }

    /// A dishonest provider that plays `play` with every job.
    pub async fn start_play(seed: u8, play: ProviderPlay, generator: Arc<dyn Generator>) -> Self {
        let secret = Arc::new(SecretKey::from_seed(&[seed; 32]));
        let key = secret.public();
        let bare = start_bare(&secret, vec![]).await.unwrap();
        let schedule = PriceSchedule::default();
        let (answer_tx, answers) = mpsc::channel(EVENT_QUEUE);
        let adverts = spawn_fast_adverts(bare.client.clone(), secret.clone(), schedule);
        let hand_over = Arc::new(AtomicBool::new(false));
        let serve = DishonestProvider {
            client: bare.client.clone(),
            secret,
            generator,
            schedule,
            play,
            tally: Arc::new(Tally::default()),
            answers: Some(answer_tx),
            hand_over: hand_over.clone(),
        }
        .spawn(bare.events);
        Self {
            key,
            addr: bare.addr,
            client: bare.client,
            answers,
            hand_over,
            tasks: vec![bare.task, adverts, serve],
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.key.to_peer_id()
    }

    /// From now on a [`Cheat::KeepImages`] provider answers `Fetch` with the images it kept.
    pub fn hand_over_images(&self) {
        self.hand_over.store(true, Ordering::Relaxed);
    }

    /// How the requester answered the next spoiled delivery.
    pub async fn next_answer(&mut self) -> Result<Response, NetError> {
        match tokio::time::timeout(WAIT, self.answers.recv()).await {
            Ok(Some(a)) => a,
            Ok(None) => panic!("evil provider stopped"),
            Err(_) => panic!("no delivery answered within {WAIT:?}"),
        }
    }

    pub async fn shutdown(self) {
        self.client.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Writes each request's bytes verbatim (length prefix included) and closes the stream; reads
/// whatever comes back, up to the response limit.
#[derive(Clone, Copy, Debug, Default)]
struct VerbatimCodec;

impl request_response::Codec for VerbatimCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_all(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_all(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&res).await?;
        io.close().await
    }
}

async fn read_all<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // Bounded like every other reader: an answer longer than a response frame is not one.
    let limit = u64::try_from(MAX_RESPONSE_BYTES + 4).unwrap_or(u64::MAX);
    io.take(limit).read_to_end(&mut buf).await?;
    if buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "stream closed without an answer",
        ));
    }
    Ok(buf)
}

/// Opens one real RPC stream per frame to `target` (an address ending in `/p2p/<peer>`), one
/// after another, writes the frame's bytes verbatim and returns what came back on each stream
/// (`Err` with the libp2p failure when nothing did).
pub async fn send_verbatim_frames(
    target: &Multiaddr,
    seed: u8,
    frames: Vec<Vec<u8>>,
) -> Vec<Result<Vec<u8>, String>> {
    let Some(Protocol::P2p(peer)) = target.iter().last() else {
        panic!("{target} does not end in /p2p/<peer id>")
    };
    let key = SecretKey::from_seed(&[seed; 32]);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.to_libp2p_keypair())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                VerbatimCodec,
                [(RPC_PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(WAIT),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(WAIT))
        .build();
    swarm.add_peer_address(peer, target.clone());
    let mut answers = Vec::with_capacity(frames.len());
    for frame in frames {
        let id = swarm.behaviour_mut().send_request(&peer, frame);
        let answer = loop {
            let event = tokio::time::timeout(WAIT * 2, swarm.select_next_some())
                .await
                .unwrap_or_else(|_| panic!("no outcome for a verbatim frame within {WAIT:?}"));
            match event {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => break Ok(response),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                }) if request_id == id => break Err(error.to_string()),
                _ => {}
            }
        };
        answers.push(answer);
    }
    answers
}

/// Warning lines kept per test process; past this the oldest are dropped.
const MAX_WARNINGS: usize = 10_000;

/// The warnings and errors logged in this test process, one formatted line each:
/// `LEVEL target: message field=value ...`.
#[derive(Clone, Debug)]
pub struct Warnings(Arc<Mutex<std::collections::VecDeque<String>>>);

impl Warnings {
    /// Installs the process-wide capture on first use and returns it. Tests run in parallel
    /// threads of one process, so checks name something unique to the test (a peer id).
    pub fn capture() -> Self {
        static CAPTURE: OnceLock<Warnings> = OnceLock::new();
        CAPTURE
            .get_or_init(|| {
                let w = Warnings(Arc::default());
                // Fails only if another subscriber was installed first; then nothing is captured
                // and the checks say so.
                let _ = tracing::subscriber::set_global_default(Capture(w.clone()));
                w
            })
            .clone()
    }

    /// Whether some line contains every one of `parts`.
    pub fn contain(&self, parts: &[&str]) -> bool {
        let lines = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        lines.iter().any(|l| parts.iter().all(|p| l.contains(p)))
    }

    /// Waits (bounded) for a line containing every one of `parts`; the log is written from
    /// other tasks, possibly just after the answer the test saw.
    pub async fn expect(&self, parts: &[&str]) {
        let what = format!("a warning containing {parts:?}");
        let me = self.clone();
        wait_until(WAIT, &what, || me.contain(parts)).await;
    }
}

struct Capture(Warnings);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = if field.name() == "message" {
            write!(self.0, " {value:?}")
        } else {
            write!(self.0, " {}={value:?}", field.name())
        };
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        // Levels order from ERROR (least verbose) up to TRACE.
        *metadata.level() <= tracing::Level::WARN
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        // Spans are not kept; every span gets the same (valid, non-zero) id.
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        let mut line = format!("{} {}:", meta.level(), meta.target());
        event.record(&mut Fields(&mut line));
        let mut lines = (self.0)
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if lines.len() >= MAX_WARNINGS {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
