//! Cheating peers that run inside a market of honest real nodes and report what they tried and
//! what they got ([`AdversaryRecord`]). Each is a real libp2p node built with
//! [`pixmarket_node::network::new`]; it answers requests itself instead of running the node's
//! honest provider or requester services.
//!
//! Provider-side (honest requesters find them through gossip and choose them on their own: they
//! advertise an absurdly fast speed and an empty queue, re-published every
//! [`ADVERT_EVERY`]):
//! - [`AdversaryKind::Overcharger`] quotes honestly, accepts, runs the job on its generator and
//!   offers a receipt charging more than the metering function gives.
//! - [`AdversaryKind::Silent`] quotes honestly, answers `Accepted`, and never says anything
//!   again: the requester must time out, cancel and fail over.
//!
//! Requester-side ([`Adversary::attack`] against one honest provider):
//! - [`AdversaryKind::Replayer`] buys a job legitimately, then replays its signed request (while
//!   it runs, re-signed with other parameters under the same job id, after it was paid).
//! - [`AdversaryKind::Freerider`] asks for jobs and takes whatever it can without signing an
//!   ack: it answers the receipt with an empty answer, asks for the images with an ack for
//!   another receipt and with an ack signed by another key, and asks for the job's status. Its
//!   record counts the images it received and what its providers' books charge it.
//! - [`AdversaryKind::Forger`] sends requests signed by another key over its own connection,
//!   requests with a corrupted signature, and requests addressed to another provider.
//! - [`AdversaryKind::Flooder`] and [`AdversaryKind::Hog`] attack a node's resources (quotes,
//!   jobs and events at line rate; stalled maximum-length frames on every stream and connection
//!   the limits allow), and [`AdversaryKind::Sybil`] advertises many fresh keys claiming 1 ms
//!   over real gossip: see [`crate::hostile`].
//!
//! Data flow of one adversary:
//! - swarm events → [`spawn_event_pump`] (requester side: progress answered, other job events
//!   to the router) or [`DishonestProvider`] (provider side: quotes, jobs, cancels, acks).
//! - router → the waiting legitimate job (a oneshot), or the [`Tally`] when a job it never
//!   bought legitimately was served (that is a gain).
//! - every attempt and its outcome → the [`Tally`] → [`Adversary::record`].
//!
//! The building blocks (bare swarm, fast advert, honest quoting and metering, receipt spoiling,
//! the event pump) are public so the end-to-end tests' misbehaving peers use the same code.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use pixmarket_node::generator::Generator;
use pixmarket_node::network::{
    self, Client, NetConfig, NetError, NetEvent, Request, Response, ResponseChannel,
};
use pixmarket_node::now_ms;
use pixmarket_node::requester::check_receipt;
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{
    CapacityAdvert, Hash, JobEvent, JobId, JobParams, JobRequest, MeteredUnits, MicroTokens, Mode,
    PriceSchedule, PublicKey, Quote, QuoteId, QuoteRequest, Receipt, ReceiptAck, SecretKey,
    Signature, Signed, effective_steps, metering, validate,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::hostile;
use crate::record::AdversaryRecord;

/// A provider-side adversary re-publishes its advert this often, so requesters learn it within
/// a second of starting and never see it expire.
pub const ADVERT_EVERY: Duration = Duration::from_millis(500);
/// How long a bare swarm may take to report its first listen address (loopback: milliseconds).
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// Job events waiting for the router; a requester adversary has one legitimate job in flight
/// and a few served cheats at most.
const EVENT_QUEUE: usize = 64;
/// How long a replayer waits for the job it bought legitimately: generous, since it queues
/// behind the market's honest jobs.
const LEGIT_JOB_WAIT: Duration = Duration::from_secs(300);
/// Swallowed jobs a silent provider remembers to match cancels against; past this it still
/// swallows and counts jobs but cannot credit their cancels (a bound on memory in long runs).
const MAX_SWALLOWED: usize = 10_000;
/// How long an accepted request stays valid: as long as an honest requester's.
const REQUEST_VALIDITY_MS: u64 = 10 * 60 * 1000;

/// The four cheats a testnet can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdversaryKind {
    /// A provider whose receipts charge more than the metering function gives.
    Overcharger,
    /// A requester that replays its signed requests and acknowledgements.
    Replayer,
    /// A requester that forges, corrupts and misaddresses requests.
    Forger,
    /// A provider that accepts jobs and then never answers.
    Silent,
    /// A requester that takes what it can and acknowledges nothing.
    Freerider,
    /// A requester that sends quotes, jobs and events at line rate.
    Flooder,
    /// A requester that holds every stream and connection the limits allow with stalled
    /// frames of the largest declared length.
    Hog,
    /// A provider-side peer advertising many fresh keys that claim 1 ms per image.
    Sybil,
}

impl AdversaryKind {
    pub const ALL: [AdversaryKind; 8] = [
        AdversaryKind::Overcharger,
        AdversaryKind::Replayer,
        AdversaryKind::Forger,
        AdversaryKind::Silent,
        AdversaryKind::Freerider,
        AdversaryKind::Flooder,
        AdversaryKind::Hog,
        AdversaryKind::Sybil,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AdversaryKind::Overcharger => "overcharger",
            AdversaryKind::Replayer => "replayer",
            AdversaryKind::Forger => "forger",
            AdversaryKind::Silent => "silent",
            AdversaryKind::Freerider => "freerider",
            AdversaryKind::Flooder => "flooder",
            AdversaryKind::Hog => "hog",
            AdversaryKind::Sybil => "sybil",
        }
    }

    /// Whether it sells (honest requesters come to it) rather than buys (it attacks providers).
    pub fn is_provider(self) -> bool {
        matches!(
            self,
            AdversaryKind::Overcharger | AdversaryKind::Silent | AdversaryKind::Sybil
        )
    }
}

impl fmt::Display for AdversaryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not an adversary kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown adversary {got:?}: expected one of overcharger, replayer, forger, silent, freerider, flooder, hog, sybil"
)]
pub struct UnknownAdversary {
    pub got: String,
}

