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
//!
//! Selection policies ([`Selection`]): `EstimatedFinish` (the default) ranks by past failures,
//! then the finish time of one standard image behind the queue (the advertised depth, or the
//! jobs this node has in flight there if more), in steps of half the fastest standard image,
//! then the price factor, then at random; `Random { seed }` shuffles the fresh providers (taken in public-key order) with
//! a ChaCha8 generator seeded with `seed`, ignoring speed, queue, price and failures, so a given
//! seed and provider table always give the same order (testnets use it as a naive baseline).

mod check;
mod exchange;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use pixmarket_ledger::{Ledger, Role};
use pixmarket_protocol::{
    CapacityAdvert, JobEvent, JobId, MicroTokens, PublicKey, Receipt, ReceiptAck, SecretKey,
    Signed, validate,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::network::{Client, NetError, ResponseChannel};
use crate::now_ms;

pub use check::{ReceiptProblem, check_images, check_receipt};

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
    /// The least time each request stays valid (its `expires_at`); it is longer when the
    /// provider's quote expects a long wait: four times the quoted queue wait plus the job's
    /// own time at the advertised speed, at most the protocol's hour. A provider can settle the
    /// job until then, so a silent provider is failed over from only after it.
    pub request_validity: Duration,
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
    #[error("every provider failed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
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
    /// Per provider: results it was paid for and did not deliver (from the ledger).
    undelivered: Arc<Mutex<BTreeMap<PublicKey, u32>>>,
    /// This node's own token counters, by the model id providers advertise.
    counters: Arc<Mutex<BTreeMap<String, TokenCounter>>>,
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
        // Standing survives restarts: every undelivered record in the books counts.
        let mut undelivered: BTreeMap<PublicKey, u32> = BTreeMap::new();
        if let Ok(receipts) = ledger.receipts(None) {
            for r in receipts {
                if r.role == Role::Requester && r.undelivered.is_some() {
                    *undelivered.entry(r.receipt.signer()).or_default() += 1;
                }
            }
        }
        Self {
            key,
            ledger,
            net,
            providers: Arc::default(),
            routes: Arc::default(),
            undelivered: Arc::new(Mutex::new(undelivered)),
            counters: Arc::default(),
            metrics,
        }
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

    /// Results `provider` was paid for and did not deliver, as this node's books record.
    pub fn undelivered_by(&self, provider: &PublicKey) -> u32 {
        self.undelivered
            .lock()
            .ok()
            .and_then(|u| u.get(provider).copied())
            .unwrap_or(0)
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
                // Estimated finish: the queue ahead spread over the provider's devices, plus
                // one standard image; then price; failures first.
                list.sort_by_cached_key(|e| {
                    let a = &e.advert;
                    let depth = a
                        .queue_depth
                        .max(mine.get(&e.key.to_peer_id()).copied().unwrap_or(0));
                    let finish = a.estimated_finish_ms(depth);
                    (
                        e.failures.saturating_add(
                            self.undelivered_by(&e.key)
                                .saturating_mul(UNDELIVERED_WEIGHT),
                        ),
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
}
