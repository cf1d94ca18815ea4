//! The numbers of a run: [`Summary`] and its percentiles, and the busy-time arithmetic the
//! table and the chart share (buckets, merged intervals, exact integer-to-float conversion).

use serde::{Deserialize, Serialize};

use super::network::{NetworkSummary, summarize_network};
use super::text::tokens;
use crate::record::{JobOutcome, RunRecord};

/// Nearest-rank percentiles of a list of model-time milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    /// How many samples the percentiles are over.
    pub samples: usize,
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
}

impl Percentiles {
    /// Percentiles of `samples` (any order); all `None` when there are none.
    pub fn of(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Self {
            samples: samples.len(),
            p50: nearest_rank(&samples, 50),
            p95: nearest_rank(&samples, 95),
            p99: nearest_rank(&samples, 99),
        }
    }
}

/// One provider's share of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderSummary {
    pub index: usize,
    pub name: String,
    pub gpu: String,
    pub price_factor_ppm: u64,
    /// Completed jobs it was paid for.
    pub jobs_served: usize,
    /// Its devices.
    #[serde(default = "one")]
    pub gpus: u32,
    /// Model-time milliseconds its devices were busy, summed over them (each device's
    /// overlaps merged, clipped to the run).
    pub busy_ms: u64,
    /// `busy_ms / (gpus × duration_ms)`, 0 when the run has no duration.
    pub utilization: f64,
    /// Micro-tokens requesters paid it for completed jobs.
    pub earned_micros: u64,
}

/// The numbers of one run, computed by [`summarize`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub jobs_submitted: usize,
    pub jobs_completed: usize,
    pub jobs_failed: usize,
    /// Jobs for which [`crate::record::JobRecord::retried`] holds.
    pub jobs_retried: usize,
    /// Completed jobs whose images came only when asked again after the fetch deadline.
    #[serde(default)]
    pub jobs_delivered_late: usize,
    /// Completed jobs that finished within the plan (`finished_ms ≤ plan_ms`): what a market
    /// under this load delivers, not counting the drain after the last submission.
    #[serde(default)]
    pub completed_in_plan: usize,
    /// `completed_in_plan` per model-time hour of the plan, 0 without a plan length.
    #[serde(default)]
    pub jobs_per_hour: f64,
    /// Finished − submitted, over completed jobs with a finish time.
    pub latency_ms: Percentiles,
    /// Started − submitted, over jobs that started.
    pub wait_ms: Percentiles,
    /// Busy time of all providers together, model-time milliseconds.
    pub fleet_busy_ms: u64,
    /// `fleet_busy_ms / (devices × duration_ms)` over every provider's devices, 0 when there
    /// are no providers or no duration.
    pub fleet_utilization: f64,
    pub providers: Vec<ProviderSummary>,
    /// Sum of what requesters paid for completed jobs, micro-tokens.
    pub tokens_moved_micros: u64,
    /// `tokens_moved_micros` as tokens with six decimals.
    pub tokens_moved: String,
    /// One line per adversary: what it tried and what it got.
    pub adversaries: Vec<String>,
    pub faults: usize,
    /// [`crate::record::BooksCheck::ok`].
    pub books_ok: bool,
    /// Connections, memory and advert propagation.
    #[serde(default)]
    pub network: NetworkSummary,
}

/// The nearest-rank percentile of an ascending list: the smallest sample such that at least
/// `pct` percent of the samples are at or below it, i.e. `sorted[ceil(pct/100 × n) − 1]` with
/// the rank clamped to `1..=n` (so `pct` 0 gives the minimum and 100 or more the maximum).
/// `None` when the list is empty. The result is always one of the samples.
pub fn nearest_rank(sorted_ascending: &[u64], pct: u64) -> Option<u64> {
    let n = u128::try_from(sorted_ascending.len()).ok()?;
    if n == 0 {
        return None;
    }
    let rank = (u128::from(pct) * n).div_ceil(100).clamp(1, n);
    let index = usize::try_from(rank - 1).ok()?;
    sorted_ascending.get(index).copied()
}

