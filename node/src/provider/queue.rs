//! The provider's queue: jobs waiting, jobs running (with their step), cancellations, and the
//! admission slots reserved while a hold is written. One `Mutex` guards it; nothing holds that
//! lock across a ledger write or a network call.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use libp2p::PeerId;
use pixmarket_protocol::{
    JobId, JobParams, JobRequest, MeteredUnits, MicroTokens, PublicKey, Signed,
};

/// An admitted job: its hold is durable.
pub(super) struct QueuedJob {
    pub job_id: JobId,
    pub peer: PeerId,
    pub requester: PublicKey,
    pub request: Signed<JobRequest>,
    pub params: JobParams,
    pub units: MeteredUnits,
    pub cost: MicroTokens,
    pub expires_at_ms: u64,
    pub queued_at: Instant,
}

impl QueuedJob {
    /// Jobs the engine can run in one batch: same size, steps, mode and exactness (a job that
    /// requires exact computation never shares a step-cached batch).
    pub(super) fn compatible(&self, other: &QueuedJob) -> bool {
        let (a, b) = (&self.params, &other.params);
        a.exact == b.exact
            && a.width == b.width
            && a.height == b.height
            && a.steps == b.steps
            && a.mode.name() == b.mode.name()
            && a.mode.strength_permille() == b.mode.strength_permille()
    }
}

/// A job on the GPU.
pub(super) struct Running {
    pub requester: PublicKey,
    pub step: u32,
    pub of: u32,
}

#[derive(Default)]
pub(super) struct Queue {
    pub waiting: VecDeque<QueuedJob>,
    pub running: BTreeMap<JobId, Running>,
    pub cancelled: BTreeSet<JobId>,
    /// Admissions between their queue check and their push (the hold is being written, with
    /// the lock released): they count against `max_queue`.
    pub reserved: usize,
    pub stopping: bool,
}

/// Relative work of a job against a standard image, in parts per million.
pub(super) fn work_ppm(p: &JobParams) -> u64 {
    p.standard_work_ppm()
}

impl Queue {
    /// Estimated wait before a new job would start, given the time of one standard image.
    pub(super) fn eta_ms(&self, ms_per_standard: u64) -> u64 {
        self.waiting
            .iter()
            .map(|j| work_ppm(&j.params) * ms_per_standard / 1_000_000)
            .sum::<u64>()
            + u64::try_from(self.running.len()).unwrap_or(0) * ms_per_standard
    }

    /// Takes the oldest job and the compatible ones behind it, up to `max_batch`, and marks
    /// them running.
    pub(super) fn take_batch(&mut self, max_batch: usize) -> Vec<QueuedJob> {
        let mut batch = Vec::new();
        let Some(first) = self.waiting.pop_front() else {
            return batch;
        };
        let mut i = 0;
        while i < self.waiting.len() && batch.len() + 1 < max_batch {
            if first.compatible(&self.waiting[i]) {
                if let Some(j) = self.waiting.remove(i) {
                    batch.push(j);
                }
            } else {
                i += 1;
            }
        }
        batch.insert(0, first);
        for j in &batch {
            self.running.insert(
                j.job_id,
                Running {
                    requester: j.requester,
                    step: 0,
                    of: j.params.steps,
                },
            );
        }
        batch
    }
}
