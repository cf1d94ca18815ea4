//! The books: record types, key layouts, the logged operations ([`Op`]) and the one function
//! that applies an operation to the state (`apply`).
//!
//! `apply` is the only code that changes balances. Live operations run it inside a store
//! transaction; `verify` and `import` run the very same function over the log into a fresh
//! in-memory store, so what is checked is what was done. It reads nothing but its arguments
//! and the transaction (no clock, no randomness, no `HashMap` order), so a replay is exact.
//!
//! [`Op::Refund`] is the one operation that lowers `charged`: it undoes the settle of the
//! pair's latest, unacknowledged receipt whose image never reached the requester, rewinding
//! `last_receipt` to that receipt's `prev_receipt_hash` (see `Ledger::refund_undelivered`).
//!
//! Key layouts (all integers big-endian, so a scan runs in numeric order):
//! - accounts: peer key (32 bytes), one tree per [`Role`]
//! - holds: job id (16)
//! - jobs: role (1) ‖ job id (16)
//! - receipts: role (1) ‖ peer (32) ‖ index (8)
//! - deposits: signer (32) ‖ deposit id (16)

use std::fmt;

use pixmarket_protocol::codec;
use pixmarket_protocol::{
    DepositNote, Hash, JobId, MicroTokens, PublicKey, Receipt, ReceiptAck, Signed, ValidationError,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::store::{Abort, TreeId, Txn};

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
/// operator sets) and `charged`, which a refund of an undelivered receipt lowers again;
/// `charged` is also the pair's cumulative total that receipts carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Everything the peer prepaid (as provider) or I prepaid (as requester).
    pub deposits: MicroTokens,
    /// What the peer may owe beyond its deposits.
    pub credit_limit: MicroTokens,
    /// Everything charged by settled receipts, less refunded ones: the pair's cumulative
    /// total.
    pub charged: MicroTokens,
    /// The sum of open holds.
    pub held: MicroTokens,
    /// Number of receipts stored for the pair, refunded ones included (it is also the next
    /// receipt's index, so a refunded receipt keeps its place).
    pub receipts: u64,
    /// The signed digest of the pair's last receipt that still charges: a refund moves it
    /// back to the refunded receipt's `prev_receipt_hash`.
    pub last_receipt: Option<Hash>,
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
    /// Settled, then refunded by the provider because the image never reached the requester
    /// (`Ledger::refund_undelivered`). The receipt stays at `index` for audit but no longer
    /// charges. (Last, so the postcard encoding of the older variants is unchanged.)
    Refunded {
        peer: PublicKey,
        index: u64,
        reason: String,
    },
}

impl JobOutcome {
    /// Where the job's receipt is stored, for a settled or refunded job.
    pub fn receipt_at(&self) -> Option<(PublicKey, u64)> {
        match self {
            JobOutcome::Settled { peer, index } | JobOutcome::Refunded { peer, index, .. } => {
                Some((*peer, *index))
            }
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
        })
    }
}

/// A receipt as stored: the provider-signed receipt and, once it arrives, the requester's ack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReceipt {
    pub role: Role,
    pub receipt: Signed<Receipt>,
    pub ack: Option<Signed<ReceiptAck>>,
    /// `Some(reason)` when the provider refunded this receipt as undelivered: it is kept for
    /// audit but no longer charges. Not part of the stored record (whose bytes are unchanged
    /// by a refund); the readers (`Ledger::receipt`, `Ledger::receipts`) fill it in from the
    /// job's [`JobOutcome::Refunded`].
    #[serde(skip)]
    pub refunded: Option<String>,
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
    /// As provider: undoes the charge of a settled, unacknowledged receipt whose image never
    /// reached the requester. (Last, so older entries keep their encoding.)
    Refund {
        job: JobId,
        reason: String,
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
            Op::SetCreditLimit { peer, .. } => vec![*peer],
            Op::Hold { terms, .. } => vec![terms.requester],
            Op::Settle { receipt, .. } => receipt
                .verify()
                .map(|r| vec![r.requester])
                .unwrap_or_default(),
            Op::RecordReceipt { receipt, .. } => vec![receipt.signer()],
            // Void, expire, ack and refund name a job; the export resolves its peer from the
            // hold.
            Op::Void { .. } | Op::Expire { .. } | Op::Ack { .. } | Op::Refund { .. } => Vec::new(),
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
            | Op::Refund { job, .. } => Some(*job),
            Op::RecordReceipt { ack, .. } => ack.verify().ok().map(|a| a.job_id),
            Op::SetDefaultCredit { .. } | Op::Deposit { .. } | Op::SetCreditLimit { .. } => None,
        }
    }
}

