//! The market end to end over loopback TCP with the tiny engine: a paid job leaves the same
//! doubly signed receipt in both ledgers; a requester without credit is refused before any GPU
//! work and pays nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use pixmarket_ledger::Role;
use pixmarket_node::requester::{FailureKind, GenerateError, GenerateOptions, JobProgress};
use pixmarket_protocol::{MicroTokens, metering};
use pixmarket_tests::{TestNode, small_job, tiny_generator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_end_to_end_leaves_the_same_doubly_signed_receipt() {
    let provider = TestNode::start(11, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(12, vec![provider.addr.clone()], None).await;
    provider.deposit_from(11, requester.key, 100);

    let mut seen = Vec::new();
    let options = GenerateOptions {
        provider: Some(provider.key.to_peer_id()),
        ..GenerateOptions::default()
    };
    let outcome = requester
        .node
        .requester()
        .generate(
            small_job("a lighthouse at dusk, 灯塔"),
            options,
            &mut |p| seen.push(p),
        )
        .await
        .unwrap();

    assert_eq!(outcome.images.len(), 1);
    assert!(outcome.images[0].starts_with(b"\x89PNG"));
    assert!(
        seen.iter()
            .any(|p| matches!(p, JobProgress::Step { step: 2, of: 2, .. })),
        "{seen:?}"
    );
    let receipt = outcome.receipt.verify().unwrap();
    assert_eq!(
        receipt.cost,
        metering::cost(&receipt.units, &receipt.schedule).unwrap()
    );
    assert_eq!(receipt.cumulative_charged, receipt.cost);

    // The requester's books hold the receipt with its own ack.
    let mine = requester
        .node
        .ledger()
        .receipts(Some(&provider.key))
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].receipt, outcome.receipt);
    assert_eq!(mine[0].ack.as_ref(), Some(&outcome.ack));

    // The provider's books: the same receipt; the ack arrives on the event's response.
    let mut theirs = Vec::new();
    for _ in 0..100 {
        theirs = provider
            .node
            .ledger()
            .receipts(Some(&requester.key))
            .unwrap();
        if theirs.first().is_some_and(|r| r.ack.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].receipt, mine[0].receipt);
    assert_eq!(theirs[0].ack, mine[0].ack);

    // Balances agree: charged on one side is what the other paid.
    let acct = provider
        .node
        .ledger()
        .account(Role::Provider, &requester.key)
        .unwrap()
        .unwrap();
    assert_eq!(acct.charged, receipt.cost);
    assert_eq!(acct.held, MicroTokens::ZERO);
    let mirror = requester
        .node
        .ledger()
        .account(Role::Requester, &provider.key)
        .unwrap()
        .unwrap();
    assert_eq!(mirror.charged, receipt.cost);
    provider.node.ledger().verify().unwrap();
    requester.node.ledger().verify().unwrap();

    requester.node.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_credit_is_refused_before_any_work() {
    let provider = TestNode::start(21, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(22, vec![provider.addr.clone()], None).await;

    let options = GenerateOptions {
        provider: Some(provider.key.to_peer_id()),
        ..GenerateOptions::default()
    };
    let mut seen = Vec::new();
    let err = requester
        .node
        .requester()
        .generate(small_job("a fox"), options, &mut |p| seen.push(p))
        .await
        .unwrap_err();
    let GenerateError::AllFailed(reasons) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            reasons[0].failure.kind,
            FailureKind::InsufficientCredit { available, .. } if available == MicroTokens::ZERO
        ),
        "{err}"
    );
    assert!(
        reasons[0].failure.message.contains("insufficient credit"),
        "{err}"
    );
    assert!(
        reasons[0]
            .failure
            .message
            .contains("0.000000 are available"),
        "{err}"
    );
    assert!(
        !seen.iter().any(|p| matches!(p, JobProgress::Step { .. })),
        "no step ran: {seen:?}"
    );
    assert!(provider.node.ledger().receipts(None).unwrap().is_empty());
    assert!(provider.node.ledger().holds().unwrap().is_empty());
    assert!(requester.node.ledger().receipts(None).unwrap().is_empty());

    requester.node.shutdown().await;
    provider.node.shutdown().await;
}
