//! The network layer over real sockets: two swarms on loopback TCP exchange an RPC and a
//! gossiped advert; garbage and oversized frames on the listening port do not stop a node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use pixmarket_node::network::{self, Client, NetConfig, NetEvent, Request, Response};
use pixmarket_protocol::{CapacityAdvert, JobId, PriceSchedule, SecretKey, Signed};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn start(
    seed: u8,
    bootstrap: Vec<Multiaddr>,
) -> (Client, mpsc::Receiver<NetEvent>, Multiaddr, SecretKey) {
    let key = SecretKey::from_seed(&[seed; 32]);
    let cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
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
    (client, events, full, key)
}

async fn next_request(
    events: &mut mpsc::Receiver<NetEvent>,
) -> (Request, network::ResponseChannel) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            NetEvent::Request {
                request, channel, ..
            } => return (*request, channel),
            _ => continue,
        }
    }
}

fn advert(seq: u64) -> CapacityAdvert {
    CapacityAdvert {
        seq,
        issued_at_ms: now_ms(),
        listen_addrs: vec![],
        gpu_name: "cpu".into(),
        gpu_memory_mib: 0,
        model_id: "tiny".into(),
        precision: "f32".into(),
        supports_image_to_image: true,
        supports_inpaint: true,
        max_width: 512,
        max_height: 512,
        max_steps: 50,
        max_images: 4,
        schedule: PriceSchedule::default(),
        queue_depth: 0,
        max_queue: 8,
        ms_per_standard_image: 1000,
        devices: Vec::new(),
        step_caching: pixmarket_protocol::StepCaching::Exact,
        serves_exact: true,
        loras: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_round_trip_and_gossip_over_tcp() {
    let (a, mut a_events, a_addr, a_key) = start(1, vec![]).await;
    let (b, mut b_events, _b_addr, _) = start(2, vec![a_addr.clone()]).await;

    // b asks a; a answers.
    let asker = tokio::spawn({
        let b = b.clone();
        let a_peer = a.local_peer_id();
        async move { b.request(a_peer, Request::Cancel(JobId([9; 16]))).await }
    });
    let (request, channel) = next_request(&mut a_events).await;
    assert_eq!(request, Request::Cancel(JobId([9; 16])));
    a.respond(channel, Response::Ok).await.unwrap();
    assert_eq!(asker.await.unwrap().unwrap(), Response::Ok);

    // a publishes an advert; b receives it verified. Gossipsub needs a heartbeat or two to
    // learn the subscription, so publish until it arrives (bounded).
    let mut got = None;
    for seq in 1..=20u64 {
        a.publish(Signed::sign(&a_key, &advert(seq)).unwrap())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, b_events.recv()).await {
            if let NetEvent::Advert { advert, signed } = ev {
                got = Some((*advert, signed.signer()));
                break;
            }
        }
        if got.is_some() {
            break;
        }
    }
    let (adv, signer) = got.expect("advert arrived over gossip");
    assert_eq!(signer, a_key.public());
    assert_eq!(adv.model_id, "tiny");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_does_not_stop_the_node() {
    let (a, mut a_events, a_addr, _) = start(3, vec![]).await;
    let tcp_port = a_addr
        .iter()
        .find_map(|p| {
            if let Protocol::Tcp(port) = p {
                Some(port)
            } else {
                None
            }
        })
        .unwrap();

    // Random bytes and an absurd length prefix straight onto the TCP port, many times.
    for i in 0..20u32 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port))
            .await
            .unwrap();
        let junk: Vec<u8> = (0..4096u32)
            .map(|j| (j.wrapping_mul(31).wrapping_add(i) % 251) as u8)
            .collect();
        let _ = s.write_all(&junk).await;
        let _ = s.write_all(&u32::MAX.to_be_bytes()).await;
        drop(s);
    }

    // A real peer still gets served.
    let (b, _b_events, _, _) = start(4, vec![a_addr]).await;
    let asker = tokio::spawn({
        let b = b.clone();
        let a_peer = a.local_peer_id();
        async move { b.request(a_peer, Request::Cancel(JobId([1; 16]))).await }
    });
    let (_, channel) = next_request(&mut a_events).await;
    a.respond(channel, Response::Ok).await.unwrap();
    assert_eq!(asker.await.unwrap().unwrap(), Response::Ok);
}

