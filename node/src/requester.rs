//! The requester client: buys generation.
//!
//! Data flow:
//! - adverts from the network → the provider table (fresh ones only; failures remembered).
//! - [`Requester::generate`]: candidates (a given peer, or the fresh part of the table in the
//!   order [`GenerateOptions::selection`] gives, at most [`GenerateOptions::max_attempts`] of
//!   them) → signed quote → signed request with a fresh job id
//!   and `max_cost` = the quoted cost → events routed back by job id: progress to the caller,
//!   then `Completed`: the receipt is checked (signatures, the request it answers, the units we
//!   asked for, the price against the metering function, `cost ≤ max_cost`, the image hashes,
//!   and the pair's chain), stored with our signed ack, and the ack returned on the event's
//!   response. On a refusal, a failure, a bad receipt or a timeout, the job is cancelled and the
//!   next provider is tried with a new job id. Only an acknowledged receipt is paid, so one
//!   image is never paid twice.
//!
//! Selection policies ([`Selection`]): `EstimatedFinish` (the default) ranks by past failures,
//! then the finish time of one standard image behind the queue (the advertised depth, or the
//! jobs this node has in flight there if more), in steps of half the fastest standard image,
//! then the price factor, then at random; `Random { seed }` shuffles the fresh providers (taken in public-key order) with
//! a ChaCha8 generator seeded with `seed`, ignoring speed, queue, price and failures, so a given
//! seed and provider table always give the same order (testnets use it as a naive baseline).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use pixmarket_ledger::Ledger;
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{
    CapacityAdvert, Hash, JobEvent, JobId, JobParams, JobRequest, MicroTokens, PublicKey, Quote,
    QuoteId, QuoteRequest, Receipt, ReceiptAck, SecretKey, Signed, validate,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::network::{Client, NetError, Request, Response, ResponseChannel};
use crate::now_ms;

/// Events in flight for one job; a provider sends one per step, and the caller drains them.
const JOB_EVENT_QUEUE: usize = 64;
/// How long a job may go without any event before it is given up on.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests are valid for ten minutes: long enough to wait in a queue.
const REQUEST_VALIDITY_MS: u64 = 10 * 60 * 1000;
/// How long to wait for a provider to confirm a receipt acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Providers asked at most, in order, before giving up: the default of
/// [`GenerateOptions::max_attempts`]. Three survives two bad providers without making a caller
/// with a hopeless job wait through the whole market.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;
/// Providers remembered; past this the stalest advert is forgotten.
const MAX_PROVIDERS: usize = 10_000;

/// One provider as the requester knows it.
#[derive(Clone, Debug)]
pub struct ProviderEntry {
    pub key: PublicKey,
    pub advert: CapacityAdvert,
    pub failures: u32,
}

/// How a requester orders the providers it knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Selection {
    /// Fewest failures, then soonest estimated finish (advertised speed × queue), then price.
    #[default]
    EstimatedFinish,
    /// The fresh providers shuffled by a ChaCha8 generator seeded with `seed`: deterministic for
    /// a given seed and provider table, blind to speed, queue, price and failures.
    Random { seed: u64 },
}

/// How a [`Requester::generate`] call may spend.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Never pay more than this for the whole job.
    pub max_cost: Option<MicroTokens>,
    /// Use only this provider.
    pub provider: Option<PeerId>,
    pub idle_timeout: Duration,
    /// How candidates are ordered when no `provider` is given.
    pub selection: Selection,
    /// Providers tried at most, in the selection's order; 0 counts as 1.
    pub max_attempts: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_cost: None,
            provider: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            selection: Selection::default(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }
}

/// What the caller sees while a job runs.
#[derive(Clone, Debug, PartialEq)]
pub enum JobProgress {
    Quoted {
        provider: PeerId,
        cost: MicroTokens,
    },
    Queued {
        provider: PeerId,
        position: u32,
        eta_ms: u64,
    },
    Step {
        step: u32,
        of: u32,
    },
    FailingOver {
        provider: PeerId,
        reason: String,
    },
}

/// A paid, verified result.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub provider: PeerId,
    pub images: Vec<Vec<u8>>,
    pub receipt: Signed<Receipt>,
    pub ack: Signed<ReceiptAck>,
    pub cost: MicroTokens,
    /// Providers tried, this one included.
    pub attempts: usize,
}

