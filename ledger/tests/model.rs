//! Model test (STYLE.md "Storage"): random sequences of operations, with close-and-reopen,
//! run against two sled ledgers (a provider's, and requester 0's own books of that provider)
//! and against a plain `BTreeMap` model of the rules. After every step both agree on each
//! result and each balance, and:
//! - on the provider side `available = deposits + credit − charged − held ≥ 0`, and
//!   `charged = Σ settled costs − Σ credited costs`;
//! - each pair's chain (receipts and credit notes, append-only) is the model's, entry for
//!   entry, and `last_entry` is its last entry;
//! - an ack after a credit is refused (`Refunded`), and so is a credit after an ack
//!   (`AlreadyAcked`);
//! - the requester's chain is always a prefix of the provider's (it can only record the entry
//!   that extends its head), with the total the provider had at that point.
//!
//! At the end `verify` replays both logs.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::*;
use pixmarket_ledger::{JobOutcome, Ledger, Role};
use pixmarket_protocol::{CreditNote, DepositNote, Hash, MicroTokens, Receipt, SecretKey, Signed};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const PEERS: u8 = 3;
/// Few job ids, so that settles, voids and acks usually find a hold and duplicates happen.
const JOBS: u64 = 10;
const HALF: u64 = 500_000;
/// The requester whose own books the harness keeps beside the provider's.
const MIRROR: u8 = 0;

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
    /// With `built`, through `settle_with` (the receipt built from the link inside the
    /// transaction); otherwise `receipt_link` then `settle`.
    Settle {
        job: u64,
        steps: u32,
        built: bool,
    },
    /// A receipt issued one millisecond after the hold expired.
    SettleLate {
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
    /// As provider, a credit note for the job's receipt.
    Credit {
        job: u64,
    },
    /// As requester 0: record the job's receipt with my ack.
    MirrorRecord {
        job: u64,
    },
    /// As requester 0: record the job's credit note, with its receipt if I never stored it.
    MirrorCredit {
        job: u64,
    },
    /// As requester 0: the job was acked and never delivered.
    MirrorUndelivered {
        job: u64,
    },
    // The rest pick what to act on from the model before running, so that most of them find
    // something: the `pick`-th open hold, settled job, and so on.
    SettleOpen {
        pick: usize,
        steps: u32,
        built: bool,
    },
    SettleLateOpen {
        pick: usize,
        steps: u32,
    },
    VoidOpen {
        pick: usize,
    },
    AckSettled {
        pick: usize,
    },
    /// Credit the `pick`-th settled job, acked or not.
    CreditSettled {
        pick: usize,
    },
    /// As requester 0, catch up one step with the provider's chain: record its next entry
    /// (a receipt, with a credit note right after it if there is one, or a credit note).
    MirrorSync,
    MirrorRecordPick {
        pick: usize,
    },
    MirrorCreditPick {
        pick: usize,
    },
    MirrorUndeliveredPick {
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
        let chain = m.chains.get(&MIRROR).map_or(&[][..], Vec::as_slice);
        let mirror_receipts: Vec<u64> = chain
            .iter()
            .filter_map(|(e, _)| match e {
                Entry::Receipt(j) => Some(*j),
                Entry::Credit(_) => None,
            })
            .collect();
        let mirror_credits: Vec<u64> = chain
            .iter()
            .filter_map(|(e, _)| match e {
                Entry::Credit(j) => Some(*j),
                Entry::Receipt(_) => None,
            })
            .collect();
        let mirror_jobs: Vec<u64> = m.mirror.jobs.keys().copied().collect();
        let nth = |v: &[u64], pick: usize| v.get(pick % v.len().max(1)).copied();
        let any = |v: &[u64], pick: usize| nth(v, pick).unwrap_or(0);
        match self {
            Step::SettleOpen { pick, steps, built } => Step::Settle {
                job: any(&open, pick),
                steps,
                built,
            },
            Step::SettleLateOpen { pick, steps } => Step::SettleLate {
                job: any(&open, pick),
                steps,
            },
            Step::VoidOpen { pick } => Step::Void {
                job: any(&open, pick),
            },
            Step::AckSettled { pick } => Step::Ack {
                job: any(&settled, pick),
            },
            Step::CreditSettled { pick } => Step::Credit {
                job: any(&settled, pick),
            },
            Step::MirrorSync => match chain.get(m.mirror.len()) {
                // Nothing new: `MirrorRecord` of an unsettled job is skipped.
                None => Step::MirrorRecord { job: JOBS },
                Some((Entry::Receipt(j), _))
                    if chain.get(m.mirror.len() + 1).map(|(e, _)| *e)
                        == Some(Entry::Credit(*j)) =>
                {
                    Step::MirrorCredit { job: *j }
                }
                Some((Entry::Receipt(j), _)) => Step::MirrorRecord { job: *j },
                Some((Entry::Credit(j), _)) => Step::MirrorCredit { job: *j },
            },
            Step::MirrorRecordPick { pick } => Step::MirrorRecord {
                job: nth(&mirror_receipts, pick).unwrap_or(JOBS),
            },
            Step::MirrorCreditPick { pick } => Step::MirrorCredit {
                job: nth(&mirror_credits, pick).unwrap_or(JOBS),
            },
            Step::MirrorUndeliveredPick { pick } => Step::MirrorUndelivered {
                job: any(&mirror_jobs, pick),
            },
            other => other,
        }
    }
}

