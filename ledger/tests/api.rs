//! The ledger's operations one by one: what each accepts, what it refuses (with the typed
//! error), opening checks, verify against tampering, and export/import. Credit notes, the
//! requester's side of them and the pair's chain are in `credit.rs`.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use pixmarket_ledger::{
    Inconsistency, JobOutcome, Ledger, LedgerError, MemStore, OpenError, Role, TreeId, import,
};
use pixmarket_protocol::MicroTokens;

fn open(dir: &std::path::Path) -> Ledger {
    Ledger::open(&dir.join("ledger"), provider().public()).unwrap()
}

#[test]
fn hold_settle_ack_moves_the_money_and_keeps_the_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let (p, r) = (provider(), requester(0));
    l.deposit(&deposit_note(&p, r.public(), 1, tokens(20)))
        .unwrap();
    l.hold(terms(job(1), r.public(), tokens(16)), 0).unwrap();
    let a = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    assert_eq!((a.held, a.available()), (tokens(16), Some(tokens(4))));

    let rc = receipt(&l, &p, r.public(), job(1), 30); // 15 tokens
    l.settle(job(1), &rc).unwrap();
    let a = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    assert_eq!(a.charged, tokens(15));
    assert_eq!(a.held, MicroTokens::ZERO);
    assert_eq!(a.available(), Some(tokens(5)));
    assert_eq!(a.last_entry, Some(rc.digest()));
    assert!(matches!(
        l.job(Role::Provider, job(1)).unwrap(),
        Some(JobOutcome::Settled { index: 0, .. })
    ));

    l.attach_ack(job(1), &ack(&r, &rc)).unwrap();
    let stored = l.receipt(Role::Provider, job(1)).unwrap().unwrap();
    assert_eq!(stored.receipt, rc);
    assert!(stored.ack.is_some());
    assert!(matches!(
        l.attach_ack(job(1), &ack(&r, &rc)),
        Err(LedgerError::AlreadyAcked { .. })
    ));
    let report = l.verify().unwrap();
    assert_eq!(
        (report.entries, report.receipts, report.acked_receipts),
        (4, 1, 1)
    );
}

#[test]
fn hold_refusals_are_typed() {
    let l = Ledger::with_store(Arc::new(MemStore::new()), provider().public()).unwrap();
    let r = requester(0).public();
    l.set_credit_limit(r, tokens(10)).unwrap();
    match l.hold(terms(job(1), r, tokens(11)), 0) {
        Err(LedgerError::InsufficientCredit { needed, available }) => {
            assert_eq!((needed, available), (tokens(11), tokens(10)));
        }
        other => panic!("{other:?}"),
    }
    l.hold(terms(job(1), r, tokens(6)), 0).unwrap();
    assert!(matches!(
        l.hold(terms(job(1), r, tokens(1)), 0),
        Err(LedgerError::DuplicateJob { .. })
    ));
    // Voiding does not free the job id: accepted once, ever.
    l.void(job(1), "engine failed").unwrap();
    assert!(matches!(
        l.hold(terms(job(1), r, tokens(1)), 0),
        Err(LedgerError::DuplicateJob { .. })
    ));
    let mut expired = terms(job(2), r, tokens(1));
    expired.expires_at_ms = 100;
    assert!(matches!(
        l.hold(expired, 100),
        Err(LedgerError::Expired { .. })
    ));
    // An unknown peer gets the default credit, 0 unless set.
    let stranger = requester(9).public();
    assert!(matches!(
        l.hold(terms(job(3), stranger, tokens(1)), 0),
        Err(LedgerError::InsufficientCredit { available, .. }) if available == MicroTokens::ZERO
    ));
    l.set_default_credit(tokens(2)).unwrap();
    l.hold(terms(job(3), stranger, tokens(2)), 0).unwrap();
    l.verify().unwrap();
}

