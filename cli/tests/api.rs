//! `pixmarket node --api` run as a person runs it: real processes on loopback with the tiny
//! model. `ledger deposit|prepaid|credit-limit|default-credit|balance|receipts` go through the running
//! node's API (its ledger is locked by the node, so only the API can have done it); a deposit
//! recorded while the node runs survives its stop and verifies; stale API files left by a
//! killed node fall back to the ledger. The `openai` Python client's run is
//! `openai_python_client_buys_through_a_requester_node` (ignored; `.ci/run` runs it with the
//! virtual environment it creates).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pixmarket"));
    c.env_remove("PIXMARKET_DATA_DIR");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A `pixmarket node` child, killed if the test fails.
struct NodeProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    addr: String,
    api: Option<String>,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// Starts a node and reads its start-up lines up to the API's (or the last one).
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut child = bin()
            .args(["node", "--data-dir", dir.to_str().unwrap()])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let wants_api = extra.contains(&"--api");
        let mut addr = None;
        let mut api = None;
        loop {
            let line = lines.next().expect("the node exited").unwrap();
            if let Some(a) = line.strip_prefix("listening on ") {
                addr.get_or_insert_with(|| a.to_owned());
            }
            if let Some(rest) = line.strip_prefix("api on http://") {
                api = rest.split_whitespace().next().map(str::to_owned);
            }
            let last = if wants_api {
                api.is_some()
            } else {
                line.starts_with("providing") || (addr.is_some() && !extra.contains(&"--provide"))
            };
            if last {
                break;
            }
        }
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

#[test]
fn ledger_commands_go_through_the_running_node_and_its_books_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("seller");
    let d = dir.to_str().unwrap();
    init(&dir);
    let buyer = pixmarket_protocol::SecretKey::from_seed(&[7; 32])
        .public()
        .to_peer_id()
        .to_string();
    let node = NodeProcess::start(
        &dir,
        &["--provide", "--model", "tiny", "--api", "127.0.0.1:0"],
    );
    assert!(node.api.is_some());
    assert!(dir.join("api.token").exists());

    // The node holds the ledger: these can only have worked through its API.
    let o = ok(&[
        "ledger",
        "deposit",
        &buyer,
        "5",
        "--memo",
        "cash",
        "--data-dir",
        d,
    ]);
    assert!(o.contains("they now have 5.000000 available"), "{o}");
    ok(&["ledger", "credit-limit", &buyer, "1.5", "--data-dir", d]);
    ok(&["ledger", "default-credit", "0.25", "--data-dir", d]);
    // What this node prepaid the peer as a provider: its requester-side mirror.
    let o = ok(&["ledger", "prepaid", &buyer, "2", "--data-dir", d]);
    assert!(o.contains("2.000000 tokens left to spend there"), "{o}");
    let b = ok(&["ledger", "balance", "--json", "--data-dir", d]);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        v["accounts"]["requester"][0]["deposits"]["tokens"],
        "2.000000"
    );
    assert_eq!(v["default_credit"]["tokens"], "0.250000");
    assert_eq!(
        v["accounts"]["provider"][0]["deposits"]["tokens"],
        "5.000000"
    );
    assert_eq!(
        v["accounts"]["provider"][0]["credit_limit"]["tokens"],
        "1.500000"
    );
    let table = ok(&["ledger", "balance", "--data-dir", d]);
    assert!(table.contains(&buyer) && table.contains("6.5"), "{table}");
    assert_eq!(
        ok(&["ledger", "receipts", "--data-dir", d]).trim(),
        "no receipts"
    );
    // A refusal from the node is one line naming the field.
    let o = run(&["ledger", "deposit", &buyer, "1.0000001", "--data-dir", d]);
    assert!(!o.status.success());
    // Verify needs the ledger itself: the running node's lock says so.
    let o = run(&["ledger", "verify", "--data-dir", d]);
    assert!(!o.status.success());

    node.interrupt();
    assert!(
        !dir.join("api.token").exists(),
        "the token file outlived the node"
    );
    // Stopped: the same commands open the ledger, which kept everything.
    let b = ok(&["ledger", "balance", "--json", "--data-dir", d]);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        v["accounts"]["provider"][0]["deposits"]["tokens"],
        "5.000000"
    );
    let o = ok(&["ledger", "verify", "--data-dir", d]);
    assert!(o.starts_with("ok: "), "{o}");

    // A killed node leaves its API files: the CLI finds no node there and uses the ledger.
    let mut node = NodeProcess::start(&dir, &["--api", "127.0.0.1:0"]);
    let _ = node.child.kill();
    let _ = node.child.wait();
    assert!(dir.join("api.token").exists());
    let o = ok(&["ledger", "deposit", &buyer, "1", "--data-dir", d]);
    assert!(o.contains("they now have 7.500000 available"), "{o}");
    drop(node);
    ok(&["ledger", "verify", "--data-dir", d]);
    // A node started without --api clears what a killed one left.
    let node = NodeProcess::start(&dir, &[]);
    assert!(!dir.join("api.token").exists() && !dir.join("api.addr").exists());
    node.interrupt();
}

