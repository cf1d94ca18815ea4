//! `pixmarket ledger ...`: the node's books on the command line. `balance`, `receipts`,
//! `deposit`, `prepaid`, `credit-limit` and `default-credit` go through the HTTP API of the node that runs
//! in the data folder (found through its `api.token` and `api.addr` files), so a running
//! node's books change without a restart; when no node answers there, and for the other
//! subcommands, the command opens the data folder's ledger itself (refusing a locked, corrupt,
//! foreign or other node's one), calls `pixmarket_ledger`, and prints the result for a person.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use pixmarket_api::client::Method;
use pixmarket_api::client::{ApiClient, ClientError};
use pixmarket_ledger::{Account, Ledger, Role};
use pixmarket_node::DataDir;
use pixmarket_protocol::{DepositNote, MicroTokens, PublicKey, Signed};
use serde_json::Value;

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
    /// Record that this node prepaid tokens to a provider (a note signed by this node), so
    /// `ledger balance` shows what is left to spend there instead of "overdrawn".
    Prepaid {
        /// The provider's peer id (12D3KooW...).
        provider: String,
        /// Tokens, a non-negative decimal with up to 6 places, e.g. 15 or 0.25.
        #[arg(allow_hyphen_values = true)]
        tokens: String,
        /// A note kept with the prepayment (at most 256 characters).
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

/// The running node's API when one serves this data folder, so its books are changed through
/// the node that holds them open (never by a second opener of the store).
fn running(data_dir: &Path) -> Option<ApiClient> {
    ApiClient::find(data_dir)
}

/// Calls the running node's API; `Ok(None)` when the files are stale (no node answers), so the
/// caller opens the ledger itself.
fn through_api(
    api: &ApiClient,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Option<Value>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match rt.block_on(api.call(method, path, body)) {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "the node running in this data folder (API at {}) did not do it",
            api.addr()
        ))),
    }
}

/// An `available` amount: its token string, "overdrawn" where it is null.
fn available_of(v: &Value) -> String {
    if v.is_null() {
        "overdrawn".to_owned()
    } else {
        tokens_of(v)
    }
}

/// Signs a note of `amount` paid and records it in the ledger directly (no node runs): as a
/// deposit from `peer` on the provider side, or as this node's prepayment to `peer` on the
/// requester side. Returns the account as it now stands.
fn record_note(
    data_dir: &Path,
    peer: PublicKey,
    amount: MicroTokens,
    memo: String,
    role: Role,
) -> anyhow::Result<Account> {
    let o = open(data_dir)?;
    let note = DepositNote {
        deposit_id: rand::random(),
        account: peer,
        amount,
        memo,
        recorded_at_ms: now_ms(),
    };
    let (invalid, refused) = match role {
        Role::Provider => ("invalid deposit", "deposit refused"),
        Role::Requester => ("invalid prepayment", "prepayment refused"),
    };
    note.validate().context(invalid)?;
    let signed = Signed::sign(&o.key, &note)?;
    match role {
        Role::Provider => o.ledger.deposit(&signed),
        Role::Requester => o.ledger.prepaid(&signed),
    }
    .context(refused)?;
    Ok(o.ledger.account(role, &peer)?.unwrap_or_default())
}

