//! A job's progress lane: the worker hands it the job's progress events (and the previews they
//! carry) without waiting, and one task per job sends them in order, each after the last was
//! answered, so a requester sees step 2's preview before step 4's. The lane is bounded: when
//! [`LANE_DEPTH`] events wait (a slow requester), newer ones are dropped, since progress is
//! news, not money. The job's receipt is offered once its lane has drained (or after
//! [`LANE_DRAIN_TIMEOUT`]), so no preview arrives after the job has completed.

use std::time::Duration;

use libp2p::PeerId;
use pixmarket_protocol::JobEvent;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Provider, send_with_timeout};
use crate::network::Request;

/// Events waiting in one job's lane: the first step, at most three previews, the last step and
/// a few throttled steps between them.
pub(super) const LANE_DEPTH: usize = 8;
/// A progress event that is not answered in this long is given up on.
pub(super) const PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a receipt waits for its job's lane to drain: one event's timeout, so a
/// requester that does not answer progress delays only its own receipt, and by this at most.
pub(super) const LANE_DRAIN_TIMEOUT: Duration = PROGRESS_TIMEOUT;

/// The sending end of one job's lane, held by the worker while the job runs.
pub(super) struct ProgressLane {
    tx: mpsc::Sender<JobEvent>,
    task: JoinHandle<()>,
}

impl ProgressLane {
    /// Opens the lane of a job whose requester is `peer`.
    pub(super) fn open(provider: &Provider, peer: PeerId) -> Self {
        let (tx, mut rx) = mpsc::channel::<JobEvent>(LANE_DEPTH);
        let me = provider.clone();
        let task = provider.inner.runtime.spawn(async move {
            while let Some(event) = rx.recv().await {
                // Progress of a job that has ended since is stale: its requester has its
                // receipt (or gave up), and would only refuse it.
                if !me.lock().running.contains_key(&event.job_id) {
                    continue;
                }
                // The node-wide bound on progress sends in flight.
                let Ok(_permit) = me.inner.progress_slots.clone().try_acquire_owned() else {
                    continue;
                };
                let _ =
                    send_with_timeout(&me.inner.net, peer, Request::Event(event), PROGRESS_TIMEOUT)
                        .await;
            }
        });
        Self { tx, task }
    }

    /// Queues an event; dropped when the lane is full.
    pub(super) fn push(&self, event: JobEvent) {
        let _ = self.tx.try_send(event);
    }

    /// Closes the lane: the events queued are still sent; the handle ends when they are.
    pub(super) fn close(self) -> JoinHandle<()> {
        self.task
    }
}

/// Waits until a closed lane has sent what it holds, at most [`LANE_DRAIN_TIMEOUT`]; a lane
/// that takes longer is stopped.
pub(super) async fn drained(lane: Option<JoinHandle<()>>) {
    let Some(mut lane) = lane else { return };
    if tokio::time::timeout(LANE_DRAIN_TIMEOUT, &mut lane)
        .await
        .is_err()
    {
        lane.abort();
    }
}

#[cfg(test)]
mod tests {
    use pixmarket_protocol::messages::JobEventKind;
    use pixmarket_protocol::preview::{MAX_PREVIEW_BYTES, PREVIEW_MAX_SIDE};
    use pixmarket_protocol::{JobId, Preview};

    use super::*;
    use crate::network::codec::MAX_EVENT_BYTES;

    #[test]
    fn the_largest_preview_event_fits_the_event_frame() {
        let event = Request::Event(JobEvent {
            job_id: JobId([9; 16]),
            kind: JobEventKind::Progress {
                step: u32::MAX,
                of: u32::MAX,
                preview: Some(Preview {
                    width: PREVIEW_MAX_SIDE,
                    height: PREVIEW_MAX_SIDE,
                    png: vec![0xff; MAX_PREVIEW_BYTES],
                }),
            },
        });
        let bytes = pixmarket_protocol::codec::encode("event", &event, usize::MAX).unwrap();
        assert!(bytes.len() <= MAX_EVENT_BYTES, "{} bytes", bytes.len());
    }
}
