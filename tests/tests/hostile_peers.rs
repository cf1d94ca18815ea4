//! Peers that try to hold a node's time or attention, against real nodes over loopback TCP.
//!
//! A provider that accepts a job and then says "still queued" forever (heartbeats faster than
//! any idle timeout, the same answer to every `Status`): the requester's job ends at its
//! request's expiry with a clear error, the job is cancelled, and nothing is charged.
//!
//! Sybil adverts (ten thousand fresh keys claiming 1 ms per image, dated in the future) against
//! a requester that has measured one honest provider: the honest one keeps its place and its
//! rank, and a sybil that fails drops below the rest.
//!
//! A quote flood: answered `Busy` with a retry hint past the peer's burst, while another
//! requester's job completes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use pixmarket_ledger::Role;
use pixmarket_node::network::{Request, Response};
use pixmarket_node::now_ms;
use pixmarket_node::rate_limit::QUOTES_PER_SECOND;
use pixmarket_node::requester::{
    FailureKind, GenerateError, GenerateOptions, JobProgress, MAX_PROVIDERS,
};
use pixmarket_protocol::messages::DeviceCapacity;
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{PublicKey, SecretKey};
use pixmarket_testnet::adversary::{ProviderPlay, STALL_HEARTBEAT, quote_request};
use pixmarket_tests::evil::{EvilProvider, RawPeer, wait_until};
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
        reasons[0]
            .failure
            .message
            .contains("the request expired before the provider delivered a result"),
        "{err}"
    );
    assert_eq!(reasons[0].failure.kind, FailureKind::Expired, "{err}");
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

