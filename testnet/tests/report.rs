//! The report on hand-computable records: percentiles, utilization with overlapping and clipped
//! busy intervals, the simulation label, a failed books check, empty and 100-provider runs, and
//! the files `write_run` / `write_experiment` produce.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use pixmarket_testnet::record::{
    AdversaryRecord, BooksCheck, BusyInterval, EngineLabel, ExperimentRecord, FaultRecord,
    JobOutcome, JobRecord, ProviderRecord, RunRecord,
};
use pixmarket_testnet::report::{
    CHART_HEIGHT, CHART_WIDTH, nearest_rank, summarize, table, utilization_series,
    write_experiment, write_run,
};

fn provider(index: usize) -> ProviderRecord {
    ProviderRecord {
        index,
        name: format!("provider-{index}"),
        peer: format!("12D3KooPeer{index}"),
        gpu: "h100".into(),
        gpus: 1,
        price_factor_ppm: 1_250_000,
        ms_per_standard_image: 4_000,
    }
}

/// A job submitted at `submitted`, started after `wait`, finished after `latency` (from
/// submission), paid `cost` to `provider`.
fn completed(
    index: usize,
    submitted: u64,
    wait: u64,
    latency: u64,
    provider: usize,
    cost: u64,
) -> JobRecord {
    JobRecord {
        index,
        requester: 0,
        submitted_ms: submitted,
        started_ms: Some(submitted + wait),
        finished_ms: Some(submitted + latency),
        provider: Some(provider),
        attempts: 1,
        resubmissions: 0,
        cost_micros: cost,
        delivered_late: false,
        images: 1,
        width: 1024,
        height: 1024,
        steps: 50,
        outcome: JobOutcome::Completed,
    }
}

fn failed(index: usize, submitted: u64) -> JobRecord {
    JobRecord {
        index,
        requester: 1,
        submitted_ms: submitted,
        started_ms: None,
        finished_ms: Some(submitted + 500),
        provider: None,
        attempts: 3,
        resubmissions: 1,
        cost_micros: 0,
        delivered_late: false,
        images: 1,
        width: 1024,
        height: 1024,
        steps: 50,
        outcome: JobOutcome::Failed {
            reason: "every provider busy".into(),
        },
    }
}

fn empty_record(simulated: bool) -> RunRecord {
    RunRecord {
        name: "empty".into(),
        engine: EngineLabel {
            kind: if simulated { "simulated" } else { "tiny" }.into(),
            simulated,
            note: "H100 at 4.0 s per standard image, derived from published figures".into(),
        },
        seed: 7,
        plan_hash: "ab12cd34".into(),
        speedup: if simulated { 60.0 } else { 1.0 },
        duration_ms: 0,
        plan_ms: 0,
        selection: "estimated finish".into(),
        providers: Vec::new(),
        requesters: 0,
        jobs: Vec::new(),
        busy: Vec::new(),
        faults: Vec::new(),
        adversaries: Vec::new(),
        books: BooksCheck::default(),
        wall_seconds: 0.0,
        peak_rss_bytes: None,
        network: Default::default(),
    }
}

