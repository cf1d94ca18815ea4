//! Misbehaving peers for the adversarial tests. Both are real libp2p nodes built with
//! [`pixmarket_node::network::new`] on loopback TCP; they answer requests themselves instead of
//! running the node's provider or requester services.
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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use pixmarket_node::generator::Generator;
use pixmarket_node::network::codec::{MAX_RESPONSE_BYTES, RPC_PROTOCOL};
use pixmarket_node::network::{
    self, Client, NetConfig, NetError, NetEvent, Request, Response, ResponseChannel,
};
use pixmarket_node::now_ms;
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{
    CapacityAdvert, Hash, JobEvent, JobId, JobParams, JobRequest, MeteredUnits, MicroTokens,
    PriceSchedule, PublicKey, Quote, QuoteId, QuoteRequest, Receipt, SecretKey, Signed,
    effective_steps, metering, validate,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Job events a test has not read yet; a test sends a handful of jobs at most.
const EVENT_QUEUE: usize = 64;
/// How long a test waits for anything from the network before it fails with a message.
pub const WAIT: Duration = Duration::from_secs(10);
/// An evil provider re-publishes its advert this often, so a requester learns it quickly.
const ADVERT_EVERY: Duration = Duration::from_millis(500);

/// Starts a bare swarm on 127.0.0.1 and waits for its first listen address.
async fn start_swarm(
    key: &SecretKey,
    bootstrap: Vec<Multiaddr>,
) -> (Client, mpsc::Receiver<NetEvent>, Multiaddr, JoinHandle<()>) {
    let cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        ..NetConfig::default()
    };
    let (client, mut events, event_loop) = network::new(key, &cfg, None).unwrap();
    let task = tokio::spawn(event_loop.run());
    let addr = loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Some(NetEvent::Listening(a))) => break a,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("swarm did not start listening within {WAIT:?}"),
        }
    };
    let full = addr.with(Protocol::P2p(client.local_peer_id()));
    (client, events, full, task)
}

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
    let tokens = generator.count_prompt_tokens(&params.prompt).unwrap();
    let units = params.metered_units(tokens);
    let cost = metering::cost(&units, schedule).unwrap();
    (units, cost)
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
        let (client, mut net_events, addr, event_loop) =
            start_swarm(&SecretKey::from_seed(&[seed; 32]), bootstrap).await;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let answer = client.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = net_events.recv().await {
                let NetEvent::Request {
                    request, channel, ..
                } = ev
                else {
                    continue;
                };
                match *request {
                    Request::Event(JobEvent {
                        kind: JobEventKind::Progress { .. } | JobEventKind::Accepted { .. },
                        ..
                    }) => {
                        let _ = answer.respond(channel, Response::EventAck(None)).await;
                    }
                    Request::Event(event) => {
                        if tx.try_send((event, channel)).is_err() {
                            // The test stopped listening; nothing else to do with it.
                        }
                    }
                    _ => {
                        let refusal = Response::Refused(FailReason::Unsupported(
                            "requests to a raw test peer".into(),
                        ));
                        let _ = answer.respond(channel, refusal).await;
                    }
                }
            }
        });
        Self {
            seed,
            client,
            addr,
            events: rx,
            tasks: [event_loop, task],
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
        let qr = QuoteRequest {
            quote_id: QuoteId::random(),
            provider,
            prompt: params.prompt.clone(),
            width: params.width,
            height: params.height,
            steps: params.steps,
            images: params.images,
            strength_permille: params.mode.strength_permille(),
        };
        let signed = Signed::sign(&self.secret(), &qr).unwrap();
        match self
            .request(provider.to_peer_id(), Request::Quote(signed))
            .await
            .unwrap()
        {
            Response::Quote(q) if q.signer() == provider => q.verify().unwrap(),
            other => panic!("expected a quote, got {other:?}"),
        }
    }

    /// A well-formed request for `provider`, valid for ten minutes, with a fresh job id.
    pub fn job_request(
        provider: PublicKey,
        params: JobParams,
        max_cost: MicroTokens,
    ) -> JobRequest {
        let now = now_ms();
        JobRequest {
            job_id: JobId::random(),
            provider,
            params,
            max_cost,
            created_at_ms: now,
            expires_at_ms: now + 10 * 60 * 1000,
            quote_id: None,
        }
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

/// How an [`EvilProvider`] spoils the receipt it delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cheat {
    /// Charges more than the metering function gives for the quoted units, and signs that
    /// consistently (cost and cumulative total both raised).
    Overcharge,
    /// Signs an honest receipt, then changes one byte of its body.
    TamperAfterSigning,
    /// Signs a receipt whose image hash is not the hash of the image delivered.
    WrongImageHash,
}

/// A provider that meters honestly and cheats on the receipt.
#[derive(Debug)]
pub struct EvilProvider {
    pub key: PublicKey,
    pub addr: Multiaddr,
    client: Client,
    /// The requester's answer to each `Completed` event, in order.
    answers: mpsc::Receiver<Result<Response, NetError>>,
    tasks: Vec<JoinHandle<()>>,
}

