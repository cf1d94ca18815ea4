//! Credit notes (the append-only correction of a settled, unacknowledged receipt) on both
//! sides of a pair: what the provider may credit, how the requester records the note, that the
//! pair's chain stays linear and equal on both sides, the requester's mark for an acked job
//! that was never delivered, and that verify, reopen, export and import carry all of it.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use pixmarket_ledger::books::MAX_REASON_CHARS;
use pixmarket_ledger::{
    Account, Inconsistency, JobOutcome, Ledger, LedgerError, MemStore, ReceiptLink, Role, TreeId,
    import,
};
use pixmarket_protocol::{ChainEntry, CreditNote, MicroTokens, Receipt, Signed};

fn provider_ledger() -> Ledger {
    Ledger::with_store(Arc::new(MemStore::new()), provider().public()).unwrap()
}

/// Requester 0's own books, in memory.
fn mirror_ledger() -> Ledger {
    Ledger::with_store(Arc::new(MemStore::new()), requester(0).public()).unwrap()
}

/// A provider ledger with one delivered (acked) receipt for requester 0 (job 1, 5 tokens),
/// then a second job settled but never acknowledged (job 2, 8 tokens). Returns the two
/// receipts, and the link and account as they were just before the second settle.
fn settled_undelivered(l: &Ledger) -> (Signed<Receipt>, Signed<Receipt>, ReceiptLink, Account) {
    let (p, r) = (provider(), requester(0));
    l.deposit(&deposit_note(&p, r.public(), 1, tokens(40)))
        .unwrap();
    l.hold(terms(job(1), r.public(), tokens(10)), 0).unwrap();
    let rc1 = receipt(l, &p, r.public(), job(1), 10); // 5 tokens
    l.settle(job(1), &rc1).unwrap();
    l.attach_ack(job(1), &ack(&r, &rc1)).unwrap();
    l.hold(terms(job(2), r.public(), tokens(10)), 0).unwrap();
    let link = l.receipt_link(&r.public()).unwrap();
    let before = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    let rc2 = receipt(l, &p, r.public(), job(2), 16); // 8 tokens
    l.settle(job(2), &rc2).unwrap();
    (rc1, rc2, link, before)
}

/// Holds and settles job `n` for requester 0 with `settle_with`; the receipt is not acked.
fn settle_next(l: &Ledger, n: u64, steps: u32) -> Signed<Receipt> {
    let (p, r) = (provider(), requester(0).public());
    l.hold(terms(job(n), r, tokens(10)), 0).unwrap();
    l.settle_with(job(n), &p, |link| {
        receipt_body(p.public(), r, job(n), steps, link)
    })
    .unwrap()
}

/// Everything a refused call must leave as it was: the log head, the pair's account, jobs 1 to
/// 9, every receipt and the pair's chain.
type State = (
    pixmarket_ledger::Head,
    Option<Account>,
    Vec<Option<JobOutcome>>,
    Vec<pixmarket_ledger::StoredReceipt>,
    Vec<ChainEntry>,
);

fn state(l: &Ledger, role: Role, peer: &pixmarket_protocol::PublicKey) -> State {
    (
        l.head().unwrap(),
        l.account(role, peer).unwrap(),
        (1..=9).map(|n| l.job(role, job(n)).unwrap()).collect(),
        l.receipts(None).unwrap(),
        full_chain(l, role, peer),
    )
}

/// Both sides agree: the same head, the same chain (linear), the same total and entry count.
fn assert_same_books(provider_side: &Ledger, requester_side: &Ledger) {
    let (p, r) = (provider().public(), requester(0).public());
    let head = provider_side.chain_head(Role::Provider, &r).unwrap();
    assert!(head.is_some());
    assert_eq!(
        requester_side.chain_head(Role::Requester, &p).unwrap(),
        head
    );
    let chain = full_chain(provider_side, Role::Provider, &r);
    assert_eq!(full_chain(requester_side, Role::Requester, &p), chain);
    let total = assert_linear(&chain);
    let len = u64::try_from(chain.len()).unwrap();
    let a = provider_side.account(Role::Provider, &r).unwrap().unwrap();
    let m = requester_side
        .account(Role::Requester, &p)
        .unwrap()
        .unwrap();
    assert_eq!((a.charged, a.entries, a.last_entry), (total, len, head));
    assert_eq!((m.charged, m.entries, m.last_entry), (total, len, head));
}

