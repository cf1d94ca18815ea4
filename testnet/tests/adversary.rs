//! The testnet's adversaries inside small real markets: honest nodes started with
//! `Node::start` on loopback TCP, real sled ledgers in temporary folders, the tiny model.
//!
//! - An overcharger and a silent provider are chosen first (they advertise the fastest speed);
//!   the honest requester refuses the overcharge or times out on the silence, fails over, and
//!   gets its images from the honest provider, paying it once. Neither adversary gains anything.
//! - A replayer buys jobs legitimately and replays them; every replay is refused and the honest
//!   provider charges it exactly once per legitimate job.
//! - A forger's relayed, corrupted and misaddressed requests are all refused with typed reasons
//!   and leave nothing in the provider's books.
//!
//! Every adversary's record shows attempts > 0, refused == attempts and gained == 0, and every
//! honest ledger verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libp2p::Multiaddr;
use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::engine_generator::EngineGenerator;
use pixmarket_node::generator::Generator;
use pixmarket_node::network::NetConfig;
use pixmarket_node::network::inbound_budget::CONNECTION_LARGE_FRAMES;
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::{GenerateOptions, JobProgress};
use pixmarket_node::{Node, NodeOptions, now_ms};
use pixmarket_protocol::{
    ChainEntry, DepositNote, JobId, MicroTokens, PriceSchedule, PublicKey, SecretKey, Signed,
};
use pixmarket_testnet::adversary::{Adversary, AdversaryKind, honest_meter, small_job};
use pixmarket_testnet::hostile::{
    FLOOD_EVENTS, FLOOD_JOBS, FLOOD_QUOTES, HOG_CONNECTIONS, HOG_STREAMS,
};
use pixmarket_testnet::record::AdversaryRecord;

/// How long a test waits for gossip or for an adversary's tally to catch up.
const WAIT: Duration = Duration::from_secs(20);

/// The tiny model, written once per test process and loaded once.
fn tiny() -> Arc<dyn Generator> {
    static DIR: OnceLock<(tempfile::TempDir, Arc<EngineGenerator>)> = OnceLock::new();
    let (_, g) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        pixmarket_engine::tiny::ensure_tiny_model(&model).unwrap();
        let g = EngineGenerator::load(&model, "f32", "cpu").unwrap();
        (dir, Arc::new(g))
    });
    g.clone()
}

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

/// An honest node with its own ledger folder.
struct Honest {
    node: Node,
    seed: u8,
    key: PublicKey,
    addr: Multiaddr,
    _dir: tempfile::TempDir,
}

