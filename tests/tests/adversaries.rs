//! Misbehaving peers against real nodes, over loopback TCP with the tiny engine.
//!
//! Against a provider (a raw requester client sends what an honest node never would): a request
//! signed by one key and sent by another, a request with a changed byte, the same request twice,
//! an expired request, one for another provider and one whose max_cost is under the metered
//! cost are each refused with their typed reason, logged with the sender's peer id,
//! and none leaves a hold or a charge; a replayed job is charged once.
//!
//! Against a requester (an evil provider meters honestly and then cheats on the receipt): an
//! overcharge, a receipt changed after signing, and a wrong image hash are each refused and
//! logged, the requester's books do not change, and with an honest provider also on the market
//! the requester fails over and pays the honest one exactly once.
//!
//! Against the RPC framing (a peer writing raw bytes on real `/pixmarket/rpc/3` streams): an
//! absurd length prefix, one just past the limit, a cancel claiming far more than a cancel's
//! own limit, garbage of the stated length and a truncated
//! body are each dropped without an answer, while a well-formed frame on the same connection is
//! answered, and the provider keeps serving. A request too large to frame is refused by the
//! sender's own codec before anything is written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::network::codec::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
use pixmarket_node::network::{NetError, Request, Response};
use pixmarket_node::now_ms;
use pixmarket_node::requester::{
    FailureKind, GenerateError, GenerateOptions, JobProgress, check_images, check_receipt,
};
use pixmarket_protocol::messages::{FailReason, JobEventKind};
use pixmarket_protocol::{
    Hash, JobEvent, JobId, JobRequest, JobStatus, MicroTokens, PriceSchedule, Receipt, ReceiptAck,
    SecretKey, Signed, codec,
};
use pixmarket_tests::evil::{
    Cheat, EvilProvider, RawPeer, Warnings, honest_meter, send_verbatim_frames, wait_until,
};
use pixmarket_tests::{TestNode, small_job, tiny_generator};

/// Nothing about `job` in the provider's books: never held, so never charged.
fn untouched(ledger: &Ledger, job: JobId) {
    assert_eq!(ledger.job(Role::Provider, job).unwrap(), None);
    assert!(ledger.holds().unwrap().is_empty());
    assert!(ledger.receipts(None).unwrap().is_empty());
}