#[test]
fn credit_takes_back_the_charge_with_a_new_chain_entry() {
    let l = provider_ledger();
    let (p, r) = (provider(), requester(0));
    let (rc1, rc2, link, before) = settled_undelivered(&l);
    let settled = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    assert_eq!(settled.charged, tokens(13));
    assert_eq!(settled.last_entry, Some(rc2.digest()));

    let note = l
        .credit(job(2), &p, "requester unreachable", 5_000)
        .unwrap();
    assert_eq!(note.signer(), p.public());
    assert_eq!(
        note.verify().unwrap(),
        CreditNote {
            job_id: job(2),
            receipt_hash: rc2.digest(),
            provider: p.public(),
            requester: r.public(),
            amount: tokens(8),
            cumulative_charged: tokens(5),
            prev_entry_hash: Some(rc2.digest()),
            reason: "requester unreachable".into(),
            issued_at_ms: 5_000,
        }
    );
    let a = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    // Charged back to before the settle; the hold was released by the settle.
    assert_eq!(a.charged, before.charged);
    assert_eq!(a.held, MicroTokens::ZERO);
    assert_eq!(a.available(), Some(tokens(35)));
    // Append-only: the note is a new entry after the receipt, and the head moves forward.
    assert_eq!(a.entries, before.entries + 2);
    assert_eq!(a.last_entry, Some(note.digest()));
    assert_eq!(
        l.receipt_link(&r.public()).unwrap(),
        ReceiptLink {
            charged_so_far: link.charged_so_far,
            prev_entry_hash: Some(note.digest()),
        }
    );
    assert_eq!(
        l.chain(Role::Provider, &r.public(), None).unwrap(),
        vec![
            ChainEntry::Receipt(rc1.clone()),
            ChainEntry::Receipt(rc2.clone()),
            ChainEntry::Credit(note.clone()),
        ]
    );
    assert_eq!(
        assert_linear(&full_chain(&l, Role::Provider, &r.public())),
        tokens(5)
    );
    assert_eq!(
        l.chain_head(Role::Provider, &r.public()).unwrap(),
        Some(note.digest())
    );
    // Reading after an entry, after the head, and after an entry the pair does not have.
    assert_eq!(
        l.chain(Role::Provider, &r.public(), Some(rc2.digest()))
            .unwrap(),
        vec![ChainEntry::Credit(note.clone())]
    );
    assert!(
        l.chain(Role::Provider, &r.public(), Some(note.digest()))
            .unwrap()
            .is_empty()
    );
    let stranger = pixmarket_protocol::Hash::of(b"not an entry");
    assert!(matches!(
        l.chain(Role::Provider, &r.public(), Some(stranger)),
        Err(LedgerError::UnknownEntry { after }) if after == stranger
    ));

    // The receipt is kept, marked credited, everywhere it is read.
    assert_eq!(
        l.job(Role::Provider, job(2)).unwrap(),
        Some(JobOutcome::Credited {
            peer: r.public(),
            index: 1,
            note_index: 2,
            reason: "requester unreachable".into()
        })
    );
    let stored = l.receipt(Role::Provider, job(2)).unwrap().unwrap();
    assert_eq!(stored.receipt, rc2);
    assert_eq!(stored.refunded.as_deref(), Some("requester unreachable"));
    assert!(stored.ack.is_none());
    let all = l.receipts(Some(&r.public())).unwrap();
    assert_eq!(
        all.iter().map(|s| s.refunded.clone()).collect::<Vec<_>>(),
        vec![None, Some("requester unreachable".into())]
    );
    assert_eq!(l.receipts(None).unwrap(), all);
    assert!(
        l.receipt(Role::Provider, job(1))
            .unwrap()
            .unwrap()
            .refunded
            .is_none()
    );

    // A late ack is refused, the job id stays used, and the job cannot be settled again.
    let head = l.head().unwrap();
    assert!(matches!(
        l.attach_ack(job(2), &ack(&r, &rc2)),
        Err(LedgerError::Refunded { .. })
    ));
    assert!(matches!(
        l.settle(job(2), &rc2),
        Err(LedgerError::AlreadyFinished {
            outcome: JobOutcome::Credited { .. },
            ..
        })
    ));
    assert!(matches!(
        l.hold(terms(job(2), r.public(), tokens(1)), 0),
        Err(LedgerError::DuplicateJob { .. })
    ));
    assert_eq!(l.head().unwrap(), head);

    // The next receipt links after the credit note.
    l.hold(terms(job(3), r.public(), tokens(10)), 0).unwrap();
    let rc3 = receipt(&l, &p, r.public(), job(3), 12); // 6 tokens
    let body = rc3.verify().unwrap();
    assert_eq!(
        (body.prev_entry_hash, body.cumulative_charged),
        (Some(note.digest()), tokens(11))
    );
    l.settle(job(3), &rc3).unwrap();
    l.attach_ack(job(3), &ack(&r, &rc3)).unwrap();
    let a = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    assert_eq!((a.charged, a.entries), (tokens(11), 4));
    assert_eq!(a.last_entry, Some(rc3.digest()));

    let report = l.verify().unwrap();
    assert_eq!(
        (
            report.receipts,
            report.acked_receipts,
            report.refunded_receipts,
            report.credit_notes,
        ),
        (3, 2, 1, 1)
    );
}

