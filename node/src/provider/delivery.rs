//! Delivery: the provider's side of the fair exchange (docs/protocol.md "Fair exchange").
//!
//! Per result, in an async task, one lane per requester (a requester's results are settled and
//! offered one at a time, so each new chain entry names a head both sides can know):
//! 1. settle: the receipt is built from the pair's link inside the settle transaction and is
//!    durable before anything is sent;
//! 2. offer: `Completed { receipt }` (hashes, no images) is sent and re-sent with the same
//!    receipt until the requester answers with its signed ack (stored), a signed refusal, or
//!    [`ProviderSettings::ack_deadline`](super::ProviderSettings::ack_deadline) passes; `Busy`
//!    and `ShuttingDown` answers wait for their hint, any other answer or silence backs off.
//!    An ack that arrives through a `Fetch` ends the offer too;
//! 3. a refused or unacknowledged receipt is taken back with a signed credit note.
//!
//! The images are kept in memory ([`RESULT_RETENTION`], at most [`MAX_RETAINED_BYTES`]) and
//! released only to a `Fetch` that carries the requester's signed ack, once that ack is
//! stored: no image leaves before its payment is committed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use pixmarket_ledger::{LedgerError, Role};
use pixmarket_protocol::messages::{FailReason, JobEventKind, ValidationErrorWire};
use pixmarket_protocol::{
    Hash, JobEvent, JobId, PublicKey, Receipt, ReceiptAck, ReceiptRefusal, Signed, StepCaching,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::queue::QueuedJob;
use super::{Provider, refuse, send_with_timeout};
use crate::network::{Request, Response};
use crate::now_ms;

/// How long a settled receipt waits for its ack before it is credited back, by default. A
/// requester that heard nothing asks for its job's status after its idle timeout (60 s by
/// default) and acknowledges then, so five minutes leaves room for several lost messages.
pub const ACK_DEADLINE: Duration = Duration::from_secs(300);
/// How long an acknowledged result's images are kept for re-delivery (a `Fetch` whose answer
/// was lost is simply asked again).
pub const RESULT_RETENTION: Duration = Duration::from_secs(600);
/// The most image bytes kept for re-delivery; past it the oldest results go first. A full
/// queue of 1024² jobs at four images of a few MiB each fits many times over.
pub const MAX_RETAINED_BYTES: usize = 1024 * 1024 * 1024;
/// The first wait before an offer is re-sent; it doubles up to [`MAX_OFFER_BACKOFF`].
const FIRST_OFFER_BACKOFF: Duration = Duration::from_millis(250);
const MAX_OFFER_BACKOFF: Duration = Duration::from_secs(5);
/// The longest `Busy` hint obeyed before re-sending; a longer one is capped (the deadline
/// still bounds the whole offer).
const MAX_BUSY_WAIT: Duration = Duration::from_secs(10);
/// One offer waits this long for its answer before it is re-sent. An offer is a receipt of
/// about 1 KiB and its answer an ack: a round trip takes milliseconds, so a lost one should cost
/// a re-send soon (an offer is idempotent), not the network's whole timeout; and while it
/// waits, the requester's other results wait in its lane.
const OFFER_TIMEOUT: Duration = Duration::from_secs(3);

/// A result kept for re-delivery.
struct Kept {
    requester: PublicKey,
    receipt_hash: Hash,
    images: Vec<Vec<u8>>,
    bytes: usize,
    kept_at: Instant,
    /// Woken when the ack arrives through a `Fetch`, so the offer stops at once.
    acked: Arc<Notify>,
}

#[derive(Default)]
struct KeptResults {
    by_job: BTreeMap<JobId, Kept>,
    bytes: usize,
}

/// The delivery state of a provider.
#[derive(Default)]
pub(super) struct Deliveries {
    kept: Mutex<KeptResults>,
    lanes: Mutex<BTreeMap<PublicKey, Arc<tokio::sync::Mutex<()>>>>,
    tasks: Mutex<JoinSet<()>>,
}

impl Deliveries {
    fn lane(&self, requester: PublicKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Lanes nobody waits on are dropped, so the map holds only requesters in delivery.
        lanes.retain(|_, l| Arc::strong_count(l) > 1);
        lanes.entry(requester).or_default().clone()
    }

    fn keep(
        &self,
        job: JobId,
        requester: PublicKey,
        receipt_hash: Hash,
        images: Vec<Vec<u8>>,
    ) -> Arc<Notify> {
        let mut k = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bytes = images.iter().map(Vec::len).sum();
        // Expired first, then the oldest, until the new result fits.
        let now = Instant::now();
        let stale: Vec<JobId> = k
            .by_job
            .iter()
            .filter(|(_, v)| now.duration_since(v.kept_at) > RESULT_RETENTION)
            .map(|(j, _)| *j)
            .collect();
        for j in stale {
            if let Some(v) = k.by_job.remove(&j) {
                k.bytes -= v.bytes;
            }
        }
        while k.bytes + bytes > MAX_RETAINED_BYTES {
            let Some(oldest) = k
                .by_job
                .iter()
                .min_by_key(|(_, v)| v.kept_at)
                .map(|(j, _)| *j)
            else {
                break;
            };
            if let Some(v) = k.by_job.remove(&oldest) {
                k.bytes -= v.bytes;
            }
        }
        let acked = Arc::new(Notify::new());
        k.bytes += bytes;
        k.by_job.insert(
            job,
            Kept {
                requester,
                receipt_hash,
                images,
                bytes,
                kept_at: now,
                acked: acked.clone(),
            },
        );
        acked
    }

    fn drop_result(&self, job: JobId) {
        let mut k = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = k.by_job.remove(&job) {
            k.bytes -= v.bytes;
        }
    }

    /// The kept images of `job` for `requester`, waking its offer.
    fn take_images(
        &self,
        job: JobId,
        requester: &PublicKey,
        receipt_hash: &Hash,
    ) -> Option<Vec<Vec<u8>>> {
        let k = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = k.by_job.get(&job)?;
        if v.requester != *requester || v.receipt_hash != *receipt_hash {
            return None;
        }
        v.acked.notify_one();
        Some(v.images.clone())
    }

    fn spawn(
        &self,
        runtime: &tokio::runtime::Handle,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Reap the finished ones, so the set holds only deliveries in flight.
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(task, runtime);
    }

    /// Waits for the deliveries in flight until `deadline`, then aborts the rest.
    async fn drain(&self, deadline: tokio::time::Instant) {
        let mut tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {}
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// Aborts every delivery (a crash); false if they did not end by `deadline`.
    pub(super) async fn abort_all(&self, deadline: tokio::time::Instant) -> bool {
        let mut tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        tasks.abort_all();
        tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok()
    }
}

/// How one offer ended.
enum Offer {
    Acked,
    Refused(String),
    Unanswered,
    /// The node is stopping: the receipt is credited by the stop (or the next start).
    Stopped,
}

impl Provider {
    /// Hands a computed result to its requester's delivery lane (called by the worker; it
    /// returns at once).
    /// `mode` is how the device ran the job, as its receipt records.
    pub(super) fn deliver(
        &self,
        job: QueuedJob,
        pngs: Vec<Vec<u8>>,
        run_ms: u64,
        mode: StepCaching,
        progress: Option<tokio::task::JoinHandle<()>>,
    ) {
        let me = self.clone();
        self.inner
            .deliveries
            .spawn(&self.inner.runtime, async move {
                // The job's progress (and its previews) reaches the requester before its
                // receipt.
                super::progress::drained(progress).await;
                me.settle_and_offer(job, pngs, run_ms, mode).await
            });
    }

    async fn settle_and_offer(
        self,
        job: QueuedJob,
        pngs: Vec<Vec<u8>>,
        run_ms: u64,
        mode: StepCaching,
    ) {
        let lane = self.inner.deliveries.lane(job.requester);
        let _turn = lane.lock().await;
        if self.crashed() {
            return;
        }
        let hashes: Vec<Hash> = pngs.iter().map(|p| Hash::of(p)).collect();
        let me = self.clone();
        let (job_id, requester, peer) = (job.job_id, job.requester, job.peer);
        let settled = tokio::task::spawn_blocking(move || {
            let r = me.settle(&job, hashes, run_ms, mode);
            (job, r)
        })
        .await;
        let Ok((job, settled)) = settled else {
            return;
        };
        let receipt = match settled {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(job = %job_id, error = %e, "cannot settle");
                let reason = match e {
                    LedgerError::HoldExpired { .. } => FailReason::HoldExpired,
                    other => FailReason::Engine(format!("settlement failed: {other}")),
                };
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.finish_failed(&job, reason)).await;
                return;
            }
        };
        self.lock().running.remove(&job_id);
        self.inner.metrics.job("completed");
        self.inner.metrics.earned(job.cost);
        // One line per sold job, for the operator (info is the node's default level).
        tracing::info!(
            job = %job_id,
            buyer = %requester.fmt_short(),
            size = %format!("{}x{}", job.params.width, job.params.height),
            steps = job.units.steps,
            images = job.params.images,
            cost = %job.cost,
            seconds = format!("{:.1}", job.queued_at.elapsed().as_secs_f64()),
            "sold a job (receipt offered)"
        );
        let acked = self
            .inner
            .deliveries
            .keep(job_id, requester, receipt.digest(), pngs);
        let outcome = self.offer(peer, &job, &receipt, &acked).await;
        let why = match outcome {
            Offer::Acked | Offer::Stopped => return,
            Offer::Refused(reason) => format!("the requester refused the receipt: {reason}"),
            Offer::Unanswered => format!(
                "not acknowledged within {} s",
                self.inner.settings.ack_deadline.as_secs()
            ),
        };
        self.credit_back(job_id, why).await;
    }

    /// Credits a settled, unacknowledged receipt (an ack that won the race keeps it paid).
    async fn credit_back(&self, job: JobId, why: String) {
        let me = self.clone();
        let credited = tokio::task::spawn_blocking(move || {
            me.inner.ledger.credit(job, &me.inner.key, &why, now_ms())
        })
        .await;
        match credited {
            Ok(Ok(_)) => {
                tracing::warn!(%job, "receipt credited back: not acknowledged");
                self.inner.metrics.job("credited");
                self.inner.deliveries.drop_result(job);
            }
            Ok(Err(LedgerError::AlreadyAcked { .. } | LedgerError::Refunded { .. })) => {}
            Ok(Err(e)) => tracing::error!(%job, error = %e, "cannot credit a receipt"),
            Err(_) => {}
        }
    }

    fn settle(
        &self,
        job: &QueuedJob,
        image_hashes: Vec<Hash>,
        run_ms: u64,
        mode: StepCaching,
    ) -> Result<Signed<Receipt>, LedgerError> {
        let queued_ms = u64::try_from(job.queued_at.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_sub(run_ms);
        let issued_at_ms = now_ms();
        self.inner
            .ledger
            .settle_with(job.job_id, &self.inner.key, |link| Receipt {
                job_id: job.job_id,
                request_hash: job.request.digest(),
                provider: self.inner.key.public(),
                requester: job.requester,
                units: job.units,
                schedule: self.inner.settings.schedule,
                cost: job.cost,
                image_hashes: image_hashes.clone(),
                queued_ms,
                run_ms,
                // A sum past u64 is refused by the ledger's chain check.
                cumulative_charged: link
                    .charged_so_far
                    .checked_add(job.cost)
                    .unwrap_or(pixmarket_protocol::MicroTokens::ZERO),
                prev_entry_hash: link.prev_entry_hash,
                issued_at_ms,
                step_caching: mode,
            })
    }

    fn is_acked(&self, job: JobId) -> bool {
        self.inner
            .ledger
            .receipt(Role::Provider, job)
            .ok()
            .flatten()
            .is_some_and(|r| r.ack.is_some())
    }

    async fn offer(
        &self,
        peer: PeerId,
        job: &QueuedJob,
        receipt: &Signed<Receipt>,
        acked: &Notify,
    ) -> Offer {
        let deadline = tokio::time::Instant::now() + self.inner.settings.ack_deadline;
        let event = JobEvent {
            job_id: job.job_id,
            kind: JobEventKind::Completed {
                receipt: receipt.clone(),
            },
        };
        let mut backoff = FIRST_OFFER_BACKOFF;
        loop {
            if self.crashed() || self.inner.net.is_stopped() {
                return Offer::Stopped;
            }
            if self.is_acked(job.job_id) {
                return Offer::Acked;
            }
            let answer = send_with_timeout(
                &self.inner.net,
                peer,
                Request::Event(event.clone()),
                OFFER_TIMEOUT,
            )
            .await;
            let wait = match answer {
                Some(Response::EventAck(Some(ack))) => {
                    if self.ack_matches(&ack, job, receipt) {
                        match self.store_ack_async(ack).await {
                            Ok(()) => return Offer::Acked,
                            Err(FailReason::Credited) => return Offer::Stopped,
                            Err(_) => backoff,
                        }
                    } else {
                        tracing::warn!(job = %job.job_id, "requester sent an ack that does not match the receipt");
                        backoff
                    }
                }
                Some(Response::ReceiptRefused(refusal)) => {
                    match refusal_matches(&refusal, job, receipt) {
                        Some(reason) => return Offer::Refused(reason),
                        None => backoff,
                    }
                }
                Some(Response::Refused(FailReason::Busy { retry_after_ms })) => {
                    Duration::from_millis(retry_after_ms).min(MAX_BUSY_WAIT)
                }
                _ => backoff,
            };
            backoff = (backoff * 2).min(MAX_OFFER_BACKOFF);
            let until = (tokio::time::Instant::now() + wait).min(deadline);
            tokio::select! {
                () = acked.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
            if tokio::time::Instant::now() >= deadline && !self.is_acked(job.job_id) {
                return Offer::Unanswered;
            }
        }
    }

    fn ack_matches(
        &self,
        ack: &Signed<ReceiptAck>,
        job: &QueuedJob,
        receipt: &Signed<Receipt>,
    ) -> bool {
        ack.signer() == job.requester
            && ack
                .verify()
                .is_ok_and(|a| a.job_id == job.job_id && a.receipt_hash == receipt.digest())
    }

    async fn store_ack_async(&self, ack: Signed<ReceiptAck>) -> Result<(), FailReason> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.store_ack(&ack))
            .await
            .unwrap_or(Err(FailReason::ShuttingDown))
    }

    /// Stores a requester's ack; the same ack arriving twice (on the offer's answer and with
    /// a `Fetch`) is not an error. Refused for a credited receipt.
    fn store_ack(&self, ack: &Signed<ReceiptAck>) -> Result<(), FailReason> {
        let body = ack.verify().map_err(|_| FailReason::BadSignature)?;
        match self.inner.ledger.attach_ack(body.job_id, ack) {
            Ok(()) | Err(LedgerError::AlreadyAcked { .. }) => Ok(()),
            Err(LedgerError::Refunded { .. }) => Err(FailReason::Credited),
            Err(LedgerError::NotSettled { .. }) => Err(FailReason::NotSettled),
            Err(LedgerError::WrongSigner { .. } | LedgerError::BadSignature { .. }) => {
                Err(FailReason::BadSignature)
            }
            Err(e @ LedgerError::Mismatch { .. }) => {
                Err(FailReason::Invalid(ValidationErrorWire {
                    field: "ack".into(),
                    got: e.to_string(),
                    allowed: "an acknowledgement of this job's receipt".into(),
                }))
            }
            Err(e) => Err(FailReason::Engine(format!("ledger: {e}"))),
        }
    }

    /// `Fetch`: stores the ack the request carries (it must be the asking requester's, for
    /// its receipt), then answers with the kept images.
    pub(super) fn fetch(&self, peer: PeerId, ack: &Signed<ReceiptAck>) -> Response {
        let Some(requester) = Self::requester_of(&peer) else {
            return refuse(FailReason::BadSignature);
        };
        if ack.signer() != requester {
            return refuse(FailReason::BadSignature);
        }
        let Ok(body) = ack.verify() else {
            return refuse(FailReason::BadSignature);
        };
        if let Err(reason) = self.store_ack(ack) {
            return refuse(reason);
        }
        match self
            .inner
            .deliveries
            .take_images(body.job_id, &requester, &body.receipt_hash)
        {
            Some(images) => Response::Images {
                job_id: body.job_id,
                images,
            },
            None => refuse(FailReason::ResultGone),
        }
    }

    /// `Chain`: the pair's entries after `after`, for the asking requester.
    pub(super) fn chain(&self, peer: PeerId, after: Option<Hash>) -> Response {
        let Some(requester) = Self::requester_of(&peer) else {
            return refuse(FailReason::BadSignature);
        };
        match self.inner.ledger.chain(Role::Provider, &requester, after) {
            Ok(entries) => Response::Chain(entries),
            Err(e) => refuse(FailReason::Invalid(ValidationErrorWire {
                field: "after".into(),
                got: e.to_string(),
                allowed: "an entry of this pair's chain, or none".into(),
            })),
        }
    }

    /// After a stop: lets the deliveries in flight finish until `deadline`, then voids the holds
    /// of results never settled and credits every receipt still waiting for its ack (its
    /// images go with this process).
    pub(super) async fn finish_deliveries(&self, deadline: tokio::time::Instant) {
        if self.crashed() {
            return;
        }
        self.inner.deliveries.drain(deadline).await;
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            // Results still waiting for their turn in a lane were never settled: their holds
            // are released, as the next start would.
            if let Ok(holds) = me.inner.ledger.holds() {
                for (job, _) in holds {
                    let _ = me
                        .inner
                        .ledger
                        .void(job, "the provider stopped before settling the job");
                }
            }
            let Ok(open) = me.inner.ledger.unacknowledged() else {
                return;
            };
            for job in open {
                let _ = me.inner.ledger.credit(
                    job,
                    &me.inner.key,
                    "the provider stopped before the receipt was acknowledged",
                    now_ms(),
                );
            }
        })
        .await;
    }
}

/// The reason of a requester's signed refusal of `receipt`, if it is one.
fn refusal_matches(
    refusal: &Signed<ReceiptRefusal>,
    job: &QueuedJob,
    receipt: &Signed<Receipt>,
) -> Option<String> {
    if refusal.signer() != job.requester {
        return None;
    }
    let body = refusal.verify().ok()?;
    (body.job_id == job.job_id && body.receipt_hash == receipt.digest()).then_some(body.reason)
}