/// Half of the peers drawn are requester 0, whose own books the harness keeps, so that its
/// chain grows long enough for out-of-order and stale records to happen.
fn peer() -> impl Strategy<Value = u8> {
    prop_oneof![Just(MIRROR), 0..PEERS]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (peer(), 0..80u64).prop_map(|(peer, halves)| Step::Deposit { peer, halves }),
        1 => Just(Step::RepeatDeposit),
        2 => (peer(), 0..40u64).prop_map(|(peer, halves)| Step::SetCredit { peer, halves }),
        1 => (0..20u64).prop_map(|halves| Step::SetDefault { halves }),
        8 => (0..JOBS, peer(), 0..12u64, 1..16u64).prop_map(|(job, peer, halves, expires)| {
            Step::Hold { job, peer, halves, expires }
        }),
        2 => (0..JOBS, 1..10u32, any::<bool>())
            .prop_map(|(job, steps, built)| Step::Settle { job, steps, built }),
        2 => (0..JOBS).prop_map(|job| Step::Void { job }),
        3 => (0..JOBS).prop_map(|job| Step::Ack { job }),
        1 => (0..12u64).prop_map(|now| Step::Expire { now }),
        1 => Just(Step::Reopen),
        1 => (0..JOBS).prop_map(|job| Step::Credit { job }),
        8 => (0..8usize, 1..10u32, any::<bool>())
            .prop_map(|(pick, steps, built)| Step::SettleOpen { pick, steps, built }),
        1 => (0..8usize, 1..14u32).prop_map(|(pick, steps)| Step::SettleLateOpen { pick, steps }),
        2 => (0..8usize).prop_map(|pick| Step::VoidOpen { pick }),
        3 => (0..8usize).prop_map(|pick| Step::AckSettled { pick }),
        3 => (0..8usize).prop_map(|pick| Step::CreditSettled { pick }),
        3 => Just(Step::MirrorSync),
        3 => (0..8usize).prop_map(|pick| Step::MirrorRecordPick { pick }),
        3 => (0..8usize).prop_map(|pick| Step::MirrorCreditPick { pick }),
        2 => (0..8usize).prop_map(|pick| Step::MirrorUndeliveredPick { pick }),
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
    Credited,
    Done,
}

/// An entry of a pair's chain, named by its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Receipt(u64),
    Credit(u64),
}

/// What a requester-side job became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mine {
    Settled,
    Undelivered,
    Credited,
}

/// Requester 0's books of the provider: its chain is a prefix of the provider's.
#[derive(Debug, Default)]
struct Mirror {
    /// Whether the account exists (created by the first entry recorded).
    touched: bool,
    charged: u64,
    head: Option<Entry>,
    jobs: BTreeMap<u64, Mine>,
    /// Entries of its log.
    log: u64,
}

impl Mirror {
    /// Entries recorded: receipts plus credit notes.
    fn len(&self) -> usize {
        self.jobs.len() + self.jobs.values().filter(|o| **o == Mine::Credited).count()
    }
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
    /// Per peer, the chain: each entry with the pair's cumulative total after it.
    chains: BTreeMap<u8, Vec<(Entry, u64)>>,
    mirror: Mirror,
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

    /// Where `entry` is in requester 0's chain, with its total and the entry before it.
    fn place(&self, entry: Entry) -> (u64, Option<Entry>) {
        let chain = &self.chains[&MIRROR];
        let i = chain.iter().position(|(e, _)| *e == entry).unwrap();
        (chain[i].1, i.checked_sub(1).map(|p| chain[p].0))
    }

