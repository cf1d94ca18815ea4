//! What hostile peers cost a provider, measured on this machine with real nodes on loopback
//! (real libp2p, real sled, the tiny engine on CPU):
//!
//! - `memory`: the provider's resident memory (VmRSS sampled, and VmHWM, from /proc) while
//!   hogs, from 1 and then from 50 peers, hold every stream and connection the limits allow
//!   with stalled frames of the largest declared length; the hogs run in a child process, so
//!   the figures are the provider's (and its requester's) alone. Honest jobs run meanwhile.
//! - `flood`: an honest requester's job latency without and then with a flooder (in a child
//!   process) sending quotes, jobs and events at line rate; median, p99 and their ratio.
//!
//! `pixmarket-hostile-bench memory|flood [--jobs N]`; `hog` and `flooder` are the child roles.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use pixmarket_ledger::Ledger;
use pixmarket_node::engine_generator::EngineGenerator;
use pixmarket_node::generator::Generator;
use pixmarket_node::network::NetConfig;
use pixmarket_node::provider::{ADVERT_INTERVAL, ProviderSettings};
use pixmarket_node::requester::GenerateOptions;
use pixmarket_node::{Node, NodeOptions, now_ms};
use pixmarket_protocol::{
    DepositNote, JobId, MicroTokens, PriceSchedule, PublicKey, SecretKey, Signed,
};
use pixmarket_testnet::adversary::{Adversary, AdversaryKind, Tally, small_job};
use pixmarket_testnet::hostile::{HOG_CONNECTIONS, HOG_STREAMS, hog_round};

const USAGE: &str = "usage: pixmarket-hostile-bench memory|flood [--jobs N]";
/// Honest jobs per phase unless `--jobs` says otherwise.
const DEFAULT_JOBS: usize = 20;
/// What the flooder prints on its first line once it attacks.
const FLOODING: &str = "flooding";
/// How often the provider's resident memory is sampled while a hog holds its streams.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("{line:?} has no number"))?;
    Ok(kib.parse()?)
}

/// Resets VmHWM to the current VmRSS (Linux's `clear_refs` value 5).
fn reset_peak() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

struct Market {
    provider: Node,
    provider_key: PublicKey,
    provider_addr: Multiaddr,
    requester: Node,
    folder: PathBuf,
}

