//! Telling a provider that a job was abandoned midway: a `generate` call dropped before its
//! attempt ended (Ctrl-C in the CLI, a caller's timeout, the API aborting its task) sends the
//! provider a best-effort `Cancel`, so it stops computing a job nobody will acknowledge.
//!
//! - [`CancelOnDrop`] is armed once a job is submitted and disarmed when the attempt returns;
//!   dropped while armed, it spawns one `Cancel` bounded by [`CANCEL_TIMEOUT`].
//! - The spawned cancels are kept in a bounded set ([`MAX_PENDING_CANCELS`]) that
//!   [`Requester::abandoned`](super::Requester::abandoned) drains, so a process about to exit
//!   can wait for their answers.
//!
//! A `Cancel` carries only the job id: the provider honours it only from the connection of
//! the job's requester, whose ed25519 identity the transport's handshake proved, so no third
//! party can cancel someone else's job (docs/protocol.md, "Cancel"). It moves no money: the
//! provider voids the hold (a signed void), and a receipt that was never acknowledged is
//! never paid.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use pixmarket_protocol::JobId;
use tokio::task::JoinSet;

use crate::network::{Client, Request, Response};

/// How long an abandoned job's `Cancel` waits for the provider's answer: one small round
/// trip, with room for a slow link; past it the provider still frees the job when its request
/// expires.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// Cancels in flight at once: far more than the jobs one node runs at a time (the API's job
/// table is smaller), so only a caller that drops thousands of jobs in five seconds loses
/// some, which then end at their requests' expiry as before.
const MAX_PENDING_CANCELS: usize = 256;

/// The cancel sent for a job whose `generate` call was dropped midway, and what came of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentCancel {
    pub provider: PeerId,
    pub job: JobId,
    /// The provider answered the cancel within [`CANCEL_TIMEOUT`].
    pub answered: bool,
}

/// Cancels spawned for abandoned jobs, not yet collected.
pub(super) type PendingCancels = Arc<Mutex<JoinSet<SentCancel>>>;

/// Sends `Cancel` for the job it is armed with if it is dropped before [`Self::disarm`].
pub(super) struct CancelOnDrop {
    net: Client,
    pending: PendingCancels,
    job: Option<(PeerId, JobId)>,
}

impl CancelOnDrop {
    pub(super) fn new(net: Client, pending: PendingCancels) -> Self {
        Self {
            net,
            pending,
            job: None,
        }
    }

    /// From now on a drop cancels `job` at `peer`.
    pub(super) fn arm(&mut self, peer: PeerId, job: JobId) {
        self.job = Some((peer, job));
    }

    /// The attempt ended: nothing to cancel.
    pub(super) fn disarm(&mut self) {
        self.job = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some((provider, job)) = self.job.take() else {
            return;
        };
        // Outside a runtime (it is shutting down) nothing can be sent; the job then ends at
        // its request's expiry, unpaid.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        while pending.try_join_next().is_some() {}
        if pending.len() >= MAX_PENDING_CANCELS {
            tracing::warn!(%provider, %job, "too many cancels in flight; this job ends at its expiry");
            return;
        }
        let net = self.net.clone();
        tracing::debug!(%provider, %job, "job abandoned midway; asking the provider to cancel it");
        pending.spawn_on(
            async move {
                let answer = tokio::time::timeout(
                    CANCEL_TIMEOUT,
                    net.request(provider, Request::Cancel(job)),
                )
                .await;
                SentCancel {
                    provider,
                    job,
                    answered: matches!(answer, Ok(Ok(Response::Ok))),
                }
            },
            &runtime,
        );
    }
}

/// Waits for every pending cancel's answer (each bounded by [`CANCEL_TIMEOUT`]).
pub(super) async fn collect(pending: &PendingCancels) -> Vec<SentCancel> {
    let mut set = match pending.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(_) => return Vec::new(),
    };
    let mut sent = Vec::new();
    while let Some(done) = set.join_next().await {
        if let Ok(s) = done {
            sent.push(s);
        }
    }
    sent
}
