//! `pixmarket testnet` as a person runs it: the real binary, a small simulated market, the
//! report files, and one clear error for each kind of bad flag.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn pixmarket(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pixmarket"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run pixmarket")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_small_simulated_testnet_writes_its_report_and_the_books_agree() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let o = pixmarket(&[
        "testnet",
        "--out",
        out,
        "--engine",
        "simulated",
        "--providers",
        "2",
        "--requesters",
        "1",
        "--duration",
        "120",
        "--speedup",
        "40",
        "--rate",
        "2",
        "--seed",
        "4",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("SIMULATION"), "{t}");
    assert!(t.contains("books: OK"), "{t}");
    for f in ["report.txt", "report.json", "report.png"] {
        assert!(dir.path().join(f).is_file(), "{f} missing: {t}");
    }
    let png = std::fs::read(dir.path().join("report.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
}

#[test]
fn bad_testnet_flags_get_one_clear_error() {
    let cases: [(&[&str], &str); 12] = [
        (&["--engine", "gpu"], "allowed are tiny"),
        (
            &["--scenario", "weekly"],
            "possible values: steady, daily, trace",
        ),
        // The help's range is the parser's (issue 22).
        (&["--drop", "2000000"], "2000000 is not in 0..=1000000"),
        (&["--drop", "-1"], "-1 is not in 0..=1000000"),
        (&["--rate", "-1"], "allowed is more than 0"),
        (&["--providers", "0"], "allowed is 1..=1000"),
        (&["--gpus", "17"], "allowed is 1..=16 per provider"),
        // --trace implies the trace scenario: the file is read, not ignored.
        (
            &["--trace", "/nonexistent/plan.jsonl"],
            "/nonexistent/plan.jsonl",
        ),
        (&["--scenario", "trace"], "--trace FILE"),
        (&["--delay", "200"], "MIN-MAX"),
        (&["--adversaries", "thief"], "expected one of overcharger"),
        (&["--speedup", "5"], "only 1 is allowed"),
    ];
    for (args, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec!["testnet", "--out", dir.path().to_str().unwrap()];
        all.extend_from_slice(args);
        let o = pixmarket(&all);
        // A wrong command line, found before any node starts (README "Exit codes").
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains(expected), "{args:?}: {t}");
        assert!(!t.contains("panicked"), "{args:?}: {t}");
    }
}