#[test]
fn a_public_api_address_needs_its_flag() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path());
    let o = run(&[
        "node",
        "--data-dir",
        tmp.path().to_str().unwrap(),
        "--api",
        "0.0.0.0:0",
        "--no-mdns",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("not a loopback address") && e.contains("--api-public"),
        "{e}"
    );
}

/// The `openai` Python client, from the virtual environment `.ci/run` creates
/// (`PIXMARKET_OPENAI_PYTHON`), buys through a requester node from a provider node: b64 and
/// url, an edit with a mask, `BadRequestError` with `param == "size"`, and an authentication
/// error with a wrong token (`api/tests/openai_client.py`).
#[test]
#[ignore = "needs the openai Python package: .ci/run sets PIXMARKET_OPENAI_PYTHON"]
fn openai_python_client_buys_through_a_requester_node() {
    let python = std::env::var("PIXMARKET_OPENAI_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PIXMARKET_OPENAI_PYTHON is not set: it must name a Python with the `openai` package \
             (.ci/run creates one in a virtual environment)"
        )
    });
    let tmp = tempfile::tempdir().unwrap();
    let seller = tmp.path().join("seller");
    let buyer = tmp.path().join("buyer");
    init(&seller);
    let buyer_id = init(&buyer);
    let provider = NodeProcess::start(
        &seller,
        &["--provide", "--model", "tiny", "--api", "127.0.0.1:0"],
    );
    // The deposit goes through the provider's API while it runs.
    ok(&[
        "ledger",
        "deposit",
        &buyer_id,
        "100",
        "--data-dir",
        seller.to_str().unwrap(),
    ]);
    let requester = NodeProcess::start(
        &buyer,
        &["--bootstrap", &provider.addr, "--api", "127.0.0.1:0"],
    );
    let api = requester.api.clone().unwrap();
    let token = std::fs::read_to_string(buyer.join("api.token")).unwrap();
    let script: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "api",
        "tests",
        "openai_client.py",
    ]
    .iter()
    .collect();
    let o = Command::new(&python)
        .arg(&script)
        .env("PIXMARKET_API_BASE", format!("http://{api}/v1"))
        .env("PIXMARKET_API_TOKEN", token.trim())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the openai client's run failed:\n{out}\n{err}"
    );
    assert!(out.contains("all openai client checks passed"), "{out}");
    println!("{out}");
    requester.interrupt();
    provider.interrupt();
    // The buyer's books hold the receipts the client's images were paid with.
    let r = ok(&[
        "ledger",
        "receipts",
        "--json",
        "--data-dir",
        buyer.to_str().unwrap(),
    ]);
    assert!(r.lines().count() >= 3, "{r}");
    ok(&["ledger", "verify", "--data-dir", buyer.to_str().unwrap()]);
    ok(&["ledger", "verify", "--data-dir", seller.to_str().unwrap()]);
}