/// Why a `generate` call produced nothing (and paid nothing).
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("no provider is known; pass --peer or --bootstrap, or wait for adverts")]
    NoProviders,
    #[error("invalid request: {0}")]
    Invalid(#[from] validate::ValidationError),
    #[error("every provider failed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Why a receipt was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptProblem {
    #[error("receipt signature does not verify")]
    BadSignature,
    #[error("receipt {field} does not match: expected {expected}, got {got}")]
    Mismatch {
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error(transparent)]
    Cost(#[from] pixmarket_protocol::CostMismatch),
    #[error("charged {cost}, more than max_cost {max_cost}")]
    OverMax {
        cost: MicroTokens,
        max_cost: MicroTokens,
    },
    #[error("image {index} does not match its hash in the receipt")]
    ImageHash { index: usize },
}

fn mismatch<T: std::fmt::Debug>(field: &'static str, expected: T, got: T) -> ReceiptProblem {
    ReceiptProblem::Mismatch {
        field,
        expected: format!("{expected:?}"),
        got: format!("{got:?}"),
    }
}

/// Checks a completed job's receipt and images against what was asked and quoted.
pub fn check_receipt(
    receipt: &Signed<Receipt>,
    images: &[Vec<u8>],
    request: &Signed<JobRequest>,
    quote: &Quote,
    provider: &PublicKey,
) -> Result<Receipt, ReceiptProblem> {
    let r = receipt.verify().map_err(|_| ReceiptProblem::BadSignature)?;
    let req = request.verify().map_err(|_| ReceiptProblem::BadSignature)?;
    let eq = |field, a: String, b: String| {
        if a == b {
            Ok(())
        } else {
            Err(mismatch(field, a, b))
        }
    };
    eq("signer", provider.to_string(), receipt.signer().to_string())?;
    eq("provider", provider.to_string(), r.provider.to_string())?;
    eq(
        "requester",
        request.signer().to_string(),
        r.requester.to_string(),
    )?;
    eq("job id", req.job_id.to_string(), r.job_id.to_string())?;
    eq(
        "request hash",
        request.digest().to_string(),
        r.request_hash.to_string(),
    )?;
    let want = req.params.metered_units(quote.units.prompt_tokens);
    if r.units != want {
        return Err(mismatch("metered units", want, r.units));
    }
    if r.schedule != quote.schedule {
        return Err(mismatch("price schedule", quote.schedule, r.schedule));
    }
    r.check_cost()?;
    if r.cost > req.max_cost {
        return Err(ReceiptProblem::OverMax {
            cost: r.cost,
            max_cost: req.max_cost,
        });
    }
    if r.image_hashes.len() != images.len() || images.len() != req.params.images as usize {
        return Err(mismatch(
            "image count",
            req.params.images as usize,
            images.len(),
        ));
    }
    for (i, (img, h)) in images.iter().zip(&r.image_hashes).enumerate() {
        if Hash::of(img) != *h {
            return Err(ReceiptProblem::ImageHash { index: i });
        }
    }
    Ok(r)
}

type Route = mpsc::Sender<(JobEvent, ResponseChannel)>;

/// Removes a job's route when dropped.
struct RouteGuard<'a> {
    routes: &'a Mutex<BTreeMap<JobId, (PeerId, Route)>>,
    job: JobId,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&self.job);
        }
    }
}

/// The requester side of a node; cheap to clone.
#[derive(Clone)]
pub struct Requester {
    key: Arc<SecretKey>,
    ledger: Arc<Ledger>,
    net: Client,
    providers: Arc<Mutex<BTreeMap<PublicKey, ProviderEntry>>>,
    routes: Arc<Mutex<BTreeMap<JobId, (PeerId, Route)>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("peer", &self.key.public().fmt_short())
            .finish()
    }
}