impl Honest {
    /// A provider when `provide`, else a requester.
    async fn start(seed: u8, bootstrap: Vec<Multiaddr>, provide: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let public = key(seed).public();
        let ledger = Arc::new(Ledger::open(&dir.path().join("ledger"), public).unwrap());
        let settings = ProviderSettings {
            advert_interval: pixmarket_node::provider::ADVERT_INTERVAL,
            // Short, so a freerider's unacknowledged receipts are credited within a test.
            ack_deadline: Duration::from_secs(2),
            schedule: PriceSchedule::default(),
            max_queue: 8,
            max_batch: 2,
            ms_per_standard_image: 60_000,
        };
        let node = Node::start(NodeOptions {
            key: key(seed),
            ledger,
            net: NetConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                bootstrap,
                ..NetConfig::default()
            },
            provide: provide.then(|| (vec![tiny()], settings)),
            metrics: None,
        })
        .await
        .unwrap();
        let addr = loop {
            if let Some(a) = node.addresses().await.unwrap().into_iter().next() {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self {
            node,
            seed,
            key: public,
            addr,
            _dir: dir,
        }
    }

    /// Records on this provider that `peer` prepaid `tokens`.
    fn deposit_from(&self, peer: PublicKey, tokens: u64) {
        let note = DepositNote {
            deposit_id: JobId::random().0,
            account: peer,
            amount: MicroTokens::from_tokens(tokens).unwrap(),
            memo: "adversary test deposit".into(),
            recorded_at_ms: now_ms(),
        };
        let signed = Signed::sign(&key(self.seed), &note).unwrap();
        self.node.ledger().deposit(&signed).unwrap();
    }
}

/// Polls until `check` holds, or fails naming `what`.
async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The market held against it: it tried, every try was refused, and it got nothing.
fn held(r: &AdversaryRecord, kind: AdversaryKind, attempts: u32) {
    assert_eq!(r.kind, kind.name(), "{r:?}");
    assert_eq!(r.attempts, attempts, "{r:?}");
    assert_eq!(r.refused, r.attempts, "{r:?}");
    assert_eq!(r.gained_micros, 0, "{r:?}");
}

/// A requester facing `kind` (a provider-side adversary that ranks first) and an honest
/// provider still gets its images from the honest one, after trying the adversary.
async fn requester_routes_around(kind: AdversaryKind, base: u8, options: GenerateOptions) {
    let honest = Honest::start(base, vec![], true).await;
    let adversary = Adversary::start(kind, format!("{kind}-1"), key(base + 1), vec![], tiny())
        .await
        .unwrap();
    let requester = Honest::start(
        base + 2,
        vec![adversary.addr().clone(), honest.addr.clone()],
        false,
    )
    .await;
    honest.deposit_from(requester.key, 100);

    let client = requester.node.requester().clone();
    wait_until("both providers' adverts, the adversary first", || {
        let list = client.providers();
        list.len() == 2 && list[0].key == adversary.public()
    })
    .await;

    let params = small_job("a fair deal");
    let mut seen = Vec::new();
    let outcome = client
        .generate(params.clone(), options, &mut |p| seen.push(p))
        .await
        .unwrap();
    assert_eq!(outcome.provider, honest.key.to_peer_id());
    assert_eq!(outcome.attempts, 2);
    assert_eq!(outcome.images.len(), 1);
    assert!(
        seen.iter().any(|p| matches!(
            p,
            JobProgress::FailingOver { provider, .. } if *provider == adversary.peer_id()
        )),
        "{seen:?}"
    );

    // The adversary hears the refusal (or the cancel) just after the requester moved on.
    wait_until("the adversary's refused attempt", || {
        let r = adversary.record();
        r.attempts == 1 && r.refused == 1
    })
    .await;
    held(&adversary.record(), kind, 1);

    // Paid once, to the honest provider, exactly the metered cost; nothing to the adversary.
    let (_, cost) = honest_meter(tiny().as_ref(), &params, &PriceSchedule::default()).unwrap();
    assert_eq!(outcome.cost, cost);
    let books = requester.node.ledger();
    assert_eq!(
        books.account(Role::Requester, &adversary.public()).unwrap(),
        None
    );
    assert_eq!(books.receipts(None).unwrap().len(), 1);
    let acct = honest
        .node
        .ledger()
        .account(Role::Provider, &requester.key)
        .unwrap()
        .unwrap();
    assert_eq!((acct.charged, acct.entries), (cost, 1));
    honest.node.ledger().verify().unwrap();
    books.verify().unwrap();

    // A provider-side adversary has no attack of its own to launch.
    assert!(adversary.attack(honest.key, 1).await.is_err());

    requester.node.shutdown().await;
    honest.node.shutdown().await;
    adversary.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overcharger_is_refused_and_the_requester_fails_over() {
    requester_routes_around(AdversaryKind::Overcharger, 10, GenerateOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_provider_is_timed_out_and_the_requester_fails_over() {
    // Silence is asked about after 3 s; the silent provider never answers, so the requester
    // fails over once its request (valid for 8 s) has expired and can no longer be settled.
    let options = GenerateOptions {
        idle_timeout: Duration::from_secs(3),
        request_validity: Duration::from_secs(8),
        ..GenerateOptions::default()
    };
    requester_routes_around(AdversaryKind::Silent, 20, options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayer_is_refused_and_charged_once_per_job() {
    let provider = Honest::start(30, vec![], true).await;
    let replayer = Adversary::start(
        AdversaryKind::Replayer,
        "replayer-1".into(),
        key(31),
        vec![provider.addr.clone()],
        tiny(),
    )
    .await
    .unwrap();
    provider.deposit_from(replayer.public(), 100);

    let rounds = 2;
    replayer.attack(provider.key, rounds).await.unwrap();
    let record = replayer.record();
    // Per round: a replay while running, a re-signed replay, a replay after payment.
    held(&record, AdversaryKind::Replayer, 3 * rounds);
    assert!(record.detail.contains("duplicate job id"), "{record:?}");
    assert!(
        record.detail.contains("answered with the job's status"),
        "{record:?}"
    );

    // Charged exactly once per legitimate job, every receipt acknowledged, no hold left.
    let (_, cost) = honest_meter(
        tiny().as_ref(),
        &small_job("an adversary's job"),
        &PriceSchedule::default(),
    )
    .unwrap();
    let books = provider.node.ledger();
    let acct = books
        .account(Role::Provider, &replayer.public())
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.charged, acct.held, acct.entries),
        (
            MicroTokens(cost.0 * u64::from(rounds)),
            MicroTokens::ZERO,
            2
        )
    );
    let receipts = books.receipts(None).unwrap();
    assert_eq!(receipts.len(), 2);
    assert!(receipts.iter().all(|r| r.ack.is_some()));
    assert!(books.holds().unwrap().is_empty());
    books.verify().unwrap();

    replayer.shutdown().await;
    provider.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgers_requests_are_refused_with_typed_reasons_and_leave_no_trace() {
    let provider = Honest::start(40, vec![], true).await;
    let forger = Adversary::start(
        AdversaryKind::Forger,
        "forger-1".into(),
        key(41),
        vec![provider.addr.clone()],
        tiny(),
    )
    .await
    .unwrap();
    // It has credit, so a refusal can only be about who signed the request and for whom.
    provider.deposit_from(forger.public(), 100);
    let head = provider.node.ledger().head().unwrap();

    forger.attack(provider.key, 2).await.unwrap();
    let record = forger.record();
    held(&record, AdversaryKind::Forger, 6);
    for reason in [
        "requests signed by another key refused (request signature does not verify): 2",
        "requests with a corrupted signature refused (request signature does not verify): 2",
        "requests for another provider refused (request is addressed to another provider): 2",
    ] {
        assert!(record.detail.contains(reason), "{reason} in {record:?}");
    }

    // Nothing was written: no hold, no charge, no receipt.
    let books = provider.node.ledger();
    assert_eq!(books.head().unwrap(), head);
    assert!(books.holds().unwrap().is_empty());
    assert!(books.receipts(None).unwrap().is_empty());
    books.verify().unwrap();

    forger.shutdown().await;
    provider.node.shutdown().await;
}

#[test]
fn kinds_parse_from_their_names_and_unknown_names_list_the_choices() {
    for kind in AdversaryKind::ALL {
        assert_eq!(kind.name().parse::<AdversaryKind>().unwrap(), kind);
    }
    assert_eq!(
        " Silent ".parse::<AdversaryKind>().unwrap(),
        AdversaryKind::Silent
    );
    let err = "liar".parse::<AdversaryKind>().unwrap_err().to_string();
    assert!(
        err.contains("liar") && err.contains("overcharger, replayer, forger, silent"),
        "{err}"
    );
}

/// A requester that takes whatever it can and acknowledges nothing: every receipt is offered
/// without images, every fetch without a valid ack of its own is refused, and the provider
/// credits each receipt back when it stops. It ends with no image bytes and no charge, and the
/// provider's chain with it is linear: each receipt followed by its credit note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freerider_gets_no_images_and_is_charged_nothing() {
    let provider = Honest::start(50, vec![], true).await;
    let freerider = Adversary::start(
        AdversaryKind::Freerider,
        "freerider-1".into(),
        key(51),
        vec![provider.addr.clone()],
        tiny(),
    )
    .await
    .unwrap();
    provider.deposit_from(freerider.public(), 100);

    let rounds = 2;
    freerider.attack(provider.key, rounds).await.unwrap();
    let record = freerider.record();
    // Per round: a fetch with an ack for another receipt, one with another key's ack, a status.
    held(&record, AdversaryKind::Freerider, 3 * rounds);
    assert_eq!(record.images_received, 0, "{record:?}");

    // The provider stops selling (the network still up): what was never acknowledged is
    // credited back with a signed note that extends the chain.
    provider
        .node
        .stop_providing(tokio::time::Instant::now() + Duration::from_secs(3))
        .await;
    let books = provider.node.ledger();
    let acct = books
        .account(Role::Provider, &freerider.public())
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.charged, acct.held, acct.entries),
        (MicroTokens::ZERO, MicroTokens::ZERO, 2 * u64::from(rounds))
    );
    let receipts = books.receipts(None).unwrap();
    assert_eq!(receipts.len(), 2);
    assert!(
        receipts
            .iter()
            .all(|r| r.ack.is_none() && r.refunded.is_some())
    );
    let chain = books
        .chain(Role::Provider, &freerider.public(), None)
        .unwrap();
    assert!(matches!(
        chain.as_slice(),
        [
            ChainEntry::Receipt(_),
            ChainEntry::Credit(_),
            ChainEntry::Receipt(_),
            ChainEntry::Credit(_)
        ]
    ));
    let report = books.verify().unwrap();
    assert_eq!(report.credit_notes, 2);
    assert!(books.holds().unwrap().is_empty());

    freerider.shutdown().await;
    provider.node.shutdown().await;
}

/// An honest requester buys `n` small jobs from `provider`, one after another, and each
/// completes there at the first try.
async fn honest_jobs(requester: &Honest, provider: &Honest, n: usize) -> Vec<MicroTokens> {
    let mut costs = Vec::with_capacity(n);
    for i in 0..n {
        let outcome = requester
            .node
            .requester()
            .generate(
                small_job(&format!("honest job {i} under attack")),
                GenerateOptions {
                    provider: Some(provider.key.to_peer_id()),
                    ..GenerateOptions::default()
                },
                &mut |_| {},
            )
            .await
            .unwrap();
        assert_eq!(
            (outcome.provider, outcome.attempts),
            (provider.key.to_peer_id(), 1)
        );
        assert_eq!(outcome.images.len(), 1);
        costs.push(outcome.cost);
    }
    costs
}

/// The books of both honest sides balance: the requester was charged what it paid, every
/// receipt is acknowledged, nothing is held, and neither ledger knows the adversary.
fn books_balanced(
    provider: &Honest,
    requester: &Honest,
    costs: &[MicroTokens],
    adversary: &PublicKey,
) {
    let paid = MicroTokens(costs.iter().map(|c| c.0).sum());
    let books = provider.node.ledger();
    let acct = books
        .account(Role::Provider, &requester.key)
        .unwrap()
        .unwrap();
    assert_eq!((acct.charged, acct.held), (paid, MicroTokens::ZERO));
    assert_eq!(books.account(Role::Provider, adversary).unwrap(), None);
    assert!(books.holds().unwrap().is_empty());
    assert!(
        books
            .receipts(None)
            .unwrap()
            .iter()
            .all(|r| r.ack.is_some())
    );
    books.verify().unwrap();
    requester.node.ledger().verify().unwrap();
}

/// A flooder sends quotes, jobs and events at line rate while an honest requester buys from
/// the same provider: the flood is answered `Busy` past the per-peer burst, none of its jobs
/// is admitted, and every honest job completes at the first try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_is_answered_busy_and_honest_jobs_complete_meanwhile() {
    let provider = Honest::start(60, vec![], true).await;
    let requester = Honest::start(62, vec![provider.addr.clone()], false).await;
    provider.deposit_from(requester.key, 100);
    let flooder = Arc::new(
        Adversary::start(
            AdversaryKind::Flooder,
            "flooder-1".into(),
            key(61),
            vec![provider.addr.clone()],
            tiny(),
        )
        .await
        .unwrap(),
    );
    let rounds = 3;
    let attack = {
        let (f, target) = (flooder.clone(), provider.key);
        tokio::spawn(async move { f.attack(target, rounds).await })
    };
    let costs = honest_jobs(&requester, &provider, 3).await;
    attack.await.unwrap().unwrap();

    let r = flooder.record();
    let per_round = FLOOD_QUOTES + FLOOD_JOBS + FLOOD_EVENTS;
    assert_eq!(
        r.attempts,
        u32::try_from(per_round).unwrap() * rounds,
        "{r:?}"
    );
    assert_eq!(r.gained_micros, 0, "{r:?}");
    assert_eq!(r.images_received, 0, "{r:?}");
    assert!(r.detail.contains("quotes answered busy"), "{r:?}");
    // No event for a job it never bought is taken: each is refused, answered busy, or left
    // unanswered past the per-connection stream limit.
    assert!(!r.detail.contains("events answered:"), "{r:?}");
    assert!(!r.detail.contains("jobs admitted"), "{r:?}");
    // Far more was refused than served: the per-peer burst, not the flood, sets the pace.
    assert!(r.refused * 2 > r.attempts, "{r:?}");
    books_balanced(&provider, &requester, &costs, &flooder.public());

    Arc::try_unwrap(flooder).unwrap().shutdown().await;
    requester.node.shutdown().await;
    provider.node.shutdown().await;
}

/// A hog opens the most connections a provider keeps with one peer, and on each the most
/// streams it serves, every one declaring the largest frame its variant allows and stalling
/// before the last byte. An honest requester's jobs complete meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hog_on_every_stream_and_connection_does_not_stop_honest_jobs() {
    let provider = Honest::start(70, vec![], true).await;
    let requester = Honest::start(72, vec![provider.addr.clone()], false).await;
    provider.deposit_from(requester.key, 100);
    let hog = Arc::new(
        Adversary::start(
            AdversaryKind::Hog,
            "hog-1".into(),
            key(71),
            vec![provider.addr.clone()],
            tiny(),
        )
        .await
        .unwrap(),
    );
    let attack = {
        let (h, target) = (hog.clone(), provider.key);
        tokio::spawn(async move { h.attack(target, 1).await })
    };
    // The hog's connections are up before the honest jobs start.
    let hog_peer = hog.peer_id();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let peers = provider.node.client().connected_peers().await.unwrap();
        if peers.contains(&hog_peer) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hog never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let costs = honest_jobs(&requester, &provider, 2).await;
    attack.await.unwrap().unwrap();

