//! `Node::crash` over loopback TCP with real sled ledgers: a provider killed (emulated) in the
//! middle of a job leaves its ledger untouched (the hold still open, nothing settled), the
//! requester gives up on it and pays nothing, and the provider restarted from the same folder
//! and key voids the old hold, passes `verify`, and serves a new job. A crash does not wait
//! out a message lost to fault injection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use pixmarket_ledger::{Ledger, LedgerError, Role};
use pixmarket_node::generator::Generator;
use pixmarket_node::network::{LinkFaults, NetConfig};
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::{GenerateError, GenerateOptions, JobProgress};
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::{DepositNote, JobId, MicroTokens, PriceSchedule, SecretKey, Signed};
use tokio::sync::mpsc;

use common::{SlowGenerator, job_with_steps as job};

async fn start(
    seed: u8,
    ledger: Arc<Ledger>,
    bootstrap: Vec<Multiaddr>,
    generator: Option<Arc<dyn Generator>>,
) -> (Node, Multiaddr) {
    start_with(seed, ledger, bootstrap, generator, NetConfig::default()).await
}

async fn start_with(
    seed: u8,
    ledger: Arc<Ledger>,
    bootstrap: Vec<Multiaddr>,
    generator: Option<Arc<dyn Generator>>,
    net: NetConfig,
) -> (Node, Multiaddr) {
    let options = NodeOptions {
        key: SecretKey::from_seed(&[seed; 32]),
        ledger,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            ..net
        },
        provide: generator.map(|g| {
            (
                vec![g],
                ProviderSettings {
                    advert_interval: pixmarket_node::provider::ADVERT_INTERVAL,
                    ack_deadline: pixmarket_node::provider::ACK_DEADLINE,
                    schedule: PriceSchedule::default(),
                    max_queue: 8,
                    max_batch: 1,
                    ms_per_standard_image: 60_000,
                },
            )
        }),
        metrics: None,
    };
    let node = Node::start(options).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        if let Some(a) = node.addresses().await.unwrap().into_iter().next() {
            break a;
        }
        assert!(Instant::now() < deadline, "no listen address");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    (node, addr)
}

/// Opens a ledger, waiting (bounded) for sled to release a lock a just-dropped handle held
/// (used only where the test itself dropped a handle).
async fn open_ledger(path: &Path, seed: u8) -> Ledger {
    let owner = SecretKey::from_seed(&[seed; 32]).public();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Ledger::open(path, owner) {
            Ok(l) => return l,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("ledger at {} stayed locked: {e}", path.display()),
        }
    }
}

