//! Sampling the market's network while the plan runs: every node's established connections,
//! how long adverts take from their provider to each requester's table, the process's memory,
//! and the loopback traffic of a quiet window.
//!
//! Data flow: [`Sampler::start`] spawns one task that, every [`SAMPLE_INTERVAL`] of wall time,
//! asks each running node's swarm for its connection count and reads each requester's provider
//! table; [`Sampler::finish`] takes a last sample and hands back a [`NetworkRecord`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use pixmarket_node::network::Client;
use pixmarket_node::requester::Requester;
use pixmarket_protocol::Signed;
use tokio::sync::watch;

use super::market::{Market, ProviderSlot, derived_key};
use crate::record::{ConnectionSample, NetworkRecord, QuietWindow};
use crate::sim::ModelClock;

/// Wall time between samples: adverts go out every few seconds, so a second sees most of them
/// while the sampler's load (one command per node, one table read per requester) stays small
/// next to the market's.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Connection samples kept; past it the sampler stops adding (an hour of samples at one per
/// second, about 4 MiB for 300 nodes).
pub const MAX_CONNECTION_SAMPLES: usize = 3600;
/// Advert delays kept; past it new ones are not recorded (a 300-node market with 60
/// requesters sees about 1,800 a second at a 10 s advert interval: several minutes' worth).
pub const MAX_ADVERT_DELAYS: usize = 1_000_000;

/// Resident memory of this process now (`VmRSS` on Linux), if the OS reports it.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Received bytes and packets of the loopback interface (`/proc/net/dev`), if the OS reports
/// them.
pub fn loopback_counters() -> Option<(u64, u64)> {
    let dev = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    let (_, fields) = line.split_once(':')?;
    let mut f = fields.split_whitespace();
    let bytes = f.next()?.parse().ok()?;
    let packets = f.next()?.parse().ok()?;
    Some((bytes, packets))
}

/// What the sampler reads each time.
#[derive(Clone)]
struct Nodes {
    providers: Vec<Arc<tokio::sync::Mutex<ProviderSlot>>>,
    requesters: Vec<(Client, Requester)>,
}

impl Nodes {
    fn of(market: &Market) -> Self {
        Self {
            providers: market.providers.clone(),
            requesters: market
                .requesters
                .iter()
                .map(|(_, _, n)| (n.client().clone(), n.requester().clone()))
                .collect(),
        }
    }

    /// Each running node's established connections (a provider that is down is skipped).
    async fn connections(&self) -> Vec<u32> {
        let mut clients = Vec::with_capacity(self.providers.len() + self.requesters.len());
        for slot in &self.providers {
            if let Some(node) = &slot.lock().await.node {
                clients.push(node.client().clone());
            }
        }
        clients.extend(self.requesters.iter().map(|(c, _)| c.clone()));
        let mut counts = Vec::with_capacity(clients.len());
        for c in clients {
            if let Ok(n) = c.connection_count().await {
                counts.push(n);
            }
        }
        counts
    }

    /// The latest advert sequence number requester `r` holds of each provider.
    fn seqs(&self, r: usize) -> BTreeMap<PeerId, u64> {
        self.requesters.get(r).map_or_else(BTreeMap::new, |(_, q)| {
            q.providers()
                .into_iter()
                .map(|e| (e.key.to_peer_id(), e.advert.seq))
                .collect()
        })
    }
}

/// Everything sampled so far.
#[derive(Default)]
struct Samples {
    connections: Vec<ConnectionSample>,
    /// Requester, provider, advert sequence → delay; a BTreeMap so each advert counts once.
    delays: BTreeMap<(usize, PeerId, u64), u64>,
}

/// The running sampler.
pub(super) struct Sampler {
    nodes: Nodes,
    samples: Arc<Mutex<Samples>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    clock: ModelClock,
    t0: u64,
    record: NetworkRecord,
    started: Instant,
    seqs_at_start: BTreeMap<PeerId, u64>,
}

fn lock(s: &Mutex<Samples>) -> std::sync::MutexGuard<'_, Samples> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn sample_once(nodes: &Nodes, samples: &Mutex<Samples>, clock: ModelClock, t0: u64) {
    let counts = nodes.connections().await;
    let mut fresh = Vec::new();
    for (r, (_, q)) in nodes.requesters.iter().enumerate() {
        for e in q.providers() {
            let delay = e.heard_at_ms.saturating_sub(e.advert.issued_at_ms);
            fresh.push(((r, e.key.to_peer_id(), e.advert.seq), delay));
        }
    }
    let mut s = lock(samples);
    if s.connections.len() < MAX_CONNECTION_SAMPLES {
        s.connections.push(ConnectionSample {
            at_ms: clock.now_ms().saturating_sub(t0),
            counts,
        });
    }
    for (k, d) in fresh {
        if s.delays.len() >= MAX_ADVERT_DELAYS {
            break;
        }
        s.delays.entry(k).or_insert(d);
    }
}

