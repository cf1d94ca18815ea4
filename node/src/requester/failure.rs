//! Why an attempt at one provider ended without a result, typed: a caller (the API, the CLI)
//! tells insufficient credit from a busy market or a network failure by the kind, never by the
//! words of the message; the message says what happened to a person.

use libp2p::PeerId;
use pixmarket_protocol::MicroTokens;
use pixmarket_protocol::messages::FailReason;

/// What kind of failure ended an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The provider answered `Busy` and kept answering it (or asked for a longer wait than the
    /// requester waits at once): retry after `retry_after_ms`.
    Busy { retry_after_ms: u64 },
    /// The provider refused: the requester's credit with it does not cover the job.
    InsufficientCredit {
        needed: MicroTokens,
        available: MicroTokens,
    },
    /// Another typed refusal of the quote or the submission, with the protocol's reason.
    Refused(FailReason),
    /// The network could not reach the provider, or it never answered.
    Unreachable,
    /// The provider quoted more than the caller's `max_cost`.
    OverBudget {
        quoted: MicroTokens,
        max_cost: MicroTokens,
    },
    /// The provider's answer failed our checks: a quote with a bad signature, price, metering
    /// or token count, or an answer of the wrong kind.
    BadAnswer,
    /// The request expired before the provider delivered a result; it can no longer charge.
    Expired,
    /// The provider failed, cancelled, voided or credited back the job.
    ProviderFailed,
    /// The provider's receipt failed our checks, or does not fit our books; it was refused.
    BadReceipt,
    /// The peer id given is not an ed25519 key, so no provider can be bought from there.
    NotAProvider,
    /// This node stopped, or could not sign its own message.
    Local,
}

/// One attempt's failure: its kind and what a person reads.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A typed refusal: `Busy` and `InsufficientCredit` get their own kinds, the rest stay the
    /// protocol's reason.
    pub(crate) fn refused(reason: FailReason, message: impl Into<String>) -> Self {
        let kind = match reason {
            FailReason::Busy { retry_after_ms } => FailureKind::Busy { retry_after_ms },
            FailReason::InsufficientCredit { needed, available } => {
                FailureKind::InsufficientCredit { needed, available }
            }
            other => FailureKind::Refused(other),
        };
        Self::new(kind, message)
    }
}

/// An attempt that failed over: the provider tried and why it failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{provider}: {failure}")]
pub struct FailedAttempt {
    pub provider: PeerId,
    pub failure: Failure,
}

impl FailedAttempt {
    pub fn kind(&self) -> &FailureKind {
        &self.failure.kind
    }
}

/// The attempts' messages joined for [`super::GenerateError::AllFailed`]'s text.
pub(super) fn joined(attempts: &[FailedAttempt]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_their_numbers_in_the_kind() {
        let busy = Failure::refused(FailReason::Busy { retry_after_ms: 7 }, "refused: busy");
        assert_eq!(busy.kind, FailureKind::Busy { retry_after_ms: 7 });
        let credit = Failure::refused(
            FailReason::InsufficientCredit {
                needed: MicroTokens(5),
                available: MicroTokens(1),
            },
            "refused",
        );
        assert_eq!(
            credit.kind,
            FailureKind::InsufficientCredit {
                needed: MicroTokens(5),
                available: MicroTokens(1),
            }
        );
        let dup = Failure::refused(FailReason::Duplicate, "refused: duplicate job id");
        assert_eq!(dup.kind, FailureKind::Refused(FailReason::Duplicate));
        assert_eq!(dup.to_string(), "refused: duplicate job id");
    }
}