#[test]
fn credit_refusals_are_typed_and_change_nothing() {
    let l = provider_ledger();
    let (p, r) = (provider(), requester(0));
    let (rc1, _, _, _) = settled_undelivered(&l);
    // A third job settled after the second, a fourth only held, a fifth voided.
    let rc3 = settle_next(&l, 3, 10);
    l.hold(terms(job(4), r.public(), tokens(10)), 0).unwrap();
    l.hold(terms(job(5), r.public(), tokens(1)), 0).unwrap();
    l.void(job(5), "cancelled").unwrap();

    let before = state(&l, Role::Provider, &r.public());
    let refuse = |n: u64| l.credit(job(n), &p, "undelivered", 9_000).unwrap_err();
    // Acknowledged: the requester committed to pay (and may hold the images).
    assert!(
        matches!(refuse(1), LedgerError::AlreadyAcked { .. }),
        "acked"
    );
    // Held, voided, never seen.
    assert!(matches!(refuse(4), LedgerError::NotSettled { .. }), "held");
    assert!(
        matches!(refuse(5), LedgerError::NotSettled { .. }),
        "voided"
    );
    assert!(
        matches!(refuse(9), LedgerError::NotSettled { .. }),
        "unknown"
    );
    // Only the ledger owner's key signs its credit notes.
    assert!(matches!(
        l.credit(job(2), &requester(5), "forged", 9_000),
        Err(LedgerError::NotOwnerKey)
    ));
    // A reason the protocol refuses (a NUL character).
    assert!(matches!(
        l.credit(job(2), &p, "bad\0reason", 9_000),
        Err(LedgerError::Invalid { .. })
    ));
    assert_eq!(state(&l, Role::Provider, &r.public()), before);

    // A receipt with later entries after it can be credited: nothing is rewound.
    let note2 = l.credit(job(2), &p, "partitioned", 9_000).unwrap();
    assert_eq!(note2.verify().unwrap().prev_entry_hash, Some(rc3.digest()));
    let after_one = state(&l, Role::Provider, &r.public());
    assert!(matches!(refuse(2), LedgerError::Refunded { .. }), "twice");
    assert_eq!(state(&l, Role::Provider, &r.public()), after_one);
    // A reason longer than the bound is cut to it.
    let long = "x".repeat(MAX_REASON_CHARS + 10);
    let note3 = l.credit(job(3), &p, &long, 9_001).unwrap();
    assert_eq!(
        note3.verify().unwrap().reason.chars().count(),
        MAX_REASON_CHARS
    );
    let a = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    assert_eq!(
        (a.charged, a.entries, a.last_entry),
        (tokens(5), 5, Some(note3.digest()))
    );
    assert_eq!(
        assert_linear(&full_chain(&l, Role::Provider, &r.public())),
        tokens(5)
    );
    // The delivered receipt is still refused, the credited ones too.
    let after_two = state(&l, Role::Provider, &r.public());
    assert!(matches!(refuse(1), LedgerError::AlreadyAcked { .. }));
    assert!(matches!(refuse(3), LedgerError::Refunded { .. }));
    assert_eq!(state(&l, Role::Provider, &r.public()), after_two);
    let report = l.verify().unwrap();
    assert_eq!((report.refunded_receipts, report.credit_notes), (2, 2));

    // Only as provider: a requester's books have nothing to credit.
    let mirror = mirror_ledger();
    mirror.record_receipt(&rc1, &ack(&r, &rc1)).unwrap();
    assert!(matches!(
        mirror.credit(job(1), &r, "undelivered", 9_000),
        Err(LedgerError::NotSettled { .. })
    ));
    mirror.verify().unwrap();
}

