//! The ledger's error types: [`LedgerError`] for refused or failed operations (one enum: the
//! operations share most of their failure modes, and a caller matching on
//! `InsufficientCredit` should not need to know which call produced it), [`OpenError`] for
//! opening a folder, and [`Inconsistency`] for what `verify` and `import` find.

use std::path::PathBuf;

use pixmarket_protocol::{
    CostMismatch, EncodeError, Hash, JobId, MicroTokens, PublicKey, ValidationError, VerifyError,
};

use crate::books::JobOutcome;
use crate::store::{StoreError, TreeId};

/// Why an operation was refused or failed. A refused operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credit: the job needs up to {needed} tokens, {available} are available")]
    InsufficientCredit {
        needed: MicroTokens,
        available: MicroTokens,
    },
    #[error("job {job} was already accepted once; a job id is accepted only once, ever")]
    DuplicateJob { job: JobId },
    #[error("the request expired at {expires_at_ms} ms (now is {now_ms} ms)")]
    Expired { expires_at_ms: u64, now_ms: u64 },
    #[error("there is no hold for job {job}")]
    UnknownHold { job: JobId },
    #[error("job {job} is already {outcome}")]
    AlreadyFinished { job: JobId, outcome: JobOutcome },
    #[error("the hold for job {job} has not expired (it expires at {expires_at_ms} ms)")]
    NotExpired { job: JobId, expires_at_ms: u64 },
    #[error("the receipt charges {cost} tokens but only {held} are held")]
    ChargeExceedsHold {
        cost: MicroTokens,
        held: MicroTokens,
    },
    #[error("{what} is signed by {got}, expected {expected}")]
    WrongSigner {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("{what} does not verify")]
    BadSignature {
        what: &'static str,
        #[source]
        source: VerifyError,
    },
    #[error("{field} is {got}, expected {expected}")]
    Mismatch {
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error("the receipt's cost is not what the metering function gives")]
    WrongCost(#[source] CostMismatch),
    #[error("invalid {what}")]
    Invalid {
        what: &'static str,
        #[source]
        source: ValidationError,
    },
    #[error(
        "the chain entry's cumulative total is {got} tokens; this pair's books say it must be {expected}"
    )]
    CumulativeMismatch {
        expected: MicroTokens,
        got: MicroTokens,
    },
    #[error(
        "the chain entry links to previous entry {got:?}; this pair's last entry is {expected:?}"
    )]
    PrevReceiptMismatch {
        expected: Option<Hash>,
        got: Option<Hash>,
    },
    #[error("job {job} has no settled receipt (it is unknown, held, voided or expired)")]
    NotSettled { job: JobId },
    #[error(
        "job {job} is not marked undelivered in the requester's books, so it cannot be delivered late"
    )]
    NotUndelivered { job: JobId },
    #[error("the receipt for job {job} is already acknowledged")]
    AlreadyAcked { job: JobId },
    /// The job's receipt was credited back (or refunded by a legacy rewind): it cannot be
    /// acknowledged or credited again.
    #[error("the receipt for job {job} was credited back ({reason})")]
    Refunded { job: JobId, reason: String },
    /// A receipt issued after its hold expired: the requester may already have failed over.
    #[error(
        "the receipt for job {job} is issued at {issued_at_ms} ms, after its hold expired at {expires_at_ms} ms"
    )]
    HoldExpired {
        job: JobId,
        expires_at_ms: u64,
        issued_at_ms: u64,
    },
    /// A chain read that starts after an entry the pair's chain does not hold.
    #[error("this pair's chain has no entry {after}")]
    UnknownEntry { after: Hash },
    /// A credit note needs the signing key of the ledger's owner.
    #[error("the key given is not this ledger's owner")]
    NotOwnerKey,
    /// Legacy: a refund had to undo the pair's latest receipt, so the chain rewound one link.
    #[error(
        "the receipt for job {job} ({receipt:?}) is not this pair's latest receipt ({latest:?}); only the latest can be refunded"
    )]
    NotLatestReceipt {
        job: JobId,
        receipt: Hash,
        latest: Option<Hash>,
    },
    #[error("deposit note {deposit_id} from {signer} was already recorded")]
    DuplicateDeposit { signer: String, deposit_id: String },
    #[error(
        "the deposit note is neither signed by this node nor for this node (owner {owner}, signer {signer}, account {account})"
    )]
    NotOurs {
        owner: String,
        signer: String,
        account: String,
    },
    /// A prepayment is this node's own statement of what it paid a provider: only its own
    /// signature counts.
    #[error("a prepayment note must be signed by this node ({owner}), not by {signer}")]
    PrepaidNotOurs { owner: String, signer: String },
    #[error("a node cannot hold, deposit or extend credit to itself")]
    SelfAccount,
    #[error(
        "a credit limit of {requested} tokens is below what the peer already uses ({in_use} tokens charged or held, {deposits} deposited)"
    )]
    CreditBelowUse {
        requested: MicroTokens,
        in_use: MicroTokens,
        deposits: MicroTokens,
    },
    #[error("{what} would overflow")]
    Overflow { what: &'static str },
    #[error("stored {tree:?} record {key} is corrupt: {reason}")]
    CorruptRecord {
        tree: TreeId,
        key: String,
        reason: String,
    },
    #[error("cannot encode a ledger record")]
    Encode(#[source] EncodeError),
    #[error("storage failed")]
    Store(#[source] StoreError),
    #[error("peer {peer} is not known to this ledger")]
    UnknownPeer { peer: PublicKey },
}

/// Why a ledger folder could not be opened. Nothing in the folder was changed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("ledger {path} is in use by another process (is a node running on this data folder?)")]
    Locked { path: PathBuf },
    #[error("{path} is not a pixmarket ledger: {reason}; refusing to touch it")]
    Foreign { path: PathBuf, reason: String },
    #[error("ledger {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "ledger {path} belongs to node {found}, not to this node {expected}; refusing to use another node's books"
    )]
    OtherOwner {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("ledger {path} has format version {found}; this build reads version {supported} only")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("cannot access ledger {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot initialise ledger {path}")]
    Init {
        path: PathBuf,
        #[source]
        source: Box<LedgerError>,
    },
}