async fn first_address(node: &Node) -> anyhow::Result<Multiaddr> {
    for _ in 0..500 {
        if let Some(a) = node.addresses().await?.into_iter().next() {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("a node did not start listening within 5 s")
}

async fn start_market(folder: &Path) -> anyhow::Result<Market> {
    let model = folder.join("tiny");
    pixmarket_engine::tiny::ensure_tiny_model(&model)?;
    let generator: Arc<dyn Generator> = Arc::new(
        EngineGenerator::load(&model, "f32", "cpu")
            .map_err(|e| anyhow::anyhow!("cannot load the tiny model: {e}"))?,
    );
    let loopback: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
    let net = |bootstrap| NetConfig {
        listen: vec![loopback.clone()],
        bootstrap,
        ..NetConfig::default()
    };
    let provider_key = key(1).public();
    let provider = Node::start(NodeOptions {
        key: key(1),
        ledger: Arc::new(Ledger::open(&folder.join("provider"), provider_key)?),
        net: net(vec![]),
        provide: Some((
            vec![generator],
            ProviderSettings {
                advert_interval: ADVERT_INTERVAL,
                ack_deadline: Duration::from_secs(60),
                schedule: PriceSchedule::default(),
                max_queue: 8,
                max_batch: 1,
                ms_per_standard_image: 60_000,
            },
        )),
        metrics: None,
    })
    .await?;
    let provider_addr = first_address(&provider).await?;
    let requester_key = key(2).public();
    let requester = Node::start(NodeOptions {
        key: key(2),
        ledger: Arc::new(Ledger::open(&folder.join("requester"), requester_key)?),
        net: net(vec![provider_addr.clone()]),
        provide: None,
        metrics: None,
    })
    .await?;
    let note = DepositNote {
        deposit_id: JobId::random().0,
        account: requester_key,
        amount: MicroTokens::from_tokens(1_000_000).context("deposit")?,
        memo: "bench".into(),
        recorded_at_ms: now_ms(),
    };
    provider.ledger().deposit(&Signed::sign(&key(1), &note)?)?;
    Ok(Market {
        provider,
        provider_key,
        provider_addr,
        requester,
        folder: folder.to_owned(),
    })
}

impl Market {
    /// One honest job at the provider; its latency, submission to images.
    async fn job(&self, i: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.requester
            .requester()
            .generate(
                small_job(&format!("an honest job {i}")),
                GenerateOptions {
                    provider: Some(self.provider_key.to_peer_id()),
                    ..GenerateOptions::default()
                },
                &mut |_| {},
            )
            .await?;
        Ok(started.elapsed())
    }

    async fn shutdown(self) {
        self.requester.shutdown().await;
        self.provider.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

/// Starts this binary again in `role` against the provider at `addr`.
fn child(role: &str, addr: &Multiaddr, peers: usize) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args([role, &addr.to_string(), &peers.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {role}"))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted.get(i).copied().unwrap_or_default()
}

async fn memory(jobs: usize) -> anyhow::Result<()> {
    let folder =
        std::env::temp_dir().join(format!("pixmarket-hostile-bench-{}", std::process::id()));
    let market = start_market(&folder).await?;
    // Warm: the engine has run, the connection is up, every lazy allocation made.
    for i in 0..3 {
        market.job(i).await?;
    }
    for peers in [1usize, 50] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let base = status_kib("VmRSS:")?;
        reset_peak()?;
        let mut hogs = child("hog", &market.provider_addr, peers)?;
        let streams = peers * HOG_STREAMS * usize::try_from(HOG_CONNECTIONS)?;
        // The hogs' connections come up, then the honest jobs run while they hold.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let peak = Arc::new(AtomicU64::new(base));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(kib) = status_kib("VmRSS:") {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(SAMPLE_EVERY).await;
                }
            })
        };
        let mut latencies = Vec::new();
        for i in 0..jobs {
            if let Ok(d) = market.job(100 + i).await {
                latencies.push(d);
            }
        }
        let done = latencies.len();
        // Sample until the hogs let go.
        while hogs.try_wait()?.is_none() {
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        sampler.abort();
        let peak = peak.load(Ordering::Relaxed);
        let hwm = status_kib("VmHWM:")?;
        let out = std::io::read_to_string(hogs.stdout.take().context("hog output")?)?;
        latencies.sort();
        println!(
            "memory, hogs from {peers} peer(s) ({streams} streams declared at the largest length): \
             VmRSS before {}, peak sampled {}, VmHWM {}, growth {}; honest jobs {done}/{jobs} \
             completed, median {:?}; hogs: {}",
            mib(base),
            mib(peak),
            mib(hwm),
            mib(hwm.max(peak).saturating_sub(base)),
            percentile(&latencies, 50),
            out.trim()
        );
    }
    market.shutdown().await;
    Ok(())
}

async fn flood(jobs: usize) -> anyhow::Result<()> {
    let folder =
        std::env::temp_dir().join(format!("pixmarket-hostile-bench-{}", std::process::id()));
    let market = start_market(&folder).await?;
    for i in 0..3 {
        market.job(i).await?;
    }
    let mut quiet = Vec::with_capacity(jobs);
    let mut flooded = Vec::with_capacity(jobs);
    // Alternating blocks, so drift of the machine falls on both sides alike.
    for block in 0..2 {
        for i in 0..jobs / 2 {
            quiet.push(market.job(1_000 * block + i).await?);
        }
        let mut flooder = child("flooder", &market.provider_addr, 1)?;
        // The flooder says when its first round is under way (loading its model takes a while).
        let mut out = std::io::BufReader::new(flooder.stdout.take().context("flooder output")?);
        let mut ready = String::new();
        tokio::task::block_in_place(|| std::io::BufRead::read_line(&mut out, &mut ready))?;
        if ready.trim() != FLOODING {
            bail!("the flooder did not start: {ready:?}");
        }
        for i in 0..jobs / 2 {
            flooded.push(market.job(1_000 * block + 500 + i).await?);
        }
        drop(flooder.stdin.take());
        let tally = tokio::task::block_in_place(|| std::io::read_to_string(out))?;
        let _ = flooder.wait();
        println!("flooder: {}", tally.trim());
    }
    quiet.sort();
    flooded.sort();
    let (q50, q99) = (percentile(&quiet, 50), percentile(&quiet, 99));
    let (f50, f99) = (percentile(&flooded, 50), percentile(&flooded, 99));
    println!(
        "honest job latency, {} jobs each: without a flood median {q50:?} p99 {q99:?}; \
         under a flood median {f50:?} p99 {f99:?}; p99 ratio {:.2}, median ratio {:.2}",
        quiet.len(),
        f99.as_secs_f64() / q99.as_secs_f64().max(f64::MIN_POSITIVE),
        f50.as_secs_f64() / q50.as_secs_f64().max(f64::MIN_POSITIVE),
    );
    market.shutdown().await;
    Ok(())
}

/// The child: `peers` hogs, each its own key, one round each at once; prints their tally.
async fn hog(addr: Multiaddr, peers: usize) -> anyhow::Result<()> {
    let tally = Tally::default();
    let rounds = (0..peers).map(|i| {
        let key = key(u8::try_from(10 + i % 200).unwrap_or(10));
        let (addr, tally) = (addr.clone(), &tally);
        async move { hog_round(&key, &addr, tally).await }
    });
    for r in futures::future::join_all(rounds).await {
        r?;
    }
    let r = tally.record("hogs", "hog");
    println!("{} streams, {}", r.attempts, r.detail);
    Ok(())
}

/// The child: one flooder attacking until its parent closes its stdin.
async fn flooder(addr: Multiaddr) -> anyhow::Result<()> {
    let Some(Protocol::P2p(peer)) = addr.iter().last() else {
        bail!("{addr} does not end in /p2p/<peer id>")
    };
    let target = PublicKey::from_peer_id(&peer)?;
    let model =
        std::env::temp_dir().join(format!("pixmarket-hostile-flooder-{}", std::process::id()));
    pixmarket_engine::tiny::ensure_tiny_model(&model)?;
    let generator: Arc<dyn Generator> = Arc::new(
        EngineGenerator::load(&model, "f32", "cpu")
            .map_err(|e| anyhow::anyhow!("cannot load the tiny model: {e}"))?,
    );
    let a = Arc::new(
        Adversary::start(
            AdversaryKind::Flooder,
            "flooder".into(),
            key(9),
            vec![addr],
            generator,
        )
        .await?,
    );
    println!("{FLOODING}");
    let attack = {
        let a = a.clone();
        tokio::spawn(async move {
            loop {
                if a.attack(target, 1).await.is_err() {
                    return;
                }
            }
        })
    };
    // The parent closes our stdin (or kills us) when the flood should stop.
    let _ = tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin())).await;
    attack.abort();
    let r = a.record();
    println!(
        "{} requests, {} refused: {}",
        r.attempts, r.refused, r.detail
    );
    let _ = std::fs::remove_dir_all(&model);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let jobs = match args.iter().position(|a| a == "--jobs") {
        Some(i) => args
            .get(i + 1)
            .context(USAGE)?
            .parse()
            .context("--jobs takes a number")?,
        None => DEFAULT_JOBS,
    };
    match args.first().map(String::as_str) {
        Some("memory") => memory(jobs).await,
        Some("flood") => flood(jobs).await,
        Some("hog") => {
            let addr: Multiaddr = args.get(1).context(USAGE)?.parse()?;
            let peers: usize = args.get(2).context(USAGE)?.parse()?;
            hog(addr, peers).await
        }
        Some("flooder") => {
            let addr: Multiaddr = args.get(1).context(USAGE)?.parse()?;
            flooder(addr).await
        }
        _ => bail!(USAGE),
    }
}
