//! Admission and the requester's questions: quotes, job submissions (a repeated one answers
//! with the job's status), cancels from the job's own requester, and `Status`.

use std::time::Instant;

use libp2p::PeerId;
use pixmarket_ledger::{JobOutcome, LedgerError, Role};
use pixmarket_protocol::messages::{FailReason, ValidationErrorWire};
use pixmarket_protocol::{
    JobId, JobRequest, JobStatus, MeteredUnits, MicroTokens, Mode, Quote, QuoteRequest, Signed,
    metering,
};

use super::queue::{QueuedJob, work_ppm};
use super::{Provider, refuse};
use crate::generator::GeneratorInfo;
use crate::network::Response;
use crate::now_ms;

/// Quotes are good for this long.
const QUOTE_VALIDITY_MS: u64 = 60_000;

impl Provider {
    fn meter(
        &self,
        prompt: &str,
        units_of: impl FnOnce(u32) -> MeteredUnits,
    ) -> Result<(MeteredUnits, MicroTokens), FailReason> {
        let device = self
            .inner
            .devices
            .first_up()
            .ok_or_else(|| FailReason::Engine(super::worker::no_device_left()))?;
        let tokens = device
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

    /// Refuses a size, or a number of images at that size, larger than the generators'
    /// memory plans run ([`crate::generator::Generator::max_side`] and `max_images`).
    fn fits_memory(&self, width: u32, height: u32, images: u32) -> Result<(), FailReason> {
        let max_side = self.inner.devices.max_side();
        let max_images = if width.max(height) > max_side {
            0
        } else {
            self.inner.devices.max_images(width, height)
        };
        if images > max_images {
            return Err(FailReason::TooLarge {
                width,
                height,
                images,
                max_side,
                max_images: max_images.min(pixmarket_protocol::validate::MAX_IMAGES),
            });
        }
        Ok(())
    }

    /// Refuses a LoRA no serving device offers (every device loads the same list).
    fn offers_lora(&self, lora: Option<&pixmarket_protocol::Hash>) -> Result<(), FailReason> {
        let Some(hash) = lora else {
            return Ok(());
        };
        let offered = self
            .inner
            .devices
            .first_up()
            .is_some_and(|d| d.generator.loras().iter().any(|l| l.hash == *hash));
        if offered {
            Ok(())
        } else {
            Err(FailReason::LoraUnavailable { hash: *hash })
        }
    }

    pub(super) fn quote(&self, signed: &Signed<QuoteRequest>) -> Response {
        let Ok(q) = signed.verify() else {
            return refuse(FailReason::BadSignature);
        };
        if q.provider != self.inner.key.public() {
            return refuse(FailReason::WrongProvider);
        }
        if let Err(e) = q.validate() {
            return refuse(FailReason::Invalid(e.into()));
        }
        let Some(device) = self.inner.devices.first_up() else {
            return refuse(FailReason::Engine(super::worker::no_device_left()));
        };
        let info = &device.info;
        if q.exact && !info.serves_exact {
            return refuse(FailReason::ExactUnavailable {
                offered: info.step_caching,
            });
        }
        if let Err(r) = self.fits_memory(q.width, q.height, q.images) {
            return refuse(r);
        }
        if let Err(r) = self.offers_lora(q.lora.as_ref()) {
            return refuse(r);
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
                q.wait_ms(self.speed()),
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
            step_caching: info.step_caching.for_job(q.exact),
        };
        match Signed::sign(&self.inner.key, &quote) {
            Ok(s) => Response::Quote(s),
            Err(e) => refuse(FailReason::Engine(e.to_string())),
        }
    }

    pub(super) fn admit(&self, peer: PeerId, signed: Signed<JobRequest>) -> Response {
        let Ok(req) = signed.verify() else {
            tracing::warn!(%peer, "refused job: bad signature");
            return refuse(FailReason::BadSignature);
        };
        // Events go back to the connection's peer, so it must be the signer.
        if signed.signer().to_peer_id() != peer {
            tracing::warn!(%peer, "refused job: relayed request (signer is not the sender)");
            return refuse(FailReason::BadSignature);
        }
        // A job id seen before: the same requester asking again (its first answer was lost)
        // hears where the job stands; anyone else is refused.
        if let Some(answer) = self.resubmitted(peer, &signed, req.job_id) {
            return answer;
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
        let Some(device) = self.inner.devices.first_up() else {
            return refuse(FailReason::Engine(super::worker::no_device_left()));
        };
        let info = &device.info;
        if !mode_supported(&req.params.mode, info) {
            tracing::warn!(%peer, mode = req.params.mode.name(), "refused job: mode not supported");
            return refuse(FailReason::Unsupported(req.params.mode.name().to_owned()));
        }
        if req.params.exact && !info.serves_exact {
            tracing::warn!(%peer, "refused job: exact computation required, not offered");
            return refuse(FailReason::ExactUnavailable {
                offered: info.step_caching,
            });
        }
        if let Err(r) = self.fits_memory(req.params.width, req.params.height, req.params.images) {
            tracing::warn!(%peer, width = req.params.width, height = req.params.height, images = req.params.images, "refused job: larger than the memory plan allows");
            return refuse(r);
        }
        if let Err(r) = self.offers_lora(req.params.lora.as_ref().map(|l| &l.hash)) {
            tracing::warn!(%peer, "refused job: names a LoRA not offered here");
            return refuse(r);
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
        // Reserve a place, then write the hold with the queue unlocked: the hold waits for an
        // fsync, and the worker and every other admission need the lock meanwhile.
        {
            let mut q = self.lock();
            if q.stopping {
                return refuse(FailReason::ShuttingDown);
            }
            if q.waiting.len() + q.reserved >= self.inner.settings.max_queue as usize {
                let retry_after_ms = q.wait_ms(self.speed()).max(1000);
                return refuse(FailReason::Busy { retry_after_ms });
            }
            q.reserved += 1;
        }
        // The hold is durable before the job can run; the ledger refuses duplicates ever seen.
        let held = self.inner.ledger.hold_request(&signed, now);
        let mut q = self.lock();
        q.reserved = q.reserved.saturating_sub(1);
        if let Err(e) = held {
            drop(q);
            if let LedgerError::DuplicateJob { .. } = e
                && let Some(answer) = self.resubmitted(peer, &signed, req.job_id)
            {
                return answer;
            }
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
        if q.stopping {
            // Stopped while the hold was written: the worker has drained the queue already.
            drop(q);
            let _ = self
                .inner
                .ledger
                .void(req.job_id, &FailReason::ShuttingDown.to_string());
            return refuse(FailReason::ShuttingDown);
        }
        if self.inner.devices.first_up().is_none() {
            // The last device failed while the hold was written, and its worker has drained
            // the queue already (it marks the device down before it takes the lock to drain).
            drop(q);
            let reason = FailReason::Engine(super::worker::no_device_left());
            let _ = self.inner.ledger.void(req.job_id, &reason.to_string());
            return refuse(reason);
        }
        let position = u32::try_from(q.waiting.len()).unwrap_or(u32::MAX);
        let eta_ms = q.finish_ms(work_ppm(&req.params), self.speed());
        q.waiting.push_back(QueuedJob {
            job_id: req.job_id,
            peer,
            requester: signed.signer(),
            request: signed.clone(),
            params: req.params,
            previews: req.previews,
            units,
            cost,
            expires_at_ms: req.expires_at_ms,
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

    /// The answer to a submission of a job id this provider already knows: its status for the
    /// same requester and the same signed request, a `Duplicate` refusal for anyone else.
    fn resubmitted(
        &self,
        peer: PeerId,
        signed: &Signed<JobRequest>,
        job: JobId,
    ) -> Option<Response> {
        let known = self.inner.ledger.job(Role::Provider, job).ok().flatten()?;
        let same = match known {
            JobOutcome::Held => self
                .inner
                .ledger
                .holds()
                .ok()?
                .into_iter()
                .find(|(j, _)| *j == job)
                .is_some_and(|(_, h)| h.request_hash == Some(signed.digest())),
            _ => self
                .inner
                .ledger
                .receipt(Role::Provider, job)
                .ok()
                .flatten()
                .map_or(Self::requester_of(&peer) == Some(signed.signer()), |r| {
                    r.receipt
                        .verify()
                        .is_ok_and(|b| b.request_hash == signed.digest())
                }),
        };
        Some(if same && signed.signer().to_peer_id() == peer {
            Response::Status(self.status(peer, job))
        } else {
            refuse(FailReason::Duplicate)
        })
    }

    /// Cancels a job of the asking peer: removed from the queue (and voided), or stopped at
    /// the next step when running. Another peer's job is left alone.
    pub(super) fn cancel(&self, peer: PeerId, job: JobId) -> Response {
        let Some(requester) = Self::requester_of(&peer) else {
            return refuse(FailReason::BadSignature);
        };
        let mut q = self.lock();
        if let Some(i) = q
            .waiting
            .iter()
            .position(|j| j.job_id == job && j.requester == requester)
        {
            let Some(j) = q.waiting.remove(i) else {
                return Response::Ok;
            };
            drop(q);
            self.finish_failed(&j, FailReason::Cancelled);
            return Response::Ok;
        }
        if q.running
            .get(&job)
            .is_some_and(|r| r.requester == requester)
        {
            q.cancelled.insert(job);
        }
        Response::Ok
    }

    /// Where `job` stands, for its requester `peer`.
    pub(super) fn status(&self, peer: PeerId, job: JobId) -> JobStatus {
        let Some(requester) = Self::requester_of(&peer) else {
            return JobStatus::Unknown;
        };
        {
            let q = self.lock();
            if let Some(i) = q
                .waiting
                .iter()
                .position(|j| j.job_id == job && j.requester == requester)
            {
                let finishes = q.finishes_ms(self.speed());
                return JobStatus::Queued {
                    position: u32::try_from(i).unwrap_or(u32::MAX),
                    eta_ms: finishes.get(i).copied().unwrap_or(0),
                };
            }
            if let Some(r) = q.running.get(&job).filter(|r| r.requester == requester) {
                return JobStatus::Running {
                    step: r.step,
                    of: r.of,
                };
            }
        }
        let ledger = &self.inner.ledger;
        let outcome = match ledger.job(Role::Provider, job) {
            Ok(Some(o)) => o,
            _ => return JobStatus::Unknown,
        };
        let mine = |r: &pixmarket_ledger::StoredReceipt| {
            r.receipt.verify().is_ok_and(|b| b.requester == requester)
        };
        match outcome {
            // Computed, being settled or about to start: the delivery lane is on it.
            JobOutcome::Held => {
                let holder = ledger
                    .holds()
                    .ok()
                    .and_then(|h| h.into_iter().find(|(j, _)| *j == job))
                    .map(|(_, h)| h.requester);
                if holder == Some(requester) {
                    JobStatus::Running { step: 0, of: 0 }
                } else {
                    JobStatus::Unknown
                }
            }
            JobOutcome::Settled { .. } => match ledger.receipt(Role::Provider, job) {
                Ok(Some(r)) if mine(&r) => {
                    if r.ack.is_some() {
                        JobStatus::Acknowledged { receipt: r.receipt }
                    } else {
                        JobStatus::Completed { receipt: r.receipt }
                    }
                }
                _ => JobStatus::Unknown,
            },
            JobOutcome::Credited { .. } => match ledger.credit_note(Role::Provider, job) {
                Ok(Some(note)) if note.verify().is_ok_and(|n| n.requester == requester) => {
                    JobStatus::Credited { note }
                }
                _ => JobStatus::Unknown,
            },
            JobOutcome::Voided
            | JobOutcome::Expired
            | JobOutcome::Refunded { .. }
            | JobOutcome::Undelivered { .. } => {
                let void = self.recent_void(job).or_else(|| {
                    let why = match outcome {
                        JobOutcome::Expired => FailReason::HoldExpired.to_string(),
                        _ => "the job was voided".to_owned(),
                    };
                    self.sign_void(job, &why)
                });
                match void {
                    Some(v) => JobStatus::Voided(v),
                    None => JobStatus::Unknown,
                }
            }
        }
    }
}

/// Whether this provider's generator can run `mode` (as its advert says).
pub(super) fn mode_supported(mode: &Mode, info: &GeneratorInfo) -> bool {
    match mode {
        Mode::TextToImage => true,
        Mode::ImageToImage { .. } => info.supports_image_to_image,
        Mode::Inpaint { .. } => info.supports_inpaint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_advertised_modes_are_admitted() {
        let info = GeneratorInfo {
            model_id: "m".into(),
            precision: "f32".into(),
            device_name: "cpu".into(),
            device_memory_mib: 0,
            supports_image_to_image: true,
            supports_inpaint: false,
            step_caching: pixmarket_protocol::StepCaching::Exact,
            serves_exact: true,
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