fn refusal(r: Response) -> FailReason {
    match r {
        Response::Refused(reason) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_request_is_refused_and_holds_nothing() {
    let warnings = Warnings::capture();
    let provider = TestNode::start(41, vec![], Some(tiny_generator())).await;
    let sender = RawPeer::start(42, vec![provider.addr.clone()]).await;
    let victim = SecretKey::from_seed(&[43; 32]);
    // Both have credit, so a refusal can only be about the signature.
    provider.deposit_from(41, sender.public(), 100);
    provider.deposit_from(41, victim.public(), 100);
    let (_, cost) = honest_meter(
        tiny_generator().as_ref(),
        &small_job("a forged fox"),
        &PriceSchedule::default(),
    );
    let head = provider.node.ledger().head().unwrap();

    // Signed by the victim's key, sent over the sender's connection: a relayed request whose
    // events (and bill) would go to someone else.
    let req = RawPeer::job_request(provider.key, small_job("a forged fox"), cost);
    let relayed = Signed::sign(&victim, &req).unwrap();
    let r = sender
        .request(provider.key.to_peer_id(), Request::Job(relayed))
        .await
        .unwrap();
    assert_eq!(refusal(r), FailReason::BadSignature);
    untouched(provider.node.ledger(), req.job_id);
    let sender_id = sender.peer_id().to_string();
    warnings
        .expect(&["refused job: relayed request", &sender_id])
        .await;

    // The sender's own signature, over a body with one byte changed after signing.
    let req = RawPeer::job_request(provider.key, small_job("a forged fox"), cost);
    let honest = Signed::sign(&sender.secret(), &req).unwrap();
    let mut body = honest.body().to_vec();
    let i = body.len() / 2;
    body[i] ^= 0x20;
    let flipped = Signed::<JobRequest>::from_parts(honest.signer(), body, honest.signature());
    let r = sender
        .request(provider.key.to_peer_id(), Request::Job(flipped))
        .await
        .unwrap();
    assert_eq!(refusal(r), FailReason::BadSignature);
    untouched(provider.node.ledger(), req.job_id);
    warnings
        .expect(&["refused job: bad signature", &sender_id])
        .await;

    // Nothing at all was written for either.
    assert_eq!(provider.node.ledger().head().unwrap(), head);

    sender.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_is_refused_and_charged_once() {
    let warnings = Warnings::capture();
    let provider = TestNode::start(44, vec![], Some(tiny_generator())).await;
    let mut requester = RawPeer::start(45, vec![provider.addr.clone()]).await;
    provider.deposit_from(44, requester.public(), 100);
    let params = small_job("a replayed heron");
    let quote = requester.quote(provider.key, &params).await;
    let req = RawPeer::job_request(provider.key, params, quote.cost);
    let signed = Signed::sign(&requester.secret(), &req).unwrap();
    let to = provider.key.to_peer_id();

    let first = requester
        .request(to, Request::Job(signed.clone()))
        .await
        .unwrap();
    assert!(matches!(first, Response::Accepted { .. }), "{first:?}");
    // The same bytes again while the first is queued or running: the job's status, never a
    // second job (a requester whose first answer was lost re-sends exactly this).
    let again = requester
        .request(to, Request::Job(signed.clone()))
        .await
        .unwrap();
    assert!(
        matches!(
            again,
            Response::Status(
                JobStatus::Queued { .. } | JobStatus::Running { .. } | JobStatus::Completed { .. }
            )
        ),
        "{again:?}"
    );
    let _ = &warnings;

    // The first completes; the raw requester checks the receipt as a node would and acks it.
    let (event, channel) = requester.next_event("the completed job").await;
    assert_eq!(event.job_id, req.job_id);
    let JobEventKind::Completed { receipt } = event.kind else {
        panic!("expected Completed, got {:?}", event.kind)
    };
    let body = check_receipt(&receipt, &signed, &quote, &provider.key).unwrap();
    let ack = ReceiptAck {
        job_id: req.job_id,
        receipt_hash: receipt.digest(),
        acked_at_ms: now_ms(),
    };
    let ack = Signed::sign(&requester.secret(), &ack).unwrap();
    requester
        .client
        .respond(channel, Response::EventAck(Some(ack.clone())))
        .await
        .unwrap();
    // The images come against the ack, and match the receipt's hashes.
    let Response::Images { images, .. } = requester
        .request(to, Request::Fetch(ack.clone()))
        .await
        .unwrap()
    else {
        panic!("no images for the acknowledged job")
    };
    check_images(&body, &images).unwrap();

    // And once more after it was paid for: the job's status again, never a second job.
    let late = requester
        .request(to, Request::Job(signed.clone()))
        .await
        .unwrap();
    assert!(
        matches!(late, Response::Status(JobStatus::Acknowledged { .. })),
        "{late:?}"
    );

    let books = provider.node.ledger();
    wait_until(
        Duration::from_secs(10),
        "the ack in the provider's books",
        || {
            books
                .receipt(Role::Provider, req.job_id)
                .unwrap()
                .is_some_and(|r| r.ack.is_some())
        },
    )
    .await;
    let receipts = books.receipts(None).unwrap();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].ack.as_ref(), Some(&ack));
    let acct = books
        .account(Role::Provider, &requester.public())
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.charged, acct.held, acct.entries),
        (body.cost, MicroTokens::ZERO, 1)
    );
    assert_eq!(body.cost, quote.cost);
    assert!(books.holds().unwrap().is_empty());

    requester.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_misaddressed_and_underfunded_requests_get_typed_refusals() {
    let warnings = Warnings::capture();
    let provider = TestNode::start(46, vec![], Some(tiny_generator())).await;
    let sender = RawPeer::start(47, vec![provider.addr.clone()]).await;
    provider.deposit_from(46, sender.public(), 100);
    let params = small_job("a late owl");
    let (_, cost) = honest_meter(
        tiny_generator().as_ref(),
        &params,
        &PriceSchedule::default(),
    );
    let to = provider.key.to_peer_id();

    let mut expired = RawPeer::job_request(provider.key, params.clone(), cost);
    expired.created_at_ms -= 120_000;
    expired.expires_at_ms = now_ms() - 60_000;
    let r = sender
        .request(
            to,
            Request::Job(Signed::sign(&sender.secret(), &expired).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(refusal(r), FailReason::Expired);
    untouched(provider.node.ledger(), expired.job_id);
    let sender_id = sender.peer_id().to_string();
    warnings
        .expect(&["refused job: invalid", &sender_id, "expires_at"])
        .await;

    let elsewhere = SecretKey::from_seed(&[48; 32]).public();
    let misaddressed = RawPeer::job_request(elsewhere, params, cost);
    let r = sender
        .request(
            to,
            Request::Job(Signed::sign(&sender.secret(), &misaddressed).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(refusal(r), FailReason::WrongProvider);
    untouched(provider.node.ledger(), misaddressed.job_id);
    warnings
        .expect(&["refused job: addressed to another provider", &sender_id])
        .await;

    // A max_cost one micro-token under the metered cost: refused with both numbers.
    let short = MicroTokens(cost.0 - 1);
    let underfunded = RawPeer::job_request(provider.key, small_job("a late owl"), short);
    let r = sender
        .request(
            to,
            Request::Job(Signed::sign(&sender.secret(), &underfunded).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(
        refusal(r),
        FailReason::OverBudget {
            cost,
            max_cost: short
        }
    );
    untouched(provider.node.ledger(), underfunded.job_id);
    warnings
        .expect(&["refused job: over its max_cost", &sender_id])
        .await;

    sender.shutdown().await;
    provider.node.shutdown().await;
}

/// A requester pinned to an evil provider refuses its receipt, tells it so, and records nothing.
async fn pinned_requester_refuses(seed: u8, cheat: Cheat, expected: &str) {
    let warnings = Warnings::capture();
    let mut evil = EvilProvider::start(seed, cheat, tiny_generator()).await;
    let requester = TestNode::start(seed + 1, vec![evil.addr.clone()], None).await;
    let head = requester.node.ledger().head().unwrap();

    let options = GenerateOptions {
        provider: Some(evil.peer_id()),
        ..GenerateOptions::default()
    };
    let err = requester
        .node
        .requester()
        .generate(small_job("a crooked bill"), options, &mut |_| {})
        .await
        .unwrap_err();
    let GenerateError::AllFailed(reasons) = &err else {
        panic!("{err}")
    };
    assert_eq!(reasons.len(), 1, "{err}");
    assert_eq!(reasons[0].failure.kind, FailureKind::BadReceipt, "{err}");
    assert!(
        reasons[0].failure.message.contains("bad receipt"),
        "{cheat:?}: {err}"
    );
    assert!(
        reasons[0].failure.message.contains(expected),
        "{cheat:?}: {err}"
    );
    let evil_id = evil.peer_id().to_string();
    warnings
        .expect(&["refusing receipt", &evil_id, expected])
        .await;

    // The evil provider heard a signed, final refusal of its receipt, not an ack.
    match evil.next_answer().await.unwrap() {
        Response::ReceiptRefused(r) => {
            assert_eq!(r.signer(), requester.key);
            let body = r.verify().unwrap();
            assert!(body.reason.contains(expected), "{cheat:?}: {}", body.reason);
        }
        other => panic!("{cheat:?}: the requester answered {other:?}"),
    }
    // The requester's books did not move.
    let books = requester.node.ledger();
    assert_eq!(books.head().unwrap(), head, "{cheat:?}");
    assert!(books.receipts(None).unwrap().is_empty());
    assert_eq!(books.account(Role::Requester, &evil.key).unwrap(), None);

    requester.node.shutdown().await;
    evil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overcharging_receipt_is_refused() {
    pinned_requester_refuses(50, Cheat::Overcharge, "the metering function gives").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_changed_after_signing_is_refused() {
    pinned_requester_refuses(
        52,
        Cheat::TamperAfterSigning,
        "receipt signature does not verify",
    )
    .await;
}

/// A provider that takes the ack and then delivers images other than those its receipt signed:
/// the requester is out one job's cost, and holds a signed record against the provider (its
/// receipt naming other hashes, our ack, marked undelivered) that ranks it last from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_that_do_not_match_the_signed_hashes_leave_a_record_against_the_provider() {
    let mut evil = EvilProvider::start(54, Cheat::WrongImageHash, tiny_generator()).await;
    let requester = TestNode::start(55, vec![evil.addr.clone()], None).await;
    let options = GenerateOptions {
        provider: Some(evil.peer_id()),
        ..GenerateOptions::default()
    };
    let err = requester
        .node
        .requester()
        .generate(small_job("a switched picture"), options, &mut |_| {})
        .await
        .unwrap_err();
    let GenerateError::Undelivered { cost, reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        reason.contains("image 0 does not match its hash"),
        "{reason}"
    );
    // The evil provider got the ack (its gain is one job's cost, no more).
    assert!(matches!(
        evil.next_answer().await.unwrap(),
        Response::EventAck(Some(_))
    ));
    let books = requester.node.ledger();
    let receipts = books.receipts(None).unwrap();
    assert_eq!(receipts.len(), 1);
    assert!(receipts[0].ack.is_some());
    assert!(receipts[0].undelivered.is_some(), "{:?}", receipts[0]);
    assert_eq!(
        books
            .account(Role::Requester, &evil.key)
            .unwrap()
            .unwrap()
            .charged,
        *cost
    );
    assert_eq!(requester.node.requester().undelivered_by(&evil.key), 1);
    books.verify().unwrap();

    requester.node.shutdown().await;
    evil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_overcharge_the_requester_fails_over_and_pays_the_honest_provider_once() {
    let warnings = Warnings::capture();
    let mut evil = EvilProvider::start(56, Cheat::Overcharge, tiny_generator()).await;
    let honest = TestNode::start(57, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(58, vec![evil.addr.clone(), honest.addr.clone()], None).await;
    honest.deposit_from(57, requester.key, 100);

    // The evil provider advertises itself as the fastest: the requester must try it first.
    let client = requester.node.requester().clone();
    wait_until(Duration::from_secs(15), "both providers' adverts", || {
        let list = client.providers();
        list.len() == 2 && list[0].key == evil.key
    })
    .await;

    let params = small_job("an honest price");
    let mut seen = Vec::new();
    let outcome = client
        .generate(params.clone(), GenerateOptions::default(), &mut |p| {
            seen.push(p)
        })
        .await
        .unwrap();
    assert_eq!(outcome.provider, honest.key.to_peer_id());
    assert_eq!(outcome.attempts, 2);
    assert!(
        seen.iter().any(|p| matches!(
            p,
            JobProgress::FailingOver { provider, reason }
                if *provider == evil.peer_id() && reason.contains("bad receipt")
        )),
        "{seen:?}"
    );
    assert!(matches!(
        evil.next_answer().await.unwrap(),
        Response::ReceiptRefused(_)
    ));
    let evil_id = evil.peer_id().to_string();
    warnings.expect(&["refusing receipt", &evil_id]).await;
    warnings
        .expect(&["provider failed; failing over", &evil_id])
        .await;

    // Paid once, to the honest provider, exactly the metered cost.
    let (_, cost) = honest_meter(
        tiny_generator().as_ref(),
        &params,
        &PriceSchedule::default(),
    );
    assert_eq!(outcome.cost, cost);
    let books = requester.node.ledger();
    let receipts = books.receipts(None).unwrap();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].receipt.signer(), honest.key);
    assert_eq!(books.account(Role::Requester, &evil.key).unwrap(), None);
    let mirror = books
        .account(Role::Requester, &honest.key)
        .unwrap()
        .unwrap();
    assert_eq!((mirror.charged, mirror.entries), (cost, 1));
    let acct = honest
        .node
        .ledger()
        .account(Role::Provider, &requester.key)
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.charged, acct.held, acct.entries),
        (cost, MicroTokens::ZERO, 1)
    );

    requester.node.shutdown().await;
    honest.node.shutdown().await;
    evil.shutdown().await;
}

/// A length prefix and a body, as the RPC codec frames them.
fn frame(len: usize, body: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(len)
        .unwrap_or(u32::MAX)
        .to_be_bytes()
        .to_vec();
    f.extend_from_slice(body);
    f
}

/// The response a verbatim stream got back, if it is one.
fn as_response(answer: &Result<Vec<u8>, String>) -> Option<Response> {
    let bytes = answer.as_ref().ok()?;
    let len = usize::try_from(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?)).ok()?;
    let body = bytes.get(4..)?;
    (body.len() == len).then_some(())?;
    codec::decode("rpc response", body, MAX_RESPONSE_BYTES).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rpc_frames_are_dropped_and_the_provider_keeps_serving() {
    let provider = TestNode::start(60, vec![], Some(tiny_generator())).await;
    let cancel = codec::encode(
        "rpc request",
        &Request::Cancel(JobId([6; 16])),
        MAX_REQUEST_BYTES,
    )
    .unwrap();
    let frames = vec![
        frame(u32::MAX as usize, &[0; 64]),
        frame(MAX_REQUEST_BYTES + 1, &cancel),
        frame(16, &[0xff; 16]),
        frame(cancel.len() + 100, &cancel),
        // A cancel that claims a megabyte, far over a cancel's own limit (and under a job's).
        frame(1 << 20, &cancel),
        // The control: the same peer, the same protocol, a well-formed frame.
        frame(cancel.len(), &cancel),
    ];
    let answers = send_verbatim_frames(&provider.addr, 61, frames).await;
    for (i, answer) in answers[..5].iter().enumerate() {
        assert_eq!(
            as_response(answer),
            None,
            "bad frame {i} was answered: {answer:?}"
        );
    }
    assert_eq!(
        as_response(&answers[5]),
        Some(Response::Ok),
        "{:?}",
        answers[5]
    );

    // A request whose encoding is over the limit never leaves the sender.
    let sender = RawPeer::start(62, vec![provider.addr.clone()]).await;
    let secret = sender.secret();
    let receipt = Receipt {
        job_id: JobId([7; 16]),
        request_hash: Hash::ZERO,
        provider: provider.key,
        requester: secret.public(),
        units: small_job("x").metered_units(1),
        schedule: PriceSchedule::default(),
        cost: MicroTokens(1),
        image_hashes: vec![Hash::ZERO],
        queued_ms: 0,
        run_ms: 0,
        cumulative_charged: MicroTokens(1),
        prev_entry_hash: None,
        issued_at_ms: now_ms(),
        step_caching: pixmarket_protocol::StepCaching::Exact,
    };
    let _ = Signed::sign(&secret, &receipt).unwrap();
    let void = Signed::sign(
        &secret,
        &pixmarket_protocol::JobVoid {
            job_id: JobId([7; 16]),
            reason: String::new(),
            voided_at_ms: now_ms(),
        },
    )
    .unwrap();
    let huge = Request::Event(JobEvent {
        job_id: JobId([7; 16]),
        kind: JobEventKind::Failed {
            reason: FailReason::Engine("x".repeat(MAX_REQUEST_BYTES)),
            void,
        },
    });
    let err = sender
        .request(provider.key.to_peer_id(), huge)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NetError::Request { reason, .. } if reason.contains("the limit is")),
        "{err}"
    );

    // The provider still quotes, at the metered price.
    let params = small_job("still serving");
    let quote = sender.quote(provider.key, &params).await;
    let (_, cost) = honest_meter(
        tiny_generator().as_ref(),
        &params,
        &PriceSchedule::default(),
    );
    assert_eq!(quote.cost, cost);
    assert!(provider.node.ledger().holds().unwrap().is_empty());

    sender.shutdown().await;
    provider.node.shutdown().await;
}

/// The requester counts the prompt's tokens itself: a provider whose quote meters more prompt
/// tokens than the requester's own tokenizer counts is refused before anything is held. Here
/// the requester's counter says the prompt is 1 token, so the honest tiny provider's (longer)
/// count stands in for an inflated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_that_inflates_the_prompt_tokens_is_refused() {
    let provider = TestNode::start(90, vec![], Some(tiny_generator())).await;
    let requester = TestNode::start(91, vec![provider.addr.clone()], None).await;
    provider.deposit_from(90, requester.key, 100);
    let client = requester.node.requester().clone();
    wait_until(Duration::from_secs(15), "the provider's advert", || {
        !client.providers().is_empty()
    })
    .await;
    let model = client.providers()[0].advert.model_id.clone();
    client.count_tokens_with(model, Arc::new(|_: &str| Some(1)));
    let options = GenerateOptions {
        provider: Some(provider.key.to_peer_id()),
        ..GenerateOptions::default()
    };
    let err = client
        .generate(
            small_job("a prompt of several tokens"),
            options,
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("our own tokenizer counts 1"),
        "{err}"
    );
    // Refused at the quote: nothing was held or charged.
    untouched_books(provider.node.ledger());
    requester.node.shutdown().await;
    provider.node.shutdown().await;
}

fn untouched_books(ledger: &Ledger) {
    assert!(ledger.holds().unwrap().is_empty());
    assert!(ledger.receipts(None).unwrap().is_empty());
}
