//! The books' record types: roles, accounts, holds, job outcomes, stored receipts and the
//! logged operations ([`Op`]).

use std::fmt;

use pixmarket_protocol::{
    CreditNote, DepositNote, Hash, JobId, MicroTokens, PublicKey, Receipt, ReceiptAck, Signed,
};
use serde::{Deserialize, Serialize};

use crate::store::TreeId;

/// Records are small (a signed receipt is at most ~2 KiB); this bound keeps a corrupt length
/// from allocating much, and keeps every value far below sled's 128 KiB blob threshold, so all
/// data lives in the one log file that the durability barrier fsyncs.
pub(crate) const MAX_RECORD: usize = 16 * 1024;

/// The longest reason a void or a refund may carry, in characters: the protocol's memo bound,
/// room for an error message, and small enough that a log entry stays a few hundred bytes.
pub const MAX_REASON_CHARS: usize = pixmarket_protocol::validate::MAX_MEMO_CHARS;

/// Which side of a trade an account or job is on, from this node's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// I am the provider; the peer is a requester who deposits with me and owes me.
    Provider,
    /// I am the requester; the account mirrors what I deposited at and was charged by the peer.
    Requester,
}

impl Role {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Role::Provider => 0,
            Role::Requester => 1,
        }
    }

    pub(crate) fn accounts(self) -> TreeId {
        match self {
            Role::Provider => TreeId::ProviderAccounts,
            Role::Requester => TreeId::RequesterAccounts,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Provider => "provider",
            Role::Requester => "requester",
        })
    }
}

/// One counterparty's figures. Amounts only grow except `held`, `credit_limit` (which the
/// operator sets) and `charged`, which a credit note lowers again (as a new entry of the
/// pair's chain); `charged` is also the pair's cumulative total that chain entries carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Everything the peer prepaid (as provider) or I prepaid (as requester).
    pub deposits: MicroTokens,
    /// What the peer may owe beyond its deposits.
    pub credit_limit: MicroTokens,
    /// Everything charged by settled receipts, less credited ones: the pair's cumulative
    /// total.
    pub charged: MicroTokens,
    /// The sum of open holds.
    pub held: MicroTokens,
    /// Number of chain entries stored for the pair (receipts and credit notes): also the next
    /// entry's index.
    pub entries: u64,
    /// The signed digest of the pair's last chain entry, the head the next entry must name.
    /// (Ledgers written before credit notes existed also moved it back on a legacy refund.)
    pub last_entry: Option<Hash>,
}

impl Account {
    /// `deposits + credit_limit − charged − held`, or `None` if that is negative (which the
    /// provider side never allows; a requester mirror may show it when a provider extended
    /// credit this node did not record).
    pub fn available(&self) -> Option<MicroTokens> {
        self.deposits
            .checked_add(self.credit_limit)?
            .checked_sub(self.charged)?
            .checked_sub(self.held)
    }

    /// What is charged or held.
    pub fn in_use(&self) -> Option<MicroTokens> {
        self.charged.checked_add(self.held)
    }
}

/// An open hold: money set aside for a job before it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub requester: PublicKey,
    pub max_cost: MicroTokens,
    /// After this instant the hold may be expired (`expire_holds`).
    pub expires_at_ms: u64,
    /// The signed request's digest, when known; a receipt must then name it.
    pub request_hash: Option<Hash>,
}

/// What became of an accepted job id. Kept forever: a job id is accepted once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    Held,
    Settled {
        peer: PublicKey,
        index: u64,
    },
    Voided,
    Expired,
    /// Settled, then refunded by rewinding the chain: written only by ledgers from before
    /// credit notes, and still replayed. The receipt stays at `index` for audit but no longer
    /// charges. (Variants are appended, so older entries keep their encoding.)
    Refunded {
        peer: PublicKey,
        index: u64,
        reason: String,
    },
    /// Settled, then credited back by the credit note at `note_index` of the pair's chain.
    Credited {
        peer: PublicKey,
        index: u64,
        note_index: u64,
        reason: String,
    },
    /// As requester: settled and acknowledged, but the provider never delivered the images (or
    /// delivered others): a signed record against it (its receipt and my ack).
    Undelivered {
        peer: PublicKey,
        index: u64,
        reason: String,
    },
}

impl JobOutcome {
    /// Where the job's receipt is stored, for a settled or refunded job.
    pub fn receipt_at(&self) -> Option<(PublicKey, u64)> {
        match self {
            JobOutcome::Settled { peer, index }
            | JobOutcome::Refunded { peer, index, .. }
            | JobOutcome::Credited { peer, index, .. }
            | JobOutcome::Undelivered { peer, index, .. } => Some((*peer, *index)),
            JobOutcome::Held | JobOutcome::Voided | JobOutcome::Expired => None,
        }
    }
}

impl fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobOutcome::Held => "held",
            JobOutcome::Settled { .. } => "settled",
            JobOutcome::Voided => "voided",
            JobOutcome::Expired => "expired",
            JobOutcome::Refunded { .. } => "refunded as undelivered",
            JobOutcome::Credited { .. } => "credited back",
            JobOutcome::Undelivered { .. } => "paid but not delivered",
        })
    }
}

