//! Checking the books: [`Ledger::verify`] replays the whole log into a fresh in-memory store
//! with the same [`apply`](crate::books) the live operations use, checking every chain link and
//! every signature on the way, then compares the result with the stored state, tree by tree,
//! key by key. [`Ledger::export`] writes the log (or one pair's part of it) as JSON lines, and
//! [`import`] lets a third party run the same replay on such a file.
//!
//! Export format, one JSON object per line:
//! 1. a header `{"format":"pixmarket-ledger-export","version":1,"owner":HEX,"peer":HEX|null,
//!    "head_len":N,"head_hash":HEX}`;
//! 2. one line per log entry `{"seq":N,"hash":HEX,"entry":HEX,"op":{...}}`, where `entry` is the
//!    entry's canonical bytes (authoritative: hashes and signatures are checked on these) and
//!    `op` a summary for people and `jq` (ignored by `import`).
//!
//! A whole-log export lets `import` check every link from the genesis hash to the head. A
//! one-pair export (`peer` set) holds only the entries that concern the pair (plus ledger-wide
//! settings), so links between kept entries are checked only where they are adjacent; the pair's
//! receipts, which link to each other by hash and carry the cumulative total, are still checked
//! in full, as are all signatures and the pair's balances.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use pixmarket_protocol::{Hash, JobId, PublicKey};
use serde::{Deserialize, Serialize};

use crate::books::{self, Account, Hold, JobOutcome, Op, Role, StoredReceipt, decode};
use crate::error::{Inconsistency, LedgerError};
use crate::ledger::Ledger;
use crate::log::{self, Head, LogEntry};
use crate::store::{self, Abort, MemStore, TreeId};

/// The first line's `format`.
pub const EXPORT_FORMAT: &str = "pixmarket-ledger-export";
/// The export format version.
pub const EXPORT_VERSION: u32 = 1;

/// What a successful `verify` or `import` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditReport {
    pub owner: PublicKey,
    /// Log entries replayed.
    pub entries: u64,
    /// Whether every link from the genesis hash to the head was checked (a whole log).
    pub complete_chain: bool,
    /// The head reached (for a whole log, the ledger's head).
    pub head: Head,
    /// Every account, recomputed from the log.
    pub accounts: Vec<(Role, PublicKey, Account)>,
    pub open_holds: usize,
    /// Receipts stored, refunded ones included.
    pub receipts: usize,
    /// Receipts that carry the requester's signed ack.
    pub acked_receipts: usize,
    /// Receipts credited back by a credit note, or refunded by a legacy rewind (kept, but no
    /// longer charging).
    pub refunded_receipts: usize,
    /// Credit notes in the chains.
    pub credit_notes: usize,
    /// As requester: acknowledged receipts whose images never came.
    pub undelivered_receipts: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExportHeader {
    format: String,
    version: u32,
    owner: PublicKey,
    peer: Option<PublicKey>,
    head_len: u64,
    head_hash: Hash,
}

