//! What the provider's queue holds now, for the operator: the jobs on a device with their step,
//! and the waiting ones in order with their estimated finish. A copy taken under the queue's
//! lock; nothing in it is signed or priced.

use pixmarket_protocol::{JobId, PublicKey};

use super::Provider;

/// A job on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningJob {
    pub job_id: JobId,
    pub requester: PublicKey,
    pub step: u32,
    pub of: u32,
}

/// A job waiting for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingJob {
    pub job_id: JobId,
    pub requester: PublicKey,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub images: u32,
    /// Milliseconds it has waited.
    pub waited_ms: u64,
    /// The estimated time until it is finished, at the devices' measured speed.
    pub eta_ms: u64,
}

/// The provider's queue at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStatus {
    pub running: Vec<RunningJob>,
    /// In the order they will run.
    pub waiting: Vec<WaitingJob>,
    /// The most jobs that may wait (`max_queue`); more are refused as busy.
    pub max_queue: u32,
}

impl Provider {
    /// The queue now.
    pub fn queue_status(&self) -> QueueStatus {
        let speed = self.speed();
        let q = self.lock();
        let running = q
            .running
            .iter()
            .map(|(id, r)| RunningJob {
                job_id: *id,
                requester: r.requester,
                step: r.step,
                of: r.of,
            })
            .collect();
        let waiting = q
            .waiting
            .iter()
            .zip(q.finishes_ms(speed))
            .map(|(j, eta_ms)| WaitingJob {
                job_id: j.job_id,
                requester: j.requester,
                width: j.params.width,
                height: j.params.height,
                steps: j.params.steps,
                images: j.params.images,
                waited_ms: u64::try_from(j.queued_at.elapsed().as_millis()).unwrap_or(u64::MAX),
                eta_ms,
            })
            .collect();
        QueueStatus {
            running,
            waiting,
            max_queue: self.inner.settings.max_queue,
        }
    }
}
