//! Provider selection over loopback TCP: with two providers advertising different speeds,
//! `Selection::EstimatedFinish` picks the fast one; `Selection::Random { seed }` gives the same
//! order for the same seed and, over several seeds, puts each provider first; `generate` follows
//! that order and tries at most `max_attempts` providers (0 counts as 1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use pixmarket_ledger::Ledger;
use pixmarket_node::generator::Generator;
use pixmarket_node::network::NetConfig;
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::{GenerateError, GenerateOptions, Selection};
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::{DepositNote, JobParams, MicroTokens, PriceSchedule, SecretKey, Signed};

use common::{SlowGenerator, job_with_steps};

fn job(prompt: &str) -> JobParams {
    job_with_steps(prompt, 2)
}

/// A node on 127.0.0.1 with its ledger in `dir`; a provider advertising `ms_per_standard`
/// when given.
async fn start_node(
    seed: u8,
    dir: &tempfile::TempDir,
    bootstrap: Vec<Multiaddr>,
    ms_per_standard: Option<u64>,
) -> (Node, Multiaddr) {
    let key = SecretKey::from_seed(&[seed; 32]);
    let ledger = Arc::new(Ledger::open(&dir.path().join("ledger"), key.public()).unwrap());
    let node = Node::start(NodeOptions {
        key,
        ledger,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            ..NetConfig::default()
        },
        provide: ms_per_standard.map(|ms| {
            let generator: Arc<dyn Generator> = Arc::new(SlowGenerator {
                step: Duration::from_millis(5),
            });
            (
                vec![generator],
                ProviderSettings {
                    advert_interval: pixmarket_node::provider::ADVERT_INTERVAL,
                    ack_deadline: pixmarket_node::provider::ACK_DEADLINE,
                    schedule: PriceSchedule::default(),
                    max_queue: 8,
                    max_batch: 1,
                    ms_per_standard_image: ms,
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

const FAST: u8 = 81;
const SLOW: u8 = 82;
const REQUESTER: u8 = 83;

fn peer(seed: u8) -> PeerId {
    SecretKey::from_seed(&[seed; 32]).public().to_peer_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimated_finish_picks_the_fast_provider_and_random_follows_its_seed() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // One standard image: 1 s on the fast provider, 100 s on the slow one.
    let (fast, fast_addr) = start_node(FAST, &dirs[0], vec![], Some(1_000)).await;
    let (slow, slow_addr) = start_node(SLOW, &dirs[1], vec![], Some(100_000)).await;
    let (requester, _) = start_node(REQUESTER, &dirs[2], vec![fast_addr, slow_addr], None).await;
    // Only the fast provider gives the requester credit: a job sent to the slow one is
    // refused, which shows which provider `generate` tried first.
    let note = DepositNote {
        deposit_id: [3; 16],
        account: SecretKey::from_seed(&[REQUESTER; 32]).public(),
        amount: MicroTokens::from_tokens(100).unwrap(),
        memo: "test deposit".into(),
        recorded_at_ms: pixmarket_node::now_ms(),
    };
    fast.ledger()
        .deposit(&Signed::sign(&SecretKey::from_seed(&[FAST; 32]), &note).unwrap())
        .unwrap();
    let client = requester.requester().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.providers().len() < 2 {
        assert!(Instant::now() < deadline, "both adverts within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Estimated finish: the fast one first, and it serves the job.
    let ranked: Vec<PeerId> = client
        .providers()
        .iter()
        .map(|e| e.key.to_peer_id())
        .collect();
    assert_eq!(ranked, vec![peer(FAST), peer(SLOW)]);
    let outcome = client
        .generate(
            job("the default policy"),
            GenerateOptions::default(),
            &mut |_| {},
        )
        .await
        .unwrap();
    assert_eq!((outcome.provider, outcome.attempts), (peer(FAST), 1));

    // Random: the same seed gives the same order; over seeds, each provider comes first.
    let order = |seed| -> Vec<PeerId> {
        client
            .ranked(Selection::Random { seed })
            .iter()
            .map(|e| e.key.to_peer_id())
            .collect()
    };
    let mut firsts = BTreeSet::new();
    let (mut slow_first, mut fast_first) = (None, None);
    for seed in 0..16u64 {
        let o = order(seed);
        assert_eq!(o, order(seed), "seed {seed} is not deterministic");
        assert_eq!(o.len(), 2);
        firsts.insert(o[0]);
        if o[0] == peer(SLOW) {
            slow_first.get_or_insert(seed);
        } else {
            fast_first.get_or_insert(seed);
        }
    }
    assert_eq!(firsts, BTreeSet::from([peer(FAST), peer(SLOW)]));
    let (slow_first, fast_first) = (slow_first.unwrap(), fast_first.unwrap());

    // `generate` follows the seed's order: the slow (uncredited) provider is tried first, and
    // `max_attempts` bounds how far it fails over (0 counts as 1).
    let random = |seed, max_attempts| GenerateOptions {
        selection: Selection::Random { seed },
        max_attempts,
        ..GenerateOptions::default()
    };
    for max_attempts in [0, 1] {
        let err = client
            .generate(
                job("only one try"),
                random(slow_first, max_attempts),
                &mut |_| {},
            )
            .await
            .unwrap_err();
        let GenerateError::AllFailed(reasons) = &err else {
            panic!("{err}");
        };
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].provider == peer(SLOW), "{reasons:?}");
    }
    let outcome = client
        .generate(job("two tries"), random(slow_first, 2), &mut |_| {})
        .await
        .unwrap();
    assert_eq!((outcome.provider, outcome.attempts), (peer(FAST), 2));
    let outcome = client
        .generate(job("fast first"), random(fast_first, 1), &mut |_| {})
        .await
        .unwrap();
    assert_eq!((outcome.provider, outcome.attempts), (peer(FAST), 1));

    requester.shutdown().await;
    fast.shutdown().await;
    slow.shutdown().await;
}
