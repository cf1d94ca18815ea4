//! Peers that try to hold a node's time or attention, against real nodes over loopback TCP.
//!
//! A provider that accepts a job and then says "still queued" forever (heartbeats faster than
//! any idle timeout, the same answer to every `Status`): the requester's job ends at its
//! request's expiry with a clear error, the job is cancelled, and nothing is charged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use pixmarket_ledger::Role;
use pixmarket_node::requester::{GenerateError, GenerateOptions, JobProgress};
use pixmarket_testnet::adversary::{ProviderPlay, STALL_HEARTBEAT};
use pixmarket_tests::evil::EvilProvider;
use pixmarket_tests::{TestNode, small_job, tiny_generator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_heartbeats_forever_cannot_hold_a_job_past_its_expiry() {
    let evil = EvilProvider::start_play(95, ProviderPlay::Stall, tiny_generator()).await;
    let requester = TestNode::start(96, vec![evil.addr.clone()], None).await;
    let idle_timeout = Duration::from_secs(1);
    assert!(STALL_HEARTBEAT * 2 < idle_timeout);
    let options = GenerateOptions {
        provider: Some(evil.peer_id()),
        idle_timeout,
        request_validity: Duration::from_secs(2),
        max_attempts: 1,
        ..GenerateOptions::default()
    };
    let mut heartbeats = 0u32;
    let err = requester
        .node
        .requester()
        .generate(small_job("a job held hostage"), options, &mut |p| {
            if matches!(p, JobProgress::Queued { .. }) {
                heartbeats += 1;
            }
        })
        .await
        .unwrap_err();
    let GenerateError::AllFailed(reasons) = &err else {
        panic!("{err}")
    };
    assert_eq!(reasons.len(), 1, "{err}");
    assert!(
        reasons[0].contains("the request expired before the provider delivered a result"),
        "{err}"
    );
    // The provider kept saying it was busy, faster than the idle timeout: many times over
    // the request's lifetime (2 s of validity and the 5 s margin past it).
    assert!(heartbeats >= 10, "only {heartbeats} heartbeats heard");
    // Nothing was charged, and nothing is owed.
    let books = requester.node.ledger();
    assert!(books.receipts(None).unwrap().is_empty());
    assert_eq!(books.account(Role::Requester, &evil.key).unwrap(), None);
    books.verify().unwrap();

    requester.node.shutdown().await;
    evil.shutdown().await;
}