#[test]
fn settle_refusals_are_typed_and_change_nothing() {
    let l = Ledger::with_store(Arc::new(MemStore::new()), provider().public()).unwrap();
    let (p, r) = (provider(), requester(0));
    l.set_credit_limit(r.public(), tokens(100)).unwrap();
    l.hold(terms(job(1), r.public(), tokens(10)), 0).unwrap();
    let before = l.account(Role::Provider, &r.public()).unwrap();

    // 30 steps = 15 tokens > 10 held.
    let too_much = receipt(&l, &p, r.public(), job(1), 30);
    assert!(matches!(
        l.settle(job(1), &too_much),
        Err(LedgerError::ChargeExceedsHold { .. })
    ));
    let wrong_job = receipt(&l, &p, r.public(), job(2), 10);
    assert!(matches!(
        l.settle(job(1), &wrong_job),
        Err(LedgerError::Mismatch { .. })
    ));
    let forged = receipt(&l, &requester(5), r.public(), job(1), 10);
    assert!(matches!(
        l.settle(job(1), &forged),
        Err(LedgerError::WrongSigner { .. })
    ));
    let bad_link = receipt_with(
        &p,
        r.public(),
        job(1),
        10,
        pixmarket_ledger::ReceiptLink {
            charged_so_far: tokens(1),
            prev_entry_hash: None,
        },
    );
    assert!(matches!(
        l.settle(job(1), &bad_link),
        Err(LedgerError::CumulativeMismatch { .. })
    ));
    assert!(matches!(
        l.settle(job(9), &receipt(&l, &p, r.public(), job(9), 10)),
        Err(LedgerError::UnknownHold { .. })
    ));
    assert_eq!(l.account(Role::Provider, &r.public()).unwrap(), before);

    let good = receipt(&l, &p, r.public(), job(1), 10);
    l.settle(job(1), &good).unwrap();
    // Settled once: a second settle, a void or an expiry of the same hold is refused.
    assert!(matches!(
        l.settle(job(1), &good),
        Err(LedgerError::AlreadyFinished {
            outcome: JobOutcome::Settled { .. },
            ..
        })
    ));
    assert!(matches!(
        l.void(job(1), "late"),
        Err(LedgerError::AlreadyFinished { .. })
    ));
    assert_eq!(l.expire_holds(FAR + 1).unwrap(), vec![]);
    l.verify().unwrap();
}

#[test]
fn deposits_route_by_signer_and_count_once() {
    let l = Ledger::with_store(Arc::new(MemStore::new()), provider().public()).unwrap();
    let (p, r) = (provider(), requester(0));
    let note = deposit_note(&p, r.public(), 7, tokens(3));
    l.deposit(&note).unwrap();
    assert!(matches!(
        l.deposit(&note),
        Err(LedgerError::DuplicateDeposit { .. })
    ));
    // A note another provider signed for me is my mirror of what I prepaid there.
    let other = requester(1);
    l.deposit(&deposit_note(&other, p.public(), 7, tokens(5)))
        .unwrap();
    assert_eq!(
        l.account(Role::Requester, &other.public())
            .unwrap()
            .unwrap()
            .deposits,
        tokens(5)
    );
    assert!(matches!(
        l.deposit(&deposit_note(&other, r.public(), 8, tokens(5))),
        Err(LedgerError::NotOurs { .. })
    ));
    l.hold(terms(job(1), r.public(), tokens(3)), 0).unwrap();
    assert!(matches!(
        l.set_credit_limit(r.public(), MicroTokens::ZERO),
        Ok(())
    ));
    l.void(job(1), "").unwrap();
    l.hold(terms(job(2), r.public(), tokens(2)), 0).unwrap();
    l.settle(job(2), &receipt(&l, &p, r.public(), job(2), 4))
        .unwrap(); // 2 tokens
    // deposits 3, charged 2: a credit limit may not fall below what is used.
    l.hold(terms(job(3), r.public(), tokens(1)), 0).unwrap();
    l.set_credit_limit(r.public(), tokens(1)).unwrap();
    l.hold(terms(job(4), r.public(), tokens(1)), 0).unwrap();
    assert!(matches!(
        l.set_credit_limit(r.public(), MicroTokens::ZERO),
        Err(LedgerError::CreditBelowUse { .. })
    ));
    l.verify().unwrap();
}