impl EvilProvider {
    pub async fn start(seed: u8, cheat: Cheat, generator: Arc<dyn Generator>) -> Self {
        let secret = Arc::new(SecretKey::from_seed(&[seed; 32]));
        let key = secret.public();
        let (client, mut events, addr, event_loop) = start_swarm(&secret, vec![]).await;
        let schedule = PriceSchedule::default();
        let (answer_tx, answers) = mpsc::channel(EVENT_QUEUE);

        let adverts = {
            let (client, secret) = (client.clone(), secret.clone());
            tokio::spawn(async move {
                for seq in 1.. {
                    let advert = fast_advert(seq, schedule);
                    let signed = Signed::sign(&secret, &advert).unwrap();
                    if let Err(NetError::NodeStopped) = client.publish(signed).await {
                        return;
                    }
                    tokio::time::sleep(ADVERT_EVERY).await;
                }
            })
        };

        let serve = {
            let client = client.clone();
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    let NetEvent::Request {
                        peer,
                        request,
                        channel,
                    } = ev
                    else {
                        continue;
                    };
                    let response = match *request {
                        Request::Quote(q) => {
                            honest_quote(&secret, generator.as_ref(), &q, schedule)
                        }
                        Request::Job(job) => {
                            let Ok(req) = job.verify() else {
                                let r = Response::Refused(FailReason::BadSignature);
                                let _ = client.respond(channel, r).await;
                                continue;
                            };
                            let run = Delivery {
                                client: client.clone(),
                                secret: secret.clone(),
                                generator: generator.clone(),
                                schedule,
                                cheat,
                                answers: answer_tx.clone(),
                            };
                            tokio::spawn(run.deliver(peer, job, req));
                            Response::Accepted {
                                queue_position: 0,
                                eta_ms: 0,
                            }
                        }
                        Request::Cancel(_) | Request::Ack(_) => Response::Ok,
                        Request::Event(_) => Response::Refused(FailReason::Unsupported(
                            "job events to a provider".into(),
                        )),
                    };
                    let _ = client.respond(channel, response).await;
                }
            })
        };
        Self {
            key,
            addr,
            client,
            answers,
            tasks: vec![event_loop, adverts, serve],
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.key.to_peer_id()
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

/// An advert that ranks first: an absurdly fast speed and an empty queue.
fn fast_advert(seq: u64, schedule: PriceSchedule) -> CapacityAdvert {
    CapacityAdvert {
        seq,
        issued_at_ms: now_ms(),
        listen_addrs: Vec::new(),
        gpu_name: "evil".into(),
        gpu_memory_mib: 0,
        model_id: "tiny".into(),
        precision: "f32".into(),
        supports_image_to_image: false,
        supports_inpaint: false,
        max_width: validate::MAX_DIMENSION,
        max_height: validate::MAX_DIMENSION,
        max_steps: validate::MAX_STEPS,
        max_images: validate::MAX_IMAGES,
        schedule,
        queue_depth: 0,
        max_queue: 8,
        ms_per_standard_image: 1,
    }
}

fn honest_quote(
    secret: &SecretKey,
    generator: &dyn Generator,
    signed: &Signed<QuoteRequest>,
    schedule: PriceSchedule,
) -> Response {
    let Ok(q) = signed.verify() else {
        return Response::Refused(FailReason::BadSignature);
    };
    let tokens = generator.count_prompt_tokens(&q.prompt).unwrap();
    let units = MeteredUnits {
        width: q.width,
        height: q.height,
        steps: effective_steps(q.steps, q.strength_permille),
        prompt_tokens: tokens,
        images: q.images,
    };
    let quote = Quote {
        quote_id: q.quote_id,
        requester: signed.signer(),
        units,
        schedule,
        cost: metering::cost(&units, &schedule).unwrap(),
        queue_position: 0,
        eta_ms: 0,
        valid_until_ms: now_ms() + 60_000,
    };
    Response::Quote(Signed::sign(secret, &quote).unwrap())
}

/// One accepted job of an evil provider: run it for real, then deliver a spoiled receipt.
struct Delivery {
    client: Client,
    secret: Arc<SecretKey>,
    generator: Arc<dyn Generator>,
    schedule: PriceSchedule,
    cheat: Cheat,
    answers: mpsc::Sender<Result<Response, NetError>>,
}

impl Delivery {
    async fn deliver(self, peer: PeerId, signed: Signed<JobRequest>, req: JobRequest) {
        let generator = self.generator.clone();
        let params = req.params.clone();
        let images = tokio::task::spawn_blocking(move || {
            generator.generate(&[params], &mut |_, _| std::ops::ControlFlow::Continue(()))
        })
        .await
        .unwrap()
        .unwrap()
        .remove(0);
        let (units, cost) = honest_meter(self.generator.as_ref(), &req.params, &self.schedule);
        let mut receipt = Receipt {
            job_id: req.job_id,
            request_hash: signed.digest(),
            provider: self.secret.public(),
            requester: signed.signer(),
            units,
            schedule: self.schedule,
            cost,
            image_hashes: images.iter().map(|p| Hash::of(p)).collect(),
            queued_ms: 0,
            run_ms: 1,
            cumulative_charged: cost,
            prev_receipt_hash: None,
            issued_at_ms: now_ms(),
        };
        let receipt = match self.cheat {
            Cheat::Overcharge => {
                // A tenth more, charged and totalled consistently.
                receipt.cost = MicroTokens(cost.0 + cost.0 / 10 + 1);
                receipt.cumulative_charged = receipt.cost;
                Signed::sign(&self.secret, &receipt).unwrap()
            }
            Cheat::WrongImageHash => {
                receipt.image_hashes = vec![Hash::of(b"not the image that was delivered")];
                Signed::sign(&self.secret, &receipt).unwrap()
            }
            Cheat::TamperAfterSigning => {
                let honest = Signed::sign(&self.secret, &receipt).unwrap();
                let mut body = honest.body().to_vec();
                // The last bytes encode `issued_at_ms`: still a well-formed receipt after the flip.
                let last = body.len() - 1;
                body[last] ^= 0x01;
                Signed::from_parts(honest.signer(), body, honest.signature())
            }
        };
        let event = JobEvent {
            job_id: req.job_id,
            kind: JobEventKind::Completed { images, receipt },
        };
        let answer = self.client.request(peer, Request::Event(event)).await;
        let _ = self.answers.send(answer).await;
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