impl Sampler {
    /// Starts sampling `market` at model time `t0`. `record` carries what set-up measured
    /// (memory, discovery time, the quiet window); `max_connections` is each node's bound.
    pub(super) fn start(market: &Market, t0: u64, record: NetworkRecord) -> Self {
        let nodes = Nodes::of(market);
        let seqs_at_start = nodes.seqs(0);
        let samples: Arc<Mutex<Samples>> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let clock = market.clock;
        let task = tokio::spawn({
            let (nodes, samples) = (nodes.clone(), samples.clone());
            async move {
                loop {
                    sample_once(&nodes, &samples, clock, t0).await;
                    tokio::select! {
                        _ = stopped.changed() => return,
                        () = tokio::time::sleep(SAMPLE_INTERVAL) => {}
                    }
                }
            }
        });
        Self {
            nodes,
            samples,
            stop,
            task,
            clock,
            t0,
            record,
            started: Instant::now(),
            seqs_at_start,
        }
    }

    /// Stops sampling, takes the final sample (every node still running) and returns the record.
    pub(super) async fn finish(self) -> NetworkRecord {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        sample_once(&self.nodes, &self.samples, self.clock, self.t0).await;
        let final_connections = self.nodes.connections().await;
        let s = std::mem::take(&mut *lock(&self.samples));
        NetworkRecord {
            adverts_during_plan: published(&self.seqs_at_start, &self.nodes.seqs(0)),
            plan_wall_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            connection_samples: s.connections,
            final_connections,
            advert_delay_ms: s.delays.into_values().collect(),
            ..self.record
        }
    }
}

/// Adverts published between two readings of one requester's table, from the providers'
/// sequence numbers (a provider first heard in the second reading counts from there).
fn published(before: &BTreeMap<PeerId, u64>, after: &BTreeMap<PeerId, u64>) -> u64 {
    after
        .iter()
        .map(|(p, s)| s.saturating_sub(before.get(p).copied().unwrap_or(*s)))
        .sum()
}

/// Set-up's part of the record: memory before and after, discovery time, advert size, and the
/// traffic of a quiet window of `quiet` wall time (none when zero).
pub(super) async fn measure_setup(
    market: &Market,
    rss_before_bytes: Option<u64>,
    discovery: Duration,
    quiet: Duration,
    max_connections: u32,
) -> NetworkRecord {
    let nodes = Nodes::of(market);
    let advert_bytes = nodes.requesters.first().and_then(|(_, q)| {
        let entry = q.providers().into_iter().next()?;
        let index = market.provider_keys.iter().position(|k| *k == entry.key)?;
        let key = derived_key(market.seed, "provider", index);
        let bytes = Signed::sign(&key, &entry.advert).ok()?.to_bytes().ok()?;
        u64::try_from(bytes.len()).ok()
    });
    let quiet = if quiet.is_zero() {
        None
    } else {
        let seqs_before = nodes.seqs(0);
        let start = Instant::now();
        let before = loopback_counters();
        tokio::time::sleep(quiet).await;
        let after = loopback_counters();
        let wall = start.elapsed();
        let seqs_after = nodes.seqs(0);
        let adverts_published = published(&seqs_before, &seqs_after);
        match (before, after) {
            (Some((b0, p0)), Some((b1, p1))) => Some(QuietWindow {
                wall_ms: u64::try_from(wall.as_millis()).unwrap_or(u64::MAX),
                loopback_bytes: b1.saturating_sub(b0),
                loopback_packets: p1.saturating_sub(p0),
                adverts_published,
            }),
            _ => None,
        }
    };
    NetworkRecord {
        nodes: market.providers.len() + market.requesters.len(),
        max_connections,
        discovery_ms: u64::try_from(discovery.as_millis()).unwrap_or(u64::MAX),
        discovery_known: market.discovery_known.clone(),
        discovery_providers: market.advertisers,
        rss_before_bytes,
        rss_after_bytes: rss_bytes(),
        advert_bytes,
        quiet,
        ..NetworkRecord::default()
    }
}
