//! The network figures of a run: connections per node, memory per node, advert propagation
//! and background traffic, computed from a [`NetworkRecord`].

use serde::{Deserialize, Serialize};

use super::summary::{Percentiles, count_f64, ms_f64, nearest_rank};
use crate::record::NetworkRecord;

/// Connections per node over a set of (node, sample) counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    /// How many counts the figures are over.
    pub samples: usize,
    /// Mean connections per node, 0 without samples.
    pub avg: f64,
    pub p50: Option<u64>,
    pub max: Option<u64>,
}

impl Connections {
    pub fn of(counts: impl IntoIterator<Item = u32>) -> Self {
        let mut v: Vec<u64> = counts.into_iter().map(u64::from).collect();
        v.sort_unstable();
        let sum: u64 = v.iter().sum();
        Self {
            samples: v.len(),
            avg: if v.is_empty() {
                0.0
            } else {
                ms_f64(sum) / count_f64(v.len())
            },
            p50: nearest_rank(&v, 50),
            max: v.last().copied(),
        }
    }
}

/// How many providers the requesters knew: the fewest, the median and the most.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub min: Option<u64>,
    pub p50: Option<u64>,
    pub max: Option<u64>,
}

impl Known {
    pub fn of(known: &[usize]) -> Self {
        let mut v: Vec<u64> = known
            .iter()
            .map(|&k| u64::try_from(k).unwrap_or(u64::MAX))
            .collect();
        v.sort_unstable();
        Self {
            min: v.first().copied(),
            p50: nearest_rank(&v, 50),
            max: v.last().copied(),
        }
    }
}

/// The numbers of [`NetworkRecord`], computed by [`summarize_network`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkSummary {
    pub nodes: usize,
    pub max_connections: u32,
    /// Over every sample taken while the plan ran (the final one included).
    pub connections: Connections,
    /// At the end, before any node stopped.
    pub final_connections: Connections,
    /// Wall milliseconds from an advert's date to a requester's table.
    pub advert_delay_ms: Percentiles,
    pub discovery_ms: u64,
    /// Providers known by the requester that knew fewest, the median one, and the one that
    /// knew most when set-up's wait ended, out of `discovery_providers`.
    #[serde(default)]
    pub discovery_known: Known,
    #[serde(default)]
    pub discovery_providers: usize,
    /// `(rss_after − rss_before) / nodes`, when both were read.
    pub memory_per_node_bytes: Option<u64>,
    pub advert_bytes: Option<u64>,
    /// Loopback bytes per node per wall second over the quiet window.
    pub background_bytes_per_node_per_s: Option<u64>,
    /// Loopback bytes per node per advert published in the quiet window: what one advert
    /// costs each node, gossip framing, duplicates and the rest of the background included.
    pub background_bytes_per_node_per_advert: Option<u64>,
    /// Adverts the whole market published per wall second while the plan ran.
    pub adverts_per_s_during_plan: f64,
}

/// Summarizes the network part of a run. Never panics; an empty record gives zeros.
pub fn summarize_network(n: &NetworkRecord) -> NetworkSummary {
    let nodes = u64::try_from(n.nodes).unwrap_or(u64::MAX);
    let per_node = |x: u64| x.checked_div(nodes);
    let quiet = n.quiet.as_ref();
    NetworkSummary {
        nodes: n.nodes,
        max_connections: n.max_connections,
        connections: Connections::of(
            n.connection_samples
                .iter()
                .flat_map(|s| s.counts.iter().copied()),
        ),
        final_connections: Connections::of(n.final_connections.iter().copied()),
        advert_delay_ms: Percentiles::of(n.advert_delay_ms.clone()),
        discovery_ms: n.discovery_ms,
        discovery_known: Known::of(&n.discovery_known),
        discovery_providers: n.discovery_providers,
        memory_per_node_bytes: n
            .rss_before_bytes
            .zip(n.rss_after_bytes)
            .and_then(|(b, a)| per_node(a.saturating_sub(b))),
        advert_bytes: n.advert_bytes,
        background_bytes_per_node_per_s: quiet
            .filter(|q| q.wall_ms > 0)
            .and_then(|q| per_node(q.loopback_bytes.saturating_mul(1000) / q.wall_ms)),
        background_bytes_per_node_per_advert: quiet
            .filter(|q| q.adverts_published > 0)
            .and_then(|q| per_node(q.loopback_bytes / q.adverts_published)),
        adverts_per_s_during_plan: if n.plan_wall_ms == 0 {
            0.0
        } else {
            ms_f64(n.adverts_during_plan) * 1000.0 / ms_f64(n.plan_wall_ms)
        },
    }
}
