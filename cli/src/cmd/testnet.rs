//! `pixmarket testnet`: many real nodes in this process on loopback, a seeded plan of jobs,
//! faults and adversaries, and a report (terminal table, JSON, PNG chart).

use std::path::PathBuf;
use std::time::Duration;

use crate::usage::{out, out_text, usage};
use anyhow::Context;
use clap::Args;
use pixmarket_testnet::adversary::AdversaryKind;
use pixmarket_testnet::experiment::{self, ExperimentConfig};
use pixmarket_testnet::report;
use pixmarket_testnet::run::{self, EngineKind, SelectionRule, TestnetConfig};
use pixmarket_testnet::scenario::{self, FaultSpec, Load};
use pixmarket_testnet::sim;

/// `--drop` is a probability in parts per million: at most all of them.
const PPM_MAX: u32 = 1_000_000;
/// `--delay` at most ten minutes of model time: longer is a partition, which `--partition` models.
const MAX_DELAY_MS: u64 = 600_000;

#[derive(Debug, Args)]
pub(crate) struct TestnetArgs {
    /// Where the report (report.txt, report.json, report.png) and the nodes' data folders go.
    /// The folder's `nodes/` from an earlier run is replaced.
    #[arg(long, value_name = "DIR", default_value = "pixmarket-testnet")]
    out: PathBuf,
    /// Provider nodes [default: 3; with --experiment, 6: the shared fleet].
    #[arg(long, allow_negative_numbers = true)]
    providers: Option<usize>,
    /// Requester nodes [default: 2; with --experiment, 6].
    #[arg(long, allow_negative_numbers = true)]
    requesters: Option<usize>,
    /// `tiny` (the real model code with random tiny weights, on the CPU) or `simulated`
    /// (GPU time from a timing model per GPU kind; labelled as simulation in the report).
    #[arg(long, default_value = "tiny")]
    engine: EngineKind,
    /// Devices per provider: one node drives that many engines (GPUs of one kind with the
    /// simulated engine, CPU workers with the tiny one), one identity and ledger.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    gpus: usize,
    /// `steady`, `daily` (a working day's curve with bursts) or `trace` (with --trace)
    /// [default: trace with --trace, else steady].
    #[arg(long, value_parser = ["steady", "daily", "trace"])]
    scenario: Option<String>,
    /// Jobs per model-time minute (steady), or at the peak (daily)
    /// [default: 12 with the tiny engine; 0.4 per GPU simulated].
    #[arg(long, allow_negative_numbers = true)]
    rate: Option<f64>,
    /// A JSON-lines trace to replay (`{"at_s": 1.5, "requester": 0, "width": 1024, ...}`);
    /// implies --scenario trace.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Model-time length of the plan, in seconds [default: 60 tiny; 600 simulated;
    /// 86400 for the daily scenario].
    #[arg(long, allow_negative_numbers = true, value_name = "SECONDS")]
    duration: Option<u64>,
    /// Model seconds per wall second, simulated engine only [default: 10; 360 for daily].
    #[arg(long, allow_negative_numbers = true)]
    speedup: Option<f64>,
    /// Fixes the plan: jobs, their times and sizes, faults, keys and random choices.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    seed: u64,
    /// Providers to kill abruptly mid-run and restart from their data folder.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    kill: u32,
    /// Probability that an RPC message is lost, in parts per million (0..=1000000).
    #[arg(long, value_name = "PPM", default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(PPM_MAX)))]
    drop: u32,
    /// Probability that a message carrying a receipt acknowledgement (the answer to a receipt,
    /// and the fetch of the images that carries it again) is lost, in parts per million
    /// (0..=1000000), on top of `--drop`.
    #[arg(long, value_name = "PPM", default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(PPM_MAX)))]
    lose_acks: u32,
    /// Hold every RPC message MIN-MAX milliseconds of model time, e.g. `50-200`.
    #[arg(long, value_name = "MIN-MAX")]
    delay: Option<String>,
    /// Split the network in two for the middle fifth of the run.
    #[arg(long)]
    partition: bool,
    /// Adversaries to add, comma-separated: overcharger, replayer, forger, silent, freerider,
    /// flooder, hog, sybil.
    #[arg(long, value_delimiter = ',')]
    adversaries: Vec<AdversaryKind>,
    /// How requesters choose: `finish` (estimated finish time, the market's rule) or `random`.
    #[arg(long, default_value = "finish")]
    selection: String,
    /// A JSON list of GPU kinds `{name, memory_mib, ms_per_standard_image, source}` to use
    /// instead of the built-in (derived, not measured) timing model.
    #[arg(long, value_name = "FILE")]
    gpu_table: Option<PathBuf>,
    /// Seconds of wall time a job may go without word from its provider.
    #[arg(long, allow_negative_numbers = true, default_value_t = 30)]
    idle_timeout: u64,
    /// Daily scenario: spread the requesters over this many time zones, evenly apart
    /// [default: 1; with --experiment, 3].
    #[arg(long, allow_negative_numbers = true)]
    zones: Option<u32>,
    /// Run the utilization experiment instead (one simulated day, three markets side by side).
    #[arg(long)]
    experiment: bool,
}

fn parse_delay(s: &str) -> anyhow::Result<(u64, u64)> {
    let bad = || {
        usage!(
            "--delay {s:?}: expected MIN-MAX milliseconds, e.g. 50-200, MIN ≤ MAX ≤ {MAX_DELAY_MS}"
        )
    };
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let lo: u64 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u64 = hi.trim().parse().map_err(|_| bad())?;
    if lo > hi || hi > MAX_DELAY_MS {
        return Err(bad());
    }
    Ok((lo, hi))
}

