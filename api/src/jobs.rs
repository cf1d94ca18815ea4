//! The API's jobs: one table that the OpenAI routes and the async routes share, so a job
//! submitted on either is seen on both under the same id.
//!
//! Data flow: submit → an entry (state `waiting` in this node's queue) and a task → the task
//! takes one of [`MAX_RUNNING_JOBS`] slots → `Requester::generate`, whose progress (quote,
//! provider queue, steps with their previews, fail-over) updates the entry's `watch` channel
//! (a preview is stored in the entry before the step that carries it is sent, so a reader
//! woken by the step finds it) → the outcome (paid,
//! verified images with the receipt) or the reason it failed; a paid job whose images missed
//! the fetch deadline is asked for once more (`Requester::refetch`) before it is reported
//! undelivered. Cancel aborts the task: nothing
//! is acknowledged for an abandoned job, so nothing is paid (the provider credits a receipt it
//! sends later). Finished entries keep their images for the URL lifetime, and the table keeps
//! at most [`MAX_KEPT_JOBS`] entries, dropping the oldest finished first.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use pixmarket_node::now_ms;
use pixmarket_node::requester::{
    FETCH_DEADLINE, FailureKind, GenerateError, GenerateOptions, JobProgress, Requester,
};
use pixmarket_protocol::{JobParams, MicroTokens, Preview};
use tokio::sync::{Semaphore, watch};

use crate::error::ApiError;

/// Jobs waiting or running at once; a submission beyond it is answered 429. A person's tools
/// rarely have more than a few in flight, and each waits on a provider's queue.
pub const MAX_OPEN_JOBS: usize = 64;
/// `Requester::generate` calls at once; the rest wait in this node's queue. The market's
/// providers each run a few jobs at a time: more calls than this would only queue there.
pub const MAX_RUNNING_JOBS: usize = 8;
/// Entries kept, finished ones included. Each finished one holds its images until they expire:
/// at most 4 images of a few MiB each (a 1024² PNG is about 1.5 MiB).
pub const MAX_KEPT_JOBS: usize = 128;
/// How long a finished job's images are kept (and their URLs answer) by default.
pub const DEFAULT_IMAGE_TTL: Duration = Duration::from_secs(60 * 60);

/// A preview of a running job's first image, as the provider sent it: at most
/// [`pixmarket_protocol::preview::MAX_PREVIEWS`] a job (the requester passes no more), each
/// at most [`pixmarket_protocol::preview::MAX_PREVIEW_BYTES`], so the table's previews are at
/// most 128 × 3 × 56 KiB (21 MiB).
#[derive(Debug)]
pub struct Shot {
    /// 0-based, in the order they came: OpenAI's `partial_image_index`.
    pub index: usize,
    pub step: u32,
    pub of: u32,
    pub received_ms: u64,
    pub preview: Preview,
}

/// An API job's id: `job_` and 32 hex digits. It is not the protocol's job id (a job that
/// fails over has one per provider tried); the receipt's id is in the job's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiJobId(pub [u8; 16]);

impl ApiJobId {
    fn random() -> Self {
        Self(rand::random())
    }

    pub fn parse(text: &str) -> Option<Self> {
        let hex_part = text.strip_prefix("job_")?;
        let mut b = [0u8; 16];
        hex::decode_to_slice(hex_part, &mut b).ok()?;
        Some(Self(b))
    }
}

impl std::fmt::Display for ApiJobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job_{}", hex::encode(self.0))
    }
}

/// Why a job failed, as a status a client can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    NoProviders,
    InsufficientCredit,
    /// Every provider tried was busy; the soonest any said it would take more.
    Busy {
        retry_after_ms: u64,
    },
    Invalid,
    Other,
}

/// A paid, verified result.
#[derive(Debug)]
pub struct Done {
    /// PNGs, as the provider delivered them and the receipt hashes them.
    pub images: Vec<Vec<u8>>,
    pub provider: PeerId,
    pub cost: MicroTokens,
    /// The signed receipt's digest.
    pub receipt: String,
    /// The protocol's job id, the one the receipt names.
    pub provider_job_id: String,
    pub attempts: usize,
    pub finished_ms: u64,
}