/// Summarizes one run. Never panics: an empty run gives zeros and `None` percentiles.
pub fn summarize(record: &RunRecord) -> Summary {
    let completed = |o: &JobOutcome| matches!(o, JobOutcome::Completed);
    let jobs_completed = record.jobs.iter().filter(|j| completed(&j.outcome)).count();
    let latency = record
        .jobs
        .iter()
        .filter(|j| completed(&j.outcome))
        .filter_map(|j| j.finished_ms.map(|f| f.saturating_sub(j.submitted_ms)))
        .collect();
    let wait = record
        .jobs
        .iter()
        .filter_map(|j| j.started_ms.map(|s| s.saturating_sub(j.submitted_ms)))
        .collect();

    let busy = busy_by_provider(record);
    let duration = record.duration_ms;
    let mut providers: Vec<ProviderSummary> = record
        .providers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let busy_ms = busy.get(i).map_or(0, |iv| {
                iv.iter()
                    .fold(0u64, |acc, (s, e)| acc.saturating_add(e - s))
            });
            ProviderSummary {
                index: i,
                name: p.name.clone(),
                gpu: p.gpu.clone(),
                gpus: p.gpus.max(1),
                price_factor_ppm: p.price_factor_ppm,
                jobs_served: 0,
                busy_ms,
                utilization: ratio(busy_ms, duration.saturating_mul(u64::from(p.gpus.max(1)))),
                earned_micros: 0,
            }
        })
        .collect();
    let mut tokens_moved_micros = 0u64;
    for job in record.jobs.iter().filter(|j| completed(&j.outcome)) {
        tokens_moved_micros = tokens_moved_micros.saturating_add(job.cost_micros);
        if let Some(p) = job.provider.and_then(|p| providers.get_mut(p)) {
            p.jobs_served += 1;
            p.earned_micros = p.earned_micros.saturating_add(job.cost_micros);
        }
    }
    let fleet_busy_ms = providers
        .iter()
        .fold(0u64, |acc, p| acc.saturating_add(p.busy_ms));
    let capacity = providers
        .iter()
        .fold(0u64, |acc, p| acc.saturating_add(u64::from(p.gpus)))
        .saturating_mul(duration);

    let completed_in_plan = record
        .jobs
        .iter()
        .filter(|j| completed(&j.outcome) && j.finished_ms.is_some_and(|f| f <= record.plan_ms))
        .count();
    Summary {
        jobs_submitted: record.jobs.len(),
        jobs_completed,
        jobs_failed: record.jobs.len() - jobs_completed,
        jobs_retried: record.jobs.iter().filter(|j| j.retried()).count(),
        jobs_delivered_late: record.jobs.iter().filter(|j| j.delivered_late).count(),
        completed_in_plan,
        jobs_per_hour: if record.plan_ms == 0 {
            0.0
        } else {
            count_f64(completed_in_plan) * 3_600_000.0 / ms_f64(record.plan_ms)
        },
        latency_ms: Percentiles::of(latency),
        wait_ms: Percentiles::of(wait),
        fleet_busy_ms,
        fleet_utilization: ratio(fleet_busy_ms, capacity),
        providers,
        tokens_moved_micros,
        tokens_moved: tokens(tokens_moved_micros),
        adversaries: record
            .adversaries
            .iter()
            .map(|a| {
                format!(
                    "{} ({}): attempts {}, refused {}, gained {} tokens, images received {}, \
                     charged {} tokens{}",
                    a.name,
                    a.kind,
                    a.attempts,
                    a.refused,
                    tokens(a.gained_micros),
                    a.images_received,
                    tokens(a.charged_micros),
                    if a.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" — {}", a.detail)
                    }
                )
            })
            .collect(),
        faults: record.faults.len(),
        books_ok: record.books.ok(),
        network: summarize_network(&record.network),
    }
}

