//! Crash test (STYLE.md "Storage"): a child process runs holds, settles (`settle` and
//! `settle_with`), voids, acks and credit notes for unacknowledged receipts in a loop from two
//! threads and prints each job id after its call returns; the parent SIGKILLs it at a random
//! moment, reopens the ledger, runs `verify`, and checks that every job the child reported is
//! there in the state reported, that no hold is half-settled and no credit half-done, and that
//! each pair's chain is linear.
//!
//! The child is this test binary itself, re-run with `PIXMARKET_LEDGER_CRASH_CHILD` set and
//! filtered to `crash_child`, which does nothing in a normal run.
//!
//! `crash_kill_loop` kills 200 times (about 20 s on two cores); the `--ignored`
//! `crash_kill_loop_long` kills 2,000 times.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pixmarket_ledger::{JobOutcome, Ledger, Role};
use pixmarket_protocol::{ChainEntry, JobId};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "PIXMARKET_LEDGER_CRASH_CHILD";
const RUN_ENV: &str = "PIXMARKET_LEDGER_CRASH_RUN";
/// Kills per ledger folder. `verify` replays the whole log, so a folder is retired after this
/// many kills to keep each check short; 20 still gives every folder many recoveries.
const KILLS_PER_FOLDER: usize = 20;
/// Two worker threads, as many as the machine's cores: enough for concurrent commits to share
/// fsync rounds (group commit) at the moment of the kill.
const THREADS: u64 = 2;

/// A job id unique across runs: run number, thread, counter.
fn crash_job(run: u64, thread: u64, i: u64) -> JobId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&run.to_be_bytes());
    b[8..12].copy_from_slice(&u32::try_from(thread).unwrap().to_be_bytes());
    b[12..].copy_from_slice(&u32::try_from(i).unwrap().to_be_bytes());
    JobId(b)
}

/// The child's work loop; runs until killed.
fn child(dir: &Path, run: u64) {
    let p = provider();
    let ledger = Arc::new(Ledger::open(dir, p.public()).unwrap());
    for t in 0..THREADS {
        let r = requester(u8::try_from(t).unwrap()).public();
        if ledger.account(Role::Provider, &r).unwrap().is_none() {
            ledger.set_credit_limit(r, tokens(1_000_000)).unwrap();
        }
    }
    println!("READY");
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let ledger = Arc::clone(&ledger);
            s.spawn(move || {
                let p = provider();
                let rk = requester(u8::try_from(t).unwrap());
                let r = rk.public();
                let out = std::io::stdout();
                for i in 0.. {
                    let j = crash_job(run, t, i);
                    ledger.hold(terms(j, r, tokens(10)), 0).unwrap();
                    writeln!(out.lock(), "H {j}").unwrap();
                    match i % 4 {
                        0 => {
                            // Settles for one requester come from one thread, one at a time.
                            let rc = receipt(&ledger, &p, r, j, 1 + u32::try_from(i % 19).unwrap());
                            ledger.settle(j, &rc).unwrap();
                            writeln!(out.lock(), "S {j}").unwrap();
                            ledger.attach_ack(j, &ack(&rk, &rc)).unwrap();
                            writeln!(out.lock(), "A {j}").unwrap();
                        }
                        1 => {
                            let steps = 1 + u32::try_from(i % 19).unwrap();
                            ledger
                                .settle_with(j, &p, |link| {
                                    receipt_body(p.public(), r, j, steps, link)
                                })
                                .unwrap();
                            writeln!(out.lock(), "S {j}").unwrap();
                            if i % 8 == 5 {
                                // Never acknowledged: credited back by a new chain entry.
                                ledger.credit(j, &p, "crash test", 2_000).unwrap();
                                writeln!(out.lock(), "C {j}").unwrap();
                            }
                        }
                        2 => {
                            ledger.void(j, "crash test").unwrap();
                            writeln!(out.lock(), "V {j}").unwrap();
                        }
                        _ => {} // left held
                    }
                }
            });
        }
    });
}

/// Runs only as the child: does nothing in a normal test run.
#[test]
fn crash_child() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let run = std::env::var(RUN_ENV).unwrap().parse().unwrap();
        child(Path::new(&dir), run);
    }
}

#[derive(Default)]
struct Expect {
    /// job → strongest state the child reported: H < S|V, and A or C on top of S.
    jobs: BTreeMap<JobId, char>,
}

