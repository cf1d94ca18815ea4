//! Playing one planned job through the market, with resubmissions, into a [`JobRecord`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use pixmarket_node::requester::{
    FETCH_DEADLINE, GenerateError, GenerateOptions, JobProgress, RESULT_KEPT, Requester, Selection,
};
use pixmarket_protocol::Hash;

use super::config::{SelectionRule, TestnetConfig};
use crate::record::{JobOutcome, JobRecord};
use crate::scenario::PlannedJob;
use crate::sim::ModelClock;

/// A request stays valid for at least this many idle timeouts (more when the quoted queue is
/// long): room for lost messages, and about the longest a silent provider keeps a requester
/// from failing over.
const REQUEST_VALIDITY_IDLE_TIMEOUTS: u32 = 12;
/// A job paid for whose images did not come within the fetch deadline is asked for once more,
/// for as long again, as a user would before buying it a second time: the provider keeps a
/// result for [`RESULT_KEPT`], longer than both fetches together.
const REFETCH_DEADLINE: std::time::Duration = FETCH_DEADLINE;
const _: () =
    assert!(FETCH_DEADLINE.as_secs() + REFETCH_DEADLINE.as_secs() < RESULT_KEPT.as_secs());

/// The providers one requester dealt with: every provider that quoted one of its jobs. A job
/// request goes only to a provider that quoted it, so no other provider can hold a hold, a
/// receipt or a credit note for this requester; the end of a run syncs chains with these
/// alone. Filled as quotes arrive, so a job cut off at the drain limit still counts.
pub(super) type DealtWith = Arc<Mutex<BTreeSet<PeerId>>>;

/// Per job: what the job task learns.
pub(super) struct JobRun {
    pub(super) record: JobRecord,
    /// The provider that was paid.
    pub(super) paid: Option<PeerId>,
    /// Hashes of the images received.
    pub(super) images: Vec<Hash>,
}

fn lock_opt(m: &Mutex<Option<u64>>) -> Option<u64> {
    *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The record of `job` before anything happened to it: submitted at `submitted_ms`, failed
/// for `reason` unless something better is learnt.
pub(super) fn unfinished(job: &PlannedJob, submitted_ms: u64, reason: &str) -> JobRecord {
    JobRecord {
        index: job.index,
        requester: job.requester,
        submitted_ms,
        started_ms: None,
        finished_ms: None,
        provider: None,
        attempts: 0,
        resubmissions: 0,
        cost_micros: 0,
        delivered_late: false,
        images: job.params.images,
        width: job.params.width,
        height: job.params.height,
        steps: job.params.steps,
        outcome: JobOutcome::Failed {
            reason: reason.to_owned(),
        },
    }
}

/// Runs one planned job to its end: generate through the market, and when every provider
/// tried failed or was busy, submit again later, up to the configured limits.
pub(super) async fn run_job(
    job: PlannedJob,
    requester: Requester,
    clock: ModelClock,
    t0: u64,
    config: Arc<TestnetConfig>,
    dealt_with: DealtWith,
) -> JobRun {
    let submitted_ms = clock.now_ms().saturating_sub(t0);
    let mut attempts = 0u32;
    let mut resubmissions = 0u32;
    let started: Arc<Mutex<Option<u64>>> = Arc::default();
    let mut record = unfinished(&job, submitted_ms, "");
    let job_seed = u64::try_from(job.index)
        .unwrap_or(0)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (outcome, paid, images) = loop {
        let selection = match config.selection {
            SelectionRule::EstimatedFinish => Selection::EstimatedFinish,
            SelectionRule::Random => Selection::Random {
                seed: config.seed ^ job_seed ^ u64::from(resubmissions),
            },
        };
        let options = GenerateOptions {
            idle_timeout: config.idle_timeout,
            selection,
            request_validity: config.idle_timeout * REQUEST_VALIDITY_IDLE_TIMEOUTS,
            ..GenerateOptions::default()
        };
        let first_step = started.clone();
        let mut tried = 0u32;
        let mut progress = |p: JobProgress| match p {
            JobProgress::Quoted { provider, .. } => {
                tried += 1;
                dealt_with
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(provider);
            }
            JobProgress::Step { .. } => {
                let mut s = first_step
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if s.is_none() {
                    *s = Some(clock.now_ms().saturating_sub(t0));
                }
            }
            _ => {}
        };
        let result = requester
            .generate(job.params.clone(), options, &mut progress)
            .await;
        attempts += tried.max(1);
        match result {
            Ok(o) => {
                record.cost_micros = o.cost.0;
                let images = o.images.iter().map(|i| Hash::of(i)).collect();
                break (JobOutcome::Completed, Some(o.provider), images);
            }
            Err(GenerateError::Undelivered { job: paid_job, .. })
                if let Ok(late) = requester.refetch(paid_job, REFETCH_DEADLINE).await =>
            {
                record.cost_micros = late.outcome.cost.0;
                record.delivered_late = late.delivered_late;
                let images = late.outcome.images.iter().map(|i| Hash::of(i)).collect();
                break (JobOutcome::Completed, Some(late.outcome.provider), images);
            }
            Err(e) => {
                let now = clock.now_ms().saturating_sub(t0);
                let out_of_time = now > config.duration_ms.saturating_mul(2);
                if resubmissions >= config.max_resubmissions || out_of_time {
                    break (
                        JobOutcome::Failed {
                            reason: e.to_string(),
                        },
                        None,
                        Vec::new(),
                    );
                }
                resubmissions += 1;
                tokio::time::sleep(clock.wall(config.resubmit_after_ms)).await;
            }
        }
    };
    record.finished_ms = Some(clock.now_ms().saturating_sub(t0));
    record.attempts = attempts;
    record.resubmissions = resubmissions;
    record.started_ms = lock_opt(&started);
    record.outcome = outcome;
    JobRun {
        record,
        paid,
        images,
    }
}