pub(crate) fn run(a: TestnetArgs) -> anyhow::Result<()> {
    let gpu_kinds = match &a.gpu_table {
        Some(p) => sim::load_gpu_kinds(p)?,
        None => sim::builtin_gpu_kinds(),
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    if a.experiment {
        let config = ExperimentConfig {
            out: a.out.clone(),
            seed: a.seed,
            speedup: a.speedup.unwrap_or(360.0),
            shared_fleet: a.providers.unwrap_or(6),
            requesters: a.requesters.unwrap_or(6),
            duration_ms: a
                .duration
                .map_or(experiment::DEFAULT_DURATION_MS, |s| s * 1000),
            gpu_kinds,
            target_percent: 75,
            zones: a.zones.unwrap_or(3),
        };
        let record = rt.block_on(experiment::run(&config, &mut |l| {
            let _ = out!("  {l}");
        }))?;
        // The report files first: a closed stdout must not cost the run its report.
        let written = report::write_experiment(&record, &a.out)?;
        out!()?;
        out_text!("{}", report::experiment_table(&record))?;
        print_written(&written)?;
        return Ok(());
    }

    let simulated = a.engine == EngineKind::Simulated;
    let providers = a.providers.unwrap_or(3);
    let scenario = match (&a.scenario, &a.trace) {
        (Some(s), _) => s.clone(),
        (None, Some(_)) => "trace".to_owned(),
        (None, None) => "steady".to_owned(),
    };
    if a.trace.is_some() && scenario != "trace" {
        return Err(usage!(
            "--trace replays a trace: it goes with --scenario trace, not --scenario {scenario}"
        ));
    }
    let load = match scenario.as_str() {
        "steady" => Load::Steady {
            per_minute: a.rate.unwrap_or(if simulated {
                0.4 * (providers * a.gpus) as f64
            } else {
                12.0
            }),
        },
        "daily" => Load::Daily {
            peak_per_minute: a.rate.unwrap_or(if simulated {
                0.8 * (providers * a.gpus) as f64
            } else {
                6.0
            }),
            zones: a.zones.unwrap_or(1),
        },
        "trace" => Load::Trace {
            path: a
                .trace
                .clone()
                .ok_or_else(|| usage!("--scenario trace needs --trace FILE"))?,
        },
        other => {
            return Err(usage!(
                "--scenario {other:?}: allowed are steady, daily and trace"
            ));
        }
    };
    let daily = matches!(load, Load::Daily { .. });
    let mut config = TestnetConfig::new(a.out.clone());
    config.name = scenario.clone();
    config.providers = providers;
    config.requesters = a.requesters.unwrap_or(2);
    config.engine = a.engine;
    config.gpus_per_provider = a.gpus;
    config.gpu_kinds = gpu_kinds;
    config.load = load;
    config.duration_ms = 1000
        * a.duration.unwrap_or(match (simulated, daily) {
            (_, true) => 86_400,
            (true, false) => 600,
            (false, false) => 60,
        });
    config.speedup = match (simulated, a.speedup) {
        (true, s) => s.unwrap_or(if daily { 360.0 } else { 10.0 }),
        (false, Some(s)) => s,
        (false, None) => 1.0,
    };
    config.seed = a.seed;
    config.faults = FaultSpec {
        kills: a.kill,
        drop_ppm: a.drop,
        ack_drop_ppm: a.lose_acks,
        delay_ms: a.delay.as_deref().map(parse_delay).transpose()?,
        partition: a.partition,
    };
    config.adversaries = a.adversaries.clone();
    config.selection = match a.selection.as_str() {
        "finish" => SelectionRule::EstimatedFinish,
        "random" => SelectionRule::Random,
        other => {
            return Err(usage!(
                "--selection {other:?}: allowed are finish and random"
            ));
        }
    };
    config.idle_timeout = Duration::from_secs(a.idle_timeout.max(1));
    if simulated {
        config.max_batch = 1;
        config.max_queue = 64;
    }
    // Settings out of range and a plan that cannot be made (a rate, duration or trace out of
    // bounds) are the command line's to fix: exit 2, before any node starts. The run plans again from the same spec.
    config.validate().map_err(|e| usage!("{e:#}"))?;
    scenario::plan(&config.plan_spec()).map_err(|e| usage!("{e}"))?;
    let nodes = a.out.join("nodes");
    if nodes.exists() {
        std::fs::remove_dir_all(&nodes)
            .with_context(|| format!("cannot clear {} from an earlier run", nodes.display()))?;
    }
    let record = rt.block_on(run::run(&config, &mut |l| {
        let _ = out!("  {l}");
    }))?;
    // The report files first, and the books' verdict whatever stdout does: a closed pipe
    // (`| head`) must neither lose the report nor hide a failed check.
    let written = report::write_run(&record, &a.out)?;
    let printed = out!()
        .and_then(|()| out_text!("{}", report::table(&record)))
        .and_then(|()| print_written(&written));
    if !record.books.ok() {
        anyhow::bail!("the books check failed: see {}", written.text.display());
    }
    printed?;
    Ok(())
}

fn print_written(w: &report::Written) -> std::io::Result<()> {
    out!()?;
    out!("report: {}", w.text.display())?;
    out!("        {}", w.json.display())?;
    out!("chart:  {}", w.chart.display())?;
    if let Some(note) = &w.chart_note {
        out!("        ({note})")?;
    }
    Ok(())
}