/// The first thing `verify` or `import` found wrong. `seq` is the log entry, where one is to
/// blame.
#[derive(Debug, thiserror::Error)]
pub enum Inconsistency {
    #[error("log entry {seq}: expected sequence number {seq}, the entry says {found}")]
    Sequence { seq: u64, found: u64 },
    #[error("log entry {seq}: links to {found:?}, but the entry before it hashes to {expected:?}")]
    BrokenLink {
        seq: u64,
        expected: Hash,
        found: Hash,
    },
    #[error("log entry {seq} cannot be decoded: {reason}")]
    Undecodable { seq: u64, reason: String },
    #[error("log entry {seq} does not replay")]
    Rejected {
        seq: u64,
        #[source]
        source: LedgerError,
    },
    #[error(
        "the log ends at entry {log_len} but the head record says {head_len} entries with hash {head_hash:?}"
    )]
    Head {
        log_len: u64,
        head_len: u64,
        head_hash: Hash,
    },
    #[error("{tree:?} record {key}: replaying the log gives {expected}, the store holds {found}")]
    State {
        tree: TreeId,
        key: String,
        expected: String,
        found: String,
    },
    #[error("export line {line}: {reason}")]
    Format { line: usize, reason: String },
    #[error("log entry {seq}: its hash is {found:?}, the export says {expected:?}")]
    EntryHash {
        seq: u64,
        expected: Hash,
        found: Hash,
    },
    #[error("reading the ledger failed")]
    Read(#[source] LedgerError),
}

impl From<StoreError> for LedgerError {
    fn from(e: StoreError) -> Self {
        LedgerError::Store(e)
    }
}

impl From<EncodeError> for LedgerError {
    fn from(e: EncodeError) -> Self {
        LedgerError::Encode(e)
    }
}