impl FromStr for AdversaryKind {
    type Err = UnknownAdversary;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        AdversaryKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownAdversary { got: s.to_owned() })
    }
}

/// What an adversary tried and got, shared between its tasks.
#[derive(Debug, Default)]
pub struct Tally(Mutex<TallyInner>);

#[derive(Debug, Default)]
struct TallyInner {
    attempts: u32,
    refused: u32,
    gained: u64,
    /// Images received without a valid ack of its own.
    images: u32,
    /// How each attempt ended, by a short label, for the record's detail line.
    outcomes: BTreeMap<String, u32>,
}

impl Tally {
    fn with<T>(&self, f: impl FnOnce(&mut TallyInner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// One cheat tried; `refused` when the honest side refused it or routed around it.
    pub fn attempt(&self, refused: bool, outcome: &str) {
        self.with(|t| {
            t.attempts = t.attempts.saturating_add(1);
            if refused {
                t.refused = t.refused.saturating_add(1);
            }
            *t.outcomes.entry(outcome.to_owned()).or_default() += 1;
        });
    }

    /// An earlier attempt turned out refused (a silent provider's job was cancelled).
    pub fn refused_later(&self, outcome: &str) {
        self.with(|t| {
            t.refused = t.refused.saturating_add(1).min(t.attempts);
            *t.outcomes.entry(outcome.to_owned()).or_default() += 1;
        });
    }

    /// Honest nodes paid a cheating provider, or charged a cheating request.
    pub fn gained(&self, amount: MicroTokens, outcome: &str) {
        self.with(|t| {
            t.gained = t.gained.saturating_add(amount.0);
            *t.outcomes.entry(outcome.to_owned()).or_default() += 1;
        });
    }

    /// Images it received without a valid ack of its own (a freerider's gain).
    pub fn images(&self, n: u32) {
        self.with(|t| t.images = t.images.saturating_add(n));
    }

    /// Something worth reporting that is not an attempt (an engine failure, a lost answer).
    pub fn note(&self, outcome: &str) {
        self.with(|t| *t.outcomes.entry(outcome.to_owned()).or_default() += 1);
    }

    pub fn record(&self, name: &str, kind: &str) -> AdversaryRecord {
        self.with(|t| AdversaryRecord {
            name: name.to_owned(),
            kind: kind.to_owned(),
            attempts: t.attempts,
            refused: t.refused,
            gained_micros: t.gained,
            images_received: t.images,
            charged_micros: 0,
            detail: t
                .outcomes
                .iter()
                .map(|(what, n)| format!("{what}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// A bare libp2p node: no provider or requester service behind it.
#[derive(Debug)]
pub struct BareNode {
    pub client: Client,
    pub events: mpsc::Receiver<NetEvent>,
    /// Its first listen address, ending in `/p2p/<peer id>`.
    pub addr: Multiaddr,
    /// The event loop; aborted on shutdown.
    pub task: JoinHandle<()>,
}

/// Starts a bare swarm on 127.0.0.1, dialing `bootstrap`, and waits for its first listen address.
pub async fn start_bare(key: &SecretKey, bootstrap: Vec<Multiaddr>) -> anyhow::Result<BareNode> {
    let cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        bootstrap,
        ..NetConfig::default()
    };
    let (client, mut events, event_loop) =
        network::new(key, &cfg, None).context("cannot build a bare swarm")?;
    let task = tokio::spawn(event_loop.run());
    let addr = loop {
        match tokio::time::timeout(LISTEN_WAIT, events.recv()).await {
            Ok(Some(NetEvent::Listening(a))) => break a,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                task.abort();
                bail!("a bare swarm did not start listening within {LISTEN_WAIT:?}")
            }
        }
    };
    let addr = addr.with(Protocol::P2p(client.local_peer_id()));
    Ok(BareNode {
        client,
        events,
        addr,
        task,
    })
}

/// An advert that ranks first on estimated finish: an absurdly fast speed and an empty queue.
pub fn fast_advert(seq: u64, schedule: PriceSchedule) -> CapacityAdvert {
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
        devices: Vec::new(),
        step_caching: pixmarket_protocol::StepCaching::Exact,
        serves_exact: true,
        loras: Vec::new(),
    }
}

/// Publishes [`fast_advert`] every [`ADVERT_EVERY`] until the node stops.
pub fn spawn_fast_adverts(
    client: Client,
    secret: Arc<SecretKey>,
    schedule: PriceSchedule,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for seq in 1.. {
            let advert = fast_advert(seq, schedule);
            match Signed::sign(&secret, &advert) {
                Ok(signed) => {
                    if let Err(NetError::NodeStopped) = client.publish(signed).await {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot sign a fast advert"),
            }
            tokio::time::sleep(ADVERT_EVERY).await;
        }
    })
}

/// The units and cost an honest provider with `schedule` meters for `params`.
pub fn honest_meter(
    generator: &dyn Generator,
    params: &JobParams,
    schedule: &PriceSchedule,
) -> anyhow::Result<(MeteredUnits, MicroTokens)> {
    let tokens = generator
        .count_prompt_tokens(&params.prompt)
        .map_err(|e| anyhow!("cannot count prompt tokens: {e}"))?;
    let units = params.metered_units(tokens);
    let cost = metering::cost(&units, schedule).context("cannot meter the job")?;
    Ok((units, cost))
}

/// The quote an honest provider with `schedule` and an empty queue gives, or a typed refusal.
pub fn honest_quote(
    secret: &SecretKey,
    generator: &dyn Generator,
    signed: &Signed<QuoteRequest>,
    schedule: PriceSchedule,
) -> Response {
    let Ok(q) = signed.verify() else {
        return Response::Refused(FailReason::BadSignature);
    };
    let tokens = match generator.count_prompt_tokens(&q.prompt) {
        Ok(t) => t,
        Err(e) => return Response::Refused(FailReason::Engine(e.to_string())),
    };
    let units = MeteredUnits {
        width: q.width,
        height: q.height,
        steps: effective_steps(q.steps, q.strength_permille),
        prompt_tokens: tokens,
        images: q.images,
    };
    let cost = match metering::cost(&units, &schedule) {
        Ok(c) => c,
        Err(e) => return Response::Refused(FailReason::Engine(e.to_string())),
    };
    let quote = Quote {
        quote_id: q.quote_id,
        requester: signed.signer(),
        units,
        schedule,
        cost,
        queue_position: 0,
        eta_ms: 0,
        valid_until_ms: now_ms() + 60_000,
        step_caching: pixmarket_protocol::StepCaching::Exact,
    };
    match Signed::sign(secret, &quote) {
        Ok(s) => Response::Quote(s),
        Err(e) => Response::Refused(FailReason::Engine(e.to_string())),
    }
}

/// How a dishonest provider spoils the receipt it delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cheat {
    /// Charges more than the metering function gives for the quoted units, and signs that
    /// consistently (cost and cumulative total both raised).
    Overcharge,
    /// Signs an honest receipt, then changes one byte of its body.
    TamperAfterSigning,
    /// Signs a receipt whose image hash is not the hash of the image delivered.
    WrongImageHash,
    /// Signs an honest receipt, takes the requester's ack, and never answers its `Fetch`:
    /// paid for images it keeps.
    KeepImages,
}

/// Signs `receipt` (an honest one) spoiled by `cheat`.
pub fn spoil_receipt(
    secret: &SecretKey,
    mut receipt: Receipt,
    cheat: Cheat,
) -> anyhow::Result<Signed<Receipt>> {
    Ok(match cheat {
        Cheat::Overcharge => {
            // A tenth more, charged and totalled consistently.
            let cost = receipt.cost.0;
            receipt.cost = MicroTokens(cost.saturating_add(cost / 10 + 1));
            receipt.cumulative_charged = MicroTokens(
                receipt
                    .cumulative_charged
                    .0
                    .saturating_add(receipt.cost.0 - cost),
            );
            Signed::sign(secret, &receipt)?
        }
        Cheat::WrongImageHash => {
            receipt.image_hashes = vec![Hash::of(b"not the image that was delivered")];
            Signed::sign(secret, &receipt)?
        }
        Cheat::KeepImages => Signed::sign(secret, &receipt)?,
        Cheat::TamperAfterSigning => {
            let honest = Signed::sign(secret, &receipt)?;
            let mut body = honest.body().to_vec();
            // The last bytes encode `issued_at_ms`: still a well-formed receipt after the flip.
            let last = body.last_mut().context("an empty receipt body")?;
            *last ^= 0x01;
            Signed::from_parts(honest.signer(), body, honest.signature())
        }
    })
}

/// A dishonest provider's delivered images by job, for `Fetch`.
type Kept = Arc<Mutex<BTreeMap<JobId, Vec<Vec<u8>>>>>;
/// Results a dishonest provider keeps for `Fetch`; past this the oldest job id goes.
const MAX_KEPT_RESULTS: usize = 64;

/// What a dishonest provider does with the jobs it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderPlay {
    /// Runs the job for real and delivers it with a receipt spoiled by the cheat.
    Deliver(Cheat),
    /// Never says anything about the job again.
    Swallow,
    /// Never runs the job, and says it is queued, every [`STALL_HEARTBEAT`] and to every
    /// `Status`, until the requester cancels it: a job held past its request's expiry.
    Stall,
}

/// How often a stalling provider repeats that a job is still queued: faster than any idle
/// timeout, so only the request's expiry can end the wait.
pub const STALL_HEARTBEAT: Duration = Duration::from_millis(200);
/// Jobs a stalling provider heartbeats at once; later ones are swallowed silently.
const MAX_STALLED: usize = 64;

/// A provider that quotes honestly and then cheats; see [`ProviderPlay`].
pub struct DishonestProvider {
    pub client: Client,
    pub secret: Arc<SecretKey>,
    pub generator: Arc<dyn Generator>,
    pub schedule: PriceSchedule,
    pub play: ProviderPlay,
    pub tally: Arc<Tally>,
    /// The requester's answer to each delivery, for a test to inspect; dropped when full.
    pub answers: Option<mpsc::Sender<Result<Response, NetError>>>,
    /// Once set, a [`Cheat::KeepImages`] provider answers `Fetch` with the images after all:
    /// what a slow or cut-off honest provider looks like from the requester's side.
    pub hand_over: Arc<AtomicBool>,
}

impl fmt::Debug for DishonestProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DishonestProvider")
            .field("peer", &self.secret.public().fmt_short())
            .field("play", &self.play)
            .finish()
    }
}

impl DishonestProvider {
    /// Serves `events` until the swarm stops.
    pub fn spawn(self, mut events: mpsc::Receiver<NetEvent>) -> JoinHandle<()> {
        let me = Arc::new(self);
        tokio::spawn(async move {
            // Swallowed jobs by id, with the peer that sent each: its cancel is the give-up.
            let mut swallowed: BTreeMap<JobId, PeerId> = BTreeMap::new();
            // Stalled jobs by id: the peer that sent each and its heartbeat task.
            let mut stalled: BTreeMap<JobId, (PeerId, JoinHandle<()>)> = BTreeMap::new();
            // The images of delivered jobs, handed to any `Fetch` (they do not match a spoiled
            // receipt's hashes, which the requester then finds out).
            let kept: Kept = Arc::default();
            while let Some(ev) = events.recv().await {
                let NetEvent::Request {
                    peer,
                    request,
                    channel,
                    ..
                } = ev
                else {
                    continue;
                };
                let response = match *request {
                    Request::Quote(q) => {
                        honest_quote(&me.secret, me.generator.as_ref(), &q, me.schedule)
                    }
                    Request::Job(job) => match job.verify() {
                        Err(_) => Response::Refused(FailReason::BadSignature),
                        Ok(req) => {
                            match me.play {
                                ProviderPlay::Deliver(cheat) => {
                                    tokio::spawn(me.clone().deliver(
                                        peer,
                                        job,
                                        req,
                                        cheat,
                                        kept.clone(),
                                    ));
                                }
                                ProviderPlay::Swallow => {
                                    me.tally.attempt(false, "jobs swallowed");
                                    if swallowed.len() < MAX_SWALLOWED {
                                        swallowed.insert(req.job_id, peer);
                                    }
                                }
                                ProviderPlay::Stall => {
                                    me.tally.attempt(false, "jobs stalled");
                                    stalled.retain(|_, (_, h)| !h.is_finished());
                                    if stalled.len() < MAX_STALLED {
                                        let beat = me.clone().heartbeat(peer, req.job_id);
                                        stalled.insert(req.job_id, (peer, tokio::spawn(beat)));
                                    }
                                }
                            }
                            Response::Accepted {
                                queue_position: 0,
                                eta_ms: 0,
                            }
                        }
                    },
                    Request::Cancel(job) => {
                        if stalled.get(&job).is_some_and(|(p, _)| p == &peer)
                            && let Some((_, beat)) = stalled.remove(&job)
                        {
                            beat.abort();
                            me.tally
                                .refused_later("stalled jobs cancelled by the requester");
                        }
                        if swallowed.get(&job) == Some(&peer) {
                            swallowed.remove(&job);
                            me.tally
                                .refused_later("cancelled by the requester (gave up)");
                        }
                        Response::Ok
                    }
                    // Silent about swallowed jobs: no answer at all (the channel is dropped).
                    Request::Status(job) if swallowed.contains_key(&job) => continue,
                    Request::Status(job) if stalled.contains_key(&job) => {
                        Response::Status(pixmarket_protocol::JobStatus::Queued {
                            position: 0,
                            eta_ms: 1_000,
                        })
                    }
                    Request::Status(_) => Response::Status(pixmarket_protocol::JobStatus::Unknown),
                    // Paid, and silent from here on: no answer at all.
                    Request::Fetch(_)
                        if me.play == ProviderPlay::Deliver(Cheat::KeepImages)
                            && !me.hand_over.load(Ordering::Relaxed) =>
                    {
                        continue;
                    }
                    Request::Fetch(ack) => {
                        let images = ack.verify().ok().and_then(|a| {
                            kept.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get(&a.job_id)
                                .cloned()
                                .map(|i| (a.job_id, i))
                        });
                        match images {
                            Some((job_id, images)) => Response::Images { job_id, images },
                            None => Response::Refused(FailReason::ResultGone),
                        }
                    }
                    Request::Chain { .. } => Response::Chain(Vec::new()),
                    Request::Event(_) => Response::Refused(FailReason::Unsupported(
                        "job events to a provider".into(),
                    )),
                };
                let _ = me.client.respond(channel, response).await;
            }
        })
    }