// ---- keys -------------------------------------------------------------------------------

pub(crate) fn job_key(role: Role, job: JobId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = role.byte();
    k[1..].copy_from_slice(&job.0);
    k
}

pub(crate) fn receipt_key(role: Role, peer: &PublicKey, index: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = role.byte();
    k[1..33].copy_from_slice(peer.as_bytes());
    k[33..].copy_from_slice(&index.to_be_bytes());
    k
}

pub(crate) fn receipt_prefix(role: Role, peer: &PublicKey) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = role.byte();
    k[1..].copy_from_slice(peer.as_bytes());
    k
}

fn deposit_key(signer: &PublicKey, id: &[u8; 16]) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[..32].copy_from_slice(signer.as_bytes());
    k[32..].copy_from_slice(id);
    k
}

pub(crate) const DEFAULT_CREDIT_KEY: &[u8] = b"default_credit";

// ---- typed access -----------------------------------------------------------------------

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, LedgerError> {
    Ok(codec::encode("ledger record", value, MAX_RECORD)?)
}

pub(crate) fn decode<T: Serialize + DeserializeOwned>(
    tree: TreeId,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, LedgerError> {
    codec::decode("ledger record", bytes, MAX_RECORD).map_err(|e| LedgerError::CorruptRecord {
        tree,
        key: hex::encode(key),
        reason: e.to_string(),
    })
}

fn get<T: Serialize + DeserializeOwned>(
    txn: &dyn Txn,
    tree: TreeId,
    key: &[u8],
) -> Result<Option<T>, Abort> {
    match txn.get(tree, key)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(decode(tree, key, &bytes)?)),
    }
}

fn put<T: Serialize>(txn: &dyn Txn, tree: TreeId, key: &[u8], value: &T) -> Result<(), Abort> {
    txn.insert(tree, key, &encode(value)?)
}

fn default_credit(txn: &dyn Txn) -> Result<MicroTokens, Abort> {
    Ok(get(txn, TreeId::Settings, DEFAULT_CREDIT_KEY)?.unwrap_or(MicroTokens::ZERO))
}

/// The peer's account, or a new one with the ledger's current default credit. The default is
/// copied into the account when it is first touched, so changing the default later never
/// changes what an existing peer may use.
fn account(txn: &dyn Txn, role: Role, peer: &PublicKey) -> Result<Account, Abort> {
    match get(txn, role.accounts(), peer.as_bytes())? {
        Some(a) => Ok(a),
        None => Ok(Account {
            credit_limit: match role {
                Role::Provider => default_credit(txn)?,
                Role::Requester => MicroTokens::ZERO,
            },
            ..Account::default()
        }),
    }
}

fn put_account(txn: &dyn Txn, role: Role, peer: &PublicKey, a: &Account) -> Result<(), Abort> {
    put(txn, role.accounts(), peer.as_bytes(), a)
}

fn add(a: MicroTokens, b: MicroTokens, what: &'static str) -> Result<MicroTokens, LedgerError> {
    a.checked_add(b).ok_or(LedgerError::Overflow { what })
}

fn sub(a: MicroTokens, b: MicroTokens, what: &'static str) -> Result<MicroTokens, LedgerError> {
    a.checked_sub(b).ok_or(LedgerError::Overflow { what })
}

fn expect_eq<T: PartialEq + fmt::Debug>(
    field: &'static str,
    expected: T,
    got: T,
) -> Result<(), LedgerError> {
    if expected == got {
        Ok(())
    } else {
        Err(LedgerError::Mismatch {
            field,
            expected: format!("{expected:?}"),
            got: format!("{got:?}"),
        })
    }
}

fn signer_is(what: &'static str, expected: &PublicKey, got: &PublicKey) -> Result<(), LedgerError> {
    if expected == got {
        Ok(())
    } else {
        Err(LedgerError::WrongSigner {
            what,
            expected: expected.to_peer_id().to_string(),
            got: got.to_peer_id().to_string(),
        })
    }
}

/// Checks a receipt's links against the pair's account: the cumulative total and the
/// previous receipt.
fn check_chain(acct: &Account, receipt: &Receipt) -> Result<MicroTokens, LedgerError> {
    let expected = add(acct.charged, receipt.cost, "the charged total")?;
    if receipt.cumulative_charged != expected {
        return Err(LedgerError::CumulativeMismatch {
            expected,
            got: receipt.cumulative_charged,
        });
    }
    if receipt.prev_receipt_hash != acct.last_receipt {
        return Err(LedgerError::PrevReceiptMismatch {
            expected: acct.last_receipt,
            got: receipt.prev_receipt_hash,
        });
    }
    Ok(expected)
}