const PROVIDER: u8 = 61;
const REQUESTER: u8 = 62;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_provider_settles_nothing_and_restarts_from_its_folder() {
    let pdir = tempfile::tempdir().unwrap();
    let rdir = tempfile::tempdir().unwrap();
    let ppath = pdir.path().join("ledger");
    let pkey = SecretKey::from_seed(&[PROVIDER; 32]);
    let rkey = SecretKey::from_seed(&[REQUESTER; 32]).public();
    let generator: Arc<dyn Generator> = Arc::new(SlowGenerator {
        step: Duration::from_millis(100),
    });

    let (provider, paddr) = start(
        PROVIDER,
        Arc::new(open_ledger(&ppath, PROVIDER).await),
        vec![],
        Some(generator.clone()),
    )
    .await;
    let peer = provider.client().local_peer_id();
    let note = DepositNote {
        deposit_id: [1; 16],
        account: rkey,
        amount: MicroTokens::from_tokens(100).unwrap(),
        memo: "test deposit".into(),
        recorded_at_ms: pixmarket_node::now_ms(),
    };
    provider
        .ledger()
        .deposit(&Signed::sign(&pkey, &note).unwrap())
        .unwrap();
    let rledger = Arc::new(open_ledger(&rdir.path().join("ledger"), REQUESTER).await);
    let (requester, raddr) = start(REQUESTER, rledger, vec![paddr], None).await;

    // A 60-step job (6 s at 100 ms a step); the requester asks for its status after 1 s of
    // silence, gets no answer from the dead provider, and fails over once its request (valid
    // for 8 s) has expired: the provider can no longer settle it.
    let (tx, mut progress) = mpsc::channel(1024);
    let client = requester.requester().clone();
    let options = GenerateOptions {
        provider: Some(peer),
        idle_timeout: Duration::from_secs(1),
        request_validity: Duration::from_secs(8),
        ..GenerateOptions::default()
    };
    let run = tokio::spawn(async move {
        client
            .generate(job("a lighthouse in a storm", 60), options, &mut |p| {
                let _ = tx.try_send(p);
            })
            .await
    });
    loop {
        let p = tokio::time::timeout(Duration::from_secs(15), progress.recv())
            .await
            .expect("a step within 15 s")
            .expect("generate still running");
        if let JobProgress::Step { .. } = p {
            break;
        }
    }

    let crashed_at = Instant::now();
    provider.crash().await.unwrap();
    let crash_took = crashed_at.elapsed();
    assert!(
        crash_took < Duration::from_secs(2),
        "crash took {crash_took:?}"
    );

    // The killed provider's books as it left them: the job's hold open, nothing settled. They
    // open at once: `crash` returned only after the node let go of them.
    let left = Ledger::open(&ppath, pkey.public()).unwrap();
    let holds = left.holds().unwrap();
    assert_eq!(holds.len(), 1, "{holds:?}");
    let old_job: JobId = holds[0].0;
    assert!(left.receipts(None).unwrap().is_empty());
    let acct = left.account(Role::Provider, &rkey).unwrap().unwrap();
    assert_eq!(acct.charged, MicroTokens::ZERO);
    assert!(acct.held > MicroTokens::ZERO);
    drop(left);

    // The requester hears nothing more, gives up, and has paid nothing.
    let err = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("generate gave up within 15 s")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, GenerateError::AllFailed(_)), "{err}");
    let books = requester.ledger();
    assert!(books.receipts(None).unwrap().is_empty());
    let pkey_pub = pkey.public();
    assert!(
        books
            .account(Role::Requester, &pkey_pub)
            .unwrap()
            .is_none_or(|a| a.charged == MicroTokens::ZERO && a.entries == 0)
    );

    // Restarted from the same folder and key: the old hold is voided, the books verify.
    let (provider, _) = start(
        PROVIDER,
        Arc::new(open_ledger(&ppath, PROVIDER).await),
        vec![raddr],
        Some(generator),
    )
    .await;
    assert_eq!(provider.client().local_peer_id(), peer);
    let books = provider.ledger();
    assert!(books.holds().unwrap().is_empty());
    assert!(matches!(
        books.void(old_job, "again"),
        Err(LedgerError::AlreadyFinished { .. })
    ));
    let acct = books.account(Role::Provider, &rkey).unwrap().unwrap();
    assert_eq!(
        (acct.charged, acct.held, acct.entries),
        (MicroTokens::ZERO, MicroTokens::ZERO, 0)
    );
    let report = books.verify().unwrap();
    assert_eq!(report.open_holds, 0);

    // And it serves a new job, once it has dialled the requester (its old address is dead).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !requester
        .client()
        .connected_peers()
        .await
        .unwrap()
        .contains(&peer)
    {
        assert!(
            Instant::now() < deadline,
            "the restarted provider did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let options = GenerateOptions {
        provider: Some(peer),
        idle_timeout: Duration::from_secs(10),
        ..GenerateOptions::default()
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        requester
            .requester()
            .generate(job("a calm harbour", 2), options, &mut |_| {}),
    )
    .await
    .expect("the new job finished within 30 s")
    .unwrap();
    assert_eq!(outcome.provider, peer);
    let acct = books.account(Role::Provider, &rkey).unwrap().unwrap();
    assert_eq!((acct.charged, acct.entries), (outcome.cost, 1));
    books.verify().unwrap();

    // Idle nodes crash at once too, and let go of their books.
    let rpath = rdir.path().join("ledger");
    tokio::time::timeout(Duration::from_secs(5), requester.crash())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), provider.crash())
        .await
        .unwrap()
        .unwrap();
    let reopened_at = Instant::now();
    Ledger::open(&rpath, rkey).unwrap().verify().unwrap();
    Ledger::open(&ppath, pkey.public())
        .unwrap()
        .verify()
        .unwrap();
    eprintln!(
        "crash returned in {crash_took:?}; idle ledgers reopened in {:?}",
        reopened_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_does_not_wait_out_a_lost_message() {
    const P: u8 = 63;
    const R: u8 = 64;
    let faults = LinkFaults::new(5);
    // Long enough that waiting it out would overrun the crash's own 10 s bound.
    let net = NetConfig {
        request_timeout: Duration::from_secs(30),
        faults: Some(faults.clone()),
        ..NetConfig::default()
    };
    let (pdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pkey = SecretKey::from_seed(&[P; 32]);
    let rkey = SecretKey::from_seed(&[R; 32]).public();
    let ppath = pdir.path().join("ledger");
    let generator: Arc<dyn Generator> = Arc::new(SlowGenerator {
        step: Duration::from_millis(50),
    });
    let (provider, paddr) = start_with(
        P,
        Arc::new(open_ledger(&ppath, P).await),
        vec![],
        Some(generator),
        net.clone(),
    )
    .await;
    let note = DepositNote {
        deposit_id: [2; 16],
        account: rkey,
        amount: MicroTokens::from_tokens(100).unwrap(),
        memo: "test deposit".into(),
        recorded_at_ms: pixmarket_node::now_ms(),
    };
    provider
        .ledger()
        .deposit(&Signed::sign(&pkey, &note).unwrap())
        .unwrap();
    let rledger = Arc::new(open_ledger(&rdir.path().join("ledger"), R).await);
    let (requester, _) = start_with(R, rledger, vec![paddr], None, net).await;

    let (tx, mut progress) = mpsc::channel(1024);
    let client = requester.requester().clone();
    let options = GenerateOptions {
        provider: Some(pkey.public().to_peer_id()),
        idle_timeout: Duration::from_secs(60),
        ..GenerateOptions::default()
    };
    let run = tokio::spawn(async move {
        client
            .generate(job("lost in transit", 4), options, &mut |p| {
                let _ = tx.try_send(p);
            })
            .await
    });
    loop {
        let p = tokio::time::timeout(Duration::from_secs(15), progress.recv())
            .await
            .expect("queued within 15 s")
            .expect("generate still running");
        if let JobProgress::Queued { .. } = p {
            break;
        }
    }
    // Everything from now on is lost: the provider's worker ends up waiting on a lost delivery.
    faults.set_drop_ppm(1_000_000).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while faults.stats().dropped_requests == 0 {
        assert!(Instant::now() < deadline, "nothing was lost");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t = Instant::now();
    provider.crash().await.unwrap();
    requester.crash().await.unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "crashing took {took:?}");
    // The caller's generate call ends too, without a result.
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("generate ended with its node")
        .unwrap();
    assert!(r.is_err(), "{r:?}");
    Ledger::open(&ppath, pkey.public())
        .unwrap()
        .verify()
        .unwrap();
}

/// A provider (key seed `p`) with a slow generator taking `step` per step, whose books hold a
/// 100-token deposit from the requester of key seed `r`.
async fn funded_provider(
    dir: &tempfile::TempDir,
    p: u8,
    r: u8,
    step: Duration,
) -> (Node, Multiaddr, Arc<Ledger>) {
    let generator: Arc<dyn Generator> = Arc::new(SlowGenerator { step });
    let ledger = Arc::new(open_ledger(&dir.path().join("ledger"), p).await);
    let (provider, addr) = start(p, ledger.clone(), vec![], Some(generator)).await;
    let note = DepositNote {
        deposit_id: [p; 16],
        account: SecretKey::from_seed(&[r; 32]).public(),
        amount: MicroTokens::from_tokens(100).unwrap(),
        memo: "test deposit".into(),
        recorded_at_ms: pixmarket_node::now_ms(),
    };
    let signed = Signed::sign(&SecretKey::from_seed(&[p; 32]), &note).unwrap();
    ledger.deposit(&signed).unwrap();
    (provider, addr, ledger)
}

/// A requester that stops waiting (its call dropped mid-job) cancels the job at the provider,
/// which voids it: nothing is charged or held on either side, and the next job's books agree.
/// (A receipt that still arrives late is refused and credited back with a note, never a rewind:
/// `tests/tests/fair_exchange.rs` covers that path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_on_is_cancelled_at_the_provider_and_the_books_agree() {
    let (pdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pkey, rkey) = (
        SecretKey::from_seed(&[71; 32]),
        SecretKey::from_seed(&[72; 32]).public(),
    );
    let (provider, paddr, pledger) =
        funded_provider(&pdir, 71, 72, Duration::from_millis(50)).await;
    let peer = provider.client().local_peer_id();
    const R: u8 = 72;
    let rledger = Arc::new(open_ledger(&rdir.path().join("ledger"), R).await);
    let (requester, _) = start(R, rledger.clone(), vec![paddr], None).await;
    let requester_key = SecretKey::from_seed(&[R; 32]).public();
    let options = GenerateOptions {
        provider: Some(peer),
        ..GenerateOptions::default()
    };

    // 40 steps of 50 ms; the caller gives up after 0.5 s.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        requester
            .requester()
            .generate(job("given up on", 40), options.clone(), &mut |_| {}),
    )
    .await;
    assert!(gave_up.is_err(), "the job should still have been running");

    // The dropped call sent a cancel; the provider answers it once it has voided the job.
    let sent = requester.requester().abandoned().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].answered, "{sent:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pledger.holds().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cancelled job's hold stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pledger.receipts(None).unwrap().is_empty());
    if let Some(account) = pledger.account(Role::Provider, &rkey).unwrap() {
        assert_eq!(account.charged, MicroTokens::ZERO);
        assert_eq!(account.held, MicroTokens::ZERO);
    }
    assert!(rledger.receipts(None).unwrap().is_empty());

    // The next job is delivered, and both books agree on it.
    let outcome = requester
        .requester()
        .generate(job("delivered", 2), options, &mut |_| {})
        .await
        .unwrap();
    let theirs = pledger.account(Role::Provider, &rkey).unwrap().unwrap();
    let ours = rledger
        .account(Role::Requester, &pkey.public())
        .unwrap()
        .unwrap();
    assert_eq!(theirs.charged, outcome.cost);
    assert_eq!(ours.charged, outcome.cost);
    // One entry on both sides: the paid receipt (the voided job left none).
    assert_eq!(theirs.last_entry, ours.last_entry);
    assert_eq!((theirs.entries, ours.entries), (1, 1));
    assert_eq!(
        pledger.chain(Role::Provider, &requester_key, None).unwrap(),
        rledger
            .chain(Role::Requester, &pkey.public(), None)
            .unwrap()
    );
    assert!(pledger.verify().is_ok() && rledger.verify().is_ok());
    requester.shutdown().await;
    provider.shutdown().await;
}