/// The provider credits a receipt the requester never stored (it never acked it): the
/// requester records the receipt and its note together, and both chains are equal.
#[test]
fn chain_after_credits_is_linear_on_both_sides() {
    let l = provider_ledger();
    let (p, r) = (provider(), requester(0));
    let mirror = mirror_ledger();
    let (rc1, rc2, _, _) = settled_undelivered(&l);
    mirror.record_receipt(&rc1, &ack(&r, &rc1)).unwrap();
    let note2 = l.credit(job(2), &p, "no ack", 5_000).unwrap();
    mirror.record_credit(Some(&rc2), &note2).unwrap();
    assert_same_books(&l, &mirror);
    // Twice more: a credited receipt right after a credit note, then a delivered one.
    let rc3 = settle_next(&l, 3, 6);
    let note3 = l.credit(job(3), &p, "refused", 6_000).unwrap();
    mirror.record_credit(Some(&rc3), &note3).unwrap();
    let rc4 = settle_next(&l, 4, 14);
    l.attach_ack(job(4), &ack(&r, &rc4)).unwrap();
    mirror.record_receipt(&rc4, &ack(&r, &rc4)).unwrap();
    assert_same_books(&l, &mirror);
    let m = mirror
        .account(Role::Requester, &p.public())
        .unwrap()
        .unwrap();
    assert_eq!((m.charged, m.entries), (tokens(12), 6));

    // The requester's side marks the receipts it holds without an ack as credited.
    assert_eq!(
        mirror.job(Role::Requester, job(2)).unwrap(),
        Some(JobOutcome::Credited {
            peer: p.public(),
            index: 1,
            note_index: 2,
            reason: "no ack".into()
        })
    );
    let stored = mirror.receipt(Role::Requester, job(3)).unwrap().unwrap();
    assert_eq!(
        (stored.receipt, stored.ack, stored.refunded.as_deref()),
        (rc3, None, Some("refused"))
    );
    // Recorded once: the same note again is refused, with or without its receipt.
    let before = state(&mirror, Role::Requester, &p.public());
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &note2),
        Err(LedgerError::DuplicateJob { .. })
    ));
    assert!(matches!(
        mirror.record_credit(None, &note2),
        Err(LedgerError::Refunded { .. })
    ));
    assert_eq!(state(&mirror, Role::Requester, &p.public()), before);

    let report = mirror.verify().unwrap();
    assert_eq!(
        (
            report.receipts,
            report.acked_receipts,
            report.refunded_receipts,
            report.credit_notes,
        ),
        (4, 2, 2, 2)
    );
    l.verify().unwrap();
}

/// The requester stored and acked the receipt but its ack never reached the provider, who
/// credited it: the requester records the note alone and is charged back.
#[test]
fn credit_of_a_receipt_the_requester_stored_when_the_ack_was_lost() {
    let l = provider_ledger();
    let (p, r) = (provider(), requester(0));
    let mirror = mirror_ledger();
    let (rc1, rc2, _, _) = settled_undelivered(&l);
    mirror.record_receipt(&rc1, &ack(&r, &rc1)).unwrap();
    mirror.record_receipt(&rc2, &ack(&r, &rc2)).unwrap();
    let charged = |m: &Ledger| {
        m.account(Role::Requester, &p.public())
            .unwrap()
            .unwrap()
            .charged
    };
    assert_eq!(charged(&mirror), tokens(13));

    let note = l.credit(job(2), &p, "ack never came", 5_000).unwrap();
    // With the receipt again, it would be stored twice.
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &note),
        Err(LedgerError::DuplicateJob { .. })
    ));
    mirror.record_credit(None, &note).unwrap();
    assert_eq!(charged(&mirror), tokens(5));
    assert_same_books(&l, &mirror);
    assert!(matches!(
        mirror.job(Role::Requester, job(2)).unwrap(),
        Some(JobOutcome::Credited {
            index: 1,
            note_index: 2,
            ..
        })
    ));
    // The requester's own ack is kept with the receipt, now marked credited.
    let stored = mirror.receipt(Role::Requester, job(2)).unwrap().unwrap();
    assert!(stored.ack.is_some());
    assert_eq!(stored.refunded.as_deref(), Some("ack never came"));
    // The lost ack arriving late at the provider is refused: the books stay equal.
    assert!(matches!(
        l.attach_ack(job(2), &ack(&r, &rc2)),
        Err(LedgerError::Refunded { .. })
    ));
    assert!(matches!(
        mirror.record_credit(None, &note),
        Err(LedgerError::Refunded { .. })
    ));
    assert_same_books(&l, &mirror);
    mirror.verify().unwrap();
}

#[test]
fn record_credit_refuses_a_note_that_does_not_link_to_the_head() {
    let l = provider_ledger();
    let (p, r) = (provider(), requester(0));
    let mirror = mirror_ledger();
    let (rc1, rc2, _, _) = settled_undelivered(&l);
    mirror.record_receipt(&rc1, &ack(&r, &rc1)).unwrap();
    // The provider settles job 3 after job 2, then credits job 2: its note follows receipt 3,
    // which this requester has not seen.
    let _rc3 = settle_next(&l, 3, 10);
    let note = l.credit(job(2), &p, "no ack", 5_000).unwrap();
    let before = state(&mirror, Role::Requester, &p.public());
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &note),
        Err(LedgerError::CumulativeMismatch { .. })
    ));
    // A note with the right total that names another previous entry, or none.
    let body = note.verify().unwrap();
    for prev in [None, Some(rc1.digest()), Some(note.digest())] {
        let skewed = sign(
            &p,
            &CreditNote {
                prev_entry_hash: prev,
                cumulative_charged: tokens(5),
                ..body.clone()
            },
        );
        assert!(
            matches!(
                mirror.record_credit(Some(&rc2), &skewed),
                Err(LedgerError::PrevReceiptMismatch { .. })
            ),
            "prev {prev:?}"
        );
    }
    assert_eq!(state(&mirror, Role::Requester, &p.public()), before);
    // A note for a receipt this requester stored, not naming its head.
    mirror.record_receipt(&rc2, &ack(&r, &rc2)).unwrap();
    let before_none = state(&mirror, Role::Requester, &p.public());
    let stale = sign(
        &p,
        &CreditNote {
            prev_entry_hash: Some(rc1.digest()),
            cumulative_charged: tokens(5),
            ..body.clone()
        },
    );
    assert!(matches!(
        mirror.record_credit(None, &stale),
        Err(LedgerError::PrevReceiptMismatch { .. })
    ));
    assert!(matches!(
        mirror.record_credit(None, &note),
        Err(LedgerError::CumulativeMismatch { .. })
    ));
    assert_eq!(state(&mirror, Role::Requester, &p.public()), before_none);
    mirror.verify().unwrap();
}

