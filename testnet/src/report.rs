//! Turns a [`RunRecord`] or an [`ExperimentRecord`] into what a person reads: a [`Summary`]
//! (plain numbers, also written as JSON), the terminal [`table`], and a PNG chart.
//!
//! All times are model-time milliseconds (see [`crate::record`]); a simulated run says so in
//! every table and chart title. Money is integer micro-tokens throughout and is printed with
//! integer formatting only (`12.345678` tokens), never through a float.
//!
//! Charts are drawn with plotters' `ab_glyph` text backend, which has no system font lookup:
//! [`write_run`] finds a TrueType font at run time (`PIXMARKET_FONT` first, then common system
//! paths, then a bounded scan of the font directories). Without one the chart is still drawn,
//! with axes and lines but no text, and [`Written::chart_note`] says how to provide a font.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::record::{ExperimentRecord, JobOutcome, RunRecord};

/// Chart size in pixels.
pub const CHART_WIDTH: u32 = 1200;
/// Chart size in pixels.
pub const CHART_HEIGHT: u32 = 900;
/// Above this many providers the run chart draws a heatmap instead of one line per provider.
pub const MAX_PROVIDER_LINES: usize = 12;
/// Time buckets in the charts (fewer when the run is shorter than this many milliseconds).
const CHART_BUCKETS: usize = 60;
/// The family name the found font is registered under.
const FONT_FAMILY: &str = "sans-serif";
/// Fonts larger than this are not read (a TTF for Latin text is well under 10 MiB).
const MAX_FONT_BYTES: u64 = 64 * 1024 * 1024;
/// How deep the font directory scan goes.
const MAX_FONT_SCAN_DEPTH: usize = 5;

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
}

/// What [`write_run`] or [`write_experiment`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub json: PathBuf,
    pub text: PathBuf,
    pub chart: PathBuf,
    /// Set when the chart is missing something a reader would expect (no font: no text).
    pub chart_note: Option<String>,
}

