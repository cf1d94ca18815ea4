//! Durable settles per second (`cargo bench -p pixmarket-ledger`): one at a time, grouped
//! (8 threads settling at once share flush + fsync rounds), `settle_with` from 8 threads for
//! one requester (the link read inside the transaction, so the threads contend for one
//! account), beside raw sled insert + flush (what sled alone promises, which is not power-loss
//! safe) and raw insert + flush + the ledger's own barrier (fdatasync of `db`, fsync of the
//! folder) in the same run. Holds and receipts are prepared outside the timed part (for
//! `settle_with`, only the holds: its receipts are built and signed inside).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pixmarket_ledger::{Ledger, ReceiptLink};
use pixmarket_protocol::{JobId, MicroTokens, PublicKey, Receipt, SecretKey, Signed};

/// Threads settling at once in the grouped case: a provider's GPU workers finishing together.
const THREADS: u64 = 8;

struct Bench {
    _dir: tempfile::TempDir,
    ledger: Arc<Ledger>,
    provider: SecretKey,
    next_job: u64,
    links: Vec<ReceiptLink>,
}

impl Bench {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let provider = provider();
        let ledger = Arc::new(Ledger::open(&dir.path().join("ledger"), provider.public()).unwrap());
        for t in 0..THREADS {
            ledger
                .set_credit_limit(
                    requester(u8::try_from(t).unwrap()).public(),
                    tokens(1 << 40),
                )
                .unwrap();
        }
        Self {
            _dir: dir,
            ledger,
            provider,
            next_job: 0,
            links: vec![
                ReceiptLink {
                    charged_so_far: MicroTokens::ZERO,
                    prev_entry_hash: None
                };
                usize::try_from(THREADS).unwrap()
            ],
        }
    }

    /// Holds and chained receipts for `n` settles by requester `t`.
    fn prepare(&mut self, t: u64, n: u64) -> Vec<(JobId, Signed<Receipt>)> {
        let r: PublicKey = requester(u8::try_from(t).unwrap()).public();
        let link = &mut self.links[usize::try_from(t).unwrap()];
        let mut out = Vec::new();
        for _ in 0..n {
            let j = job(self.next_job);
            self.next_job += 1;
            self.ledger.hold(terms(j, r, tokens(10)), 0).unwrap();
            let rc = receipt_with(&self.provider, r, j, 10, *link);
            *link = ReceiptLink {
                charged_so_far: rc.verify().unwrap().cumulative_charged,
                prev_entry_hash: Some(rc.digest()),
            };
            out.push((j, rc));
        }
        out
    }
}

fn raw_sled(c: &mut Criterion, fsync: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("raw")).unwrap();
    let file = File::open(dir.path().join("raw").join("db")).unwrap();
    let folder = File::open(dir.path().join("raw")).unwrap();
    // About the size of a stored receipt.
    let value = vec![7u8; 600];
    let mut i = 0u64;
    let name = if fsync {
        "raw sled insert+flush+fdatasync+dir fsync"
    } else {
        "raw sled insert+flush (not power-loss safe)"
    };
    let mut g = c.benchmark_group("durable settle");
    g.throughput(Throughput::Elements(1));
    g.bench_function(name, |b| {
        b.iter(|| {
            i += 1;
            db.insert(i.to_be_bytes(), value.as_slice()).unwrap();
            db.flush().unwrap();
            if fsync {
                // The same barrier the ledger uses.
                file.sync_data().unwrap();
                folder.sync_all().unwrap();
            }
        })
    });
    g.finish();
}

fn settles(c: &mut Criterion) {
    raw_sled(c, false);
    raw_sled(c, true);

    let mut g = c.benchmark_group("durable settle");
    g.throughput(Throughput::Elements(1));
    let mut bench = Bench::new();
    g.bench_function("ledger settle, one at a time", |b| {
        b.iter_custom(|iters| {
            let work = bench.prepare(0, iters);
            let start = Instant::now();
            for (j, rc) in &work {
                bench.ledger.settle(*j, rc).unwrap();
            }
            start.elapsed()
        })
    });

    let mut bench = Bench::new();
    let mut syncs = 0u64;
    let mut settled = 0u64;
    g.bench_function("ledger settle, grouped (8 threads)", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(THREADS);
            let work: Vec<_> = (0..THREADS).map(|t| bench.prepare(t, per)).collect();
            let before = bench.ledger.durable_syncs();
            let start = Instant::now();
            std::thread::scope(|s| {
                for w in &work {
                    let l = &bench.ledger;
                    s.spawn(move || {
                        for (j, rc) in w {
                            l.settle(*j, rc).unwrap();
                        }
                    });
                }
            });
            let elapsed = start.elapsed();
            syncs += bench.ledger.durable_syncs() - before;
            settled += per * THREADS;
            // Report per requested iteration; a few extra settles round up the split.
            elapsed.mul_f64(iters as f64 / (per * THREADS) as f64)
        })
    });

    let mut bench = Bench::new();
    g.bench_function("ledger settle_with, one requester (8 threads)", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(THREADS);
            let r = requester(0).public();
            let work: Vec<Vec<JobId>> = (0..THREADS)
                .map(|_| {
                    (0..per)
                        .map(|_| {
                            let j = job(bench.next_job);
                            bench.next_job += 1;
                            bench.ledger.hold(terms(j, r, tokens(10)), 0).unwrap();
                            j
                        })
                        .collect()
                })
                .collect();
            let start = Instant::now();
            std::thread::scope(|s| {
                for w in &work {
                    let (l, p) = (&bench.ledger, &bench.provider);
                    s.spawn(move || {
                        for j in w {
                            l.settle_with(*j, p, |link| receipt_body(p.public(), r, *j, 10, link))
                                .unwrap();
                        }
                    });
                }
            });
            start
                .elapsed()
                .mul_f64(iters as f64 / (per * THREADS) as f64)
        })
    });
    g.finish();
    if syncs > 0 {
        eprintln!(
            "grouped: {settled} settles shared {syncs} flush+fsync rounds ({:.1} per round)",
            settled as f64 / syncs as f64
        );
    }
}

criterion_group! {
    name = benches;
    // Each durable operation costs a disk flush; a short run still gives stable figures.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = settles
}
criterion_main!(benches);
