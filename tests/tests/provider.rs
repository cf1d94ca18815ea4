//! Provider behaviour a requester relies on, over loopback with the tiny engine: cancellation
//! (queued and running, and by a dropped `generate`) releases the hold and charges nothing,
//! and only the job's requester can cancel it; a full queue answers `Busy` with
//! a retry time and holds nothing; holds left by a provider that died are released at start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use pixmarket_ledger::{HoldTerms, JobOutcome, Ledger, Role};
use pixmarket_node::network::{NetConfig, Request, Response};
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::{GenerateOptions, JobProgress};
use pixmarket_node::{Node, NodeOptions, now_ms};
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{JobId, JobParams, MicroTokens, PriceSchedule, SecretKey, Signed};
use pixmarket_tests::evil::RawPeer;
use pixmarket_tests::{TestNode, small_job, tiny_generator};

fn long_job(width: u32) -> JobParams {
    // 60 steps keep the tiny model busy for a few seconds on two cores.
    JobParams {
        width,
        height: 256,
        steps: 60,
        ..small_job("a slow lighthouse")
    }
}

async fn provider_with(seed: u8, dir: &std::path::Path, max_queue: u32) -> Node {
    let key = SecretKey::from_seed(&[seed; 32]);
    let ledger = Arc::new(Ledger::open(&dir.join("ledger"), key.public()).unwrap());
    Node::start(NodeOptions {
        key,
        ledger,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            ..NetConfig::default()
        },
        provide: Some((
            vec![tiny_generator()],
            ProviderSettings {
                advert_interval: pixmarket_node::provider::ADVERT_INTERVAL,
                ack_deadline: pixmarket_node::provider::ACK_DEADLINE,
                schedule: PriceSchedule::default(),
                max_queue,
                max_batch: 1,
                ms_per_standard_image: 60_000,
            },
        )),
        metrics: None,
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_and_a_queued_job_charges_nothing() {
    let provider = TestNode::start(31, vec![], Some(tiny_generator())).await;
    let mut raw = RawPeer::start(32, vec![provider.addr.clone()]).await;
    provider.deposit_from(31, raw.public(), 100);
    let budget = MicroTokens::from_tokens(20).unwrap();

    // A running job (first in the queue) and a queued one of another size (not batched with it).
    let running = RawPeer::job_request(provider.key, long_job(256), budget);
    let queued = RawPeer::job_request(provider.key, long_job(512), budget);
    for r in [&running, &queued] {
        let signed = Signed::sign(&raw.secret(), r).unwrap();
        let answer = raw
            .request(provider.key.to_peer_id(), Request::Job(signed))
            .await
            .unwrap();
        assert!(matches!(answer, Response::Accepted { .. }), "{answer:?}");
    }
    for job in [queued.job_id, running.job_id] {
        assert_eq!(
            raw.request(provider.key.to_peer_id(), Request::Cancel(job))
                .await
                .unwrap(),
            Response::Ok
        );
    }
    let mut cancelled = Vec::new();
    for _ in 0..2 {
        let (event, channel) = raw.next_event("a cancellation").await;
        assert!(
            matches!(event.kind, JobEventKind::Cancelled { .. }),
            "{:?}",
            event.kind
        );
        cancelled.push(event.job_id);
        raw.client
            .respond(channel, Response::EventAck(None))
            .await
            .unwrap();
    }
    cancelled.sort();
    let mut want = vec![running.job_id, queued.job_id];
    want.sort();
    assert_eq!(cancelled, want);

    let ledger = provider.node.ledger();
    for job in want {
        assert_eq!(
            ledger.job(Role::Provider, job).unwrap(),
            Some(JobOutcome::Voided)
        );
    }
    assert!(ledger.holds().unwrap().is_empty());
    assert!(ledger.receipts(None).unwrap().is_empty());
    let acct = ledger
        .account(Role::Provider, &raw.public())
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.charged, acct.held),
        (MicroTokens::ZERO, MicroTokens::ZERO)
    );
    ledger.verify().unwrap();
    raw.shutdown().await;
    provider.node.shutdown().await;
}

/// A `Cancel` carries no signature of its own: the provider honours it only from the job's
/// requester's own connection. Another peer that learned the job id cannot stop the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_another_peer_is_ignored_and_the_job_completes() {
    let provider = TestNode::start(37, vec![], Some(tiny_generator())).await;
    let mut owner = RawPeer::start(38, vec![provider.addr.clone()]).await;
    let stranger = RawPeer::start(39, vec![provider.addr.clone()]).await;
    provider.deposit_from(37, owner.public(), 100);
    let job = RawPeer::job_request(
        provider.key,
        long_job(256),
        MicroTokens::from_tokens(20).unwrap(),
    );
    let signed = Signed::sign(&owner.secret(), &job).unwrap();
    let to = provider.key.to_peer_id();
    let answer = owner.request(to, Request::Job(signed)).await.unwrap();
    assert!(matches!(answer, Response::Accepted { .. }), "{answer:?}");
    // Queued or running by now; the stranger's cancel is answered and changes nothing.
    let answer = stranger
        .request(to, Request::Cancel(job.job_id))
        .await
        .unwrap();
    assert_eq!(answer, Response::Ok);
    let (event, _channel) = owner.next_event("the job's end").await;
    assert_eq!(event.job_id, job.job_id);
    assert!(
        matches!(event.kind, JobEventKind::Completed { .. }),
        "{:?}",
        event.kind
    );
    stranger.shutdown().await;
    owner.shutdown().await;
    provider.node.shutdown().await;
}

