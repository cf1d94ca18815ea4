//! The requester's side of one job with one provider (docs/protocol.md "Fair exchange"):
//! quote, submission, waiting (asking for the status after a silence), the receipt's check,
//! the chain's sync, the ack and the fetch of the images. Every message is re-sent with the
//! same ids until it is answered; only a typed or signed final answer ends the exchange.

use std::time::Duration;

use libp2p::PeerId;
use pixmarket_ledger::{LedgerError, Role};
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::preview;
use pixmarket_protocol::{
    ChainEntry, JobEvent, JobId, JobParams, JobRequest, JobStatus, PublicKey, Quote, QuoteId,
    QuoteRequest, Receipt, ReceiptAck, ReceiptRefusal, Signed, StepCaching,
};
use tokio::sync::mpsc;

use super::cancel::CancelOnDrop;
use super::check::{check_images, check_receipt};
use super::failure::{FailedAttempt, Failure, FailureKind};
use super::previews::PreviewGate;
use super::{
    GenerateError, GenerateOptions, JOB_EVENT_QUEUE, JobProgress, Outcome, Requester, RouteGuard,
    standing,
};
use crate::network::{Request, Response, ResponseChannel};
use crate::now_ms;

/// Times a quote or a submission is sent before the provider counts as unreachable.
const SEND_ATTEMPTS: u32 = 4;
/// The first wait before a message is re-sent; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest `Busy` hint obeyed at once; a longer wait is the provider's queue, and the
/// caller is better served elsewhere.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(10);
/// A request that carries or fetches images (`Job`, `Fetch`) waits this long for its answer
/// before it is re-sent: up to 32 MiB in or 64 MiB out must fit on an ordinary link.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A small request (`Quote`, `Status`, `Chain`) waits this long: its round trip takes
/// milliseconds, so a lost one is re-sent soon rather than after the network's whole timeout.
const SMALL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the images are asked for after our ack before the result counts as undelivered
/// (the default of [`GenerateOptions::fetch_deadline`](super::GenerateOptions)): the provider
/// keeps them for ten minutes, and a lost answer is simply asked again.
pub const FETCH_DEADLINE: Duration = Duration::from_secs(120);
/// Chain answers followed at most in one sync (each holds up to 64 entries).
const MAX_CHAIN_PAGES: usize = 64;
/// Idle periods in a row without any answer to `Status` (the provider unreachable, or dropping
/// the question unanswered; a timeout, which may be a lost message, does not count) after which
/// the job is abandoned before its expiry. Nothing is owed: an abandoned job's receipt is never
/// acknowledged, and its provider credits it.
const UNREACHABLE_ROUNDS: u32 = 3;
/// A request is valid for at least this many times the provider's expected wait and run.
const VALIDITY_PER_EXPECTED: u64 = 4;
/// The longest validity asked for: the protocol allows an hour ahead; a minute is left for
/// clock skew.
const MAX_VALIDITY_MS: u64 = pixmarket_protocol::validate::MAX_EXPIRY_AHEAD_MS - 60_000;
/// Clock skew allowed before a request counts as expired on the provider's side too.
const EXPIRY_MARGIN_MS: u64 = 5_000;

/// Why a quote was not usable.
#[derive(Debug, thiserror::Error)]
enum QuoteError {
    #[error("cannot sign the quote request")]
    Sign(#[source] pixmarket_protocol::EncodeError),
    #[error("quote refused: {0}")]
    Refused(FailReason),
    #[error("unexpected answer to a quote: {0}")]
    Unexpected(String),
    #[error("no answer to the quote: {0}")]
    NoAnswer(Unanswered),
    #[error("the quote's signature does not verify")]
    BadSignature(#[source] pixmarket_protocol::VerifyError),
    #[error("quote answers another request")]
    OtherRequest,
    #[error("quote price: {0}")]
    Price(pixmarket_protocol::CostMismatch),
    #[error("quote meters {got}, expected {want}")]
    Units { got: String, want: String },
    #[error("quote meters {quoted} prompt tokens; our own tokenizer counts {mine}")]
    InflatedTokens { quoted: u32, mine: u32 },
    #[error("exact computation required, the quote offers {0}")]
    NotExact(StepCaching),
}

impl From<QuoteError> for Failure {
    fn from(e: QuoteError) -> Self {
        let message = e.to_string();
        match e {
            QuoteError::Refused(r) => Failure::refused(r, message),
            QuoteError::NoAnswer(u) => Failure::new(u.kind, message),
            QuoteError::Sign(_) => Failure::new(FailureKind::Local, message),
            QuoteError::Unexpected(_)
            | QuoteError::BadSignature(_)
            | QuoteError::OtherRequest
            | QuoteError::Price(_)
            | QuoteError::Units { .. }
            | QuoteError::InflatedTokens { .. }
            | QuoteError::NotExact(_) => Failure::new(FailureKind::BadAnswer, message),
        }
    }
}

/// Why a checked receipt could not be stored with our ack.
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error("cannot sign the ack")]
    Sign(#[source] pixmarket_protocol::EncodeError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("this node stopped while storing the receipt")]
    Stopped,
}

/// How asking for an acknowledged job's images ended without them.
#[derive(Debug)]
pub(super) enum NoImages {
    /// The provider credited the receipt back (it never got our ack), so nothing is owed; the
    /// credit note is in our books once the chain sync that followed reached the provider.
    Credited,
    /// Why the images did not come: a mismatch, the provider no longer has them, or the
    /// deadline passed.
    Undelivered(String),
}

/// What one chain sync with a provider did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainSync {
    /// Credit notes recorded.
    pub learned: usize,
    /// The provider answered that nothing follows our head: our chain with it is whole. False
    /// when it did not answer, or sent an entry our books refused.
    pub caught_up: bool,
}