    /// The ledger's link check for a chain entry on the requester side: the cumulative total
    /// first, then the previous entry.
    fn link(&self, charged: u64, head: Option<Entry>, entry: Entry) -> Result<u64, &'static str> {
        let (cumulative, prev) = self.place(entry);
        let job = match entry {
            Entry::Receipt(j) | Entry::Credit(j) => j,
        };
        let cost = self.settled[&job].1;
        let expected = match entry {
            Entry::Receipt(_) => charged + cost,
            Entry::Credit(_) => charged - cost,
        };
        if cumulative != expected {
            return Err("CumulativeMismatch");
        }
        if prev != head {
            return Err("PrevReceiptMismatch");
        }
        Ok(cumulative)
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
            Step::Settle { job, steps, built } => {
                let Some(&(peer, max, _)) = self.holds.get(&job) else {
                    // Both `settle` and `settle_with` name what became of a finished job.
                    let _ = built;
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
                let total = a.charged;
                self.holds.remove(&job);
                self.jobs.insert(job, Outcome::Settled { acked: false });
                self.settled.insert(job, (peer, cost));
                self.chains
                    .entry(peer)
                    .or_default()
                    .push((Entry::Receipt(job), total));
            }
            Step::SettleLate { job, .. } => {
                return Err(if self.holds.contains_key(&job) {
                    // Checked before the charge against the hold.
                    "HoldExpired"
                } else if self.jobs.contains_key(&job) {
                    "AlreadyFinished"
                } else {
                    "UnknownHold"
                });
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
                Some(Outcome::Credited) => return Err("Refunded"),
                _ => return Err("NotSettled"),
            },
            Step::Credit { job } => match self.jobs.get(&job) {
                Some(Outcome::Settled { acked: false }) => {
                    let (peer, cost) = self.settled[&job];
                    let a = self.acct(peer);
                    a.charged -= cost;
                    let total = a.charged;
                    self.chains
                        .entry(peer)
                        .or_default()
                        .push((Entry::Credit(job), total));
                    self.jobs.insert(job, Outcome::Credited);
                }
                Some(Outcome::Settled { acked: true }) => return Err("AlreadyAcked"),
                Some(Outcome::Credited) => return Err("Refunded"),
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
            Step::MirrorRecord { job } => {
                if self.settled.get(&job).map(|s| s.0) != Some(MIRROR) {
                    return Err("skip");
                }
                if self.mirror.jobs.contains_key(&job) {
                    return Err("DuplicateJob");
                }
                let charged =
                    self.link(self.mirror.charged, self.mirror.head, Entry::Receipt(job))?;
                self.mirror_entry(Entry::Receipt(job), charged);
                self.mirror.jobs.insert(job, Mine::Settled);
                return Ok(());
            }
            Step::MirrorCredit { job } => {
                let credited = self
                    .chains
                    .get(&MIRROR)
                    .is_some_and(|c| c.iter().any(|(e, _)| *e == Entry::Credit(job)));
                if !credited {
                    return Err("skip");
                }
                let (charged, head) = match self.mirror.jobs.get(&job) {
                    // Never stored here: the receipt enters the chain with its note.
                    None => {
                        let charged =
                            self.link(self.mirror.charged, self.mirror.head, Entry::Receipt(job))?;
                        (charged, Some(Entry::Receipt(job)))
                    }
                    Some(Mine::Credited) => return Err("Refunded"),
                    Some(Mine::Settled | Mine::Undelivered) => {
                        (self.mirror.charged, self.mirror.head)
                    }
                };
                let charged = self.link(charged, head, Entry::Credit(job))?;
                self.mirror_entry(Entry::Credit(job), charged);
                self.mirror.jobs.insert(job, Mine::Credited);
                return Ok(());
            }
            Step::MirrorUndelivered { job } => {
                if self.mirror.jobs.get(&job) != Some(&Mine::Settled) {
                    return Err("NotSettled");
                }
                self.mirror.jobs.insert(job, Mine::Undelivered);
                self.mirror.log += 1;
                return Ok(());
            }
            Step::SettleOpen { .. }
            | Step::SettleLateOpen { .. }
            | Step::VoidOpen { .. }
            | Step::AckSettled { .. }
            | Step::CreditSettled { .. }
            | Step::MirrorSync
            | Step::MirrorRecordPick { .. }
            | Step::MirrorCreditPick { .. }
            | Step::MirrorUndeliveredPick { .. } => {
                unreachable!("resolved before use")
            }
        }
        self.entries += 1;
        Ok(())
    }

    fn mirror_entry(&mut self, head: Entry, charged: u64) {
        self.mirror.touched = true;
        self.mirror.charged = charged;
        self.mirror.head = Some(head);
        self.mirror.log += 1;
    }
}