/// A `generate` call dropped midway (Ctrl-C, a timeout, an aborted API task) tells the
/// provider at once: it stops computing, voids the hold, and nobody owes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_generate_cancels_its_job_at_the_provider() {
    let provider = TestNode::start(40, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(41, vec![provider.addr.clone()], None).await;
    provider.deposit_from(40, requester.key, 100);
    let (step_tx, mut step_rx) = tokio::sync::mpsc::channel(1);
    let mut on_progress = |p: JobProgress| {
        if matches!(p, JobProgress::Step { .. }) {
            let _ = step_tx.try_send(());
        }
    };
    let generating = requester.node.requester().generate(
        long_job(256),
        GenerateOptions {
            provider: Some(provider.key.to_peer_id()),
            ..GenerateOptions::default()
        },
        &mut on_progress,
    );
    tokio::select! {
        r = generating => panic!("the job ended before it was abandoned: {r:?}"),
        _ = step_rx.recv() => {}
    }
    // The select dropped `generating` once its first step was reported.
    let sent = requester.node.requester().abandoned().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].provider, provider.key.to_peer_id());
    assert!(sent[0].answered, "{sent:?}");
    let job = sent[0].job;
    let ledger = provider.node.ledger().clone();
    pixmarket_tests::evil::wait_until(
        std::time::Duration::from_secs(30),
        "the provider voiding the abandoned job",
        || ledger.job(Role::Provider, job).unwrap() == Some(JobOutcome::Voided),
    )
    .await;
    assert!(ledger.holds().unwrap().is_empty());
    assert!(
        ledger.receipts(None).unwrap().is_empty(),
        "it was never sold"
    );
    assert!(requester.node.ledger().receipts(None).unwrap().is_empty());
    // Nothing is left to wait for.
    assert!(requester.node.requester().abandoned().await.is_empty());
    requester.node.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_busy_and_holds_nothing_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = provider_with(33, dir.path(), 1).await;
    // The listener reports its bound address moments after start: poll for it (bounded).
    let mut addr = None;
    for _ in 0..500 {
        addr = node.addresses().await.unwrap().into_iter().next();
        if addr.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let addr = addr.expect("provider listening within 5 s");
    let provider = SecretKey::from_seed(&[33; 32]).public();
    let raw = RawPeer::start(34, vec![addr]).await;
    let note = pixmarket_protocol::DepositNote {
        deposit_id: JobId::random().0,
        account: raw.public(),
        amount: MicroTokens::from_tokens(100).unwrap(),
        memo: String::new(),
        recorded_at_ms: now_ms(),
    };
    node.ledger()
        .deposit(&Signed::sign(&SecretKey::from_seed(&[33; 32]), &note).unwrap())
        .unwrap();

    let budget = MicroTokens::from_tokens(20).unwrap();
    let mut accepted = Vec::new();
    let mut busy = None;
    for _ in 0..4 {
        let r = RawPeer::job_request(provider, long_job(256), budget);
        let answer = raw
            .request(
                provider.to_peer_id(),
                Request::Job(Signed::sign(&raw.secret(), &r).unwrap()),
            )
            .await
            .unwrap();
        match answer {
            Response::Accepted { .. } => accepted.push(r.job_id),
            Response::Refused(FailReason::Busy { retry_after_ms }) => {
                assert!(retry_after_ms >= 1000, "{retry_after_ms}");
                assert_eq!(
                    node.ledger().job(Role::Provider, r.job_id).unwrap(),
                    None,
                    "a refused job holds nothing"
                );
                busy = Some(r.job_id);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // One running and one waiting fill a queue of one; the rest are refused.
    assert!(busy.is_some(), "no Busy after {} accepted", accepted.len());
    assert!((1..=2).contains(&accepted.len()), "{accepted:?}");
    assert_eq!(node.ledger().holds().unwrap().len(), accepted.len());
    for job in accepted {
        raw.request(provider.to_peer_id(), Request::Cancel(job))
            .await
            .unwrap();
    }
    raw.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_left_by_a_dead_provider_are_released_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[35; 32]);
    let requester = SecretKey::from_seed(&[36; 32]).public();
    let job = JobId::random();
    {
        let ledger = Ledger::open(&dir.path().join("ledger"), key.public()).unwrap();
        ledger
            .set_default_credit(MicroTokens::from_tokens(10).unwrap())
            .unwrap();
        let terms = HoldTerms {
            job,
            requester,
            max_cost: MicroTokens::from_tokens(5).unwrap(),
            expires_at_ms: now_ms() + 600_000,
            request_hash: None,
        };
        ledger.hold(terms, now_ms()).unwrap();
        assert_eq!(ledger.holds().unwrap().len(), 1);
    } // the provider "dies" with a job held

    let node = provider_with(35, dir.path(), 4).await;
    assert!(node.ledger().holds().unwrap().is_empty());
    assert_eq!(
        node.ledger().job(Role::Provider, job).unwrap(),
        Some(JobOutcome::Voided)
    );
    let acct = node
        .ledger()
        .account(Role::Provider, &requester)
        .unwrap()
        .unwrap();
    assert_eq!(acct.held, MicroTokens::ZERO);
    node.ledger().verify().unwrap();
    node.shutdown().await;
}
