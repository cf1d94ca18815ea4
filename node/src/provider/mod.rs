//! The provider service: sells generation.
//!
//! Data flow:
//! - `Request::Quote` → verify, validate, meter → signed `Quote` ([`admission`]).
//! - `Request::Job` → admission: signature, signer = connection peer, validation, addressee,
//!   mode, metering (`cost ≤ max_cost`), queue room (`Busy`), then the ledger hold of `max_cost`
//!   (a repeated submission of a known job answers with its status) → `Accepted`.
//! - worker threads ([`worker`]), one per device ([`devices`]), each with its own engine: a
//!   free worker takes the oldest job plus compatible ones up to `max_batch`, runs its
//!   generator, hands progress to bounded async sends, and hands each result to the delivery.
//!   It never waits on the network. A worker whose engine fails voids its batch's holds,
//!   marks its device down and exits; the others keep serving, and the advert shrinks. When
//!   the last device is down the waiting jobs are voided and new ones refused.
//! - delivery ([`delivery`]), one async lane per requester: settle the receipt (its chain link
//!   is built inside the settle transaction), offer it in `Completed` (receipt and hashes, no
//!   images) until the requester answers with its signed ack or a signed refusal, or the ack
//!   deadline passes; a refused or unacknowledged receipt is taken back with a credit note.
//!   The images are released only to a `Fetch` carrying the signed ack, and kept for
//!   re-delivery for [`RESULT_RETENTION`].
//! - `Request::Status` → where the job stands, from the queue and the ledger; `Request::Chain`
//!   → the pair's chain entries; `Request::Cancel` from the job's own requester → removed from
//!   the queue, or stopped at the next step.
//! - adverts and sweeps ([`adverts`]): a signed `CapacityAdvert` every
//!   [`ProviderSettings::advert_interval`] and on change; every [`QUEUE_HEARTBEAT`] each waiting
//!   job's requester hears where it stands; every [`HOLD_SWEEP`] expired holds are voided.
//!
//! Two ways to stop: [`Provider::stop`] (orderly: running and queued jobs are voided and their
//! requesters told, deliveries in flight get a grace, then unacknowledged receipts are
//! credited) and [`Provider::crash`] (a process kill, emulated: nothing more touches the
//! ledger or the network; the next [`Provider::start`] voids the open holds and credits the
//! unacknowledged receipts, whose images died with the process).

mod admission;
mod adverts;
mod delivery;
mod devices;
mod progress;
mod queue;
mod status;
mod worker;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use pixmarket_ledger::{Ledger, LedgerError};
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{JobEvent, JobId, JobVoid, PriceSchedule, PublicKey, SecretKey, Signed};
use tokio::sync::Notify;

use crate::generator::Generator;
use crate::metrics::Metrics;
use crate::network::{Client, Request, Response};
use crate::now_ms;

pub use delivery::{ACK_DEADLINE, MAX_RETAINED_BYTES, RESULT_RETENTION};
pub use status::{QueueStatus, RunningJob, WaitingJob};

/// How often a provider re-publishes its advert (receivers expire them after 30 s).
pub const ADVERT_INTERVAL: Duration = Duration::from_secs(3);
/// How often a queued job's requester hears where its job stands.
pub const QUEUE_HEARTBEAT: Duration = Duration::from_secs(2);
/// The least time between two adverts of one provider.
pub const MIN_ADVERT_GAP: Duration = Duration::from_millis(500);
/// How often holds past their request's expiry are voided while the node runs (the ledger
/// refuses to settle them anyway; the sweep frees the credit and tells the requester).
pub const HOLD_SWEEP: Duration = Duration::from_secs(5);
/// Signed voids remembered for `Status` answers; older ones are re-signed from the ledger.
const MAX_RECENT_VOIDS: usize = 4096;
/// How often [`Provider::crash`] looks whether a worker thread has exited: a step of the
/// model takes longer, so finer polling would not return sooner.
const CRASH_POLL: Duration = Duration::from_millis(10);