/// Two providers over 100 s: provider 0 busy [0, 30 s) and [20 s, 50 s) (overlapping: 50 s),
/// provider 1 busy [80 s, 150 s) (clipped to 20 s). Ten completed jobs with latencies 1..=10 s
/// and waits 100..=1000 ms, one failed and retried job.
fn hand_record() -> RunRecord {
    let mut r = empty_record(true);
    r.name = "hand".into();
    r.duration_ms = 100_000;
    r.providers = vec![provider(0), provider(1)];
    r.requesters = 2;
    r.jobs = (0..10u64)
        .map(|i| {
            let n = usize::try_from(i).unwrap();
            completed(
                n,
                i * 1_000,
                (i + 1) * 100,
                (i + 1) * 1_000,
                n % 2,
                1_500_000,
            )
        })
        .collect();
    r.jobs.push(failed(10, 60_000));
    r.busy = vec![
        BusyInterval {
            provider: 0,
            device: 0,
            start_ms: 0,
            end_ms: 30_000,
        },
        BusyInterval {
            provider: 0,
            device: 0,
            start_ms: 20_000,
            end_ms: 50_000,
        },
        BusyInterval {
            provider: 1,
            device: 0,
            start_ms: 80_000,
            end_ms: 150_000,
        },
        // Names no provider of the record: ignored.
        BusyInterval {
            provider: 9,
            device: 0,
            start_ms: 0,
            end_ms: 100_000,
        },
    ];
    r.faults = vec![FaultRecord {
        at_ms: 40_000,
        kind: "kill".into(),
        detail: "provider-1".into(),
    }];
    r.adversaries = vec![AdversaryRecord {
        name: "mallory".into(),
        kind: "overcharger".into(),
        attempts: 4,
        refused: 4,
        gained_micros: 0,
        images_received: 0,
        charged_micros: 0,
        detail: "every overcharge refused".into(),
    }];
    r.books = BooksCheck {
        pairs: 2,
        pairs_agreeing: 2,
        chains_equal: 2,
        charged_micros: 15_000_000,
        paid_micros: 15_000_000,
        receipts: 10,
        ledgers_verified: 4,
        ledgers: 4,
        ..BooksCheck::default()
    };
    r.wall_seconds = 2.5;
    r.peak_rss_bytes = Some(512 * 1024 * 1024);
    r
}

/// Checks the PNG signature and reads the IHDR width and height. With `REPORT_TEST_KEEP` set
/// to a directory, keeps a copy of the chart there for a person to look at.
fn png_size(path: &Path) -> (u32, u32) {
    if let Some(keep) = std::env::var_os("REPORT_TEST_KEEP") {
        let name = path.to_string_lossy().replace('/', "_");
        std::fs::copy(path, Path::new(&keep).join(name)).unwrap();
    }
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() > 33,
        "{} is too short for a PNG",
        path.display()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} has no PNG signature",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn nearest_rank_percentiles_of_a_known_list() {
    let v: Vec<u64> = (1..=100).collect();
    assert_eq!(nearest_rank(&v, 50), Some(50));
    assert_eq!(nearest_rank(&v, 95), Some(95));
    assert_eq!(nearest_rank(&v, 99), Some(99));
    assert_eq!(nearest_rank(&[7], 99), Some(7));
    assert_eq!(nearest_rank(&[3, 9], 50), Some(3));
    assert_eq!(nearest_rank(&[3, 9], 51), Some(9));
    assert_eq!(nearest_rank(&[], 50), None);
}

#[test]
fn summary_of_the_hand_record() {
    let s = summarize(&hand_record());
    assert_eq!(
        (
            s.jobs_submitted,
            s.jobs_completed,
            s.jobs_failed,
            s.jobs_retried
        ),
        (11, 10, 1, 1)
    );
    // Latencies 1..=10 s: p50 is the 5th, p95 and p99 the 10th.
    assert_eq!(s.latency_ms.samples, 10);
    assert_eq!(s.latency_ms.p50, Some(5_000));
    assert_eq!(s.latency_ms.p95, Some(10_000));
    assert_eq!(s.latency_ms.p99, Some(10_000));
    // The failed job never started, so waits are the ten completed ones.
    assert_eq!(s.wait_ms.samples, 10);
    assert_eq!(s.wait_ms.p50, Some(500));
    assert_eq!(s.wait_ms.p99, Some(1_000));
    // Overlap merged (50 s) and clipped (20 s), the stray provider ignored.
    assert_eq!(s.providers[0].busy_ms, 50_000);
    assert_eq!(s.providers[1].busy_ms, 20_000);
    assert_eq!(s.fleet_busy_ms, 70_000);
    assert!((s.providers[0].utilization - 0.5).abs() < 1e-12);
    assert!((s.providers[1].utilization - 0.2).abs() < 1e-12);
    assert!((s.fleet_utilization - 0.35).abs() < 1e-12);
    assert_eq!(s.providers[0].jobs_served, 5);
    assert_eq!(s.providers[0].earned_micros, 7_500_000);
    assert_eq!(s.tokens_moved_micros, 15_000_000);
    assert_eq!(s.tokens_moved, "15.000000");
    assert_eq!(s.faults, 1);
    assert_eq!(s.adversaries.len(), 1);
    assert!(s.adversaries[0].contains("mallory (overcharger): attempts 4, refused 4"));
    assert!(s.books_ok);
}

