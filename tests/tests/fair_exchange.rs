//! The fair exchange tried, step by step, by a requester that cheats or is unlucky, and by a
//! provider that takes the money and keeps the images. Real nodes over loopback TCP, real sled
//! books on disk, the tiny engine.
//!
//! Against a provider (a raw requester answers its `Completed` as no honest node would): a
//! signed refusal, silence, a disconnect while the job runs, and acks that are forged, mismatched
//! or for a job it never bought. In each case the requester ends with no image bytes it was not
//! charged for, and the provider's books show no charge left for it (the receipt settled at
//! completion is credited back by a signed note). An honest ack, sent twice, is delivered twice
//! and charged once.
//!
//! Against a requester: a provider that takes the ack and never answers `Fetch` leaves a signed
//! record against itself (its receipt, our ack, the job marked undelivered), and ranks last.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use pixmarket_ledger::{JobOutcome, Role};
use pixmarket_node::network::{Request, Response, ResponseChannel};
use pixmarket_node::now_ms;
use pixmarket_node::requester::{
    GenerateError, GenerateOptions, RefetchError, check_images, check_receipt,
};
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{
    Hash, JobId, JobStatus, MicroTokens, Quote, Receipt, ReceiptAck, ReceiptRefusal, Signed,
};
use pixmarket_tests::evil::{Cheat, EvilProvider, RawPeer, wait_until};
use pixmarket_tests::{TestNode, small_job, tiny_generator};

/// Short enough for a test to see a receipt credited back, long enough for the tiny model's
/// job and a few offers on a loaded two-core machine.
const ACK_DEADLINE: Duration = Duration::from_secs(3);
/// Longest wait for the provider's books to show a credit note (the deadline plus slack for a
/// loaded machine): a bound on a failing test, not a claim about speed.
const SETTLE_WAIT: Duration = Duration::from_secs(60);

async fn provider(seed: u8) -> TestNode {
    TestNode::start_custom(seed, vec![], Some(tiny_generator()), |s| {
        s.ack_deadline = ACK_DEADLINE;
    })
    .await
}

/// A job bought by `requester` from `provider`: submitted and accepted.
struct Bought {
    job: JobId,
    signed: Signed<pixmarket_protocol::JobRequest>,
    quote: Quote,
}

async fn buy(provider: &TestNode, requester: &RawPeer, prompt: &str) -> Bought {
    let params = small_job(prompt);
    let quote = requester.quote(provider.key, &params).await;
    let req = RawPeer::job_request(provider.key, params, quote.cost);
    let signed = Signed::sign(&requester.secret(), &req).unwrap();
    let answer = requester
        .request(provider.key.to_peer_id(), Request::Job(signed.clone()))
        .await
        .unwrap();
    assert!(matches!(answer, Response::Accepted { .. }), "{answer:?}");
    Bought {
        job: req.job_id,
        signed,
        quote,
    }
}

/// Waits for the job's `Completed` (skipping anything else) and returns its receipt with the
/// channel to answer it on.
async fn completed(requester: &mut RawPeer, job: JobId) -> (Signed<Receipt>, ResponseChannel) {
    loop {
        let (event, channel) = requester.next_event("the completed job").await;
        if event.job_id != job {
            continue;
        }
        match event.kind {
            JobEventKind::Completed { receipt } => return (receipt, channel),
            JobEventKind::Failed { reason, .. } => panic!("the job failed: {reason}"),
            _ => {}
        }
    }
}

fn ack_for(requester: &RawPeer, job: JobId, receipt_hash: Hash) -> Signed<ReceiptAck> {
    let ack = ReceiptAck {
        job_id: job,
        receipt_hash,
        acked_at_ms: now_ms(),
    };
    Signed::sign(&requester.secret(), &ack).unwrap()
}

/// Waits until the provider's books show `job` credited back, then checks that nothing is
/// charged or held for `requester` and that the chain holds the receipt and its credit note.
async fn credited_back(provider: &TestNode, requester: &RawPeer, job: JobId) {
    let books = provider.node.ledger();
    wait_until(SETTLE_WAIT, "the receipt credited back", || {
        matches!(
            books.job(Role::Provider, job).unwrap(),
            Some(JobOutcome::Credited { .. })
        )
    })
    .await;
    let account = books
        .account(Role::Provider, &requester.public())
        .unwrap()
        .unwrap();
    assert_eq!(
        (account.charged, account.held, account.entries),
        (MicroTokens::ZERO, MicroTokens::ZERO, 2),
        "the receipt and its credit note, nothing charged"
    );
    assert!(books.holds().unwrap().is_empty());
    let report = books.verify().unwrap();
    assert_eq!(report.credit_notes, 1);
}

