//! The rules: the one function that applies an operation to the state (`apply`), and the
//! checks it makes.
//!
//! `apply` is the only code that changes balances. Live operations run it inside a store
//! transaction; `verify` and `import` run the very same function over the log, so what is
//! checked is what was done. It reads nothing but its arguments and the transaction.
//!
//! The pair's chain: every receipt and credit note names the previous entry of the pair
//! (`prev_entry_hash`) and carries the cumulative charge after it; `check_link` enforces both
//! on each side, so a pair's chain is linear and its head says everything.

use std::fmt;

use pixmarket_protocol::{
    CreditNote, DepositNote, Hash, JobId, MicroTokens, PublicKey, Receipt, ReceiptAck, Signed,
    ValidationError,
};

use super::keys::*;
use super::records::*;
use crate::error::LedgerError;
use crate::store::{Abort, TreeId, Txn};

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

/// Checks a chain entry's links against the pair's account: it names the pair's head and its
/// cumulative total is `expected`.
fn check_link(
    acct: &Account,
    prev: Option<Hash>,
    cumulative: MicroTokens,
    expected: MicroTokens,
) -> Result<(), LedgerError> {
    if cumulative != expected {
        return Err(LedgerError::CumulativeMismatch {
            expected,
            got: cumulative,
        });
    }
    if prev != acct.last_entry {
        return Err(LedgerError::PrevReceiptMismatch {
            expected: acct.last_entry,
            got: prev,
        });
    }
    Ok(())
}

/// Checks a receipt's links and returns the pair's new charged total.
fn check_chain(acct: &Account, receipt: &Receipt) -> Result<MicroTokens, LedgerError> {
    let expected = add(acct.charged, receipt.cost, "the charged total")?;
    check_link(
        acct,
        receipt.prev_entry_hash,
        receipt.cumulative_charged,
        expected,
    )?;
    Ok(expected)
}

/// Checks a credit note's links and fields against the pair's account and the receipt it
/// credits; returns the pair's new charged total.
fn check_credit(
    acct: &Account,
    note: &CreditNote,
    receipt: &Signed<Receipt>,
    receipt_body: &Receipt,
) -> Result<MicroTokens, LedgerError> {
    note.validate().map_err(|source| LedgerError::Invalid {
        what: "credit note",
        source,
    })?;
    expect_eq("credit note job id", receipt_body.job_id, note.job_id)?;
    expect_eq("credited receipt", receipt.digest(), note.receipt_hash)?;
    expect_eq("credit note provider", receipt_body.provider, note.provider)?;
    expect_eq(
        "credit note requester",
        receipt_body.requester,
        note.requester,
    )?;
    expect_eq("credited amount", receipt_body.cost, note.amount)?;
    let expected = sub(acct.charged, note.amount, "the charged total")?;
    check_link(
        acct,
        note.prev_entry_hash,
        note.cumulative_charged,
        expected,
    )?;
    Ok(expected)
}

/// As requester: a provider's receipt for me, verified: its provider and body.
fn requester_receipt(
    owner: &PublicKey,
    receipt: &Signed<Receipt>,
) -> Result<(PublicKey, Receipt), LedgerError> {
    let provider = receipt.signer();
    let body = verify("receipt", receipt)?;
    expect_eq("receipt provider", provider, body.provider)?;
    expect_eq("receipt requester", *owner, body.requester)?;
    if provider == *owner {
        return Err(LedgerError::SelfAccount);
    }
    check_receipt(&body)?;
    Ok((provider, body))
}

/// As requester: stores a verified receipt (with my ack, or without one when it enters my
/// chain with its credit note) as the pair's next chain entry; a job id is recorded once.
fn append_requester_receipt(
    txn: &dyn Txn,
    acct: &mut Account,
    provider: PublicKey,
    receipt: &Signed<Receipt>,
    body: &Receipt,
    ack: Option<&Signed<ReceiptAck>>,
) -> Result<u64, Abort> {
    if txn
        .get(TreeId::Jobs, &job_key(Role::Requester, body.job_id))?
        .is_some()
    {
        return Err(LedgerError::DuplicateJob { job: body.job_id }.into());
    }
    acct.charged = check_chain(acct, body)?;
    let index = next_entry(acct, receipt.digest())?;
    put(
        txn,
        TreeId::Receipts,
        &receipt_key(Role::Requester, &provider, index),
        &StoredReceipt {
            role: Role::Requester,
            receipt: receipt.clone(),
            ack: ack.cloned(),
            refunded: None,
            undelivered: None,
        },
    )?;
    Ok(index)
}

