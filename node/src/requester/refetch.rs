//! Asking again for the images of a job this node already paid for: a result marked
//! undelivered (the provider held it past our fetch deadline: a slow link, a saturated node, a
//! restart of ours) while the provider still keeps it ([`RESULT_KEPT`]), or a delivered job's
//! images lost on our side. The provider answers a repeated `Fetch` with the same images and
//! charges nothing again (docs/protocol.md, "Fair exchange"); our books only ever gain an
//! entry: a late delivery is a new `DeliveredLate` after the undelivered mark, never a rewind.

use std::time::Duration;

use libp2p::PeerId;
use pixmarket_ledger::{LedgerError, Role};
use pixmarket_protocol::{JobId, MicroTokens};

use super::exchange::NoImages;
use super::{Outcome, Requester};

/// How long an honest provider keeps a delivered result for `Fetch`: past it a re-fetch can
/// only be answered "gone".
pub const RESULT_KEPT: Duration = crate::provider::RESULT_RETENTION;

/// Why the images of a paid job could not be fetched again. Nothing is paid by trying.
#[derive(Debug, thiserror::Error)]
pub enum RefetchError {
    #[error("job {0} is not a job this node bought (no receipt of it in the requester's books)")]
    Unknown(JobId),
    #[error(
        "job {job} was never paid ({state}), so there are no images to fetch; only an acknowledged receipt's images can be fetched"
    )]
    NotPaid { job: JobId, state: String },
    #[error(
        "provider {provider} credited job {job} back (it never got our ack): nothing was paid and there are no images"
    )]
    Credited { provider: PeerId, job: JobId },
    #[error(
        "provider {provider} did not send the images of job {job}, paid {cost} tokens, again ({reason}){}",
        if *.marked { "; it stays marked undelivered" } else { "" }
    )]
    Undelivered {
        provider: PeerId,
        job: JobId,
        cost: MicroTokens,
        reason: String,
        /// The job was marked undelivered before this try (else it had been delivered once).
        marked: bool,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the stored receipt of the job does not verify")]
    BadReceipt(#[from] pixmarket_protocol::VerifyError),
    #[error("this node stopped while recording the delivery")]
    Stopped,
}

/// A paid job's images, fetched again.
#[derive(Debug)]
pub struct Refetched {
    pub outcome: Outcome,
    /// The job had been marked undelivered and now counts as delivered (`DeliveredLate`).
    pub delivered_late: bool,
}

impl Requester {
    /// Fetches the images of `job`, which this node acknowledged (and so paid for), from the
    /// provider whose receipt it holds, for at most `fetch_deadline`. A job marked
    /// undelivered counts as delivered from then on, in the books and in the provider's
    /// standing; one whose images still do not come stays as it was.
    pub async fn refetch(
        &self,
        job: JobId,
        fetch_deadline: Duration,
    ) -> Result<Refetched, RefetchError> {
        let ledger = self.ledger.clone();
        // The stored receipt carries the job's outcome: `refunded` when it was credited back,
        // `undelivered` when it is marked so.
        let stored = tokio::task::spawn_blocking(move || ledger.receipt(Role::Requester, job))
            .await
            .map_err(|_| RefetchError::Stopped)??;
        let Some(stored) = stored else {
            return Err(RefetchError::Unknown(job));
        };
        let provider = stored.receipt.signer();
        let peer = provider.to_peer_id();
        // Our own books hold only receipts checked when they were stored.
        let body = stored.receipt.verify()?;
        if let Some(reason) = &stored.refunded {
            return Err(RefetchError::NotPaid {
                job,
                state: format!("credited back: {reason}"),
            });
        }
        let Some(ack) = stored.ack else {
            return Err(RefetchError::NotPaid {
                job,
                state: "never acknowledged".to_owned(),
            });
        };
        let was_undelivered = stored.undelivered.is_some();
        let images = match self
            .fetch_images(peer, provider, fetch_deadline, &body, &ack)
            .await
        {
            Ok(images) => images,
            Err(NoImages::Credited) => {
                return Err(RefetchError::Credited {
                    provider: peer,
                    job,
                });
            }
            Err(NoImages::Undelivered(reason)) => {
                return Err(RefetchError::Undelivered {
                    provider: peer,
                    job,
                    cost: body.cost,
                    reason,
                    marked: was_undelivered,
                });
            }
        };
        if was_undelivered {
            let ledger = self.ledger.clone();
            tokio::task::spawn_blocking(move || ledger.mark_delivered_late(job))
                .await
                .map_err(|_| RefetchError::Stopped)??;
            self.note_delivered_late(&provider);
            self.metrics.job("delivered_late");
        }
        let path = self
            .net
            .path_to(peer)
            .await
            .unwrap_or(crate::network::PathKind::NotConnected);
        Ok(Refetched {
            outcome: Outcome {
                provider: peer,
                images,
                receipt: stored.receipt,
                ack,
                cost: body.cost,
                attempts: 1,
                path,
            },
            delivered_late: was_undelivered,
        })
    }
}
