//! A provider with several devices, over loopback with the tiny engine on CPU "devices" (one
//! engine, with its own copy of the weights, and one worker per device; real libp2p, real sled
//! ledgers on disk): jobs spread across the workers, which run at once; a device that fails
//! mid-job is isolated (its job voided with a signed void and charged nothing, never rerun,
//! the node serving on the others, the advert and the metrics shrinking); when the last one
//! fails, the jobs queued behind it are voided and new ones refused; both ledgers agree on
//! every charge, one receipt per delivered job.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::engine_generator::EngineGenerator;
use pixmarket_node::generator::{GenError, Generator, GeneratorInfo};
use pixmarket_node::network::NetConfig;
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::{GenerateError, GenerateOptions, Outcome};
use pixmarket_node::{Node, NodeOptions};
use pixmarket_protocol::{JobId, JobParams, MicroTokens, PriceSchedule, PublicKey, SecretKey};
use pixmarket_tests::{TestNode, small_job};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a device's first batch waits for the others to start theirs before it gives up
/// (and fails the test): the workers pick their first jobs within moments of each other.
const RENDEZVOUS_LIMIT: Duration = Duration::from_secs(60);

/// A count that the first batch of each device waits on until every device has one: the
/// batches then run at once, so the test shows the workers are parallel, not taking turns.
struct Rendezvous {
    arrived: Mutex<usize>,
    all: Condvar,
    of: usize,
}

impl Rendezvous {
    fn new(of: usize) -> Arc<Self> {
        Arc::new(Self {
            arrived: Mutex::new(0),
            all: Condvar::new(),
            of,
        })
    }

    /// True once `of` devices have arrived, false if they did not within the limit.
    fn arrive(&self) -> bool {
        let mut n = self.arrived.lock().unwrap();
        *n += 1;
        self.all.notify_all();
        let (n, timeout) = self
            .all
            .wait_timeout_while(n, RENDEZVOUS_LIMIT, |n| *n < self.of)
            .unwrap();
        !timeout.timed_out() && *n >= self.of
    }
}

/// One CPU "device": the tiny engine loaded for it alone, a count of its batches, its first
/// batch held at the rendezvous, and a failure on command that strikes after the batch's
/// first real step (mid-job, as an out-of-memory error would).
struct Device {
    engine: EngineGenerator,
    index: usize,
    batches: AtomicUsize,
    first: AtomicBool,
    rendezvous: Arc<Rendezvous>,
    fail_next: AtomicBool,
    /// When set, an injected failure waits for this gate after its first step (and says so on
    /// `failing`), so a test can queue jobs behind the dying batch.
    gate: Option<Arc<Rendezvous>>,
    failing: tokio::sync::Notify,
}

impl Generator for Device {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            device_name: format!("cpu worker {}", self.index),
            ..self.engine.info()
        }
    }

    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError> {
        self.engine.count_prompt_tokens(prompt)
    }

    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        if self.first.swap(false, Ordering::SeqCst) && !self.rendezvous.arrive() {
            return Err(GenError::Failed(format!(
                "device {}: the other devices never started a batch",
                self.index
            )));
        }
        if !self.fail_next.swap(false, Ordering::SeqCst) {
            return self.engine.generate(jobs, progress);
        }
        // One real step, reported to the requester, then the device dies.
        let mut stepped = false;
        let mut first_step = |step: u32, of: u32| {
            stepped = true;
            let _ = progress(step, of);
            ControlFlow::Break(())
        };
        let _ = self.engine.generate(jobs, &mut first_step);
        assert!(stepped, "the engine ran no step");
        if let Some(gate) = &self.gate {
            self.failing.notify_one();
            assert!(gate.arrive(), "the test never opened the gate");
        }
        Err(GenError::Failed(format!(
            "CUDA error: out of memory (injected on device {})",
            self.index
        )))
    }
}