    let r = hog.record();
    assert_eq!(
        r.attempts,
        u32::try_from(HOG_STREAMS).unwrap() * HOG_CONNECTIONS,
        "{r:?}"
    );
    assert_eq!(r.gained_micros, 0, "{r:?}");
    // Past its connections' budgets every stream was cut: at once, or when its stalled small
    // frame's read timed out. Only large frames (those being read or waiting their turn, a
    // few per connection) may be held to the hog's own end.
    let may_hold = u32::try_from(CONNECTION_LARGE_FRAMES).unwrap() * HOG_CONNECTIONS;
    assert!(r.refused + may_hold >= r.attempts, "{r:?}");
    books_balanced(&provider, &requester, &costs, &hog.public());
    // The provider still serves after the hog let go.
    honest_jobs(&requester, &provider, 1).await;

    Arc::try_unwrap(hog).unwrap().shutdown().await;
    requester.node.shutdown().await;
    provider.node.shutdown().await;
}

/// A sybil publishes, over real gossip, adverts for two thousand fresh keys claiming 1 ms and an
/// empty queue. A requester that has measured the honest provider keeps buying there at the
/// first try; a fresh requester tries each sybil key at most once, and both keep the honest
/// provider in their tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sybil_adverts_over_gossip_win_no_job_from_a_measured_provider() {
    const KEYS: usize = 2_000;
    let provider = Honest::start(80, vec![], true).await;
    let measured = Honest::start(82, vec![provider.addr.clone()], false).await;
    let fresh = Honest::start(83, vec![provider.addr.clone()], false).await;
    provider.deposit_from(measured.key, 100);
    provider.deposit_from(fresh.key, 100);
    let mut costs = honest_jobs(&measured, &provider, 1).await;

    let sybil = Adversary::start_with(
        AdversaryKind::Sybil,
        "sybil-1".into(),
        key(81),
        vec![provider.addr.clone()],
        tiny(),
        KEYS,
    )
    .await
    .unwrap();
    let sybils: std::collections::BTreeSet<PublicKey> =
        sybil.sybil_keys().iter().copied().collect();
    for node in [&measured, &fresh] {
        let client = node.node.requester().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let heard = client
                .providers()
                .iter()
                .filter(|p| sybils.contains(&p.key))
                .count();
            if heard == KEYS {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {heard} of {KEYS} sybil adverts arrived over gossip"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The measured requester, choosing freely, buys from the honest provider at once (once
    // its advert says it is idle again: a busy known provider rightly loses a job to an idle
    // one that claims its speed).
    for i in 0..3 {
        let client = measured.node.requester().clone();
        wait_until("an idle advert from the honest provider", || {
            client
                .providers()
                .iter()
                .any(|p| p.key == provider.key && p.advert.queue_depth == 0)
        })
        .await;
        let outcome = measured
            .node
            .requester()
            .generate(
                small_job(&format!("a free choice {i}")),
                GenerateOptions::default(),
                &mut |_| {},
            )
            .await
            .unwrap();
        assert_eq!(
            (outcome.provider, outcome.attempts),
            (provider.key.to_peer_id(), 1)
        );
        costs.push(outcome.cost);
    }

    // The fresh requester believes the claims at first: each try at a sybil fails at once (it
    // cannot be reached) and ranks that key last, so no key is tried twice.
    let mut tried = Vec::new();
    for i in 0..4 {
        let _ = fresh
            .node
            .requester()
            .generate(
                small_job(&format!("a fresh choice {i}")),
                GenerateOptions::default(),
                &mut |p| {
                    if let JobProgress::FailingOver { provider, .. } = p {
                        tried.push(provider);
                    }
                },
            )
            .await;
    }
    let distinct: std::collections::BTreeSet<_> = tried.iter().collect();
    assert_eq!(
        distinct.len(),
        tried.len(),
        "a sybil key was tried twice: {tried:?}"
    );
    for node in [&measured, &fresh] {
        assert!(
            node.node
                .requester()
                .providers()
                .iter()
                .any(|p| p.key == provider.key),
            "the honest provider left a table"
        );
    }
    let r = sybil.record();
    assert_eq!(r.gained_micros, 0, "{r:?}");
    assert!(r.detail.contains("adverts published"), "{r:?}");
    books_balanced(&provider, &measured, &costs, &sybil.public());

    sybil.shutdown().await;
    fresh.node.shutdown().await;
    measured.node.shutdown().await;
    provider.node.shutdown().await;
}