/// Writing a report failed; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("could not create the report directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not encode {} as JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not draw the chart {}", path.display())]
    Chart {
        path: PathBuf,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
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

/// The terminal report of one run.
pub fn table(record: &RunRecord) -> String {
    let s = summarize(record);
    let mut out = String::new();
    let _ = writeln!(out, "pixmarket testnet run: {}", record.name);
    let _ = writeln!(
        out,
        "engine {} | seed {} | plan {} | selection {}",
        record.engine.kind, record.seed, record.plan_hash, record.selection
    );
    if record.engine.simulated {
        let _ = writeln!(out, "{}", simulation_line(record));
    } else if !record.engine.note.is_empty() {
        let _ = writeln!(out, "engine: {}", record.engine.note);
    }
    let _ = writeln!(
        out,
        "{} providers, {} requesters, {} s model time",
        record.providers.len(),
        record.requesters,
        secs(record.duration_ms)
    );

    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "jobs     {:>9} {:>9} {:>9} {:>9}",
        "submitted", "completed", "failed", "retried"
    );
    let _ = writeln!(
        out,
        "         {:>9} {:>9} {:>9} {:>9}",
        s.jobs_submitted, s.jobs_completed, s.jobs_failed, s.jobs_retried
    );
    if record.plan_ms > 0 {
        let _ = writeln!(
            out,
            "throughput {} jobs completed within the plan's {} s: {:.1} per model hour",
            s.completed_in_plan,
            secs(record.plan_ms),
            s.jobs_per_hour
        );
    }
    let _ = writeln!(
        out,
        "seconds  {:>9} {:>9} {:>9} {:>9}",
        "p50", "p95", "p99", "samples"
    );
    for (label, p) in [("latency", &s.latency_ms), ("wait", &s.wait_ms)] {
        let _ = writeln!(
            out,
            "{:<8} {:>9} {:>9} {:>9} {:>9}",
            label,
            opt_secs(p.p50),
            opt_secs(p.p95),
            opt_secs(p.p99),
            p.samples
        );
    }

    let _ = writeln!(out);
    let name_w = s
        .providers
        .iter()
        .map(|p| p.name.chars().count())
        .chain([8])
        .max()
        .unwrap_or(8);
    let gpu_w = s
        .providers
        .iter()
        .map(|p| p.gpu.chars().count())
        .chain([3])
        .max()
        .unwrap_or(3);
    let _ = writeln!(
        out,
        "{:<name_w$} {:<gpu_w$} {:>7} {:>6} {:>7} {:>16}",
        "provider", "gpu", "price", "jobs", "util", "earned (tokens)"
    );
    for p in &s.providers {
        let _ = writeln!(
            out,
            "{:<name_w$} {:<gpu_w$} {:>7} {:>6} {:>7} {:>16}",
            p.name,
            p.gpu,
            price_factor(p.price_factor_ppm),
            p.jobs_served,
            percent(p.utilization),
            tokens(p.earned_micros)
        );
    }
    if s.providers.is_empty() {
        let _ = writeln!(out, "(no providers)");
    }
    let _ = writeln!(out, "fleet utilization {}", percent(s.fleet_utilization));
    let _ = writeln!(
        out,
        "tokens moved {} (paid by requesters for completed jobs)",
        s.tokens_moved
    );

    let _ = writeln!(out);
    let _ = writeln!(out, "faults: {}", s.faults);
    for f in &record.faults {
        let _ = writeln!(out, "  {:>9} s  {}  {}", secs(f.at_ms), f.kind, f.detail);
    }
    let _ = writeln!(out, "adversaries: {}", record.adversaries.len());
    for a in &s.adversaries {
        let _ = writeln!(out, "  {a}");
    }

    let _ = writeln!(out);
    let b = &record.books;
    let _ = writeln!(
        out,
        "books: pairs agreeing {}/{}, chains equal {}/{}, charged {} / paid {} tokens, receipts {}, \
         credit notes {}, double charged {}, receipts without image {}, paid but undelivered {}, \
         open holds {}, ledgers verified {}/{}",
        b.pairs_agreeing,
        b.pairs,
        b.chains_equal,
        b.pairs,
        tokens(b.charged_micros),
        tokens(b.paid_micros),
        b.receipts,
        b.credit_notes,
        b.double_charged,
        b.receipts_without_image,
        b.undelivered,
        b.open_holds,
        b.ledgers_verified,
        b.ledgers
    );
    if s.books_ok {
        let _ = writeln!(out, "books: OK");
    } else {
        let _ = writeln!(out, "books: FAILED");
        for problem in books_problems(record) {
            let _ = writeln!(out, "  - {problem}");
        }
    }
    let _ = writeln!(
        out,
        "{}",
        resources(record.wall_seconds, record.peak_rss_bytes)
    );
    out
}

/// The terminal report of the utilization experiment: one row per arm, then the note.
pub fn experiment_table(record: &ExperimentRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pixmarket utilization experiment: {} arms",
        record.arms.len()
    );
    let mut seen: Vec<String> = Vec::new();
    for arm in record.arms.iter().filter(|a| a.engine.simulated) {
        let line = simulation_line(arm);
        if !seen.contains(&line) {
            let _ = writeln!(out, "{line}");
            seen.push(line);
        }
    }
    let name_w = record
        .arms
        .iter()
        .map(|a| a.name.chars().count())
        .chain([3])
        .max()
        .unwrap_or(3);
    let sel_w = record
        .arms
        .iter()
        .map(|a| a.selection.chars().count())
        .chain([9])
        .max()
        .unwrap_or(9);
    let _ = writeln!(
        out,
        "{:<name_w$} {:>9} {:<sel_w$} {:>9} {:>6} {:>7} {:>10} {:>10} {:>10} {:>5}",
        "arm",
        "providers",
        "selection",
        "completed",
        "failed",
        "util",
        "wait p50 s",
        "wait p99 s",
        "lat p99 s",
        "books"
    );
    for arm in &record.arms {
        let s = summarize(arm);
        let _ = writeln!(
            out,
            "{:<name_w$} {:>9} {:<sel_w$} {:>9} {:>6} {:>7} {:>10} {:>10} {:>10} {:>5}",
            arm.name,
            arm.providers.len(),
            arm.selection,
            s.jobs_completed,
            s.jobs_failed,
            percent(s.fleet_utilization),
            opt_secs(s.wait_ms.p50),
            opt_secs(s.wait_ms.p99),
            opt_secs(s.latency_ms.p99),
            if s.books_ok { "OK" } else { "FAIL" }
        );
    }
    if record.arms.is_empty() {
        let _ = writeln!(out, "(no arms)");
    }
    if !record.note.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", record.note);
    }
    let _ = writeln!(
        out,
        "{}",
        resources(record.wall_seconds, record.peak_rss_bytes)
    );
    out
}

