//! Reachability across real NATs: the test builds Linux network namespaces (an "internet", two
//! home routers that masquerade with nftables, a home behind each), runs real `pixmarket`
//! processes in them, and checks which path each job took and what `pixmarket doctor` says.
//!
//! - internet (11.0.0.1): a relay (`--relay`) and a second public node, the bootstrap peers.
//! - home 1 (192.168.1.2 behind 11.0.1.2): the provider (`--provide`, the random-weights tiny
//!   model, whose noise makes a 1024² result several MB).
//! - home 2 (192.168.2.2 behind 11.0.2.2): the requester (`pixmarket generate --bootstrap`).
//!
//! Topologies, each with its verdict and its job's path:
//! 1. both NATs endpoint-independent (`masquerade`): "behind NAT, hole-punchable"; a multi-MB
//!    result arrives hole-punched; the relay restarts and the provider holds a reservation
//!    again within [`REACHABLE_AGAIN`].
//! 2. the provider's NAT endpoint-dependent (`masquerade random`), coordination-only relay:
//!    "relayed only"; the job is refused at the quote with the relay's limit, nothing paid.
//! 3. the same NAT, a relay whose operator allows results: the job arrives relayed.
//! 4. the provider on the internet itself: "public"; the job arrives directly.
//! 5. the provider behind a NAT with no relay to bootstrap from: "unreachable".
//! 6. that NAT running Debian's miniupnpd as the home's UPnP gateway, and the provider started
//!    with `--upnp`: "public" through the mapped port; the job arrives directly.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables) and `miniupnpd` (miniupnpd-nftables); run it by hand (`cargo test --workspace
//! --locked --test netns -- --ignored`); `.ci/run` runs it after the default tests, and says
//! plainly when a machine cannot make a network namespace at all. Without root it fails and
//! says why rather than passing without having tested anything.
//!
//! To look into a run: `PMX_NETNS_KEEP=1` keeps its folder (each node's log, each purchase's
//! log beside its picture), and `PMX_NODE_LOG` / `PMX_BUY_LOG` replace the nodes' and the
//! purchases' `RUST_LOG`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long the provider may take to hold a reservation again after the relay restarts. A
/// killed relay sends no QUIC close, so the provider notices only when QUIC gives the
/// connection up (its 10 s idle timeout, later when quinn's loss timers run longer) and asks
/// again after the first backoff (1 s); the restarted relay serves at once (it takes its public
/// listen addresses as external), and if a try still lands before that, the relay's identify
/// announcement brings the next one forward. Measured (1b. in the output): 13.8 s and 15.0 s on
/// a loaded 2-core machine (14.5 s a third time), so 30 s leaves room for a slower one.
const REACHABLE_AGAIN: Duration = Duration::from_secs(30);
/// Waits for a node to reach a state (a verdict, a reservation) give up after this: AutoNAT
/// probes every 5 s and a reservation takes one round trip, so a minute is ample.
const STATE_WAIT: Duration = Duration::from_secs(60);
/// The hole-punched result's side: 1024² of the noise model's pixels after 4 steps is about
/// 2.4 MB of PNG (one step draws a flat picture).
const BIG_SIDE: &str = "1024";
/// The other jobs' side: 256² still needs more than a coordination-only circuit carries.
const SMALL_SIDE: &str = "256";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pixmarket")
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn sh(args: &[&str]) {
    run(Command::new(args[0]).args(&args[1..]));
}

/// The namespaces of one test run; deleting them removes their links and rules too.
struct Net {
    prefix: String,
}