/// Where a job stands.
#[derive(Clone, Debug)]
pub enum Phase {
    /// In this node's queue, waiting for one of [`MAX_RUNNING_JOBS`] slots.
    Waiting,
    Quoted {
        provider: PeerId,
        cost: MicroTokens,
    },
    /// In a provider's queue.
    Queued {
        provider: PeerId,
        position: u32,
        eta_ms: u64,
    },
    Running {
        provider: Option<PeerId>,
        step: u32,
        of: u32,
    },
    Completed(Arc<Done>),
    Failed {
        kind: FailKind,
        reason: String,
        finished_ms: u64,
    },
    Cancelled {
        finished_ms: u64,
    },
}

impl Phase {
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Phase::Completed(_) | Phase::Failed { .. } | Phase::Cancelled { .. }
        )
    }

    fn finished_ms(&self) -> Option<u64> {
        match self {
            Phase::Completed(d) => Some(d.finished_ms),
            Phase::Failed { finished_ms, .. } | Phase::Cancelled { finished_ms } => {
                Some(*finished_ms)
            }
            _ => None,
        }
    }

    pub fn status(&self) -> &'static str {
        match self {
            Phase::Waiting | Phase::Quoted { .. } | Phase::Queued { .. } => "queued",
            Phase::Running { .. } => "running",
            Phase::Completed(_) => "completed",
            Phase::Failed { .. } => "failed",
            Phase::Cancelled { .. } => "cancelled",
        }
    }
}

/// What was asked, for the job's view.
#[derive(Clone, Debug)]
pub struct Asked {
    pub model: String,
    pub params: JobParams,
    /// `png` or `jpeg`: what the images are served as.
    pub output_format: crate::openai::OutputFormat,
}

/// A completed job's request and result.
pub type Completed = (Arc<Asked>, Arc<Done>);

/// One job as a reader sees it.
#[derive(Clone, Debug)]
pub struct View {
    pub id: ApiJobId,
    pub created_ms: u64,
    pub asked: Arc<Asked>,
    pub phase: Phase,
    /// Jobs ahead of this one in this node's queue, while it waits there.
    pub node_queue_position: Option<usize>,
    pub images_expire_ms: Option<u64>,
    /// The latest preview, if the job asked for previews and one has come.
    pub latest_preview: Option<Arc<Shot>>,
}

/// A job's previews, shared by its task (which adds them) and the table's readers.
type Shots = Arc<Mutex<Vec<Arc<Shot>>>>;

struct Entry {
    seq: u64,
    created_ms: u64,
    asked: Arc<Asked>,
    state: Arc<watch::Sender<Phase>>,
    shots: Shots,
    task: Option<tokio::task::AbortHandle>,
}

struct Table {
    next_seq: u64,
    entries: BTreeMap<ApiJobId, Entry>,
}

/// The shared job table; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    table: Arc<Mutex<Table>>,
    slots: Arc<Semaphore>,
    requester: Requester,
    image_ttl: Duration,
    fetch_deadline: Duration,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

