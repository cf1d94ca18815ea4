//! The requester client: buys generation.
//!
//! Data flow:
//! - adverts from the network → the provider table (fresh ones only; failures remembered).
//! - [`Requester::generate`]: candidates (a given peer, or the fresh part of the table in the
//!   order [`GenerateOptions::selection`] gives, at most [`GenerateOptions::max_attempts`] of
//!   them) → for each, the exchange of [`exchange`]: signed quote → signed request with a fresh
//!   job id (re-sent with the same id until answered) → events routed back by job id →
//!   `Completed { receipt }` checked ([`check`]) and linked to the pair's chain (learning any
//!   credit notes missed) → stored with our signed ack, which is answered and then carried by
//!   `Fetch` until the images come and match the receipt's hashes.
//! - Silence is not failure: after [`GenerateOptions::idle_timeout`] without news the requester
//!   asks the provider for the job's status, and fails over only on a typed refusal of the
//!   submission, a signed void, a credited receipt, or once the request has expired (when the
//!   provider can no longer settle it). Only an acknowledged receipt is paid, and a job is
//!   acknowledged once, so one image is never paid twice.
//! - A provider that took our ack and did not deliver leaves a signed record (its receipt,
//!   our ack, marked undelivered in the ledger) that ranks it last from then on.
//! - A `generate` call dropped before its attempt ends sends that provider a `Cancel`
//!   ([`cancel`]); [`Requester::abandoned`] waits for the answers.
//!
//! Selection policies ([`Selection`]): `EstimatedFinish` (the default) ranks by past failures,
//! then the finish time of one standard image behind the queue (the advertised depth, or the
//! jobs this node has in flight there if more, spread over the advertised devices only once the
//! provider has delivered to us), in steps of half the fastest standard image, then the price
//! factor, then at random, and a job tries at most one provider that has not delivered to us
//! when one that has is ranked; `Random { seed }` shuffles the fresh providers (taken in public-key order) with
//! a ChaCha8 generator seeded with `seed`, ignoring speed, queue, price and failures, so a given
//! seed and provider table always give the same order (testnets use it as a naive baseline).