/// A part of the provider did not stop by the deadline [`Provider::crash`] was given; it may
/// still hold the ledger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the provider's {0} did not stop in time")]
pub struct StillRunning(pub &'static str);

/// Why a provider did not start.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("ledger")]
    Ledger(#[from] LedgerError),
    #[error("a provider needs at least one device, and at most {}", MAX_DEVICES)]
    Devices,
    #[error("cannot start the worker thread of device {device}")]
    Thread {
        device: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Devices (engines and workers) one node drives: as many as one advert can list.
pub const MAX_DEVICES: usize = pixmarket_protocol::validate::MAX_ADVERT_DEVICES;

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
    /// How long a settled receipt waits for its acknowledgement before it is credited back
    /// ([`ACK_DEADLINE`] by default). Requesters ask for a silent job's status well within it.
    pub ack_deadline: Duration,
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
    devices: devices::Devices,
    settings: ProviderSettings,
    queue: Mutex<queue::Queue>,
    work: Condvar,
    changed: Notify,
    seq: AtomicU64,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    /// Set by [`Provider::crash`]: from then on nothing touches the ledger or the network.
    crashed: AtomicBool,
    threads: Mutex<Threads>,
    deliveries: delivery::Deliveries,
    /// Progress sends in flight, all workers together ([`worker::MAX_PROGRESS_IN_FLIGHT`]).
    progress_slots: Arc<tokio::sync::Semaphore>,
    /// The signed voids of recently ended jobs, oldest first, for `Status` answers.
    voids: Mutex<VecDeque<(JobId, Signed<JobVoid>)>>,
    /// The signed voids on their way to requesters (see `worker::finish_failed`): a stop
    /// waits for them, since the network closes right after and would drop them unsent.
    notices: Mutex<tokio::task::JoinSet<()>>,
}

/// The provider's own threads and task, kept so a crash can wait for them to let go of the
/// ledger. (They hold an `Arc<Inner>`, not this struct's owner: no cycle once they exit.)
#[derive(Default)]
struct Threads {
    workers: Vec<std::thread::JoinHandle<()>>,
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

impl Provider {
    /// Voids the holds and credits the unacknowledged receipts left by a previous run, then
    /// starts one worker thread per generator (one per device, each with its own copy of the
    /// weights) and the advert task. Call from within a tokio runtime.
    pub fn start(
        key: Arc<SecretKey>,
        ledger: Arc<Ledger>,
        net: Client,
        generators: Vec<Arc<dyn Generator>>,
        settings: ProviderSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ProviderError> {
        if generators.is_empty() || generators.len() > MAX_DEVICES {
            return Err(ProviderError::Devices);
        }
        // No job survives a restart: every hold left from before is released now, and every
        // receipt that was still waiting for its ack is credited (its images are gone).
        let open: Vec<JobId> = ledger.holds()?.into_iter().map(|(j, _)| j).collect();
        for job in open {
            match ledger.void(job, &FailReason::Restarted.to_string()) {
                Ok(())
                | Err(LedgerError::AlreadyFinished { .. } | LedgerError::UnknownHold { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for job in ledger.unacknowledged()? {
            match ledger.credit(
                job,
                &key,
                "the provider restarted before the receipt was acknowledged",
                now_ms(),
            ) {
                Ok(_) | Err(LedgerError::AlreadyAcked { .. } | LedgerError::Refunded { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let inner = Arc::new(Inner {
            key,
            ledger,
            net,
            devices: devices::Devices::new(generators, settings.ms_per_standard_image),
            settings,
            queue: Mutex::new(queue::Queue::default()),
            work: Condvar::new(),
            changed: Notify::new(),
            seq: AtomicU64::new(now_ms()),
            metrics,
            runtime: tokio::runtime::Handle::current(),
            crashed: AtomicBool::new(false),
            threads: Mutex::new(Threads::default()),
            deliveries: delivery::Deliveries::default(),
            progress_slots: Arc::new(tokio::sync::Semaphore::new(worker::MAX_PROGRESS_IN_FLIGHT)),
            voids: Mutex::new(VecDeque::new()),
            notices: Mutex::new(tokio::task::JoinSet::new()),
        });
        let provider = Self { inner };
        for d in provider.inner.devices.all() {
            provider.inner.metrics.device_started(&d.label, &d.info);
        }
        let mut workers = Vec::with_capacity(provider.inner.devices.len());
        for device in 0..provider.inner.devices.len() {
            let worker = provider.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pixmarket-worker-{device}"))
                .spawn(move || worker.worker_loop(device));
            match spawned {
                Ok(w) => workers.push(w),
                Err(source) => {
                    // The workers started so far exit without touching anything: no job
                    // was admitted yet.
                    provider.inner.crashed.store(true, Ordering::SeqCst);
                    provider.lock().stopping = true;
                    provider.inner.work.notify_all();
                    return Err(ProviderError::Thread { device, source });
                }
            }
        }
        let adverts = provider.clone();
        // One task for the adverts, the queue's heartbeats and the hold sweep, so a crash
        // aborts all three at once.
        let adverts = tokio::spawn(async move {
            tokio::join!(
                adverts.advert_loop(),
                adverts.queue_heartbeat_loop(),
                adverts.hold_sweep_loop()
            );
        });
        if let Ok(mut t) = provider.inner.threads.lock() {
            t.workers = workers;
            t.adverts = Some(adverts);
        }
        Ok(provider)
    }

    fn crashed(&self) -> bool {
        self.inner.crashed.load(Ordering::SeqCst)
    }

    /// Emulates a kill: the advert task and every delivery are aborted, each worker abandons
    /// its batch at the next step and exits without settling, voiding or telling anyone,
    /// queued jobs stay where they are, and inbound requests are refused without touching the
    /// ledger. Returns once the worker threads and the tasks have exited, or `StillRunning` at
    /// `deadline`. Holds left open are voided, and unacknowledged receipts credited, by the
    /// next [`Provider::start`] on the same ledger.
    pub async fn crash(&self, deadline: tokio::time::Instant) -> Result<(), StillRunning> {
        self.inner.crashed.store(true, Ordering::SeqCst);
        if let Ok(mut q) = self.inner.queue.lock() {
            q.stopping = true;
        }
        self.inner.work.notify_all();
        let (workers, adverts) = match self.inner.threads.lock() {
            Ok(mut t) => (std::mem::take(&mut t.workers), t.adverts.take()),
            Err(_) => (Vec::new(), None),
        };
        if let Some(adverts) = adverts {
            adverts.abort();
            if tokio::time::timeout_at(deadline, adverts).await.is_err() {
                return Err(StillRunning("advert task"));
            }
        }
        if !self.inner.deliveries.abort_all(deadline).await {
            return Err(StillRunning("deliveries"));
        }
        for worker in workers {
            wait_for(worker, deadline).await?;
        }
        Ok(())
    }

    /// After [`Provider::stop`]: waits until the workers have voided the holds they still
    /// had and exited, their requesters have answered the signed voids (or those sends gave
    /// up), and the deliveries in flight have finished (or `deadline` came, when those still
    /// waiting for an ack are credited), or returns `StillRunning` at `deadline`.
    pub async fn wait_stopped(&self, deadline: tokio::time::Instant) -> Result<(), StillRunning> {
        let workers = match self.inner.threads.lock() {
            Ok(mut t) => std::mem::take(&mut t.workers),
            Err(_) => Vec::new(),
        };
        let mut result = Ok(());
        for w in workers {
            if let Err(e) = wait_for(w, deadline).await {
                result = Err(e);
            }
        }
        if !self.notices_sent(deadline).await && result.is_ok() {
            result = Err(StillRunning("void notices"));
        }
        self.finish_deliveries(deadline).await;
        result
    }

    /// Sends `event` to `peer` on its own task, which a stop waits for. Finished sends are
    /// reaped here, so the set holds only those in flight; each ends within `timeout`.
    fn notify(&self, peer: PeerId, event: JobEvent, timeout: Duration) {
        let net = self.inner.net.clone();
        let send = async move {
            let _ = send_with_timeout(&net, peer, Request::Event(event), timeout).await;
        };
        let mut notices = self
            .inner
            .notices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while notices.try_join_next().is_some() {}
        notices.spawn_on(send, &self.inner.runtime);
    }

    /// Waits until every notice in flight has been answered or has given up; `false` when
    /// `deadline` came first (those still in flight are then abandoned).
    async fn notices_sent(&self, deadline: tokio::time::Instant) -> bool {
        let mut pending = std::mem::take(
            &mut *self
                .inner
                .notices
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let all = async { while pending.join_next().await.is_some() {} };
        tokio::time::timeout_at(deadline, all).await.is_ok()
    }

    /// Stops taking jobs, and stops the batch that runs at its next step: the node stops its
    /// network right after this, so a job finished now could never be delivered. Those jobs'
    /// holds are voided instead, and their requesters told; the workers then exit.
    pub fn stop(&self) {
        if let Ok(mut q) = self.inner.queue.lock() {
            q.stopping = true;
            let queue::Queue {
                running, cancelled, ..
            } = &mut *q;
            cancelled.extend(running.keys().copied());
        }
        self.inner.work.notify_all();
        self.inner.changed.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, queue::Queue> {
        // A panic while holding the lock would be a bug in this module; the queue stays usable.
        self.inner
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The queue's view of the devices serving now.
    fn speed(&self) -> queue::Speed {
        self.inner.devices.speed()
    }

    /// Handles one inbound request addressed to the provider side. Runs on the blocking
    /// pool: it may write the ledger.
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
                    Response::Status(_) => "resubmitted",
                    _ => "refused",
                };
                self.inner.metrics.job(outcome);
                r
            }
            Request::Cancel(job) => self.cancel(peer, job),
            Request::Status(job) => Response::Status(self.status(peer, job)),
            Request::Fetch(ack) => self.fetch(peer, &ack),
            Request::Chain { after } => self.chain(peer, after),
            Request::Event(_) => refuse(FailReason::Unsupported("job events to a provider".into())),
        }
    }

    /// Signs a void for `job` and remembers it for `Status` answers.
    fn sign_void(&self, job: JobId, reason: &str) -> Option<Signed<JobVoid>> {
        let void = JobVoid {
            job_id: job,
            reason: reason
                .chars()
                .take(pixmarket_protocol::validate::MAX_MEMO_CHARS)
                .collect(),
            voided_at_ms: now_ms(),
        };
        let signed = Signed::sign(&self.inner.key, &void).ok()?;
        if let Ok(mut v) = self.inner.voids.lock() {
            if v.len() >= MAX_RECENT_VOIDS {
                v.pop_front();
            }
            v.push_back((job, signed.clone()));
        }
        Some(signed)
    }

    fn recent_void(&self, job: JobId) -> Option<Signed<JobVoid>> {
        let v = self.inner.voids.lock().ok()?;
        v.iter()
            .rev()
            .find(|(j, _)| *j == job)
            .map(|(_, s)| s.clone())
    }

    /// The requester key of a connection's peer (every peer id in this market is ed25519).
    fn requester_of(peer: &PeerId) -> Option<PublicKey> {
        PublicKey::from_peer_id(peer).ok()
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

/// Sends a request, giving up after `timeout` (shorter than the network's own).
async fn send_with_timeout(
    net: &Client,
    peer: PeerId,
    request: Request,
    timeout: Duration,
) -> Option<Response> {
    match tokio::time::timeout(timeout, net.request(peer, request)).await {
        Ok(Ok(r)) => Some(r),
        _ => None,
    }
}