    /// Says the job is queued every [`STALL_HEARTBEAT`], until aborted (a cancel) or the
    /// requester stops answering.
    async fn heartbeat(self: Arc<Self>, peer: PeerId, job_id: JobId) {
        loop {
            let event = JobEvent {
                job_id,
                kind: JobEventKind::Accepted {
                    queue_position: 0,
                    eta_ms: 1_000,
                },
            };
            if self
                .client
                .request(peer, Request::Event(event))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(STALL_HEARTBEAT).await;
        }
    }

    async fn deliver(
        self: Arc<Self>,
        peer: PeerId,
        signed: Signed<JobRequest>,
        req: JobRequest,
        cheat: Cheat,
        kept: Kept,
    ) {
        let job_id = req.job_id;
        let (event, cost) = match self.spoiled_delivery(&signed, req).await {
            Ok((event, cost, images)) => {
                let mut k = kept.lock().unwrap_or_else(PoisonError::into_inner);
                if k.len() >= MAX_KEPT_RESULTS
                    && let Some(oldest) = k.keys().next().copied()
                {
                    k.remove(&oldest);
                }
                k.insert(job_id, images);
                (event, cost)
            }
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "dishonest provider could not run a job");
                self.tally.note("jobs it could not run");
                let Ok(void) = Signed::sign(
                    &self.secret,
                    &pixmarket_protocol::JobVoid {
                        job_id,
                        reason: e.to_string().chars().take(200).collect(),
                        voided_at_ms: now_ms(),
                    },
                ) else {
                    return;
                };
                let event = JobEvent {
                    job_id,
                    kind: JobEventKind::Failed {
                        reason: FailReason::Engine(e.to_string()),
                        void,
                    },
                };
                let _ = self.client.request(peer, Request::Event(event)).await;
                return;
            }
        };
        let answer = self.client.request(peer, Request::Event(event)).await;
        let what = format!("{cheat:?} deliveries").to_lowercase();
        match &answer {
            Ok(Response::EventAck(Some(_))) => {
                self.tally.attempt(false, &format!("{what} acked"));
                self.tally.gained(cost, "micro-tokens acked");
            }
            Ok(Response::Refused(_) | Response::ReceiptRefused(_)) => {
                self.tally.attempt(true, &format!("{what} refused"))
            }
            Ok(_) => self.tally.attempt(true, &format!("{what} not acked")),
            Err(_) => self.tally.attempt(true, &format!("{what} unanswered")),
        }
        if let Some(tx) = &self.answers {
            // Nobody reading (a long testnet run): the tally has it already.
            let _ = tx.try_send(answer);
        }
    }

    /// Runs the job for real and builds the `Completed` event with the spoiled receipt (the
    /// images would follow only a `Fetch` with a valid ack).
    async fn spoiled_delivery(
        &self,
        signed: &Signed<JobRequest>,
        req: JobRequest,
    ) -> anyhow::Result<(JobEvent, MicroTokens, Vec<Vec<u8>>)> {
        let ProviderPlay::Deliver(cheat) = self.play else {
            bail!("a swallowing provider delivers nothing");
        };
        let generator = self.generator.clone();
        let params = req.params.clone();
        let images = tokio::task::spawn_blocking(move || {
            generator.generate(&[params], &mut |_, _| std::ops::ControlFlow::Continue(()))
        })
        .await?
        .map_err(|e| anyhow!("generation failed: {e}"))?
        .into_iter()
        .next()
        .context("the generator returned no job")?;
        let (units, cost) = honest_meter(self.generator.as_ref(), &req.params, &self.schedule)?;
        let receipt = Receipt {
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
            prev_entry_hash: None,
            issued_at_ms: now_ms(),
            step_caching: pixmarket_protocol::StepCaching::Exact,
        };
        let receipt = spoil_receipt(&self.secret, receipt, cheat)?;
        let charged = receipt.verify().map_or(cost, |r| r.cost);
        let event = JobEvent {
            job_id: req.job_id,
            kind: JobEventKind::Completed { receipt },
        };
        Ok((event, charged, images))
    }
}