mod cancel;
mod check;
mod exchange;
mod failure;
mod previews;
mod refetch;
mod standing;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use pixmarket_ledger::Ledger;
use pixmarket_protocol::{
    CapacityAdvert, Hash, JobEvent, JobId, MicroTokens, PublicKey, Receipt, ReceiptAck, SecretKey,
    Signed, validate,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::network::{Client, NetError, ResponseChannel};
use crate::now_ms;

pub use cancel::{CANCEL_TIMEOUT, SentCancel};
pub use check::{ReceiptProblem, check_images, check_receipt};
pub use exchange::{ChainSync, FETCH_DEADLINE};
pub use failure::{FailedAttempt, Failure, FailureKind};
pub use refetch::{RESULT_KEPT, RefetchError, Refetched};
pub use standing::Standing;
use standing::Standings;

/// Counts a prompt's tokens in one model's tokenizer: the requester's own count, against which
/// a quote (and so the receipt, which must meter what the quote did) may not inflate the
/// metered prompt length. `None` when it cannot count this prompt.
pub type TokenCounter = Arc<dyn Fn(&str) -> Option<u32> + Send + Sync>;

/// Events in flight for one job; a provider sends one per step, and the caller drains them.
const JOB_EVENT_QUEUE: usize = 64;
/// How long a job may go without any event before its provider is asked for its status.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request is valid at least this long by default (more when the provider's quoted queue is
/// long, see [`GenerateOptions::request_validity`]): a job on a consumer card with a few lost
/// messages fits, and it is about the longest a silent provider keeps a job from failing over.
pub const DEFAULT_REQUEST_VALIDITY: Duration = Duration::from_secs(3 * 60);
/// An undelivered result (our ack taken, no images) weighs this many failures in ranking.
const UNDELIVERED_WEIGHT: u32 = 100;
/// Providers asked at most, in order, before giving up: the default of
/// [`GenerateOptions::max_attempts`]. Three survives two bad providers without making a caller
/// with a hopeless job wait through the whole market.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;
/// Providers remembered. When the table is full, a new key takes the place of an expired
/// advert, else of the provider heard from longest ago that has not delivered to us; when every
/// place is held by a provider that has, the newcomer waits. Times are this node's clock when
/// the advert arrived, so an advert dated in the future buys nothing, and neither do claimed
/// speed or capacity.
pub const MAX_PROVIDERS: usize = 10_000;

/// Providers that have not delivered to us tried at most in one job, when one that has is
/// among the candidates: one, so a newcomer (honest or not) is still tried, first when it ranks
/// first, but a crowd of fresh keys claiming the best speed costs each job one failed try, not
/// all of them, and the job goes on to a provider that delivered.
const MAX_UNTRIED_PER_JOB: usize = 1;

/// The devices a provider's queue is spread over in ranking: its advert's claim once it has
/// delivered to us (its measured speed then governs, and a failure drops it below the rest),
/// else one, which is all this requester has seen of it. A fresh key claiming a thousand
/// devices behind a deep queue so ranks by that whole queue and cannot beat a known-good
/// provider with a shorter one.
fn ranked_devices(advert: &CapacityAdvert, known_good: bool) -> u32 {
    if known_good { advert.device_count() } else { 1 }
}

/// One provider as the requester knows it.
#[derive(Clone, Debug)]
pub struct ProviderEntry {
    pub key: PublicKey,
    pub advert: CapacityAdvert,
    /// Attempts that failed over (the same as `standing.failures`).
    pub failures: u32,
    /// When its latest advert arrived, by this node's clock.
    pub heard_at_ms: u64,
    /// What this requester has seen of it.
    pub standing: Standing,
}

impl ProviderEntry {
    /// Fresh by the earlier of its advert's own date and its arrival here: a date in the
    /// future does not keep an advert alive longer.
    fn is_fresh(&self, now_ms: u64) -> bool {
        self.advert
            .issued_at_ms
            .min(self.heard_at_ms)
            .saturating_add(validate::ADVERT_TTL_MS)
            >= now_ms
    }
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
    /// The least time each request stays valid (its `expires_at`); it is longer when the
    /// provider's quote expects a long wait: four times the quoted queue wait plus the job's
    /// own time at the advertised speed, at most the protocol's hour. A provider can settle the
    /// job until then, so a silent provider is failed over from only after it.
    pub request_validity: Duration,
    /// How long the images are asked for after our ack before the job is recorded as
    /// undelivered against the provider ([`FETCH_DEADLINE`] by default).
    pub fetch_deadline: Duration,
    /// Previews of the first image to ask the provider for, 0 to
    /// [`pixmarket_protocol::preview::MAX_PREVIEWS`] (more is the maximum); 0 by default.
    pub previews: u8,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_cost: None,
            provider: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            selection: Selection::default(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            request_validity: DEFAULT_REQUEST_VALIDITY,
            fetch_deadline: FETCH_DEADLINE,
            previews: 0,
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
        /// A picture of the job's first image at this step, when previews were asked for
        /// ([`GenerateOptions::previews`]) and this step has one; checked against the
        /// protocol's bounds ([`pixmarket_protocol::preview`]), free, and not the image.
        preview: Option<pixmarket_protocol::Preview>,
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
    /// How we were connected to the provider when the images arrived (direct, hole-punched,
    /// relayed).
    pub path: crate::network::PathKind,
}

/// Why a `generate` call produced nothing. Nothing was paid, except in `Undelivered`: the
/// provider took our ack (one job's cost) and sent no images; the ledger keeps the signed
/// record against it.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(
        "provider {provider} was paid {cost} tokens for job {job} and did not deliver the images ({reason}); its receipt and our ack are kept as a record against it"
    )]
    Undelivered {
        provider: PeerId,
        job: JobId,
        cost: MicroTokens,
        reason: String,
    },
    #[error("no provider is known; pass --peer or --bootstrap, or wait for adverts")]
    NoProviders,
    #[error("invalid request: {0}")]
    Invalid(#[from] validate::ValidationError),
    /// Each provider tried, in order, with its typed failure.
    #[error("every provider failed: {}", failure::joined(.0))]
    AllFailed(Vec<FailedAttempt>),
    #[error(transparent)]
    Net(#[from] NetError),
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
    /// Per provider: what this requester has seen of it (seeded from the books).
    standings: Arc<Mutex<Standings>>,
    /// This node's own token counters, by the model id providers advertise.
    counters: Arc<Mutex<BTreeMap<String, TokenCounter>>>,
    metrics: Arc<Metrics>,
    /// Cancels sent for jobs whose `generate` call was dropped midway ([`cancel`]).
    cancels: cancel::PendingCancels,
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
        // Standing survives restarts: every acknowledged receipt in the books counts.
        let standings = Standings::from_books(&ledger);
        Self {
            key,
            ledger,
            net,
            providers: Arc::default(),
            routes: Arc::default(),
            standings: Arc::new(Mutex::new(standings)),
            counters: Arc::default(),
            metrics,
            cancels: Arc::default(),
        }
    }

    /// Waits for the answers to the cancels sent for jobs abandoned midway (a dropped
    /// [`Requester::generate`]), each at most [`CANCEL_TIMEOUT`], and says what each found.
    pub async fn abandoned(&self) -> Vec<SentCancel> {
        cancel::collect(&self.cancels).await
    }

    /// Counts prompts with `counter` for providers that advertise `model_id`: their quotes
    /// may not meter more prompt tokens than it counts. Providers of other models (or known
    /// only by address, with no advert yet) are not checked.
    pub fn count_tokens_with(&self, model_id: impl Into<String>, counter: TokenCounter) {
        if let Ok(mut c) = self.counters.lock() {
            c.insert(model_id.into(), counter);
        }
    }

    /// The advertised time of one standard image at `provider`, if it has advertised.
    pub(crate) fn advertised_ms_per_standard(&self, provider: &PublicKey) -> Option<u64> {
        Some(
            self.providers
                .lock()
                .ok()?
                .get(provider)?
                .advert
                .ms_per_standard_image,
        )
    }

    /// Our own count of `prompt`'s tokens in the tokenizer of `provider`'s advertised model.
    pub(crate) fn own_token_count(&self, provider: &PublicKey, prompt: &str) -> Option<u32> {
        let model = self
            .providers
            .lock()
            .ok()?
            .get(provider)?
            .advert
            .model_id
            .clone();
        let counter = self.counters.lock().ok()?.get(&model)?.clone();
        counter(prompt)
    }

    /// Whether `provider`'s quotes are checked against our own token count: it has advertised
    /// a model we count prompts for.
    pub fn checks_tokens_of(&self, provider: &PublicKey) -> bool {
        let Some(model) = self
            .providers
            .lock()
            .ok()
            .and_then(|p| Some(p.get(provider)?.advert.model_id.clone()))
        else {
            return false;
        };
        self.counters.lock().is_ok_and(|c| c.contains_key(&model))
    }

    /// Results `provider` was paid for and did not deliver, as this node's books record.
    pub fn undelivered_by(&self, provider: &PublicKey) -> u32 {
        self.standing_of(provider).undelivered
    }

    /// What this requester has seen of `provider`.
    pub fn standing_of(&self, provider: &PublicKey) -> Standing {
        self.standings
            .lock()
            .map(|s| s.get(provider))
            .unwrap_or_default()
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
        let now = now_ms();
        let Ok(standings) = self.standings.lock() else {
            return;
        };
        let Ok(mut table) = self.providers.lock() else {
            return;
        };
        if table.len() >= MAX_PROVIDERS && !table.contains_key(&key) {
            table.retain(|_, e| e.is_fresh(now));
        }
        if table.len() >= MAX_PROVIDERS && !table.contains_key(&key) {
            let newcomer_good = standings.known_good(&key);
            let place = table
                .iter()
                .filter(|(k, _)| !standings.known_good(k))
                .min_by_key(|(_, e)| e.heard_at_ms)
                .map(|(k, _)| *k);
            match place {
                Some(k) => {
                    table.remove(&k);
                }
                // Every place is held by a provider that delivered to us.
                None if !newcomer_good => return,
                None => {
                    let oldest = table
                        .iter()
                        .min_by_key(|(_, e)| e.heard_at_ms)
                        .map(|(k, _)| *k);
                    if let Some(k) = oldest {
                        table.remove(&k);
                    }
                }
            }
        }
        let standing = standings.get(&key);
        table.insert(
            key,
            ProviderEntry {
                key,
                advert,
                failures: standing.failures,
                heard_at_ms: now,
                standing,
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
            .filter(|e| e.is_fresh(now))
            .cloned()
            .collect();
        drop(table);
        let Ok(standings) = self.standings.lock() else {
            return Vec::new();
        };
        for e in &mut list {
            e.standing = standings.get(&e.key);
            e.failures = e.standing.failures;
        }
        // The speed each is ranked on: what we measured, else its claim as far as the
        // measured record allows (see `Standings::prior_ms`).
        let speed: BTreeMap<PublicKey, u64> = list
            .iter()
            .map(|e| {
                let s = e
                    .standing
                    .ms_per_standard
                    .unwrap_or_else(|| standings.prior_ms(e.advert.ms_per_standard_image));
                (e.key, s.max(1))
            })
            .collect();
        let good: BTreeMap<PublicKey, bool> = list
            .iter()
            .map(|e| (e.key, standings.known_good(&e.key)))
            .collect();
        drop(standings);
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
                let grain = speed
                    .values()
                    .copied()
                    .min()
                    .unwrap_or(1)
                    .div_ceil(2)
                    .max(1);
                let mut rng = rand::thread_rng();
                // Failures first (fewest), then estimated finish: the queue ahead spread over
                // the provider's devices, plus one standard image, at the ranked speed; then
                // providers that delivered to us before those that have not; then price; then
                // chance.
                list.sort_by_cached_key(|e| {
                    let a = &e.advert;
                    let depth = a
                        .queue_depth
                        .max(mine.get(&e.key.to_peer_id()).copied().unwrap_or(0));
                    let ms = speed.get(&e.key).copied().unwrap_or(u64::MAX);
                    let known_good = good.get(&e.key).copied().unwrap_or(false);
                    let rounds = u64::from(depth / ranked_devices(a, known_good)).saturating_add(1);
                    let finish = ms.saturating_mul(rounds);
                    (
                        e.standing.failures.saturating_add(
                            e.standing.undelivered.saturating_mul(UNDELIVERED_WEIGHT),
                        ),
                        finish / grain,
                        !known_good,
                        a.schedule.price_factor_ppm,
                        rand::Rng::r#gen::<u64>(&mut rng),
                    )
                });
            }
            Selection::Random { seed } => list.shuffle(&mut ChaCha8Rng::seed_from_u64(seed)),
        }
        list
    }

    /// The providers a job tries, in order: the ranking's, with at most
    /// [`MAX_UNTRIED_PER_JOB`] that have not delivered to us when any that has is ranked
    /// (`Random` is a naive baseline and takes the ranking as it is); with `lora`, only those
    /// that offer that LoRA file.
    pub(crate) fn candidates(&self, selection: Selection, lora: Option<Hash>) -> Vec<PeerId> {
        let mut list = self.ranked(selection);
        list.retain(|e| lora.is_none_or(|h| e.advert.lora(&h).is_some()));
        let Ok(standings) = self.standings.lock() else {
            return Vec::new();
        };
        let any_good = list.iter().any(|e| standings.known_good(&e.key));
        if matches!(selection, Selection::Random { .. }) || !any_good {
            return list.iter().map(|e| e.key.to_peer_id()).collect();
        }
        let mut untried = 0;
        list.iter()
            .filter(|e| {
                if standings.known_good(&e.key) {
                    return true;
                }
                untried += 1;
                untried <= MAX_UNTRIED_PER_JOB
            })
            .map(|e| e.key.to_peer_id())
            .collect()
    }

    fn note_failure(&self, key: &PublicKey) {
        if let Ok(mut s) = self.standings.lock() {
            s.failed(*key);
        }
    }

    fn note_delivered(&self, key: &PublicKey, ms_per_standard: Option<u64>) {
        if let Ok(mut s) = self.standings.lock() {
            s.delivered(*key, ms_per_standard);
        }
    }

    fn note_undelivered(&self, key: &PublicKey) {
        if let Ok(mut s) = self.standings.lock() {
            s.undelivered(*key);
        }
    }

    fn note_delivered_late(&self, key: &PublicKey) {
        if let Ok(mut s) = self.standings.lock() {
            s.delivered_late(*key);
        }
    }
}