/// A person-readable summary of an entry; not authoritative.
#[derive(Debug, Serialize, Deserialize)]
struct OpSummary {
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExportLine {
    seq: u64,
    hash: Hash,
    entry: String,
    op: OpSummary,
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the ledger")]
    Read(#[source] LedgerError),
    #[error("the log is inconsistent; run `pixmarket ledger verify`")]
    Inconsistent(#[source] Inconsistency),
    #[error("cannot write the export")]
    Write(#[source] std::io::Error),
}

/// Replays log entries into a fresh in-memory store.
struct Replay {
    owner: PublicKey,
    mem: MemStore,
    prev: Hash,
    next_seq: u64,
    entries: u64,
    complete: bool,
}

impl Replay {
    fn new(owner: PublicKey) -> Self {
        Self {
            owner,
            mem: MemStore::new(),
            prev: log::genesis(&owner),
            next_seq: 0,
            entries: 0,
            complete: true,
        }
    }

    /// Checks and applies one entry. With `gaps_allowed`, a seq beyond the next breaks the
    /// chain check (one-pair exports) instead of failing.
    fn feed(&mut self, bytes: &[u8], gaps_allowed: bool) -> Result<LogEntry, Inconsistency> {
        let entry: LogEntry =
            decode(TreeId::Log, &self.next_seq.to_be_bytes(), bytes).map_err(|e| {
                Inconsistency::Undecodable {
                    seq: self.next_seq,
                    reason: e.to_string(),
                }
            })?;
        if entry.seq != self.next_seq {
            if !(gaps_allowed && entry.seq > self.next_seq) {
                return Err(Inconsistency::Sequence {
                    seq: self.next_seq,
                    found: entry.seq,
                });
            }
            self.complete = false;
        } else if entry.prev != self.prev {
            return Err(Inconsistency::BrokenLink {
                seq: entry.seq,
                expected: self.prev,
                found: entry.prev,
            });
        }
        let owner = self.owner;
        store::transact(&self.mem, |txn| books::apply(txn, &owner, &entry.op)).map_err(|e| {
            Inconsistency::Rejected {
                seq: entry.seq,
                source: match e {
                    Abort::Refused(e) => e,
                    Abort::Store(e) => LedgerError::Store(e),
                    Abort::Conflict => {
                        LedgerError::Store(store::StoreError::Engine("conflict in memory".into()))
                    }
                },
            }
        })?;
        self.prev = log::entry_hash(bytes);
        self.next_seq = entry.seq.saturating_add(1);
        self.entries += 1;
        Ok(entry)
    }

    fn head(&self) -> Head {
        Head {
            len: self.next_seq,
            hash: self.prev,
        }
    }

    fn report(&self) -> Result<AuditReport, Inconsistency> {
        let mut accounts = Vec::new();
        for role in [Role::Provider, Role::Requester] {
            let tree = role.accounts();
            for (k, v) in self.mem.entries(tree) {
                let peer = <[u8; 32]>::try_from(k.as_slice())
                    .ok()
                    .and_then(|b| PublicKey::from_bytes(&b).ok());
                if let Some(peer) = peer {
                    let a: Account = decode(tree, &k, &v).map_err(Inconsistency::Read)?;
                    accounts.push((role, peer, a));
                }
            }
        }
        let mut receipts = 0;
        let mut acked_receipts = 0;
        for (k, v) in self.mem.entries(TreeId::Receipts) {
            let r: StoredReceipt = decode(TreeId::Receipts, &k, &v).map_err(Inconsistency::Read)?;
            receipts += 1;
            if r.ack.is_some() {
                acked_receipts += 1;
            }
        }
        let mut refunded_receipts = 0;
        let mut undelivered_receipts = 0;
        for (k, v) in self.mem.entries(TreeId::Jobs) {
            let outcome: JobOutcome = decode(TreeId::Jobs, &k, &v).map_err(Inconsistency::Read)?;
            match outcome {
                JobOutcome::Refunded { .. } | JobOutcome::Credited { .. } => refunded_receipts += 1,
                JobOutcome::Undelivered { .. } => undelivered_receipts += 1,
                _ => {}
            }
        }
        let credit_notes = self.mem.entries(TreeId::Credits).len();
        Ok(AuditReport {
            owner: self.owner,
            entries: self.entries,
            complete_chain: self.complete,
            head: self.head(),
            accounts,
            open_holds: self.mem.entries(TreeId::Holds).len(),
            receipts,
            acked_receipts,
            refunded_receipts,
            credit_notes,
            undelivered_receipts,
        })
    }
}

/// A stored value as a person can read it in a report.
fn describe(tree: TreeId, key: &[u8], value: Option<&[u8]>) -> String {
    let Some(v) = value else {
        return "nothing".into();
    };
    let shown = match tree {
        TreeId::ProviderAccounts | TreeId::RequesterAccounts => {
            decode::<Account>(tree, key, v).map(|a| format!("{a:?}"))
        }
        TreeId::Holds => decode::<Hold>(tree, key, v).map(|h| format!("{h:?}")),
        TreeId::Jobs => decode::<JobOutcome>(tree, key, v).map(|j| format!("{j:?}")),
        _ => Ok(format!(
            "{} bytes {}",
            v.len(),
            hex::encode(&v[..v.len().min(16)])
        )),
    };
    shown.unwrap_or_else(|e| format!("undecodable ({e})"))
}

fn read_err(e: store::StoreError) -> Inconsistency {
    Inconsistency::Read(LedgerError::Store(e))
}

impl Ledger {
    /// Replays the log from the genesis hash, checking every link and signature and
    /// recomputing every balance, then compares with the stored state. Returns the first
    /// inconsistency, with the log entry to blame where there is one.
    ///
    /// Run it on a quiet ledger (the CLI holds the folder's lock): operations committed while
    /// it runs may show up as a state difference.
    pub fn verify(&self) -> Result<AuditReport, Inconsistency> {
        let mut replay = Replay::new(self.owner());
        let mut failure = None;
        let mut expected_key = 0u64;
        self.store()
            .scan(TreeId::Log, &[], &mut |k, v| {
                if k != expected_key.to_be_bytes() {
                    failure = Some(Inconsistency::Sequence {
                        seq: expected_key,
                        found: <[u8; 8]>::try_from(k).map_or(u64::MAX, u64::from_be_bytes),
                    });
                    return ControlFlow::Break(());
                }
                if let Err(e) = replay.feed(v, false) {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
                expected_key = expected_key.saturating_add(1);
                ControlFlow::Continue(())
            })
            .map_err(read_err)?;
        if let Some(f) = failure {
            return Err(f);
        }
        let head = self.head().map_err(Inconsistency::Read)?;
        if head != replay.head() {
            return Err(Inconsistency::Head {
                log_len: replay.head().len,
                head_len: head.len,
                head_hash: head.hash,
            });
        }
        for tree in TreeId::DERIVED {
            let expected = replay.mem.entries(tree);
            let mut found = Vec::new();
            self.store()
                .scan(tree, &[], &mut |k, v| {
                    found.push((k.to_vec(), v.to_vec()));
                    ControlFlow::Continue(())
                })
                .map_err(read_err)?;
            let mut e = expected.iter().peekable();
            let mut f = found.iter().peekable();
            loop {
                let diff = match (e.peek(), f.peek()) {
                    (None, None) => break,
                    (Some((ek, ev)), Some((fk, fv))) if ek == fk => {
                        if ev != fv {
                            Some((ek, Some(ev), Some(fv)))
                        } else {
                            e.next();
                            f.next();
                            None
                        }
                    }
                    (Some((ek, ev)), Some((fk, _))) if ek < fk => Some((ek, Some(ev), None)),
                    (Some((ek, ev)), None) => Some((ek, Some(ev), None)),
                    (_, Some((fk, fv))) => Some((fk, None, Some(fv))),
                };
                if let Some((key, ev, fv)) = diff {
                    return Err(Inconsistency::State {
                        tree,
                        key: hex::encode(key),
                        expected: describe(tree, key, ev.map(Vec::as_slice)),
                        found: describe(tree, key, fv.map(Vec::as_slice)),
                    });
                }
            }
        }
        replay.report()
    }

    /// Writes the log as JSON lines (see the module docs): the whole log, or with `peer` only
    /// the entries that concern that pair. Returns the number of entries written.
    pub fn export(
        &self,
        peer: Option<&PublicKey>,
        out: &mut dyn Write,
    ) -> Result<u64, ExportError> {
        let head = self.head().map_err(ExportError::Read)?;
        let owner = self.owner();
        let header = ExportHeader {
            format: EXPORT_FORMAT.into(),
            version: EXPORT_VERSION,
            owner,
            peer: peer.copied(),
            head_len: head.len,
            head_hash: head.hash,
        };
        write_json(out, &header)?;
        // Job → peer, from holds and receipts, to place voids, expiries, acks, refunds and
        // undelivered marks.
        let mut job_peer: BTreeMap<JobId, PublicKey> = BTreeMap::new();
        let mut written = 0u64;
        let mut failure: Option<ExportError> = None;
        let mut next = 0u64;
        self.store()
            .scan(TreeId::Log, &[], &mut |k, v| {
                let entry: LogEntry = match decode(TreeId::Log, k, v) {
                    Ok(e) => e,
                    Err(e) => {
                        failure = Some(ExportError::Inconsistent(Inconsistency::Undecodable {
                            seq: next,
                            reason: e.to_string(),
                        }));
                        return ControlFlow::Break(());
                    }
                };
                next = entry.seq.saturating_add(1);
                let mut peers = entry.op.peers(&owner);
                if let (Some(job), Some(p)) = (entry.op.job(), peers.first()) {
                    job_peer.insert(job, *p);
                }
                if let (true, Some(p)) = (
                    peers.is_empty(),
                    entry.op.job().and_then(|j| job_peer.get(&j)),
                ) {
                    peers.push(*p);
                }
                let keep = match (peer, &entry.op) {
                    (None, _) | (_, Op::SetDefaultCredit { .. }) => true,
                    (Some(p), _) => peers.contains(p),
                };
                if keep {
                    let line = ExportLine {
                        seq: entry.seq,
                        hash: log::entry_hash(v),
                        entry: hex::encode(v),
                        op: summary(&entry.op, &peers),
                    };
                    if let Err(e) = write_json(out, &line) {
                        failure = Some(e);
                        return ControlFlow::Break(());
                    }
                    written += 1;
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| ExportError::Read(LedgerError::Store(e)))?;
        if let Some(f) = failure {
            return Err(f);
        }
        out.flush().map_err(ExportError::Write)?;
        Ok(written)
    }
}

fn write_json<T: Serialize>(out: &mut dyn Write, value: &T) -> Result<(), ExportError> {
    serde_json::to_writer(&mut *out, value)
        .map_err(|e| ExportError::Write(std::io::Error::other(e)))?;
    out.write_all(b"\n").map_err(ExportError::Write)
}

fn summary(op: &Op, peers: &[PublicKey]) -> OpSummary {
    let (kind, tokens) = match op {
        Op::SetDefaultCredit { amount } => ("set-default-credit", Some(*amount)),
        Op::Deposit { note } => ("deposit", note.verify().ok().map(|n| n.amount)),
        Op::Prepaid { note } => ("prepaid", note.verify().ok().map(|n| n.amount)),
        Op::SetCreditLimit { role, amount, .. } => (
            match role {
                Role::Provider => "set-credit-limit",
                Role::Requester => "set-mirror-credit-limit",
            },
            Some(*amount),
        ),
        Op::Hold { terms, .. } => ("hold", Some(terms.max_cost)),
        Op::Settle { receipt, .. } => ("settle", receipt.verify().ok().map(|r| r.cost)),
        Op::Void { .. } => ("void", None),
        Op::Expire { .. } => ("expire", None),
        Op::Ack { .. } => ("ack", None),
        Op::Refund { .. } => ("refund-undelivered", None),
        Op::Credit { note } => ("credit-note", note.verify().ok().map(|n| n.amount)),
        Op::RecordCredit { note, .. } => {
            ("record-credit-note", note.verify().ok().map(|n| n.amount))
        }
        Op::Undelivered { .. } => ("undelivered", None),
        Op::DeliveredLate { .. } => ("delivered-late", None),
        Op::RecordReceipt { receipt, .. } => {
            ("record-receipt", receipt.verify().ok().map(|r| r.cost))
        }
    };
    OpSummary {
        kind: kind.into(),
        job: op.job().map(|j| j.to_string()),
        peer: peers.first().map(|p| p.to_peer_id().to_string()),
        tokens: tokens.map(|t| t.to_string()),
    }
}

/// Longest export line accepted: an entry is at most a few KiB as hex plus the summary.
const MAX_LINE: usize = 64 * 1024;

/// Checks an export (from [`Ledger::export`]) as a third party would: every entry's hash,
/// every link between adjacent entries, every signature, every rule, and recomputes the
/// balances. Nothing is stored; the report says what the file proves.
pub fn import(input: &mut dyn BufRead) -> Result<AuditReport, Inconsistency> {
    let mut lines = 0usize;
    let mut next_line = |input: &mut dyn BufRead| -> Result<Option<String>, Inconsistency> {
        let mut buf = String::new();
        let limit = u64::try_from(MAX_LINE)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let n = std::io::Read::take(&mut *input, limit)
            .read_line(&mut buf)
            .map_err(|e| Inconsistency::Format {
                line: lines + 1,
                reason: e.to_string(),
            })?;
        lines += 1;
        if n == 0 {
            return Ok(None);
        }
        if n > MAX_LINE {
            return Err(Inconsistency::Format {
                line: lines,
                reason: format!("longer than {MAX_LINE} bytes"),
            });
        }
        Ok(Some(buf))
    };
    let first = next_line(input)?.ok_or(Inconsistency::Format {
        line: 1,
        reason: "the file is empty".into(),
    })?;
    let header: ExportHeader = serde_json::from_str(&first).map_err(|e| Inconsistency::Format {
        line: 1,
        reason: format!("not an export header: {e}"),
    })?;
    if header.format != EXPORT_FORMAT || header.version != EXPORT_VERSION {
        return Err(Inconsistency::Format {
            line: 1,
            reason: format!(
                "format {:?} version {}; expected {EXPORT_FORMAT:?} version {EXPORT_VERSION}",
                header.format, header.version
            ),
        });
    }
    let partial = header.peer.is_some();
    let mut replay = Replay::new(header.owner);
    let mut line_no = 1usize;
    while let Some(text) = next_line(input)? {
        line_no += 1;
        if text.trim().is_empty() {
            continue;
        }
        let line: ExportLine = serde_json::from_str(&text).map_err(|e| Inconsistency::Format {
            line: line_no,
            reason: e.to_string(),
        })?;
        let bytes = hex::decode(line.entry.trim()).map_err(|e| Inconsistency::Format {
            line: line_no,
            reason: format!("entry is not hex: {e}"),
        })?;
        let found = log::entry_hash(&bytes);
        if found != line.hash {
            return Err(Inconsistency::EntryHash {
                seq: line.seq,
                expected: line.hash,
                found,
            });
        }
        let entry = replay.feed(&bytes, partial)?;
        if entry.seq != line.seq {
            return Err(Inconsistency::Format {
                line: line_no,
                reason: format!("says seq {} but its entry is {}", line.seq, entry.seq),
            });
        }
    }
    if !partial {
        let head = replay.head();
        if head.len != header.head_len || head.hash != header.head_hash {
            return Err(Inconsistency::Head {
                log_len: head.len,
                head_len: header.head_len,
                head_hash: header.head_hash,
            });
        }
    }
    replay.report()
}