#[test]
fn requester_mirror_records_receipts_with_acks() {
    // This node is the requester; the provider is someone else.
    let me = requester(0);
    let prov = provider();
    let l = Ledger::with_store(Arc::new(MemStore::new()), me.public()).unwrap();
    l.deposit(&deposit_note(&prov, me.public(), 1, tokens(50)))
        .unwrap();
    let mut link = pixmarket_ledger::ReceiptLink {
        charged_so_far: MicroTokens::ZERO,
        prev_entry_hash: None,
    };
    for n in 0..3 {
        let rc = receipt_with(&prov, me.public(), job(n), 20, link);
        l.record_receipt(&rc, &ack(&me, &rc)).unwrap();
        link = pixmarket_ledger::ReceiptLink {
            charged_so_far: rc.verify().unwrap().cumulative_charged,
            prev_entry_hash: Some(rc.digest()),
        };
        assert!(matches!(
            l.record_receipt(&rc, &ack(&me, &rc)),
            Err(LedgerError::DuplicateJob { .. })
        ));
    }
    let a = l.account(Role::Requester, &prov.public()).unwrap().unwrap();
    assert_eq!(
        (a.deposits, a.charged, a.entries),
        (tokens(50), tokens(30), 3)
    );
    assert_eq!(l.receipts(Some(&prov.public())).unwrap().len(), 3);
    l.verify().unwrap();
}

/// `ledger prepaid`: the requester's own signed word of what it paid a provider raises its
/// mirror's deposits, once, survives a reopen, verifies, exports and imports; a note signed by
/// anyone else, for itself, or with a bad amount changes nothing.
#[test]
fn a_prepayment_makes_the_requester_mirror_true_and_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    let (me, prov) = (requester(0), provider());
    {
        let l = Ledger::open(&path, me.public()).unwrap();
        let rc = receipt_with(
            &prov,
            me.public(),
            job(1),
            20,
            mirror_link(&l, &prov.public()),
        );
        l.record_receipt(&rc, &ack(&me, &rc)).unwrap();
        let a = l.account(Role::Requester, &prov.public()).unwrap().unwrap();
        assert_eq!(a.available(), None, "charged with nothing recorded as paid");

        let note = deposit_note(&me, prov.public(), 1, tokens(25));
        l.prepaid(&note).unwrap();
        let a = l.account(Role::Requester, &prov.public()).unwrap().unwrap();
        assert_eq!((a.deposits, a.available()), (tokens(25), Some(tokens(15))));
        // The provider's side is untouched: my word is no deposit with me.
        assert_eq!(l.account(Role::Provider, &prov.public()).unwrap(), None);
        assert!(matches!(
            l.prepaid(&note),
            Err(LedgerError::DuplicateDeposit { .. })
        ));
        // The same note cannot count again as a deposit either (one id per signer).
        assert!(matches!(
            l.deposit(&note),
            Err(LedgerError::DuplicateDeposit { .. })
        ));
        assert!(matches!(
            l.prepaid(&deposit_note(&prov, me.public(), 2, tokens(5))),
            Err(LedgerError::PrepaidNotOurs { .. })
        ));
        assert!(matches!(
            l.prepaid(&deposit_note(&me, me.public(), 3, tokens(5))),
            Err(LedgerError::SelfAccount)
        ));
        let mut long = deposit_note(&me, prov.public(), 4, tokens(5))
            .verify()
            .unwrap();
        long.memo = "x".repeat(1000);
        assert!(matches!(
            l.prepaid(&sign(&me, &long)),
            Err(LedgerError::Invalid { .. })
        ));
        // A second payment is a second entry.
        l.prepaid(&deposit_note(&me, prov.public(), 5, tokens(5)))
            .unwrap();
    }
    let l = Ledger::open(&path, me.public()).unwrap();
    let a = l.account(Role::Requester, &prov.public()).unwrap().unwrap();
    assert_eq!((a.deposits, a.available()), (tokens(30), Some(tokens(20))));
    let verified = l.verify().unwrap();
    let mut whole = Vec::new();
    l.export(Some(&prov.public()), &mut whole).unwrap();
    let text = String::from_utf8(whole.clone()).unwrap();
    assert_eq!(text.matches("\"prepaid\"").count(), 2, "{text}");
    let imported = import(&mut whole.as_slice()).unwrap();
    assert_eq!(imported.accounts, verified.accounts);
}

