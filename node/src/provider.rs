//! The provider service: sells generation.
//!
//! Data flow:
//! - `Request::Quote` → verify, validate, meter → signed `Quote`.
//! - `Request::Job` → admission: signature, signer = connection peer, validation, addressee,
//!   mode, metering (`cost ≤ max_cost`), queue room (`Busy`), then the ledger hold of `max_cost`
//!   (duplicate job ids and insufficient credit refused there) → `Accepted { position, eta }`.
//! - worker thread: takes the oldest job plus compatible ones (same size, steps, mode) up to
//!   `max_batch`, runs the generator, streams `Progress`, then per job: sign the receipt, settle
//!   it durably, and only then send `Completed` with the images; the requester's ack comes back
//!   on that event's response and is stored. A failed or cancelled job's hold is voided.
//! - `Request::Cancel` from the job's requester → removed from the queue, or stopped at the next
//!   step when running.
//! - adverts: a signed `CapacityAdvert` every [`ADVERT_INTERVAL`] and when the queue changes
//!   (at most every [`MIN_ADVERT_GAP`]); every [`QUEUE_HEARTBEAT`], each waiting job's
//!   requester hears its position and estimated wait, so silence means trouble.
//!
//! Two ways to stop: [`Provider::stop`] (orderly: running and queued jobs are voided and their
//! requesters told) and [`Provider::crash`] (a process kill, emulated: the worker abandons its
//! batch at the next step and exits without touching the ledger or sending anything, the queue
//! is left as it is, and open holds stay open for the next [`Provider::start`] to void).

use std::collections::{BTreeSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use pixmarket_ledger::{Ledger, LedgerError};
use pixmarket_protocol::messages::{FailReason, JobEventKind, ValidationErrorWire};
use pixmarket_protocol::{
    CapacityAdvert, Hash, JobEvent, JobId, JobParams, JobRequest, MeteredUnits, MicroTokens, Mode,
    PriceSchedule, PublicKey, Quote, QuoteRequest, Receipt, ReceiptAck, SecretKey, Signed,
    metering, validate,
};
use tokio::sync::{Notify, mpsc};

use crate::generator::{GenError, Generator};
use crate::metrics::Metrics;
use crate::network::{Client, Request, Response};
use crate::now_ms;

/// How often a provider re-publishes its advert (receivers expire them after 30 s).
pub const ADVERT_INTERVAL: Duration = Duration::from_secs(3);
/// How often a queued job's requester hears where its job stands.
pub const QUEUE_HEARTBEAT: Duration = Duration::from_secs(2);
/// The least time between two adverts of one provider.
pub const MIN_ADVERT_GAP: Duration = Duration::from_millis(500);
/// Progress events of one batch are sent at most this often (plus the first and last step).
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);
/// Progress events waiting to be sent; when full, progress is dropped (the next step's follows).
const PROGRESS_QUEUE: usize = 256;
/// Delivering a completed job is retried this many times before the result is given up on.
const DELIVERY_ATTEMPTS: u32 = 3;
/// Quotes are good for this long.
const QUOTE_VALIDITY_MS: u64 = 60_000;
/// How often [`Provider::crash`] looks whether the worker thread has exited: a step of the
/// model takes longer, so finer polling would not return sooner.
const CRASH_POLL: Duration = Duration::from_millis(10);

