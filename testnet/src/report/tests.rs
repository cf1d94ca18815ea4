//! Unit tests of the report's arithmetic, formatting, font lookup and charts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::chart::*;
use super::font::*;
use super::summary::*;
use super::text::*;
use crate::record::{ExperimentRecord, RunRecord};

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
        network: Default::default(),
    }
}

/// The no-font path draws no text at all (plotters' `ab_glyph` backend would fail on any).
#[test]
fn charts_without_a_font_draw_no_text() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (providers, duration)) in [(0, 0), (3, 1_000), (100, 1_000)].into_iter().enumerate() {
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