#[test]
fn expire_holds_releases_only_expired_holds() {
    let l = Ledger::with_store(Arc::new(MemStore::new()), provider().public()).unwrap();
    let r = requester(0).public();
    l.set_credit_limit(r, tokens(10)).unwrap();
    for (n, exp) in [(1, 100), (2, 200), (3, 300)] {
        let mut t = terms(job(n), r, tokens(1));
        t.expires_at_ms = exp;
        l.hold(t, 50).unwrap();
    }
    assert_eq!(l.expire_holds(200).unwrap(), vec![job(1), job(2)]);
    assert_eq!(l.holds().unwrap().len(), 1);
    assert_eq!(
        l.account(Role::Provider, &r).unwrap().unwrap().held,
        tokens(1)
    );
    assert_eq!(
        l.job(Role::Provider, job(1)).unwrap(),
        Some(JobOutcome::Expired)
    );
    l.verify().unwrap();
}

#[test]
fn reopen_keeps_everything_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (p, r) = (provider(), requester(0));
    {
        let l = open(dir.path());
        l.set_credit_limit(r.public(), tokens(100)).unwrap();
        for n in 0..5 {
            l.hold(terms(job(n), r.public(), tokens(10)), 0).unwrap();
            l.settle(job(n), &receipt(&l, &p, r.public(), job(n), 10))
                .unwrap();
        }
    }
    let l = open(dir.path());
    let a = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    assert_eq!((a.charged, a.entries), (tokens(25), 5));
    assert_eq!(l.verify().unwrap().entries, 11);
}

#[test]
fn open_refuses_locked_foreign_and_other_owners_folders() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    let l = Ledger::open(&path, provider().public()).unwrap();
    assert!(matches!(
        Ledger::open(&path, provider().public()),
        Err(OpenError::Locked { .. })
    ));
    drop(l);
    assert!(matches!(
        Ledger::open(&path, requester(0).public()),
        Err(OpenError::OtherOwner { .. })
    ));
    // A folder with someone else's files.
    let foreign = dir.path().join("photos");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("cat.jpg"), b"meow").unwrap();
    assert!(matches!(
        Ledger::open(&foreign, provider().public()),
        Err(OpenError::Foreign { .. })
    ));
    assert_eq!(std::fs::read(foreign.join("cat.jpg")).unwrap(), b"meow");
    // A sled database that is not a ledger.
    let other_db = dir.path().join("other");
    {
        let db = sled::open(&other_db).unwrap();
        db.insert(b"k", b"v").unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Ledger::open(&other_db, provider().public()),
        Err(OpenError::Foreign { .. })
    ));
    assert_eq!(
        sled::open(&other_db).unwrap().get(b"k").unwrap().unwrap(),
        b"v"
    );
    // A file where the folder should be.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Ledger::open(&file, provider().public()),
        Err(OpenError::Foreign { .. })
    ));
}

#[test]
fn open_refuses_a_corrupt_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    {
        let l = Ledger::open(&path, provider().public()).unwrap();
        l.set_credit_limit(requester(0).public(), tokens(1))
            .unwrap();
    }
    let garbage: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(path.join("db"), &garbage).unwrap();
    for e in std::fs::read_dir(&path).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("snap.") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let err = Ledger::open(&path, provider().public()).unwrap_err();
    assert!(
        matches!(err, OpenError::Corrupt { .. } | OpenError::Foreign { .. }),
        "{err:?}"
    );
}

