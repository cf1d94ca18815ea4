//! Model test (STYLE.md "Storage"): random sequences of operations, with close-and-reopen,
//! run against the sled ledger and against a plain `BTreeMap` model of the rules. After every
//! step both agree on each result and each balance, and on the provider side
//! `available = deposits + credit − charged − held ≥ 0`, and each pair's `last_receipt` is the
//! latest receipt that still charges (refunds of undelivered receipts rewind it). At the end
//! `verify` replays the log.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::*;
use pixmarket_ledger::{Ledger, LedgerError, Role};
use pixmarket_protocol::{MicroTokens, SecretKey, Signed};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const PEERS: u8 = 3;
/// Few job ids, so that settles, voids and acks usually find a hold and duplicates happen.
const JOBS: u64 = 10;
const HALF: u64 = 500_000;

#[derive(Clone, Copy, Debug)]
enum Step {
    Deposit {
        peer: u8,
        halves: u64,
    },
    RepeatDeposit,
    SetCredit {
        peer: u8,
        halves: u64,
    },
    SetDefault {
        halves: u64,
    },
    Hold {
        job: u64,
        peer: u8,
        halves: u64,
        expires: u64,
    },
    Settle {
        job: u64,
        steps: u32,
    },
    Void {
        job: u64,
    },
    Ack {
        job: u64,
    },
    Expire {
        now: u64,
    },
    Reopen,
    /// Settle, void or ack the `pick`-th open hold or settled job: resolved against the model
    /// before running, so that most of these find something to act on.
    SettleOpen {
        pick: usize,
        steps: u32,
    },
    VoidOpen {
        pick: usize,
    },
    AckSettled {
        pick: usize,
    },
    /// Refund a job as undelivered.
    Refund {
        job: u64,
    },
    /// Refund the `pick`-th pair's latest charging receipt (resolved against the model), the
    /// one a refund may undo.
    RefundLatest {
        pick: usize,
    },
    /// Refund the `pick`-th settled job: often not the pair's latest.
    RefundSettled {
        pick: usize,
    },
}

impl Step {
    fn resolve(self, m: &Model) -> Step {
        let open: Vec<u64> = m.holds.keys().copied().collect();
        let settled: Vec<u64> = m
            .jobs
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Settled { .. }))
            .map(|(j, _)| *j)
            .collect();
        let nth = |v: &[u64], pick: usize| v.get(pick % v.len().max(1)).copied().unwrap_or(0);
        match self {
            Step::SettleOpen { pick, steps } => Step::Settle {
                job: nth(&open, pick),
                steps,
            },
            Step::VoidOpen { pick } => Step::Void {
                job: nth(&open, pick),
            },
            Step::AckSettled { pick } => Step::Ack {
                job: nth(&settled, pick),
            },
            Step::RefundSettled { pick } => Step::Refund {
                job: nth(&settled, pick),
            },
            Step::RefundLatest { pick } => {
                let latest: Vec<u64> = m
                    .chains
                    .values()
                    .filter_map(|c| c.last().copied())
                    .collect();
                Step::Refund {
                    job: nth(&latest, pick),
                }
            }
            other => other,
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..PEERS, 0..80u64).prop_map(|(peer, halves)| Step::Deposit { peer, halves }),
        1 => Just(Step::RepeatDeposit),
        2 => (0..PEERS, 0..40u64).prop_map(|(peer, halves)| Step::SetCredit { peer, halves }),
        1 => (0..20u64).prop_map(|halves| Step::SetDefault { halves }),
        6 => (0..JOBS, 0..PEERS, 0..12u64, 1..16u64).prop_map(|(job, peer, halves, expires)| {
            Step::Hold { job, peer, halves, expires }
        }),
        2 => (0..JOBS, 1..14u32).prop_map(|(job, steps)| Step::Settle { job, steps }),
        2 => (0..JOBS).prop_map(|job| Step::Void { job }),
        3 => (0..JOBS).prop_map(|job| Step::Ack { job }),
        1 => (0..12u64).prop_map(|now| Step::Expire { now }),
        1 => Just(Step::Reopen),
        6 => (0..8usize, 1..14u32).prop_map(|(pick, steps)| Step::SettleOpen { pick, steps }),
        2 => (0..8usize).prop_map(|pick| Step::VoidOpen { pick }),
        3 => (0..8usize).prop_map(|pick| Step::AckSettled { pick }),
        2 => (0..JOBS).prop_map(|job| Step::Refund { job }),
        3 => (0..8usize).prop_map(|pick| Step::RefundLatest { pick }),
        2 => (0..8usize).prop_map(|pick| Step::RefundSettled { pick }),
    ]
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Acct {
    deposits: u64,
    credit: u64,
    charged: u64,
    held: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Held,
    Settled { acked: bool },
    Refunded,
    Done,
}