/// A JSON amount's token string.
fn tokens_of(v: &Value) -> String {
    v.get("tokens")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

pub(crate) fn run(args: LedgerArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.path()?;
    let api = running(&data_dir);
    match args.command {
        LedgerCommand::Balance { json } => {
            let via_api = match &api {
                Some(api) => through_api(api, Method::GET, "/api/v1/accounts", None)?,
                None => None,
            };
            let value = match via_api {
                Some(v) => v,
                None => balance_value(&open(&data_dir)?.ledger)?,
            };
            if json {
                out!("{value}")?;
                Ok(())
            } else {
                print_balance(&value)
            }
        }
        LedgerCommand::Receipts { peer, json } => {
            let peer = peer.as_deref().map(parse_peer).transpose()?;
            let via_api = match &api {
                Some(api) => receipts_via_api(api, peer.as_ref())?,
                None => None,
            };
            let list = match via_api {
                Some(list) => list,
                None => receipt_values(&open(&data_dir)?.ledger, peer.as_ref())?,
            };
            print_receipts(&list, json)
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
            let body = serde_json::json!({ "tokens": amount.to_string(), "memo": memo });
            let path = format!("/api/v1/accounts/{}/deposits", show_peer(&peer));
            let via_api = match &api {
                Some(api) => through_api(api, Method::POST, &path, Some(&body))?,
                None => None,
            };
            let available = match via_api {
                Some(v) => v
                    .pointer("/account/available")
                    .map_or_else(|| "overdrawn".to_owned(), tokens_of),
                None => {
                    let a = record_note(&data_dir, peer, amount, memo, Role::Provider)?;
                    a.available().unwrap_or_default().to_string()
                }
            };
            out!(
                "recorded a deposit of {amount} tokens from {}; they now have {available} available",
                show_peer(&peer),
            )?;
            Ok(())
        }
        LedgerCommand::Prepaid {
            provider,
            tokens,
            memo,
        } => {
            let peer = parse_peer(&provider)?;
            let amount = parse_tokens(&tokens)?;
            let body = serde_json::json!({ "tokens": amount.to_string(), "memo": memo });
            let path = format!("/api/v1/accounts/{}/prepaid", show_peer(&peer));
            let via_api = match &api {
                Some(api) => through_api(api, Method::POST, &path, Some(&body))?,
                None => None,
            };
            let available = match via_api {
                Some(v) => v
                    .pointer("/account/available")
                    .map_or_else(|| "overdrawn".to_owned(), available_of),
                None => {
                    let a = record_note(&data_dir, peer, amount, memo, Role::Requester)?;
                    a.available()
                        .map_or_else(|| "overdrawn".to_owned(), |m| m.to_string())
                }
            };
            out!(
                "recorded a prepayment of {amount} tokens to {}; {available} tokens left to spend there",
                show_peer(&peer),
            )?;
            Ok(())
        }
        LedgerCommand::CreditLimit { peer, tokens } => {
            let peer = parse_peer(&peer)?;
            let amount = parse_tokens(&tokens)?;
            let body = serde_json::json!({ "tokens": amount.to_string() });
            let path = format!("/api/v1/accounts/{}/credit-limit", show_peer(&peer));
            let via_api = match &api {
                Some(api) => through_api(api, Method::PUT, &path, Some(&body))?,
                None => None,
            };
            if via_api.is_none() {
                let o = open(&data_dir)?;
                o.ledger
                    .set_credit_limit(peer, amount)
                    .context("credit limit refused")?;
            }
            out!(
                "credit limit of {} set to {amount} tokens",
                show_peer(&peer)
            )?;
            Ok(())
        }
        LedgerCommand::DefaultCredit { tokens } => {
            let amount = parse_tokens(&tokens)?;
            let body = serde_json::json!({ "tokens": amount.to_string() });
            let via_api = match &api {
                Some(api) => through_api(api, Method::PUT, "/api/v1/default-credit", Some(&body))?,
                None => None,
            };
            if via_api.is_none() {
                let o = open(&data_dir)?;
                o.ledger.set_default_credit(amount)?;
                // The config's `new_peer_credit` must not undo this at the next start: record
                // its current value as dealt with (editing the config later still takes effect).
                let dir = DataDir::open(&data_dir)?;
                if let Ok(config) = dir.config() {
                    dir.set_applied_peer_credit(&config.provider.new_peer_credit)?;
                }
            }
            out!("peers seen from now on get {amount} tokens of credit")?;
            Ok(())
        }
    }
}

fn print_balance(v: &Value) -> anyhow::Result<()> {
    out!(
        "default credit for new peers: {} tokens",
        v.get("default_credit").map_or_else(String::new, tokens_of)
    )?;
    for role in [Role::Provider, Role::Requester] {
        let accounts = v
            .pointer(&format!("/accounts/{role}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
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
        for a in &accounts {
            let field = |k: &str| a.get(k).map_or_else(String::new, tokens_of);
            let available = match a.get("available") {
                Some(Value::Null) | None => "overdrawn".to_owned(),
                Some(v) => tokens_of(v),
            };
            out!(
                "  {:<52} {:>18} {:>18} {:>18} {:>18} {:>18} {:>8}",
                a.get("peer").and_then(Value::as_str).unwrap_or("?"),
                field("deposits"),
                field("credit_limit"),
                field("charged"),
                field("held"),
                available,
                a.get("chain_entries").and_then(Value::as_u64).unwrap_or(0)
            )?;
        }
        let overdrawn = accounts
            .iter()
            .any(|a| matches!(a.get("available"), Some(Value::Null) | None));
        if role == Role::Requester && overdrawn {
            out!(
                "  (overdrawn: charged more than this node recorded paying; record a prepayment \
                 with `pixmarket ledger prepaid PROVIDER TOKENS`)"
            )?;
        }
    }
    Ok(())
}

/// An amount for JSON: the token string people read and the exact micro-tokens scripts add.
fn amount(m: MicroTokens) -> serde_json::Value {
    serde_json::json!({ "tokens": m.to_string(), "micro": m.0 })
}

/// The balances as the API's `GET /api/v1/accounts` answers them.
fn balance_value(l: &Ledger) -> anyhow::Result<Value> {
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
    Ok(serde_json::json!({
        "default_credit": amount(l.default_credit()?),
        "accounts": roles,
    }))
}

/// Receipts as the API's `GET /api/v1/receipts` lists them.
fn receipt_values(l: &Ledger, peer: Option<&PublicKey>) -> anyhow::Result<Vec<Value>> {
    let mut list = Vec::new();
    for stored in l.receipts(peer)? {
        let r = stored
            .receipt
            .verify()
            .context("a stored receipt does not verify; run `pixmarket ledger verify`")?;
        let other = match stored.role {
            Role::Provider => r.requester,
            Role::Requester => r.provider,
        };
        list.push(serde_json::json!({
            "role": stored.role.to_string(),
            "job": r.job_id.to_string(),
            "peer": show_peer(&other),
            "cost": amount(r.cost),
            "cumulative": amount(r.cumulative_charged),
            "issued_at_ms": r.issued_at_ms,
            "acked": stored.ack.is_some(),
            "refunded": stored.refunded,
            "undelivered": stored.undelivered,
            "receipt": stored.receipt.digest().to_string(),
        }));
    }
    Ok(list)
}

/// Every receipt, page by page, from the running node; `None` if no node answers.
fn receipts_via_api(
    api: &ApiClient,
    peer: Option<&PublicKey>,
) -> anyhow::Result<Option<Vec<Value>>> {
    let mut list = Vec::new();
    loop {
        let mut path = format!("/api/v1/receipts?offset={}", list.len());
        if let Some(p) = peer {
            path.push_str(&format!("&peer={}", show_peer(p)));
        }
        let Some(page) = through_api(api, Method::GET, &path, None)? else {
            return Ok(None);
        };
        let data = page
            .get("data")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let more = page.get("has_more").and_then(Value::as_bool) == Some(true);
        if data.is_empty() && more {
            bail!("the node's API listed an empty page of receipts with more to come");
        }
        list.extend(data);
        if !more {
            return Ok(Some(list));
        }
    }
}

fn print_receipts(all: &[Value], json: bool) -> anyhow::Result<()> {
    if json {
        for r in all {
            out!("{r}")?;
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
    let text = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    for r in all {
        out!(
            "{:<9} {:<32} {:<52} {:>16} {:>18} {:<5}",
            text(r, "role"),
            text(r, "job"),
            text(r, "peer"),
            r.get("cost").map_or_else(String::new, tokens_of),
            r.get("cumulative").map_or_else(String::new, tokens_of),
            if r.get("acked").and_then(Value::as_bool) == Some(true) {
                "yes"
            } else {
                "no"
            }
        )?;
        if let Some(why) = r.get("refunded").and_then(Value::as_str) {
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