/// Regression (CI, crash test kill 128: "sled found corrupt data at None"): sled 0.34 writes a
/// snapshot to `snap.<lsn>.generating` and renames it when complete, but its reader does not
/// skip that name and it sorts after the finished one, so a process killed mid-write left a
/// ledger that would not open. The unfinished file is removed on open; the log it summarised
/// is still there, so every operation is too.
#[test]
fn open_survives_a_snapshot_cut_off_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    busy_ledger(&path);
    // Reopened once, so that sled has written a finished snapshot of the log so far.
    let before = {
        let l = Ledger::open(&path, provider().public()).unwrap();
        l.account(Role::Provider, &requester(0).public()).unwrap()
    };
    let unfinished = path.join("snap.7FFFFFFFFFFFFFFF.generating");
    std::fs::write(&unfinished, [0x5a; 7]).unwrap();
    let l = Ledger::open(&path, provider().public()).unwrap();
    assert!(!unfinished.exists(), "the unfinished snapshot is removed");
    let report = l.verify().unwrap();
    assert_eq!(report.open_holds, 0);
    for n in 0..4 {
        let r = l.receipt(Role::Provider, job(n)).unwrap().unwrap();
        assert!(r.ack.is_some(), "job {n} kept its receipt and ack");
    }
    assert_eq!(
        l.account(Role::Provider, &requester(0).public()).unwrap(),
        before
    );
}

fn busy_ledger(path: &std::path::Path) {
    let l = Ledger::open(path, provider().public()).unwrap();
    let (p, r) = (provider(), requester(0));
    l.set_credit_limit(r.public(), tokens(100)).unwrap();
    for n in 0..4 {
        l.hold(terms(job(n), r.public(), tokens(10)), 0).unwrap();
        let rc = receipt(&l, &p, r.public(), job(n), 10);
        l.settle(job(n), &rc).unwrap();
        l.attach_ack(job(n), &ack(&r, &rc)).unwrap();
    }
}

#[test]
fn verify_names_the_first_tampered_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    busy_ledger(&path);
    // Flip one byte near the end of entry 5 (inside a signed receipt).
    tamper(&path, |db| {
        let log = db.open_tree(TreeId::Log.name()).unwrap();
        let key = 5u64.to_be_bytes();
        let mut v = log.get(key).unwrap().unwrap().to_vec();
        let i = v.len() - 10;
        v[i] ^= 1;
        log.insert(key, v).unwrap();
    });
    let l = Ledger::open(&path, provider().public()).unwrap();
    let err = l.verify().unwrap_err();
    assert!(
        matches!(
            err,
            Inconsistency::Rejected { seq: 5, .. } | Inconsistency::Undecodable { seq: 5, .. }
        ),
        "{err}"
    );
    drop(l);

    // Remove entry 3: the chain breaks there.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    busy_ledger(&path);
    tamper(&path, |db| {
        let log = db.open_tree(TreeId::Log.name()).unwrap();
        log.remove(3u64.to_be_bytes()).unwrap();
    });
    let l = Ledger::open(&path, provider().public()).unwrap();
    let err = l.verify().unwrap_err();
    assert!(
        matches!(err, Inconsistency::Sequence { seq: 3, found: 4 }),
        "{err}"
    );
}