/// Writes `report.json` (`{ "record": .., "summary": .. }`), `report.txt` ([`table`]) and
/// `report.png` (the chart) into `dir`, creating it if needed.
pub fn write_run(record: &RunRecord, dir: &Path) -> Result<Written, ReportError> {
    #[derive(Serialize)]
    struct RunReport<'a> {
        record: &'a RunRecord,
        summary: &'a Summary,
    }
    create_dir(dir)?;
    let summary = summarize(record);
    let json = dir.join("report.json");
    write_json(
        &json,
        &RunReport {
            record,
            summary: &summary,
        },
    )?;
    let text = dir.join("report.txt");
    write_text(&text, &table(record))?;
    let chart = dir.join("report.png");
    let font = font();
    draw(&chart, |root| run_chart(root, record, font.ready))?;
    Ok(Written {
        json,
        text,
        chart,
        chart_note: font.note.clone(),
    })
}

/// Writes `experiment.json` (`{ "record": .., "arms": [summary, ..] }`), `experiment.txt`
/// ([`experiment_table`]) and `experiment.png` into `dir`, creating it if needed.
pub fn write_experiment(record: &ExperimentRecord, dir: &Path) -> Result<Written, ReportError> {
    #[derive(Serialize)]
    struct ExperimentReport<'a> {
        record: &'a ExperimentRecord,
        arms: Vec<Summary>,
    }
    create_dir(dir)?;
    let json = dir.join("experiment.json");
    let arms = record.arms.iter().map(summarize).collect();
    write_json(&json, &ExperimentReport { record, arms })?;
    let text = dir.join("experiment.txt");
    write_text(&text, &experiment_table(record))?;
    let chart = dir.join("experiment.png");
    let font = font();
    draw(&chart, |root| experiment_chart(root, record, font.ready))?;
    Ok(Written {
        json,
        text,
        chart,
        chart_note: font.note.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Numbers and formatting

/// Per provider, its busy intervals clipped to `[0, duration_ms]`, and per device sorted and
/// merged so none of one device overlap (two devices' intervals do: they ran side by side).
/// Intervals naming no provider of the record, or empty after clipping, are dropped.
fn busy_by_provider(record: &RunRecord) -> Vec<Vec<(u64, u64)>> {
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
fn one() -> u32 {
    1
}

/// `buckets + 1` integer boundaries `D·i/n` (empty when `buckets` is 0).
fn bucket_bounds(duration_ms: u64, buckets: usize) -> Vec<u64> {
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
fn bucket_of(bounds: &[u64], t: u64) -> usize {
    let starts = &bounds[..bounds.len().saturating_sub(1)];
    starts.partition_point(|&b| b <= t).saturating_sub(1)
}

/// `num / den`, 0 when `den` is 0.
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        ms_f64(num) / ms_f64(den)
    }
}

/// A `u64` as `f64` without an `as` cast (exact below 2^53, nearest above).
fn ms_f64(v: u64) -> f64 {
    let hi = u32::try_from(v >> 32).unwrap_or(u32::MAX);
    let lo = u32::try_from(v & 0xFFFF_FFFF).unwrap_or(u32::MAX);
    f64::from(hi) * 4_294_967_296.0 + f64::from(lo)
}

fn count_f64(n: usize) -> f64 {
    ms_f64(u64::try_from(n).unwrap_or(u64::MAX))
}

/// Micro-tokens as tokens with six decimals.
fn tokens(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// Milliseconds as seconds with one decimal, rounded half up.
fn secs(ms: u64) -> String {
    let tenths = ms / 100 + u64::from(ms % 100 >= 50);
    format!("{}.{}", tenths / 10, tenths % 10)
}

fn opt_secs(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), secs)
}

/// A price factor in parts per million as `1.250x`, rounded half up to three decimals.
fn price_factor(ppm: u64) -> String {
    let milli = ppm / 1000 + u64::from(ppm % 1000 >= 500);
    format!("{}.{:03}x", milli / 1000, milli % 1000)
}

fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

fn simulation_line(record: &RunRecord) -> String {
    format!(
        "SIMULATION: provider GPU time is a timing model ({}); times are model time at {}× wall time",
        record.engine.note, record.speedup
    )
}

/// Every reason the books are not OK: the recorded problems, then each failed invariant.
fn books_problems(record: &RunRecord) -> Vec<String> {
    let b = &record.books;
    let mut out = b.problems.clone();
    if b.pairs_agreeing != b.pairs {
        out.push(format!(
            "{} of {} pairs disagree",
            b.pairs - b.pairs_agreeing.min(b.pairs),
            b.pairs
        ));
    }
    if b.charged_micros != b.paid_micros {
        out.push(format!(
            "providers charged {} tokens but requesters paid {}",
            tokens(b.charged_micros),
            tokens(b.paid_micros)
        ));
    }
    if b.double_charged != 0 {
        out.push(format!("{} jobs charged more than once", b.double_charged));
    }
    if b.receipts_without_image != 0 {
        out.push(format!(
            "{} receipts without a delivered image",
            b.receipts_without_image
        ));
    }
    if b.open_holds != 0 {
        out.push(format!("{} holds still open", b.open_holds));
    }
    if b.ledgers_verified != b.ledgers {
        out.push(format!(
            "{} of {} ledgers verified",
            b.ledgers_verified, b.ledgers
        ));
    }
    out
}

fn resources(wall_seconds: f64, peak_rss_bytes: Option<u64>) -> String {
    let mut out = String::new();
    if wall_seconds.is_finite() {
        let _ = write!(out, "wall {wall_seconds:.1} s");
    }
    if let Some(bytes) = peak_rss_bytes {
        let tenths = u128::from(bytes) * 10 / (1024 * 1024);
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "peak memory {}.{} MiB", tenths / 10, tenths % 10);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Files

fn create_dir(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ReportError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_text(path, &text)
}

// ---------------------------------------------------------------------------------------------
// Fonts

struct FontStatus {
    /// A font is registered under [`FONT_FAMILY`].
    ready: bool,
    /// What the reader should know about the chart's text.
    note: Option<String>,
}

/// Finds, reads and registers a font once per process.
fn font() -> &'static FontStatus {
    static FONT: OnceLock<FontStatus> = OnceLock::new();
    FONT.get_or_init(find_and_register_font)
}

fn find_and_register_font() -> FontStatus {
    let mut env_problem = None;
    if let Some(path) = std::env::var_os("PIXMARKET_FONT").map(PathBuf::from) {
        match register(&path) {
            Ok(()) => {
                return FontStatus {
                    ready: true,
                    note: None,
                };
            }
            Err(why) => {
                env_problem = Some(format!("PIXMARKET_FONT={} {why}", path.display()));
            }
        }
    }
    let common = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
        "/usr/share/fonts/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
        "/Library/Fonts/Arial.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
    ];
    let mut candidates: Vec<PathBuf> = common.iter().map(PathBuf::from).collect();
    for root in ["/usr/share/fonts", "/usr/local/share/fonts"] {
        scan_ttf(Path::new(root), 0, &mut candidates);
    }
    // A few tries at most: each registration attempt leaks its bytes.
    for path in candidates.iter().filter(|p| p.is_file()).take(4) {
        if register(path).is_ok() {
            let note = env_problem.map(|p| format!("{p}; used {} instead", path.display()));
            return FontStatus { ready: true, note };
        }
    }
    let mut note = String::from(
        "no TrueType font found, so the chart has no text (axes and lines only); \
         set PIXMARKET_FONT to the path of a .ttf file (e.g. DejaVuSans.ttf) to label it",
    );
    if let Some(p) = env_problem {
        let _ = write!(note, " ({p})");
    }
    FontStatus {
        ready: false,
        note: Some(note),
    }
}