/// Per provider (in `record.providers` order), the busy fraction of each of `buckets` equal
/// model-time buckets over `[0, duration_ms]`. Bucket `i` is `[D·i/n, D·(i+1)/n)` in integer
/// milliseconds; a bucket of zero length (a run shorter than `buckets` ms) reads 0.
pub fn utilization_series(record: &RunRecord, buckets: usize) -> Vec<Vec<f64>> {
    let bounds = bucket_bounds(record.duration_ms, buckets);
    busy_by_provider(record)
        .iter()
        .zip(&record.providers)
        .map(|(intervals, p)| {
            let gpus = u64::from(p.gpus.max(1));
            bounds
                .windows(2)
                .map(|w| {
                    let (b0, b1) = (w[0], w[1]);
                    let overlap = intervals.iter().fold(0u64, |acc, &(s, e)| {
                        acc.saturating_add(e.min(b1).saturating_sub(s.max(b0)))
                    });
                    ratio(overlap, (b1 - b0).saturating_mul(gpus))
                })
                .collect()
        })
        .collect()
}

/// Per provider, its busy intervals clipped to `[0, duration_ms]`, and per device sorted and
/// merged so none of one device overlap (two devices' intervals do: they ran side by side).
/// Intervals naming no provider of the record, or empty after clipping, are dropped.
pub(super) fn busy_by_provider(record: &RunRecord) -> Vec<Vec<(u64, u64)>> {
    let d = record.duration_ms;
    let mut raw: Vec<std::collections::BTreeMap<usize, Vec<(u64, u64)>>> =
        vec![std::collections::BTreeMap::new(); record.providers.len()];
    for b in &record.busy {
        let (s, e) = (b.start_ms.min(d), b.end_ms.min(d));
        if let Some(devices) = raw.get_mut(b.provider).filter(|_| e > s) {
            devices.entry(b.device).or_default().push((s, e));
        }
    }
    raw.into_iter()
        .map(|devices| {
            let mut all = Vec::new();
            for (_, mut list) in devices {
                list.sort_unstable();
                let mut merged: Vec<(u64, u64)> = Vec::with_capacity(list.len());
                for &(s, e) in &list {
                    match merged.last_mut() {
                        Some(last) if s <= last.1 => last.1 = last.1.max(e),
                        _ => merged.push((s, e)),
                    }
                }
                all.extend(merged);
            }
            all
        })
        .collect()
}

/// Summaries written before providers had several devices had one each.
pub(super) fn one() -> u32 {
    1
}

/// `buckets + 1` integer boundaries `D·i/n` (empty when `buckets` is 0).
pub(super) fn bucket_bounds(duration_ms: u64, buckets: usize) -> Vec<u64> {
    let Ok(n) = u128::try_from(buckets) else {
        return Vec::new();
    };
    if n == 0 {
        return Vec::new();
    }
    (0..=n)
        .map(|i| u64::try_from(u128::from(duration_ms) * i / n).unwrap_or(duration_ms))
        .collect()
}

/// The bucket holding time `t` (times past the end go to the last bucket).
pub(super) fn bucket_of(bounds: &[u64], t: u64) -> usize {
    let starts = &bounds[..bounds.len().saturating_sub(1)];
    starts.partition_point(|&b| b <= t).saturating_sub(1)
}

/// `num / den`, 0 when `den` is 0.
pub(super) fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        ms_f64(num) / ms_f64(den)
    }
}

/// A `u64` as `f64` without an `as` cast (exact below 2^53, nearest above).
pub(super) fn ms_f64(v: u64) -> f64 {
    let hi = u32::try_from(v >> 32).unwrap_or(u32::MAX);
    let lo = u32::try_from(v & 0xFFFF_FFFF).unwrap_or(u32::MAX);
    f64::from(hi) * 4_294_967_296.0 + f64::from(lo)
}

pub(super) fn count_f64(n: usize) -> f64 {
    ms_f64(u64::try_from(n).unwrap_or(u64::MAX))
}