/// `n` devices, each with its own copy of the tiny model, sharing one rendezvous.
fn devices(n: usize) -> Vec<Arc<Device>> {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    pixmarket_engine::tiny::ensure_tiny_model(&model).unwrap();
    let rendezvous = Rendezvous::new(n);
    (0..n)
        .map(|index| {
            Arc::new(Device {
                engine: EngineGenerator::load(&model, "f32", "cpu").unwrap(),
                index,
                batches: AtomicUsize::new(0),
                first: AtomicBool::new(true),
                rendezvous: rendezvous.clone(),
                fail_next: AtomicBool::new(false),
                gate: None,
                failing: tokio::sync::Notify::new(),
            })
        })
        .collect()
}

struct ProviderNode {
    node: Node,
    key: PublicKey,
    addr: Multiaddr,
    _dir: tempfile::TempDir,
}

/// A provider on 127.0.0.1 serving on `devices`, one job per batch, with metrics, giving
/// every new requester 1,000 tokens of credit.
async fn provider(seed: u8, devices: &[Arc<Device>]) -> ProviderNode {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::from_seed(&[seed; 32]);
    let public = key.public();
    let ledger = Arc::new(Ledger::open(&dir.path().join("ledger"), public).unwrap());
    ledger
        .set_default_credit(MicroTokens::from_tokens(1_000).unwrap())
        .unwrap();
    let generators: Vec<Arc<dyn Generator>> = devices
        .iter()
        .map(|d| d.clone() as Arc<dyn Generator>)
        .collect();
    let node = Node::start(NodeOptions {
        key,
        ledger,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            ..NetConfig::default()
        },
        provide: Some((
            generators,
            ProviderSettings {
                advert_interval: pixmarket_node::provider::ADVERT_INTERVAL,
                ack_deadline: pixmarket_node::provider::ACK_DEADLINE,
                schedule: PriceSchedule::default(),
                max_queue: 16,
                max_batch: 1,
                ms_per_standard_image: 60_000,
            },
        )),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
    })
    .await
    .unwrap();
    let addr = loop {
        if let Some(a) = node.addresses().await.unwrap().into_iter().next() {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ProviderNode {
        node,
        key: public,
        addr,
        _dir: dir,
    }
}

fn options(provider: PeerId) -> GenerateOptions {
    GenerateOptions {
        provider: Some(provider),
        idle_timeout: Duration::from_secs(30),
        ..GenerateOptions::default()
    }
}

/// Runs `prompts` as jobs at once from `requester`, each to `provider`.
async fn run_all(
    requester: &TestNode,
    provider: PeerId,
    prompts: Vec<String>,
) -> Vec<Result<Outcome, GenerateError>> {
    let mut set = tokio::task::JoinSet::new();
    for p in prompts {
        let client = requester.node.requester().clone();
        set.spawn(async move {
            client
                .generate(small_job(&p), options(provider), &mut |_| {})
                .await
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

fn job_of(o: &Outcome) -> JobId {
    o.receipt.verify().unwrap().job_id
}

/// Both ledgers hold exactly one receipt for each delivered job and none for any other, no
/// hold is left, and each side's total charge is the sum of what the requester paid.
fn books_agree(provider: &ProviderNode, requester: &TestNode, delivered: &[&Outcome]) {
    let paid: u64 = delivered.iter().map(|o| o.cost.0).sum();
    let jobs: BTreeSet<JobId> = delivered.iter().map(|o| job_of(o)).collect();
    assert_eq!(jobs.len(), delivered.len(), "a job id was delivered twice");
    for (ledger, role, peer) in [
        (provider.node.ledger(), Role::Provider, &requester.key),
        (requester.node.ledger(), Role::Requester, &provider.key),
    ] {
        let receipts: Vec<JobId> = ledger
            .receipts(Some(peer))
            .unwrap()
            .iter()
            .filter(|r| r.role == role)
            .map(|r| r.receipt.verify().unwrap().job_id)
            .collect();
        assert_eq!(
            receipts.iter().copied().collect::<BTreeSet<_>>(),
            jobs,
            "{role:?} receipts"
        );
        assert_eq!(
            receipts.len(),
            jobs.len(),
            "{role:?}: a job has two receipts"
        );
        // A requester that never paid this provider has no account with it.
        let (charged, held) = ledger
            .account(role, peer)
            .unwrap()
            .map_or((0, 0), |a| (a.charged.0, a.held.0));
        assert_eq!(charged, paid, "{role:?} charged");
        assert_eq!(held, 0, "{role:?} still holds");
        ledger.verify().unwrap();
    }
    assert!(provider.node.ledger().holds().unwrap().is_empty());
}

async fn metrics(node: &Node) -> String {
    let mut s = tokio::net::TcpStream::connect(node.metrics_addr().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// Waits (on the provider's adverts, as the requester hears them) until the provider
/// advertises `n` devices.
async fn advertised_devices(requester: &TestNode, provider: &PublicKey, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let heard = requester
            .node
            .requester()
            .providers()
            .into_iter()
            .find(|e| e.key == *provider)
            .map(|e| e.advert.devices.len());
        if heard == Some(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the advert lists {heard:?} devices, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_across_the_workers_and_each_is_charged_once() {
    let devs = devices(3);
    let provider = provider(61, &devs).await;
    let requester = TestNode::start(62, vec![provider.addr.clone()], None).await;
    advertised_devices(&requester, &provider.key, 3).await;

    let p = provider.key.to_peer_id();
    let results = run_all(
        &requester,
        p,
        (0..6).map(|i| format!("harbour {i}")).collect(),
    )
    .await;
    let delivered: Vec<&Outcome> = results.iter().map(|r| r.as_ref().unwrap()).collect();
    assert!(delivered.iter().all(|o| o.images.len() == 1));

    // Every device ran a batch (the first three met at the rendezvous, so they ran at once),
    // and no job ran twice: one batch of one job each.
    let batches: Vec<usize> = devs
        .iter()
        .map(|d| d.batches.load(Ordering::SeqCst))
        .collect();
    assert!(batches.iter().all(|&b| b >= 1), "{batches:?}");
    assert_eq!(batches.iter().sum::<usize>(), 6, "{batches:?}");
    books_agree(&provider, &requester, &delivered);

    let page = metrics(&provider.node).await;
    for d in 0..3 {
        assert!(
            page.contains(&format!("pixmarket_device_up{{device=\"{d}\"}} 1")),
            "{page}"
        );
        assert!(
            page.contains(&format!(
                "pixmarket_gpu_busy_milliseconds_total{{device=\"{d}\"}}"
            )),
            "{page}"
        );
        assert!(
            page.contains(&format!("pixmarket_step_seconds_count{{device=\"{d}\"}}")),
            "{page}"
        );
    }
    assert!(
        page.contains("pixmarket_device_memory_mib{device=\"2\",name=\"cpu worker 2\"}"),
        "{page}"
    );
    provider.node.shutdown().await;
    requester.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_device_is_isolated_and_its_job_costs_nothing() {
    let devs = devices(2);
    devs[1].fail_next.store(true, Ordering::SeqCst);
    let provider = provider(63, &devs).await;
    let requester = TestNode::start(64, vec![provider.addr.clone()], None).await;
    advertised_devices(&requester, &provider.key, 2).await;
    let p = provider.key.to_peer_id();

    // Two jobs at once: one on each device (they meet at the rendezvous); device 1 dies
    // after its job's first step.
    let first = run_all(&requester, p, vec!["quay A".into(), "quay B".into()]).await;
    let failed: Vec<&GenerateError> = first.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{first:?}");
    let why = failed[0].to_string();
    assert!(
        why.contains("out of memory (injected on device 1)"),
        "{why}"
    );
    let mut delivered: Vec<&Outcome> = first.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(delivered.len(), 1);

    // The advert shrinks to the device left, and the metrics say which one went down.
    advertised_devices(&requester, &provider.key, 1).await;
    let page = metrics(&provider.node).await;
    assert!(
        page.contains("pixmarket_device_up{device=\"1\"} 0"),
        "{page}"
    );
    assert!(
        page.contains("pixmarket_device_up{device=\"0\"} 1"),
        "{page}"
    );

    // The node keeps serving on device 0, and device 1 runs nothing more: the failed job was
    // voided, not rerun.
    let more = run_all(&requester, p, (0..4).map(|i| format!("pier {i}")).collect()).await;
    delivered.extend(more.iter().map(|r| r.as_ref().unwrap()));
    assert_eq!(devs[1].batches.load(Ordering::SeqCst), 1);
    assert_eq!(devs[0].batches.load(Ordering::SeqCst), 5);
    // One receipt per delivered job in both books, none for the failed one, no hold left.
    books_agree(&provider, &requester, &delivered);

    // The last device fails too: its job is voided, and the provider refuses new jobs (nothing
    // is held for them) until it restarts.
    devs[0].fail_next.store(true, Ordering::SeqCst);
    let last = run_all(&requester, p, vec!["the last ferry".into()]).await;
    let why = last[0].as_ref().unwrap_err().to_string();
    assert!(why.contains("injected on device 0"), "{why}");
    let refused = run_all(&requester, p, vec!["after the storm".into()]).await;
    let why = refused[0].as_ref().unwrap_err().to_string();
    assert!(
        why.contains("every device of this provider has failed"),
        "{why}"
    );
    assert_eq!(devs[0].batches.load(Ordering::SeqCst), 6);
    books_agree(&provider, &requester, &delivered);
    provider.node.shutdown().await;
    requester.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_last_device_fails_the_jobs_queued_behind_it_are_voided() {
    // One device, whose first batch dies after its first step, once the test has queued two
    // more jobs behind it.
    let gate = Rendezvous::new(2);
    let mut one = devices(1);
    let dev = Arc::get_mut(&mut one[0]).unwrap();
    dev.gate = Some(gate.clone());
    dev.fail_next.store(true, Ordering::SeqCst);
    let provider = provider(65, &one).await;
    let requester = TestNode::start(66, vec![provider.addr.clone()], None).await;
    advertised_devices(&requester, &provider.key, 1).await;
    let p = provider.key.to_peer_id();

    let client = requester.node.requester().clone();
    let dying = tokio::spawn(async move {
        client
            .generate(small_job("the dying batch"), options(p), &mut |_| {})
            .await
    });
    one[0].failing.notified().await;
    // Two jobs accepted into the queue behind it (each says so with a queue position).
    let (queued_tx, mut queued_rx) = tokio::sync::mpsc::channel(8);
    let mut behind = tokio::task::JoinSet::new();
    for prompt in ["behind one", "behind two"] {
        let client = requester.node.requester().clone();
        let tx = queued_tx.clone();
        behind.spawn(async move {
            client
                .generate(small_job(prompt), options(p), &mut |e| {
                    if matches!(e, pixmarket_node::requester::JobProgress::Queued { .. }) {
                        let _ = tx.try_send(());
                    }
                })
                .await
        });
    }
    for _ in 0..2 {
        queued_rx.recv().await.unwrap();
    }
    assert!(gate.arrive(), "the device never reached the gate");

    let why = dying.await.unwrap().unwrap_err().to_string();
    assert!(why.contains("injected on device 0"), "{why}");
    while let Some(r) = behind.join_next().await {
        let why = r.unwrap().unwrap_err().to_string();
        // Accepted, then voided (a refusal would say "refused"): nothing was charged.
        assert!(
            why.contains("failed: generation failed: every device of this provider has failed"),
            "{why}"
        );
    }
    assert_eq!(one[0].batches.load(Ordering::SeqCst), 1);
    books_agree(&provider, &requester, &[]);
    provider.node.shutdown().await;
    requester.node.shutdown().await;
}