fn check_receipt(receipt: &Receipt) -> Result<(), LedgerError> {
    receipt.validate().map_err(|source| LedgerError::Invalid {
        what: "receipt",
        source,
    })?;
    receipt.check_cost().map_err(LedgerError::WrongCost)
}

fn verify<T: pixmarket_protocol::Message>(
    what: &'static str,
    s: &Signed<T>,
) -> Result<T, LedgerError> {
    s.verify()
        .map_err(|source| LedgerError::BadSignature { what, source })
}

fn finished(txn: &dyn Txn, role: Role, job: JobId) -> Result<LedgerError, Abort> {
    Ok(
        match get::<JobOutcome>(txn, TreeId::Jobs, &job_key(role, job))? {
            Some(outcome) => LedgerError::AlreadyFinished { job, outcome },
            None => LedgerError::UnknownHold { job },
        },
    )
}

fn check_reason(what: &'static str, reason: &str) -> Result<(), LedgerError> {
    let n = reason.chars().count();
    if n > MAX_REASON_CHARS {
        return Err(LedgerError::Invalid {
            what,
            source: ValidationError::new(
                "reason",
                format!("{n} characters"),
                format!("at most {MAX_REASON_CHARS}"),
            ),
        });
    }
    Ok(())
}

/// Where a provider-side settled job's receipt is: refused with `Refunded` for a refunded
/// job and `NotSettled` for any other (unknown, held, voided, expired).
fn settled(txn: &dyn Txn, job: JobId) -> Result<(PublicKey, u64), Abort> {
    match get::<JobOutcome>(txn, TreeId::Jobs, &job_key(Role::Provider, job))? {
        Some(JobOutcome::Settled { peer, index }) => Ok((peer, index)),
        Some(JobOutcome::Refunded { reason, .. }) => {
            Err(LedgerError::Refunded { job, reason }.into())
        }
        _ => Err(LedgerError::NotSettled { job }.into()),
    }
}

fn stored_receipt(txn: &dyn Txn, rkey: &[u8]) -> Result<StoredReceipt, Abort> {
    get::<StoredReceipt>(txn, TreeId::Receipts, rkey)?.ok_or_else(|| {
        LedgerError::CorruptRecord {
            tree: TreeId::Receipts,
            key: hex::encode(rkey),
            reason: "a settled job's receipt is missing".into(),
        }
        .into()
    })
}

/// Releases an open hold, returning it.
fn release(txn: &dyn Txn, job: JobId) -> Result<Hold, Abort> {
    let Some(hold) = get::<Hold>(txn, TreeId::Holds, &job.0)? else {
        return Err(finished(txn, Role::Provider, job)?.into());
    };
    let mut acct = account(txn, Role::Provider, &hold.requester)?;
    acct.held = sub(acct.held, hold.max_cost, "the held total")?;
    put_account(txn, Role::Provider, &hold.requester, &acct)?;
    txn.remove(TreeId::Holds, &job.0)?;
    Ok(hold)
}