/// Why a request got no answer.
#[derive(Debug)]
struct Unanswered {
    /// The last try timed out: the message may have been lost, or the answer.
    timed_out: bool,
    /// `Busy` (the last answer), `Unreachable`, or `Local` (this node stopped).
    kind: FailureKind,
    reason: String,
}

impl Unanswered {
    fn gone(reason: &str) -> Self {
        Self {
            timed_out: false,
            kind: FailureKind::Local,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Why an attempt at one provider ended without a result, and whether failing over is safe.
pub(super) enum Attempt {
    /// Nothing is owed: try the next provider.
    FailOver(Failure),
    /// The provider took our ack and sent no images: one job's cost is lost; stop here.
    Undelivered(Box<GenerateError>),
}

fn fail(kind: FailureKind, reason: impl Into<String>) -> Attempt {
    Attempt::FailOver(Failure::new(kind, reason))
}

/// A typed refusal from the provider, shown as `refused: {reason}`.
fn refused(reason: FailReason) -> Attempt {
    let message = format!("refused: {reason}");
    Attempt::FailOver(Failure::refused(reason, message))
}

impl Requester {
    /// Handles a job event from a provider: routes it to the waiting job, answers a repeated
    /// `Completed` whose receipt we already stored with our stored ack, and refuses (signed)
    /// a receipt for a job we are not waiting on.
    pub async fn on_event(&self, peer: PeerId, event: JobEvent, channel: ResponseChannel) {
        if let JobEventKind::Completed { receipt } = &event.kind
            && receipt.signer().to_peer_id() == peer
            && let Some(ack) = self.stored_ack(event.job_id, receipt)
        {
            let _ = self
                .net
                .respond(channel, Response::EventAck(Some(ack)))
                .await;
            return;
        }
        let route = self
            .routes
            .lock()
            .ok()
            .and_then(|r| r.get(&event.job_id).cloned());
        match route {
            Some((provider, tx)) if provider == peer => {
                if let Err(
                    mpsc::error::TrySendError::Full((_, channel))
                    | mpsc::error::TrySendError::Closed((_, channel)),
                ) = tx.try_send((event, channel))
                {
                    // Transient: the provider re-sends after the hint.
                    let busy = FailReason::Busy {
                        retry_after_ms: 500,
                    };
                    let _ = self.net.respond(channel, Response::Refused(busy)).await;
                }
            }
            _ => {
                if let JobEventKind::Completed { receipt } = &event.kind {
                    tracing::warn!(%peer, job = %event.job_id, "refusing a receipt for a job we are not waiting on");
                    let answer =
                        match self.refusal(event.job_id, receipt, "not waiting for this job") {
                            Some(r) => Response::ReceiptRefused(r),
                            None => Response::Refused(FailReason::Duplicate),
                        };
                    let _ = self.net.respond(channel, answer).await;
                    return;
                }
                // Late progress or queue news of a job that ended or failed over: expected.
                tracing::debug!(%peer, job = %event.job_id, "news of a job we are not waiting on");
                let reason =
                    FailReason::Invalid(pixmarket_protocol::messages::ValidationErrorWire {
                        field: "job_id".into(),
                        got: event.job_id.to_string(),
                        allowed: "a job this requester is waiting on, from its provider".into(),
                    });
                let _ = self.net.respond(channel, Response::Refused(reason)).await;
            }
        }
    }

    /// Our stored ack of `receipt`, if we stored that very receipt.
    fn stored_ack(&self, job: JobId, receipt: &Signed<Receipt>) -> Option<Signed<ReceiptAck>> {
        let stored = self.ledger.receipt(Role::Requester, job).ok().flatten()?;
        (stored.receipt == *receipt).then_some(stored.ack).flatten()
    }

    fn refusal(
        &self,
        job: JobId,
        receipt: &Signed<Receipt>,
        why: &str,
    ) -> Option<Signed<ReceiptRefusal>> {
        let body = ReceiptRefusal {
            job_id: job,
            receipt_hash: receipt.digest(),
            reason: why
                .chars()
                .take(pixmarket_protocol::validate::MAX_MEMO_CHARS)
                .collect(),
            refused_at_ms: now_ms(),
        };
        Signed::sign(&self.key, &body).ok()
    }

    /// Generates through the market, failing over between providers. `progress` sees quotes,
    /// queue positions, steps and failovers.
    pub async fn generate(
        &self,
        params: JobParams,
        options: GenerateOptions,
        progress: &mut (dyn FnMut(JobProgress) + Send),
    ) -> Result<Outcome, GenerateError> {
        params.validate()?;
        let candidates: Vec<PeerId> = match options.provider {
            Some(p) => vec![p],
            // Only providers that offer the job's LoRA (by its file's hash) can run it.
            None => self.candidates(options.selection, params.lora.as_ref().map(|l| l.hash)),
        };
        if candidates.is_empty() {
            return Err(GenerateError::NoProviders);
        }
        let mut reasons = Vec::new();
        for (attempt, peer) in candidates
            .into_iter()
            .take(options.max_attempts.max(1))
            .enumerate()
        {
            let Ok(key) = PublicKey::from_peer_id(&peer) else {
                reasons.push(FailedAttempt {
                    provider: peer,
                    failure: Failure::new(FailureKind::NotAProvider, "not an ed25519 peer id"),
                });
                continue;
            };
            let started = tokio::time::Instant::now();
            match self
                .try_provider(peer, key, &params, &options, progress)
                .await
            {
                Ok(mut outcome) => {
                    outcome.attempts = attempt + 1;
                    // Which path the job took (direct, hole-punched, relayed), for operators.
                    if let Ok(path) = self.net.path_to(peer).await {
                        outcome.path = path;
                    }
                    tracing::info!(provider = %peer, path = outcome.path.as_str(), "job delivered");
                    // Measured here, submission to images: the provider's claims play no part.
                    let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let units = outcome.receipt.verify().map(|r| r.units).ok();
                    self.note_delivered(&key, units.and_then(|u| standing::per_standard(took, &u)));
                    self.metrics.job("paid");
                    self.metrics.spent(outcome.cost);
                    return Ok(outcome);
                }
                Err(Attempt::Undelivered(e)) => {
                    self.metrics.job("undelivered");
                    self.metrics.spent(match &*e {
                        GenerateError::Undelivered { cost, .. } => *cost,
                        _ => pixmarket_protocol::MicroTokens::ZERO,
                    });
                    return Err(*e);
                }
                Err(Attempt::FailOver(failure)) => {
                    tracing::warn!(%peer, reason = %failure, "provider failed; failing over");
                    self.note_failure(&key);
                    progress(JobProgress::FailingOver {
                        provider: peer,
                        reason: failure.message.clone(),
                    });
                    reasons.push(FailedAttempt {
                        provider: peer,
                        failure,
                    });
                }
            }
        }
        Err(GenerateError::AllFailed(reasons))
    }

    /// Sends `request` until it is answered (at most [`SEND_ATTEMPTS`] times), waiting out
    /// `Busy` hints up to [`MAX_BUSY_WAIT`]. `None`: no answer at all. With `persist` false, a
    /// peer the network cannot reach at all (refused, partitioned: an error before any
    /// timeout) ends the tries at once: used for the quote and the first submission, where
    /// nothing is at stake yet and the caller is better served by the next provider.
    async fn ask_with(
        &self,
        peer: PeerId,
        request: Request,
        persist: bool,
    ) -> Result<Response, Unanswered> {
        let mut backoff = FIRST_BACKOFF;
        let mut last = Unanswered {
            timed_out: true,
            kind: FailureKind::Unreachable,
            reason: "no answer".into(),
        };
        for _ in 0..SEND_ATTEMPTS {
            if self.net.is_stopped() {
                return Err(Unanswered::gone("this node stopped"));
            }
            let limit = match request {
                Request::Job(_) | Request::Fetch(_) => ATTEMPT_TIMEOUT,
                _ => SMALL_ATTEMPT_TIMEOUT,
            };
            let wait =
                match tokio::time::timeout(limit, self.net.request(peer, request.clone())).await {
                    Ok(Ok(Response::Refused(FailReason::Busy { retry_after_ms })))
                        if Duration::from_millis(retry_after_ms) <= MAX_BUSY_WAIT =>
                    {
                        last = Unanswered {
                            timed_out: true,
                            kind: FailureKind::Busy { retry_after_ms },
                            reason: format!("busy (retry after {retry_after_ms} ms)"),
                        };
                        Duration::from_millis(retry_after_ms)
                    }
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(crate::network::NetError::NodeStopped)) => {
                        return Err(Unanswered::gone("this node stopped"));
                    }
                    Ok(Err(e)) => {
                        let timed_out = matches!(e, crate::network::NetError::Timeout { .. });
                        last = Unanswered {
                            timed_out,
                            kind: FailureKind::Unreachable,
                            reason: e.to_string(),
                        };
                        // Refused, partitioned, no route: not a lost message. A timeout is retried.
                        if !persist && !timed_out {
                            return Err(last);
                        }
                        backoff
                    }
                    Err(_) => {
                        last = Unanswered {
                            timed_out: true,
                            kind: FailureKind::Unreachable,
                            reason: format!("no answer within {} s", limit.as_secs()),
                        };
                        backoff
                    }
                };
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Err(last)
    }

    async fn ask(&self, peer: PeerId, request: Request) -> Option<Response> {
        self.ask_with(peer, request, true).await.ok()
    }

    async fn quote(
        &self,
        peer: PeerId,
        key: PublicKey,
        params: &JobParams,
    ) -> Result<Quote, QuoteError> {
        let qr = QuoteRequest {
            quote_id: QuoteId::random(),
            provider: key,
            prompt: params.prompt.clone(),
            width: params.width,
            height: params.height,
            steps: params.steps,
            images: params.images,
            strength_permille: params.mode.strength_permille(),
            exact: params.exact,
            lora: params.lora.map(|l| l.hash),
        };
        let signed = Signed::sign(&self.key, &qr).map_err(QuoteError::Sign)?;
        let quote = match self.ask_with(peer, Request::Quote(signed), false).await {
            Ok(Response::Quote(q)) if q.signer() == key => {
                q.verify().map_err(QuoteError::BadSignature)?
            }
            Ok(Response::Refused(r)) => return Err(QuoteError::Refused(r)),
            Ok(other) => return Err(QuoteError::Unexpected(format!("{other:?}"))),
            Err(e) => return Err(QuoteError::NoAnswer(e)),
        };
        if quote.quote_id != qr.quote_id || quote.requester != self.key.public() {
            return Err(QuoteError::OtherRequest);
        }
        if params.exact && quote.step_caching != StepCaching::Exact {
            return Err(QuoteError::NotExact(quote.step_caching));
        }
        quote.check_cost().map_err(QuoteError::Price)?;
        let want = params.metered_units(quote.units.prompt_tokens);
        if quote.units != want {
            return Err(QuoteError::Units {
                got: format!("{:?}", quote.units),
                want: format!("{want:?}"),
            });
        }
        // The receipt must meter what the quote did, so checking the quote's count covers it.
        if let Some(mine) = self.own_token_count(&key, &params.prompt)
            && quote.units.prompt_tokens > mine
        {
            return Err(QuoteError::InflatedTokens {
                quoted: quote.units.prompt_tokens,
                mine,
            });
        }
        Ok(quote)
    }

    /// One attempt at `peer`. Dropped before it ends (Ctrl-C, a caller's timeout, an aborted
    /// task), it tells the provider to cancel the submitted job ([`CancelOnDrop`]).
    pub(super) async fn try_provider(
        &self,
        peer: PeerId,
        key: PublicKey,
        params: &JobParams,
        options: &GenerateOptions,
        progress: &mut (dyn FnMut(JobProgress) + Send),
    ) -> Result<Outcome, Attempt> {
        let mut cancel = CancelOnDrop::new(self.net.clone(), self.cancels.clone());
        let ended = self
            .attempt(peer, key, params, options, progress, &mut cancel)
            .await;
        cancel.disarm();
        ended
    }

    async fn attempt(
        &self,
        peer: PeerId,
        key: PublicKey,
        params: &JobParams,
        options: &GenerateOptions,
        progress: &mut (dyn FnMut(JobProgress) + Send),
        cancel: &mut CancelOnDrop,
    ) -> Result<Outcome, Attempt> {
        let quote = self
            .quote(peer, key, params)
            .await
            .map_err(|e| Attempt::FailOver(e.into()))?;
        if let Some(max) = options.max_cost
            && quote.cost > max
        {
            return Err(fail(
                FailureKind::OverBudget {
                    quoted: quote.cost,
                    max_cost: max,
                },
                format!("quoted {} tokens, more than --max-cost {max}", quote.cost),
            ));
        }
        progress(JobProgress::Quoted {
            provider: peer,
            cost: quote.cost,
        });
        let now = now_ms();
        // Long enough for the wait the provider quoted and the job itself, with room for lost
        // messages; a provider that quotes an empty queue and then goes silent is left soon.
        let work = params.standard_work_ppm();
        let own_ms = self
            .advertised_ms_per_standard(&key)
            .map_or(0, |ms| ms.saturating_mul(work) / 1_000_000);
        let expected = quote.eta_ms.saturating_add(own_ms);
        let validity = u64::try_from(options.request_validity.as_millis())
            .unwrap_or(u64::MAX)
            .max(expected.saturating_mul(VALIDITY_PER_EXPECTED))
            .min(MAX_VALIDITY_MS);
        let request = JobRequest {
            job_id: JobId::random(),
            provider: key,
            params: params.clone(),
            max_cost: quote.cost,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(validity),
            quote_id: Some(quote.quote_id),
            previews: options.previews.min(preview::MAX_PREVIEWS),
        };
        let signed = Signed::sign(&self.key, &request)
            .map_err(|e| fail(FailureKind::Local, e.to_string()))?;
        let (tx, mut rx) = mpsc::channel(JOB_EVENT_QUEUE);
        if let Ok(mut r) = self.routes.lock() {
            r.insert(request.job_id, (peer, tx));
        }
        // The route goes when this call ends, also when the caller drops it midway (a timeout,
        // Ctrl-C): a late receipt is then refused, and the provider credits it.
        let _route = RouteGuard {
            routes: &self.routes,
            job: request.job_id,
        };
        cancel.arm(peer, request.job_id);
        let job = Job {
            peer,
            key,
            request: &request,
            signed: &signed,
            quote: &quote,
            fetch_deadline: options.fetch_deadline,
        };
        // Submit: the same signed request until it is answered.
        match self
            .ask_with(peer, Request::Job(signed.clone()), false)
            .await
        {
            Ok(Response::Accepted {
                queue_position,
                eta_ms,
            }) => progress(JobProgress::Queued {
                provider: peer,
                position: queue_position,
                eta_ms,
            }),
            Ok(Response::Status(status)) => {
                if let Some(done) = self.on_status(&job, status, progress).await {
                    return done;
                }
            }
            // A refusal of the submission: nothing was held.
            Ok(Response::Refused(r)) => return Err(refused(r)),
            Ok(other) => {
                return Err(fail(
                    FailureKind::BadAnswer,
                    format!("unexpected answer to a job: {other:?}"),
                ));
            }
            // Unreachable: it may have been admitted, but it can charge only what we ack, and
            // we ack nothing of an abandoned job. Ask it to let go, and fail over.
            Err(e) => {
                let _ = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    self.net.request(peer, Request::Cancel(request.job_id)),
                )
                .await;
                return Err(fail(
                    e.kind.clone(),
                    format!("no answer to the job request: {e}"),
                ));
            }
        }
        // Idle periods in a row in which the provider could not be reached at all.
        let mut unreachable = 0u32;
        // Previews still to pass on: the request's number, however many the provider sends.
        let mut previews = PreviewGate::for_request(&request);
        // The job ends by its request's expiry, however often the provider says it is still
        // busy: a heartbeat or progress resets the idle wait, never this.
        let ends_at_ms = request.expires_at_ms.saturating_add(EXPIRY_MARGIN_MS);
        loop {
            let left_ms = ends_at_ms.saturating_sub(now_ms());
            if left_ms == 0 {
                return self.expired(&job).await;
            }
            let wait = options.idle_timeout.min(Duration::from_millis(left_ms));
            let (event, channel) = match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(e)) => e,
                // Our route was dropped: this node stopped (see `Requester::stop`).
                Ok(None) => return Err(fail(FailureKind::Local, "this node stopped")),
                Err(_) => {
                    // Silence: ask where the job stands before anything else.
                    let status = match self
                        .ask_with(peer, Request::Status(request.job_id), false)
                        .await
                    {
                        Ok(Response::Status(s)) => {
                            unreachable = 0;
                            Some(s)
                        }
                        // Not a lost message: the provider cannot be reached, or it drops our
                        // questions unanswered.
                        Err(e) if !e.timed_out => {
                            unreachable += 1;
                            None
                        }
                        _ => None,
                    };
                    match status {
                        Some(s) => {
                            if let Some(done) = self.on_status(&job, s, progress).await {
                                return done;
                            }
                        }
                        None if unreachable >= UNREACHABLE_ROUNDS
                            || now_ms() > request.expires_at_ms + EXPIRY_MARGIN_MS =>
                        {
                            // Best effort: a provider that hears it frees the job at once.
                            let _ = tokio::time::timeout(
                                ATTEMPT_TIMEOUT,
                                self.net.request(peer, Request::Cancel(request.job_id)),
                            )
                            .await;
                            let (kind, why) = if unreachable >= UNREACHABLE_ROUNDS {
                                (
                                    FailureKind::Unreachable,
                                    "the provider does not answer (unreachable or refusing)",
                                )
                            } else {
                                (FailureKind::Expired, "the request has expired")
                            };
                            return Err(fail(
                                kind,
                                format!(
                                    "no word for {} s and {why}",
                                    options.idle_timeout.as_secs()
                                ),
                            ));
                        }
                        None => {}
                    }
                    continue;
                }
            };
            match event.kind {
                JobEventKind::Accepted {
                    queue_position,
                    eta_ms,
                } => {
                    // The provider's heartbeat while the job waits in its queue.
                    let _ = self.net.respond(channel, Response::EventAck(None)).await;
                    progress(JobProgress::Queued {
                        provider: peer,
                        position: queue_position,
                        eta_ms,
                    });
                }
                JobEventKind::Progress { step, of, preview } => {
                    let _ = self.net.respond(channel, Response::EventAck(None)).await;
                    let preview = previews.admit(preview);
                    progress(JobProgress::Step { step, of, preview });
                }
                JobEventKind::Failed { reason, void } => {
                    let _ = self.net.respond(channel, Response::EventAck(None)).await;
                    if job.is_void(&void) {
                        return Err(fail(
                            FailureKind::ProviderFailed,
                            format!("failed: {reason}"),
                        ));
                    }
                }
                JobEventKind::Cancelled { void } => {
                    let _ = self.net.respond(channel, Response::EventAck(None)).await;
                    if job.is_void(&void) {
                        return Err(fail(
                            FailureKind::ProviderFailed,
                            "cancelled by the provider",
                        ));
                    }
                }
                JobEventKind::Completed { receipt } => {
                    return self.accept(&job, receipt, Some(channel)).await;
                }
            }
        }
    }