/// A part of the provider did not stop by the deadline [`Provider::crash`] was given; it may
/// still hold the ledger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the provider's {0} did not stop in time")]
pub struct StillRunning(pub &'static str);

/// A provider's market settings, already validated.
#[derive(Clone, Debug)]
pub struct ProviderSettings {
    pub schedule: PriceSchedule,
    pub max_queue: u32,
    pub max_batch: u32,
    /// Starting estimate of one standard image (1024², 50 steps), refined by measurement.
    pub ms_per_standard_image: u64,
    /// How often the advert is re-published when nothing changes ([`ADVERT_INTERVAL`] by
    /// default; at most a third of the advert lifetime, so two adverts can be lost). A large
    /// market on one machine publishes less often to keep gossip affordable.
    pub advert_interval: Duration,
}

struct QueuedJob {
    job_id: JobId,
    peer: PeerId,
    requester: PublicKey,
    request: Signed<JobRequest>,
    params: JobParams,
    units: MeteredUnits,
    cost: MicroTokens,
    queued_at: Instant,
}

impl QueuedJob {
    fn compatible(&self, other: &QueuedJob) -> bool {
        let (a, b) = (&self.params, &other.params);
        a.width == b.width
            && a.height == b.height
            && a.steps == b.steps
            && a.mode.name() == b.mode.name()
            && a.mode.strength_permille() == b.mode.strength_permille()
    }
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<QueuedJob>,
    running: BTreeSet<JobId>,
    cancelled: BTreeSet<JobId>,
    stopping: bool,
}

/// Shared state of the provider; cheap to clone.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

struct Inner {
    key: Arc<SecretKey>,
    ledger: Arc<Ledger>,
    net: Client,
    generator: Arc<dyn Generator>,
    settings: ProviderSettings,
    queue: Mutex<Queue>,
    work: Condvar,
    changed: Notify,
    ms_per_standard: AtomicU64,
    seq: AtomicU64,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    /// Set by [`Provider::crash`]: from then on nothing touches the ledger or the network.
    crashed: AtomicBool,
    threads: Mutex<Threads>,
}

/// The provider's own thread and task, kept so a crash can wait for them to let go of the
/// ledger. (They hold an `Arc<Inner>`, not this struct's owner: no cycle once they exit.)
#[derive(Default)]
struct Threads {
    worker: Option<std::thread::JoinHandle<()>>,
    adverts: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("peer", &self.inner.key.public().fmt_short())
            .finish()
    }
}

fn refuse(reason: FailReason) -> Response {
    Response::Refused(reason)
}

/// Relative work of a job against a standard image, in parts per million.
fn work_ppm(p: &JobParams) -> u64 {
    let px = u64::from(p.width) * u64::from(p.height);
    let steps = u64::from(pixmarket_protocol::effective_steps(
        p.steps,
        p.mode.strength_permille(),
    ));
    let cfg = if p.true_cfg_scale > 1.0 { 2 } else { 1 };
    px * steps * u64::from(p.images) * cfg * 1_000_000 / (1024 * 1024 * 50)
}

