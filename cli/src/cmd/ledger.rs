//! `pixmarket ledger ...`: the node's books on the command line. Each subcommand opens the
//! data folder's ledger (refusing a locked, corrupt, foreign or other node's one), calls
//! `pixmarket_ledger`, and prints the result for a person.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::DataDir;
use pixmarket_protocol::{DepositNote, MicroTokens, PublicKey, Signed};

use super::DataDirArg;
use crate::usage::{out, usage};

#[derive(Debug, Args)]
pub(crate) struct LedgerArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Print each counterparty's deposits, credit, charges, holds and what is available.
    Balance {
        /// Print one JSON object on stdout (amounts as token strings and as micro-tokens).
        #[arg(long)]
        json: bool,
    },
    /// List receipts in order, with their cumulative totals, whether they are acknowledged,
    /// and whether an undelivered one was refunded.
    Receipts {
        /// Only this peer's receipts.
        #[arg(long, value_name = "PEER-ID")]
        peer: Option<String>,
        /// Print one JSON object per receipt, one per line, on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Replay the whole log: check every link and signature and recompute every balance.
    Verify,
    /// Write the log (or one pair's part of it) as JSON lines for a third party to audit.
    Export {
        /// Only the entries that concern this peer.
        #[arg(long, value_name = "PEER-ID")]
        peer: Option<String>,
        /// Write to this new file (an existing file is never overwritten) instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Audit an export: check its hashes, links, signatures and rules, recompute its
    /// balances, and compare them with this node's own books where they share a pair.
    /// Nothing is written.
    Import {
        /// The export file (JSON lines).
        file: PathBuf,
    },
    /// Record that a peer prepaid tokens to this node (a deposit note signed by this node).
    Deposit {
        /// The peer's id (12D3KooW...).
        peer: String,
        /// Tokens, a non-negative decimal with up to 6 places, e.g. 15 or 0.25.
        #[arg(allow_hyphen_values = true)]
        tokens: String,
        /// A note kept with the deposit (at most 256 characters).
        #[arg(long, default_value = "")]
        memo: String,
    },
    /// Set what a peer may owe this node beyond its deposits.
    CreditLimit {
        /// The peer's id (12D3KooW...).
        peer: String,
        /// Tokens, a non-negative decimal with up to 6 places.
        #[arg(allow_hyphen_values = true)]
        tokens: String,
    },
    /// Set the credit a peer gets when first seen (default 0); known peers keep theirs.
    DefaultCredit {
        /// Tokens, a non-negative decimal with up to 6 places.
        #[arg(allow_hyphen_values = true)]
        tokens: String,
    },
}

fn parse_peer(text: &str) -> anyhow::Result<PublicKey> {
    PublicKey::from_peer_id_str(text)
        .or_else(|_| text.parse::<PublicKey>())
        .map_err(|e| usage!("'{text}' is not a peer id (expected 12D3KooW...): {e}"))
}

fn parse_tokens(text: &str) -> anyhow::Result<MicroTokens> {
    if text.trim_start().starts_with('-') {
        return Err(usage!(
            "'{text}' is negative; amounts are tokens of 0 or more"
        ));
    }
    text.parse::<MicroTokens>()
        .map_err(|e| usage!("invalid amount '{text}': {e}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Opened {
    ledger: Ledger,
    key: pixmarket_protocol::SecretKey,
}

fn open(data_dir: &Path) -> anyhow::Result<Opened> {
    let dir = DataDir::open(data_dir)?;
    let key = dir.identity()?;
    let ledger =
        Ledger::open(&dir.ledger_path(), key.public()).context("cannot open the ledger")?;
    Ok(Opened { ledger, key })
}

fn show_peer(p: &PublicKey) -> String {
    p.to_peer_id().to_string()
}

pub(crate) fn run(args: LedgerArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.path()?;
    match args.command {
        LedgerCommand::Balance { json: false } => balance(&open(&data_dir)?.ledger),
        LedgerCommand::Balance { json: true } => balance_json(&open(&data_dir)?.ledger),
        LedgerCommand::Receipts { peer, json } => {
            let peer = peer.as_deref().map(parse_peer).transpose()?;
            receipts(&open(&data_dir)?.ledger, peer.as_ref(), json)
        }
        LedgerCommand::Verify => {
            let o = open(&data_dir)?;
            let r = o.ledger.verify().context("the ledger does not verify")?;
            out!(
                "ok: {} log entries, chain intact to {}, every signature valid, balances match",
                r.entries,
                hex::encode(r.head.hash.as_bytes())
            )?;
            out!(
                "{} accounts, {} receipts ({} acknowledged, {} credited back by {} credit notes, {} paid but undelivered), {} open holds",
                r.accounts.len(),
                r.receipts,
                r.acked_receipts,
                r.refunded_receipts,
                r.credit_notes,
                r.undelivered_receipts,
                r.open_holds
            )?;
            Ok(())
        }
        LedgerCommand::Export { peer, output } => {
            let peer = peer.as_deref().map(parse_peer).transpose()?;
            let o = open(&data_dir)?;
            let n = match &output {
                Some(path) => {
                    let file = File::options()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .with_context(|| {
                            format!(
                                "cannot create {} (an existing file is never overwritten)",
                                path.display()
                            )
                        })?;
                    let mut w = BufWriter::new(file);
                    let n = o.ledger.export(peer.as_ref(), &mut w)?;
                    w.into_inner()
                        .map_err(|e| e.into_error())
                        .and_then(|f| f.sync_all())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    n
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = stdout.lock();
                    let n = o.ledger.export(peer.as_ref(), &mut w)?;
                    w.flush()?;
                    n
                }
            };
            eprintln!("exported {n} log entries");
            Ok(())
        }
        LedgerCommand::Import { file } => import(&data_dir, &file),
        LedgerCommand::Deposit { peer, tokens, memo } => {
            let peer = parse_peer(&peer)?;
            let amount = parse_tokens(&tokens)?;
            let o = open(&data_dir)?;
            let note = DepositNote {
                deposit_id: rand::random(),
                account: peer,
                amount,
                memo,
                recorded_at_ms: now_ms(),
            };
            note.validate().context("invalid deposit")?;
            let signed = Signed::sign(&o.key, &note)?;
            o.ledger.deposit(&signed).context("deposit refused")?;
            let a = o.ledger.account(Role::Provider, &peer)?.unwrap_or_default();
            out!(
                "recorded a deposit of {amount} tokens from {}; they now have {} available",
                show_peer(&peer),
                a.available().unwrap_or_default()
            )?;
            Ok(())
        }
        LedgerCommand::CreditLimit { peer, tokens } => {
            let peer = parse_peer(&peer)?;
            let amount = parse_tokens(&tokens)?;
            let o = open(&data_dir)?;
            o.ledger
                .set_credit_limit(peer, amount)
                .context("credit limit refused")?;
            out!(
                "credit limit of {} set to {amount} tokens",
                show_peer(&peer)
            )?;
            Ok(())
        }
        LedgerCommand::DefaultCredit { tokens } => {
            let amount = parse_tokens(&tokens)?;
            let o = open(&data_dir)?;
            o.ledger.set_default_credit(amount)?;
            // The config's `new_peer_credit` must not undo this at the next start: record its
            // current value as dealt with (editing the config later still takes effect).
            let dir = DataDir::open(&data_dir)?;
            if let Ok(config) = dir.config() {
                dir.set_applied_peer_credit(&config.provider.new_peer_credit)?;
            }
            out!("peers seen from now on get {amount} tokens of credit")?;
            Ok(())
        }
    }
}

fn balance(l: &Ledger) -> anyhow::Result<()> {
    out!(
        "default credit for new peers: {} tokens",
        l.default_credit()?
    )?;
    for role in [Role::Provider, Role::Requester] {
        let accounts = l.accounts(role)?;
        out!()?;
        match role {
            Role::Provider => {
                let _ = out!("as provider (what requesters deposited with me and owe me):");
            }
            Role::Requester => {
                let _ = out!("as requester (what I deposited at and was charged by providers):");
            }
        }
        if accounts.is_empty() {
            out!("  (none)")?;
            continue;
        }
        out!(
            "  {:<52} {:>18} {:>18} {:>18} {:>18} {:>18} {:>8}",
            "PEER",
            "DEPOSITS",
            "CREDIT",
            "CHARGED",
            "HELD",
            "AVAILABLE",
            "RECEIPTS"
        )?;
        for (peer, a) in accounts {
            let available = match a.available() {
                Some(v) => v.to_string(),
                None => "overdrawn".to_owned(),
            };
            out!(
                "  {:<52} {:>18} {:>18} {:>18} {:>18} {:>18} {:>8}",
                show_peer(&peer),
                a.deposits.to_string(),
                a.credit_limit.to_string(),
                a.charged.to_string(),
                a.held.to_string(),
                available,
                a.entries
            )?;
        }
    }
    Ok(())
}

/// An amount for JSON: the token string people read and the exact micro-tokens scripts add.
fn amount(m: MicroTokens) -> serde_json::Value {
    serde_json::json!({ "tokens": m.to_string(), "micro": m.0 })
}

fn balance_json(l: &Ledger) -> anyhow::Result<()> {
    let mut roles = serde_json::Map::new();
    for role in [Role::Provider, Role::Requester] {
        let accounts: Vec<_> = l
            .accounts(role)?
            .into_iter()
            .map(|(peer, a)| {
                serde_json::json!({
                    "peer": show_peer(&peer),
                    "deposits": amount(a.deposits),
                    "credit_limit": amount(a.credit_limit),
                    "charged": amount(a.charged),
                    "held": amount(a.held),
                    // null when overdrawn (a requester's mirror of credit it did not record).
                    "available": a.available().map(amount),
                    "chain_entries": a.entries,
                })
            })
            .collect();
        roles.insert(role.to_string(), serde_json::Value::Array(accounts));
    }
    out!(
        "{}",
        serde_json::json!({
            "default_credit": amount(l.default_credit()?),
            "accounts": roles,
        })
    )?;
    Ok(())
}

fn receipts(l: &Ledger, peer: Option<&PublicKey>, json: bool) -> anyhow::Result<()> {
    let all = l.receipts(peer)?;
    if json {
        for stored in all {
            let r = stored
                .receipt
                .verify()
                .context("a stored receipt does not verify; run `pixmarket ledger verify`")?;
            let other = match stored.role {
                Role::Provider => r.requester,
                Role::Requester => r.provider,
            };
            out!(
                "{}",
                serde_json::json!({
                    "role": stored.role.to_string(),
                    "job": r.job_id.to_string(),
                    "peer": show_peer(&other),
                    "cost": amount(r.cost),
                    "cumulative": amount(r.cumulative_charged),
                    "acked": stored.ack.is_some(),
                    "refunded": stored.refunded,
                    "receipt": stored.receipt.digest().to_string(),
                })
            )?;
        }
        return Ok(());
    }
    if all.is_empty() {
        out!("no receipts")?;
        return Ok(());
    }
    out!(
        "{:<9} {:<32} {:<52} {:>16} {:>18} {:<5}",
        "ROLE",
        "JOB",
        "PEER",
        "COST",
        "CUMULATIVE",
        "ACKED"
    )?;
    for stored in all {
        let r = stored
            .receipt
            .verify()
            .context("a stored receipt does not verify; run `pixmarket ledger verify`")?;
        let other = match stored.role {
            Role::Provider => r.requester,
            Role::Requester => r.provider,
        };
        out!(
            "{:<9} {:<32} {:<52} {:>16} {:>18} {:<5}",
            stored.role.to_string(),
            r.job_id.to_string(),
            show_peer(&other),
            r.cost.to_string(),
            r.cumulative_charged.to_string(),
            if stored.ack.is_some() { "yes" } else { "no" }
        )?;
        if let Some(why) = &stored.refunded {
            out!("          refunded, not charged: {why}")?;
        }
    }
    Ok(())
}

fn import(data_dir: &Path, file: &Path) -> anyhow::Result<()> {
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let report = pixmarket_ledger::import(&mut BufReader::new(f))
        .with_context(|| format!("{} does not verify", file.display()))?;
    out!(
        "ok: {} entries of {}'s ledger verify ({}), every signature valid",
        report.entries,
        show_peer(&report.owner),
        if report.complete_chain {
            "the whole chain from genesis to head"
        } else {
            "one pair's entries; links between non-adjacent entries are not checked"
        }
    )?;
    out!(
        "{} receipts ({} acknowledged), {} open holds",
        report.receipts,
        report.acked_receipts,
        report.open_holds
    )?;
    for (role, peer, a) in &report.accounts {
        out!(
            "  as {role} with {}: deposits {}, credit {}, charged {}, held {}, {} chain entries",
            show_peer(peer),
            a.deposits,
            a.credit_limit,
            a.charged,
            a.held,
            a.entries
        )?;
    }
    // Reconcile with my own books where the export's owner is my counterparty: their side of
    // our pair must equal my mirror of it (same cumulative total, same last receipt).
    let Ok(dir) = DataDir::open(data_dir) else {
        return Ok(());
    };
    let o = open(dir.root())?;
    let me = o.ledger.owner();
    for (role, peer, theirs) in &report.accounts {
        if *peer != me {
            continue;
        }
        let my_role = match role {
            Role::Provider => Role::Requester,
            Role::Requester => Role::Provider,
        };
        let mine = o
            .ledger
            .account(my_role, &report.owner)?
            .unwrap_or_default();
        if mine.charged == theirs.charged && mine.last_entry == theirs.last_entry {
            out!(
                "reconciled: my books agree with theirs on our pair ({} charged over {} chain entries)",
                mine.charged,
                mine.entries
            )?;
        } else {
            bail!(
                "my books disagree with theirs on our pair: I have {} charged over {} chain entries, they have {} over {}",
                mine.charged,
                mine.entries,
                theirs.charged,
                theirs.entries
            );
        }
    }
    Ok(())
}
