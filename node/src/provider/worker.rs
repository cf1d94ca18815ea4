//! The worker threads, one per device: they only compute. A free worker takes the next batch
//! from the shared queue, runs its device's generator, hands each job's progress (with the
//! previews its request asked for) to that job's bounded lane ([`super::progress`]; a slow
//! peer delays nobody else), and hands each result to the delivery lane of its requester;
//! a failed, cancelled or missing result voids its hold. An engine error takes the device out:
//! its batch is voided (never rerun elsewhere, so nothing is charged twice), the worker exits,
//! and when it was the last device up the waiting jobs are voided too.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{JobEvent, JobId, JobParams};

use super::Provider;
use super::progress::ProgressLane;
use super::queue::{QueuedJob, work_ppm};
use crate::generator::{GenError, StepReport};

/// Progress events of one batch are sent at most this often (plus the first and last step).
const PROGRESS_MIN_GAP: Duration = Duration::from_millis(250);
/// Progress sends in flight at once, node-wide (all workers together); past this a progress event is dropped (the
/// next step's follows, and a requester that hears nothing asks for the status).
pub(super) const MAX_PROGRESS_IN_FLIGHT: usize = 64;
/// How long a void's notice waits for its answer; the requester can also ask for the status.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

impl Provider {
    /// The worker of device `device`, until the provider stops or the device fails.
    pub(super) fn worker_loop(&self, device: usize) {
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
                let devices = &self.inner.devices;
                let batch = q.take_batch(self.inner.settings.max_batch as usize, |w, h| {
                    devices.max_images(w, h)
                });
                self.inner.metrics.set_queue(q.waiting.len());
                batch
            };
            self.inner.changed.notify_one();
            if self.run_batch(device, batch).is_break() {
                // The device failed: its worker serves no more.
                return;
            }
        }
        if self.crashed() {
            // A killed process releases nothing: the next start voids the open holds.
            return;
        }
        // Jobs still queued at shutdown will not run: release their holds (the first worker
        // to get here takes them all).
        let left: Vec<QueuedJob> = self.lock().waiting.drain(..).collect();
        for j in &left {
            self.finish_failed(j, FailReason::ShuttingDown);
        }
    }

    /// Takes device `device` out after its engine failed with `why`. When no device is left,
    /// the waiting jobs are voided (admission refuses new ones from now on).
    fn device_failed(&self, device: usize, why: &str) {
        if !self.inner.devices.mark_down(device, why) {
            return;
        }
        let label = self
            .inner
            .devices
            .get(device)
            .map_or_else(|| device.to_string(), |d| d.label.clone());
        tracing::error!(device = %label, error = %why, "device failed; it serves no more jobs until the node restarts");
        self.inner.metrics.device_down(&label);
        if self.inner.devices.first_up().is_none() {
            let left: Vec<QueuedJob> = self.lock().waiting.drain(..).collect();
            self.inner.metrics.set_queue(0);
            for j in &left {
                self.finish_failed(j, FailReason::Engine(no_device_left()));
            }
        }
        // The advert shrinks at once.
        self.inner.changed.notify_one();
    }

    /// Runs one batch on `device`; `Break` when the device failed and its worker must stop.
    fn run_batch(&self, device: usize, batch: Vec<QueuedJob>) -> ControlFlow<()> {
        let Some(dev) = self.inner.devices.get(device) else {
            for job in &batch {
                self.finish_failed(job, FailReason::Engine(no_device_left()));
            }
            return ControlFlow::Break(());
        };
        let started = Instant::now();
        let params: Vec<JobParams> = batch.iter().map(|j| j.params.clone()).collect();
        let ids: Vec<JobId> = batch.iter().map(|j| j.job_id).collect();
        for id in &ids {
            tracing::debug!(job = %id, device = %dev.label, "running job");
        }
        let previews: Vec<u8> = batch.iter().map(|j| j.previews).collect();
        let lanes: Vec<ProgressLane> = batch
            .iter()
            .map(|j| ProgressLane::open(self, j.peer))
            .collect();
        let mut last_step = Instant::now();
        let mut last_sent = Instant::now();
        let mut progress = |report: StepReport| {
            let StepReport {
                step,
                of,
                previews: mut made,
            } = report;
            if self.crashed() {
                return ControlFlow::Break(());
            }
            self.inner.metrics.step(&dev.label, last_step.elapsed());
            last_step = Instant::now();
            let all_cancelled = {
                let mut q = self.lock();
                for id in &ids {
                    if let Some(r) = q.running.get_mut(id) {
                        r.step = step;
                        r.of = of;
                    }
                }
                ids.iter().all(|id| q.cancelled.contains(id))
            };
            // The first step (the job has started), the last, and in between at most one per
            // PROGRESS_MIN_GAP: fast steps would otherwise cost a message each.
            // A preview goes out at its step whatever the gap: there are at most three a job.
            let due = step <= 1 || step >= of || last_sent.elapsed() >= PROGRESS_MIN_GAP;
            if due {
                last_sent = Instant::now();
            }
            for (i, (j, lane)) in batch.iter().zip(&lanes).enumerate() {
                let preview = made
                    .iter()
                    .position(|(k, _)| *k == i)
                    .map(|at| made.swap_remove(at).1);
                if due || preview.is_some() {
                    let ev = JobEvent {
                        job_id: j.job_id,
                        kind: JobEventKind::Progress { step, of, preview },
                    };
                    lane.push(ev);
                }
            }
            if all_cancelled {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let result = dev
            .generator
            .generate_previewing(&params, &previews, &mut progress);
        // Each job's queued progress still goes out; its receipt waits for it (see
        // `progress`).
        let mut lanes = lanes.into_iter().map(ProgressLane::close);
        if self.crashed() {
            // The batch is abandoned as a killed process would abandon it.
            return ControlFlow::Break(());
        }
        let elapsed = started.elapsed();
        self.inner.metrics.busy(&dev.label, elapsed);
        self.inner.metrics.cache(self.inner.devices.cache_stats());
        let cancelled: BTreeSet<JobId> = {
            let mut q = self.lock();
            ids.iter()
                .filter(|id| q.cancelled.remove(id))
                .copied()
                .collect()
        };
        match result {
            Ok(images) => {
                let total_work: u64 = params.iter().map(work_ppm).sum::<u64>().max(1);
                let measured = u64::try_from(elapsed.as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_mul(1_000_000)
                    / total_work;
                dev.measured(measured);
                let run_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
                let mut images = images.into_iter();
                for job in batch {
                    let pngs = images.next();
                    let lane = lanes.next();
                    if cancelled.contains(&job.job_id) {
                        self.finish_failed(&job, FailReason::Cancelled);
                        continue;
                    }
                    match pngs {
                        Some(pngs) if pngs.len() == job.params.images as usize => {
                            // The mode the device ran it in: the rule its generator applies.
                            let mode = dev.info.step_caching.for_job(job.params.exact);
                            self.deliver(job, pngs, run_ms, mode, lane);
                        }
                        other => {
                            let got = other.map_or(0, |p| p.len());
                            tracing::error!(job = %job.job_id, got, "generator returned the wrong number of images");
                            self.finish_failed(
                                &job,
                                FailReason::Engine(format!(
                                    "the generator returned {got} images, {} were asked",
                                    job.params.images
                                )),
                            );
                        }
                    }
                }
            }
            Err(GenError::Cancelled) => {
                for job in &batch {
                    self.finish_failed(job, FailReason::Cancelled);
                }
            }
            Err(GenError::Failed(msg)) => {
                // The device is marked down before the voids go out, so a requester that
                // fails over and comes back finds it gone from the advert and the queue
                // estimates.
                self.device_failed(device, &msg);
                for job in &batch {
                    self.finish_failed(job, FailReason::Engine(msg.clone()));
                }
                self.inner.changed.notify_one();
                return ControlFlow::Break(());
            }
        }
        self.inner.changed.notify_one();
        ControlFlow::Continue(())
    }

    /// Voids the job's hold, leaves the running set, and tells the requester with a signed
    /// void (best effort: a requester that misses it asks for the status).
    pub(super) fn finish_failed(&self, job: &QueuedJob, reason: FailReason) {
        if self.crashed() {
            return;
        }
        let why = reason.to_string();
        match self.inner.ledger.void(job.job_id, &why) {
            Ok(())
            | Err(
                pixmarket_ledger::LedgerError::AlreadyFinished { .. }
                | pixmarket_ledger::LedgerError::UnknownHold { .. },
            ) => {}
            Err(e) => tracing::error!(job = %job.job_id, error = %e, "cannot void hold"),
        }
        self.lock().running.remove(&job.job_id);
        // The operator's one line for a job that ended unpaid (a sold one logs "sold a job").
        tracing::info!(
            job = %job.job_id,
            buyer = %job.requester.fmt_short(),
            reason = %why,
            "job ended without a charge"
        );
        self.inner.metrics.job(if reason == FailReason::Cancelled {
            "cancelled"
        } else {
            "failed"
        });
        let Some(void) = self.sign_void(job.job_id, &why) else {
            return;
        };
        let kind = if reason == FailReason::Cancelled {
            JobEventKind::Cancelled { void }
        } else {
            JobEventKind::Failed { reason, void }
        };
        let event = JobEvent {
            job_id: job.job_id,
            kind,
        };
        self.notify(job.peer, event, NOTICE_TIMEOUT);
    }
}

/// The failure of a job that no device is left to run.
pub(super) fn no_device_left() -> String {
    "every device of this provider has failed; it serves no jobs until it restarts".to_owned()
}
