//! The dashboard in a real browser: Debian's headless Chromium, driven by `playwright-core`
//! (`api/tests/dashboard_browser.cjs`), against a provider node and a requester node run as
//! `pixmarket node --api` processes on loopback with the tiny model. Ignored: it needs Chromium
//! and Node.js with `playwright-core`, which `.ci/run` installs and names in
//! `PIXMARKET_PLAYWRIGHT_NODE_PATH`. It writes the screenshots in `docs/img/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pixmarket"));
    c.env_remove("PIXMARKET_DATA_DIR");
    c
}

fn ok(args: &[&str]) -> String {
    let o = bin().args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A `pixmarket node --api` child, killed if the test fails.
struct NodeProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    addr: String,
    api: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// Starts a node and reads its start-up lines up to the API's.
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut child = bin()
            .args(["node", "--data-dir", dir.to_str().unwrap()])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(["--api", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = None;
        let api = loop {
            let line = lines.next().expect("the node exited").unwrap();
            if let Some(a) = line.strip_prefix("listening on ") {
                addr.get_or_insert_with(|| a.to_owned());
            }
            if let Some(rest) = line.strip_prefix("api on http://") {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        Self {
            child,
            lines,
            addr: addr.unwrap(),
            api,
        }
    }

    /// Ctrl-C, then waits for the node to say it stopped and exit.
    fn interrupt(mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success()
        );
        for line in self.lines.by_ref() {
            if line.unwrap() == "stopping" {
                break;
            }
        }
        assert!(self.child.wait().unwrap().success());
    }
}

fn init(dir: &Path) -> String {
    let d = dir.to_str().unwrap();
    ok(&["init", "--data-dir", d]);
    ok(&["id", "--data-dir", d]).trim().to_owned()
}

fn deposits_of(seller: &Path, buyer: &str) -> String {
    let b = ok(&[
        "ledger",
        "balance",
        "--json",
        "--data-dir",
        seller.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    v["accounts"]["provider"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["peer"] == buyer)
        .unwrap_or_else(|| panic!("no account for {buyer} in {v}"))["deposits"]["tokens"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
#[ignore = "needs Chromium and playwright-core: .ci/run sets PIXMARKET_PLAYWRIGHT_NODE_PATH"]
fn the_dashboard_works_in_headless_chromium() {
    let node_path = std::env::var("PIXMARKET_PLAYWRIGHT_NODE_PATH").unwrap_or_else(|_| {
        panic!(
            "PIXMARKET_PLAYWRIGHT_NODE_PATH is not set: it must name a node_modules folder with \
             playwright-core (.ci/run installs one in target/ci-playwright)"
        )
    });
    let node_js = std::env::var("PIXMARKET_NODE").unwrap_or_else(|_| "node".to_owned());
    let tmp = tempfile::tempdir().unwrap();
    let seller = tmp.path().join("seller");
    let buyer = tmp.path().join("buyer");
    init(&seller);
    let buyer_id = init(&buyer);
    let provider = NodeProcess::start(&seller, &["--provide", "--model", "tiny"]);
    ok(&[
        "ledger",
        "deposit",
        &buyer_id,
        "100",
        "--data-dir",
        seller.to_str().unwrap(),
    ]);
    let requester = NodeProcess::start(&buyer, &["--bootstrap", &provider.addr]);
    let token = |dir: &Path| {
        std::fs::read_to_string(dir.join("api.token"))
            .unwrap()
            .trim()
            .to_owned()
    };
    let root: PathBuf = [env!("CARGO_MANIFEST_DIR"), ".."].iter().collect();
    let shots = root.join("docs").join("img");
    std::fs::create_dir_all(&shots).unwrap();
    let o = Command::new(&node_js)
        .arg(root.join("api").join("tests").join("dashboard_browser.cjs"))
        .env("NODE_PATH", &node_path)
        .env("PIXMARKET_PROVIDER_URL", format!("http://{}", provider.api))
        .env("PIXMARKET_PROVIDER_TOKEN", token(&seller))
        .env(
            "PIXMARKET_REQUESTER_URL",
            format!("http://{}", requester.api),
        )
        .env("PIXMARKET_REQUESTER_TOKEN", token(&buyer))
        .env("PIXMARKET_BUYER_PEER", &buyer_id)
        .env("PIXMARKET_SCREENSHOT_DIR", &shots)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "the browser run failed:\n{out}\n{err}");
    assert!(out.contains("all dashboard checks passed"), "{out}");
    println!("{out}");
    for shot in ["dashboard-buyer.png", "dashboard-provider.png"] {
        let bytes = std::fs::read(shots.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{shot} is not a PNG");
    }
    requester.interrupt();
    provider.interrupt();
    // The books: the page's deposit is there, the wrong token's is not, and both verify.
    assert_eq!(deposits_of(&seller, &buyer_id), "112.500000");
    let r = ok(&[
        "ledger",
        "receipts",
        "--json",
        "--data-dir",
        buyer.to_str().unwrap(),
    ]);
    assert_eq!(r.lines().count(), 1, "one image was bought: {r}");
    ok(&["ledger", "verify", "--data-dir", buyer.to_str().unwrap()]);
    ok(&["ledger", "verify", "--data-dir", seller.to_str().unwrap()]);
}