#[test]
fn record_credit_refuses_a_forged_note() {
    let l = provider_ledger();
    let (p, r) = (provider(), requester(0));
    let mirror = mirror_ledger();
    let (rc1, rc2, _, _) = settled_undelivered(&l);
    mirror.record_receipt(&rc1, &ack(&r, &rc1)).unwrap();
    let genuine = l.credit(job(2), &p, "no ack", 5_000).unwrap();
    let body = genuine.verify().unwrap();
    let before = state(&mirror, Role::Requester, &p.public());
    let mallory = requester(5);

    // Signed by someone else, naming the provider.
    let by_mallory = sign(&mallory, &body);
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &by_mallory),
        Err(LedgerError::Mismatch {
            field: "credit note provider",
            ..
        })
    ));
    // The provider's key as signer, with someone else's signature.
    let bad_sig = Signed::<CreditNote>::from_parts(
        p.public(),
        genuine.body().to_vec(),
        by_mallory.signature(),
    );
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &bad_sig),
        Err(LedgerError::BadSignature { .. })
    ));
    // One byte of the signed body changed.
    let mut bytes = genuine.body().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let flipped = Signed::<CreditNote>::from_parts(p.public(), bytes, genuine.signature());
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &flipped),
        Err(LedgerError::BadSignature { .. })
    ));
    // Mallory crediting, as herself, a receipt the provider signed.
    let as_mallory = sign(
        &mallory,
        &CreditNote {
            provider: mallory.public(),
            ..body.clone()
        },
    );
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &as_mallory),
        Err(LedgerError::WrongSigner {
            what: "receipt",
            ..
        })
    ));
    // A genuine note for another requester.
    let elsewhere = sign(
        &p,
        &CreditNote {
            requester: requester(3).public(),
            ..body.clone()
        },
    );
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &elsewhere),
        Err(LedgerError::Mismatch {
            field: "credit note requester",
            ..
        })
    ));
    // A note that credits another receipt or amount than the one given.
    let other_amount = sign(
        &p,
        &CreditNote {
            amount: tokens(1),
            ..body.clone()
        },
    );
    assert!(matches!(
        mirror.record_credit(Some(&rc2), &other_amount),
        Err(LedgerError::Mismatch {
            field: "credited amount",
            ..
        })
    ));
    assert_eq!(state(&mirror, Role::Requester, &p.public()), before);

    // With the receipt stored (acked) here: a note by Mallory is not the receipt's provider's.
    mirror.record_receipt(&rc2, &ack(&r, &rc2)).unwrap();
    let before = state(&mirror, Role::Requester, &p.public());
    assert!(matches!(
        mirror.record_credit(None, &as_mallory),
        Err(LedgerError::Mismatch {
            field: "credit note provider",
            ..
        })
    ));
    assert!(matches!(
        mirror.record_credit(None, &bad_sig),
        Err(LedgerError::BadSignature { .. })
    ));
    assert_eq!(state(&mirror, Role::Requester, &p.public()), before);
    // The genuine note still records.
    mirror.record_credit(None, &genuine).unwrap();
    assert_same_books(&l, &mirror);
    mirror.verify().unwrap();
}

