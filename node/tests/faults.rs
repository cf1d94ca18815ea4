//! Fault injection over real sockets (libp2p on loopback TCP, sled ledgers in temp folders):
//! a partition makes a job fail at once, stops gossip and connections between the groups, and
//! heals; a lost request or response is seen as a timeout; delays lengthen a round trip without
//! stalling the responder.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use pixmarket_ledger::Ledger;
use pixmarket_node::generator::Generator;
use pixmarket_node::network::{
    self, Client, LinkFaults, NetConfig, NetError, NetEvent, Request, Response,
};
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::{FailureKind, GenerateError, GenerateOptions};
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::{
    DepositNote, JobId, JobParams, MicroTokens, PriceSchedule, SecretKey, Signed,
};
use tokio::sync::mpsc;

use common::{SlowGenerator, job_with_steps};

fn job(prompt: &str) -> JobParams {
    job_with_steps(prompt, 2)
}

/// A node with its ledger in `dir`, on 127.0.0.1, sharing `faults`.
async fn start_node(
    seed: u8,
    dir: &tempfile::TempDir,
    bootstrap: Vec<Multiaddr>,
    provide: bool,
    faults: &LinkFaults,
) -> (Node, Multiaddr) {
    let key = SecretKey::from_seed(&[seed; 32]);
    let ledger = Arc::new(Ledger::open(&dir.path().join("ledger"), key.public()).unwrap());
    let generator: Arc<dyn Generator> = Arc::new(SlowGenerator {
        step: Duration::from_millis(5),
    });
    let node = Node::start(NodeOptions {
        key,
        ledger,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            request_timeout: Duration::from_secs(5),
            faults: Some(faults.clone()),
            ..NetConfig::default()
        },
        provide: provide.then(|| {
            (
                vec![generator],
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
    })
    .await
    .unwrap();
    let addr = loop {
        if let Some(a) = node.addresses().await.unwrap().into_iter().next() {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    (node, addr)
}

async fn wait_until(what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connected(node: &Node, peer: PeerId) -> bool {
    node.client()
        .connected_peers()
        .await
        .unwrap()
        .contains(&peer)
}

/// When the requester last heard `provider`'s advert (its `issued_at_ms`), if ever.
fn advert_heard(requester: &Node, provider: PeerId) -> Option<u64> {
    requester
        .requester()
        .providers()
        .into_iter()
        .find(|e| e.key.to_peer_id() == provider)
        .map(|e| e.advert.issued_at_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_fails_jobs_at_once_and_heals() {
    let faults = LinkFaults::new(1);
    let (pdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (provider, paddr) = start_node(71, &pdir, vec![], true, &faults).await;
    let (requester, _) = start_node(72, &rdir, vec![paddr.clone()], false, &faults).await;
    let (p, r) = (
        provider.client().local_peer_id(),
        requester.client().local_peer_id(),
    );
    let rkey = SecretKey::from_seed(&[72; 32]).public();
    let note = DepositNote {
        deposit_id: [2; 16],
        account: rkey,
        amount: MicroTokens::from_tokens(100).unwrap(),
        memo: "test deposit".into(),
        recorded_at_ms: pixmarket_node::now_ms(),
    };
    let pkey = SecretKey::from_seed(&[71; 32]);
    provider
        .ledger()
        .deposit(&Signed::sign(&pkey, &note).unwrap())
        .unwrap();
    let options = GenerateOptions {
        provider: Some(p),
        idle_timeout: Duration::from_secs(5),
        ..GenerateOptions::default()
    };
    let client = requester.requester().clone();
    client
        .generate(job("before the storm"), options.clone(), &mut |_| {})
        .await
        .unwrap();
    wait_until(
        "the provider's advert",
        Duration::from_secs(15),
        async || advert_heard(&requester, p).is_some(),
    )
    .await;

    faults
        .partition(vec![BTreeSet::from([p]), BTreeSet::from([r])])
        .unwrap();
    wait_until(
        "the connection to close",
        Duration::from_secs(5),
        async || !connected(&requester, p).await,
    )
    .await;
    assert!(
        faults.stats().closed_connections >= 1,
        "{:?}",
        faults.stats()
    );

    let asked = Instant::now();
    let err = client
        .generate(job("during the storm"), options.clone(), &mut |_| {})
        .await
        .unwrap_err();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "failed after {took:?}");
    let GenerateError::AllFailed(reasons) = &err else {
        panic!("{err}");
    };
    assert!(
        reasons[0].failure.message.contains("partition"),
        "{reasons:?}"
    );
    assert_eq!(
        reasons[0].failure.kind,
        FailureKind::Unreachable,
        "{reasons:?}"
    );
    assert!(faults.stats().refused_requests >= 1);

    // Dialling across is denied too, and nothing reconnects or gossips across on its own.
    let dial = requester.client().dial(paddr).await;
    assert!(dial.is_err(), "{dial:?}");
    assert!(
        faults.stats().refused_connections >= 1,
        "{:?}",
        faults.stats()
    );
    // An advert received just before the cut may still be on its way through the dispatcher.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let heard = advert_heard(&requester, p);
    // Longer than the provider's advert interval (3 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!connected(&requester, p).await);
    assert_eq!(advert_heard(&requester, p), heard, "an advert crossed");

    faults.heal();
    wait_until(
        "reconnection after heal",
        Duration::from_secs(10),
        async || connected(&requester, p).await,
    )
    .await;
    client
        .generate(job("after the storm"), options, &mut |_| {})
        .await
        .unwrap();
    wait_until("adverts after heal", Duration::from_secs(15), async || {
        advert_heard(&requester, p) > heard
    })
    .await;
    requester.shutdown().await;
    provider.shutdown().await;
}

/// A bare network node (no services): its client, events and full address.
async fn start_net(
    seed: u8,
    bootstrap: Vec<Multiaddr>,
    faults: &LinkFaults,
    request_timeout: Duration,
) -> (Client, mpsc::Receiver<NetEvent>, Multiaddr) {
    let key = SecretKey::from_seed(&[seed; 32]);
    let cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        request_timeout,
        faults: Some(faults.clone()),
        ..NetConfig::default()
    };
    let (client, mut events, event_loop) = network::new(&key, &cfg, None).unwrap();
    tokio::spawn(event_loop.run());
    let addr = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            NetEvent::Listening(a) => break a,
            _ => continue,
        }
    };
    let full = addr.with(Protocol::P2p(client.local_peer_id()));
    (client, events, full)
}

/// The next inbound request, or None within `within`.
async fn next_request(
    events: &mut mpsc::Receiver<NetEvent>,
    within: Duration,
) -> Option<network::ResponseChannel> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(NetEvent::Request { channel, .. })) => return Some(channel),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

fn ask(b: &Client, a: PeerId) -> tokio::task::JoinHandle<(Result<Response, NetError>, Duration)> {
    let b = b.clone();
    tokio::spawn(async move {
        let t = Instant::now();
        let r = b.request(a, Request::Cancel(JobId([3; 16]))).await;
        (r, t.elapsed())
    })
}

const TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_requests_and_responses_time_out() {
    let faults = LinkFaults::new(2);
    let (a, mut a_events, a_addr) = start_net(73, vec![], &faults, TIMEOUT).await;
    let (b, _b_events, _) = start_net(74, vec![a_addr], &faults, TIMEOUT).await;
    let a_peer = a.local_peer_id();

    // No loss: answered.
    let asker = ask(&b, a_peer);
    let channel = next_request(&mut a_events, Duration::from_secs(10))
        .await
        .unwrap();
    a.respond(channel, Response::Ok).await.unwrap();
    assert_eq!(asker.await.unwrap().0.unwrap(), Response::Ok);

    // Certain loss of the request: it never arrives and the asker times out.
    faults.set_drop_ppm(1_000_000).unwrap();
    let (r, took) = ask(&b, a_peer).await.unwrap();
    let err = r.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(took >= TIMEOUT, "{took:?}");
    assert!(
        next_request(&mut a_events, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(faults.stats().dropped_requests, 1);

    // The request gets through; its response is lost: the asker still times out.
    faults.set_drop_ppm(0).unwrap();
    let asker = ask(&b, a_peer);
    let channel = next_request(&mut a_events, Duration::from_secs(10))
        .await
        .unwrap();
    faults.set_drop_ppm(1_000_000).unwrap();
    a.respond(channel, Response::Ok).await.unwrap();
    let (r, took) = asker.await.unwrap();
    assert!(r.is_err(), "{r:?}");
    assert!(took >= TIMEOUT, "{took:?}");
    let stats = faults.stats();
    assert_eq!(
        (stats.dropped_responses, stats.dropped),
        (1, 2),
        "{stats:?}"
    );

    // Back to no loss: answered again.
    faults.set_drop_ppm(0).unwrap();
    let asker = ask(&b, a_peer);
    let channel = next_request(&mut a_events, Duration::from_secs(10))
        .await
        .unwrap();
    a.respond(channel, Response::Ok).await.unwrap();
    assert_eq!(asker.await.unwrap().0.unwrap(), Response::Ok);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_lengthen_the_round_trip_without_stalling_the_responder() {
    let faults = LinkFaults::new(3);
    let timeout = Duration::from_secs(10);
    let (a, mut a_events, a_addr) = start_net(75, vec![], &faults, timeout).await;
    let (b, _b_events, _) = start_net(76, vec![a_addr], &faults, timeout).await;
    let a_peer = a.local_peer_id();

    let asker = ask(&b, a_peer);
    let channel = next_request(&mut a_events, timeout).await.unwrap();
    a.respond(channel, Response::Ok).await.unwrap();
    let (r, plain) = asker.await.unwrap();
    assert_eq!(r.unwrap(), Response::Ok);

    // Both the request and the response wait 400 ms.
    let delay = Duration::from_millis(400);
    faults.set_delay(delay, delay).unwrap();
    let asker = ask(&b, a_peer);
    let channel = next_request(&mut a_events, timeout).await.unwrap();
    let t = Instant::now();
    a.respond(channel, Response::Ok).await.unwrap();
    let respond_took = t.elapsed();
    let (r, delayed) = asker.await.unwrap();
    assert_eq!(r.unwrap(), Response::Ok);
    assert!(
        respond_took < Duration::from_millis(100),
        "respond waited {respond_took:?}"
    );
    assert!(
        delayed >= 2 * delay,
        "{delayed:?} vs {plain:?} without delay"
    );
    assert_eq!(faults.stats().delayed, 2);
    eprintln!("round trip {plain:?} without delay, {delayed:?} with 2 × {delay:?}");
    a.shutdown().await;
    b.shutdown().await;
}