/// Appends the `*.ttf` files under `dir` (sorted, depth-bounded) to `out`.
fn scan_ttf(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > MAX_FONT_SCAN_DEPTH || out.len() > 256 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            scan_ttf(&path, depth + 1, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
        {
            out.push(path);
        }
    }
}

/// Reads a font file, leaks it (plotters' `ab_glyph` backend keeps `&'static` fonts; this runs
/// at most a few times per process) and registers it under [`FONT_FAMILY`].
fn register(path: &Path) -> Result<(), String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot be read: {e}"))?
        .len();
    if len > MAX_FONT_BYTES {
        return Err(format!("is larger than {MAX_FONT_BYTES} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read: {e}"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| "is not a font plotters can use".to_string())
}

// ---------------------------------------------------------------------------------------------
// Charts

type DrawResult = Result<(), Box<dyn StdError + Send + Sync>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn draw(path: &Path, paint: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<(), ReportError> {
    let fail = |source| ReportError::Chart {
        path: path.to_path_buf(),
        source,
    };
    let root = BitMapBackend::new(path, (CHART_WIDTH, CHART_HEIGHT)).into_drawing_area();
    paint(&root).map_err(fail)?;
    root.present().map_err(|e| fail(Box::new(e)))
}

/// The unit the time axis is labelled in.
struct TimeUnit {
    ms: f64,
    name: &'static str,
}

fn time_unit(duration_ms: u64) -> TimeUnit {
    if duration_ms <= 120_000 {
        TimeUnit {
            ms: 1000.0,
            name: "s",
        }
    } else if duration_ms <= 7_200_000 {
        TimeUnit {
            ms: 60_000.0,
            name: "min",
        }
    } else {
        TimeUnit {
            ms: 3_600_000.0,
            name: "h",
        }
    }
}

/// Buckets for a chart of a run this long: [`CHART_BUCKETS`], fewer for a very short run.
fn chart_buckets(duration_ms: u64) -> usize {
    usize::try_from(duration_ms.max(1)).map_or(CHART_BUCKETS, |d| d.min(CHART_BUCKETS))
}

/// The middle of each bucket, in `unit`.
fn bucket_mids(bounds: &[u64], unit: &TimeUnit) -> Vec<f64> {
    bounds
        .windows(2)
        .map(|w| (ms_f64(w[0]) + ms_f64(w[1])) / 2.0 / unit.ms)
        .collect()
}

/// The fleet's busy fraction per bucket: the mean over providers (0 without providers).
fn fleet_series(series: &[Vec<f64>], buckets: usize) -> Vec<f64> {
    let n = count_f64(series.len());
    (0..buckets)
        .map(|b| {
            if series.is_empty() {
                0.0
            } else {
                series.iter().filter_map(|p| p.get(b)).sum::<f64>() / n
            }
        })
        .collect()
}

/// A plot area: a caption and labelled axes when there is a font, bare otherwise.
fn plot<'a, 'b>(
    area: &'a Area<'b>,
    text: bool,
    caption: &str,
    x_max: f64,
    y_max: f64,
) -> Result<Chart<'a, 'b>, Box<dyn StdError + Send + Sync>> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(caption, (FONT_FAMILY, 18))
            .x_label_area_size(36)
            .y_label_area_size(64);
    }
    let x_max = if x_max > 0.0 && x_max.is_finite() {
        x_max
    } else {
        1.0
    };
    let y_max = if y_max > 0.0 && y_max.is_finite() {
        y_max
    } else {
        1.0
    };
    Ok(builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?)
}