fn kill_loop(kills: usize, seed: u64) {
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut root = tempfile::tempdir().unwrap();
    let mut expect = Expect::default();
    let mut reported = 0usize;
    let mut during_open = 0usize;
    for k in 0..kills {
        if k % KILLS_PER_FOLDER == 0 {
            root = tempfile::tempdir().unwrap();
            expect = Expect::default();
        }
        let dir: PathBuf = root.path().join("ledger");
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .env(RUN_ENV, k.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Lines are read as they come; the reader ends when the killed child's pipe closes.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prints "test crash_child ... " without a newline before the test runs.
                if line.ends_with("READY") {
                    let _ = ready_tx.try_send(());
                }
                lines.push(line);
            }
            lines
        });
        // One kill in five lands at a random moment of start-up (opening, recovering,
        // creating); the others after the child has started working.
        if rng.gen_range(0..5) == 0 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
        } else {
            let _ = ready_rx.recv_timeout(Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        if !lines.iter().any(|l| l.ends_with("READY")) {
            during_open += 1;
        }
        for line in &lines {
            let Some((tag, id)) = line.split_once(' ') else {
                continue;
            };
            let Some(tag) = tag.chars().next().filter(|c| "HSVAC".contains(*c)) else {
                continue;
            };
            let job: JobId = id.parse().unwrap();
            reported += 1;
            let e = expect.jobs.entry(job).or_insert(tag);
            if tag != 'H' {
                *e = tag;
            }
        }
        if !dir.exists() {
            // Killed before the ledger was created: nothing was promised.
            assert!(expect.jobs.is_empty());
            continue;
        }
        check(&dir, &expect, k);
    }
    eprintln!(
        "crash test: {kills} SIGKILLs ({during_open} during start-up), {reported} reported \
         operations all found, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn check(dir: &Path, expect: &Expect, kill: usize) {
    let l = Ledger::open(dir, provider().public()).unwrap_or_else(|e| {
        panic!(
            "kill {kill}: reopen failed: {e}; the folder holds {:?}",
            folder_listing(dir)
        )
    });
    let report = l
        .verify()
        .unwrap_or_else(|e| panic!("kill {kill}: verify failed: {e}"));
    for (job, tag) in &expect.jobs {
        let got = l.job(Role::Provider, *job).unwrap();
        let ok = matches!(
            (tag, &got),
            ('H', Some(_))
                | ('S' | 'A', Some(JobOutcome::Settled { .. }))
                // Credited after it was reported settled, killed before it said so.
                | ('S', Some(JobOutcome::Credited { .. }))
                | ('V', Some(JobOutcome::Voided))
                | ('C', Some(JobOutcome::Credited { .. }))
        );
        assert!(
            ok,
            "kill {kill}: job {job} was reported {tag}, the ledger has {got:?}"
        );
        if *tag == 'A' {
            let r = l.receipt(Role::Provider, *job).unwrap().unwrap();
            assert!(r.ack.is_some(), "kill {kill}: job {job} lost its ack");
        }
        if *tag == 'C' {
            let r = l.receipt(Role::Provider, *job).unwrap().unwrap();
            assert!(
                r.refunded.is_some(),
                "kill {kill}: job {job} lost its credit note"
            );
        }
    }
    // No hold is half-settled: every open hold is a job in state Held, every Held job has its
    // hold, every settled job its receipt, and each account's held total is its holds' sum.
    let holds = l.holds().unwrap();
    let mut held_sum: BTreeMap<_, u64> = BTreeMap::new();
    for (job, h) in &holds {
        assert_eq!(l.job(Role::Provider, *job).unwrap(), Some(JobOutcome::Held));
        *held_sum.entry(h.requester).or_default() += h.max_cost.0;
    }
    for job in expect.jobs.keys() {
        match l.job(Role::Provider, *job).unwrap() {
            Some(JobOutcome::Held) => assert!(holds.iter().any(|(j, _)| j == job)),
            Some(JobOutcome::Settled { .. }) => {
                assert!(l.receipt(Role::Provider, *job).unwrap().is_some());
                assert!(!holds.iter().any(|(j, _)| j == job));
            }
            _ => {}
        }
    }
    for (peer, a) in l.accounts(Role::Provider).unwrap() {
        assert_eq!(a.held.0, held_sum.get(&peer).copied().unwrap_or(0));
        assert!(a.available().is_some());
        // No credit is half-done: charged is the sum of the receipts that still charge, and
        // the pair's chain is linear, ends at the account's head and holds one entry per
        // receipt and per credit note.
        let receipts: Vec<_> = l
            .receipts(Some(&peer))
            .unwrap()
            .into_iter()
            .filter(|s| s.role == Role::Provider)
            .collect();
        let sum: u64 = receipts
            .iter()
            .filter(|s| s.refunded.is_none())
            .map(|s| s.receipt.verify().unwrap().cost.0)
            .sum();
        assert_eq!(a.charged.0, sum, "kill {kill}: charged");
        let chain = full_chain(&l, Role::Provider, &peer);
        assert_eq!(assert_linear(&chain), a.charged, "kill {kill}: chain total");
        assert_eq!(
            a.last_entry,
            chain.last().map(ChainEntry::digest),
            "kill {kill}: chain head"
        );
        let credited = receipts.iter().filter(|s| s.refunded.is_some()).count();
        assert_eq!(
            (chain.len(), a.entries),
            (
                receipts.len() + credited,
                u64::try_from(chain.len()).unwrap()
            ),
            "kill {kill}: chain length"
        );
    }
    assert_eq!(report.open_holds, holds.len());
}

/// Each file in `dir` with its size, to say what a failed reopen found.
fn folder_listing(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let size = e.metadata().map_or(0, |m| m.len());
            (e.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn crash_kill_loop() {
    kill_loop(200, 0x5eed);
}

#[test]
#[ignore = "2,000 SIGKILLs, a few minutes; run with --ignored"]
fn crash_kill_loop_long() {
    kill_loop(2_000, 0xc0ffee);
}
