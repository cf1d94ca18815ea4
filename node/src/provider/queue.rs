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
    /// Previews the signed request asked for (validated: at most `MAX_PREVIEWS`).
    pub previews: u8,
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
            && a.lora == b.lora
    }
}

/// A job on a device.
pub(super) struct Running {
    pub requester: PublicKey,
    pub step: u32,
    pub of: u32,
}

/// What the queue's time estimates need of the devices.
#[derive(Clone, Copy, Debug)]
pub(super) struct Speed {
    /// Devices serving now (at least one).
    pub devices: usize,
    /// One standard image's time on one of them (their mean).
    pub ms_per_standard: u64,
}

impl Speed {
    fn ms_of(self, work_ppm: u64) -> u64 {
        work_ppm.saturating_mul(self.ms_per_standard) / 1_000_000
    }

    /// The time before a job starts with `ahead` jobs running or waiting before it, of
    /// `work_ppm` work in all: none while a device is free, else the work spread over them.
    fn wait_ms(self, ahead: usize, work_ppm: u64) -> u64 {
        let devices = self.devices.max(1);
        if ahead < devices {
            0
        } else {
            self.ms_of(work_ppm) / u64::try_from(devices).unwrap_or(1)
        }
    }
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
    /// Work of the running jobs, each counted as one standard image (how far along they are
    /// is not weighed).
    fn running_work(&self) -> u64 {
        u64::try_from(self.running.len())
            .unwrap_or(u64::MAX)
            .saturating_mul(1_000_000)
    }

    /// Estimated wait before a new job would start.
    pub(super) fn wait_ms(&self, speed: Speed) -> u64 {
        let ahead = self.running.len() + self.waiting.len();
        let work = self
            .waiting
            .iter()
            .map(|j| work_ppm(&j.params))
            .fold(self.running_work(), u64::saturating_add);
        speed.wait_ms(ahead, work)
    }

    /// Estimated finish of a new job of `work` (ppm of a standard image).
    pub(super) fn finish_ms(&self, work: u64, speed: Speed) -> u64 {
        self.wait_ms(speed).saturating_add(speed.ms_of(work))
    }

    /// Estimated finish of each waiting job, in queue order.
    pub(super) fn finishes_ms(&self, speed: Speed) -> Vec<u64> {
        let mut ahead = self.running.len();
        let mut work = self.running_work();
        self.waiting
            .iter()
            .map(|j| {
                let own = work_ppm(&j.params);
                let finish = speed.wait_ms(ahead, work).saturating_add(speed.ms_of(own));
                ahead += 1;
                work = work.saturating_add(own);
                finish
            })
            .collect()
    }

    /// Takes the oldest job and the compatible ones behind it, up to `max_batch` jobs and
    /// `max_images(width, height)` images in all (the memory plan's batch at their shared
    /// size; admission made sure the first job alone fits), and marks them running.
    pub(super) fn take_batch(
        &mut self,
        max_batch: usize,
        max_images: impl Fn(u32, u32) -> u32,
    ) -> Vec<QueuedJob> {
        let mut batch = Vec::new();
        let Some(first) = self.waiting.pop_front() else {
            return batch;
        };
        let image_limit = max_images(first.params.width, first.params.height);
        let mut images = first.params.images;
        let mut i = 0;
        while i < self.waiting.len() && batch.len() + 1 < max_batch {
            let more = self.waiting[i].params.images;
            if first.compatible(&self.waiting[i]) && images.saturating_add(more) <= image_limit {
                images += more;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_device_means_no_wait_and_work_spreads_over_the_devices() {
        let two = Speed {
            devices: 2,
            ms_per_standard: 10_000,
        };
        // One job ahead on two devices: the other device is free.
        assert_eq!(two.wait_ms(1, 1_000_000), 0);
        // Two standard images ahead on two devices: one image's time.
        assert_eq!(two.wait_ms(2, 2_000_000), 10_000);
        let one = Speed {
            devices: 1,
            ms_per_standard: 10_000,
        };
        assert_eq!(one.wait_ms(2, 2_000_000), 20_000);
        // No device left still gives a finite estimate (admission refuses anyway).
        let none = Speed {
            devices: 0,
            ms_per_standard: 10_000,
        };
        assert_eq!(none.wait_ms(1, 1_000_000), 10_000);
        assert_eq!(Queue::default().wait_ms(two), 0);
    }
}