/// The provider's books of [`settled_undelivered`] and the requester's, on disk at
/// `dir/ledger`, holding both receipts with its acks (the second ack lost on its way).
fn mirrored_pair() -> (Ledger, tempfile::TempDir, std::path::PathBuf, Ledger) {
    let l = provider_ledger();
    let r = requester(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    let mirror = Ledger::open(&path, r.public()).unwrap();
    let (rc1, rc2, _, _) = settled_undelivered(&l);
    mirror.record_receipt(&rc1, &ack(&r, &rc1)).unwrap();
    mirror.record_receipt(&rc2, &ack(&r, &rc2)).unwrap();
    (l, dir, path, mirror)
}

#[test]
fn mark_undelivered_only_on_an_acked_settled_requester_job() {
    let (l, _dir, path, mirror) = mirrored_pair();
    let p = provider();
    let before = state(&mirror, Role::Requester, &p.public());
    // Unknown here, and a job that is the provider's, not mine.
    assert!(matches!(
        mirror.mark_undelivered(job(9), "no images"),
        Err(LedgerError::NotSettled { .. })
    ));
    assert!(matches!(
        l.mark_undelivered(job(1), "no images"),
        Err(LedgerError::NotSettled { .. })
    ));
    assert_eq!(state(&mirror, Role::Requester, &p.public()), before);

    // Acked and settled: marked, with the reason cut to its bound; the charge stays.
    let long = "y".repeat(MAX_REASON_CHARS + 1);
    mirror.mark_undelivered(job(1), &long).unwrap();
    let cut: String = long.chars().take(MAX_REASON_CHARS).collect();
    assert_eq!(
        mirror.job(Role::Requester, job(1)).unwrap(),
        Some(JobOutcome::Undelivered {
            peer: p.public(),
            index: 0,
            reason: cut.clone()
        })
    );
    let stored = mirror.receipt(Role::Requester, job(1)).unwrap().unwrap();
    assert_eq!(
        (stored.undelivered.as_deref(), stored.refunded.as_deref()),
        (Some(cut.as_str()), None)
    );
    assert!(
        stored.ack.is_some(),
        "the signed record against the provider"
    );
    assert_eq!(
        mirror
            .receipts(None)
            .unwrap()
            .iter()
            .map(|s| s.undelivered.is_some())
            .collect::<Vec<_>>(),
        vec![true, false]
    );
    let a = mirror
        .account(Role::Requester, &p.public())
        .unwrap()
        .unwrap();
    assert_eq!(a.charged, tokens(13));
    // Marked once.
    let marked = state(&mirror, Role::Requester, &p.public());
    assert!(matches!(
        mirror.mark_undelivered(job(1), "again"),
        Err(LedgerError::NotSettled { .. })
    ));
    assert_eq!(state(&mirror, Role::Requester, &p.public()), marked);

    // Marked undelivered, then credited by a provider that never got the ack: credited.
    mirror.mark_undelivered(job(2), "no images").unwrap();
    let note2 = l.credit(job(2), &p, "no ack", 5_000).unwrap();
    mirror.record_credit(None, &note2).unwrap();
    assert!(matches!(
        mirror.job(Role::Requester, job(2)).unwrap(),
        Some(JobOutcome::Credited { .. })
    ));
    // A credited job is not marked.
    let rc3 = settle_next(&l, 3, 10);
    let note3 = l.credit(job(3), &p, "refused", 6_000).unwrap();
    mirror.record_credit(Some(&rc3), &note3).unwrap();
    assert!(matches!(
        mirror.mark_undelivered(job(3), "no images"),
        Err(LedgerError::NotSettled { .. })
    ));
    assert!(matches!(
        mirror.mark_undelivered(job(2), "no images"),
        Err(LedgerError::NotSettled { .. })
    ));
    assert_same_books(&l, &mirror);
    let report = mirror.verify().unwrap();
    assert_eq!(
        (
            report.undelivered_receipts,
            report.refunded_receipts,
            report.credit_notes
        ),
        (1, 2, 2)
    );

    // Durable: kept across a reopen.
    drop(mirror);
    let mirror = Ledger::open(&path, requester(0).public()).unwrap();
    assert!(matches!(
        mirror.job(Role::Requester, job(1)).unwrap(),
        Some(JobOutcome::Undelivered { .. })
    ));
    assert_eq!(mirror.verify().unwrap(), report);
}

#[test]
fn a_late_delivery_settles_only_an_undelivered_job_once_and_survives_a_reopen() {
    let (l, _dir, path, mirror) = mirrored_pair();
    let p = provider();
    let charged = |m: &Ledger| {
        m.account(Role::Requester, &p.public())
            .unwrap()
            .unwrap()
            .charged
    };
    let paid = charged(&mirror);

    // Unknown, the provider's own job, and a job delivered in time: refused, nothing changes.
    let before = state(&mirror, Role::Requester, &p.public());
    for (books, j) in [(&mirror, job(9)), (&l, job(1)), (&mirror, job(2))] {
        assert!(matches!(
            books.mark_delivered_late(j),
            Err(LedgerError::NotUndelivered { .. })
        ));
    }
    assert_eq!(state(&mirror, Role::Requester, &p.public()), before);

    // Marked undelivered, then delivered late: settled again at the same place in the chain,
    // and the charge (paid once, at the ack) does not move either way.
    mirror
        .mark_undelivered(job(1), "no images within 2 s")
        .unwrap();
    assert_eq!(charged(&mirror), paid);
    mirror.mark_delivered_late(job(1)).unwrap();
    assert_eq!(
        mirror.job(Role::Requester, job(1)).unwrap(),
        Some(JobOutcome::Settled {
            peer: p.public(),
            index: 0
        })
    );
    let stored = mirror.receipt(Role::Requester, job(1)).unwrap().unwrap();
    assert_eq!(stored.undelivered, None);
    assert!(stored.ack.is_some());
    assert_eq!(charged(&mirror), paid);
    // Once: a second late delivery is refused.
    let delivered = state(&mirror, Role::Requester, &p.public());
    assert!(matches!(
        mirror.mark_delivered_late(job(1)),
        Err(LedgerError::NotUndelivered { .. })
    ));
    assert_eq!(state(&mirror, Role::Requester, &p.public()), delivered);
    // A credited job was never paid: nothing to deliver late.
    mirror.mark_undelivered(job(2), "no images").unwrap();
    let note2 = l.credit(job(2), &p, "no ack", 5_000).unwrap();
    mirror.record_credit(None, &note2).unwrap();
    assert!(matches!(
        mirror.mark_delivered_late(job(2)),
        Err(LedgerError::NotUndelivered { .. })
    ));
    assert_same_books(&l, &mirror);
    let report = mirror.verify().unwrap();
    assert_eq!(report.undelivered_receipts, 0);

    // The log replays to the same books after a reopen; the mark and its correction both stay.
    drop(mirror);
    let mirror = Ledger::open(&path, requester(0).public()).unwrap();
    assert!(matches!(
        mirror.job(Role::Requester, job(1)).unwrap(),
        Some(JobOutcome::Settled { .. })
    ));
    assert_eq!(mirror.verify().unwrap(), report);
}

/// Both sides of a pair, with credit notes of both kinds and an undelivered mark.
fn both_sides(provider_side: &Ledger, requester_side: &Ledger) {
    let (p, r) = (provider(), requester(0));
    let (rc1, rc2, _, _) = settled_undelivered(provider_side);
    requester_side.record_receipt(&rc1, &ack(&r, &rc1)).unwrap();
    // Job 2: acked by the requester, the ack lost, credited.
    requester_side.record_receipt(&rc2, &ack(&r, &rc2)).unwrap();
    let note2 = provider_side.credit(job(2), &p, "no ack", 5_000).unwrap();
    requester_side.record_credit(None, &note2).unwrap();
    // Job 3: never acked, credited.
    let rc3 = settle_next(provider_side, 3, 6);
    let note3 = provider_side.credit(job(3), &p, "refused", 6_000).unwrap();
    requester_side.record_credit(Some(&rc3), &note3).unwrap();
    // Job 4: acked, then never delivered.
    let rc4 = settle_next(provider_side, 4, 14);
    provider_side.attach_ack(job(4), &ack(&r, &rc4)).unwrap();
    requester_side.record_receipt(&rc4, &ack(&r, &rc4)).unwrap();
    requester_side
        .mark_undelivered(job(4), "no images")
        .unwrap();
    // One more entry after them, so a changed entry breaks a link.
    provider_side.set_default_credit(tokens(1)).unwrap();
    requester_side
        .set_credit_limit_as(Role::Requester, p.public(), tokens(2))
        .unwrap();
}

#[test]
fn verify_and_reopen_cover_credit_notes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    let credit_seq;
    {
        let l = Ledger::open(&path, provider().public()).unwrap();
        both_sides(&l, &mirror_ledger());
        credit_seq = seq_of(&export(&l, None), "credit-note");
    }
    // Durable and verified after reopening.
    let l = Ledger::open(&path, provider().public()).unwrap();
    assert!(matches!(
        l.job(Role::Provider, job(2)).unwrap(),
        Some(JobOutcome::Credited { .. })
    ));
    let report = l.verify().unwrap();
    assert_eq!((report.refunded_receipts, report.credit_notes), (2, 2));
    assert_linear(&full_chain(&l, Role::Provider, &requester(0).public()));
    drop(l);

    // One byte of the credit note changed in the log: its signature no longer verifies.
    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("ledger");
    copy_dir(&path, &copied);
    tamper(&copied, |db| {
        let log = db.open_tree(TreeId::Log.name()).unwrap();
        let key = credit_seq.to_be_bytes();
        let mut v = log.get(key).unwrap().unwrap().to_vec();
        let i = v.len() - 1; // inside the note's signature
        v[i] ^= 1;
        log.insert(key, v).unwrap();
    });
    let l = Ledger::open(&copied, provider().public()).unwrap();
    let err = l.verify().unwrap_err();
    assert!(
        matches!(
            err,
            Inconsistency::Rejected {
                seq,
                source: LedgerError::BadSignature { what: "credit note", .. },
            } if seq == credit_seq
        ),
        "{err}"
    );
    drop(l);

    // The note removed from the state only: the Credits tree disagrees with the log.
    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("ledger");
    copy_dir(&path, &copied);
    tamper(&copied, |db| {
        let credits = db.open_tree(TreeId::Credits.name()).unwrap();
        let (k, _) = credits.iter().next().unwrap().unwrap();
        credits.remove(k).unwrap();
    });
    let l = Ledger::open(&copied, provider().public()).unwrap();
    let err = l.verify().unwrap_err();
    assert!(
        matches!(
            err,
            Inconsistency::State {
                tree: TreeId::Credits,
                ..
            }
        ),
        "{err}"
    );
    drop(l);

    // The credit undone in the state only (the job back to settled): the state disagrees.
    tamper(&path, |db| {
        let jobs = db.open_tree(TreeId::Jobs.name()).unwrap();
        let mut key = vec![0u8];
        key.extend_from_slice(&job(2).0);
        let settled = pixmarket_protocol::codec::encode(
            "test",
            &JobOutcome::Settled {
                peer: requester(0).public(),
                index: 1,
            },
            1024,
        )
        .unwrap();
        jobs.insert(key, settled).unwrap();
    });
    let l = Ledger::open(&path, provider().public()).unwrap();
    let err = l.verify().unwrap_err();
    assert!(
        matches!(
            err,
            Inconsistency::State {
                tree: TreeId::Jobs,
                ..
            }
        ),
        "{err}"
    );
}

