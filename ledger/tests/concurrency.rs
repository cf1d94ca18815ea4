//! Many threads holding against one account never get more than its credit, and concurrent
//! settles share flush + fsync rounds (group commit).

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use pixmarket_ledger::{Ledger, LedgerError, Role};
use pixmarket_protocol::MicroTokens;

#[test]
fn concurrent_holds_never_exceed_the_credit() {
    let dir = tempfile::tempdir().unwrap();
    let l = Arc::new(Ledger::open(&dir.path().join("ledger"), provider().public()).unwrap());
    let r = requester(0).public();
    // 100 tokens of credit, 16 threads each trying 20 holds of 1.5 tokens: 480 tokens asked.
    l.set_credit_limit(r, tokens(100)).unwrap();
    let granted = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (l, granted, refused) = (&l, &granted, &refused);
            s.spawn(move || {
                for i in 0..20u64 {
                    match l.hold(terms(job(t * 1000 + i), r, MicroTokens(1_500_000)), 0) {
                        Ok(()) => granted.fetch_add(1_500_000, Ordering::Relaxed),
                        Err(LedgerError::InsufficientCredit { needed, available }) => {
                            assert!(needed > available);
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => panic!("{e}"),
                    };
                }
            });
        }
    });
    let a = l.account(Role::Provider, &r).unwrap().unwrap();
    let granted = granted.into_inner();
    assert!(granted <= tokens(100).0, "granted {granted}");
    // 66 holds of 1.5 fit in 100 (99 tokens); every one of them must have been granted.
    assert_eq!(granted, 66 * 1_500_000);
    assert_eq!(a.held.0, granted);
    assert_eq!(refused.into_inner(), 16 * 20 - 66);
    assert_eq!(l.holds().unwrap().len(), 66);
    l.verify().unwrap();
}

#[test]
fn concurrent_settles_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let l = Arc::new(Ledger::open(&dir.path().join("ledger"), provider().public()).unwrap());
    const THREADS: u8 = 8;
    const EACH: u64 = 25;
    for t in 0..THREADS {
        l.set_credit_limit(requester(t).public(), tokens(1_000))
            .unwrap();
        for i in 0..EACH {
            l.hold(
                terms(
                    job(u64::from(t) * 1000 + i),
                    requester(t).public(),
                    tokens(10),
                ),
                0,
            )
            .unwrap();
        }
    }
    let before = l.durable_syncs();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let l = &l;
            s.spawn(move || {
                let p = provider();
                let r = requester(t).public();
                for i in 0..EACH {
                    let j = job(u64::from(t) * 1000 + i);
                    l.settle(j, &receipt(l, &p, r, j, 10)).unwrap();
                }
            });
        }
    });
    let syncs = l.durable_syncs() - before;
    let settles = u64::from(THREADS) * EACH;
    eprintln!("{settles} concurrent settles used {syncs} flush+fsync rounds");
    // Eight threads settling at once: followers ride on the leader's fsync.
    assert!(syncs < settles, "{syncs} syncs for {settles} settles");
    for t in 0..THREADS {
        let a = l
            .account(Role::Provider, &requester(t).public())
            .unwrap()
            .unwrap();
        assert_eq!(a.receipts, EACH);
        assert_eq!(a.held, MicroTokens::ZERO);
    }
    l.verify().unwrap();
}
