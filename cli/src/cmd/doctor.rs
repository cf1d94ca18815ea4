//! `pixmarket doctor`: how reachable this node is, per address, what it tried, and one
//! sentence on what the operator can do. It reads the snapshot the running node rewrites in
//! its data folder (`reachability.json`), so it works beside a running node and shows what a
//! stopped one last knew.

use clap::Args;
use pixmarket_node::network::reachability::{AddrState, Mapping, RelayState};
use pixmarket_node::reach_file;

use super::DataDirArg;
use crate::usage::out;

/// A snapshot older than this was not written by a running node (it rewrites it every 2 s).
const STALE_MS: u64 = 10_000;

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Print the snapshot as JSON instead.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let root = args.data_dir.path()?;
    let r = reach_file::read(&root)?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    let age_ms = pixmarket_node::now_ms().saturating_sub(r.updated_at_ms);
    out!("node {}", r.peer_id)?;
    if age_ms > STALE_MS {
        out!(
            "note: this snapshot is {} s old, so the node is not running; it shows what the node \
             knew when it stopped",
            age_ms / 1000
        )?;
    }
    out!("verdict: {}", r.verdict().as_str())?;
    out!("listening on:")?;
    for a in &r.listen {
        out!("  {a}")?;
    }
    out!("addresses tested from outside (AutoNAT v2):")?;
    if r.addresses.is_empty() {
        out!("  none yet (no peer has told us where it sees us)")?;
    }
    for a in &r.addresses {
        let state = match &a.state {
            AddrState::Untested => "not tested yet".to_owned(),
            AddrState::Reachable { confirmed_by } => {
                format!("public: {confirmed_by} dialled back and reached us")
            }
            AddrState::Unreachable { tested_by, error } => {
                format!("behind NAT or firewalled: {tested_by} could not dial back ({error})")
            }
        };
        out!("  {}: {state}", a.addr)?;
    }
    let mapping = match r.mapping() {
        Mapping::Unknown => "unknown (fewer than two peers saw us on one transport)",
        Mapping::EndpointIndependent => {
            "endpoint-independent: every peer saw the same port, so hole punching can work"
        }
        Mapping::EndpointDependent => {
            "endpoint-dependent (\"symmetric\"): peers saw different ports, so hole punching \
             will fail"
        }
    };
    out!("NAT port mapping: {mapping}")?;
    for (peer, addr) in &r.observed {
        out!("  {peer} saw us at {addr}")?;
    }
    out!("relays:")?;
    if r.relays.is_empty() {
        out!("  none (no bootstrap peer serves as a relay, or this node needs none)")?;
    }
    for relay in &r.relays {
        let state = match &relay.state {
            RelayState::Reserving => "asking for a reservation".to_owned(),
            RelayState::Reserved {
                circuit_bytes,
                circuit_secs,
            } => format!(
                "relayed: reservation held; a circuit carries up to {} for up to {}",
                circuit_bytes.map_or("any number of bytes".to_owned(), |b| format!("{b} bytes")),
                circuit_secs.map_or("any time".to_owned(), |s| format!("{s} s"))
            ),
            RelayState::Lost { reason } => format!("lost ({reason}); asking again"),
        };
        out!(
            "  {}: {state} ({} reservation(s) asked for; address {})",
            relay.relay,
            relay.attempts,
            relay.circuit_addr
        )?;
    }
    let p = &r.hole_punches;
    out!(
        "hole punches: {} succeeded, {} failed{}",
        p.succeeded,
        p.failed,
        p.last_error
            .as_ref()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    )?;
    out!("upnp: {}", r.upnp.as_deref().unwrap_or("off"))?;
    match r.relay_server_circuit_bytes {
        Some(b) => out!("serving as a relay: yes, circuits carry up to {b} bytes")?,
        None => out!("serving as a relay: no")?,
    }
    out!("what to do: {}", r.advice())?;
    Ok(())
}