/// A job waiting behind a long one hears its position every couple of seconds, so a requester
/// whose idle timeout is shorter than the wait keeps waiting instead of giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_hears_from_its_provider_while_it_waits() {
    let (pdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (provider, paddr, _) = funded_provider(&pdir, 73, 74, Duration::from_millis(100)).await;
    let peer = provider.client().local_peer_id();
    const R: u8 = 74;
    let rledger = Arc::new(open_ledger(&rdir.path().join("ledger"), R).await);
    let (requester, _) = start(R, rledger, vec![paddr], None).await;
    let options = GenerateOptions {
        provider: Some(peer),
        // Shorter than the wait behind the first job (about 7 s), longer than a heartbeat.
        idle_timeout: Duration::from_secs(3),
        max_attempts: 1,
        ..GenerateOptions::default()
    };
    let first = {
        let client = requester.requester().clone();
        let options = options.clone();
        tokio::spawn(async move { client.generate(job("long", 70), options, &mut |_| {}).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut queued = 0;
    let second = requester
        .requester()
        .generate(job("behind it", 2), options, &mut |p| {
            if matches!(p, JobProgress::Queued { .. }) {
                queued += 1;
            }
        })
        .await;
    assert!(second.is_ok(), "{second:?}");
    assert!(first.await.unwrap().is_ok());
    // The answer to the request, then at least two heartbeats.
    assert!(queued >= 3, "{queued} queue updates");
    requester.shutdown().await;
    provider.shutdown().await;
}