#[test]
fn verify_catches_a_balance_that_disagrees_with_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    busy_ledger(&path);
    let r = requester(0).public();
    tamper(&path, |db| {
        let accts = db.open_tree(TreeId::ProviderAccounts.name()).unwrap();
        let mut v = accts.get(r.as_bytes()).unwrap().unwrap().to_vec();
        // The first field (deposits, a postcard varint 0) becomes 1 micro-token.
        v[0] = 1;
        accts.insert(r.as_bytes(), v).unwrap();
    });
    let l = Ledger::open(&path, provider().public()).unwrap();
    let err = l.verify().unwrap_err();
    assert!(
        matches!(
            err,
            Inconsistency::State {
                tree: TreeId::ProviderAccounts,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn export_then_import_recomputes_the_same_books() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    busy_ledger(&path);
    let l = Ledger::open(&path, provider().public()).unwrap();
    let (p, other) = (provider(), requester(1));
    l.set_credit_limit(other.public(), tokens(5)).unwrap();
    l.hold(terms(job(99), other.public(), tokens(5)), 0)
        .unwrap();
    l.void(job(99), "cancelled").unwrap();
    let verified = l.verify().unwrap();

    let mut whole = Vec::new();
    let n = l.export(None, &mut whole).unwrap();
    assert_eq!(n, verified.entries);
    let imported = import(&mut whole.as_slice()).unwrap();
    assert!(imported.complete_chain);
    assert_eq!(imported.accounts, verified.accounts);
    assert_eq!(imported.head, l.head().unwrap());

    // One pair's history: only that pair's entries, its balances recomputed exactly.
    let mut pair = Vec::new();
    let n = l.export(Some(&requester(0).public()), &mut pair).unwrap();
    assert_eq!(n, 1 + 4 * 3);
    let audit = import(&mut pair.as_slice()).unwrap();
    // This pair's entries happen to be the first 13: a contiguous prefix.
    assert!(audit.complete_chain);
    assert_eq!(audit.accounts.len(), 1);
    assert_eq!(
        Some(&audit.accounts[0].2),
        l.account(Role::Provider, &requester(0).public())
            .unwrap()
            .as_ref()
    );
    assert_eq!(audit.acked_receipts, 4);
    // The other pair's entries start at 13: links before them cannot be checked.
    let mut pair = Vec::new();
    assert_eq!(l.export(Some(&other.public()), &mut pair).unwrap(), 3);
    let audit = import(&mut pair.as_slice()).unwrap();
    assert!(!audit.complete_chain);
    assert_eq!(audit.accounts[0].2.credit_limit, tokens(5));
    let _ = p;

    // Change one amount in the authoritative bytes: the entry hash no longer matches.
    let text = String::from_utf8(whole).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut line: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    let entry = line["entry"].as_str().unwrap().to_owned();
    let flipped = format!(
        "{}{}",
        &entry[..entry.len() - 2],
        if entry.ends_with('0') { "01" } else { "00" }
    );
    line["entry"] = serde_json::Value::String(flipped);
    lines[3] = line.to_string();
    let err = import(&mut lines.join("\n").as_bytes()).unwrap_err();
    assert!(
        matches!(err, Inconsistency::EntryHash { seq: 2, .. }),
        "{err}"
    );
    // Drop an entry from a whole-log export: the gap is found.
    let text = String::from_utf8(text_of(&l)).unwrap();
    let mut ok_lines: Vec<&str> = text.lines().collect();
    ok_lines.remove(4);
    let err = import(&mut ok_lines.join("\n").as_bytes()).unwrap_err();
    assert!(
        matches!(err, Inconsistency::Sequence { seq: 3, .. }),
        "{err}"
    );
}

fn text_of(l: &Ledger) -> Vec<u8> {
    let mut v = Vec::new();
    l.export(None, &mut v).unwrap();
    v
}

/// Regression (found by the model test): reopening right after closing in the same process
/// failed with `Locked`, because sled's background threads keep the file (and its lock) open
/// for a few milliseconds after the last handle is dropped. Opening now waits briefly.
#[test]
fn reopen_right_after_close_in_the_same_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    let (p, r) = (provider(), requester(0));
    for round in 0..30u64 {
        let l = Ledger::open(&path, p.public()).unwrap();
        if round == 0 {
            l.set_credit_limit(r.public(), tokens(1_000_000)).unwrap();
        }
        for i in 0..10 {
            let j = job(round * 100 + i);
            l.hold(terms(j, r.public(), tokens(10)), 0).unwrap();
            l.settle(j, &receipt(&l, &p, r.public(), j, 10)).unwrap();
        }
    }
    let l = Ledger::open(&path, p.public()).unwrap();
    assert_eq!(l.verify().unwrap().receipts, 300);
}

#[test]
fn hold_request_checks_the_signed_request_and_binds_the_receipt_to_it() {
    use pixmarket_protocol::{JobParams, JobRequest, Mode, Receipt, Signed};
    let l = Ledger::with_store(Arc::new(MemStore::new()), provider().public()).unwrap();
    let (p, r) = (provider(), requester(0));
    l.set_credit_limit(r.public(), tokens(100)).unwrap();
    let request = |job_id, to: pixmarket_protocol::PublicKey| {
        Signed::sign(
            &r,
            &JobRequest {
                job_id,
                provider: to,
                params: JobParams {
                    prompt: "a red bicycle".into(),
                    negative_prompt: String::new(),
                    width: 512,
                    height: 512,
                    steps: 30,
                    true_cfg_scale: 4.0,
                    seed: 1,
                    images: 1,
                    mode: Mode::TextToImage,
                    exact: false,
                    lora: None,
                    latents: None,
                },
                max_cost: tokens(20),
                created_at_ms: 0,
                expires_at_ms: 10_000,
                quote_id: None,
                previews: 0,
            },
        )
        .unwrap()
    };
    // Addressed to someone else: refused.
    assert!(matches!(
        l.hold_request(&request(job(1), r.public()), 5),
        Err(LedgerError::Mismatch {
            field: "request provider",
            ..
        })
    ));
    let req = request(job(1), p.public());
    assert!(matches!(
        l.hold_request(&req, 10_000),
        Err(LedgerError::Expired { .. })
    ));
    l.hold_request(&req, 5).unwrap();
    assert_eq!(l.holds().unwrap()[0].1.request_hash, Some(req.digest()));
    // A receipt naming another request is refused; one naming this request settles.
    let wrong = receipt(&l, &p, r.public(), job(1), 10);
    assert!(matches!(
        l.settle(job(1), &wrong),
        Err(LedgerError::Mismatch {
            field: "receipt request hash",
            ..
        })
    ));
    let mut body: Receipt = wrong.verify().unwrap();
    body.request_hash = req.digest();
    let right = Signed::sign(&p, &body).unwrap();
    l.settle(job(1), &right).unwrap();
    l.verify().unwrap();
}

#[test]
fn settle_after_hold_expiry_is_refused() {
    let l = Ledger::with_store(Arc::new(MemStore::new()), provider().public()).unwrap();
    let (p, r) = (provider(), requester(0));
    l.set_credit_limit(r.public(), tokens(100)).unwrap();
    // Receipts from `common` are issued at 1,000 ms.
    for (n, expires_at_ms) in [(1, 999), (2, 999), (3, 1_000)] {
        let mut t = terms(job(n), r.public(), tokens(10));
        t.expires_at_ms = expires_at_ms;
        l.hold(t, 0).unwrap();
    }
    let state = |l: &Ledger| {
        (
            l.head().unwrap(),
            l.account(Role::Provider, &r.public()).unwrap(),
            l.holds().unwrap(),
        )
    };
    let before = state(&l);
    match l.settle(job(1), &receipt(&l, &p, r.public(), job(1), 10)) {
        Err(LedgerError::HoldExpired {
            job: j,
            expires_at_ms,
            issued_at_ms,
        }) => assert_eq!((j, expires_at_ms, issued_at_ms), (job(1), 999, 1_000)),
        other => panic!("{other:?}"),
    }
    // The same from `settle_with`, and checked before the charge against the hold.
    assert!(matches!(
        l.settle_with(job(2), &p, |link| receipt_body(
            p.public(),
            r.public(),
            job(2),
            30,
            link
        )),
        Err(LedgerError::HoldExpired { .. })
    ));
    assert_eq!(state(&l), before);
    // Issued at the very instant the hold expires: still good.
    l.settle(job(3), &receipt(&l, &p, r.public(), job(3), 10))
        .unwrap();
    // The expired holds are released by `expire_holds` and end `Expired`, uncharged.
    assert_eq!(l.expire_holds(1_000).unwrap(), vec![job(1), job(2)]);
    let a = l.account(Role::Provider, &r.public()).unwrap().unwrap();
    assert_eq!(
        (a.charged, a.held, a.entries),
        (tokens(5), MicroTokens::ZERO, 1)
    );
    assert_eq!(
        l.job(Role::Provider, job(1)).unwrap(),
        Some(JobOutcome::Expired)
    );
    l.verify().unwrap();
}