#[test]
fn utilization_series_splits_busy_time_into_buckets() {
    let series = utilization_series(&hand_record(), 4);
    // Buckets of 25 s: provider 0 busy [0, 50 s), provider 1 busy [80 s, 100 s).
    assert_eq!(
        series,
        vec![vec![1.0, 1.0, 0.0, 0.0], vec![0.0, 0.0, 0.0, 0.8]]
    );
    assert_eq!(
        utilization_series(&hand_record(), 0),
        vec![Vec::<f64>::new(); 2]
    );
    let empty = empty_record(false);
    assert!(utilization_series(&empty, 10).is_empty());
    let mut idle = empty_record(false);
    idle.providers = vec![provider(0)];
    idle.busy = vec![BusyInterval {
        provider: 0,
        device: 0,
        start_ms: 5,
        end_ms: 10,
    }];
    assert_eq!(utilization_series(&idle, 3), vec![vec![0.0; 3]]);
}

#[test]
fn empty_record_renders() {
    let r = empty_record(false);
    let s = summarize(&r);
    assert_eq!(s.jobs_submitted, 0);
    assert_eq!(s.latency_ms.p50, None);
    assert_eq!(s.fleet_utilization, 0.0);
    let t = table(&r);
    assert!(t.contains("(no providers)"), "{t}");
    assert!(t.contains("books: OK"), "{t}");
    let dir = tempfile::tempdir().unwrap();
    let written = write_run(&r, dir.path()).unwrap();
    assert_eq!(png_size(&written.chart), (CHART_WIDTH, CHART_HEIGHT));
    let exp = ExperimentRecord {
        note: String::new(),
        arms: Vec::new(),
        offered: Vec::new(),
        wall_seconds: f64::NAN,
        peak_rss_bytes: None,
    };
    let written = write_experiment(&exp, &dir.path().join("exp")).unwrap();
    assert_eq!(png_size(&written.chart), (CHART_WIDTH, CHART_HEIGHT));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written.json).unwrap()).unwrap();
    assert_eq!(json["arms"].as_array().map(Vec::len), Some(0));
}

#[test]
fn table_says_simulation_only_when_simulated() {
    let sim = table(&hand_record());
    assert!(
        sim.contains(
            "SIMULATION: provider GPU time is a timing model (H100 at 4.0 s per standard image, \
             derived from published figures); times are model time at 60× wall time"
        ),
        "{sim}"
    );
    let mut real = hand_record();
    real.engine = EngineLabel {
        kind: "tiny".into(),
        simulated: false,
        note: "tiny Qwen-Image".into(),
    };
    let real = table(&real);
    assert!(!real.contains("SIMULATION"), "{real}");
    for t in [&sim, &real] {
        assert!(t.contains("hand"), "{t}");
        assert!(t.contains("seed 7"), "{t}");
        assert!(t.contains("plan ab12cd34"), "{t}");
        assert!(t.contains("selection estimated finish"), "{t}");
        assert!(t.contains("provider-1"), "{t}");
        assert!(t.contains("1.250x"), "{t}");
        assert!(t.contains("50.0%"), "{t}");
        assert!(t.contains("7.500000"), "{t}");
        assert!(t.contains("tokens moved 15.000000"), "{t}");
        assert!(t.contains("kill  provider-1"), "{t}");
        assert!(t.contains("books: OK"), "{t}");
        assert!(t.contains("peak memory 512.0 MiB"), "{t}");
        // Latency p50 5.0 s, p95 10.0 s.
        assert!(
            t.lines()
                .any(|l| l.starts_with("latency") && l.contains("5.0") && l.contains("10.0")),
            "{t}"
        );
    }
}