/// A receipt as stored: the provider-signed receipt and, once it arrives, the requester's ack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReceipt {
    pub role: Role,
    pub receipt: Signed<Receipt>,
    pub ack: Option<Signed<ReceiptAck>>,
    /// `Some(reason)` when the receipt no longer charges: credited back by a credit note (or
    /// refunded by a legacy rewind). Not part of the stored record (whose bytes never change);
    /// the readers (`Ledger::receipt`, `Ledger::receipts`) fill it in from the job's outcome.
    #[serde(skip)]
    pub refunded: Option<String>,
    /// As requester, `Some(reason)` when the images never came: filled in like `refunded`.
    #[serde(skip)]
    pub undelivered: Option<String>,
}

/// A credit note as stored in the pair's chain, at its index among the receipts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCredit {
    pub role: Role,
    pub note: Signed<CreditNote>,
}

/// The terms of a hold, as the provider admits a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldTerms {
    pub job: JobId,
    pub requester: PublicKey,
    pub max_cost: MicroTokens,
    /// The last instant the job may still be settled; `expire_holds` releases it after.
    pub expires_at_ms: u64,
    /// The signed request's digest, when the caller has it.
    pub request_hash: Option<Hash>,
}

/// Every state change, exactly as it is written to the log. Signed material is kept whole,
/// so a third party can check each signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    SetDefaultCredit {
        amount: MicroTokens,
    },
    Deposit {
        note: Signed<DepositNote>,
    },
    SetCreditLimit {
        role: Role,
        peer: PublicKey,
        amount: MicroTokens,
    },
    Hold {
        terms: HoldTerms,
        now_ms: u64,
    },
    Settle {
        job: JobId,
        receipt: Signed<Receipt>,
    },
    Void {
        job: JobId,
        reason: String,
    },
    Expire {
        job: JobId,
        now_ms: u64,
    },
    Ack {
        job: JobId,
        ack: Signed<ReceiptAck>,
    },
    /// As requester: a provider's receipt with my own ack.
    RecordReceipt {
        receipt: Signed<Receipt>,
        ack: Signed<ReceiptAck>,
    },
    /// As provider, legacy: undid the charge of the pair's latest unacknowledged receipt by
    /// rewinding the chain. No longer written (a correction is now a [`Op::Credit`]); kept so
    /// older logs replay. (Variants are appended, so older entries keep their encoding.)
    Refund {
        job: JobId,
        reason: String,
    },
    /// As provider: my signed credit note for a settled receipt that was never acknowledged.
    Credit {
        note: Signed<CreditNote>,
    },
    /// As requester: a provider's credit note, with the receipt it credits when I never stored
    /// that receipt (I never acknowledged it).
    RecordCredit {
        receipt: Option<Signed<Receipt>>,
        note: Signed<CreditNote>,
    },
    /// As requester: the provider took my ack for `job` and never delivered the images.
    Undelivered {
        job: JobId,
        reason: String,
    },
    /// As requester: what I prepaid the provider `note.account`, in my own signed note (the
    /// provider's own record of it is its deposit note, in its books). Raises my mirror's
    /// deposits, so its `available` is true.
    Prepaid {
        note: Signed<DepositNote>,
    },
    /// As requester: the images of `job`, marked [`Op::Undelivered`], came after all (the
    /// provider still held them when it was asked again) and match its receipt. The job counts
    /// as delivered from here on; the undelivered mark stays in the log before it.
    DeliveredLate {
        job: JobId,
    },
}

impl Op {
    /// The peers an operation concerns (for per-pair export). Settings concern everyone.
    pub fn peers(&self, owner: &PublicKey) -> Vec<PublicKey> {
        match self {
            Op::SetDefaultCredit { .. } => Vec::new(),
            Op::Deposit { note } => {
                if note.signer() == *owner {
                    note.verify().map(|n| vec![n.account]).unwrap_or_default()
                } else {
                    vec![note.signer()]
                }
            }
            Op::Prepaid { note } => note.verify().map(|n| vec![n.account]).unwrap_or_default(),
            Op::SetCreditLimit { peer, .. } => vec![*peer],
            Op::Hold { terms, .. } => vec![terms.requester],
            Op::Settle { receipt, .. } => receipt
                .verify()
                .map(|r| vec![r.requester])
                .unwrap_or_default(),
            Op::RecordReceipt { receipt, .. } => vec![receipt.signer()],
            Op::Credit { note } => note.verify().map(|n| vec![n.requester]).unwrap_or_default(),
            Op::RecordCredit { note, .. } => vec![note.signer()],
            // Void, expire, ack, refund, undelivered and delivered late name a job; the export resolves its
            // peer from the hold or the receipt.
            Op::Void { .. }
            | Op::Expire { .. }
            | Op::Ack { .. }
            | Op::Refund { .. }
            | Op::Undelivered { .. }
            | Op::DeliveredLate { .. } => Vec::new(),
        }
    }

    /// The job an operation names, if any.
    pub fn job(&self) -> Option<JobId> {
        match self {
            Op::Hold { terms, .. } => Some(terms.job),
            Op::Settle { job, .. }
            | Op::Void { job, .. }
            | Op::Expire { job, .. }
            | Op::Ack { job, .. }
            | Op::Refund { job, .. }
            | Op::Undelivered { job, .. }
            | Op::DeliveredLate { job } => Some(*job),
            Op::Credit { note } | Op::RecordCredit { note, .. } => {
                note.verify().ok().map(|n| n.job_id)
            }
            Op::RecordReceipt { ack, .. } => ack.verify().ok().map(|a| a.job_id),
            Op::SetDefaultCredit { .. }
            | Op::Deposit { .. }
            | Op::Prepaid { .. }
            | Op::SetCreditLimit { .. } => None,
        }
    }
}