#[derive(Debug, Default)]
struct Model {
    default_credit: u64,
    accounts: BTreeMap<u8, Acct>,
    /// job → (peer, max, expires_at)
    holds: BTreeMap<u64, (u8, u64, u64)>,
    jobs: BTreeMap<u64, Outcome>,
    /// Settled jobs: job → (peer, cost).
    settled: BTreeMap<u64, (u8, u64)>,
    /// Per peer, the settled jobs whose receipts still charge, oldest first: the last is the
    /// pair's `last_receipt`.
    chains: BTreeMap<u8, Vec<u64>>,
    clock: u64,
    next_deposit: u8,
    entries: u64,
}

impl Model {
    /// The peer's account, or the one the ledger would create (with the current default
    /// credit). Written back only when an operation succeeds, as the ledger does.
    fn peek(&self, peer: u8) -> Acct {
        self.accounts.get(&peer).cloned().unwrap_or(Acct {
            credit: self.default_credit,
            ..Acct::default()
        })
    }

    fn acct(&mut self, peer: u8) -> &mut Acct {
        let a = self.peek(peer);
        self.accounts.entry(peer).or_insert(a)
    }

    /// Applies a step; `Err` names the refusal the ledger must give.
    fn apply(&mut self, s: &Step) -> Result<(), &'static str> {
        match *s {
            Step::Deposit { peer, halves } => {
                if halves == 0 {
                    return Err("Invalid");
                }
                self.acct(peer).deposits += halves * HALF;
            }
            Step::RepeatDeposit => {
                return Err(if self.next_deposit == 0 {
                    "skip"
                } else {
                    "DuplicateDeposit"
                });
            }
            Step::SetCredit { peer, halves } => {
                let a = self.peek(peer);
                if a.deposits + halves * HALF < a.charged + a.held {
                    return Err("CreditBelowUse");
                }
                self.acct(peer).credit = halves * HALF;
            }
            Step::SetDefault { halves } => self.default_credit = halves * HALF,
            Step::Hold {
                job,
                peer,
                halves,
                expires,
            } => {
                if self.jobs.contains_key(&job) {
                    return Err("DuplicateJob");
                }
                if expires <= self.clock {
                    return Err("Expired");
                }
                if halves == 0 {
                    return Err("Invalid");
                }
                let a = self.peek(peer);
                let available = a.deposits + a.credit - a.charged - a.held;
                if halves * HALF > available {
                    return Err("InsufficientCredit");
                }
                self.acct(peer).held += halves * HALF;
                self.holds.insert(job, (peer, halves * HALF, expires));
                self.jobs.insert(job, Outcome::Held);
            }
            Step::Settle { job, steps } => {
                let Some(&(peer, max, _)) = self.holds.get(&job) else {
                    return Err(if self.jobs.contains_key(&job) {
                        "AlreadyFinished"
                    } else {
                        "UnknownHold"
                    });
                };
                let cost = u64::from(steps) * HALF;
                if cost > max {
                    return Err("ChargeExceedsHold");
                }
                let a = self.acct(peer);
                a.held -= max;
                a.charged += cost;
                self.holds.remove(&job);
                self.jobs.insert(job, Outcome::Settled { acked: false });
                self.settled.insert(job, (peer, cost));
                self.chains.entry(peer).or_default().push(job);
            }
            Step::Void { job } => {
                let Some((peer, max, _)) = self.holds.remove(&job) else {
                    return Err(if self.jobs.contains_key(&job) {
                        "AlreadyFinished"
                    } else {
                        "UnknownHold"
                    });
                };
                self.acct(peer).held -= max;
                self.jobs.insert(job, Outcome::Done);
            }
            Step::Ack { job } => match self.jobs.get(&job) {
                Some(Outcome::Settled { acked: false }) => {
                    self.jobs.insert(job, Outcome::Settled { acked: true });
                }
                Some(Outcome::Settled { acked: true }) => return Err("AlreadyAcked"),
                Some(Outcome::Refunded) => return Err("Refunded"),
                _ => return Err("NotSettled"),
            },
            Step::Refund { job } => match self.jobs.get(&job) {
                Some(Outcome::Settled { acked: false }) => {
                    let (peer, cost) = self.settled[&job];
                    let chain = self.chains.entry(peer).or_default();
                    if chain.last() != Some(&job) {
                        return Err("NotLatestReceipt");
                    }
                    chain.pop();
                    self.acct(peer).charged -= cost;
                    self.jobs.insert(job, Outcome::Refunded);
                }
                Some(Outcome::Settled { acked: true }) => return Err("AlreadyAcked"),
                Some(Outcome::Refunded) => return Err("Refunded"),
                _ => return Err("NotSettled"),
            },
            Step::Expire { now } => {
                self.clock = self.clock.max(now);
                let due: Vec<u64> = self
                    .holds
                    .iter()
                    .filter(|(_, h)| h.2 <= self.clock)
                    .map(|(j, _)| *j)
                    .collect();
                for job in due {
                    let (peer, max, _) = self.holds.remove(&job).unwrap();
                    self.acct(peer).held -= max;
                    self.jobs.insert(job, Outcome::Done);
                    self.entries += 1;
                }
                return Ok(());
            }
            Step::Reopen => return Ok(()),
            Step::SettleOpen { .. }
            | Step::VoidOpen { .. }
            | Step::AckSettled { .. }
            | Step::RefundLatest { .. }
            | Step::RefundSettled { .. } => {
                unreachable!("resolved before use")
            }
        }
        self.entries += 1;
        Ok(())
    }
}