/// Answers a requester-side swarm's routine traffic: progress and acceptance events get an
/// empty ack, requests a requester does not serve a typed refusal; every other job event goes
/// to `out` with its reply channel (dropped unanswered when `out` is full or closed).
pub fn spawn_event_pump(
    client: Client,
    mut events: mpsc::Receiver<NetEvent>,
    out: mpsc::Sender<(JobEvent, ResponseChannel)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
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
                    let _ = client.respond(channel, Response::EventAck(None)).await;
                }
                Request::Event(event) => {
                    // A full queue means the reader stopped; the provider sees no answer.
                    let _ = out.try_send((event, channel));
                }
                _ => {
                    let refusal = Response::Refused(FailReason::Unsupported(
                        "requests to a requester".into(),
                    ));
                    let _ = client.respond(channel, refusal).await;
                }
            }
        }
    })
}

/// A well-formed request for `provider`, valid for ten minutes, with a fresh job id.
pub fn job_request(provider: PublicKey, params: JobParams, max_cost: MicroTokens) -> JobRequest {
    let now = now_ms();
    JobRequest {
        job_id: JobId::random(),
        provider,
        params,
        max_cost,
        created_at_ms: now,
        expires_at_ms: now + REQUEST_VALIDITY_MS,
        quote_id: None,
        previews: 0,
    }
}