/// Appends a chain entry's place to the account: the index it takes.
fn next_entry(acct: &mut Account, digest: Hash) -> Result<u64, LedgerError> {
    let index = acct.entries;
    acct.entries = index.checked_add(1).ok_or(LedgerError::Overflow {
        what: "the chain entry count",
    })?;
    acct.last_entry = Some(digest);
    Ok(index)
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

/// Where a settled job's receipt is, on `role`'s side: refused with `Refunded` for a refunded
/// or credited job and `NotSettled` for any other (unknown, held, voided, expired).
fn settled(txn: &dyn Txn, role: Role, job: JobId) -> Result<(PublicKey, u64), Abort> {
    match get::<JobOutcome>(txn, TreeId::Jobs, &job_key(role, job))? {
        Some(JobOutcome::Settled { peer, index }) => Ok((peer, index)),
        Some(JobOutcome::Refunded { reason, .. } | JobOutcome::Credited { reason, .. }) => {
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
/// Adds a deposit note's amount to `peer`'s account on `role`'s side, once per note (signer ‖
/// deposit id, shared by deposits and prepayments, so one note never counts twice).
fn count_deposit(
    txn: &dyn Txn,
    owner: &PublicKey,
    role: Role,
    peer: &PublicKey,
    signer: &PublicKey,
    body: &DepositNote,
) -> Result<(), Abort> {
    if peer == owner {
        return Err(LedgerError::SelfAccount.into());
    }
    let dkey = deposit_key(signer, &body.deposit_id);
    if txn.get(TreeId::Deposits, &dkey)?.is_some() {
        return Err(LedgerError::DuplicateDeposit {
            signer: signer.to_peer_id().to_string(),
            deposit_id: hex::encode(body.deposit_id),
        }
        .into());
    }
    let mut acct = account(txn, role, peer)?;
    acct.deposits = add(acct.deposits, body.amount, "the deposit total")?;
    put_account(txn, role, peer, &acct)?;
    txn.insert(TreeId::Deposits, &dkey, &[])
}

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
            count_deposit(txn, owner, role, &peer, &signer, &body)
        }

        Op::Prepaid { note } => {
            let body = verify("prepayment note", note)?;
            body.validate().map_err(|source| LedgerError::Invalid {
                what: "prepayment note",
                source,
            })?;
            let signer = note.signer();
            if signer != *owner {
                return Err(LedgerError::PrepaidNotOurs {
                    owner: owner.to_peer_id().to_string(),
                    signer: signer.to_peer_id().to_string(),
                }
                .into());
            }
            count_deposit(txn, owner, Role::Requester, &body.account, &signer, &body)
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
            // A hold is good until its request expires; a receipt issued later is refused, so
            // a requester that waited out the expiry may fail over knowing it owes nothing.
            if body.issued_at_ms > hold.expires_at_ms {
                return Err(LedgerError::HoldExpired {
                    job: *job,
                    expires_at_ms: hold.expires_at_ms,
                    issued_at_ms: body.issued_at_ms,
                }
                .into());
            }
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
            let index = next_entry(&mut acct, receipt.digest())?;
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
                    undelivered: None,
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
            let (peer, index) = settled(txn, Role::Provider, *job)?;
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
            let (provider, body) = requester_receipt(owner, receipt)?;
            signer_is("receipt ack", owner, &ack.signer())?;
            let ack_body = verify("receipt ack", ack)?;
            expect_eq("ack job id", body.job_id, ack_body.job_id)?;
            expect_eq("ack receipt hash", receipt.digest(), ack_body.receipt_hash)?;
            let mut acct = account(txn, Role::Requester, &provider)?;
            let index =
                append_requester_receipt(txn, &mut acct, provider, receipt, &body, Some(ack))?;
            put_account(txn, Role::Requester, &provider, &acct)?;
            put(
                txn,
                TreeId::Jobs,
                &job_key(Role::Requester, body.job_id),
                &JobOutcome::Settled {
                    peer: provider,
                    index,
                },
            )
        }

        Op::Refund { job, reason } => {
            check_reason("refund", reason)?;
            let (peer, index) = settled(txn, Role::Provider, *job)?;
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
            if acct.last_entry != Some(digest) {
                return Err(LedgerError::NotLatestReceipt {
                    job: *job,
                    receipt: digest,
                    latest: acct.last_entry,
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
            acct.last_entry = body.prev_entry_hash;
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

        Op::Credit { note } => {
            signer_is("credit note", owner, &note.signer())?;
            let body = verify("credit note", note)?;
            expect_eq("credit note provider", *owner, body.provider)?;
            let (peer, index) = settled(txn, Role::Provider, body.job_id)?;
            let stored = stored_receipt(txn, &receipt_key(Role::Provider, &peer, index))?;
            // An acknowledged receipt is the requester's commitment to pay, and may have
            // released the images: it is never credited.
            if stored.ack.is_some() {
                return Err(LedgerError::AlreadyAcked { job: body.job_id }.into());
            }
            let receipt_body = verify("receipt", &stored.receipt)?;
            let mut acct = account(txn, Role::Provider, &peer)?;
            acct.charged = check_credit(&acct, &body, &stored.receipt, &receipt_body)?;
            let note_index = next_entry(&mut acct, note.digest())?;
            put_account(txn, Role::Provider, &peer, &acct)?;
            put(
                txn,
                TreeId::Credits,
                &credit_key(Role::Provider, &peer, note_index),
                &StoredCredit {
                    role: Role::Provider,
                    note: note.clone(),
                },
            )?;
            put(
                txn,
                TreeId::Jobs,
                &job_key(Role::Provider, body.job_id),
                &JobOutcome::Credited {
                    peer,
                    index,
                    note_index,
                    reason: body.reason,
                },
            )
        }

        Op::RecordCredit { receipt, note } => {
            let provider = note.signer();
            if provider == *owner {
                return Err(LedgerError::SelfAccount.into());
            }
            let body = verify("credit note", note)?;
            expect_eq("credit note provider", provider, body.provider)?;
            expect_eq("credit note requester", *owner, body.requester)?;
            let jkey = job_key(Role::Requester, body.job_id);
            let mut acct = account(txn, Role::Requester, &provider)?;
            let (credited, index) = match receipt {
                // A receipt I never stored, so never acknowledged: it enters my chain only
                // together with the note that takes its charge back.
                Some(receipt) => {
                    signer_is("receipt", &provider, &receipt.signer())?;
                    let (_, rb) = requester_receipt(owner, receipt)?;
                    let index =
                        append_requester_receipt(txn, &mut acct, provider, receipt, &rb, None)?;
                    (receipt.clone(), index)
                }
                // A receipt I stored (and acknowledged, though the provider never got it).
                None => {
                    let (peer, index) = match get::<JobOutcome>(txn, TreeId::Jobs, &jkey)? {
                        Some(
                            JobOutcome::Settled { peer, index }
                            | JobOutcome::Undelivered { peer, index, .. },
                        ) => (peer, index),
                        Some(JobOutcome::Credited { reason, .. }) => {
                            return Err(LedgerError::Refunded {
                                job: body.job_id,
                                reason,
                            }
                            .into());
                        }
                        _ => return Err(LedgerError::NotSettled { job: body.job_id }.into()),
                    };
                    expect_eq("credit note provider", peer, provider)?;
                    let stored = stored_receipt(txn, &receipt_key(Role::Requester, &peer, index))?;
                    (stored.receipt, index)
                }
            };
            let rb = verify("receipt", &credited)?;
            acct.charged = check_credit(&acct, &body, &credited, &rb)?;
            let note_index = next_entry(&mut acct, note.digest())?;
            put_account(txn, Role::Requester, &provider, &acct)?;
            put(
                txn,
                TreeId::Credits,
                &credit_key(Role::Requester, &provider, note_index),
                &StoredCredit {
                    role: Role::Requester,
                    note: note.clone(),
                },
            )?;
            put(
                txn,
                TreeId::Jobs,
                &jkey,
                &JobOutcome::Credited {
                    peer: provider,
                    index,
                    note_index,
                    reason: body.reason,
                },
            )
        }

        Op::Undelivered { job, reason } => {
            check_reason("undelivered", reason)?;
            let jkey = job_key(Role::Requester, *job);
            let Some(JobOutcome::Settled { peer, index }) =
                get::<JobOutcome>(txn, TreeId::Jobs, &jkey)?
            else {
                return Err(LedgerError::NotSettled { job: *job }.into());
            };
            put(
                txn,
                TreeId::Jobs,
                &jkey,
                &JobOutcome::Undelivered {
                    peer,
                    index,
                    reason: reason.clone(),
                },
            )
        }

        Op::DeliveredLate { job } => {
            let jkey = job_key(Role::Requester, *job);
            let Some(JobOutcome::Undelivered { peer, index, .. }) =
                get::<JobOutcome>(txn, TreeId::Jobs, &jkey)?
            else {
                return Err(LedgerError::NotUndelivered { job: *job }.into());
            };
            put(
                txn,
                TreeId::Jobs,
                &jkey,
                &JobOutcome::Settled { peer, index },
            )
        }
    }
}
