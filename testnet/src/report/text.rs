//! The terminal report: [`table`] for one run, [`experiment_table`] for the experiment, and
//! the integer-exact formatting both use.

use std::fmt::Write as _;

use super::network::{Connections, NetworkSummary};
use super::summary::summarize;
use crate::record::{ExperimentRecord, RunRecord};

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
    if s.jobs_delivered_late > 0 {
        let _ = writeln!(
            out,
            "delivered late {} (marked undelivered at the fetch deadline, then fetched again)",
            s.jobs_delivered_late
        );
    }
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
    for line in network_lines(&s.network) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{}",
        resources(record.wall_seconds, record.peak_rss_bytes)
    );
    out
}

/// The network part of the report: nothing for a record that has none (an older one).
pub(super) fn network_lines(n: &NetworkSummary) -> Vec<String> {
    if n.nodes == 0 {
        return Vec::new();
    }
    let conns = |c: &Connections| {
        format!(
            "avg {:.1}, p50 {}, max {} ({} samples)",
            c.avg,
            opt(c.p50),
            opt(c.max),
            c.samples
        )
    };
    let kib = |b: Option<u64>| {
        b.map_or_else(
            || "-".to_string(),
            |b| format!("{}.{} KiB", b / 1024, (b % 1024) * 10 / 1024),
        )
    };
    vec![
        format!(
            "network: {} nodes, at most {} connections each",
            n.nodes, n.max_connections
        ),
        format!(
            "  connections per node during the run: {}",
            conns(&n.connections)
        ),
        format!(
            "  connections per node at the end: {}",
            conns(&n.final_connections)
        ),
        format!(
            "  advert propagation (wall ms, provider to requester table): p50 {}, p99 {} ({} adverts seen)",
            opt(n.advert_delay_ms.p50),
            opt(n.advert_delay_ms.p99),
            n.advert_delay_ms.samples
        ),
        format!(
            "  adverts published while the plan ran: {:.1} per wall second, market-wide",
            n.adverts_per_s_during_plan
        ),
        discovery_line(n),
        format!(
            "  memory per node {}; signed advert {} bytes; background traffic {} per node per s, {} per node per advert",
            kib(n.memory_per_node_bytes),
            opt(n.advert_bytes),
            kib(n.background_bytes_per_node_per_s),
            kib(n.background_bytes_per_node_per_advert)
        ),
    ]
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

/// Micro-tokens as tokens with six decimals.
pub(super) fn tokens(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// Milliseconds as seconds with one decimal, rounded half up.
pub(super) fn secs(ms: u64) -> String {
    let tenths = ms / 100 + u64::from(ms % 100 >= 50);
    format!("{}.{}", tenths / 10, tenths % 10)
}

pub(super) fn opt_secs(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), secs)
}

/// A price factor in parts per million as `1.250x`, rounded half up to three decimals.
pub(super) fn price_factor(ppm: u64) -> String {
    let milli = ppm / 1000 + u64::from(ppm % 1000 >= 500);
    format!("{}.{:03}x", milli / 1000, milli % 1000)
}

pub(super) fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

pub(super) fn simulation_line(record: &RunRecord) -> String {
    format!(
        "SIMULATION: provider GPU time is a timing model ({}); times are model time at {}× wall time",
        record.engine.note, record.speedup
    )
}

/// Every reason the books are not OK: the recorded problems, then each failed invariant.
pub(super) fn books_problems(record: &RunRecord) -> Vec<String> {
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

pub(super) fn resources(wall_seconds: f64, peak_rss_bytes: Option<u64>) -> String {
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

/// A number, or `-` when there is none.
fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Whether every requester learnt every provider before the plan, or what they knew when
/// set-up gave up waiting.
fn discovery_line(n: &NetworkSummary) -> String {
    let k = &n.discovery_known;
    let providers = u64::try_from(n.discovery_providers).unwrap_or(u64::MAX);
    if k.min.is_none_or(|least| least >= providers) {
        format!(
            "  discovery: every requester knew every provider {} ms after the last started",
            n.discovery_ms
        )
    } else {
        format!(
            "  discovery INCOMPLETE: {} ms after the last requester started, requesters knew {} / {} / {} (fewest / median / most) of {} providers; the plan ran anyway",
            n.discovery_ms,
            opt(k.min),
            opt(k.p50),
            opt(k.max),
            n.discovery_providers
        )
    }
}