#[tokio::test]
async fn a_stopped_node_is_a_typed_error() {
    let key = SecretKey::from_seed(&[5; 32]);
    let (client, _events, event_loop) = network::new(&key, &NetConfig::default(), None).unwrap();
    drop(event_loop);
    let err = client.connected_peers().await.unwrap_err();
    assert!(matches!(err, network::NetError::NodeStopped), "{err}");
}

/// A peer that forwards an invalid advert (here, it publishes one: signed, but naming a
/// precision that does not exist) loses its score at once, is pruned from the advert mesh, and
/// its later adverts, valid or not, are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_an_invalid_advert_is_pruned_from_the_mesh() {
    let (a, mut a_events, a_addr, _) = start(5, vec![]).await;
    let (m, _m_events, _m_addr, m_key) = start(6, vec![a_addr]).await;
    let m_peer = m.local_peer_id();

    // A valid advert first, until it arrives: the mesh has formed.
    let mut seq = 0u64;
    let mut heard = false;
    for _ in 0..40 {
        seq += 1;
        m.publish(Signed::sign(&m_key, &advert(seq)).unwrap())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, a_events.recv()).await {
            if matches!(ev, NetEvent::Advert { .. }) {
                heard = true;
                break;
            }
        }
        if heard {
            break;
        }
    }
    assert!(heard, "the valid advert arrived over gossip");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !a.gossip_standing(m_peer).await.unwrap().in_mesh {
        assert!(tokio::time::Instant::now() < deadline, "m joined a's mesh");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One invalid advert.
    let mut bad = advert(seq + 1);
    bad.precision = "fp4".into();
    m.publish(Signed::sign(&m_key, &bad).unwrap())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = a.gossip_standing(m_peer).await.unwrap();
        if s.score.is_some_and(|x| x < -80.0) && !s.in_mesh {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "m not graylisted and pruned within 20 s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Graylisted: its next valid adverts are not delivered.
    for s in seq + 2..seq + 7 {
        // Publishing may fail once m has no mesh peer left; that is also no delivery.
        let _ = m.publish(Signed::sign(&m_key, &advert(s)).unwrap()).await;
    }
    let quiet = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(ev)) = tokio::time::timeout_at(quiet, a_events.recv()).await {
        assert!(
            !matches!(ev, NetEvent::Advert { .. }),
            "an advert from a graylisted peer was delivered"
        );
    }
    a.shutdown().await;
    m.shutdown().await;
}

/// A peer that forwards stale adverts (here, it publishes them: signed and well formed, but
/// issued a minute ago, past the 30 s lifetime) is ignored, not penalised: an honest forwarder
/// may hold a delayed advert. Its score does not fall, it stays in the advert mesh, and its
/// next fresh advert is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_stale_adverts_keeps_its_score_and_mesh_place() {
    let (a, mut a_events, a_addr, _) = start(7, vec![]).await;
    let (m, _m_events, _m_addr, m_key) = start(8, vec![a_addr]).await;
    let m_peer = m.local_peer_id();

    let mut seq = 0u64;
    let mut heard = false;
    for _ in 0..40 {
        seq += 1;
        m.publish(Signed::sign(&m_key, &advert(seq)).unwrap())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, a_events.recv()).await {
            if matches!(ev, NetEvent::Advert { .. }) {
                heard = true;
                break;
            }
        }
        if heard {
            break;
        }
    }
    assert!(heard, "the valid advert arrived over gossip");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !a.gossip_standing(m_peer).await.unwrap().in_mesh {
        assert!(tokio::time::Instant::now() < deadline, "m joined a's mesh");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Five stale adverts, each with a newer sequence number: none is delivered.
    for _ in 0..5 {
        seq += 1;
        let mut stale = advert(seq);
        stale.issued_at_ms = now_ms() - 60_000;
        m.publish(Signed::sign(&m_key, &stale).unwrap())
            .await
            .unwrap();
    }
    // A fresh one after them is delivered, and it is the fresh one.
    seq += 1;
    m.publish(Signed::sign(&m_key, &advert(seq)).unwrap())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let delivered = loop {
        match tokio::time::timeout_at(deadline, a_events.recv()).await {
            Ok(Some(NetEvent::Advert { advert, .. })) => break advert,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the fresh advert after the stale ones never arrived"),
        }
    };
    assert_eq!(delivered.seq, seq, "a stale advert was delivered");
    let standing = a.gossip_standing(m_peer).await.unwrap();
    assert!(standing.in_mesh, "{standing:?}");
    assert!(standing.score.is_none_or(|s| s >= 0.0), "{standing:?}");
    a.shutdown().await;
    m.shutdown().await;
}