#[test]
fn failed_books_show_every_problem() {
    let mut r = hand_record();
    r.books.paid_micros = 14_000_000;
    r.books.open_holds = 2;
    r.books.problems = vec!["job 3 charged twice by provider-0".into()];
    let t = table(&r);
    assert!(t.contains("books: FAILED"), "{t}");
    assert!(!t.contains("books: OK"), "{t}");
    assert!(t.contains("job 3 charged twice by provider-0"), "{t}");
    assert!(
        t.contains("providers charged 15.000000 tokens but requesters paid 14.000000"),
        "{t}"
    );
    assert!(t.contains("2 holds still open"), "{t}");
    assert!(!summarize(&r).books_ok);
}

#[test]
fn write_run_produces_json_text_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/run");
    let written = write_run(&hand_record(), &out).unwrap();
    assert_eq!(written.json, out.join("report.json"));
    assert_eq!(png_size(&written.chart), (CHART_WIDTH, CHART_HEIGHT));
    let text = std::fs::read_to_string(&written.text).unwrap();
    assert!(text.contains("SIMULATION"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written.json).unwrap()).unwrap();
    assert_eq!(json["summary"]["jobs_completed"], 10);
    assert_eq!(json["summary"]["latency_ms"]["p50"], 5_000);
    assert_eq!(json["summary"]["tokens_moved_micros"], 15_000_000);
    assert_eq!(json["summary"]["tokens_moved"], "15.000000");
    assert_eq!(json["record"]["name"], "hand");
    let back: RunRecord = serde_json::from_value(json["record"].clone()).unwrap();
    assert_eq!(back, hand_record());
}

#[test]
fn write_experiment_produces_json_text_and_png() {
    let mut random = hand_record();
    random.name = "random".into();
    random.selection = "random".into();
    random.busy.push(BusyInterval {
        provider: 1,
        device: 0,
        start_ms: 0,
        end_ms: 60_000,
    });
    let exp = ExperimentRecord {
        note: "same bursty day on each fleet".into(),
        arms: vec![hand_record(), random],
        offered: (0..10u64)
            .map(|i| (i * 10_000, u32::try_from(i % 4).unwrap()))
            .collect(),
        wall_seconds: 12.0,
        peak_rss_bytes: Some(1 << 30),
    };
    let dir = tempfile::tempdir().unwrap();
    let written = write_experiment(&exp, dir.path()).unwrap();
    assert_eq!(written.chart, dir.path().join("experiment.png"));
    assert_eq!(png_size(&written.chart), (CHART_WIDTH, CHART_HEIGHT));
    let text = std::fs::read_to_string(&written.text).unwrap();
    assert!(text.contains("same bursty day on each fleet"), "{text}");
    assert!(text.contains("random"), "{text}");
    assert!(text.contains("35.0%"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written.json).unwrap()).unwrap();
    assert_eq!(json["arms"][0]["jobs_completed"], 10);
    // Provider 0: 50 s; provider 1: [0, 60 s) and [80 s, 100 s) = 80 s.
    assert_eq!(json["arms"][1]["fleet_busy_ms"], 130_000);
    assert_eq!(json["record"]["arms"][1]["name"], "random");
}

#[test]
fn hundred_providers_render() {
    let mut r = hand_record();
    r.providers = (0..100).map(provider).collect();
    r.duration_ms = 3_600_000;
    r.busy = (0..100u64)
        .map(|i| BusyInterval {
            provider: usize::try_from(i).unwrap(),
            device: 0,
            start_ms: i * 10_000,
            end_ms: i * 10_000 + 1_800_000,
        })
        .collect();
    let s = summarize(&r);
    assert_eq!(s.providers.len(), 100);
    assert!((s.fleet_utilization - 0.5).abs() < 1e-12);
    assert!(table(&r).contains("provider-99"));
    let dir = tempfile::tempdir().unwrap();
    let written = write_run(&r, dir.path()).unwrap();
    assert_eq!(png_size(&written.chart), (CHART_WIDTH, CHART_HEIGHT));
}
