//! Step caching through real nodes (loopback libp2p, sled ledgers, the drawn tiny model): a
//! requester that requires exact computation gets the exact image from a caching provider, and
//! the quote and the signed receipt say "exact"; a job that does not require it runs cached and
//! its receipt says so, billed the same; a caching provider that does not serve exact jobs
//! refuses them at the quote with a typed reason, and nothing is held or charged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::sync::Arc;

use pixmarket_engine::drawn::DRAWN_SIDE;
use pixmarket_ledger::Role;
use pixmarket_node::engine_generator::{CachingSettings, EngineGenerator};
use pixmarket_node::generator::Generator;
use pixmarket_node::requester::{GenerateError, GenerateOptions};
use pixmarket_protocol::{JobParams, MicroTokens, StepCaching};
use pixmarket_tests::{TestNode, small_job};

/// Reuse whenever the rule allows it, so the cached image surely differs from the exact one.
const CACHING: StepCaching = StepCaching::FirstBlock {
    threshold_permille: 1000,
};

fn generator(dir: &std::path::Path, caching: CachingSettings) -> Arc<EngineGenerator> {
    Arc::new(
        EngineGenerator::load(dir, "f32", "cpu")
            .unwrap()
            .with_caching(caching),
    )
}

/// Steps of the test's jobs: enough for the cache to reuse some (the rule always computes the
/// first two and the last), more than the drawn model's default of 4.
const STEPS: u32 = 8;

/// The drawn model's own size, at [`STEPS`].
fn job(exact: bool) -> JobParams {
    JobParams {
        width: DRAWN_SIDE,
        height: DRAWN_SIDE,
        steps: STEPS,
        exact,
        ..small_job("a red circle in the centre on a blue background")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_is_served_exactly_and_cached_jobs_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    pixmarket_engine::tiny::ensure_tiny_model(&model).unwrap();
    let caching = generator(
        &model,
        CachingSettings {
            step_caching: CACHING,
            ..CachingSettings::default()
        },
    );
    let exact_only = generator(&model, CachingSettings::default());
    let reference = exact_only
        .generate(&[job(true)], &mut |_, _| ControlFlow::Continue(()))
        .unwrap()
        .remove(0)
        .remove(0);

    let provider = TestNode::start(41, vec![], Some(caching.clone() as Arc<dyn Generator>)).await;
    let requester = TestNode::start(42, vec![provider.addr.clone()], None).await;
    provider.deposit_from(41, requester.key, 100);
    let options = || GenerateOptions {
        provider: Some(provider.key.to_peer_id()),
        ..GenerateOptions::default()
    };
    let buy = |params: JobParams| {
        let r = requester.node.requester();
        async move { r.generate(params, options(), &mut |_| {}).await.unwrap() }
    };

    let exact = buy(job(true)).await;
    let exact_receipt = exact.receipt.verify().unwrap();
    assert_eq!(exact_receipt.step_caching, StepCaching::Exact);
    assert_eq!(
        exact.images[0], reference,
        "an exact job was not computed exactly"
    );

    let before = caching.cache_stats();
    let cached = buy(job(false)).await;
    let cached_receipt = cached.receipt.verify().unwrap();
    assert_eq!(cached_receipt.step_caching, CACHING);
    let after = caching.cache_stats();
    assert!(
        after.reused_forwards > before.reused_forwards,
        "{before:?} → {after:?}"
    );
    assert_ne!(cached.images[0], reference);
    // Metering is by the steps asked for, whatever ran.
    assert_eq!(cached_receipt.units, exact_receipt.units);
    assert_eq!(cached_receipt.cost, exact_receipt.cost);
    // Both books hold both receipts, modes included (they are inside the signed bodies).
    for node in [&provider.node, &requester.node] {
        let mut modes: Vec<StepCaching> = node
            .ledger()
            .receipts(None)
            .unwrap()
            .iter()
            .map(|r| r.receipt.verify().unwrap().step_caching)
            .collect();
        modes.sort_by_key(|m| *m != StepCaching::Exact);
        assert_eq!(modes, vec![StepCaching::Exact, CACHING]);
    }
    requester.node.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_does_not_serve_exact_refuses_at_the_quote() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    pixmarket_engine::tiny::ensure_tiny_model(&model).unwrap();
    let caching = generator(
        &model,
        CachingSettings {
            step_caching: CACHING,
            serves_exact: false,
            ..CachingSettings::default()
        },
    );
    let provider = TestNode::start(43, vec![], Some(caching as Arc<dyn Generator>)).await;
    let requester = TestNode::start(44, vec![provider.addr.clone()], None).await;
    provider.deposit_from(43, requester.key, 100);
    let options = GenerateOptions {
        provider: Some(provider.key.to_peer_id()),
        ..GenerateOptions::default()
    };
    let err = requester
        .node
        .requester()
        .generate(job(true), options, &mut |_| {})
        .await
        .unwrap_err();
    let GenerateError::AllFailed(reasons) = &err else {
        panic!("{err:?}");
    };
    assert!(
        reasons.iter().any(|r| r
            .failure
            .message
            .contains("does not run jobs that require exact computation")),
        "{reasons:?}"
    );
    for node in [&provider.node, &requester.node] {
        let ledger = node.ledger();
        assert!(ledger.receipts(None).unwrap().is_empty());
        assert!(ledger.holds().unwrap().is_empty());
    }
    let acct = provider
        .node
        .ledger()
        .account(Role::Provider, &requester.key)
        .unwrap();
    assert!(acct.is_none_or(|a| a.charged == MicroTokens::ZERO && a.held == MicroTokens::ZERO));
    requester.node.shutdown().await;
    provider.node.shutdown().await;
}
