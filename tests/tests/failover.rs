//! Failover over loopback TCP with the tiny engine: the provider running a job is shut down
//! mid-run; its stop voids the job and tells the requester, which fails over at once (its idle
//! timeout is far longer than the test may take) and gets the job from the other provider. It
//! is charged exactly once, by the provider that delivered, and the stopped provider's books
//! (reopened from its folder) hold no charge for the job.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::requester::{GenerateOptions, JobProgress};
use pixmarket_protocol::{JobParams, MicroTokens, PriceSchedule};
use pixmarket_tests::evil::{Warnings, honest_meter, wait_until};
use pixmarket_tests::{TestNode, small_job, tiny_generator};
use tokio::sync::mpsc;

/// Long enough that the provider is still stepping when the test stops it after step 1
/// (the tiny model takes tens of milliseconds a step at 256² on two shared cores).
const SLOW_STEPS: u32 = 40;
/// The requester's patience with a silent provider: far longer than [`HANG_GUARD`], so a
/// failover can only come from the stopping provider's void.
const IDLE: Duration = Duration::from_secs(3600);
/// Not a speed bound: only stops a lost void from hanging the run for an hour. The failover
/// takes about 5 s here (9 s with the cores busy).
const HANG_GUARD: Duration = Duration::from_secs(300);

fn slow_job() -> JobParams {
    JobParams {
        steps: SLOW_STEPS,
        ..small_job("a harbour in the rain, slowly")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_stopped_mid_job_fails_over_and_the_requester_pays_once() {
    let started = Instant::now();
    let warnings = Warnings::capture();
    let p1 = TestNode::start(31, vec![], Some(tiny_generator())).await;
    let p2 = TestNode::start(32, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(33, vec![p1.addr.clone(), p2.addr.clone()], None).await;
    p1.deposit_from(31, requester.key, 100);
    p2.deposit_from(32, requester.key, 100);

    // Both adverts must have arrived over gossip, or there is nothing to fail over to.
    let client = requester.node.requester().clone();
    wait_until(Duration::from_secs(15), "both providers' adverts", || {
        client.providers().len() == 2
    })
    .await;

    let (tx, mut progress) = mpsc::channel(1024);
    let options = GenerateOptions {
        idle_timeout: IDLE,
        provider: None,
        ..GenerateOptions::default()
    };
    let job = slow_job();
    let run = tokio::spawn({
        let job = job.clone();
        async move {
            client
                .generate(job, options, &mut |p| {
                    let _ = tx.try_send(p);
                })
                .await
        }
    });

    // Wait for the first step; the provider that queued the job is the one running it.
    let mut running = None;
    loop {
        let p = tokio::time::timeout(Duration::from_secs(15), progress.recv())
            .await
            .expect("a step within 15 s")
            .expect("generate still running");
        match p {
            JobProgress::Queued { provider, .. } => running = Some(provider),
            JobProgress::Step { .. } => break,
            JobProgress::FailingOver { provider, reason } => {
                panic!("failed over from {provider} before any step: {reason}")
            }
            JobProgress::Quoted { .. } => {}
        }
    }
    let running = running.expect("queued before stepping");
    let (killed, survivor) = if running == p1.key.to_peer_id() {
        (p1, p2)
    } else {
        assert_eq!(running, p2.key.to_peer_id());
        (p2, p1)
    };
    let TestNode {
        node: killed_node,
        key: killed_key,
        dir: killed_dir,
        ..
    } = killed;
    killed_node.shutdown().await;

    let outcome = tokio::time::timeout(HANG_GUARD, run)
        .await
        .expect("the stopped provider's void reached the requester")
        .unwrap()
        .expect("the surviving provider delivered");
    let mut seen = Vec::new();
    while let Ok(p) = progress.try_recv() {
        seen.push(p);
    }

    // The outcome is the survivor's, on the second attempt, after a failover from the killed one.
    assert_eq!(outcome.provider, survivor.key.to_peer_id());
    assert_eq!(outcome.attempts, 2);
    // The reason is the provider's signed void (a cancel or a failure it reported), not silence.
    assert!(
        seen.iter().any(|p| matches!(
            p,
            JobProgress::FailingOver { provider, reason }
                if *provider == killed_key.to_peer_id()
                    && (reason.contains("cancelled by the provider") || reason.starts_with("failed:"))
        )),
        "{seen:?}"
    );
    warnings
        .expect(&[
            "provider failed; failing over",
            &killed_key.to_peer_id().to_string(),
        ])
        .await;
    let (units, cost) = honest_meter(tiny_generator().as_ref(), &job, &PriceSchedule::default());
    let receipt = outcome.receipt.verify().unwrap();
    assert_eq!(receipt.units, units);
    assert_eq!(outcome.cost, cost);

    // The requester's books: one receipt, one charge, nothing with the killed provider.
    let books = requester.node.ledger();
    let all = books.receipts(None).unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].receipt, outcome.receipt);
    let mirror = books
        .account(Role::Requester, &survivor.key)
        .unwrap()
        .unwrap();
    assert_eq!((mirror.charged, mirror.entries), (cost, 1));
    assert!(
        books
            .account(Role::Requester, &killed_key)
            .unwrap()
            .is_none_or(|a| a.charged == MicroTokens::ZERO && a.entries == 0)
    );

    // The survivor charged exactly the metered cost, once, and holds nothing more.
    let acct = survivor
        .node
        .ledger()
        .account(Role::Provider, &requester.key)
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.charged, acct.held, acct.entries),
        (cost, MicroTokens::ZERO, 1)
    );

    // The killed provider's books, reopened from its folder once its worker let go of them:
    // no receipt and no charge; the job's hold was voided (or, had it died harder, left open
    // for the next start to void), never settled.
    let path = TestNode::ledger_path(killed_dir.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    let reopened = loop {
        match Ledger::open(&path, killed_key) {
            Ok(l) => break l,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the killed provider's ledger stayed locked: {e}"),
        }
    };
    assert!(reopened.receipts(None).unwrap().is_empty());
    let theirs = reopened
        .account(Role::Provider, &requester.key)
        .unwrap()
        .unwrap();
    assert_eq!(theirs.charged, MicroTokens::ZERO);
    assert_eq!(theirs.entries, 0);
    assert_eq!(
        theirs.held,
        MicroTokens::ZERO,
        "the stopped job's hold is voided"
    );
    assert!(reopened.holds().unwrap().is_empty());
    reopened.verify().unwrap();
    drop(reopened);

    requester.node.shutdown().await;
    survivor.node.shutdown().await;
    eprintln!(
        "failover took {:?}; the survivor ran {SLOW_STEPS} steps in {} ms",
        started.elapsed(),
        receipt.run_ms
    );
}
