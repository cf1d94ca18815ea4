//! Issue 22, "the command line as a newcomer meets it": every case of the issue run as a person
//! runs it, the real binary on temp folders; the paid-image, peer and port cases with a second
//! process. Each waits on what a process prints or on its exit, never on a clock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;

/// The exit status of a wrong command line (README "Exit codes").
const USAGE: i32 = 2;
/// The exit status of every other failure.
const FAILURE: i32 = 1;
/// Log lines of a node kept unread at most: a debug log of one test's few jobs is a few
/// hundred lines.
const LOG_LINES: usize = 100_000;
/// The exit status of a bought job stopped by Ctrl-C.
const INTERRUPTED: i32 = 130;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pixmarket"));
    c.env_remove("PIXMARKET_DATA_DIR").env_remove("RUST_LOG");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// Fails with `code`, an `error:` line containing `needle`, and no panic or backtrace.
fn fails(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(err.contains("error"), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures/pipeline")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn init(dir: &Path, name: &str) -> String {
    let d = dir.join(name);
    ok(&["init", "--data-dir", d.to_str().unwrap()]);
    d.to_string_lossy().into_owned()
}

/// A port nothing listens on: bound by the OS for us, then closed.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `pixmarket node` child, stopped with Ctrl-C (SIGINT) or killed on drop.
struct Node {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its log lines (stderr), when started with [`Node::start_logged`]: drained by a thread,
    /// so a chatty log never fills the pipe and stalls the node.
    log: Option<mpsc::Receiver<String>>,
}

impl Node {
    fn start(args: &[&str]) -> Self {
        Self::spawn(args, None)
    }

    /// Starts it with `RUST_LOG=filter` and its log read by [`Node::wait_for_log`].
    fn start_logged(args: &[&str], filter: &str) -> Self {
        Self::spawn(args, Some(filter))
    }

    fn spawn(args: &[&str], log: Option<&str>) -> Self {
        let mut cmd = bin();
        cmd.arg("node").args(args).stdout(Stdio::piped());
        match log {
            Some(filter) => cmd
                .env("RUST_LOG", filter)
                .env("NO_COLOR", "1")
                .stderr(Stdio::piped()),
            None => cmd.stderr(Stdio::null()),
        };
        let mut child = cmd.spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let log = child.stderr.take().map(|err| {
            let (tx, rx) = mpsc::sync_channel(LOG_LINES);
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    match tx.try_send(line) {
                        // Never blocks the pipe: past the bound a line is dropped.
                        Ok(()) | Err(mpsc::TrySendError::Full(_)) => {}
                        Err(mpsc::TrySendError::Disconnected(_)) => break,
                    }
                }
            });
            rx
        });
        Self { child, lines, log }
    }

    /// Reads the log until a line contains every one of `needles`; returns that line. Fails
    /// on a line containing `never` first.
    fn wait_for_log(&mut self, needles: &[&str], never: &str) -> String {
        let log = self.log.as_ref().expect("started with start_logged");
        loop {
            let line = log
                .recv()
                .unwrap_or_else(|_| panic!("node exited before logging {needles:?}"));
            assert!(!line.contains(never), "logged {never:?} first: {line}");
            if needles.iter().all(|n| line.contains(n)) {
                return line;
            }
        }
    }

    /// Reads stdout until a line starts with `prefix`; returns the rest of it.
    fn wait_for(&mut self, prefix: &str) -> String {
        loop {
            let line = self
                .lines
                .next()
                .unwrap_or_else(|| panic!("node exited before printing {prefix:?}"))
                .unwrap();
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
    }

    /// Ctrl-C, as a person stops it, and waits for the exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let o = Command::new("kill").args(["-INT", &pid]).output().unwrap();
        assert!(o.status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn provider(dir: &Path, requester: &str, deposit: &str) -> (Node, String, String) {
    provider_with_log(dir, requester, deposit, None)
}

/// [`provider`], its log at `filter` read by [`Node::wait_for_log`] when given.
fn provider_with_log(
    dir: &Path,
    requester: &str,
    deposit: &str,
    filter: Option<&str>,
) -> (Node, String, String) {
    let p = init(dir, "provider");
    let rid = ok(&["id", "--data-dir", requester]).trim().to_owned();
    ok(&["ledger", "deposit", &rid, deposit, "--data-dir", &p]);
    // Two CPU workers: one engine each, as `--device cuda:0 --device cuda:1` would be.
    let args = [
        "--data-dir",
        &p,
        "--provide",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--device",
        "cpu",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ];
    let mut node = match filter {
        Some(f) => Node::start_logged(&args, f),
        None => Node::start(&args),
    };
    let addr = node.wait_for("listening on ");
    node.wait_for("providing");
    (node, addr, p)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// With chunked attention the tiny model's 4096² peak is its VAE decode, which an ordinary
/// machine has free: the refusal is tested against a stated device memory instead of this
/// machine's. 1 GiB plans the tiny model up to 3760² (2 GiB now reaches 4096², since the VAE's
/// mid-block attention is planned at the chunk it sizes from the memory left; at its default
/// 2048-row chunk 1 GiB stopped at 1904² and 2 GiB at 2688²).
#[test]
fn a_4096_square_tiny_image_beyond_the_memory_plan_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let out = tmp.path().join("x.png");
    let o = run(&[
        "generate",
        "a cat",
        "--local",
        "--model",
        "tiny",
        "--width",
        "4096",
        "--height",
        "4096",
        "--steps",
        "1",
        "--device-memory",
        "1",
        "--data-dir",
        &d,
        "-o",
        out.to_str().unwrap(),
    ]);
    fails(&o, USAGE, "4096×4096 does not fit 1 GiB");
    assert!(!out.exists());
}

#[test]
fn ranges_are_checked_by_the_parser_with_the_range_in_the_message() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let out = tmp.path().join("x.png");
    let out = out.to_str().unwrap();
    let local = |extra: &[&str]| {
        let mut v = vec!["generate", "a cat", "--local", "--model", "tiny", "-o", out];
        v.extend_from_slice(&["--data-dir", &d]);
        v.extend_from_slice(extra);
        run(&v)
    };
    // Refused before a single step runs, not after 10,000 of them.
    fails(&local(&["--steps", "10000"]), USAGE, "not in 1..=1000");
    // Negative numbers parse, and are refused with the range, not "use '-- -1'".
    fails(&local(&["--width", "-16"]), USAGE, "not in 16..=4096");
    fails(&local(&["--true-cfg-scale", "-1"]), USAGE, "1.0..=20.0");
    fails(&local(&["--strength", "-0.5"]), USAGE, "(0, 1]");
    fails(&local(&["--seed", "-1"]), USAGE, "a whole number in 0..=");
    // One set of limits: the market's narrower ones, before anything is dialled.
    let peer = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        dead_port(),
        ok(&["id", "--data-dir", &d]).trim()
    );
    let market = |extra: &[&str]| {
        let mut v = vec!["generate", "a cat", "--peer", &peer, "-o", out];
        v.extend_from_slice(&["--data-dir", &d]);
        v.extend_from_slice(extra);
        run(&v)
    };
    fails(&market(&["--steps", "200"]), USAGE, "1..=100 on the market");
    fails(
        &market(&["--width", "48", "--height", "64"]),
        USAGE,
        "64..=2048 on the market",
    );
    // The same prompt rules in both forms.
    let long = "x".repeat(20_000);
    for prompt in ["", "   ", long.as_str()] {
        let o = run(&[
            "generate",
            prompt,
            "--local",
            "--model",
            "tiny",
            "-o",
            out,
            "--data-dir",
            &d,
        ]);
        fails(&o, USAGE, "prompt");
    }
    fails(&market(&["--max-cost", "-1"]), USAGE, "non-negative");
    // How to run it here is not silently ignored when buying.
    fails(
        &market(&["--device", "cuda"]),
        USAGE,
        "--device needs --local",
    );
    // Starting noise travels with a market job, so it must fit the job's size: checked before
    // anything is bought.
    fails(
        &market(&["--latents", &fixture("t2i_2step_latents.safetensors")]),
        USAGE,
        "a 1024×1024 image needs [1, 16, 128, 128]",
    );
}