/// Axes: a labelled mesh with a font, two plain axis lines without.
fn axes(
    chart: &mut Chart<'_, '_>,
    text: bool,
    x_desc: &str,
    y_desc: &str,
    y_percent: bool,
) -> DrawResult {
    if text {
        let fmt_pct = |v: &f64| format!("{:.0}%", v * 100.0);
        let fmt_num = |v: &f64| format!("{v}");
        // About one y label per 40 pixels, so a short strip is not crowded.
        let height = chart.plotting_area().dim_in_pixel().1;
        let y_labels = usize::try_from(height / 40).map_or(11, |n| n.clamp(2, 11));
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_desc)
            .y_labels(y_labels)
            .y_desc(y_desc)
            .label_style((FONT_FAMILY, 13))
            .light_line_style(WHITE.mix(0.0));
        if y_percent {
            mesh.y_label_formatter(&fmt_pct).draw()?;
        } else {
            mesh.y_label_formatter(&fmt_num).draw()?;
        }
    } else {
        let (x, y) = (chart.x_range(), chart.y_range());
        chart.draw_series(LineSeries::new(
            [(x.start, y.end), (x.start, y.start), (x.end, y.start)],
            BLACK.stroke_width(1),
        ))?;
    }
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, text: bool) -> DrawResult {
    if text {
        chart
            .configure_series_labels()
            .label_font((FONT_FAMILY, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

fn run_chart(root: &Area<'_>, record: &RunRecord, text: bool) -> DrawResult {
    root.fill(&WHITE)?;
    let root = if text {
        let title = format!(
            "{}{} | engine {} | seed {} | selection {}",
            if record.engine.simulated {
                format!(
                    "SIMULATION (model time at {}x wall time) | ",
                    record.speedup
                )
            } else {
                String::new()
            },
            record.name,
            record.engine.kind,
            record.seed,
            record.selection
        );
        root.titled(&title, (FONT_FAMILY, 22))?
    } else {
        root.clone()
    };
    let (top, bottom) = root.split_vertically(560);
    let d = record.duration_ms;
    let unit = time_unit(d);
    let buckets = chart_buckets(d);
    let bounds = bucket_bounds(d, buckets);
    let mids = bucket_mids(&bounds, &unit);
    let series = utilization_series(record, buckets);
    let fleet = fleet_series(&series, buckets);
    let x_max = ms_f64(d) / unit.ms;
    let x_desc = format!("model time ({})", unit.name);
    let s = summarize(record);
    let fleet_label = format!("fleet average ({})", percent(s.fleet_utilization));

    if record.providers.len() <= MAX_PROVIDER_LINES {
        let mut chart = plot(&top, text, "utilization per provider", x_max, 1.05)?;
        axes(&mut chart, text, &x_desc, "busy", true)?;
        for (i, (p, ys)) in record.providers.iter().zip(&series).enumerate() {
            let color = Palette99::pick(i);
            chart
                .draw_series(LineSeries::new(
                    mids.iter().copied().zip(ys.iter().copied()),
                    color.stroke_width(1),
                ))?
                .label(format!("{} ({})", p.name, p.gpu))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], Palette99::pick(i).stroke_width(2))
                });
        }
        chart
            .draw_series(LineSeries::new(
                mids.iter().copied().zip(fleet.iter().copied()),
                BLACK.stroke_width(4),
            ))?
            .label(fleet_label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(4)));
        legend(&mut chart, text)?;
    } else {
        let (avg_area, heat_area) = top.split_vertically(170);
        let mut avg = plot(&avg_area, text, "fleet utilization", x_max, 1.05)?;
        axes(&mut avg, text, "", "busy", true)?;
        avg.draw_series(LineSeries::new(
            mids.iter().copied().zip(fleet.iter().copied()),
            BLACK.stroke_width(4),
        ))?
        .label(fleet_label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(4)));
        legend(&mut avg, text)?;

        let n = count_f64(record.providers.len());
        let caption = format!(
            "utilization per provider ({} providers; light = idle, dark = busy)",
            record.providers.len()
        );
        let mut heat = plot(&heat_area, text, &caption, x_max, n)?;
        axes(&mut heat, text, &x_desc, "provider", false)?;
        let cells = series.iter().enumerate().flat_map(|(i, ys)| {
            let y0 = count_f64(i);
            let bounds = &bounds;
            let unit = &unit;
            ys.iter().enumerate().filter_map(move |(b, &v)| {
                let (x0, x1) = (bounds.get(b)?, bounds.get(b + 1)?);
                let lightness = 0.97 - 0.72 * v.clamp(0.0, 1.0);
                Some(Rectangle::new(
                    [
                        (ms_f64(*x0) / unit.ms, y0),
                        (ms_f64(*x1) / unit.ms, y0 + 1.0),
                    ],
                    HSLColor(0.6, 0.75, lightness).filled(),
                ))
            })
        });
        heat.draw_series(cells)?;
    }

    let mut submitted = vec![0u32; buckets];
    let mut completed = vec![0u32; buckets];
    for job in &record.jobs {
        if let Some(c) = submitted.get_mut(bucket_of(&bounds, job.submitted_ms)) {
            *c = c.saturating_add(1);
        }
        let finished = job.finished_ms.map(|f| bucket_of(&bounds, f));
        if let (JobOutcome::Completed, Some(c)) =
            (&job.outcome, finished.and_then(|b| completed.get_mut(b)))
        {
            *c = c.saturating_add(1);
        }
    }
    let y_max = submitted
        .iter()
        .chain(&completed)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let width_ms = bounds.get(1).copied().unwrap_or(0);
    let width = if width_ms < 1_000 {
        format!("{width_ms} ms")
    } else {
        format!("{} s", secs(width_ms))
    };
    let caption = format!("jobs submitted and completed per {width} bucket");
    let mut jobs = plot(&bottom, text, &caption, x_max, f64::from(y_max) * 1.1)?;
    axes(&mut jobs, text, &x_desc, "jobs", false)?;
    for (label, counts, color) in [
        ("submitted", &submitted, BLUE),
        ("completed", &completed, RGBColor(0, 140, 60)),
    ] {
        jobs.draw_series(LineSeries::new(
            mids.iter()
                .copied()
                .zip(counts.iter().map(|&c| f64::from(c))),
            color.stroke_width(2),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    legend(&mut jobs, text)?;
    Ok(())
}

fn experiment_chart(root: &Area<'_>, record: &ExperimentRecord, text: bool) -> DrawResult {
    root.fill(&WHITE)?;
    let root = if text {
        let simulated = record.arms.iter().any(|a| a.engine.simulated);
        let title = format!(
            "{}utilization experiment: {} arms",
            if simulated {
                "SIMULATION (model time) | "
            } else {
                ""
            },
            record.arms.len()
        );
        root.titled(&title, (FONT_FAMILY, 22))?
    } else {
        root.clone()
    };
    let (top, bottom) = root.split_vertically(540);
    let end_ms = record
        .arms
        .iter()
        .map(|a| a.duration_ms)
        .chain(record.offered.iter().map(|o| o.0))
        .max()
        .unwrap_or(0);
    let unit = time_unit(end_ms);
    let x_max = ms_f64(end_ms) / unit.ms;
    let x_desc = format!("model time ({})", unit.name);

    let mut util = plot(&top, text, "fleet utilization per arm", x_max, 1.05)?;
    axes(&mut util, text, &x_desc, "busy", true)?;
    for (i, arm) in record.arms.iter().enumerate() {
        let buckets = chart_buckets(arm.duration_ms);
        let bounds = bucket_bounds(arm.duration_ms, buckets);
        let mids = bucket_mids(&bounds, &unit);
        let fleet = fleet_series(&utilization_series(arm, buckets), buckets);
        let s = summarize(arm);
        let color = Palette99::pick(i);
        util.draw_series(LineSeries::new(
            mids.into_iter().zip(fleet),
            color.stroke_width(2),
        ))?
        .label(format!(
            "{} ({} providers, {}): {} busy, p99 wait {} s",
            arm.name,
            arm.providers.len(),
            arm.selection,
            percent(s.fleet_utilization),
            opt_secs(s.wait_ms.p99)
        ))
        .legend(move |(x, y)| {
            PathElement::new([(x, y), (x + 18, y)], Palette99::pick(i).stroke_width(2))
        });
    }
    legend(&mut util, text)?;

    let y_max = record.offered.iter().map(|o| o.1).max().unwrap_or(0).max(1);
    let mut offered = plot(
        &bottom,
        text,
        "offered load (jobs submitted per bucket)",
        x_max,
        f64::from(y_max) * 1.1,
    )?;
    axes(&mut offered, text, &x_desc, "jobs", false)?;
    let mut points: Vec<(f64, f64)> = record
        .offered
        .iter()
        .map(|&(t, n)| (ms_f64(t) / unit.ms, f64::from(n)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    offered.draw_series(
        AreaSeries::new(points, 0.0, BLUE.mix(0.25)).border_style(BLUE.stroke_width(2)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn nearest_rank_of_one_to_ten() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(nearest_rank(&v, 50), Some(5));
        assert_eq!(nearest_rank(&v, 95), Some(10));
        assert_eq!(nearest_rank(&v, 0), Some(1));
        assert_eq!(nearest_rank(&v, 10), Some(1));
        assert_eq!(nearest_rank(&v, 11), Some(2));
        assert_eq!(nearest_rank(&v, 200), Some(10));
        assert_eq!(nearest_rank(&[], 50), None);
    }

    #[test]
    fn formatting_is_integer_exact() {
        assert_eq!(tokens(0), "0.000000");
        assert_eq!(tokens(12_345_678), "12.345678");
        assert_eq!(tokens(u64::MAX), "18446744073709.551615");
        assert_eq!(secs(0), "0.0");
        assert_eq!(secs(1_449), "1.4");
        assert_eq!(secs(1_450), "1.5");
        assert_eq!(secs(u64::MAX), "18446744073709551.6");
        assert_eq!(price_factor(1_250_000), "1.250x");
        assert_eq!(price_factor(999_500), "1.000x");
        assert_eq!(ms_f64(u64::MAX), 18_446_744_073_709_551_615.0);
        assert_eq!(ms_f64(5_000_000_000), 5_000_000_000.0);
    }

    fn record(providers: usize, duration_ms: u64) -> RunRecord {
        use crate::record::{BooksCheck, BusyInterval, EngineLabel, ProviderRecord};
        RunRecord {
            name: "no font".into(),
            engine: EngineLabel {
                kind: "simulated".into(),
                simulated: true,
                note: "model".into(),
            },
            seed: 1,
            plan_hash: "00".into(),
            speedup: 60.0,
            duration_ms,
            plan_ms: duration_ms,
            selection: "random".into(),
            providers: (0..providers)
                .map(|index| ProviderRecord {
                    index,
                    name: format!("p{index}"),
                    peer: String::new(),
                    gpu: "h100".into(),
                    gpus: 1,
                    price_factor_ppm: 1_000_000,
                    ms_per_standard_image: 1_000,
                })
                .collect(),
            requesters: 1,
            jobs: Vec::new(),
            busy: (0..providers)
                .map(|provider| BusyInterval {
                    provider,
                    device: 0,
                    start_ms: 10,
                    end_ms: 500,
                })
                .collect(),
            faults: Vec::new(),
            adversaries: Vec::new(),
            books: BooksCheck::default(),
            wall_seconds: 1.0,
            peak_rss_bytes: None,
        }
    }

    /// The no-font path draws no text at all (plotters' `ab_glyph` backend would fail on any).
    #[test]
    fn charts_without_a_font_draw_no_text() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (providers, duration)) in [(0, 0), (3, 1_000), (100, 1_000)].into_iter().enumerate()
        {
            let r = record(providers, duration);
            let path = dir.path().join(format!("run{i}.png"));
            draw(&path, |root| run_chart(root, &r, false)).unwrap();
            assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
            let exp = ExperimentRecord {
                note: String::new(),
                arms: vec![r.clone(), r],
                offered: vec![(0, 3), (500, 1)],
                wall_seconds: 0.0,
                peak_rss_bytes: None,
            };
            let path = dir.path().join(format!("exp{i}.png"));
            draw(&path, |root| experiment_chart(root, &exp, false)).unwrap();
            assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
        }
    }

    #[test]
    fn font_lookup_refuses_bad_files_and_scans_with_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        assert!(register(&dir.path().join("missing.ttf")).is_err());
        let junk = dir.path().join("junk.ttf");
        std::fs::write(&junk, b"not a font").unwrap();
        assert!(register(&junk).is_err());

        let mut deep = dir.path().to_path_buf();
        for level in 0..=MAX_FONT_SCAN_DEPTH + 1 {
            deep = deep.join(format!("d{level}"));
            std::fs::create_dir_all(&deep).unwrap();
            std::fs::write(deep.join("Font.TTF"), b"x").unwrap();
        }
        std::fs::write(dir.path().join("readme.txt"), b"x").unwrap();
        let mut found = Vec::new();
        scan_ttf(dir.path(), 0, &mut found);
        // junk.ttf at the top, then one per level down to the depth bound.
        assert_eq!(found.len(), 1 + MAX_FONT_SCAN_DEPTH);
        assert!(
            found
                .iter()
                .all(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")))
        );
    }

    #[test]
    fn buckets_cover_the_run() {
        assert_eq!(bucket_bounds(10, 4), vec![0, 2, 5, 7, 10]);
        assert!(bucket_bounds(10, 0).is_empty());
        let b = bucket_bounds(10, 4);
        assert_eq!(bucket_of(&b, 0), 0);
        assert_eq!(bucket_of(&b, 4), 1);
        assert_eq!(bucket_of(&b, 5), 2);
        assert_eq!(bucket_of(&b, 10), 3);
        assert_eq!(bucket_of(&b, 1_000), 3);
        let z = bucket_bounds(0, 3);
        assert_eq!(bucket_of(&z, 0), 2);
        assert_eq!(bucket_of(&[], 5), 0);
    }
}