/// Asks `provider` for a signed quote for `params` and checks who signed it.
pub async fn fetch_quote(
    client: &Client,
    secret: &SecretKey,
    provider: PublicKey,
    params: &JobParams,
) -> anyhow::Result<Quote> {
    let signed = quote_request(secret, provider, params)?;
    match client
        .request(provider.to_peer_id(), Request::Quote(signed))
        .await
        .with_context(|| format!("quote from {}", provider.fmt_short()))?
    {
        Response::Quote(q) if q.signer() == provider => Ok(q.verify()?),
        other => bail!("expected a quote, got {other:?}"),
    }
}

/// A signed request for a quote of `params` from `provider`, with a fresh quote id.
pub fn quote_request(
    secret: &SecretKey,
    provider: PublicKey,
    params: &JobParams,
) -> anyhow::Result<Signed<QuoteRequest>> {
    let qr = QuoteRequest {
        quote_id: QuoteId::random(),
        provider,
        prompt: params.prompt.clone(),
        width: params.width,
        height: params.height,
        steps: params.steps,
        images: params.images,
        strength_permille: params.mode.strength_permille(),
        exact: false,
        lora: None,
    };
    Ok(Signed::sign(secret, &qr)?)
}

/// Waiting legitimate jobs of a requester adversary, by job id.
type Waiters = Arc<Mutex<BTreeMap<JobId, oneshot::Sender<(JobEvent, ResponseChannel)>>>>;

/// Hands each job event to its waiting legitimate job; an event for any other job means a
/// cheating request was served, and a `Completed` one was charged: that is a gain.
/// Job ids a requester-side adversary asked for itself (bounded: the oldest go first).
type Bought = Arc<Mutex<BTreeSet<JobId>>>;
/// Job ids remembered in [`Bought`], and receipts in [`Paid`].
const MAX_BOUGHT: usize = 10_000;
/// Digests of the signed requests a replayer sent for its own legitimate jobs (bounded by
/// [`MAX_BOUGHT`]): a receipt naming one (offered late, after the round gave up waiting, or
/// again because our ack was lost) is not a cheating request served. A replay re-signed over
/// other parameters has another digest, so a receipt for it still counts as a gain.
type Paid = Arc<Mutex<BTreeSet<pixmarket_protocol::Hash>>>;

fn spawn_router(
    client: Client,
    mut events: mpsc::Receiver<(JobEvent, ResponseChannel)>,
    waiters: Waiters,
    bought: Bought,
    paid: Paid,
    tally: Arc<Tally>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((event, channel)) = events.recv().await {
            let waiter = waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&event.job_id);
            if let Some(w) = waiter {
                if let Err((_, channel)) = w.send((event, channel)) {
                    let _ = client.respond(channel, Response::EventAck(None)).await;
                }
                continue;
            }
            if let JobEventKind::Completed { receipt, .. } = &event.kind {
                // Only a receipt for a job it never legitimately asked for means a cheating
                // request was run; a receipt offered again for its own job is the provider
                // still waiting for an ack that will not come (it is credited back).
                let own = bought
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(&event.job_id);
                let asked = |request: &pixmarket_protocol::Hash| {
                    paid.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .contains(request)
                };
                match receipt.verify() {
                    Ok(r) if asked(&r.request_hash) => {
                        tally.note("receipts for our legitimate jobs offered late or again")
                    }
                    Ok(_) if own => tally.note("receipts offered again, not acknowledged"),
                    Ok(r) => tally.gained(r.cost, "cheating requests served and charged"),
                    Err(_) => tally.note("unverifiable receipts for cheating requests"),
                }
            }
            // Never acknowledged: the cheat does not sign for what it should not have got.
            let _ = client.respond(channel, Response::EventAck(None)).await;
        }
    })
}

/// A small job the tiny model runs in well under a second, for attacks given no parameters.
pub fn small_job(prompt: &str) -> JobParams {
    JobParams {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width: 256,
        height: 256,
        steps: 2,
        true_cfg_scale: 1.0,
        seed: 7,
        images: 1,
        mode: Mode::TextToImage,
        exact: false,
        lora: None,
        latents: None,
    }
}

