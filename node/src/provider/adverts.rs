//! Adverts, queue heartbeats and the hold sweep: the provider's periodic tasks.

use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::PeerId;
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{CapacityAdvert, JobEvent, Signed, validate};

use super::queue::QueuedJob;
use super::{HOLD_SWEEP, MIN_ADVERT_GAP, Provider, QUEUE_HEARTBEAT, send_with_timeout};
use crate::network::Request;
use crate::now_ms;

/// A heartbeat not answered in this long is given up on: the next one follows.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

impl Provider {
    /// The advert of the devices serving now; `None` when none is left.
    pub(super) fn advert(&self) -> Option<CapacityAdvert> {
        let devices = &self.inner.devices;
        let info = devices.first_up()?.info.clone();
        // One job runs on one device: the fastest one's time is the best a job can get.
        let fastest = devices
            .up()
            .map(super::devices::Device::ms_per_standard)
            .min()
            .unwrap_or(1);
        let depth = {
            let q = self.lock();
            q.waiting.len() + q.running.len()
        };
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        Some(CapacityAdvert {
            seq,
            issued_at_ms: now_ms(),
            // Filled in by the advert loop, which asks the network.
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
            max_width: self.inner.devices.max_side().min(validate::MAX_DIMENSION),
            max_height: self.inner.devices.max_side().min(validate::MAX_DIMENSION),
            max_steps: validate::MAX_STEPS,
            // Images one job may ask for at the standard 1024² (or the largest side if
            // smaller); the quote checks each job's own size.
            max_images: {
                let side = self.inner.devices.max_side().min(1024);
                self.inner
                    .devices
                    .max_images(side, side)
                    .clamp(1, validate::MAX_IMAGES)
            },
            schedule: self.inner.settings.schedule,
            queue_depth: u32::try_from(depth).unwrap_or(u32::MAX),
            max_queue: self.inner.settings.max_queue,
            ms_per_standard_image: fastest,
            devices: devices.advertised(),
            step_caching: info.step_caching,
            serves_exact: info.serves_exact,
            // Every device loads the same model and LoRAs; the first one's list stands.
            loras: self
                .inner
                .devices
                .first_up()
                .map(|d| d.generator.loras())
                .unwrap_or_default()
                .into_iter()
                .take(validate::MAX_ADVERT_LORAS)
                .collect(),
        })
    }

    /// Tells every waiting job's requester, every [`QUEUE_HEARTBEAT`], where its job stands
    /// (`Accepted { position, eta }`): a queued job would otherwise hear nothing until it
    /// starts, and its requester could not tell a long queue from a provider gone silent.
    pub(super) async fn queue_heartbeat_loop(&self) {
        loop {
            tokio::time::sleep(QUEUE_HEARTBEAT).await;
            if self.crashed() || self.lock().stopping {
                return;
            }
            let events: Vec<(PeerId, JobEvent)> = {
                let q = self.lock();
                let finishes = q.finishes_ms(self.speed());
                q.waiting
                    .iter()
                    .zip(finishes)
                    .enumerate()
                    .map(|(i, (j, eta_ms))| {
                        let kind = JobEventKind::Accepted {
                            queue_position: u32::try_from(i).unwrap_or(u32::MAX),
                            eta_ms,
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
            // At most `max_queue` at once, and each waits at most HEARTBEAT_TIMEOUT.
            let mut sends = tokio::task::JoinSet::new();
            for (peer, event) in events {
                let net = self.inner.net.clone();
                sends.spawn(async move {
                    let _ = send_with_timeout(&net, peer, Request::Event(event), HEARTBEAT_TIMEOUT)
                        .await;
                });
            }
            while sends.join_next().await.is_some() {}
        }
    }

    pub(super) async fn advert_loop(&self) {
        loop {
            if self.lock().stopping {
                return;
            }
            // Where requesters can reach us: confirmed public addresses and relayed ones.
            let listen_addrs: Vec<String> = match self.inner.net.advertised_addrs().await {
                Ok(addrs) => addrs.iter().map(ToString::to_string).collect(),
                Err(_) => return,
            };
            // A provider with no device left says nothing: its last advert expires.
            let advert = self.advert().map(|mut a| {
                a.listen_addrs = listen_addrs;
                a
            });
            match advert.map(|a| Signed::sign(&self.inner.key, &a)) {
                None => {}
                Some(Ok(signed)) => {
                    if let Err(e) = self.inner.net.publish(signed).await {
                        if matches!(e, crate::network::NetError::NodeStopped) {
                            return;
                        }
                        tracing::debug!(error = %e, "advert not published");
                    }
                }
                Some(Err(e)) => tracing::error!(error = %e, "cannot sign advert"),
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

    /// Every [`HOLD_SWEEP`], voids the holds whose request has expired: their jobs leave the
    /// queue (or stop at the next step) and their requesters are told. The ledger would refuse
    /// to settle them anyway.
    pub(super) async fn hold_sweep_loop(&self) {
        loop {
            tokio::time::sleep(HOLD_SWEEP).await;
            if self.crashed() || self.lock().stopping {
                return;
            }
            let now = now_ms();
            let expired: Vec<QueuedJob> = {
                let mut q = self.lock();
                let (gone, kept): (Vec<QueuedJob>, Vec<QueuedJob>) =
                    q.waiting.drain(..).partition(|j| j.expires_at_ms <= now);
                q.waiting.extend(kept);
                gone
            };
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for j in &expired {
                    me.finish_failed(j, FailReason::HoldExpired);
                }
                // Holds of running or settling jobs expire in the ledger; the settle that
                // follows is then refused and voids nothing twice.
                let _ = me.inner.ledger.expire_holds(now);
            })
            .await;
        }
    }
}