impl Requester {
    pub fn new(
        key: Arc<SecretKey>,
        ledger: Arc<Ledger>,
        net: Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            key,
            ledger,
            net,
            providers: Arc::default(),
            routes: Arc::default(),
            metrics,
        }
    }

    /// Ends the jobs this requester waits on, as its node stops: their `generate` calls return
    /// an error at once instead of waiting out their idle timeout.
    pub(crate) fn stop(&self) {
        if let Ok(mut routes) = self.routes.lock() {
            routes.clear();
        }
    }

    /// Records a verified advert.
    pub fn on_advert(&self, key: PublicKey, advert: CapacityAdvert) {
        let Ok(mut table) = self.providers.lock() else {
            return;
        };
        if table.len() >= MAX_PROVIDERS && !table.contains_key(&key) {
            let stalest = table
                .iter()
                .min_by_key(|(_, e)| e.advert.issued_at_ms)
                .map(|(k, _)| *k);
            if let Some(k) = stalest {
                table.remove(&k);
            }
        }
        let failures = table.get(&key).map_or(0, |e| e.failures);
        table.insert(
            key,
            ProviderEntry {
                key,
                advert,
                failures,
            },
        );
    }

    /// Providers whose adverts are fresh, best first ([`Selection::EstimatedFinish`]).
    pub fn providers(&self) -> Vec<ProviderEntry> {
        self.ranked(Selection::EstimatedFinish)
    }

    /// Providers whose adverts are fresh, in the order `selection` gives.
    pub fn ranked(&self, selection: Selection) -> Vec<ProviderEntry> {
        let now = now_ms();
        let Ok(table) = self.providers.lock() else {
            return Vec::new();
        };
        // The table is a BTreeMap: this list is in public-key order, which Random relies on.
        let mut list: Vec<ProviderEntry> = table
            .values()
            .filter(|e| {
                e.advert
                    .issued_at_ms
                    .saturating_add(validate::ADVERT_TTL_MS)
                    >= now
            })
            .cloned()
            .collect();
        drop(table);
        match selection {
            Selection::EstimatedFinish => {
                // Jobs this node has sent each provider and not seen end: fresher than an
                // advert's queue depth when several jobs go out between two adverts.
                let mut mine: BTreeMap<PeerId, u32> = BTreeMap::new();
                if let Ok(routes) = self.routes.lock() {
                    for (peer, _) in routes.values() {
                        *mine.entry(*peer).or_default() += 1;
                    }
                }
                // Estimates within half a standard image of each other count as equal: adverts
                // are seconds old, and every requester reading the same table would otherwise
                // send its next job to the same provider. Equals go by price, then at random.
                let grain = list
                    .iter()
                    .map(|e| e.advert.ms_per_standard_image)
                    .min()
                    .unwrap_or(1)
                    .div_ceil(2)
                    .max(1);
                let mut rng = rand::thread_rng();
                // Estimated finish: queue ahead plus one standard image; then price; failures first.
                list.sort_by_cached_key(|e| {
                    let a = &e.advert;
                    let depth = a
                        .queue_depth
                        .max(mine.get(&e.key.to_peer_id()).copied().unwrap_or(0));
                    let finish = a
                        .ms_per_standard_image
                        .saturating_mul(u64::from(depth).saturating_add(1));
                    (
                        e.failures,
                        finish / grain,
                        a.schedule.price_factor_ppm,
                        rand::Rng::r#gen::<u64>(&mut rng),
                    )
                });
            }
            Selection::Random { seed } => list.shuffle(&mut ChaCha8Rng::seed_from_u64(seed)),
        }
        list
    }

    fn note_failure(&self, key: &PublicKey) {
        if let Ok(mut t) = self.providers.lock()
            && let Some(e) = t.get_mut(key)
        {
            e.failures = e.failures.saturating_add(1);
        }
    }

    /// Handles a job event from a provider: routes it to the waiting job, or refuses it.
    pub async fn on_event(&self, peer: PeerId, event: JobEvent, channel: ResponseChannel) {
        let route = self
            .routes
            .lock()
            .ok()
            .and_then(|r| r.get(&event.job_id).cloned());
        match route {
            Some((provider, tx)) if provider == peer => {
                if let Err(
                    mpsc::error::TrySendError::Full((_, channel))
                    | mpsc::error::TrySendError::Closed((_, channel)),
                ) = tx.try_send((event, channel))
                {
                    let _ = self.net.respond(channel, Response::EventAck(None)).await;
                }
            }
            _ => {
                if matches!(
                    event.kind,
                    JobEventKind::Progress { .. } | JobEventKind::Accepted { .. }
                ) {
                    // Late progress or queue news of a job that ended or failed over: expected.
                    tracing::debug!(%peer, job = %event.job_id, "news of a job we are not waiting on");
                } else {
                    tracing::warn!(%peer, job = %event.job_id, "event for a job we are not waiting on from this peer");
                }
                let reason =
                    FailReason::Invalid(pixmarket_protocol::messages::ValidationErrorWire {
                        field: "job_id".into(),
                        got: event.job_id.to_string(),
                        allowed: "a job this requester is waiting on, from its provider".into(),
                    });
                let _ = self.net.respond(channel, Response::Refused(reason)).await;
            }
        }
    }

    /// Generates through the market, failing over between providers. `progress` sees quotes,
    /// queue positions, steps and failovers.
    pub async fn generate(
        &self,
        params: JobParams,
        options: GenerateOptions,
        progress: &mut (dyn FnMut(JobProgress) + Send),
    ) -> Result<Outcome, GenerateError> {
        params.validate()?;
        let candidates: Vec<PeerId> = match options.provider {
            Some(p) => vec![p],
            None => self
                .ranked(options.selection)
                .iter()
                .map(|e| e.key.to_peer_id())
                .collect(),
        };
        if candidates.is_empty() {
            return Err(GenerateError::NoProviders);
        }
        let mut reasons = Vec::new();
        for (attempt, peer) in candidates
            .into_iter()
            .take(options.max_attempts.max(1))
            .enumerate()
        {
            let Ok(key) = PublicKey::from_peer_id(&peer) else {
                reasons.push(format!("{peer}: not an ed25519 peer id"));
                continue;
            };
            match self
                .try_provider(peer, key, &params, &options, progress)
                .await
            {
                Ok(mut outcome) => {
                    outcome.attempts = attempt + 1;
                    self.metrics.job("paid");
                    self.metrics.spent(outcome.cost);
                    return Ok(outcome);
                }
                Err(reason) => {
                    tracing::warn!(%peer, %reason, "provider failed; failing over");
                    self.note_failure(&key);
                    progress(JobProgress::FailingOver {
                        provider: peer,
                        reason: reason.clone(),
                    });
                    reasons.push(format!("{peer}: {reason}"));
                }
            }
        }
        Err(GenerateError::AllFailed(reasons))
    }

    async fn quote(
        &self,
        peer: PeerId,
        key: PublicKey,
        params: &JobParams,
    ) -> Result<Quote, String> {
        let qr = QuoteRequest {
            quote_id: QuoteId::random(),
            provider: key,
            prompt: params.prompt.clone(),
            width: params.width,
            height: params.height,
            steps: params.steps,
            images: params.images,
            strength_permille: params.mode.strength_permille(),
        };
        let signed = Signed::sign(&self.key, &qr).map_err(|e| e.to_string())?;
        let quote = match self
            .net
            .request(peer, Request::Quote(signed))
            .await
            .map_err(|e| e.to_string())?
        {
            Response::Quote(q) if q.signer() == key => q.verify().map_err(|e| e.to_string())?,
            Response::Refused(r) => return Err(format!("quote refused: {r}")),
            other => return Err(format!("unexpected answer to a quote: {other:?}")),
        };
        if quote.quote_id != qr.quote_id || quote.requester != self.key.public() {
            return Err("quote answers another request".into());
        }
        quote
            .check_cost()
            .map_err(|e| format!("quote price: {e}"))?;
        let want = params.metered_units(quote.units.prompt_tokens);
        if quote.units != want {
            return Err(format!("quote meters {:?}, expected {want:?}", quote.units));
        }
        Ok(quote)
    }

    async fn try_provider(
        &self,
        peer: PeerId,
        key: PublicKey,
        params: &JobParams,
        options: &GenerateOptions,
        progress: &mut (dyn FnMut(JobProgress) + Send),
    ) -> Result<Outcome, String> {
        let quote = self.quote(peer, key, params).await?;
        if let Some(max) = options.max_cost
            && quote.cost > max
        {
            return Err(format!(
                "quoted {} tokens, more than --max-cost {max}",
                quote.cost
            ));
        }
        progress(JobProgress::Quoted {
            provider: peer,
            cost: quote.cost,
        });
        let now = now_ms();
        let request = JobRequest {
            job_id: JobId::random(),
            provider: key,
            params: params.clone(),
            max_cost: quote.cost,
            created_at_ms: now,
            expires_at_ms: now + REQUEST_VALIDITY_MS,
            quote_id: Some(quote.quote_id),
        };
        let job_id = request.job_id;
        let signed = Signed::sign(&self.key, &request).map_err(|e| e.to_string())?;
        let (tx, mut rx) = mpsc::channel(JOB_EVENT_QUEUE);
        if let Ok(mut r) = self.routes.lock() {
            r.insert(job_id, (peer, tx));
        }
        // The route goes when this call ends, also when the caller drops it midway (a timeout,
        // Ctrl-C): a late result is then refused, and the provider refunds it.
        let _route = RouteGuard {
            routes: &self.routes,
            job: job_id,
        };
        async {
            match self
                .net
                .request(peer, Request::Job(signed.clone()))
                .await
                .map_err(|e| e.to_string())?
            {
                Response::Accepted {
                    queue_position,
                    eta_ms,
                } => {
                    progress(JobProgress::Queued {
                        provider: peer,
                        position: queue_position,
                        eta_ms,
                    });
                }
                Response::Refused(r) => return Err(format!("refused: {r}")),
                other => return Err(format!("unexpected answer to a job: {other:?}")),
            }
            loop {
                let (event, channel) = match tokio::time::timeout(options.idle_timeout, rx.recv())
                    .await
                {
                    Ok(Some(e)) => e,
                    // Our route was dropped: this node stopped (see `Requester::stop`).
                    Ok(None) => return Err("this node stopped".into()),
                    Err(_) => {
                        let _ = self.net.request(peer, Request::Cancel(job_id)).await;
                        return Err(format!("no word for {} s", options.idle_timeout.as_secs()));
                    }
                };
                match event.kind {
                    JobEventKind::Accepted {
                        queue_position,
                        eta_ms,
                    } => {
                        // The provider's heartbeat while the job waits in its queue.
                        let _ = self.net.respond(channel, Response::EventAck(None)).await;
                        progress(JobProgress::Queued {
                            provider: peer,
                            position: queue_position,
                            eta_ms,
                        });
                    }
                    JobEventKind::Progress { step, of } => {
                        let _ = self.net.respond(channel, Response::EventAck(None)).await;
                        progress(JobProgress::Step { step, of });
                    }
                    JobEventKind::Failed { reason } => {
                        let _ = self.net.respond(channel, Response::EventAck(None)).await;
                        return Err(format!("failed: {reason}"));
                    }
                    JobEventKind::Cancelled => {
                        let _ = self.net.respond(channel, Response::EventAck(None)).await;
                        return Err("cancelled by the provider".into());
                    }
                    JobEventKind::Completed { images, receipt } => {
                        return self
                            .accept(peer, key, &signed, &quote, images, receipt, channel)
                            .await;
                    }
                }
            }
        }
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn accept(
        &self,
        peer: PeerId,
        key: PublicKey,
        request: &Signed<JobRequest>,
        quote: &Quote,
        images: Vec<Vec<u8>>,
        receipt: Signed<Receipt>,
        channel: ResponseChannel,
    ) -> Result<Outcome, String> {
        let body = match check_receipt(&receipt, &images, request, quote, &key) {
            Ok(b) => b,
            Err(problem) => {
                tracing::warn!(%peer, %problem, "refusing receipt");
                let reason =
                    FailReason::Invalid(pixmarket_protocol::messages::ValidationErrorWire {
                        field: "receipt".into(),
                        got: problem.to_string(),
                        allowed:
                            "a receipt matching the request, the quote and the metering function"
                                .into(),
                    });
                let _ = self.net.respond(channel, Response::Refused(reason)).await;
                return Err(format!("bad receipt: {problem}"));
            }
        };
        let ack = ReceiptAck {
            job_id: body.job_id,
            receipt_hash: receipt.digest(),
            acked_at_ms: now_ms(),
        };
        let ack = Signed::sign(&self.key, &ack).map_err(|e| e.to_string())?;
        // Stored (durably) before the provider hears the ack.
        let ledger = self.ledger.clone();
        let (r2, a2) = (receipt.clone(), ack.clone());
        let stored = tokio::task::spawn_blocking(move || ledger.record_receipt(&r2, &a2))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = stored {
            tracing::warn!(%peer, error = %e, "receipt does not fit our books; refusing it");
            let _ = self
                .net
                .respond(
                    channel,
                    Response::Refused(FailReason::Engine(format!("receipt refused: {e}"))),
                )
                .await;
            return Err(format!("receipt refused by the ledger: {e}"));
        }
        let _ = self
            .net
            .respond(channel, Response::EventAck(Some(ack.clone())))
            .await;
        // Also deliver the ack as a request of its own and wait for the provider's word, so it
        // has arrived even if this node stops right after (a response in flight may not).
        match tokio::time::timeout(
            ACK_TIMEOUT,
            self.net.request(peer, Request::Ack(ack.clone())),
        )
        .await
        {
            Ok(Ok(Response::Ok)) => {}
            other => {
                tracing::warn!(%peer, job = %body.job_id, outcome = ?other, "provider did not confirm the ack")
            }
        }
        Ok(Outcome {
            provider: peer,
            images,
            cost: body.cost,
            receipt,
            ack,
            attempts: 1,
        })
    }
}