/// One cheating peer in a market of honest nodes.
pub struct Adversary {
    kind: AdversaryKind,
    name: String,
    secret: Arc<SecretKey>,
    client: Client,
    addr: Multiaddr,
    tally: Arc<Tally>,
    /// Requester side: legitimate jobs waiting for their outcome.
    waiters: Waiters,
    /// Requester side: every job it asked for itself.
    bought: Bought,
    /// Requester side: the signed requests of its own legitimate jobs.
    paid: Paid,
    /// Where it can dial providers directly (a hog opens its own connections): its bootstrap
    /// peers, and whatever [`Adversary::learn_address`] adds.
    addresses: Mutex<BTreeMap<PeerId, Multiaddr>>,
    /// A sybil's advertised keys.
    sybils: Vec<PublicKey>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adversary")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("peer", &self.secret.public().fmt_short())
            .finish()
    }
}

impl Adversary {
    /// Starts the adversary on 127.0.0.1, dialing `bootstrap`. Provider kinds start advertising
    /// and serving at once; requester kinds wait for [`Adversary::attack`]. `generator` runs
    /// an overcharger's jobs (the others only count prompt tokens with it, or ignore it).
    pub async fn start(
        kind: AdversaryKind,
        name: String,
        key: SecretKey,
        bootstrap: Vec<Multiaddr>,
        generator: Arc<dyn Generator>,
    ) -> anyhow::Result<Adversary> {
        Self::start_with(kind, name, key, bootstrap, generator, hostile::SYBIL_KEYS).await
    }

    /// [`Adversary::start`], a sybil advertising `sybil_keys` keys (others ignore it).
    pub async fn start_with(
        kind: AdversaryKind,
        name: String,
        key: SecretKey,
        bootstrap: Vec<Multiaddr>,
        generator: Arc<dyn Generator>,
        sybil_keys: usize,
    ) -> anyhow::Result<Adversary> {
        let secret = Arc::new(key);
        let addresses: BTreeMap<PeerId, Multiaddr> = bootstrap
            .iter()
            .filter_map(|a| match a.iter().last() {
                Some(Protocol::P2p(peer)) => Some((peer, a.clone())),
                _ => None,
            })
            .collect();
        let mut sybils = Vec::new();
        let bare = start_bare(&secret, bootstrap)
            .await
            .with_context(|| format!("adversary {name}"))?;
        let tally = Arc::new(Tally::default());
        let waiters: Waiters = Arc::default();
        let bought: Bought = Arc::default();
        let paid: Paid = Arc::default();
        let mut tasks = vec![bare.task];
        match kind {
            AdversaryKind::Overcharger | AdversaryKind::Silent => {
                let schedule = PriceSchedule::default();
                tasks.push(spawn_fast_adverts(
                    bare.client.clone(),
                    secret.clone(),
                    schedule,
                ));
                let play = if kind == AdversaryKind::Silent {
                    ProviderPlay::Swallow
                } else {
                    ProviderPlay::Deliver(Cheat::Overcharge)
                };
                let provider = DishonestProvider {
                    client: bare.client.clone(),
                    secret: secret.clone(),
                    generator,
                    schedule,
                    play,
                    tally: tally.clone(),
                    answers: None,
                    hand_over: Arc::default(),
                };
                tasks.push(provider.spawn(bare.events));
            }
            AdversaryKind::Sybil => {
                // It serves nothing: requests to its own key get a typed refusal.
                let (tx, _rx) = mpsc::channel(1);
                tasks.push(spawn_event_pump(bare.client.clone(), bare.events, tx));
                tasks.push(hostile::spawn_sybil_adverts(
                    bare.client.clone(),
                    secret.public(),
                    sybil_keys,
                    tally.clone(),
                ));
                sybils = hostile::sybil_keys(&secret.public(), sybil_keys);
            }
            AdversaryKind::Replayer
            | AdversaryKind::Forger
            | AdversaryKind::Freerider
            | AdversaryKind::Flooder
            | AdversaryKind::Hog => {
                let (tx, rx) = mpsc::channel(EVENT_QUEUE);
                tasks.push(spawn_event_pump(bare.client.clone(), bare.events, tx));
                tasks.push(spawn_router(
                    bare.client.clone(),
                    rx,
                    waiters.clone(),
                    bought.clone(),
                    paid.clone(),
                    tally.clone(),
                ));
            }
        }
        Ok(Adversary {
            kind,
            name,
            secret,
            client: bare.client,
            addr: bare.addr,
            tally,
            waiters,
            bought,
            paid,
            addresses: Mutex::new(addresses),
            sybils,
            tasks,
        })
    }