struct Harness {
    dir: tempfile::TempDir,
    ledger: Option<Ledger>,
    /// Requester 0's own books.
    mirror: Option<Ledger>,
    provider: SecretKey,
    peers: Vec<SecretKey>,
    last_note: Option<Signed<DepositNote>>,
    receipts: BTreeMap<u64, Signed<Receipt>>,
    notes: BTreeMap<u64, Signed<CreditNote>>,
}

impl Harness {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("ledger")
    }

    fn mirror_path(&self) -> std::path::PathBuf {
        self.dir.path().join("mirror")
    }

    fn l(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }

    fn mirror(&self) -> &Ledger {
        self.mirror.as_ref().unwrap()
    }

    fn digest(&self, e: Entry) -> Hash {
        match e {
            Entry::Receipt(j) => self.receipts[&j].digest(),
            Entry::Credit(j) => self.notes[&j].digest(),
        }
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
            Step::Settle {
                job: j,
                steps,
                built,
            } => {
                // The requester named in the receipt is the hold's (unknown holds: peer 0).
                // Issued now: before the hold expires (holds that expired are released by the
                // `Expire` step that moved the clock past them).
                let peer = model.holds.get(&j).map_or(r(0), |h| r(h.0));
                let (p, now) = (self.provider.public(), model.clock);
                let body = |link| Receipt {
                    issued_at_ms: now,
                    ..receipt_body(p, peer, job(j), steps, link)
                };
                let out = if built {
                    self.l().settle_with(job(j), &self.provider, body)
                } else {
                    let rc = sign(&self.provider, &body(self.l().receipt_link(&peer).unwrap()));
                    self.l().settle(job(j), &rc).map(|()| rc)
                };
                out.map(|rc| {
                    self.receipts.insert(j, rc);
                })
            }
            Step::SettleLate { job: j, steps } => {
                let (peer, expires) = model.holds.get(&j).map_or((r(0), 0), |h| (r(h.0), h.2));
                let mut body = receipt_body(
                    self.provider.public(),
                    peer,
                    job(j),
                    steps,
                    self.l().receipt_link(&peer).unwrap(),
                );
                body.issued_at_ms = expires + 1;
                self.l().settle(job(j), &sign(&self.provider, &body))
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
            Step::Credit { job: j } => self
                .l()
                .credit(job(j), &self.provider, "model", model.clock)
                .map(|note| {
                    self.notes.insert(j, note);
                }),
            Step::Expire { now } => {
                let now = model.clock.max(now);
                self.l().expire_holds(now).map(|_| ())
            }
            Step::Reopen => {
                self.ledger = None;
                self.mirror = None;
                self.ledger = Some(Ledger::open(&self.path(), self.provider.public()).unwrap());
                self.mirror =
                    Some(Ledger::open(&self.mirror_path(), self.peers[0].public()).unwrap());
                Ok(())
            }
            Step::MirrorRecord { job: j } => {
                let Some(rc) = self
                    .receipts
                    .get(&j)
                    .filter(|_| model.settled.get(&j).map(|s| s.0) == Some(MIRROR))
                else {
                    return Err("skip");
                };
                self.mirror().record_receipt(rc, &ack(&self.peers[0], rc))
            }
            Step::MirrorCredit { job: j } => {
                let Some(note) = self.notes.get(&j) else {
                    return Err("skip");
                };
                // With the receipt when these books never stored it.
                let receipt = match model.mirror.jobs.contains_key(&j) {
                    true => None,
                    false => Some(&self.receipts[&j]),
                };
                self.mirror().record_credit(receipt, note)
            }
            Step::MirrorUndelivered { job: j } => self.mirror().mark_undelivered(job(j), "model"),
            Step::SettleOpen { .. }
            | Step::SettleLateOpen { .. }
            | Step::VoidOpen { .. }
            | Step::AckSettled { .. }
            | Step::CreditSettled { .. }
            | Step::MirrorSync
            | Step::MirrorRecordPick { .. }
            | Step::MirrorCreditPick { .. }
            | Step::MirrorUndeliveredPick { .. } => {
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
        let chain = m.chains.get(&i).map_or(&[][..], Vec::as_slice);
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
                // charged = Σ settled − Σ credited.
                let costs = |credited: bool| -> u64 {
                    m.settled
                        .iter()
                        .filter(|(j, (p, _))| {
                            *p == i && (!credited || m.jobs[*j] == Outcome::Credited)
                        })
                        .map(|(_, (_, c))| c)
                        .sum()
                };
                assert_eq!(got.charged.0, costs(false) - costs(true), "peer {i}");
                // The chain is the model's, entry for entry, and its head is the last entry.
                assert_eq!(
                    got.last_entry,
                    chain.last().map(|(e, _)| h.digest(*e)),
                    "peer {i}'s head"
                );
                assert_eq!(got.entries, u64::try_from(chain.len()).unwrap(), "peer {i}");
            }
            (want, got) => panic!("peer {i}: model {want:?}, ledger {got:?}"),
        }
        let got = l.chain(Role::Provider, &peer, None).unwrap();
        let want: Vec<Hash> = chain.iter().map(|(e, _)| h.digest(*e)).collect();
        assert_eq!(
            got.iter().map(|e| e.digest()).collect::<Vec<_>>(),
            want,
            "peer {i}'s chain"
        );
        let totals: Vec<u64> = chain.iter().map(|(_, t)| *t).collect();
        assert_eq!(
            got.iter()
                .map(|e| e.link().unwrap().cumulative_charged.0)
                .collect::<Vec<_>>(),
            totals,
            "peer {i}'s totals"
        );
    }
    let holds: Vec<_> = l.holds().unwrap().into_iter().map(|(j, _)| j).collect();
    let want: Vec<_> = m.holds.keys().map(|j| job(*j)).collect();
    assert_eq!(holds, want);
    for j in 0..JOBS {
        let got = l.job(Role::Provider, job(j)).unwrap();
        let credited = matches!(got, Some(JobOutcome::Credited { .. }));
        assert_eq!(
            credited,
            m.jobs.get(&j) == Some(&Outcome::Credited),
            "job {j}"
        );
    }

    // Requester 0's books: a prefix of the provider's chain, with its total.
    let mine = h.mirror();
    let provider = h.provider.public();
    let a = mine.account(Role::Requester, &provider).unwrap();
    assert_eq!(a.is_some(), m.mirror.touched);
    let a = a.unwrap_or_default();
    let n = m.mirror.len();
    let chain = m.chains.get(&MIRROR).map_or(&[][..], Vec::as_slice);
    let prefix: Vec<Hash> = chain[..n].iter().map(|(e, _)| h.digest(*e)).collect();
    assert_eq!(
        (a.charged.0, a.entries, a.last_entry),
        (
            m.mirror.charged,
            u64::try_from(n).unwrap(),
            m.mirror.head.map(|e| h.digest(e))
        ),
        "requester's books"
    );
    assert_eq!(
        a.charged.0,
        n.checked_sub(1).map_or(0, |last| chain[last].1),
        "the total the provider had at the requester's head"
    );
    assert_eq!(
        mine.chain(Role::Requester, &provider, None)
            .unwrap()
            .iter()
            .map(|e| e.digest())
            .collect::<Vec<_>>(),
        prefix,
        "requester's chain"
    );
    for j in 0..JOBS {
        let got = match mine.job(Role::Requester, job(j)).unwrap() {
            None => None,
            Some(JobOutcome::Settled { .. }) => Some(Mine::Settled),
            Some(JobOutcome::Undelivered { .. }) => Some(Mine::Undelivered),
            Some(JobOutcome::Credited { .. }) => Some(Mine::Credited),
            Some(other) => panic!("requester's job {j}: {other:?}"),
        };
        assert_eq!(got, m.mirror.jobs.get(&j).copied(), "requester's job {j}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Each case opens two real sled databases and fsyncs every step; 128 cases of up to
        // 80 steps take about half a minute on two cores. PROPTEST_CASES does not override
        // this.
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
        let peers: Vec<SecretKey> = (0..PEERS).map(requester).collect();
        let ledger = Ledger::open(&dir.path().join("ledger"), provider.public()).unwrap();
        let mirror = Ledger::open(&dir.path().join("mirror"), peers[0].public()).unwrap();
        let mut h = Harness {
            dir,
            ledger: Some(ledger),
            mirror: Some(mirror),
            provider,
            peers,
            last_note: None,
            receipts: BTreeMap::new(),
            notes: BTreeMap::new(),
        };
        let mut m = Model::default();
        // Every peer starts with some credit, so that most holds succeed and chains grow;
        // refusals for credit still come once it is used up.
        let start = (0..PEERS).map(|peer| Step::Deposit { peer, halves: 16 });
        for s in start.chain(steps) {
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
        let report = h.mirror().verify().unwrap();
        prop_assert_eq!(report.entries, m.mirror.log);
    }
}
