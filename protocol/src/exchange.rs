//! The messages of the fair exchange that follows a finished job (docs/protocol.md "Fair
//! exchange"), and the pair's chain of provider-signed entries.
//!
//! - [`CreditNote`]: the provider takes back the charge of one receipt whose result the
//!   requester never accepted. It extends the pair's chain like a receipt does; nothing is ever
//!   rewound.
//! - [`ReceiptRefusal`]: the requester's signed, final "no" to a receipt. It ends a delivery at
//!   once (anything else unsigned is treated as a transient failure and retried).
//! - [`JobVoid`]: the provider's signed statement that a job ended without a charge; with it
//!   (or after the request's expiry) a requester may fail over.
//! - [`ChainEntry`]: a receipt or a credit note, as the chain of a pair holds them.
//! - [`JobStatus`]: a provider's answer to "where is my job?".

use serde::{Deserialize, Serialize};

use crate::identity::{Hash, PublicKey};
use crate::messages::{JobId, Receipt};
use crate::metering::MicroTokens;
use crate::signed::{Message, Signed};
use crate::validate::{self as v, ValidationError};

/// The provider's signed entry that takes back a receipt's charge. Issued only for a receipt
/// the provider holds no acknowledgement for; the ledger refuses one for an acknowledged
/// receipt, and refuses an acknowledgement for a credited one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditNote {
    pub job_id: JobId,
    /// The signed digest of the receipt whose charge this note takes back.
    pub receipt_hash: Hash,
    pub provider: PublicKey,
    pub requester: PublicKey,
    /// The credited amount: the receipt's whole cost.
    pub amount: MicroTokens,
    /// Everything this provider has charged this requester after this note.
    pub cumulative_charged: MicroTokens,
    /// The pair's previous chain entry (receipt or credit note).
    pub prev_entry_hash: Option<Hash>,
    /// Why, for a person reading the books.
    pub reason: String,
    pub issued_at_ms: u64,
}

impl CreditNote {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.amount == MicroTokens::ZERO {
            return Err(ValidationError::new("amount", "0", "more than 0 tokens"));
        }
        v::text("reason", &self.reason, 0, v::MAX_MEMO_CHARS)
    }
}

/// The requester's signed refusal of a receipt: final, so the provider credits it at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRefusal {
    pub job_id: JobId,
    /// The signed digest of the refused receipt.
    pub receipt_hash: Hash,
    pub reason: String,
    pub refused_at_ms: u64,
}

impl ReceiptRefusal {
    pub fn validate(&self) -> Result<(), ValidationError> {
        v::text("reason", &self.reason, 0, v::MAX_MEMO_CHARS)
    }
}

/// The provider's signed statement that a job ended without a charge (failed, cancelled,
/// refused after admission, expired, or lost in a restart): its hold is released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobVoid {
    pub job_id: JobId,
    pub reason: String,
    pub voided_at_ms: u64,
}

impl JobVoid {
    pub fn validate(&self) -> Result<(), ValidationError> {
        v::text("reason", &self.reason, 0, v::MAX_MEMO_CHARS)
    }
}

/// One link of a pair's chain: every entry names the previous one and carries the pair's
/// cumulative charge after it, so two ledgers reconcile by comparing their heads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChainEntry {
    Receipt(Signed<Receipt>),
    Credit(Signed<CreditNote>),
}

/// A chain entry's links, decoded and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainLink {
    pub digest: Hash,
    pub prev: Option<Hash>,
    pub cumulative_charged: MicroTokens,
    pub job_id: JobId,
}

impl ChainEntry {
    /// The signed digest: what the next entry's `prev_entry_hash` names.
    pub fn digest(&self) -> Hash {
        match self {
            ChainEntry::Receipt(r) => r.digest(),
            ChainEntry::Credit(c) => c.digest(),
        }
    }

    pub fn signer(&self) -> PublicKey {
        match self {
            ChainEntry::Receipt(r) => r.signer(),
            ChainEntry::Credit(c) => c.signer(),
        }
    }

    /// Verifies the signature and returns the links.
    pub fn link(&self) -> Result<ChainLink, crate::signed::VerifyError> {
        Ok(match self {
            ChainEntry::Receipt(r) => {
                let b = r.verify()?;
                ChainLink {
                    digest: r.digest(),
                    prev: b.prev_entry_hash,
                    cumulative_charged: b.cumulative_charged,
                    job_id: b.job_id,
                }
            }
            ChainEntry::Credit(c) => {
                let b = c.verify()?;
                ChainLink {
                    digest: c.digest(),
                    prev: b.prev_entry_hash,
                    cumulative_charged: b.cumulative_charged,
                    job_id: b.job_id,
                }
            }
        })
    }
}

/// Where a job stands, as its provider answers `Status` (and a repeated submission).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// The provider has no such job from this requester: the submission never arrived.
    Unknown,
    Queued {
        position: u32,
        eta_ms: u64,
    },
    Running {
        step: u32,
        of: u32,
    },
    /// Settled, waiting for the requester's acknowledgement: the receipt to acknowledge.
    Completed {
        receipt: Signed<Receipt>,
    },
    /// Acknowledged: the images can be fetched with the acknowledgement.
    Acknowledged {
        receipt: Signed<Receipt>,
    },
    /// Settled, then credited back (never acknowledged in time, or refused).
    Credited {
        note: Signed<CreditNote>,
    },
    /// Ended without a charge.
    Voided(Signed<JobVoid>),
}

/// Chain entries a single `Chain` answer carries at most; a requester that is further behind
/// asks again from the last one it got. Sixty-four entries of about 1 KiB each stay far below
/// the response limit.
pub const MAX_CHAIN_ENTRIES: usize = 64;

const KIB: usize = 1024;

impl Message for CreditNote {
    const DOMAIN: &'static str = "pixmarket/v1/credit-note";
    /// Two keys, hashes, amounts and a reason of at most 256 characters (4 bytes each).
    const MAX_ENCODED: usize = 2 * KIB;
}
impl Message for ReceiptRefusal {
    const DOMAIN: &'static str = "pixmarket/v1/receipt-refusal";
    const MAX_ENCODED: usize = 2 * KIB;
}
impl Message for JobVoid {
    const DOMAIN: &'static str = "pixmarket/v1/job-void";
    const MAX_ENCODED: usize = 2 * KIB;
}