    /// Tells it where a provider listens (`addr` ends in `/p2p/<peer id>`), for attacks that
    /// open their own connections.
    pub fn learn_address(&self, addr: Multiaddr) {
        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
            self.addresses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(peer, addr);
        }
    }

    /// The keys a sybil advertises (empty for every other kind).
    pub fn sybil_keys(&self) -> &[PublicKey] {
        &self.sybils
    }

    pub fn kind(&self) -> AdversaryKind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        self.secret.public()
    }

    pub fn peer_id(&self) -> PeerId {
        self.client.local_peer_id()
    }

    /// Its listen address, ending in `/p2p/<peer id>`.
    pub fn addr(&self) -> &Multiaddr {
        &self.addr
    }

    /// A snapshot of what it has tried and got so far.
    pub fn record(&self) -> AdversaryRecord {
        self.tally.record(&self.name, self.kind.name())
    }

    /// [`Adversary::attack_with`] with a small job.
    pub async fn attack(&self, provider: PublicKey, rounds: u32) -> anyhow::Result<()> {
        self.attack_with(provider, &small_job("an adversary's job"), rounds)
            .await
    }

    /// Runs `rounds` rounds of a requester-side attack on `provider` with jobs of `params`:
    /// a replayer buys one job per round legitimately and replays it four ways; a forger sends
    /// three forged requests per round. Errors when the legitimate side of the attack fails
    /// (no credit, the provider is gone), never because a cheat was refused.
    pub async fn attack_with(
        &self,
        provider: PublicKey,
        params: &JobParams,
        rounds: u32,
    ) -> anyhow::Result<()> {
        for round in 0..rounds {
            let r = match self.kind {
                AdversaryKind::Replayer => self.replay_round(provider, params).await,
                AdversaryKind::Forger => self.forge_round(provider, params).await,
                AdversaryKind::Freerider => self.freeride_round(provider, params).await,
                AdversaryKind::Flooder => {
                    hostile::flood_round(&self.client, &self.secret, provider, params, &self.tally)
                        .await
                }
                AdversaryKind::Hog => {
                    let addr = self
                        .addresses
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&provider.to_peer_id())
                        .cloned();
                    match addr {
                        Some(addr) => hostile::hog_round(&self.secret, &addr, &self.tally).await,
                        None => Err(anyhow!(
                            "the hog knows no address of {}; tell it with learn_address",
                            provider.fmt_short()
                        )),
                    }
                }
                AdversaryKind::Overcharger | AdversaryKind::Silent | AdversaryKind::Sybil => bail!(
                    "a {} cheats the requesters that choose it; it has no attack to launch",
                    self.kind
                ),
            };
            r.with_context(|| {
                format!(
                    "{} {} round {} against {}",
                    self.kind,
                    self.name,
                    round + 1,
                    provider.fmt_short()
                )
            })?;
        }
        Ok(())
    }

    /// Sends one cheating job request and tallies the answer: only a typed refusal is refused.
    async fn cheat(&self, to: PeerId, signed: Signed<JobRequest>, what: &str) {
        self.cheat_request(to, Request::Job(signed), what, false)
            .await;
    }

    /// Sends one cheating request and tallies the answer: a typed refusal is refused, and so
    /// is `Ok` when `ok_is_noop` (an ack the provider already stored: it keeps the one it has).
    async fn cheat_request(&self, to: PeerId, request: Request, what: &str, ok_is_noop: bool) {
        match self.client.request(to, request).await {
            Ok(Response::Refused(reason)) => self
                .tally
                .attempt(true, &format!("{what} refused ({reason})")),
            Ok(Response::Ok) if ok_is_noop => {
                // The provider keeps the ack it has; the same one again changes nothing.
                self.tally
                    .attempt(true, &format!("{what} ignored (already stored)"))
            }
            Ok(Response::Accepted { .. }) => self.tally.attempt(false, &format!("{what} accepted")),
            // A known job id from its own requester gets the job's status: no second job.
            Ok(Response::Status(_)) if !ok_is_noop => self
                .tally
                .attempt(true, &format!("{what} answered with the job's status")),
            Ok(other) => self
                .tally
                .attempt(false, &format!("{what} answered {}", answer_name(&other))),
            Err(e) => {
                tracing::warn!(adversary = %self.name, error = %e, "a cheating request got no answer");
                self.tally.attempt(false, &format!("{what} unanswered"));
            }
        }
    }

    async fn replay_round(&self, provider: PublicKey, params: &JobParams) -> anyhow::Result<()> {
        let to = provider.to_peer_id();
        let quote = fetch_quote(&self.client, &self.secret, provider, params).await?;
        let mut req = job_request(provider, params.clone(), quote.cost);
        req.quote_id = Some(quote.quote_id);
        let signed = Signed::sign(&self.secret, &req)?;
        {
            let mut paid = self.paid.lock().unwrap_or_else(PoisonError::into_inner);
            if paid.len() >= MAX_BOUGHT {
                paid.pop_first();
            }
            paid.insert(signed.digest());
        }
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(req.job_id, tx);
        let forget = || {
            self.waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&req.job_id);
        };
        match self.client.request(to, Request::Job(signed.clone())).await {
            Ok(Response::Accepted { .. }) => {}
            Ok(other) => {
                forget();
                bail!(
                    "the legitimate job was not accepted: {}",
                    answer_name(&other)
                )
            }
            Err(e) => {
                forget();
                return Err(e).context("the legitimate job");
            }
        }

        // The same bytes while the job is queued or running.
        self.cheat(to, signed.clone(), "replays while running")
            .await;
        // The same job id, re-signed over other parameters: a "new" job that reuses the id.
        let mut variant = req.clone();
        variant.params.seed = variant.params.seed.wrapping_add(1);
        variant.created_at_ms = now_ms();
        self.cheat(
            to,
            Signed::sign(&self.secret, &variant)?,
            "re-signed replays",
        )
        .await;

        let (event, channel) = match tokio::time::timeout(LEGIT_JOB_WAIT, rx).await {
            Ok(Ok(e)) => e,
            Ok(Err(_)) | Err(_) => {
                forget();
                bail!("the legitimate job did not finish within {LEGIT_JOB_WAIT:?}")
            }
        };
        let JobEventKind::Completed { receipt } = event.kind else {
            let _ = self.client.respond(channel, Response::EventAck(None)).await;
            bail!(
                "the legitimate job ended without a receipt: {:?}",
                event.kind
            );
        };
        // Checked and acknowledged exactly as an honest requester does.
        let body = match check_receipt(&receipt, &signed, &quote, &provider) {
            Ok(b) => b,
            Err(problem) => {
                let _ = self
                    .client
                    .respond(
                        channel,
                        Response::Refused(FailReason::Engine(format!("bad receipt: {problem}"))),
                    )
                    .await;
                bail!("the honest provider's receipt does not check: {problem}");
            }
        };
        let ack = Signed::sign(
            &self.secret,
            &ReceiptAck {
                job_id: body.job_id,
                receipt_hash: receipt.digest(),
                acked_at_ms: now_ms(),
            },
        )?;
        let _ = self
            .client
            .respond(channel, Response::EventAck(Some(ack.clone())))
            .await;
        match self.client.request(to, Request::Fetch(ack.clone())).await {
            Ok(Response::Images { images, .. })
                if pixmarket_node::requester::check_images(&body, &images).is_ok() => {}
            other => bail!("the provider did not deliver the legitimate job's images: {other:?}"),
        }

        // The same bytes after the job was paid for: the job's status, never a second job.
        self.cheat(to, signed, "replays after payment").await;
        Ok(())
    }

    /// One job asked for and never acknowledged: every way it tries to get the images without
    /// a valid ack of its own must be refused.
    async fn freeride_round(&self, provider: PublicKey, params: &JobParams) -> anyhow::Result<()> {
        let to = provider.to_peer_id();
        let quote = fetch_quote(&self.client, &self.secret, provider, params).await?;
        let mut req = job_request(provider, params.clone(), quote.cost);
        req.quote_id = Some(quote.quote_id);
        let signed = Signed::sign(&self.secret, &req)?;
        {
            let mut b = self.bought.lock().unwrap_or_else(PoisonError::into_inner);
            if b.len() >= MAX_BOUGHT
                && let Some(first) = b.iter().next().copied()
            {
                b.remove(&first);
            }
            b.insert(req.job_id);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(req.job_id, tx);
        match self.client.request(to, Request::Job(signed)).await {
            Ok(Response::Accepted { .. }) => {}
            other => {
                self.waiters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&req.job_id);
                bail!("the freerider's job was not accepted: {other:?}");
            }
        }
        let (event, channel) = match tokio::time::timeout(LEGIT_JOB_WAIT, rx).await {
            Ok(Ok(e)) => e,
            _ => bail!("the freerider's job did not finish within {LEGIT_JOB_WAIT:?}"),
        };
        let JobEventKind::Completed { receipt } = event.kind else {
            let _ = self.client.respond(channel, Response::EventAck(None)).await;
            bail!(
                "the freerider's job ended without a receipt: {:?}",
                event.kind
            );
        };
        // 1. The receipt answered with an empty answer: no ack, no images in hand.
        let _ = self.client.respond(channel, Response::EventAck(None)).await;
        // 2. An ack of its own, for a receipt that is not this one.
        let wrong = Signed::sign(
            &self.secret,
            &ReceiptAck {
                job_id: req.job_id,
                receipt_hash: Hash::of(b"some other receipt"),
                acked_at_ms: now_ms(),
            },
        )?;
        self.fetch_attempt(to, wrong, "fetches with an ack for another receipt")
            .await;
        // 3. A valid ack of this receipt, signed by another key.
        let other = SecretKey::generate();
        let borrowed = Signed::sign(
            &other,
            &ReceiptAck {
                job_id: req.job_id,
                receipt_hash: receipt.digest(),
                acked_at_ms: now_ms(),
            },
        )?;
        self.fetch_attempt(to, borrowed, "fetches with an ack signed by another key")
            .await;
        // 4. Where the job stands: the receipt again, never the images.
        match self.client.request(to, Request::Status(req.job_id)).await {
            Ok(Response::Images { .. }) => self.tally.attempt(false, "status answered with images"),
            Ok(_) | Err(_) => self.tally.attempt(true, "status asked (no images in it)"),
        }
        Ok(())
    }

    /// Asks for the images with `ack` and tallies what came back: images are a gain.
    async fn fetch_attempt(&self, to: PeerId, ack: Signed<ReceiptAck>, what: &str) {
        match self.client.request(to, Request::Fetch(ack)).await {
            Ok(Response::Images { images, .. }) => {
                self.tally
                    .attempt(false, &format!("{what} answered with images"));
                self.tally
                    .images(u32::try_from(images.len()).unwrap_or(u32::MAX));
            }
            Ok(Response::Refused(reason)) => self
                .tally
                .attempt(true, &format!("{what} refused ({reason})")),
            Ok(other) => self
                .tally
                .attempt(true, &format!("{what} answered {}", answer_name(&other))),
            Err(_) => self.tally.attempt(true, &format!("{what} unanswered")),
        }
    }

    async fn forge_round(&self, provider: PublicKey, params: &JobParams) -> anyhow::Result<()> {
        let to = provider.to_peer_id();
        // A real quote, so every forged request would be affordable and well-priced: a
        // refusal can only be about who signed it and for whom.
        let quote = fetch_quote(&self.client, &self.secret, provider, params).await?;

        // Signed by someone else (a request it relays, as if it had intercepted it), sent over
        // its own connection: the events and the bill would go to different peers.
        let victim = SecretKey::generate();
        let relayed = Signed::sign(&victim, &job_request(provider, params.clone(), quote.cost))?;
        self.cheat(to, relayed, "requests signed by another key")
            .await;

        // Its own request with one bit of the signature flipped.
        let honest = Signed::sign(
            &self.secret,
            &job_request(provider, params.clone(), quote.cost),
        )?;
        let mut sig = honest.signature().to_bytes();
        sig[0] ^= 0x01;
        let corrupted = Signed::from_parts(
            honest.signer(),
            honest.body().to_vec(),
            Signature::from_bytes(&sig)?,
        );
        self.cheat(to, corrupted, "requests with a corrupted signature")
            .await;

        // Its own valid signature, over a request addressed to another provider.
        let elsewhere = SecretKey::generate().public();
        let misaddressed = Signed::sign(
            &self.secret,
            &job_request(elsewhere, params.clone(), quote.cost),
        )?;
        self.cheat(to, misaddressed, "requests for another provider")
            .await;
        Ok(())
    }

    /// Stops its swarm and every task.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// A response's name for the record (quotes and acks carry signatures not worth printing).
fn answer_name(r: &Response) -> String {
    match r {
        Response::Quote(_) => "a quote".into(),
        Response::Accepted { .. } => "accepted".into(),
        Response::EventAck(_) => "an event ack".into(),
        Response::ReceiptRefused(_) => "a signed refusal".into(),
        Response::Status(s) => format!("status {s:?}"),
        Response::Images { .. } => "images".into(),
        Response::Chain(c) => format!("{} chain entries", c.len()),
        Response::Ok => "ok".into(),
        Response::Refused(reason) => format!("refused: {reason}"),
    }
}