/// Applies `op` for the ledger owned by `owner`: checks every rule and signature, then writes.
/// A refusal returns `Abort::Refused` and the caller discards the transaction.
pub(crate) fn apply(txn: &dyn Txn, owner: &PublicKey, op: &Op) -> Result<(), Abort> {
    match op {
        Op::SetDefaultCredit { amount } => put(txn, TreeId::Settings, DEFAULT_CREDIT_KEY, amount),

        Op::Deposit { note } => {
            let body = verify("deposit note", note)?;
            body.validate().map_err(|source| LedgerError::Invalid {
                what: "deposit note",
                source,
            })?;
            let signer = note.signer();
            let (role, peer) = if signer == *owner {
                (Role::Provider, body.account)
            } else if body.account == *owner {
                (Role::Requester, signer)
            } else {
                return Err(LedgerError::NotOurs {
                    owner: owner.to_peer_id().to_string(),
                    signer: signer.to_peer_id().to_string(),
                    account: body.account.to_peer_id().to_string(),
                }
                .into());
            };
            if peer == *owner {
                return Err(LedgerError::SelfAccount.into());
            }
            let dkey = deposit_key(&signer, &body.deposit_id);
            if txn.get(TreeId::Deposits, &dkey)?.is_some() {
                return Err(LedgerError::DuplicateDeposit {
                    signer: signer.to_peer_id().to_string(),
                    deposit_id: hex::encode(body.deposit_id),
                }
                .into());
            }
            let mut acct = account(txn, role, &peer)?;
            acct.deposits = add(acct.deposits, body.amount, "the deposit total")?;
            put_account(txn, role, &peer, &acct)?;
            txn.insert(TreeId::Deposits, &dkey, &[])
        }

        Op::SetCreditLimit { role, peer, amount } => {
            if peer == owner {
                return Err(LedgerError::SelfAccount.into());
            }
            let mut acct = account(txn, *role, peer)?;
            let in_use = acct.in_use().ok_or(LedgerError::Overflow {
                what: "the charged and held total",
            })?;
            let allowed = add(acct.deposits, *amount, "deposits plus credit")?;
            if *role == Role::Provider && allowed < in_use {
                return Err(LedgerError::CreditBelowUse {
                    requested: *amount,
                    in_use,
                    deposits: acct.deposits,
                }
                .into());
            }
            acct.credit_limit = *amount;
            put_account(txn, *role, peer, &acct)
        }

        Op::Hold { terms, now_ms } => {
            if terms.requester == *owner {
                return Err(LedgerError::SelfAccount.into());
            }
            let jkey = job_key(Role::Provider, terms.job);
            if txn.get(TreeId::Jobs, &jkey)?.is_some() {
                return Err(LedgerError::DuplicateJob { job: terms.job }.into());
            }
            if terms.expires_at_ms <= *now_ms {
                return Err(LedgerError::Expired {
                    expires_at_ms: terms.expires_at_ms,
                    now_ms: *now_ms,
                }
                .into());
            }
            if terms.max_cost == MicroTokens::ZERO {
                return Err(LedgerError::Invalid {
                    what: "hold",
                    source: ValidationError::new("max_cost", "0", "more than 0 tokens"),
                }
                .into());
            }
            let mut acct = account(txn, Role::Provider, &terms.requester)?;
            let available = acct.available().unwrap_or(MicroTokens::ZERO);
            if terms.max_cost > available {
                return Err(LedgerError::InsufficientCredit {
                    needed: terms.max_cost,
                    available,
                }
                .into());
            }
            acct.held = add(acct.held, terms.max_cost, "the held total")?;
            put_account(txn, Role::Provider, &terms.requester, &acct)?;
            put(
                txn,
                TreeId::Holds,
                &terms.job.0,
                &Hold {
                    requester: terms.requester,
                    max_cost: terms.max_cost,
                    expires_at_ms: terms.expires_at_ms,
                    request_hash: terms.request_hash,
                },
            )?;
            put(txn, TreeId::Jobs, &jkey, &JobOutcome::Held)
        }

        Op::Settle { job, receipt } => {
            let Some(hold) = get::<Hold>(txn, TreeId::Holds, &job.0)? else {
                return Err(finished(txn, Role::Provider, *job)?.into());
            };
            signer_is("receipt", owner, &receipt.signer())?;
            let body = verify("receipt", receipt)?;
            expect_eq("receipt job id", *job, body.job_id)?;
            expect_eq("receipt provider", *owner, body.provider)?;
            expect_eq("receipt requester", hold.requester, body.requester)?;
            if let Some(h) = hold.request_hash {
                expect_eq("receipt request hash", h, body.request_hash)?;
            }
            check_receipt(&body)?;
            if body.cost > hold.max_cost {
                return Err(LedgerError::ChargeExceedsHold {
                    cost: body.cost,
                    held: hold.max_cost,
                }
                .into());
            }
            release(txn, *job)?;
            let mut acct = account(txn, Role::Provider, &hold.requester)?;
            acct.charged = check_chain(&acct, &body)?;
            let index = acct.receipts;
            acct.receipts = index.checked_add(1).ok_or(LedgerError::Overflow {
                what: "the receipt count",
            })?;
            acct.last_receipt = Some(receipt.digest());
            put_account(txn, Role::Provider, &hold.requester, &acct)?;
            put(
                txn,
                TreeId::Receipts,
                &receipt_key(Role::Provider, &hold.requester, index),
                &StoredReceipt {
                    role: Role::Provider,
                    receipt: receipt.clone(),
                    ack: None,
                    refunded: None,
                },
            )?;
            put(
                txn,
                TreeId::Jobs,
                &job_key(Role::Provider, *job),
                &JobOutcome::Settled {
                    peer: hold.requester,
                    index,
                },
            )
        }

        Op::Void { job, reason } => {
            check_reason("void", reason)?;
            release(txn, *job)?;
            put(
                txn,
                TreeId::Jobs,
                &job_key(Role::Provider, *job),
                &JobOutcome::Voided,
            )
        }

        Op::Expire { job, now_ms } => {
            let Some(hold) = get::<Hold>(txn, TreeId::Holds, &job.0)? else {
                return Err(finished(txn, Role::Provider, *job)?.into());
            };
            if hold.expires_at_ms > *now_ms {
                return Err(LedgerError::NotExpired {
                    job: *job,
                    expires_at_ms: hold.expires_at_ms,
                }
                .into());
            }
            release(txn, *job)?;
            put(
                txn,
                TreeId::Jobs,
                &job_key(Role::Provider, *job),
                &JobOutcome::Expired,
            )
        }

        Op::Ack { job, ack } => {
            let (peer, index) = settled(txn, *job)?;
            let rkey = receipt_key(Role::Provider, &peer, index);
            let mut stored = stored_receipt(txn, &rkey)?;
            if stored.ack.is_some() {
                return Err(LedgerError::AlreadyAcked { job: *job }.into());
            }
            signer_is("receipt ack", &peer, &ack.signer())?;
            let body = verify("receipt ack", ack)?;
            expect_eq("ack job id", *job, body.job_id)?;
            expect_eq(
                "ack receipt hash",
                stored.receipt.digest(),
                body.receipt_hash,
            )?;
            stored.ack = Some(ack.clone());
            put(txn, TreeId::Receipts, &rkey, &stored)
        }

        Op::RecordReceipt { receipt, ack } => {
            let provider = receipt.signer();
            let body = verify("receipt", receipt)?;
            expect_eq("receipt provider", provider, body.provider)?;
            expect_eq("receipt requester", *owner, body.requester)?;
            if provider == *owner {
                return Err(LedgerError::SelfAccount.into());
            }
            check_receipt(&body)?;
            signer_is("receipt ack", owner, &ack.signer())?;
            let ack_body = verify("receipt ack", ack)?;
            expect_eq("ack job id", body.job_id, ack_body.job_id)?;
            expect_eq("ack receipt hash", receipt.digest(), ack_body.receipt_hash)?;
            let jkey = job_key(Role::Requester, body.job_id);
            if txn.get(TreeId::Jobs, &jkey)?.is_some() {
                return Err(LedgerError::DuplicateJob { job: body.job_id }.into());
            }
            let mut acct = account(txn, Role::Requester, &provider)?;
            acct.charged = check_chain(&acct, &body)?;
            let index = acct.receipts;
            acct.receipts = index.checked_add(1).ok_or(LedgerError::Overflow {
                what: "the receipt count",
            })?;
            acct.last_receipt = Some(receipt.digest());
            put_account(txn, Role::Requester, &provider, &acct)?;
            put(
                txn,
                TreeId::Receipts,
                &receipt_key(Role::Requester, &provider, index),
                &StoredReceipt {
                    role: Role::Requester,
                    receipt: receipt.clone(),
                    ack: Some(ack.clone()),
                    refunded: None,
                },
            )?;
            put(
                txn,
                TreeId::Jobs,
                &jkey,
                &JobOutcome::Settled {
                    peer: provider,
                    index,
                },
            )
        }

        Op::Refund { job, reason } => {
            check_reason("refund", reason)?;
            let (peer, index) = settled(txn, *job)?;
            let rkey = receipt_key(Role::Provider, &peer, index);
            let stored = stored_receipt(txn, &rkey)?;
            // An acknowledged receipt was delivered: it is paid, not refunded.
            if stored.ack.is_some() {
                return Err(LedgerError::AlreadyAcked { job: *job }.into());
            }
            let digest = stored.receipt.digest();
            let mut acct = account(txn, Role::Provider, &peer)?;
            // Only the pair's latest receipt: the chain is then rewound by exactly one link, to
            // what the requester (who never stored this receipt) still holds. The provider
            // settles one job per requester at a time, so this holds in practice.
            if acct.last_receipt != Some(digest) {
                return Err(LedgerError::NotLatestReceipt {
                    job: *job,
                    receipt: digest,
                    latest: acct.last_receipt,
                }
                .into());
            }
            let body = verify("receipt", &stored.receipt)?;
            expect_eq(
                "the refunded receipt's cumulative total",
                acct.charged,
                body.cumulative_charged,
            )?;
            acct.charged = sub(acct.charged, body.cost, "the charged total")?;
            acct.last_receipt = body.prev_receipt_hash;
            put_account(txn, Role::Provider, &peer, &acct)?;
            // The receipt record itself stays byte for byte: the outcome marks it refunded.
            put(
                txn,
                TreeId::Jobs,
                &job_key(Role::Provider, *job),
                &JobOutcome::Refunded {
                    peer,
                    index,
                    reason: reason.clone(),
                },
            )
        }
    }
}