/// Ten thousand fresh keys advertising 1 ms per image, dated 30 s ahead, against a requester
/// that has bought from one honest provider: the honest provider keeps its place in the table
/// and stays first in the ranking (a claim cannot beat what was measured), the table stays
/// within its bound, and a sybil that failed a job ranks after every one that has not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sybil_adverts_claiming_1_ms_do_not_displace_a_provider_that_delivered() {
    let honest = TestNode::start(97, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(98, vec![honest.addr.clone()], None).await;
    honest.deposit_from(97, requester.key, 100);
    let client = requester.node.requester().clone();
    wait_until(
        Duration::from_secs(30),
        "the honest provider's advert",
        || client.providers().iter().any(|p| p.key == honest.key),
    )
    .await;
    let outcome = client
        .generate(
            small_job("a picture from a known provider"),
            GenerateOptions::default(),
            &mut |_| {},
        )
        .await
        .unwrap();
    assert_eq!(outcome.provider, honest.key.to_peer_id());
    let measured = client.standing_of(&honest.key);
    assert_eq!(measured.delivered, 1);
    let honest_ms = measured.ms_per_standard.unwrap();

    // Its next advert says it is idle again (a busy known provider loses jobs to untried ones,
    // as it should).
    wait_until(Duration::from_secs(30), "an idle advert", || {
        client
            .providers()
            .iter()
            .any(|p| p.key == honest.key && p.advert.queue_depth == 0)
    })
    .await;
    let template = client
        .providers()
        .into_iter()
        .find(|p| p.key == honest.key)
        .unwrap()
        .advert;
    let sybil_key = |i: usize| {
        let mut seed = [0xa5u8; 32];
        seed[..8].copy_from_slice(&u64::try_from(i).unwrap().to_le_bytes());
        SecretKey::from_seed(&seed).public()
    };
    for i in 0..10_000 {
        let mut fake = template.clone();
        fake.ms_per_standard_image = 1;
        fake.queue_depth = 0;
        fake.max_queue = u32::MAX;
        fake.issued_at_ms = now_ms() + 30_000;
        client.on_advert(sybil_key(i), fake);
    }
    let table = client.providers();
    assert!(table.len() <= MAX_PROVIDERS, "{} entries", table.len());
    assert_eq!(
        table[0].key, honest.key,
        "the measured provider ranks first"
    );
    assert!(honest_ms > 1, "the honest speed is a real measurement");

    // A sybil tried once (it cannot even be reached) fails and drops below every untried one.
    let tried = table[1].key;
    let err = client
        .generate(
            small_job("to a sybil"),
            GenerateOptions {
                provider: Some(tried.to_peer_id()),
                max_attempts: 1,
                ..GenerateOptions::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(err, GenerateError::AllFailed(_)), "{err}");
    let after = client.providers();
    assert_eq!(after[0].key, honest.key);
    assert_eq!(
        after.last().unwrap().key,
        tried,
        "the failed sybil ranks last"
    );
    assert!(client.providers().iter().any(|p| p.key == honest.key));

    // A claim of a thousand devices behind a deep queue buys a key that has not delivered
    // nothing: its queue counts as one device's. The measured provider with one job ahead
    // (two rounds) outranks it (a thousand rounds); counting the claim, it would have been one.
    let mut busy = template.clone();
    busy.queue_depth = 1;
    let many = sybil_key(20_000);
    let mut fake = template.clone();
    fake.ms_per_standard_image = 1;
    fake.queue_depth = 999;
    fake.devices = vec![
        DeviceCapacity {
            name: "claimed".into(),
            memory_mib: 80_000,
            ms_per_standard_image: 1,
        };
        1_000
    ];
    client.on_advert(many, fake);
    client.on_advert(honest.key, busy);
    let ranked = client.providers();
    let place = |k: PublicKey| ranked.iter().position(|p| p.key == k).unwrap();
    assert!(
        place(honest.key) < place(many),
        "the measured provider at {} of {}, the claimed thousand devices at {}",
        place(honest.key),
        ranked.len(),
        place(many)
    );

    requester.node.shutdown().await;
    honest.node.shutdown().await;
}

/// A peer that floods a provider with quotes is answered `Busy` with a retry hint past its
/// burst, cheaply, while another requester buys an image at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_flood_is_answered_busy_and_an_honest_job_completes_meanwhile() {
    let provider = TestNode::start(99, vec![], Some(tiny_generator())).await;
    let flooder = RawPeer::start(100, vec![provider.addr.clone()]).await;
    let honest = TestNode::start(101, vec![provider.addr.clone()], None).await;
    provider.deposit_from(99, honest.key, 100);

    let to = provider.key.to_peer_id();
    let params = small_job("the same quote, again and again");
    let quote = quote_request(&flooder.secret(), provider.key, &params).unwrap();
    // Ten at a time, under the streams a connection may open, as fast as they are answered.
    let started = std::time::Instant::now();
    let flood = async {
        let mut answers = Vec::new();
        for _ in 0..20 {
            let wave = (0..10).map(|_| flooder.request(to, Request::Quote(quote.clone())));
            answers.extend(libp2p::futures::future::join_all(wave).await);
        }
        (answers, started.elapsed())
    };
    let mut quiet = |_| {};
    let buying = honest.node.requester().generate(
        small_job("bought during a flood"),
        GenerateOptions {
            provider: Some(to),
            ..GenerateOptions::default()
        },
        &mut quiet,
    );
    let ((answers, took), bought) = tokio::join!(flood, buying);
    let busy = answers
        .iter()
        .filter(|a| {
            matches!(a, Ok(Response::Refused(FailReason::Busy { retry_after_ms })) if retry_after_ms > &0)
        })
        .count();
    let quoted = answers
        .iter()
        .filter(|a| matches!(a, Ok(Response::Quote(_))))
        .count();
    assert_eq!(busy + quoted, 200, "every flood request has an answer");
    // The burst, and the rate for as long as the flood lasted, and no more.
    let burst = 2 * QUOTES_PER_SECOND;
    let allowed = u64::from(burst) + u64::from(QUOTES_PER_SECOND) * (took.as_secs() + 1);
    assert!(
        quoted >= usize::try_from(burst).unwrap(),
        "the burst is served: {quoted}"
    );
    assert!(
        u64::try_from(quoted).unwrap() <= allowed,
        "{quoted} quoted in {took:?}, at most {allowed} allowed"
    );
    let bought = bought.unwrap();
    assert_eq!(bought.provider, to);
    assert!(provider.node.ledger().verify().is_ok());

    flooder.shutdown().await;
    honest.node.shutdown().await;
    provider.node.shutdown().await;
}
