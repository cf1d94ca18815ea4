//! `pixmarket ledger ...` run as a person would: the real binary on temporary data folders.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use pixmarket_ledger::{HoldTerms, Ledger, Role};
use pixmarket_node::DataDir;
use pixmarket_protocol::{
    Hash, JobId, MeteredUnits, PriceSchedule, Receipt, ReceiptAck, SecretKey, Signed, metering,
};

fn pixmarket(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pixmarket"))
        .arg("ledger")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("PIXMARKET_DATA_DIR")
        .output()
        .unwrap()
}

fn ok(data_dir: &Path, args: &[&str]) -> String {
    let out = pixmarket(data_dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(data_dir: &Path, args: &[&str]) -> String {
    let out = pixmarket(data_dir, args);
    assert!(!out.status.success(), "{args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn init(path: &Path) -> SecretKey {
    DataDir::init(path).unwrap().1
}

fn peer_id(key: &SecretKey) -> String {
    key.public().to_peer_id().to_string()
}

#[test]
fn deposit_credit_balance_verify_export_import() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    init(&a);
    let peer = peer_id(&SecretKey::from_seed(&[9; 32]));
    assert!(ok(&a, &["balance"]).contains("(none)"));

    ok(&a, &["deposit", &peer, "20", "--memo", "bank transfer 42"]);
    ok(&a, &["credit-limit", &peer, "5.5"]);
    let balance = ok(&a, &["balance"]);
    assert!(balance.contains(&peer), "{balance}");
    assert!(balance.contains("25.500000"), "{balance}");

    // Negative and malformed amounts are refused and change nothing.
    for bad in ["-5", "-0.1", "abc", "1.0000001", "", "1e3"] {
        let err = fails(&a, &["deposit", &peer, bad]);
        assert!(
            err.contains("amount") || err.contains("negative"),
            "{bad}: {err}"
        );
    }
    assert!(fails(&a, &["credit-limit", &peer, "-1"]).contains("negative"));
    assert!(fails(&a, &["deposit", "not-a-peer", "1"]).contains("not a peer id"));
    assert_eq!(ok(&a, &["balance"]), balance);

    let verify = ok(&a, &["verify"]);
    assert!(verify.starts_with("ok: 2 log entries"), "{verify}");
    assert!(ok(&a, &["receipts"]).contains("no receipts"));

    let file = tmp.path().join("books.jsonl");
    let file_s = file.to_str().unwrap();
    ok(&a, &["export", "-o", file_s]);
    let exported = std::fs::read(&file).unwrap();
    // Never overwritten.
    assert!(fails(&a, &["export", "-o", file_s]).contains("never overwritten"));
    assert_eq!(std::fs::read(&file).unwrap(), exported);
    let audit = ok(&a, &["import", file_s]);
    assert!(audit.contains("ok: 2 entries"), "{audit}");
    assert!(audit.contains("whole chain"), "{audit}");

    // A tampered export is refused with the entry to blame.
    let text = String::from_utf8(exported).unwrap();
    let tampered = text.replacen("\"seq\":1", "\"seq\":7", 1);
    std::fs::write(tmp.path().join("bad.jsonl"), tampered).unwrap();
    let err = fails(
        &a,
        &["import", tmp.path().join("bad.jsonl").to_str().unwrap()],
    );
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn locked_foreign_corrupt_and_other_nodes_ledgers_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let key = init(&a);
    ok(
        &a,
        &[
            "credit-limit",
            &peer_id(&SecretKey::from_seed(&[9; 32])),
            "1",
        ],
    );

    // Locked: a node (here, this test) holds the ledger open.
    let held = Ledger::open(&a.join("ledger"), key.public()).unwrap();
    let err = fails(&a, &["balance"]);
    assert!(err.contains("in use by another process"), "{err}");
    drop(held);
    ok(&a, &["balance"]);

    // Another node's ledger copied into this data folder.
    let b = tmp.path().join("b");
    init(&b);
    copy_dir(&a.join("ledger"), &b.join("ledger"));
    let err = fails(&b, &["balance"]);
    assert!(err.contains("belongs to node"), "{err}");

    // A folder that is not a ledger: refused, and left as it was.
    let c = tmp.path().join("c");
    init(&c);
    std::fs::create_dir(c.join("ledger")).unwrap();
    std::fs::write(c.join("ledger").join("notes.txt"), b"mine").unwrap();
    let err = fails(&c, &["balance"]);
    assert!(err.contains("not a pixmarket ledger"), "{err}");
    assert_eq!(
        std::fs::read(c.join("ledger").join("notes.txt")).unwrap(),
        b"mine"
    );

    // Not a data folder at all.
    let err = fails(&tmp.path().join("nothing"), &["balance"]);
    assert!(err.contains("pixmarket init"), "{err}");

    // A corrupt database: its files are there but unreadable.
    let d = tmp.path().join("d");
    init(&d);
    ok(&d, &["balance"]);
    let garbage: Vec<u8> = (0..100_000u32).map(|i| i.to_le_bytes()[1] ^ 0x5a).collect();
    std::fs::write(d.join("ledger").join("db"), &garbage).unwrap();
    for e in std::fs::read_dir(d.join("ledger")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("snap.") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let err = fails(&d, &["balance"]);
    assert!(err.contains("corrupt"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A provider's export of a pair, imported by the requester, reconciles with the requester's
/// own mirror of that pair.
#[test]
fn a_pair_export_reconciles_with_the_other_sides_books() {
    let tmp = tempfile::tempdir().unwrap();
    let (pa, ra) = (tmp.path().join("provider"), tmp.path().join("requester"));
    let (p, r) = (init(&pa), init(&ra));
    ok(&pa, &["credit-limit", &peer_id(&r), "100"]);
    {
        let provider = Ledger::open(&pa.join("ledger"), p.public()).unwrap();
        let requester = Ledger::open(&ra.join("ledger"), r.public()).unwrap();
        for n in 0..3u8 {
            let job = JobId([n; 16]);
            provider
                .hold(
                    HoldTerms {
                        job,
                        requester: r.public(),
                        max_cost: metering::MICRO_PER_TOKEN
                            .checked_mul(20)
                            .map(pixmarket_protocol::MicroTokens)
                            .unwrap(),
                        expires_at_ms: u64::MAX,
                        request_hash: None,
                    },
                    0,
                )
                .unwrap();
            let link = provider.receipt_link(&r.public()).unwrap();
            let units = MeteredUnits {
                width: 512,
                height: 512,
                steps: 30,
                prompt_tokens: 100,
                images: 1,
            };
            let cost = metering::cost(&units, &PriceSchedule::default()).unwrap();
            let receipt = Signed::sign(
                &p,
                &Receipt {
                    job_id: job,
                    request_hash: Hash::of(&[n]),
                    provider: p.public(),
                    requester: r.public(),
                    units,
                    schedule: PriceSchedule::default(),
                    cost,
                    image_hashes: vec![Hash::of(b"png")],
                    queued_ms: 0,
                    run_ms: 0,
                    cumulative_charged: link.charged_so_far.checked_add(cost).unwrap(),
                    prev_entry_hash: link.prev_entry_hash,
                    issued_at_ms: 0,
                    step_caching: pixmarket_protocol::StepCaching::Exact,
                },
            )
            .unwrap();
            provider.settle(job, &receipt).unwrap();
            let ack = Signed::sign(
                &r,
                &ReceiptAck {
                    job_id: job,
                    receipt_hash: receipt.digest(),
                    acked_at_ms: 0,
                },
            )
            .unwrap();
            requester.record_receipt(&receipt, &ack).unwrap();
            provider.attach_ack(job, &ack).unwrap();
        }
        assert_eq!(
            requester
                .account(Role::Requester, &p.public())
                .unwrap()
                .unwrap()
                .entries,
            3
        );
    }
    let receipts = ok(&pa, &["receipts", "--peer", &peer_id(&r)]);
    assert_eq!(receipts.lines().count(), 4, "{receipts}");
    assert!(receipts.contains("45.000000"), "{receipts}");

    let file = tmp.path().join("pair.jsonl");
    ok(
        &pa,
        &[
            "export",
            "--peer",
            &peer_id(&r),
            "-o",
            file.to_str().unwrap(),
        ],
    );
    let out = ok(&ra, &["import", file.to_str().unwrap()]);
    assert!(out.contains("3 receipts (3 acknowledged)"), "{out}");
    assert!(out.contains("reconciled"), "{out}");
}