#[test]
fn the_output_is_checked_before_the_model_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let missing = tmp.path().join("missing-folder/x.png");
    let o = run(&[
        "generate",
        "a cat",
        "--local",
        "--model",
        "tiny",
        "--data-dir",
        &d,
        "-o",
        missing.to_str().unwrap(),
    ]);
    fails(&o, USAGE, "does not exist");
    assert!(!stderr(&o).contains("loaded"), "{}", stderr(&o));
    // A folder is not a file name.
    let o = run(&[
        "generate",
        "a cat",
        "--local",
        "--model",
        "tiny",
        "--data-dir",
        &d,
        "-o",
        tmp.path().to_str().unwrap(),
    ]);
    fails(&o, USAGE, "is a folder");
}

#[test]
fn init_images_and_masks_of_another_size_are_refused_unless_resized() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let out = out.to_str().unwrap();
    let model = fixture("model");
    let init = fixture("init.png"); // 64×48
    let small = tmp.path().join("mask32.png");
    let white = vec![255u8; 32 * 32 * 3];
    std::fs::write(
        &small,
        pixmarket_engine::image_io::encode_png(&white, 32, 32, &[]).unwrap(),
    )
    .unwrap();
    let small = small.to_str().unwrap();
    let paint = |extra: &[&str]| {
        let mut v = vec!["generate", "a cat", "--local", "--model", &model, "-o", out];
        v.extend_from_slice(&[
            "--steps",
            "1",
            "--true-cfg-scale",
            "1",
            "--init-image",
            &init,
        ]);
        v.extend_from_slice(extra);
        let mut c = bin();
        c.args(&v).env("PIXMARKET_DATA_DIR", tmp.path());
        c.output().unwrap()
    };
    fails(&paint(&["--mask", small]), USAGE, "--mask is 32×32");
    fails(
        &paint(&["--width", "128", "--height", "128"]),
        USAGE,
        "--init-image is 64×48 but the picture is 128×128",
    );
    // Stretching is asked for by name, and then it runs.
    let o = paint(&["--width", "128", "--height", "128", "--resize"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = paint(&["--mask", small, "--resize"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The paid-image and peer cases: a provider process and a requester process.
#[test]
fn buying_checks_the_output_first_and_says_which_peer_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let r = init(tmp.path(), "requester");
    let (node, addr, _p) = provider(tmp.path(), &r, "50");
    let png = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let buy = |extra: &[&str]| {
        let mut v = vec!["generate", "a red fox", "--data-dir", &r, "--peer", &addr];
        v.extend_from_slice(&["--width", "256", "--height", "256", "--steps", "4"]);
        v.extend_from_slice(extra);
        run(&v)
    };

    // Nothing is bought for an output that cannot be written.
    let o = buy(&["-o", &png("missing-folder/x.png")]);
    fails(&o, USAGE, "does not exist");
    assert_eq!(
        ok(&["ledger", "receipts", "--data-dir", &r]).trim(),
        "no receipts"
    );

    // A text-to-image, then an image-to-image at strength 0.5: billed for half the steps.
    let t2i = json(&stdout(&{
        let o = buy(&["--json", "--seed", "1", "-o", &png("t2i.png")]);
        assert!(o.status.success(), "{}", stderr(&o));
        o
    }));
    assert_eq!(t2i["seed"], 1, "{t2i}");
    let init = fixture("init.png");
    let i2i = buy(&[
        "--json",
        "--seed",
        "1",
        "--init-image",
        &init,
        "--resize",
        "--strength",
        "0.5",
        "-o",
        &png("i2i.png"),
    ]);
    assert!(i2i.status.success(), "{}", stderr(&i2i));
    let i2i = json(&stdout(&i2i));
    let micro = |v: &serde_json::Value| v["cost_micro"].as_u64().unwrap();
    assert!(micro(&i2i) * 2 <= micro(&t2i) + 2, "{t2i} vs {i2i}");

    // --outpaint over the market buys the padded inpaint that --local would run.
    let o = run(&[
        "generate",
        "a cat",
        "--data-dir",
        &r,
        "--peer",
        &addr,
        "--steps",
        "2",
        "--init-image",
        &init,
        "--outpaint",
        "96,104,96,104",
        "-o",
        &png("wide.png"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text =
        pixmarket_engine::image_io::png_text_chunks(&std::fs::read(png("wide.png")).unwrap())
            .unwrap();
    assert!(
        text.contains(&("size".into(), "256x256".into())),
        "{text:?}"
    );
    assert!(
        text.contains(&("mode".into(), "inpaint".into())),
        "{text:?}"
    );

    // A wrong peer id and a dead address are told apart, and neither buys anything.
    let port = addr.split('/').nth(4).unwrap().to_owned();
    let rid = ok(&["id", "--data-dir", &r]).trim().to_owned();
    let wrong_id = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{rid}");
    let o = run(&[
        "generate",
        "a cat",
        "--data-dir",
        &r,
        "--peer",
        &wrong_id,
        "-o",
        &png("w.png"),
    ]);
    fails(&o, FAILURE, "check the peer id");
    let pid = addr.rsplit('/').next().unwrap();
    let dead = format!("/ip4/127.0.0.1/tcp/{}/p2p/{pid}", dead_port());
    let o = run(&[
        "generate",
        "a cat",
        "--data-dir",
        &r,
        "--peer",
        &dead,
        "-o",
        &png("d.png"),
    ]);
    fails(&o, FAILURE, "nothing answers");

    // The providers table: a pasteable address and the price of a standard image. It returns
    // as soon as the advert arrives (--expect), not after a fixed wait.
    let list = ok(&[
        "providers",
        "--data-dir",
        &r,
        "--bootstrap",
        &addr,
        "--wait",
        "120",
        "--expect",
        "1",
        "--json",
    ]);
    let list = json(&list);
    let first = &list.as_array().unwrap()[0];
    assert_eq!(first["address"].as_str(), Some(addr.as_str()), "{list}");
    assert_eq!(first["standard_image_cost"].as_str(), Some("100.000000"));
    let devices = first["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{list}");
    assert!(devices.iter().all(|d| d["name"] == "cpu"), "{list}");
    node.stop();

    let receipts: Vec<serde_json::Value> = ok(&["ledger", "receipts", "--data-dir", &r, "--json"])
        .lines()
        .map(json)
        .collect();
    assert_eq!(receipts.len(), 3, "{receipts:?}");
    assert!(receipts.iter().all(|x| x["acked"] == true));

    // The buyer's mirror of the provider's account is overdrawn until it records what it
    // prepaid there; then it shows what is left, charged and all.
    let mirror = |b: &serde_json::Value| b["accounts"]["requester"][0].clone();
    let before = json(&ok(&["ledger", "balance", "--json", "--data-dir", &r]));
    assert!(mirror(&before)["available"].is_null(), "{before}");
    let table = ok(&["ledger", "balance", "--data-dir", &r]);
    assert!(table.contains("ledger prepaid PROVIDER TOKENS"), "{table}");
    let said = ok(&["ledger", "prepaid", pid, "50", "--data-dir", &r]);
    assert!(
        said.starts_with("recorded a prepayment of 50.000000 tokens"),
        "{said}"
    );
    let after = json(&ok(&["ledger", "balance", "--json", "--data-dir", &r]));
    let m = mirror(&after);
    let charged = m["charged"]["micro"].as_u64().unwrap();
    assert!(charged > 0, "{after}");
    assert_eq!(m["deposits"]["micro"], 50_000_000, "{after}");
    assert_eq!(m["available"]["micro"], 50_000_000 - charged, "{after}");
    assert!(ok(&["ledger", "verify", "--data-dir", &r]).starts_with("ok: "));
    // Its own word only: a second record of the same payment is a new entry, never an edit;
    // a negative or malformed amount is refused before anything is written.
    fails(
        &run(&["ledger", "prepaid", pid, "-5", "--data-dir", &r]),
        USAGE,
        "negative",
    );
    fails(
        &run(&["ledger", "prepaid", "nobody", "5", "--data-dir", &r]),
        USAGE,
        "not a peer id",
    );
}

/// Ctrl-C on a bought job: the CLI cancels it at the provider, waits for the answer and exits
/// 130; the provider stops computing it (its log says so and it never sells it) and neither
/// side's books owe anything.
#[test]
fn ctrl_c_on_a_bought_job_cancels_it_at_the_provider() {
    let tmp = tempfile::tempdir().unwrap();
    let r = init(tmp.path(), "requester");
    let (mut node, addr, p) =
        provider_with_log(tmp.path(), &r, "100", Some("warn,pixmarket_node=debug"));
    let out = tmp.path().join("never.png");
    // 100 steps at 512²: seconds of work for the tiny model, so the cancel lands midway.
    let buyer = bin()
        .args([
            "generate",
            "a slow lighthouse",
            "--data-dir",
            &r,
            "--peer",
            &addr,
        ])
        .args(["--width", "512", "--height", "512", "--steps", "100"])
        .arg("-o")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = node.wait_for_log(&["running job"], "sold a job");
    let job = running
        .split("job=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let pid = buyer.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let o = buyer.wait_with_output().unwrap();
    fails(&o, INTERRUPTED, "confirmed the cancel");
    assert!(stderr(&o).contains(&job), "{}", stderr(&o));
    assert!(!out.exists());
    // The provider stops at its next step, voids the hold and tells its operator.
    let ended = node.wait_for_log(&["job ended without a charge", &job], "sold a job");
    assert!(ended.contains("cancelled"), "{ended}");
    node.stop();

    let provider_books = ok(&["ledger", "verify", "--data-dir", &p]);
    assert!(
        provider_books.contains("0 receipts") && provider_books.contains("0 open holds"),
        "{provider_books}"
    );
    let theirs = json(&ok(&["ledger", "balance", "--json", "--data-dir", &p]));
    assert_eq!(theirs["accounts"]["provider"][0]["charged"]["micro"], 0);
    assert_eq!(theirs["accounts"]["provider"][0]["held"]["micro"], 0);
    assert_eq!(
        ok(&["ledger", "receipts", "--data-dir", &r]).trim(),
        "no receipts"
    );
    let mine = json(&ok(&["ledger", "balance", "--json", "--data-dir", &r]));
    let owed: u64 = mine["accounts"]["requester"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["charged"]["micro"].as_u64().unwrap())
        .sum();
    assert_eq!(owed, 0, "{mine}");
}

/// A safetensors file holding one f32 tensor `latents` of `shape`, written by hand (the format
/// is a little-endian u64 header length, the JSON header, then the raw data).
fn write_latents(path: &Path, shape: [usize; 4], values: &[f32]) {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = format!(
        r#"{{"latents":{{"dtype":"F32","shape":[{},{},{},{}],"data_offsets":[0,{}]}}}}"#,
        shape[0],
        shape[1],
        shape[2],
        shape[3],
        data.len()
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

/// `--latents` on the market: the job carries the noise, so the bought PNG is the very one
/// `--local` makes from the same latents, and not the seed's picture.
#[test]
fn latents_bought_on_the_market_give_the_local_picture() {
    let tmp = tempfile::tempdir().unwrap();
    let r = init(tmp.path(), "requester");
    let (node, addr, _p) = provider(tmp.path(), &r, "50");
    // A fixed, noise-like pattern: 16 × 8 × 8 values for 64².
    let values: Vec<f32> = (0..16 * 8 * 8u16)
        .map(|i| (f32::from(i) * 12.9898).sin() * 2.0)
        .collect();
    let latents = tmp.path().join("noise.safetensors");
    write_latents(&latents, [1, 16, 8, 8], &values);
    let latents = latents.to_str().unwrap();
    let png = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let generate = |extra: &[&str]| {
        let mut v = vec![
            "generate",
            "a red circle",
            "--width",
            "64",
            "--height",
            "64",
        ];
        v.extend_from_slice(&["--steps", "4", "--true-cfg-scale", "1", "--seed", "3"]);
        v.extend_from_slice(&["--data-dir", &r]);
        v.extend_from_slice(extra);
        run(&v)
    };
    let succeeds = |o: Output| {
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let bought = png("bought.png");
    let said = succeeds(generate(&[
        "--peer",
        &addr,
        "--latents",
        latents,
        "-o",
        &bought,
    ]));
    assert!(said.contains("seed: none (the given latents)"), "{said}");
    let seeded = png("seeded.png");
    succeeds(generate(&["--peer", &addr, "-o", &seeded]));
    let local = png("local.png");
    succeeds(generate(&[
        "--local",
        "--model",
        "tiny",
        "--latents",
        latents,
        "-o",
        &local,
    ]));
    let read = |path: &str| std::fs::read(path).unwrap();
    assert_eq!(
        read(&bought),
        read(&local),
        "the provider ignored the latents"
    );
    assert_ne!(read(&bought), read(&seeded));

    // Latents for another size are refused before anything is bought.
    let wrong = tmp.path().join("wrong.safetensors");
    write_latents(&wrong, [1, 16, 8, 16], &[0.5; 16 * 8 * 16]);
    let w = png("w.png");
    let o = generate(&[
        "--peer",
        &addr,
        "--latents",
        wrong.to_str().unwrap(),
        "-o",
        &w,
    ]);
    fails(&o, USAGE, "needs [1, 16, 8, 8]");
    node.stop();
    let receipts = ok(&["ledger", "receipts", "--data-dir", &r, "--json"]);
    assert_eq!(receipts.lines().count(), 2, "{receipts}");
}

/// The port case: two node processes.
#[test]
fn a_listen_address_in_use_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let a = init(tmp.path(), "a");
    let b = init(tmp.path(), "b");
    let mut first = Node::start(&[
        "--data-dir",
        &a,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
    ]);
    let addr = first.wait_for("listening on ");
    let taken: String = addr.split("/p2p/").next().unwrap().to_owned();
    let o = run(&["node", "--data-dir", &b, "--listen", &taken, "--no-mdns"]);
    fails(&o, FAILURE, "cannot listen on");
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    first.stop();
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    for args in [
        vec!["ledger", "receipts", "--data-dir", &d],
        vec!["ledger", "balance", "--data-dir", &d],
        vec!["ledger", "balance", "--json", "--data-dir", &d],
        vec!["completions", "bash"],
        vec!["id", "--data-dir", &d],
        vec!["--help"],
    ] {
        // `| head -1` that has already read its line: the pipe's reader is gone.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = bin()
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(o.status.success(), "{args:?}: {:?} {err}", o.status);
    }
}

#[test]
fn ledger_default_credit_survives_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let credit = || {
        let b = json(&ok(&["ledger", "balance", "--json", "--data-dir", &d]));
        b["default_credit"]["micro"].as_u64().unwrap()
    };
    let start_and_stop = || {
        let mut n = Node::start(&[
            "--data-dir",
            &d,
            "--provide",
            "--model",
            "tiny",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ]);
        n.wait_for("providing");
        n.stop();
    };
    ok(&["ledger", "default-credit", "1", "--data-dir", &d]);
    start_and_stop();
    assert_eq!(credit(), 1_000_000);
    // Editing the config afterwards still takes effect.
    let config = PathBuf::from(&d).join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("new_peer_credit = \"0\"", "new_peer_credit = \"2\"");
    std::fs::write(&config, text).unwrap();
    start_and_stop();
    assert_eq!(credit(), 2_000_000);
}

#[test]
fn config_errors_say_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let config = PathBuf::from(&d).join("config.toml");
    std::fs::write(&config, "mdns = false\n[provider]\nmax_queue = 0\n").unwrap();
    let o = run(&["node", "--data-dir", &d]);
    fails(&o, FAILURE, "line 3");
    assert!(stderr(&o).contains("provider.max_queue"), "{}", stderr(&o));
    std::fs::write(&config, "mdns = false\n[provider]\nmax_batch = \"two\"\n").unwrap();
    fails(&run(&["node", "--data-dir", &d]), FAILURE, "line 3");
}

#[test]
fn an_unreachable_bootstrap_peer_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let other = init(tmp.path(), "other");
    let id = ok(&["id", "--data-dir", &other]).trim().to_owned();
    let dead = format!("/ip4/127.0.0.1/tcp/{}/p2p/{id}", dead_port());
    let o = run(&[
        "providers",
        "--data-dir",
        &d,
        "--bootstrap",
        &dead,
        "--wait",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("bootstrap peer {dead} is not reachable")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn scripts_get_json_quiet_and_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let out = tmp.path().join("a.png");
    let o = run(&[
        "generate",
        "a cat",
        "--local",
        "--model",
        "tiny",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "--seed",
        "5",
        "--quiet",
        "--json",
        "--data-dir",
        &d,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "--quiet prints nothing but errors");
    let v = json(&stdout(&o));
    assert_eq!(v["width"], 32);
    assert_eq!(v["seed"], 5);
    assert_eq!(v["output"].as_str(), out.to_str());
    let b = json(&ok(&["ledger", "balance", "--json", "--data-dir", &d]));
    assert!(b["accounts"]["provider"].is_array(), "{b}");
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&["completions", shell]);
        assert!(script.contains("pixmarket"), "{shell}");
        assert!(script.contains("generate"), "{shell}");
    }
    fails(&run(&["completions", "tcsh"]), USAGE, "possible values");
}

#[test]
fn exit_codes_are_two_for_the_command_line_and_one_for_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    fails(&run(&["generate"]), USAGE, "PROMPT");
    fails(&run(&["ledger", "nonsense"]), USAGE, "nonsense");
    fails(
        &run(&["id", "--data-dir", tmp.path().to_str().unwrap()]),
        FAILURE,
        "pixmarket init",
    );
}

#[test]
fn price_bills_the_steps_that_run() {
    let full = ok(&[
        "price",
        "--width",
        "1024",
        "--height",
        "1024",
        "--steps",
        "50",
        "--prompt-tokens",
        "100",
    ]);
    assert_eq!(full.trim(), "100.000000 tokens");
    let half = ok(&[
        "price",
        "--width",
        "1024",
        "--height",
        "1024",
        "--steps",
        "50",
        "--prompt-tokens",
        "100",
        "--strength",
        "0.5",
    ]);
    assert!(
        half.starts_with("50.000000 tokens (25 of 50 steps"),
        "{half}"
    );
}

#[test]
fn outlandish_input_is_an_error_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let d = init(tmp.path(), "n");
    let out = tmp.path().join("x.png");
    let out = out.to_str().unwrap();
    let init_image = fixture("init.png");
    let outpaint = |pad: &str| {
        run(&[
            "generate",
            "a cat",
            "--local",
            "--model",
            "tiny",
            "--init-image",
            &init_image,
            "--outpaint",
            pad,
            "--data-dir",
            &d,
            "-o",
            out,
        ])
    };
    // Once an allocation abort (rc 134) and an overflow panic (rc 101).
    fails(
        &outpaint("99999,99999,99999,99999"),
        USAGE,
        "larger than 4096×4096",
    );
    fails(
        &outpaint("4294967295,1,1,1"),
        USAGE,
        "larger than 4096×4096",
    );
    fails(&outpaint("0,0,0,0"), USAGE, "no border");
    // Flags of `node` are named as flags, not as config keys.
    fails(
        &run(&["node", "--data-dir", &d, "--metrics", "nonsense"]),
        USAGE,
        "--metrics \"nonsense\" is not HOST:PORT",
    );
    fails(
        &run(&["node", "--data-dir", &d, "--listen", "garbage"]),
        USAGE,
        "--listen \"garbage\"",
    );
    fails(
        &run(&["node", "--data-dir", &d, "--provide", "--device", "tpu"]),
        USAGE,
        "--device \"tpu\": cpu, cuda or cuda:N",
    );
    fails(
        &run(&[
            "node",
            "--data-dir",
            &d,
            "--provide",
            "--device",
            "cuda",
            "--device",
            "cuda:0",
        ]),
        USAGE,
        "GPU 0 twice",
    );
    fails(
        &run(&["ledger", "deposit", "notapeer", "5", "--data-dir", &d]),
        USAGE,
        "is not a peer id",
    );
    fails(
        &run(&["ledger", "credit-limit", "notapeer", "-5", "--data-dir", &d]),
        USAGE,
        "is not a peer id",
    );
}