fn export(l: &Ledger, peer: Option<&pixmarket_protocol::PublicKey>) -> String {
    let mut v = Vec::new();
    l.export(peer, &mut v).unwrap();
    String::from_utf8(v).unwrap()
}

/// The log sequence number of the first exported entry of `kind`.
fn seq_of(text: &str, kind: &str) -> u64 {
    text.lines()
        .skip(1)
        .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap())
        .find(|v| v["op"]["kind"] == kind)
        .and_then(|v| v["seq"].as_u64())
        .unwrap()
}

fn kinds(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .map(|t| {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            v["op"]["kind"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn verify_export_and_import_accept_credit_notes_and_undelivered_marks() {
    let dir = tempfile::tempdir().unwrap();
    let (p, r) = (provider().public(), requester(0).public());
    let l = Ledger::open(&dir.path().join("provider"), p).unwrap();
    let mirror = Ledger::open(&dir.path().join("requester"), r).unwrap();
    both_sides(&l, &mirror);
    assert_same_books(&l, &mirror);

    for (side, role, peer) in [(&l, Role::Provider, r), (&mirror, Role::Requester, p)] {
        let verified = side.verify().unwrap();
        let whole = export(side, None);
        let imported = import(&mut whole.as_bytes()).unwrap();
        assert!(imported.complete_chain);
        assert_eq!(imported, verified, "{role}");
        assert_eq!(imported.head, side.head().unwrap());
        // One pair's export keeps the credit notes and marks (placed by their job) and
        // recomputes the same account.
        let pair = export(side, Some(&peer));
        let audit = import(&mut pair.as_bytes()).unwrap();
        assert_eq!(
            (
                audit.receipts,
                audit.refunded_receipts,
                audit.credit_notes,
                audit.undelivered_receipts
            ),
            (
                verified.receipts,
                verified.refunded_receipts,
                verified.credit_notes,
                verified.undelivered_receipts
            ),
            "{role}"
        );
        assert_eq!(
            Some(&audit.accounts[0].2),
            side.account(role, &peer).unwrap().as_ref()
        );
    }
    let provider_kinds = kinds(&export(&l, Some(&r)));
    assert_eq!(
        provider_kinds
            .iter()
            .filter(|k| *k == "credit-note")
            .count(),
        2
    );
    let requester_kinds = kinds(&export(&mirror, Some(&p)));
    for kind in ["record-receipt", "record-credit-note", "undelivered"] {
        assert!(requester_kinds.iter().any(|k| k == kind), "{kind}");
    }
    let audit = import(&mut export(&mirror, Some(&p)).as_bytes()).unwrap();
    assert_eq!(
        (
            audit.credit_notes,
            audit.undelivered_receipts,
            audit.acked_receipts
        ),
        (2, 1, 3)
    );

    // Without a credit note, a file no longer replays: the entries after it name it as their
    // previous entry and carry the total after it. On both sides.
    for (text, kind) in [
        (export(&l, Some(&r)), "credit-note"),
        (export(&mirror, Some(&p)), "record-credit-note"),
    ] {
        let seq = seq_of(&text, kind);
        let without: Vec<&str> = text
            .lines()
            .filter(|t| !t.starts_with(&format!("{{\"seq\":{seq},")))
            .collect();
        assert_eq!(without.len() + 1, text.lines().count());
        let err = import(&mut without.join("\n").as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                Inconsistency::Rejected {
                    source: LedgerError::CumulativeMismatch { .. }
                        | LedgerError::PrevReceiptMismatch { .. },
                    ..
                }
            ),
            "{kind}: {err}"
        );
    }
}