impl Provider {
    /// Starts the worker thread and the advert task. Call from within a tokio runtime.
    pub fn start(
        key: Arc<SecretKey>,
        ledger: Arc<Ledger>,
        net: Client,
        generator: Arc<dyn Generator>,
        settings: ProviderSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LedgerError> {
        // No job survives a restart: every hold left from before is released now.
        let open: Vec<JobId> = ledger.holds()?.into_iter().map(|(j, _)| j).collect();
        for job in open {
            match ledger.void(job, "provider restarted") {
                Ok(())
                | Err(LedgerError::AlreadyFinished { .. } | LedgerError::UnknownHold { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let inner = Arc::new(Inner {
            key,
            ledger,
            net,
            generator,
            ms_per_standard: AtomicU64::new(settings.ms_per_standard_image.max(1)),
            settings,
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            changed: Notify::new(),
            seq: AtomicU64::new(now_ms()),
            metrics,
            runtime: tokio::runtime::Handle::current(),
            crashed: AtomicBool::new(false),
            threads: Mutex::new(Threads::default()),
        });
        let provider = Self { inner };
        let worker = provider.clone();
        let worker = std::thread::Builder::new()
            .name("pixmarket-worker".into())
            .spawn(move || worker.worker_loop())
            .map_err(|e| LedgerError::Store(pixmarket_ledger::StoreError::Engine(e.to_string())))?;
        let adverts = provider.clone();
        // One task for the adverts and the queue's heartbeats, so a crash aborts both at once.
        let adverts = tokio::spawn(async move {
            tokio::join!(adverts.advert_loop(), adverts.queue_heartbeat_loop());
        });
        if let Ok(mut t) = provider.inner.threads.lock() {
            t.worker = Some(worker);
            t.adverts = Some(adverts);
        }
        Ok(provider)
    }

    fn crashed(&self) -> bool {
        self.inner.crashed.load(Ordering::SeqCst)
    }

    /// Emulates a kill: the advert task is aborted, the worker abandons its batch at the next
    /// step and exits without settling, voiding or telling anyone, queued jobs stay where they
    /// are, and inbound requests are refused without touching the ledger. Returns once the
    /// worker thread and the advert task have exited, or `StillRunning` at `deadline` (a
    /// generator step longer than the time left). Holds left open are voided by the next
    /// [`Provider::start`] on the same ledger.
    pub async fn crash(&self, deadline: tokio::time::Instant) -> Result<(), StillRunning> {
        self.inner.crashed.store(true, Ordering::SeqCst);
        if let Ok(mut q) = self.inner.queue.lock() {
            q.stopping = true;
        }
        self.inner.work.notify_all();
        let (worker, adverts) = match self.inner.threads.lock() {
            Ok(mut t) => (t.worker.take(), t.adverts.take()),
            Err(_) => (None, None),
        };
        if let Some(adverts) = adverts {
            adverts.abort();
            if tokio::time::timeout_at(deadline, adverts).await.is_err() {
                return Err(StillRunning("advert task"));
            }
        }
        if let Some(worker) = worker {
            wait_for(worker, deadline).await?;
        }
        Ok(())
    }

    /// After [`Provider::stop`]: waits until the worker has voided the holds it still had and
    /// exited, or returns `StillRunning` at `deadline`.
    pub async fn wait_stopped(&self, deadline: tokio::time::Instant) -> Result<(), StillRunning> {
        let worker = match self.inner.threads.lock() {
            Ok(mut t) => t.worker.take(),
            Err(_) => None,
        };
        match worker {
            Some(w) => wait_for(w, deadline).await,
            None => Ok(()),
        }
    }

    /// Stops taking jobs, and stops the batch that runs at its next step: the node stops its
    /// network right after this, so a job finished now would be settled (charged in our books)
    /// but never delivered or acknowledged. Those jobs' holds are voided instead; the worker
    /// then exits.
    pub fn stop(&self) {
        if let Ok(mut q) = self.inner.queue.lock() {
            q.stopping = true;
            let Queue {
                running, cancelled, ..
            } = &mut *q;
            cancelled.extend(running.iter().copied());
        }
        self.inner.work.notify_all();
        self.inner.changed.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the lock would be a bug in this module; the queue stays usable.
        self.inner
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn queue_eta_ms(&self, q: &Queue) -> u64 {
        let per = self.inner.ms_per_standard.load(Ordering::Relaxed);
        q.waiting
            .iter()
            .map(|j| work_ppm(&j.params) * per / 1_000_000)
            .sum::<u64>()
            + u64::try_from(q.running.len()).unwrap_or(0) * per
    }

    /// Handles one inbound request addressed to the provider side.
    pub fn handle(&self, peer: PeerId, request: Request) -> Response {
        if self.crashed() {
            return refuse(FailReason::ShuttingDown);
        }
        match request {
            Request::Quote(q) => self.quote(&q),
            Request::Job(j) => {
                let r = self.admit(peer, j);
                let outcome = match &r {
                    Response::Accepted { .. } => "accepted",
                    _ => "refused",
                };
                self.inner.metrics.job(outcome);
                r
            }
            Request::Cancel(job) => self.cancel(peer, job),
            Request::Ack(ack) => match self.store_ack(&ack) {
                Ok(()) => Response::Ok,
                Err(reason) => refuse(reason),
            },
            Request::Event(_) => refuse(FailReason::Unsupported("job events to a provider".into())),
        }
    }

    fn meter(
        &self,
        prompt: &str,
        units_of: impl FnOnce(u32) -> MeteredUnits,
    ) -> Result<(MeteredUnits, MicroTokens), FailReason> {
        let tokens = self
            .inner
            .generator
            .count_prompt_tokens(prompt)
            .map_err(|e| FailReason::Engine(e.to_string()))?;
        let units = units_of(tokens);
        let cost = metering::cost(&units, &self.inner.settings.schedule).map_err(|e| {
            FailReason::Invalid(ValidationErrorWire {
                field: "units".into(),
                got: e.to_string(),
                allowed: "the metering range".into(),
            })
        })?;
        Ok((units, cost))
    }

    fn quote(&self, signed: &Signed<QuoteRequest>) -> Response {
        let Ok(q) = signed.verify() else {
            return refuse(FailReason::BadSignature);
        };
        if q.provider != self.inner.key.public() {
            return refuse(FailReason::WrongProvider);
        }
        if let Err(e) = q.validate() {
            return refuse(FailReason::Invalid(e.into()));
        }
        let (units, cost) = match self.meter(&q.prompt, |prompt_tokens| MeteredUnits {
            width: q.width,
            height: q.height,
            steps: pixmarket_protocol::effective_steps(q.steps, q.strength_permille),
            prompt_tokens,
            images: q.images,
        }) {
            Ok(x) => x,
            Err(r) => return refuse(r),
        };
        let (position, eta_ms) = {
            let q = self.lock();
            (
                u32::try_from(q.waiting.len()).unwrap_or(u32::MAX),
                self.queue_eta_ms(&q),
            )
        };
        let quote = Quote {
            quote_id: q.quote_id,
            requester: signed.signer(),
            units,
            schedule: self.inner.settings.schedule,
            cost,
            queue_position: position,
            eta_ms,
            valid_until_ms: now_ms() + QUOTE_VALIDITY_MS,
        };
        match Signed::sign(&self.inner.key, &quote) {
            Ok(s) => Response::Quote(s),
            Err(e) => refuse(FailReason::Engine(e.to_string())),
        }
    }

    fn admit(&self, peer: PeerId, signed: Signed<JobRequest>) -> Response {
        let Ok(req) = signed.verify() else {
            tracing::warn!(%peer, "refused job: bad signature");
            return refuse(FailReason::BadSignature);
        };
        // Events go back to the connection's peer, so it must be the signer.
        if signed.signer().to_peer_id() != peer {
            tracing::warn!(%peer, "refused job: relayed request (signer is not the sender)");
            return refuse(FailReason::BadSignature);
        }
        let now = now_ms();
        if let Err(e) = req.validate(now) {
            tracing::warn!(%peer, error = %e, "refused job: invalid");
            return refuse(if e.field == "expires_at" {
                FailReason::Expired
            } else {
                FailReason::Invalid(e.into())
            });
        }
        if req.provider != self.inner.key.public() {
            tracing::warn!(%peer, to = %req.provider.fmt_short(), "refused job: addressed to another provider");
            return refuse(FailReason::WrongProvider);
        }
        if !mode_supported(&req.params.mode, &self.inner.generator.info()) {
            tracing::warn!(%peer, mode = req.params.mode.name(), "refused job: mode not supported");
            return refuse(FailReason::Unsupported(req.params.mode.name().to_owned()));
        }
        let (units, cost) = match self.meter(&req.params.prompt, |t| req.params.metered_units(t)) {
            Ok(x) => x,
            Err(r) => return refuse(r),
        };
        if cost > req.max_cost {
            tracing::warn!(%peer, %cost, max_cost = %req.max_cost, "refused job: over its max_cost");
            return refuse(FailReason::OverBudget {
                cost,
                max_cost: req.max_cost,
            });
        }
        let mut q = self.lock();
        if q.stopping {
            return refuse(FailReason::ShuttingDown);
        }
        if q.waiting.len() >= self.inner.settings.max_queue as usize {
            let retry_after_ms = self.queue_eta_ms(&q).max(1000);
            return refuse(FailReason::Busy { retry_after_ms });
        }
        // The hold is durable before the job can run; the ledger refuses duplicates ever seen.
        if let Err(e) = self.inner.ledger.hold_request(&signed, now) {
            tracing::warn!(%peer, error = %e, "refused job at the ledger");
            return refuse(match e {
                LedgerError::InsufficientCredit {
                    needed, available, ..
                } => FailReason::InsufficientCredit { needed, available },
                LedgerError::DuplicateJob { .. } => FailReason::Duplicate,
                LedgerError::Expired { .. } => FailReason::Expired,
                other => FailReason::Engine(format!("ledger: {other}")),
            });
        }
        let position = u32::try_from(q.waiting.len()).unwrap_or(u32::MAX);
        let eta_ms = self.queue_eta_ms(&q)
            + work_ppm(&req.params) * self.inner.ms_per_standard.load(Ordering::Relaxed)
                / 1_000_000;
        q.waiting.push_back(QueuedJob {
            job_id: req.job_id,
            peer,
            requester: signed.signer(),
            request: signed.clone(),
            params: req.params,
            units,
            cost,
            queued_at: Instant::now(),
        });
        self.inner.metrics.set_queue(q.waiting.len());
        drop(q);
        self.inner.work.notify_one();
        self.inner.changed.notify_one();
        Response::Accepted {
            queue_position: position,
            eta_ms,
        }
    }

    fn cancel(&self, peer: PeerId, job: JobId) -> Response {
        let mut q = self.lock();
        if let Some(i) = q
            .waiting
            .iter()
            .position(|j| j.job_id == job && j.peer == peer)
        {
            let Some(j) = q.waiting.remove(i) else {
                return Response::Ok;
            };
            drop(q);
            self.finish_failed(&j, None);
            return Response::Ok;
        }
        if q.running.contains(&job) {
            q.cancelled.insert(job);
        }
        Response::Ok
    }

    /// Stores a requester's ack; the same ack arriving twice (on the event's response and as
    /// an explicit `Ack`) is not an error.
    fn store_ack(&self, ack: &Signed<ReceiptAck>) -> Result<(), FailReason> {
        let body = ack.verify().map_err(|_| FailReason::BadSignature)?;
        match self.inner.ledger.attach_ack(body.job_id, ack) {
            Ok(()) | Err(LedgerError::AlreadyAcked { .. }) => Ok(()),
            Err(e) => Err(FailReason::Engine(format!("ledger: {e}"))),
        }
    }

    fn send_event(
        &self,
        peer: PeerId,
        event: JobEvent,
    ) -> Result<Response, crate::network::NetError> {
        let net = self.inner.net.clone();
        self.inner
            .runtime
            .block_on(async move { net.request(peer, Request::Event(event)).await })
    }

    /// Voids the hold and tells the requester: `reason` None means cancelled.
    fn finish_failed(&self, job: &QueuedJob, reason: Option<FailReason>) {
        if self.crashed() {
            return;
        }
        let why = reason
            .as_ref()
            .map_or_else(|| "cancelled".to_owned(), ToString::to_string);
        if let Err(e) = self.inner.ledger.void(job.job_id, &why) {
            tracing::error!(job = %job.job_id, error = %e, "cannot void hold");
        }
        self.inner.metrics.job(if reason.is_some() {
            "failed"
        } else {
            "cancelled"
        });
        let kind = match reason {
            Some(reason) => JobEventKind::Failed { reason },
            None => JobEventKind::Cancelled,
        };
        let net = self.inner.net.clone();
        let (peer, event) = (
            job.peer,
            JobEvent {
                job_id: job.job_id,
                kind,
            },
        );
        self.inner.runtime.spawn(async move {
            let _ = net.request(peer, Request::Event(event)).await;
        });
    }

    fn worker_loop(&self) {
        let (progress_tx, mut progress_rx) = mpsc::channel::<(PeerId, JobEvent)>(PROGRESS_QUEUE);
        let net = self.inner.net.clone();
        let me = self.clone();
        self.inner.runtime.spawn(async move {
            while let Some((peer, event)) = progress_rx.recv().await {
                // Progress of a job that has ended since is stale: its requester has its
                // result (or gave up), and would only refuse it.
                if !me.lock().running.contains(&event.job_id) {
                    continue;
                }
                let _ = net.request(peer, Request::Event(event)).await;
            }
        });
        loop {
            let batch = {
                let mut q = self.lock();
                while q.waiting.is_empty() && !q.stopping {
                    q = self
                        .inner
                        .work
                        .wait(q)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if q.stopping {
                    break;
                }
                let mut batch = Vec::new();
                if let Some(first) = q.waiting.pop_front() {
                    let mut i = 0;
                    while i < q.waiting.len()
                        && batch.len() + 1 < self.inner.settings.max_batch as usize
                    {
                        if first.compatible(&q.waiting[i]) {
                            if let Some(j) = q.waiting.remove(i) {
                                batch.push(j);
                            }
                        } else {
                            i += 1;
                        }
                    }
                    batch.insert(0, first);
                }
                for j in &batch {
                    q.running.insert(j.job_id);
                }
                self.inner.metrics.set_queue(q.waiting.len());
                batch
            };
            self.inner.changed.notify_one();
            self.run_batch(batch, &progress_tx);
        }
        if self.crashed() {
            // A killed process releases nothing: the next start voids the open holds.
            return;
        }
        // Jobs still queued at shutdown will not run: release their holds.
        let left: Vec<QueuedJob> = self.lock().waiting.drain(..).collect();
        for j in &left {
            self.finish_failed(j, Some(FailReason::ShuttingDown));
        }
    }

    fn run_batch(&self, batch: Vec<QueuedJob>, progress_tx: &mpsc::Sender<(PeerId, JobEvent)>) {
        let started = Instant::now();
        let params: Vec<JobParams> = batch.iter().map(|j| j.params.clone()).collect();
        let ids: Vec<JobId> = batch.iter().map(|j| j.job_id).collect();
        let mut last_step = Instant::now();
        let mut last_sent = Instant::now();
        let mut progress = |step: u32, of: u32| {
            if self.crashed() {
                return ControlFlow::Break(());
            }
            self.inner.metrics.step(last_step.elapsed());
            last_step = Instant::now();
            let q = self.lock();
            let all_cancelled = ids.iter().all(|id| q.cancelled.contains(id));
            drop(q);
            // The first step (the job has started), the last, and in between at most one per
            // PROGRESS_MIN_GAP: fast steps would otherwise cost a message each.
            let due = step <= 1 || step >= of || last_sent.elapsed() >= PROGRESS_MIN_GAP;
            if !due {
                return if all_cancelled {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                };
            }
            last_sent = Instant::now();
            for j in &batch {
                let ev = JobEvent {
                    job_id: j.job_id,
                    kind: JobEventKind::Progress { step, of },
                };
                let _ = progress_tx.try_send((j.peer, ev));
            }
            if all_cancelled {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let result = self.inner.generator.generate(&params, &mut progress);
        if self.crashed() {
            // The batch is abandoned as a killed process would abandon it.
            return;
        }
        let elapsed = started.elapsed();
        self.inner.metrics.busy(elapsed);
        let cancelled: BTreeSet<JobId> = {
            let mut q = self.lock();
            for id in &ids {
                q.running.remove(id);
            }
            ids.iter()
                .filter(|id| q.cancelled.remove(id))
                .copied()
                .collect()
        };
        match result {
            Ok(images) => {
                let total_work: u64 = params.iter().map(work_ppm).sum::<u64>().max(1);
                let measured =
                    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX) * 1_000_000 / total_work;
                // Moving average, so one odd batch does not swing the advertised speed.
                let old = self.inner.ms_per_standard.load(Ordering::Relaxed);
                self.inner
                    .ms_per_standard
                    .store((old * 3 + measured.max(1)) / 4, Ordering::Relaxed);
                let run_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
                for (job, pngs) in batch.iter().zip(images) {
                    if cancelled.contains(&job.job_id) {
                        self.finish_failed(job, None);
                    } else {
                        self.settle_and_deliver(job, pngs, run_ms);
                    }
                }
            }
            Err(GenError::Cancelled) => {
                for job in &batch {
                    self.finish_failed(job, None);
                }
            }
            Err(GenError::Failed(msg)) => {
                tracing::error!(error = %msg, "generation failed");
                for job in &batch {
                    self.finish_failed(job, Some(FailReason::Engine(msg.clone())));
                }
            }
        }
        self.inner.changed.notify_one();
    }

    /// Signs the receipt, settles it durably, then sends the images with it.
    fn settle_and_deliver(&self, job: &QueuedJob, pngs: Vec<Vec<u8>>, run_ms: u64) {
        if self.crashed() {
            return;
        }
        let receipt = match self.make_receipt(job, &pngs, run_ms) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(job = %job.job_id, error = %e, "cannot settle");
                self.finish_failed(
                    job,
                    Some(FailReason::Engine(format!("settlement failed: {e}"))),
                );
                return;
            }
        };
        self.inner.metrics.job("completed");
        self.inner.metrics.earned(job.cost);
        let event = JobEvent {
            job_id: job.job_id,
            kind: JobEventKind::Completed {
                images: pngs,
                receipt: receipt.clone(),
            },
        };
        for attempt in 1..=DELIVERY_ATTEMPTS {
            if self.crashed() {
                return;
            }
            match self.send_event(job.peer, event.clone()) {
                Ok(Response::EventAck(Some(ack))) => {
                    let ok = ack.signer() == job.requester
                        && ack.verify().is_ok_and(|a| {
                            a.job_id == job.job_id && a.receipt_hash == receipt.digest()
                        });
                    if ok {
                        if let Err(reason) = self.store_ack(&ack) {
                            tracing::error!(job = %job.job_id, %reason, "cannot store ack");
                        }
                    } else {
                        tracing::warn!(job = %job.job_id, "requester sent an ack that does not match the receipt");
                    }
                    return;
                }
                Ok(other) => {
                    tracing::warn!(job = %job.job_id, response = ?other, "requester did not acknowledge the receipt");
                    self.refund(job, "the requester refused the delivery");
                    return;
                }
                Err(e) => {
                    // The requester may have acknowledged by an explicit `Ack` and gone away
                    // before our request's response arrived: then the job is delivered.
                    let acked = self
                        .inner
                        .ledger
                        .receipt(pixmarket_ledger::Role::Provider, job.job_id)
                        .ok()
                        .flatten()
                        .is_some_and(|r| r.ack.is_some());
                    if acked {
                        return;
                    }
                    tracing::warn!(job = %job.job_id, attempt, error = %e, "delivery failed");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                }
            }
        }
        self.refund(job, "the result could not be delivered");
    }

    /// Takes back the charge of a settled job whose result the requester never accepted: only
    /// an acknowledged receipt is paid. An ack that arrived meanwhile wins (the ledger refuses
    /// to refund an acknowledged receipt).
    fn refund(&self, job: &QueuedJob, why: &str) {
        match self.inner.ledger.refund_undelivered(job.job_id, why) {
            Ok(()) => {
                tracing::warn!(job = %job.job_id, reason = why, "charge refunded: result not delivered");
                self.inner.metrics.job("refunded");
            }
            Err(LedgerError::AlreadyAcked { .. }) => {}
            Err(e) => {
                tracing::error!(job = %job.job_id, error = %e, "cannot refund an undelivered result")
            }
        }
    }

    fn make_receipt(
        &self,
        job: &QueuedJob,
        pngs: &[Vec<u8>],
        run_ms: u64,
    ) -> Result<Signed<Receipt>, String> {
        let link = self
            .inner
            .ledger
            .receipt_link(&job.requester)
            .map_err(|e| e.to_string())?;
        let receipt = Receipt {
            job_id: job.job_id,
            request_hash: job.request.digest(),
            provider: self.inner.key.public(),
            requester: job.requester,
            units: job.units,
            schedule: self.inner.settings.schedule,
            cost: job.cost,
            image_hashes: pngs.iter().map(|p| Hash::of(p)).collect(),
            queued_ms: u64::try_from(job.queued_at.elapsed().as_millis())
                .unwrap_or(u64::MAX)
                .saturating_sub(run_ms),
            run_ms,
            cumulative_charged: link
                .charged_so_far
                .checked_add(job.cost)
                .ok_or("cumulative total overflows")?,
            prev_receipt_hash: link.prev_receipt_hash,
            issued_at_ms: now_ms(),
        };
        let signed = Signed::sign(&self.inner.key, &receipt).map_err(|e| e.to_string())?;
        self.inner
            .ledger
            .settle(job.job_id, &signed)
            .map_err(|e| e.to_string())?;
        Ok(signed)
    }

    fn advert(&self) -> CapacityAdvert {
        let info = self.inner.generator.info();
        let depth = {
            let q = self.lock();
            q.waiting.len() + q.running.len()
        };
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        CapacityAdvert {
            seq,
            issued_at_ms: now_ms(),
            listen_addrs: Vec::new(),
            gpu_name: info
                .device_name
                .chars()
                .take(validate::MAX_LABEL_CHARS)
                .collect(),
            gpu_memory_mib: info.device_memory_mib,
            model_id: info.model_id,
            precision: info.precision,
            supports_image_to_image: info.supports_image_to_image,
            supports_inpaint: info.supports_inpaint,
            max_width: validate::MAX_DIMENSION,
            max_height: validate::MAX_DIMENSION,
            max_steps: validate::MAX_STEPS,
            max_images: validate::MAX_IMAGES,
            schedule: self.inner.settings.schedule,
            queue_depth: u32::try_from(depth).unwrap_or(u32::MAX),
            max_queue: self.inner.settings.max_queue,
            ms_per_standard_image: self.inner.ms_per_standard.load(Ordering::Relaxed),
        }
    }

    /// Tells every waiting job's requester, every [`QUEUE_HEARTBEAT`], where its job stands
    /// (`Accepted { position, eta }`): a queued job would otherwise hear nothing until it
    /// starts, and its requester could not tell a long queue from a provider gone silent.
    async fn queue_heartbeat_loop(&self) {
        loop {
            tokio::time::sleep(QUEUE_HEARTBEAT).await;
            if self.crashed() || self.lock().stopping {
                return;
            }
            let events: Vec<(PeerId, JobEvent)> = {
                let q = self.lock();
                let per = self.inner.ms_per_standard.load(Ordering::Relaxed);
                let mut eta = u64::try_from(q.running.len()).unwrap_or(0) * per;
                q.waiting
                    .iter()
                    .enumerate()
                    .map(|(i, j)| {
                        eta += work_ppm(&j.params) * per / 1_000_000;
                        let kind = JobEventKind::Accepted {
                            queue_position: u32::try_from(i).unwrap_or(u32::MAX),
                            eta_ms: eta,
                        };
                        (
                            j.peer,
                            JobEvent {
                                job_id: j.job_id,
                                kind,
                            },
                        )
                    })
                    .collect()
            };
            // At most `max_queue` at once, and each waits at most the request timeout.
            let mut sends = tokio::task::JoinSet::new();
            for (peer, event) in events {
                let net = self.inner.net.clone();
                sends.spawn(async move {
                    let _ = net.request(peer, Request::Event(event)).await;
                });
            }
            while sends.join_next().await.is_some() {}
        }
    }

    async fn advert_loop(&self) {
        loop {
            if self.lock().stopping {
                return;
            }
            match Signed::sign(&self.inner.key, &self.advert()) {
                Ok(signed) => {
                    if let Err(e) = self.inner.net.publish(signed).await {
                        if matches!(e, crate::network::NetError::NodeStopped) {
                            return;
                        }
                        tracing::debug!(error = %e, "advert not published");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot sign advert"),
            }
            // On a change the advert goes out again at once, but never more than once per
            // MIN_ADVERT_GAP: a busy queue changes many times a second, and every advert is
            // gossiped to the whole market.
            let interval = self.inner.settings.advert_interval.clamp(
                MIN_ADVERT_GAP,
                Duration::from_millis(validate::ADVERT_TTL_MS / 3),
            );
            tokio::time::sleep(MIN_ADVERT_GAP).await;
            let _ = tokio::time::timeout(
                interval.saturating_sub(MIN_ADVERT_GAP),
                self.inner.changed.notified(),
            )
            .await;
        }
    }
}

/// Polls until `worker` has exited (a std thread can't be awaited), then joins it.
async fn wait_for(
    worker: std::thread::JoinHandle<()>,
    deadline: tokio::time::Instant,
) -> Result<(), StillRunning> {
    while !worker.is_finished() {
        if tokio::time::Instant::now() >= deadline {
            return Err(StillRunning("worker thread"));
        }
        tokio::time::sleep(CRASH_POLL).await;
    }
    // Finished: joining does not block. A panic in it is already over and logged.
    let _ = worker.join();
    Ok(())
}

/// Whether this provider's generator can run `mode` (as its advert says).
fn mode_supported(mode: &Mode, info: &crate::generator::GeneratorInfo) -> bool {
    match mode {
        Mode::TextToImage => true,
        Mode::ImageToImage { .. } => info.supports_image_to_image,
        Mode::Inpaint { .. } => info.supports_inpaint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::GeneratorInfo;

    #[test]
    fn only_advertised_modes_are_admitted() {
        let info = GeneratorInfo {
            model_id: "m".into(),
            precision: "f32".into(),
            device_name: "cpu".into(),
            device_memory_mib: 0,
            supports_image_to_image: true,
            supports_inpaint: false,
        };
        let i2i = Mode::ImageToImage {
            init_image: vec![1],
            strength_permille: 500,
        };
        let inpaint = Mode::Inpaint {
            init_image: vec![1],
            mask: vec![1],
            strength_permille: 500,
        };
        assert!(mode_supported(&Mode::TextToImage, &info));
        assert!(mode_supported(&i2i, &info));
        assert!(!mode_supported(&inpaint, &info));
    }
}
