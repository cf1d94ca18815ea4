//! The demo market runs end to end: images through the market, every pair's books agree, and
//! every ledger verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pixmarket_protocol::MicroTokens;
use pixmarket_testnet::demo::{self, DemoConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_market_buys_images_and_the_books_agree() {
    let dir = tempfile::tempdir().unwrap();
    let config = DemoConfig {
        out: dir.path().to_owned(),
        jobs: 2,
        width: 64,
        height: 64,
        steps: 2,
    };
    let mut lines = Vec::new();
    let report = demo::run(&config, &mut |l| lines.push(l)).await.unwrap();

    assert_eq!(report.jobs.len(), 2);
    for job in &report.jobs {
        let png = std::fs::read(&job.image).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{}", job.image.display());
        assert!(job.cost > MicroTokens::ZERO);
    }
    // Every provider's charge to the requester equals the requester's mirror of it.
    for b in report.balances.iter().filter(|b| b.peer == "requester") {
        let mirror = report
            .balances
            .iter()
            .find(|m| m.ledger == "requester" && m.peer == b.ledger)
            .unwrap();
        assert_eq!(b.charged, mirror.charged, "{} vs requester", b.ledger);
        assert_eq!(b.deposits, mirror.deposits, "{} vs requester", b.ledger);
        assert_eq!(b.available, mirror.available, "{} vs requester", b.ledger);
        assert_eq!(b.held, MicroTokens::ZERO);
    }
    let paid: u64 = report.jobs.iter().map(|j| j.cost.0).sum();
    let charged: u64 = report
        .balances
        .iter()
        .filter(|b| b.peer == "requester")
        .map(|b| b.charged.0)
        .sum();
    assert_eq!(paid, charged);
    assert_eq!(report.verified.len(), 4);
    for (name, r) in &report.verified {
        assert!(r.is_ok(), "{name}: {r:?}");
    }
    // Each job's line says which prompt it drew.
    for (i, job) in report.jobs.iter().enumerate() {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("job {}:", i + 1)) && l.contains(&job.prompt)),
            "{lines:?}"
        );
    }
}