fn kind(e: &LedgerError) -> &'static str {
    match e {
        LedgerError::InsufficientCredit { .. } => "InsufficientCredit",
        LedgerError::DuplicateJob { .. } => "DuplicateJob",
        LedgerError::Expired { .. } => "Expired",
        LedgerError::UnknownHold { .. } => "UnknownHold",
        LedgerError::AlreadyFinished { .. } => "AlreadyFinished",
        LedgerError::ChargeExceedsHold { .. } => "ChargeExceedsHold",
        LedgerError::AlreadyAcked { .. } => "AlreadyAcked",
        LedgerError::NotSettled { .. } => "NotSettled",
        LedgerError::DuplicateDeposit { .. } => "DuplicateDeposit",
        LedgerError::CreditBelowUse { .. } => "CreditBelowUse",
        LedgerError::Invalid { .. } => "Invalid",
        LedgerError::Refunded { .. } => "Refunded",
        LedgerError::NotLatestReceipt { .. } => "NotLatestReceipt",
        other => panic!("unexpected error {other}"),
    }
}

struct Harness {
    dir: tempfile::TempDir,
    ledger: Option<Ledger>,
    provider: SecretKey,
    peers: Vec<SecretKey>,
    last_note: Option<Signed<pixmarket_protocol::DepositNote>>,
    receipts: BTreeMap<u64, Signed<pixmarket_protocol::Receipt>>,
}

