//! The README's market walkthrough, run as a person runs it: a provider (`pixmarket node
//! --provide --model tiny`) and a requester (`pixmarket generate --peer`) as separate processes
//! on loopback, with the deposit recorded first; then both books hold the acknowledged receipt.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pixmarket"));
    c.env_remove("PIXMARKET_DATA_DIR");
    c
}

fn ok(args: &[&str]) -> String {
    let o: Output = bin().args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_provider_and_a_requester_in_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let provider = dir.path().join("provider");
    let requester = dir.path().join("requester");
    let (p, r) = (provider.to_str().unwrap(), requester.to_str().unwrap());
    ok(&["init", "--data-dir", p]);
    ok(&["init", "--data-dir", r]);
    let requester_id = ok(&["id", "--data-dir", r]).trim().to_owned();
    ok(&["ledger", "deposit", &requester_id, "5", "--data-dir", p]);

    let mut node = KillOnDrop(
        bin()
            .args([
                "node",
                "--data-dir",
                p,
                "--provide",
                "--model",
                "tiny",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(node.0.stdout.take().unwrap()).lines();
    let start = Instant::now();
    let addr = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node did not print its address"
        );
        let line = lines.next().expect("node exited").unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_owned();
        }
    };

    let out = dir.path().join("fox.png");
    let o = ok(&[
        "generate",
        "a red fox in the snow",
        "--data-dir",
        r,
        "--peer",
        &addr,
        "--width",
        "256",
        "--height",
        "256",
        "--steps",
        "2",
        "--max-cost",
        "5",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.contains("cost: "), "{o}");
    // The provider's prompt-token count was checked with our own copy of the tiny tokenizer.
    assert!(!o.contains("as the provider counted them"), "{o}");
    assert!(std::fs::read(&out).unwrap().starts_with(b"\x89PNG"));

    // A price cap below the quote is refused before any work, and nothing is paid.
    let refused = bin()
        .args([
            "generate",
            "a red fox",
            "--data-dir",
            r,
            "--peer",
            &addr,
            "--width",
            "256",
            "--height",
            "256",
            "--steps",
            "2",
            "--max-cost",
            "0.000001",
            "-o",
            dir.path().join("no.png").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--max-cost"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The paid job's images, asked for again (as after an undelivered result): the same
    // bytes, and nothing more is paid (the receipt count below stays one).
    let job = o
        .lines()
        .find_map(|l| l.strip_prefix("receipt: job "))
        .and_then(|l| l.split_whitespace().next())
        .expect("generate prints the job id")
        .to_owned();
    let again = dir.path().join("fox-again.png");
    let fetched = ok(&[
        "fetch",
        &job,
        "--data-dir",
        r,
        "--peer",
        &addr,
        "--json",
        "-o",
        again.to_str().unwrap(),
    ]);
    let fetched: serde_json::Value = serde_json::from_str(&fetched).unwrap();
    assert_eq!(fetched["job"], job.as_str());
    assert_eq!(fetched["delivered_late"], false);
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&out).unwrap());
    // A job this folder never bought, and a job id that is not one: one clear error each.
    let unknown = "00".repeat(16);
    let fail = |args: &[&str]| {
        let o = bin().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let no_png = dir.path().join("none.png");
    let err = fail(&[
        "fetch",
        &unknown,
        "--data-dir",
        r,
        "--peer",
        &addr,
        "-o",
        no_png.to_str().unwrap(),
    ]);
    assert!(err.contains("not a job this data folder bought"), "{err}");
    let err = fail(&[
        "fetch",
        "f0x",
        "--data-dir",
        r,
        "--peer",
        &addr,
        "-o",
        no_png.to_str().unwrap(),
    ]);
    assert!(err.contains("32 hex digits"), "{err}");

    drop(node); // the provider's ledger is free again
    let receipts = ok(&["ledger", "receipts", "--data-dir", r]);
    assert_eq!(
        receipts
            .lines()
            .filter(|l| l.starts_with("requester"))
            .count(),
        1,
        "{receipts}"
    );
    let mut verified = String::new();
    for _ in 0..50 {
        // The killed node's sled lock is released when the process is reaped.
        let o = bin()
            .args(["ledger", "verify", "--data-dir", p])
            .output()
            .unwrap();
        if o.status.success() {
            verified = String::from_utf8(o.stdout).unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        verified.contains("1 receipts (1 acknowledged,"),
        "{verified}"
    );
}

#[test]
fn generate_without_local_needs_a_place_to_buy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("n");
    ok(&["init", "--data-dir", d.to_str().unwrap()]);
    let o = bin()
        .args([
            "generate",
            "x",
            "--data-dir",
            d.to_str().unwrap(),
            "-o",
            "x.png",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--peer") && err.contains("--local"), "{err}");
    let o = bin()
        .args([
            "generate",
            "x",
            "--data-dir",
            d.to_str().unwrap(),
            "--peer",
            "/ip4/127.0.0.1/tcp/1",
            "-o",
            "x.png",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/p2p/"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