impl Net {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn build() -> Net {
        let net = Net {
            prefix: format!("pmx{}", std::process::id() % 100_000),
        };
        let p = &net.prefix;
        for n in ["inet", "nat1", "home1", "nat2", "home2"] {
            sh(&["ip", "netns", "add", &net.ns(n)]);
            sh(&["ip", "-n", &net.ns(n), "link", "set", "lo", "up"]);
        }
        let inet = net.ns("inet");
        sh(&["ip", "-n", &inet, "addr", "add", "11.0.0.1/32", "dev", "lo"]);
        for i in ["1", "2"] {
            let nat = net.ns(&format!("nat{i}"));
            let home = net.ns(&format!("home{i}"));
            let (up_in, up_nat) = (format!("{p}i{i}"), format!("{p}n{i}"));
            let (lan_nat, lan_home) = (format!("{p}l{i}"), format!("{p}h{i}"));
            sh(&[
                "ip", "link", "add", &up_in, "netns", &inet, "type", "veth", "peer", "name",
                &up_nat, "netns", &nat,
            ]);
            sh(&[
                "ip", "link", "add", &lan_nat, "netns", &nat, "type", "veth", "peer", "name",
                &lan_home, "netns", &home,
            ]);
            let wan = format!("11.0.{i}.2/24");
            let lan = format!("192.168.{i}.1/24");
            for (ns, dev, addr) in [
                (&inet, &up_in, format!("11.0.{i}.1/24")),
                (&nat, &up_nat, wan),
                (&nat, &lan_nat, lan),
                (&home, &lan_home, format!("192.168.{i}.2/24")),
            ] {
                sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", dev]);
                sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            }
            sh(&[
                "ip",
                "-n",
                &nat,
                "route",
                "add",
                "default",
                "via",
                &format!("11.0.{i}.1"),
            ]);
            sh(&[
                "ip",
                "-n",
                &home,
                "route",
                "add",
                "default",
                "via",
                &format!("192.168.{i}.1"),
            ]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &nat,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
            net.set_nat(i, false);
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &inet,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        net
    }

    /// Home router `i` masquerades its LAN: keeping ports (endpoint-independent, hole-punchable)
    /// or with `random` (a fresh port per connection: endpoint-dependent, "symmetric"), and
    /// drops unsolicited packets from outside.
    fn set_nat(&self, i: &str, symmetric: bool) {
        let nat = self.ns(&format!("nat{i}"));
        let wan = format!("{}n{i}", self.prefix);
        let _ = Command::new("ip")
            .args(["netns", "exec", &nat, "nft", "delete", "table", "ip", "pmx"])
            .output();
        let nft = |rule: &[&str]| {
            let mut args = vec!["ip", "netns", "exec", &nat, "nft"];
            args.extend_from_slice(rule);
            sh(&args);
        };
        nft(&["add", "table", "ip", "pmx"]);
        nft(&["add chain ip pmx post { type nat hook postrouting priority 100 ; }"]);
        let mut rule = vec![
            "add",
            "rule",
            "ip",
            "pmx",
            "post",
            "oifname",
            &wan,
            "masquerade",
        ];
        if symmetric {
            rule.push("random");
        }
        nft(&rule);
        // Like a home router, drop what nobody inside asked for. Dropped here, an unsolicited
        // packet (a peer's half of a hole punch arriving first) leaves no conntrack entry that
        // would make the masquerade pick another port for our own half.
        nft(&["add chain ip pmx in { type filter hook input priority 0 ; }"]);
        nft(&[
            "add", "rule", "ip", "pmx", "in", "iifname", &wan, "ct", "state", "new", "drop",
        ]);
    }
}

/// miniupnpd's nftables skeleton on a home router: the chains it fills with a forward accept
/// and a DNAT per mapping (its own `nft_init.sh` makes the same ones, but with a forward policy
/// of drop, which would cut the router's other traffic).
const UPNP_TABLES: &str = "table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
";

impl Net {
    /// Starts Debian's miniupnpd (nftables build) on home router `i` as the home's UPnP
    /// gateway: it answers SSDP on the LAN and maps ports of the home's hosts on its WAN side.
    fn start_upnp(&self, i: &str, dir: &Path) -> Proc {
        let nat = self.ns(&format!("nat{i}"));
        let tables = dir.join(format!("upnp{i}.nft"));
        std::fs::write(&tables, UPNP_TABLES).unwrap();
        sh(&[
            "ip",
            "netns",
            "exec",
            &nat,
            "nft",
            "-f",
            tables.to_str().unwrap(),
        ]);
        let config = dir.join(format!("miniupnpd{i}.conf"));
        std::fs::write(
            &config,
            format!(
                "ext_ifname={p}n{i}\nlistening_ip={p}l{i}\nhttp_port=0\nenable_natpmp=no\n\
                 enable_upnp=yes\nsecure_mode=yes\nsystem_uptime=yes\n\
                 uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07{i}\n\
                 allow 1024-65535 192.168.{i}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
                p = self.prefix
            ),
        )
        .unwrap();
        let log = dir.join(format!("miniupnpd{i}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &nat, "miniupnpd", "-d", "-f"])
            .arg(&config)
            .arg("-P")
            .arg(dir.join(format!("miniupnpd{i}.pid")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let proc = Proc { child, log };
        let start = Instant::now();
        while !read(&proc.log).contains("HTTP listening on port") {
            assert!(
                start.elapsed() < STATE_WAIT,
                "miniupnpd did not start: {}",
                read(&proc.log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        proc
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in ["inet", "nat1", "home1", "nat2", "home2"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
    }
}

/// A `pixmarket` process in a namespace, killed when dropped; its stderr goes to a log file
/// that a failing assertion prints.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn in_ns(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, bin()]);
    c.env_remove("PIXMARKET_DATA_DIR");
    c
}

fn pixmarket(ns: &str, args: &[&str]) -> String {
    String::from_utf8(run(in_ns(ns).args(args)).stdout).unwrap()
}

/// Starts `pixmarket node ARGS` in `ns` and waits for its first "listening on" line.
fn node(ns: &str, dir: &Path, args: &[&str]) -> Proc {
    let log = dir.with_extension("log");
    let mut child = in_ns(ns)
        .arg("node")
        .arg("--data-dir")
        .arg(dir)
        .args(["--no-mdns"])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("PMX_NODE_LOG")
                .unwrap_or("warn,pixmarket_node=info,libp2p_kad=error".into()),
        )
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("listening on ") => break,
            Some(_) => {}
            None => panic!("node in {ns} exited: {}", read(&log)),
        }
    }
    // Keep draining stdout so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc { child, log }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn init(dir: &Path) -> String {
    let d = dir.to_str().unwrap();
    run(Command::new(bin()).args(["init", "--data-dir", d]));
    String::from_utf8(run(Command::new(bin()).args(["id", "--data-dir", d])).stdout)
        .unwrap()
        .trim()
        .to_owned()
}

/// `pixmarket doctor` for `dir`, until its verdict line is `want` (or [`STATE_WAIT`] passes).
fn await_verdict(dir: &Path, want: &str, logs: &[&Proc]) -> String {
    let line = format!("verdict: {want}");
    await_report(dir, &format!("verdict {want:?}"), logs, |text| {
        text.lines().any(|l| l == line)
    })
}

/// `pixmarket doctor` for `dir`, until `done` holds for its report (or [`STATE_WAIT`] passes,
/// and the failure names `what`).
fn await_report(dir: &Path, what: &str, logs: &[&Proc], done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let o = Command::new(bin())
            .args(["doctor", "--data-dir", dir.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if done(&text) {
            return text;
        }
        assert!(
            start.elapsed() < STATE_WAIT,
            "never saw {what}:\n{text}{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            logs.iter()
                .map(|p| read(&p.log))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn await_advert(ns: &str, requester: &Path, bootstrap: &str, provider: &str, want: &str) {
    let start = Instant::now();
    loop {
        let o = in_ns(ns)
            .args(["providers", "--data-dir", requester.to_str().unwrap()])
            .args(["--bootstrap", bootstrap])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text
            .lines()
            .any(|l| l.contains(provider) && l.contains(want))
        {
            return;
        }
        assert!(
            start.elapsed() < STATE_WAIT,
            "no advert of {provider} with {want}:\n{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Buys one image from the market in `ns`; returns (succeeded, stdout+stderr).
fn buy(ns: &str, dir: &Path, bootstrap: &str, side: &str, out: &Path) -> (bool, String) {
    let o = in_ns(ns)
        .args([
            "generate",
            "a lighthouse at dusk",
            "--data-dir",
            dir.to_str().unwrap(),
            "--bootstrap",
            bootstrap,
            "--width",
            side,
            "--height",
            side,
            "--steps",
            "4",
            "--max-cost",
            "50",
            "-o",
            out.to_str().unwrap(),
        ])
        .env(
            "RUST_LOG",
            std::env::var("PMX_BUY_LOG")
                .unwrap_or("warn,pixmarket_node=info,libp2p_kad=error".into()),
        )
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // Beside the picture, for a run kept with `PMX_NETNS_KEEP`.
    std::fs::write(out.with_extension("log"), &text).unwrap();
    (o.status.success(), text)
}

/// `text` without terminal colour sequences (`ESC [ … m`).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The path `generate`'s report names for the delivered job (its `path: …` line).
fn path_of(log: &str) -> String {
    let log = plain(log);
    log.lines()
        .find_map(|l| l.strip_prefix("path: "))
        .unwrap_or_else(|| panic!("no path in the report:\n{log}"))
        .to_owned()
}

struct Relay {
    dir: PathBuf,
    addr: String,
}

fn start_relay(ns: &str, relay: &Relay) -> Proc {
    node(
        ns,
        &relay.dir,
        &[
            "--relay",
            "--listen",
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "--listen",
            "/ip4/0.0.0.0/tcp/4001",
        ],
    )
}

/// A provider's data folder with credit for `requester` and a fresh key.
fn provider_dir(root: &Path, name: &str, requester: &str) -> (PathBuf, String) {
    let dir = root.join(name);
    let id = init(&dir);
    run(Command::new(bin()).args([
        "ledger",
        "deposit",
        requester,
        "1000",
        "--data-dir",
        dir.to_str().unwrap(),
    ]));
    (dir, id)
}

/// Writes the random-weights tiny model: its pictures are noise, so a 1024² PNG is megabytes.
fn noise_model(root: &Path) -> PathBuf {
    let dir = root.join("noise-model");
    run(Command::new(bin()).args(["model", "tiny", "--random", "--out", dir.to_str().unwrap()]));
    dir
}

fn provider(ns: &str, dir: &Path, model: &Path, port: u16, bootstrap: &[&str]) -> Proc {
    provider_with(ns, dir, model, port, bootstrap, &[])
}

fn provider_with(
    ns: &str,
    dir: &Path,
    model: &Path,
    port: u16,
    bootstrap: &[&str],
    extra: &[&str],
) -> Proc {
    let quic = format!("/ip4/0.0.0.0/udp/{port}/quic-v1");
    let tcp = format!("/ip4/0.0.0.0/tcp/{port}");
    let model = model.to_str().unwrap();
    let mut args = vec![
        "--provide",
        "--model",
        model,
        "--listen",
        &quic,
        "--listen",
        &tcp,
    ];
    for b in bootstrap {
        args.extend(["--bootstrap", b]);
    }
    args.extend_from_slice(extra);
    node(ns, dir, &args)
}

#[test]
#[ignore = "needs root, iproute2, nftables and miniupnpd; .ci/run runs it"]
fn jobs_cross_home_nats_by_hole_punching_or_a_relay_and_doctor_tells_which() {
    let root_ok = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    assert!(
        root_ok,
        "this test builds network namespaces and NAT rules, which needs root: run it as root \
         with iproute2, nftables and miniupnpd-nftables installed"
    );
    for tool in ["ip", "nft", "miniupnpd"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false),
            "`{tool}` is missing: apt-get install -y iproute2 nftables miniupnpd-nftables"
        );
    }
    let tmp = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("PMX_NETNS_KEEP").is_some())
        .tempdir()
        .unwrap();
    eprintln!("files and logs in {}", tmp.path().display());
    let net = Net::build();
    let model = noise_model(tmp.path());
    let inet = net.ns("inet");
    let (home1, home2) = (net.ns("home1"), net.ns("home2"));

    let requester = tmp.path().join("requester");
    let requester_id = init(&requester);
    let relay = Relay {
        dir: tmp.path().join("relay"),
        addr: String::new(),
    };
    let relay_id = init(&relay.dir);
    let relay = Relay {
        addr: format!("/ip4/11.0.0.1/udp/4001/quic-v1/p2p/{relay_id}"),
        ..relay
    };
    let public = tmp.path().join("public");
    let public_id = init(&public);
    let public_addr = format!("/ip4/11.0.0.1/udp/4002/quic-v1/p2p/{public_id}");
    let mut relay_proc = start_relay(&inet, &relay);
    let public_proc = node(
        &inet,
        &public,
        &[
            "--listen",
            "/ip4/0.0.0.0/udp/4002/quic-v1",
            "--bootstrap",
            &relay.addr,
        ],
    );

    // 1. Two endpoint-independent NATs: hole punching.
    let (p1, id1) = provider_dir(tmp.path(), "provider1", &requester_id);
    let prov = provider(&home1, &p1, &model, 4101, &[&relay.addr, &public_addr]);
    let report = await_verdict(&p1, "behind NAT, hole-punchable", &[&prov, &relay_proc]);
    assert!(report.contains("relayed: reservation held"), "{report}");
    assert!(report.contains("endpoint-independent"), "{report}");
    await_advert(&home2, &requester, &relay.addr, &id1, "p2p-circuit");
    let out = tmp.path().join("punched.png");
    let (ok, log) = buy(&home2, &requester, &relay.addr, BIG_SIDE, &out);
    assert!(ok, "{log}\n{}", read(&prov.log));
    assert_eq!(path_of(&log), "hole-punched", "{log}");
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"));
    assert!(
        bytes.len() > 1_000_000,
        "a multi-MB result: {} bytes",
        bytes.len()
    );
    eprintln!("1. hole-punched: {} bytes arrived", bytes.len());

    // The relay restarts: the provider holds a reservation on it again in time.
    drop(relay_proc);
    let start = Instant::now();
    relay_proc = start_relay(&inet, &relay);
    let report = loop {
        let r = pixmarket_doctor_json(&p1);
        let again = r["relays"].as_array().is_some_and(|rs| {
            rs.iter()
                .any(|x| x["state"]["state"] == "reserved" && x["attempts"].as_u64() >= Some(2))
        });
        if again {
            break r;
        }
        assert!(
            start.elapsed() < REACHABLE_AGAIN,
            "no reservation {REACHABLE_AGAIN:?} after the relay restarted: {r:#}\n{}",
            read(&prov.log)
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "1b. reserved again {:?} after the relay restarted: {}",
        start.elapsed(),
        report["relays"]
    );
    drop(prov);

    // 2. An endpoint-dependent NAT and a relay for coordination only: refused up front.
    net.set_nat("1", true);
    let (p2, id2) = provider_dir(tmp.path(), "provider2", &requester_id);
    let prov = provider(&home1, &p2, &model, 4102, &[&relay.addr, &public_addr]);
    let report = await_verdict(&p2, "relayed only", &[&prov, &relay_proc]);
    assert!(report.contains("endpoint-dependent"), "{report}");
    await_advert(&home2, &requester, &relay.addr, &id2, "p2p-circuit");
    let before = pixmarket(
        &home2,
        &[
            "ledger",
            "receipts",
            "--data-dir",
            requester.to_str().unwrap(),
        ],
    );
    let (ok, log) = buy(
        &home2,
        &requester,
        &relay.addr,
        SMALL_SIDE,
        &tmp.path().join("refused.png"),
    );
    assert!(!ok, "bought through a coordination-only relay:\n{log}");
    assert!(log.contains("cannot cross the relayed connection"), "{log}");
    let after = pixmarket(
        &home2,
        &[
            "ledger",
            "receipts",
            "--data-dir",
            requester.to_str().unwrap(),
        ],
    );
    assert_eq!(before, after, "nothing is paid for a refused job");
    assert!(read(&prov.log).contains("refusing a job the relay cannot carry"));
    eprintln!("2. relayed only, coordination relay: refused before any work");
    drop(prov);

    // 3. The relay's operator allows results: relayed.
    drop(relay_proc);
    let config = relay.dir.join("config.toml");
    let text = read(&config);
    assert!(text.contains("relay_circuit_bytes = 131072"), "{text}");
    let text = text.replace(
        "relay_circuit_bytes = 131072",
        "relay_circuit_bytes = 67108864",
    );
    std::fs::write(&config, text).unwrap();
    relay_proc = start_relay(&inet, &relay);
    let (p3, id3) = provider_dir(tmp.path(), "provider3", &requester_id);
    let prov = provider(&home1, &p3, &model, 4103, &[&relay.addr, &public_addr]);
    let report = await_verdict(&p3, "relayed only", &[&prov, &relay_proc]);
    assert!(report.contains("67108864 bytes"), "{report}");
    await_advert(&home2, &requester, &relay.addr, &id3, "p2p-circuit");
    let out = tmp.path().join("relayed.png");
    let (ok, log) = buy(&home2, &requester, &relay.addr, SMALL_SIDE, &out);
    assert!(ok, "{log}\n{}", read(&prov.log));
    assert_eq!(path_of(&log), "relayed", "{log}");
    eprintln!(
        "3. relayed: {} bytes arrived",
        std::fs::read(&out).unwrap().len()
    );
    drop(prov);

    // 4. A provider on the internet: public, direct.
    let (p4, id4) = provider_dir(tmp.path(), "provider4", &requester_id);
    let prov = provider(&inet, &p4, &model, 4104, &[&relay.addr, &public_addr]);
    await_verdict(&p4, "public", &[&prov]);
    await_advert(
        &home2,
        &requester,
        &relay.addr,
        &id4,
        "/ip4/11.0.0.1/udp/4104",
    );
    let (ok, log) = buy(
        &home2,
        &requester,
        &relay.addr,
        SMALL_SIDE,
        &tmp.path().join("direct.png"),
    );
    assert!(ok, "{log}\n{}", read(&prov.log));
    assert_eq!(path_of(&log), "direct", "{log}");
    eprintln!("4. public: direct");
    drop(prov);

    // 5. Behind a NAT with no relay to bootstrap from (the relay is stopped, so Kademlia
    // cannot lead the provider to it either): unreachable.
    drop(relay_proc);
    let (p5, _) = provider_dir(tmp.path(), "provider5", &requester_id);
    let prov = provider(&home1, &p5, &model, 4105, &[&public_addr]);
    let report = await_verdict(&p5, "unreachable", &[&prov, &public_proc]);
    assert!(report.contains("could not dial back"), "{report}");
    eprintln!("5. unreachable without a relay");
    drop(prov);

    // 6. The same endpoint-dependent NAT, now a UPnP gateway, and a provider that asks it for
    // a mapping (`--upnp`): the mapped port is confirmed from outside, so it is public and the
    // job arrives directly, still with no relay anywhere.
    let upnp = net.start_upnp("1", tmp.path());
    let (p6, id6) = provider_dir(tmp.path(), "provider6", &requester_id);
    let prov = provider_with(&home1, &p6, &model, 4106, &[&public_addr], &["--upnp"]);
    // Both mapped ports, each confirmed by a dial back from outside: UPnP's own word is not
    // taken, whether or not identify proposed the same address first (it does so for at
    // most one transport, and only if it beats the gateway's answer).
    let mapped = ["/ip4/11.0.1.2/udp/4106/quic-v1", "/ip4/11.0.1.2/tcp/4106"];
    let report = await_report(
        &p6,
        "both mapped ports dialled back",
        &[&prov, &upnp],
        |t| {
            mapped.iter().all(|a| {
                t.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{a}: public: ")))
            })
        },
    );
    assert!(report.contains("verdict: public"), "{report}");
    assert!(
        report.contains("upnp: mapped /ip4/192.168.1.2/"),
        "{report}"
    );
    await_advert(&home2, &requester, &public_addr, &id6, "/ip4/11.0.1.2/");
    let (ok, log) = buy(
        &home2,
        &requester,
        &public_addr,
        SMALL_SIDE,
        &tmp.path().join("upnp.png"),
    );
    assert!(ok, "{log}\n{}\n{}", read(&prov.log), read(&upnp.log));
    assert_eq!(path_of(&log), "direct", "{log}");
    eprintln!("6. UPnP-mapped behind the endpoint-dependent NAT: public, direct");
    drop(prov);
    drop(upnp);
    drop(public_proc);
}

fn pixmarket_doctor_json(dir: &Path) -> serde_json::Value {
    let o = Command::new(bin())
        .args(["doctor", "--json", "--data-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}