impl Harness {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("ledger")
    }

    fn l(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }

    fn run(&mut self, s: &Step, model: &Model) -> Result<(), &'static str> {
        let r = |i: u8| self.peers[usize::from(i)].public();
        let res = match *s {
            Step::Deposit { peer, halves } => {
                let id = model.next_deposit;
                let note = deposit_note(&self.provider, r(peer), id, MicroTokens(halves * HALF));
                let out = self.l().deposit(&note);
                if out.is_ok() {
                    self.last_note = Some(note);
                }
                out
            }
            Step::RepeatDeposit => match &self.last_note {
                None => return Err("skip"),
                Some(n) => self.l().deposit(n),
            },
            Step::SetCredit { peer, halves } => self
                .l()
                .set_credit_limit(r(peer), MicroTokens(halves * HALF)),
            Step::SetDefault { halves } => self.l().set_default_credit(MicroTokens(halves * HALF)),
            Step::Hold {
                job: j,
                peer,
                halves,
                expires,
            } => {
                let mut t = terms(job(j), r(peer), MicroTokens(halves * HALF));
                t.expires_at_ms = expires;
                self.l().hold(t, model.clock)
            }
            Step::Settle { job: j, steps } => {
                // The requester named in the receipt is the hold's (unknown holds: peer 0).
                let peer = self
                    .l()
                    .holds()
                    .unwrap()
                    .into_iter()
                    .find(|(id, _)| *id == job(j))
                    .map_or(r(0), |(_, h)| h.requester);
                let rc = receipt(self.l(), &self.provider, peer, job(j), steps);
                let out = self.l().settle(job(j), &rc);
                if out.is_ok() {
                    self.receipts.insert(j, rc);
                }
                out
            }
            Step::Void { job: j } => self.l().void(job(j), "model"),
            Step::Ack { job: j } => match self.receipts.get(&j) {
                Some(rc) => {
                    let who = self
                        .peers
                        .iter()
                        .find(|k| k.public() == rc.verify().unwrap().requester)
                        .unwrap();
                    self.l().attach_ack(job(j), &ack(who, rc))
                }
                // Nothing to acknowledge: ack some other receipt under this id.
                None => match self.receipts.values().next() {
                    Some(rc) => self.l().attach_ack(job(j), &ack(&self.peers[0], rc)),
                    None => return Err("NotSettled"),
                },
            },
            Step::Expire { now } => {
                let now = model.clock.max(now);
                self.l().expire_holds(now).map(|_| ())
            }
            Step::Reopen => {
                self.ledger = None;
                self.ledger = Some(Ledger::open(&self.path(), self.provider.public()).unwrap());
                Ok(())
            }
            Step::Refund { job: j } => self.l().refund_undelivered(job(j), "never delivered"),
            Step::SettleOpen { .. }
            | Step::VoidOpen { .. }
            | Step::AckSettled { .. }
            | Step::RefundLatest { .. }
            | Step::RefundSettled { .. } => {
                unreachable!("resolved before use")
            }
        };
        res.map_err(|e| kind(&e))
    }
}

fn check(h: &Harness, m: &Model) {
    let l = h.l();
    for i in 0..PEERS {
        let peer = h.peers[usize::from(i)].public();
        let got = l.account(Role::Provider, &peer).unwrap();
        match (m.accounts.get(&i), got) {
            (None, None) => {}
            (Some(want), Some(got)) => {
                assert_eq!(
                    (
                        got.deposits.0,
                        got.credit_limit.0,
                        got.charged.0,
                        got.held.0
                    ),
                    (want.deposits, want.credit, want.charged, want.held),
                    "peer {i}"
                );
                // The invariant: available = deposits + credit − charged − held ≥ 0.
                assert!(got.available().is_some(), "peer {i} overdrawn: {got:?}");
                // The chain head is the latest receipt that still charges.
                let last = m
                    .chains
                    .get(&i)
                    .and_then(|c| c.last())
                    .map(|j| h.receipts[j].digest());
                assert_eq!(got.last_receipt, last, "peer {i}'s last receipt");
            }
            (want, got) => panic!("peer {i}: model {want:?}, ledger {got:?}"),
        }
    }
    let holds: Vec<_> = l.holds().unwrap().into_iter().map(|(j, _)| j).collect();
    let want: Vec<_> = m.holds.keys().map(|j| job(*j)).collect();
    assert_eq!(holds, want);
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Each case opens a real sled database and fsyncs every step; 48 cases of up to 80
        // steps take a few seconds on two cores. PROPTEST_CASES does not override this.
        cases: 128,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/model.txt"
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn ledger_matches_the_model(steps in proptest::collection::vec(step(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let provider = provider();
        let ledger = Ledger::open(&dir.path().join("ledger"), provider.public()).unwrap();
        let mut h = Harness {
            dir,
            ledger: Some(ledger),
            provider,
            peers: (0..PEERS).map(requester).collect(),
            last_note: None,
            receipts: BTreeMap::new(),
        };
        let mut m = Model::default();
        for s in steps {
            let s = &s.resolve(&m);
            let got = h.run(s, &m);
            let want = m.apply(s);
            if let Step::Deposit { halves: 1.., .. } = s {
                m.next_deposit += 1;
            }
            if want == Err("skip") {
                continue;
            }
            prop_assert_eq!(got, want, "step {:?}", s);
            check(&h, &m);
        }
        let report = h.l().verify().unwrap();
        prop_assert_eq!(report.entries, m.entries);
    }
}