impl Jobs {
    /// `fetch_deadline`: how long a paid job's images are asked for before the first fetch
    /// gives up (then they are asked for once more, for [`FETCH_DEADLINE`]).
    pub fn new(requester: Requester, image_ttl: Duration, fetch_deadline: Duration) -> Self {
        Self {
            table: Arc::new(Mutex::new(Table {
                next_seq: 0,
                entries: BTreeMap::new(),
            })),
            slots: Arc::new(Semaphore::new(MAX_RUNNING_JOBS)),
            requester,
            image_ttl,
            fetch_deadline,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Table>, ApiError> {
        self.table
            .lock()
            .map_err(|_| ApiError::internal("the job table's lock is poisoned"))
    }

    /// Queues a job and starts its task; 429 when [`MAX_OPEN_JOBS`] are open.
    pub fn submit(&self, asked: Asked, options: GenerateOptions) -> Result<ApiJobId, ApiError> {
        let options = GenerateOptions {
            fetch_deadline: self.fetch_deadline,
            ..options
        };
        let now = now_ms();
        let id = ApiJobId::random();
        let asked = Arc::new(asked);
        let (tx, _) = watch::channel(Phase::Waiting);
        let state = Arc::new(tx);
        let shots = Shots::default();
        {
            let mut t = self.lock()?;
            let open = t
                .entries
                .values()
                .filter(|e| !e.state.borrow().is_finished())
                .count();
            if open >= MAX_OPEN_JOBS {
                return Err(ApiError::MarketBusy {
                    message: format!(
                        "this node already has {open} jobs waiting or running (at most {MAX_OPEN_JOBS}); retry when one finishes"
                    ),
                    retry_after_s: None,
                });
            }
            while t.entries.len() >= MAX_KEPT_JOBS {
                let oldest = t
                    .entries
                    .iter()
                    .filter_map(|(id, e)| e.state.borrow().finished_ms().map(|f| (f, *id)))
                    .min();
                match oldest {
                    Some((_, id)) => {
                        t.entries.remove(&id);
                    }
                    None => break,
                }
            }
            let seq = t.next_seq;
            t.next_seq += 1;
            t.entries.insert(
                id,
                Entry {
                    seq,
                    created_ms: now,
                    asked: asked.clone(),
                    state: state.clone(),
                    shots: shots.clone(),
                    task: None,
                },
            );
        }
        let task = tokio::spawn(run(
            self.slots.clone(),
            self.requester.clone(),
            asked.params.clone(),
            options,
            state,
            shots,
        ));
        if let Ok(mut t) = self.lock()
            && let Some(e) = t.entries.get_mut(&id)
        {
            e.task = Some(task.abort_handle());
        }
        Ok(id)
    }

    /// A job's view; `None` for an unknown id.
    pub fn get(&self, id: ApiJobId) -> Result<Option<View>, ApiError> {
        let t = self.lock()?;
        Ok(t.entries.get(&id).map(|e| self.view(&t, id, e)))
    }

    /// A receiver that sees each change of the job's phase.
    pub fn watch(&self, id: ApiJobId) -> Result<Option<watch::Receiver<Phase>>, ApiError> {
        Ok(self.lock()?.entries.get(&id).map(|e| e.state.subscribe()))
    }

    /// The previews job `id` has received so far, in order; `None` for an unknown id.
    pub fn previews(&self, id: ApiJobId) -> Result<Option<Vec<Arc<Shot>>>, ApiError> {
        let t = self.lock()?;
        Ok(t.entries.get(&id).map(|e| shots_of(&e.shots)))
    }

    /// Every kept job, newest first.
    pub fn list(&self) -> Result<Vec<View>, ApiError> {
        let t = self.lock()?;
        let mut all: Vec<(u64, View)> = t
            .entries
            .iter()
            .map(|(id, e)| (e.seq, self.view(&t, *id, e)))
            .collect();
        all.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        Ok(all.into_iter().map(|(_, v)| v).collect())
    }

    /// Cancels a job that has not finished: 409 for one that has.
    pub fn cancel(&self, id: ApiJobId) -> Result<View, ApiError> {
        let mut t = self.lock()?;
        let Some(e) = t.entries.get_mut(&id) else {
            return Err(ApiError::NotFound {
                what: "job",
                id: id.to_string(),
            });
        };
        let finished = e.state.borrow().is_finished();
        if finished {
            return Err(ApiError::Conflict(format!(
                "job {id} has already {}; only a queued or running job can be cancelled",
                e.state.borrow().status()
            )));
        }
        if let Some(task) = e.task.take() {
            task.abort();
        }
        e.state.send_replace(Phase::Cancelled {
            finished_ms: now_ms(),
        });
        let e = &t.entries[&id];
        Ok(self.view(&t, id, e))
    }

    /// Cancels every open job: the API is stopping.
    pub fn abort_all(&self) {
        if let Ok(mut t) = self.table.lock() {
            for e in t.entries.values_mut() {
                if let Some(task) = e.task.take() {
                    task.abort();
                }
                e.state.send_if_modified(|p| {
                    if p.is_finished() {
                        return false;
                    }
                    *p = Phase::Cancelled {
                        finished_ms: now_ms(),
                    };
                    true
                });
            }
        }
    }

    /// The images of a completed job whose images have not expired.
    pub fn images(&self, id: ApiJobId) -> Result<Option<Completed>, ApiError> {
        let t = self.lock()?;
        let Some(e) = t.entries.get(&id) else {
            return Ok(None);
        };
        let phase = e.state.borrow().clone();
        match phase {
            Phase::Completed(done) if !self.expired(&done) => Ok(Some((e.asked.clone(), done))),
            _ => Ok(None),
        }
    }

    fn expired(&self, done: &Done) -> bool {
        let ttl = u64::try_from(self.image_ttl.as_millis()).unwrap_or(u64::MAX);
        done.finished_ms.saturating_add(ttl) < now_ms()
    }

    fn view(&self, t: &Table, id: ApiJobId, e: &Entry) -> View {
        let phase = e.state.borrow().clone();
        let node_queue_position = matches!(phase, Phase::Waiting).then(|| {
            t.entries
                .values()
                .filter(|o| o.seq < e.seq && matches!(*o.state.borrow(), Phase::Waiting))
                .count()
        });
        let ttl = u64::try_from(self.image_ttl.as_millis()).unwrap_or(u64::MAX);
        let images_expire_ms = match &phase {
            Phase::Completed(d) => Some(d.finished_ms.saturating_add(ttl)),
            _ => None,
        };
        View {
            id,
            created_ms: e.created_ms,
            asked: e.asked.clone(),
            phase,
            node_queue_position,
            images_expire_ms,
            latest_preview: shots_of(&e.shots).pop(),
        }
    }
}

fn shots_of(shots: &Shots) -> Vec<Arc<Shot>> {
    shots
        .lock()
        .map(|s| s.clone())
        .unwrap_or_else(|p| p.into_inner().clone())
}

/// The job's task: a slot, then the market.
async fn run(
    slots: Arc<Semaphore>,
    requester: Requester,
    params: JobParams,
    options: GenerateOptions,
    state: Arc<watch::Sender<Phase>>,
    shots: Shots,
) {
    let Ok(_slot) = slots.acquire_owned().await else {
        return;
    };
    let progress_state = state.clone();
    let mut provider = None;
    let mut on_progress = move |p: JobProgress| {
        let next = match p {
            JobProgress::Quoted {
                provider: peer,
                cost,
            } => {
                provider = Some(peer);
                Phase::Quoted {
                    provider: peer,
                    cost,
                }
            }
            JobProgress::Queued {
                provider: peer,
                position,
                eta_ms,
            } => {
                provider = Some(peer);
                Phase::Queued {
                    provider: peer,
                    position,
                    eta_ms,
                }
            }
            JobProgress::Step { step, of, preview } => {
                if let Some(preview) = preview {
                    let mut s = shots
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let index = s.len();
                    s.push(Arc::new(Shot {
                        index,
                        step,
                        of,
                        received_ms: now_ms(),
                        preview,
                    }));
                }
                Phase::Running { provider, step, of }
            }
            JobProgress::FailingOver { .. } => Phase::Waiting,
        };
        progress_state.send_if_modified(|old| {
            if old.is_finished() {
                return false;
            }
            *old = next;
            true
        });
    };
    let mut result = requester.generate(params, options, &mut on_progress).await;
    // Paid, and the images missed the fetch deadline: the provider keeps them for ten minutes,
    // so they are asked for once more before the job is reported undelivered (a client of the
    // API has no other way to get what it paid for).
    if let Err(GenerateError::Undelivered { job, .. }) = &result
        && let Ok(late) = requester.refetch(*job, FETCH_DEADLINE).await
    {
        result = Ok(late.outcome);
    }
    let finished_ms = now_ms();
    let next = match result {
        Ok(outcome) => Phase::Completed(Arc::new(Done {
            images: outcome.images,
            provider: outcome.provider,
            cost: outcome.cost,
            receipt: outcome.receipt.digest().to_string(),
            provider_job_id: outcome
                .receipt
                .verify()
                .map(|r| r.job_id.to_string())
                .unwrap_or_default(),
            attempts: outcome.attempts,
            finished_ms,
        })),
        Err(e) => Phase::Failed {
            kind: classify(&e),
            reason: e.to_string(),
            finished_ms,
        },
    };
    state.send_if_modified(|old| {
        if old.is_finished() {
            return false;
        }
        *old = next;
        true
    });
}

fn classify(e: &GenerateError) -> FailKind {
    match e {
        GenerateError::NoProviders => FailKind::NoProviders,
        GenerateError::Invalid(_) => FailKind::Invalid,
        // Every provider tried failed the same way: that is what the client can act on
        // (deposit, or wait); mixed reasons are a market failure.
        GenerateError::AllFailed(attempts) if !attempts.is_empty() => {
            let busy: Option<Vec<u64>> = attempts
                .iter()
                .map(|a| match a.kind() {
                    FailureKind::Busy { retry_after_ms } => Some(*retry_after_ms),
                    _ => None,
                })
                .collect();
            if attempts
                .iter()
                .all(|a| matches!(a.kind(), FailureKind::InsufficientCredit { .. }))
            {
                FailKind::InsufficientCredit
            } else if let Some(waits) = busy {
                FailKind::Busy {
                    retry_after_ms: waits.into_iter().min().unwrap_or(0),
                }
            } else {
                FailKind::Other
            }
        }
        _ => FailKind::Other,
    }
}

/// The error a failed job answers on the synchronous (OpenAI) route.
pub fn failure_error(kind: FailKind, reason: &str) -> ApiError {
    match kind {
        FailKind::NoProviders => ApiError::NoProviders(reason.to_owned()),
        FailKind::InsufficientCredit => ApiError::InsufficientCredit(reason.to_owned()),
        FailKind::Busy { retry_after_ms } => ApiError::MarketBusy {
            message: reason.to_owned(),
            retry_after_s: Some(retry_after_ms.div_ceil(1000).max(1)),
        },
        FailKind::Invalid => ApiError::Invalid {
            param: None,
            message: reason.to_owned(),
        },
        FailKind::Other => ApiError::Market(reason.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn job_ids_round_trip_and_refuse_garbage() {
        let id = ApiJobId::random();
        assert_eq!(ApiJobId::parse(&id.to_string()), Some(id));
        assert_eq!(ApiJobId::parse("job_xyz"), None);
        assert_eq!(ApiJobId::parse(&hex::encode(id.0)), None);
    }

    #[test]
    fn refusals_of_one_kind_become_their_status() {
        use pixmarket_node::requester::{FailedAttempt, Failure};
        let credit = FailureKind::InsufficientCredit {
            needed: MicroTokens(5),
            available: MicroTokens(0),
        };
        let busy = |ms| FailureKind::Busy { retry_after_ms: ms };
        // The message plays no part: only the kind decides.
        let attempt = |kind: FailureKind| FailedAttempt {
            provider: PeerId::random(),
            failure: Failure {
                kind,
                message: "insufficient credit, provider busy".into(),
            },
        };
        let all = |r: Vec<FailureKind>| {
            classify(&GenerateError::AllFailed(
                r.into_iter().map(attempt).collect(),
            ))
        };
        assert_eq!(all(vec![credit.clone()]), FailKind::InsufficientCredit);
        assert_eq!(
            all(vec![busy(2_500), busy(800)]),
            FailKind::Busy {
                retry_after_ms: 800
            }
        );
        assert_eq!(all(vec![busy(5), credit]), FailKind::Other);
        assert_eq!(all(vec![FailureKind::Unreachable]), FailKind::Other);
        let ApiError::MarketBusy { retry_after_s, .. } = failure_error(
            FailKind::Busy {
                retry_after_ms: 1_200,
            },
            "busy",
        ) else {
            panic!("busy is not MarketBusy");
        };
        assert_eq!(retry_after_s, Some(2));
    }
}