    /// The request expired without a result: one last `Status` takes a receipt settled in time
    /// (the provider's ledger settles nothing after a hold's expiry); otherwise the job is
    /// cancelled and left, owing nothing.
    async fn expired(&self, job: &Job<'_>) -> Result<Outcome, Attempt> {
        let status = self
            .ask_with(job.peer, Request::Status(job.request.job_id), false)
            .await;
        if let Ok(Response::Status(
            JobStatus::Completed { receipt } | JobStatus::Acknowledged { receipt },
        )) = status
        {
            return self.accept(job, receipt, None).await;
        }
        let _ = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            self.net
                .request(job.peer, Request::Cancel(job.request.job_id)),
        )
        .await;
        Err(fail(
            FailureKind::Expired,
            "the request expired before the provider delivered a result (it can no longer \
             charge for it)",
        ))
    }

    /// Acts on a `Status` answer: `Some` ends the attempt, `None` keeps waiting.
    async fn on_status(
        &self,
        job: &Job<'_>,
        status: JobStatus,
        progress: &mut (dyn FnMut(JobProgress) + Send),
    ) -> Option<Result<Outcome, Attempt>> {
        match status {
            JobStatus::Queued { position, eta_ms } => {
                progress(JobProgress::Queued {
                    provider: job.peer,
                    position,
                    eta_ms,
                });
                None
            }
            JobStatus::Running { step, of } => {
                if of > 0 {
                    progress(JobProgress::Step {
                        step,
                        of,
                        preview: None,
                    });
                }
                None
            }
            // The submission never arrived: send the same signed request again, until it
            // expires.
            JobStatus::Unknown => {
                if now_ms() + EXPIRY_MARGIN_MS >= job.request.expires_at_ms {
                    return Some(Err(fail(
                        FailureKind::Expired,
                        "the provider does not know the job and it expired",
                    )));
                }
                match self.ask(job.peer, Request::Job(job.signed.clone())).await {
                    Some(Response::Refused(r)) => Some(Err(refused(r))),
                    _ => None,
                }
            }
            JobStatus::Completed { receipt } | JobStatus::Acknowledged { receipt } => {
                Some(self.accept(job, receipt, None).await)
            }
            JobStatus::Credited { note } => {
                if note.signer() == job.key {
                    self.sync_chain(job.peer, job.key).await;
                    Some(Err(fail(
                        FailureKind::ProviderFailed,
                        "the provider credited the job back",
                    )))
                } else {
                    None
                }
            }
            JobStatus::Voided(void) => job.is_void(&void).then(|| {
                Err(fail(
                    FailureKind::ProviderFailed,
                    "the provider voided the job",
                ))
            }),
        }
    }

    /// Checks the receipt, links it to our chain, stores it with our ack (once), answers the
    /// offer with the ack, and fetches the images.
    async fn accept(
        &self,
        job: &Job<'_>,
        receipt: Signed<Receipt>,
        channel: Option<ResponseChannel>,
    ) -> Result<Outcome, Attempt> {
        let body = match check_receipt(&receipt, job.signed, job.quote, &job.key) {
            Ok(b) => b,
            Err(problem) => {
                tracing::warn!(peer = %job.peer, %problem, "refusing receipt");
                if let (Some(channel), Some(r)) = (
                    channel,
                    self.refusal(job.request.job_id, &receipt, &problem.to_string()),
                ) {
                    let _ = self.net.respond(channel, Response::ReceiptRefused(r)).await;
                }
                return Err(fail(
                    FailureKind::BadReceipt,
                    format!("bad receipt: {problem}"),
                ));
            }
        };
        let ack = match self.stored_ack(body.job_id, &receipt) {
            Some(ack) => ack,
            None => match self.record(job, &receipt, &body).await {
                Ok(ack) => ack,
                Err(e) => {
                    tracing::warn!(peer = %job.peer, error = %e, "receipt does not fit our books; refusing it");
                    if let (Some(channel), Some(r)) = (
                        channel,
                        self.refusal(job.request.job_id, &receipt, &e.to_string()),
                    ) {
                        let _ = self.net.respond(channel, Response::ReceiptRefused(r)).await;
                    }
                    let kind = match &e {
                        RecordError::Stopped | RecordError::Sign(_) => FailureKind::Local,
                        RecordError::Ledger(_) => FailureKind::BadReceipt,
                    };
                    return Err(fail(kind, format!("receipt refused by the ledger: {e}")));
                }
            },
        };
        if let Some(channel) = channel {
            let _ = self
                .net
                .respond(channel, Response::EventAck(Some(ack.clone())))
                .await;
        }
        self.fetch(job, receipt, body, ack).await
    }

    /// Stores the receipt with a fresh signed ack (durably, before the provider hears the
    /// ack). When the receipt does not link to our head, first learns the entries we missed.
    async fn record(
        &self,
        job: &Job<'_>,
        receipt: &Signed<Receipt>,
        body: &Receipt,
    ) -> Result<Signed<ReceiptAck>, RecordError> {
        let head = self.ledger.chain_head(Role::Requester, &job.key)?;
        if body.prev_entry_hash != head {
            self.sync_chain(job.peer, job.key).await;
        }
        let ack = ReceiptAck {
            job_id: body.job_id,
            receipt_hash: receipt.digest(),
            acked_at_ms: now_ms(),
        };
        let ack = Signed::sign(&self.key, &ack).map_err(RecordError::Sign)?;
        let ledger = self.ledger.clone();
        let (r2, a2) = (receipt.clone(), ack.clone());
        tokio::task::spawn_blocking(move || ledger.record_receipt(&r2, &a2))
            .await
            .map_err(|_| RecordError::Stopped)??;
        Ok(ack)
    }

    /// Asks for the images with our ack (see [`Requester::fetch_images`]); without them, the
    /// result is marked undelivered in our books.
    async fn fetch(
        &self,
        job: &Job<'_>,
        receipt: Signed<Receipt>,
        body: Receipt,
        ack: Signed<ReceiptAck>,
    ) -> Result<Outcome, Attempt> {
        let why = match self
            .fetch_images(job.peer, job.key, job.fetch_deadline, &body, &ack)
            .await
        {
            Ok(images) => {
                return Ok(Outcome {
                    provider: job.peer,
                    images,
                    cost: body.cost,
                    receipt,
                    ack,
                    attempts: 1,
                    path: crate::network::PathKind::NotConnected,
                });
            }
            Err(NoImages::Credited) => {
                return Err(fail(
                    FailureKind::ProviderFailed,
                    "the provider credited the job back before our ack",
                ));
            }
            Err(NoImages::Undelivered(why)) => why,
        };
        let ledger = self.ledger.clone();
        let (job_id, why2) = (body.job_id, why.clone());
        let _ = tokio::task::spawn_blocking(move || ledger.mark_undelivered(job_id, &why2)).await;
        self.note_undelivered(&job.key);
        Err(Attempt::Undelivered(Box::new(GenerateError::Undelivered {
            provider: job.peer,
            job: body.job_id,
            cost: body.cost,
            reason: why,
        })))
    }

    /// Asks `peer` for the images of `body` with our `ack` until they come and match the
    /// receipt, the provider says the receipt was credited (then the pair's chain is synced, so
    /// the credit note is in our books), or `fetch_deadline` passes. Changes nothing else in
    /// our books.
    pub(super) async fn fetch_images(
        &self,
        peer: PeerId,
        key: PublicKey,
        fetch_deadline: Duration,
        body: &Receipt,
        ack: &Signed<ReceiptAck>,
    ) -> Result<Vec<Vec<u8>>, NoImages> {
        let deadline = tokio::time::Instant::now() + fetch_deadline;
        let mut backoff = FIRST_BACKOFF;
        loop {
            if self.net.is_stopped() {
                return Err(NoImages::Undelivered(
                    "this node stopped before the images came".to_owned(),
                ));
            }
            let answer = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                self.net.request(peer, Request::Fetch(ack.clone())),
            )
            .await;
            let wait = match answer {
                Ok(Ok(Response::Images { job_id, images })) if job_id == body.job_id => {
                    return match check_images(body, &images) {
                        Ok(()) => Ok(images),
                        Err(problem) => Err(NoImages::Undelivered(format!(
                            "the images do not match the receipt: {problem}"
                        ))),
                    };
                }
                Ok(Ok(Response::Refused(FailReason::Credited))) => {
                    self.sync_chain(peer, key).await;
                    return Err(NoImages::Credited);
                }
                Ok(Ok(Response::Refused(FailReason::ResultGone))) => {
                    return Err(NoImages::Undelivered(
                        "the provider no longer has the images".to_owned(),
                    ));
                }
                Ok(Ok(Response::Refused(FailReason::Busy { retry_after_ms }))) => {
                    Duration::from_millis(retry_after_ms).min(MAX_BUSY_WAIT)
                }
                _ => backoff,
            };
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(NoImages::Undelivered(format!(
                    "no images within {} s of our ack",
                    fetch_deadline.as_secs()
                )));
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Learns the pair's chain entries after our head from the provider and records them:
    /// credit notes (with the receipts they credit that we never stored). Stops at the first
    /// entry our books refuse, or when the provider does not answer; a later exchange tries
    /// again.
    pub async fn sync_chain(&self, peer: PeerId, provider: PublicKey) -> ChainSync {
        let mut learned = 0;
        let stopped = |learned| ChainSync {
            learned,
            caught_up: false,
        };
        for _ in 0..MAX_CHAIN_PAGES {
            let Ok(head) = self.ledger.chain_head(Role::Requester, &provider) else {
                return stopped(learned);
            };
            let entries = match self.ask(peer, Request::Chain { after: head }).await {
                Some(Response::Chain(entries)) => entries,
                _ => return stopped(learned),
            };
            if entries.is_empty() {
                return ChainSync {
                    learned,
                    caught_up: true,
                };
            }
            let mut pending: Option<Signed<Receipt>> = None;
            let mut progressed = false;
            for entry in entries {
                if entry.signer() != provider {
                    return stopped(learned);
                }
                match entry {
                    ChainEntry::Receipt(r) => {
                        // A receipt we do not hold can enter our chain only with the credit
                        // note that takes it back (we never acknowledged it).
                        if pending.is_some() {
                            return stopped(learned);
                        }
                        pending = Some(r);
                    }
                    ChainEntry::Credit(note) => {
                        let ledger = self.ledger.clone();
                        let receipt = pending.take();
                        let stored = tokio::task::spawn_blocking(move || {
                            ledger.record_credit(receipt.as_ref(), &note)
                        })
                        .await;
                        match stored {
                            Ok(Ok(())) => {
                                learned += 1;
                                progressed = true;
                            }
                            Ok(Err(e)) => {
                                log_refused(&e);
                                return stopped(learned);
                            }
                            Err(_) => return stopped(learned),
                        }
                    }
                }
            }
            if !progressed {
                return stopped(learned);
            }
        }
        stopped(learned)
    }
}

fn log_refused(e: &LedgerError) {
    tracing::warn!(error = %e, "a chain entry from the provider does not fit our books");
}

/// The job being bought, as the exchange needs it.
struct Job<'a> {
    peer: PeerId,
    key: PublicKey,
    request: &'a JobRequest,
    signed: &'a Signed<JobRequest>,
    quote: &'a Quote,
    /// How long our ack's images are asked for (see [`FETCH_DEADLINE`]).
    fetch_deadline: Duration,
}

impl Job<'_> {
    /// Whether `void` is the provider's signed void of this job.
    fn is_void(&self, void: &Signed<pixmarket_protocol::JobVoid>) -> bool {
        void.signer() == self.key && void.verify().is_ok_and(|v| v.job_id == self.request.job_id)
    }
}