/// Every way of asking for the images of a credited job, with an ack that is ours and valid:
/// refused, and no image bytes.
async fn no_images_after_credit(provider: &TestNode, requester: &RawPeer, job: JobId, hash: Hash) {
    let to = provider.key.to_peer_id();
    let late = ack_for(requester, job, hash);
    let answer = requester.request(to, Request::Fetch(late)).await.unwrap();
    assert!(
        matches!(answer, Response::Refused(FailReason::Credited)),
        "a late ack after the credit: {answer:?}"
    );
    let status = requester.request(to, Request::Status(job)).await.unwrap();
    let Response::Status(JobStatus::Credited { note }) = status else {
        panic!("expected the signed credit note, got {status:?}")
    };
    assert_eq!(note.signer(), provider.key);
    // The late ack did not turn the credit into a charge.
    let account = provider
        .node
        .ledger()
        .account(Role::Provider, &requester.public())
        .unwrap()
        .unwrap();
    assert_eq!(account.charged, MicroTokens::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_that_refuses_the_receipt_gets_no_images_and_pays_nothing() {
    let provider = provider(81).await;
    let mut requester = RawPeer::start(82, vec![provider.addr.clone()]).await;
    provider.deposit_from(81, requester.public(), 100);
    let bought = buy(&provider, &requester, "a refused heron").await;

    let (receipt, channel) = completed(&mut requester, bought.job).await;
    // The receipt is honest: the refusal is the requester's choice, not the provider's fault.
    check_receipt(&receipt, &bought.signed, &bought.quote, &provider.key).unwrap();
    let refusal = ReceiptRefusal {
        job_id: bought.job,
        receipt_hash: receipt.digest(),
        reason: "changed my mind".into(),
        refused_at_ms: now_ms(),
    };
    let refusal = Signed::sign(&requester.secret(), &refusal).unwrap();
    requester
        .client
        .respond(channel, Response::ReceiptRefused(refusal))
        .await
        .unwrap();

    credited_back(&provider, &requester, bought.job).await;
    no_images_after_credit(&provider, &requester, bought.job, receipt.digest()).await;

    requester.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_silent_to_the_receipt_gets_no_images_and_pays_nothing() {
    let provider = provider(83).await;
    let mut requester = RawPeer::start(84, vec![provider.addr.clone()]).await;
    provider.deposit_from(83, requester.public(), 100);
    let bought = buy(&provider, &requester, "a silent heron").await;

    // Every offer of the receipt goes unanswered (the channel is dropped), until the provider's
    // ack deadline passes and it credits the receipt back.
    let (receipt, channel) = completed(&mut requester, bought.job).await;
    drop(channel);
    let offers = {
        let books = provider.node.ledger();
        let credit = wait_until(SETTLE_WAIT, "the receipt credited back", || {
            matches!(
                books.job(Role::Provider, bought.job).unwrap(),
                Some(JobOutcome::Credited { .. })
            )
        });
        tokio::pin!(credit);
        let mut offers = 1;
        loop {
            tokio::select! {
                () = &mut credit => break,
                (event, channel) = requester.next_event("a re-offer") => {
                    if let JobEventKind::Completed { receipt: again } = &event.kind {
                        assert_eq!(again, &receipt, "a re-offer is the same signed receipt");
                        offers += 1;
                    }
                    drop(channel);
                }
            }
        }
        offers
    };
    assert!(offers >= 2, "the provider re-offers an unanswered receipt");
    credited_back(&provider, &requester, bought.job).await;
    no_images_after_credit(&provider, &requester, bought.job, receipt.digest()).await;

    requester.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_that_disconnects_mid_job_gets_no_images_and_pays_nothing() {
    let provider = provider(85).await;
    let requester = RawPeer::start(86, vec![provider.addr.clone()]).await;
    provider.deposit_from(85, requester.public(), 100);
    let bought = buy(&provider, &requester, "a heron left behind").await;
    // Gone before the job completes: the provider cannot offer the receipt to anyone.
    requester.shutdown().await;

    let books = provider.node.ledger();
    wait_until(SETTLE_WAIT, "the receipt credited back", || {
        matches!(
            books.job(Role::Provider, bought.job).unwrap(),
            Some(JobOutcome::Credited { .. })
        )
    })
    .await;
    let receipt = books
        .receipt(Role::Provider, bought.job)
        .unwrap()
        .unwrap()
        .receipt;

    // Back with the same key: an ack for the receipt it never answered fetches nothing.
    let requester = RawPeer::start(86, vec![provider.addr.clone()]).await;
    credited_back(&provider, &requester, bought.job).await;
    no_images_after_credit(&provider, &requester, bought.job, receipt.digest()).await;

    requester.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_mismatched_and_foreign_acks_fetch_nothing_and_a_repeated_ack_is_charged_once() {
    let provider = provider(87).await;
    let mut requester = RawPeer::start(88, vec![provider.addr.clone()]).await;
    let stranger = RawPeer::start(89, vec![provider.addr.clone()]).await;
    provider.deposit_from(87, requester.public(), 100);
    provider.deposit_from(87, stranger.public(), 100);
    let to = provider.key.to_peer_id();
    let bought = buy(&provider, &requester, "a heron worth paying for").await;
    let (receipt, channel) = completed(&mut requester, bought.job).await;
    let body = check_receipt(&receipt, &bought.signed, &bought.quote, &provider.key).unwrap();
    let books = provider.node.ledger();

    // Before any ack, while the receipt waits: each of these fetches nothing and stores nothing.
    // The requester's own ack for another receipt's digest.
    let mismatched = ack_for(&requester, bought.job, Hash::of(b"some other receipt"));
    let answer = requester
        .request(to, Request::Fetch(mismatched))
        .await
        .unwrap();
    assert!(matches!(answer, Response::Refused(_)), "{answer:?}");
    // The requester's genuine ack, replayed by another peer: the connection is not the signer.
    let genuine = ack_for(&requester, bought.job, receipt.digest());
    let answer = stranger
        .request(to, Request::Fetch(genuine.clone()))
        .await
        .unwrap();
    assert!(
        matches!(answer, Response::Refused(FailReason::BadSignature)),
        "{answer:?}"
    );
    // The stranger's own ack for a job it never bought.
    let foreign = ack_for(&stranger, bought.job, receipt.digest());
    let answer = stranger.request(to, Request::Fetch(foreign)).await.unwrap();
    assert!(matches!(answer, Response::Refused(_)), "{answer:?}");
    // The requester's ack with its signature broken.
    let mut bytes = genuine.body().to_vec();
    bytes[0] ^= 1;
    let forged = Signed::from_parts(genuine.signer(), bytes, genuine.signature());
    let answer = requester.request(to, Request::Fetch(forged)).await.unwrap();
    assert!(
        matches!(answer, Response::Refused(FailReason::BadSignature)),
        "{answer:?}"
    );
    assert!(
        books
            .receipt(Role::Provider, bought.job)
            .unwrap()
            .unwrap()
            .ack
            .is_none(),
        "no ack stored by any of them"
    );
    let stranger_account = books.account(Role::Provider, &stranger.public()).unwrap();
    assert!(
        stranger_account
            .as_ref()
            .is_none_or(|a| a.charged == MicroTokens::ZERO && a.entries == 0),
        "{stranger_account:?}"
    );

    // The honest answer: the ack on the offer, then the images, twice (a lost answer is asked
    // again), charged once.
    requester
        .client
        .respond(channel, Response::EventAck(Some(genuine.clone())))
        .await
        .unwrap();
    for _ in 0..2 {
        let Response::Images { images, .. } = requester
            .request(to, Request::Fetch(genuine.clone()))
            .await
            .unwrap()
        else {
            panic!("no images for the acknowledged job")
        };
        check_images(&body, &images).unwrap();
    }
    let account = books
        .account(Role::Provider, &requester.public())
        .unwrap()
        .unwrap();
    assert_eq!((account.charged, account.entries), (body.cost, 1));
    assert_eq!(books.receipts(None).unwrap().len(), 1);
    books.verify().unwrap();

    requester.shutdown().await;
    stranger.shutdown().await;
    provider.node.shutdown().await;
}

/// A provider that takes the ack and then never answers `Fetch`: the requester pays one job's
/// cost and keeps the signed record of it (the provider's receipt, our ack, the job marked
/// undelivered), and the next purchase goes to an honest provider instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_takes_the_ack_and_keeps_the_images_leaves_a_signed_record_against_it() {
    let mut evil = EvilProvider::start(90, Cheat::KeepImages, tiny_generator()).await;
    let requester = TestNode::start(91, vec![evil.addr.clone()], None).await;
    let options = GenerateOptions {
        provider: Some(evil.peer_id()),
        fetch_deadline: Duration::from_secs(3),
        ..GenerateOptions::default()
    };
    let err = requester
        .node
        .requester()
        .generate(small_job("a kept picture"), options, &mut |_| {})
        .await
        .unwrap_err();
    let GenerateError::Undelivered {
        cost, reason, job, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert!(reason.contains("no images within 3 s"), "{reason}");
    assert!(matches!(
        evil.next_answer().await.unwrap(),
        Response::EventAck(Some(_))
    ));

    // The record: the provider's signature on what it charged, our signed ack, and the job
    // marked undelivered in our books, which still verify.
    let books = requester.node.ledger();
    let stored = books.receipt(Role::Requester, *job).unwrap().unwrap();
    assert_eq!(stored.receipt.signer(), evil.key);
    let body = stored.receipt.verify().unwrap();
    assert_eq!(body.cost, *cost);
    assert_eq!(
        stored.ack.as_ref().unwrap().verify().unwrap().receipt_hash,
        stored.receipt.digest()
    );
    assert!(stored.undelivered.is_some(), "{stored:?}");
    assert!(
        matches!(
            books.job(Role::Requester, *job).unwrap(),
            Some(JobOutcome::Undelivered { peer, index: 0, .. }) if peer == evil.key
        ),
        "{:?}",
        books.job(Role::Requester, *job)
    );
    assert_eq!(requester.node.requester().undelivered_by(&evil.key), 1);
    books.verify().unwrap();

    // With an honest provider on the market too, the next job goes there.
    let honest = TestNode::start(92, vec![evil.addr.clone()], Some(tiny_generator())).await;
    honest.deposit_from(92, requester.key, 100);
    let honest_id = honest.key.to_peer_id();
    wait_until(Duration::from_secs(30), "both providers' adverts", || {
        let table = requester.node.requester().providers();
        table.iter().any(|p| p.key == honest.key) && table.iter().any(|p| p.key == evil.key)
    })
    .await;
    let outcome = requester
        .node
        .requester()
        .generate(
            small_job("a delivered picture"),
            GenerateOptions::default(),
            &mut |_| {},
        )
        .await
        .unwrap();
    assert_eq!(outcome.provider, honest_id);

    requester.node.shutdown().await;
    honest.node.shutdown().await;
    evil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_fetched_after_the_deadline_is_delivered_late_and_still_paid_once() {
    let evil = EvilProvider::start(93, Cheat::KeepImages, tiny_generator()).await;
    let requester = TestNode::start(94, vec![evil.addr.clone()], None).await;
    let buyer = requester.node.requester();
    let options = GenerateOptions {
        provider: Some(evil.peer_id()),
        fetch_deadline: Duration::from_secs(2),
        ..GenerateOptions::default()
    };
    let err = buyer
        .generate(small_job("a late picture"), options, &mut |_| {})
        .await
        .unwrap_err();
    let GenerateError::Undelivered { job, cost, .. } = err else {
        panic!("{err}")
    };
    let books = requester.node.ledger();
    let charged = || {
        books
            .account(Role::Requester, &evil.key)
            .unwrap()
            .unwrap()
            .charged
    };
    assert_eq!(charged(), cost, "paid at the ack");
    assert_eq!(buyer.undelivered_by(&evil.key), 1);

    // Still held back: the re-fetch fails, nothing moves, the mark stays.
    let still = buyer
        .refetch(job, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(still, RefetchError::Undelivered { job: j, marked: true, .. } if j == job),
        "{still}"
    );
    assert!(
        still.to_string().contains("stays marked undelivered"),
        "{still}"
    );
    assert!(matches!(
        books.job(Role::Requester, job).unwrap(),
        Some(JobOutcome::Undelivered { .. })
    ));
    assert_eq!(charged(), cost);

    // The provider hands them over (a slow or cut-off provider, seen from here): delivered
    // late, the images are the receipt's, and the job counts as delivered, charged once.
    evil.hand_over_images();
    let late = buyer.refetch(job, Duration::from_secs(30)).await.unwrap();
    assert!(late.delivered_late);
    let body = late.outcome.receipt.verify().unwrap();
    assert_eq!(body.job_id, job);
    check_images(&body, &late.outcome.images).unwrap();
    assert_eq!(late.outcome.cost, cost);
    assert!(matches!(
        books.job(Role::Requester, job).unwrap(),
        Some(JobOutcome::Settled { peer, .. }) if peer == evil.key
    ));
    assert_eq!(
        books
            .receipt(Role::Requester, job)
            .unwrap()
            .unwrap()
            .undelivered,
        None
    );
    assert_eq!(charged(), cost);
    assert_eq!(buyer.undelivered_by(&evil.key), 0);

    // Asked again: the same images, no second charge, no second late delivery.
    let again = buyer.refetch(job, Duration::from_secs(30)).await.unwrap();
    assert!(!again.delivered_late);
    assert_eq!(again.outcome.images, late.outcome.images);
    assert_eq!(charged(), cost);

    // A job this node never bought: a typed refusal naming it.
    let unknown = JobId([7; 16]);
    let err = buyer
        .refetch(unknown, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RefetchError::Unknown(j) if j == unknown),
        "{err}"
    );
    let report = books.verify().unwrap();
    assert_eq!(report.undelivered_receipts, 0);

    requester.node.shutdown().await;
    evil.shutdown().await;
}
