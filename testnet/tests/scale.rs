//! The market's network at scale: every node keeps its connections bounded whatever the
//! market's size, adverts reach every requester, and the books agree. Real nodes on loopback
//! with the simulated engine. All are behind `--ignored` (minutes each); at 80 + 10 they pass,
//! and the 300-node one fails on two cores (saturated, few adverts reach the requesters in
//! time, few jobs complete), as docs/testnet.md records.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use pixmarket_testnet::record::{JobOutcome, RunRecord};
use pixmarket_testnet::report;
use pixmarket_testnet::run::{self, EngineKind, TestnetConfig};
use pixmarket_testnet::scenario::Load;

/// The bound: the average node keeps at most this many connections.
const AVG_CONNECTIONS_BOUND: f64 = 40.0;

fn market(dir: std::path::PathBuf, providers: usize, requesters: usize) -> TestnetConfig {
    let mut c = TestnetConfig::new(dir);
    c.name = format!("scale {providers}+{requesters}");
    c.engine = EngineKind::Simulated;
    c.providers = providers;
    c.requesters = requesters;
    c.speedup = 10.0;
    c.max_batch = 1;
    c.max_queue = 64;
    c
}

/// Failed jobs by reason, most frequent first: what a failing run most needs to say.
fn failure_reasons(r: &RunRecord) -> String {
    let mut by: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for j in &r.jobs {
        if let JobOutcome::Failed { reason } = &j.outcome {
            *by.entry(reason.as_str()).or_default() += 1;
        }
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    v.iter()
        .map(|(reason, n)| format!("  {n} × {reason}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn check(r: &RunRecord) {
    let s = report::summarize(r);
    let table = format!(
        "{}\nfailed jobs by reason:\n{}",
        report::table(r),
        failure_reasons(r)
    );
    eprintln!("{table}");
    assert!(r.books.ok(), "books failed: {:#?}\n{table}", r.books);
    let n = &s.network;
    assert_eq!(n.nodes, r.providers.len() + r.requesters);
    assert!(n.connections.samples >= n.nodes, "{table}");
    assert_eq!(n.final_connections.samples, n.nodes, "{table}");
    assert!(n.connections.avg <= AVG_CONNECTIONS_BOUND, "{table}");
    assert!(n.final_connections.avg <= AVG_CONNECTIONS_BOUND, "{table}");
    // The node's own bound holds for every node at every sample.
    assert!(
        n.connections.max.unwrap() <= u64::from(n.max_connections),
        "{table}"
    );
    // Adverts went on reaching the requesters while the plan ran.
    assert!(
        n.advert_delay_ms.samples >= r.requesters * r.providers.len(),
        "{table}"
    );
    let completed = r
        .jobs
        .iter()
        .filter(|j| j.outcome == JobOutcome::Completed)
        .count();
    assert!(
        !r.jobs.is_empty() && completed * 10 >= r.jobs.len() * 9,
        "{table}"
    );
}

/// The "Done when": a 90-node market (80 providers, 10 requesters) keeps the average
/// node at ≤ 40 connections, with the books OK (figures in docs/testnet.md);
/// `PIXMARKET_SCALE_MAX_CONNECTIONS` overrides the bound to see how many connections nodes want.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "90 nodes in one process: about 3 minutes on 2 cores (docs/testnet.md)"]
async fn ninety_nodes_keep_connections_bounded_and_the_books_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = market(dir.path().to_owned(), 80, 10);
    c.duration_ms = 300_000;
    c.load = Load::Steady { per_minute: 30.0 };
    c.quiet_window = Duration::from_secs(10);
    if let Some(m) = std::env::var("PIXMARKET_SCALE_MAX_CONNECTIONS")
        .ok()
        .and_then(|m| m.parse().ok())
    {
        c.max_connections = m;
    }
    let r = run::run(&c, &mut |l| eprintln!("{l}")).await.unwrap();
    check(&r);
}

/// The scale run of docs/testnet.md: 250 providers and 50 requesters.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "300 nodes in one process: 2 cores are saturated, 2 of 604 jobs complete (the books hold) and the test fails (docs/testnet.md)"]
async fn three_hundred_nodes_keep_connections_bounded_and_the_books_agree() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = market(dir.path().to_owned(), 250, 50);
    c.duration_ms = 600_000;
    c.load = Load::Steady { per_minute: 60.0 };
    c.quiet_window = Duration::from_secs(30);
    c.drain_limit = Duration::from_secs(300);
    // Two cores do not carry 300 nodes' gossip (docs/testnet.md): the plan runs with what the
    // requesters learnt by set-up's deadline, and the report says how much that was.
    c.discovery_must_complete = false;
    let r = run::run(&c, &mut |l| eprintln!("{l}")).await.unwrap();
    let out = std::env::var_os("PIXMARKET_SCALE_REPORT").map(std::path::PathBuf::from);
    if let Some(out) = out {
        report::write_run(&r, &out).unwrap();
    }
    check(&r);
}

/// A probe for finding where set-up breaks: `PIXMARKET_SCALE_PROVIDERS` providers and
/// `PIXMARKET_SCALE_REQUESTERS` requesters (default 21 + 3), a short plan.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a probe of variable size; run with --ignored"]
async fn probe_market_of_variable_size() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = market(
        dir.path().to_owned(),
        env("PIXMARKET_SCALE_PROVIDERS", 21),
        env("PIXMARKET_SCALE_REQUESTERS", 3),
    );
    c.duration_ms = 60_000;
    c.load = Load::Steady { per_minute: 30.0 };
    c.quiet_window = Duration::from_secs(5);
    let r = run::run(&c, &mut |l| eprintln!("{l}")).await.unwrap();
    check(&r);
}
