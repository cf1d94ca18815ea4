//! [`Ledger`]: the typed API the node and the CLI use. Each operation is one store transaction
//! that checks the rules ([`crate::books::apply`]), writes the state and appends the log entry,
//! followed by the group-commit durability barrier; when a method returns `Ok`, the change is
//! durable (see `ledger/README.md` for exactly what that means).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pixmarket_protocol::exchange::MAX_CHAIN_ENTRIES;
use pixmarket_protocol::{
    ChainEntry, CreditNote, DepositNote, Hash, JobId, JobRequest, MicroTokens, PublicKey, Receipt,
    ReceiptAck, SecretKey, Signed,
};

use crate::books::{
    self, Account, DEFAULT_CREDIT_KEY, Hold, HoldTerms, JobOutcome, Op, Role, StoredCredit,
    StoredReceipt, decode,
};
use crate::error::{LedgerError, OpenError};
use crate::group_commit::GroupCommit;
use crate::log::{self, Head};
use crate::sled_store::{Opened, SledStore};
use crate::store::{self, Abort, Store, TreeId};

/// The marker that says "this database is a pixmarket ledger".
const FORMAT_KEY: &[u8] = b"format";
const FORMAT: &[u8] = b"pixmarket-ledger";
const VERSION_KEY: &[u8] = b"version";
const OWNER_KEY: &[u8] = b"owner";
/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// What the next chain entry between this node (as provider) and a requester must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiptLink {
    /// Everything charged so far; the next receipt's `cumulative_charged` is this plus its cost.
    pub charged_so_far: MicroTokens,
    /// The digest of the pair's last chain entry, the next one's `prev_entry_hash`.
    pub prev_entry_hash: Option<Hash>,
}

/// Why a stored receipt no longer charges, and why it was never delivered, by reader.
type ReceiptMarks = (Option<String>, Option<String>);

/// A node's books. Cheap to share: wrap it in an `Arc`; every method takes `&self` and is safe
/// to call from many threads at once.
#[derive(Debug)]
pub struct Ledger {
    store: Arc<dyn Store>,
    owner: PublicKey,
    commit: GroupCommit,
    path: Option<PathBuf>,
}

fn refused(e: Abort) -> LedgerError {
    match e {
        Abort::Refused(e) => e,
        Abort::Store(e) => LedgerError::Store(e),
        // Stores retry conflicts themselves; one escaping is a store bug.
        Abort::Conflict => LedgerError::Store(store::StoreError::Engine(
            "a transaction conflict escaped the store".into(),
        )),
    }
}

/// Builds a new ledger for `owner` beside `path` and renames it into place.
fn create(path: &Path, owner: PublicKey) -> Result<(), OpenError> {
    let io = |source| OpenError::Io {
        path: path.to_owned(),
        source,
    };
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".creating");
    let tmp = path.with_file_name(name);
    if tmp.exists() {
        // Only this function makes `<path>.creating`; one left behind is a creation that died.
        std::fs::remove_dir_all(&tmp).map_err(io)?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    {
        let (store, opened) = SledStore::open(&tmp)?;
        // Writes the marker and makes it durable; the store is closed at the end of the block.
        Ledger::from_store(Arc::new(store), owner, Some(tmp.clone()), opened)?;
    }
    // Renaming onto a missing path or an empty folder is atomic on POSIX file systems.
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

impl Ledger {
    /// Opens the ledger at `path` for the node `owner`, creating it if the folder is missing
    /// or empty. Refuses, changing nothing, a folder another process holds, a corrupt one, one
    /// that is not a pixmarket ledger, and another node's ledger.
    ///
    /// Creation is atomic: the new ledger is built and made durable in a sibling folder
    /// `<path>.creating`, then renamed into place, so a process killed while creating leaves
    /// either no ledger or a whole one (and a stale `.creating` folder that the next creation
    /// removes).
    pub fn open(path: &Path, owner: PublicKey) -> Result<Self, OpenError> {
        if crate::sled_store::is_new(path)? {
            create(path, owner)?;
        }
        let (store, opened) = SledStore::open(path)?;
        Self::from_store(Arc::new(store), owner, Some(path.to_owned()), opened)
    }

    /// A ledger on any [`Store`] (e.g. [`store::MemStore`] in tests). An empty store is
    /// initialised for `owner`.
    pub fn with_store(store: Arc<dyn Store>, owner: PublicKey) -> Result<Self, OpenError> {
        Self::from_store(store, owner, None, Opened::Created)
    }

    fn from_store(
        store: Arc<dyn Store>,
        owner: PublicKey,
        path: Option<PathBuf>,
        opened: Opened,
    ) -> Result<Self, OpenError> {
        let shown = path.clone().unwrap_or_else(|| PathBuf::from("<memory>"));
        let read = |tree, key: &[u8]| {
            store.get(tree, key).map_err(|e| OpenError::Init {
                path: shown.clone(),
                source: Box::new(LedgerError::Store(e)),
            })
        };
        match read(TreeId::Meta, FORMAT_KEY)? {
            Some(f) if f == FORMAT => {
                let version = read(TreeId::Meta, VERSION_KEY)?
                    .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
                    .map(u32::from_be_bytes);
                match version {
                    Some(FORMAT_VERSION) => {}
                    Some(found) => {
                        return Err(OpenError::UnsupportedVersion {
                            path: shown,
                            found,
                            supported: FORMAT_VERSION,
                        });
                    }
                    None => {
                        return Err(OpenError::Corrupt {
                            path: shown,
                            reason: "the format version record is missing or malformed".into(),
                        });
                    }
                }
                let found = read(TreeId::Meta, OWNER_KEY)?
                    .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
                    .and_then(|b| PublicKey::from_bytes(&b).ok())
                    .ok_or_else(|| OpenError::Corrupt {
                        path: shown.clone(),
                        reason: "the owner record is missing or malformed".into(),
                    })?;
                if found != owner {
                    return Err(OpenError::OtherOwner {
                        path: shown,
                        found: found.to_peer_id().to_string(),
                        expected: owner.to_peer_id().to_string(),
                    });
                }
            }
            Some(_) => {
                return Err(OpenError::Foreign {
                    path: shown,
                    reason: "its format marker is not a pixmarket ledger's".into(),
                });
            }
            None if opened == Opened::Existing => {
                // Database files without our marker: sled found nothing it could read (a
                // damaged log) or the folder was never finished. Either way, do not start a
                // new ledger on top of it.
                return Err(OpenError::Corrupt {
                    path: shown,
                    reason: "the database files are there but hold no pixmarket ledger \
                             marker (damaged, or creation was interrupted); nothing was \
                             changed. Move the folder away to start a new ledger"
                        .into(),
                });
            }
            None => {
                // No marker: only a store with nothing in it may become a ledger.
                for tree in TreeId::ALL {
                    let mut any = false;
                    store
                        .scan(tree, &[], &mut |_, _| {
                            any = true;
                            ControlFlow::Break(())
                        })
                        .map_err(|e| OpenError::Init {
                            path: shown.clone(),
                            source: Box::new(LedgerError::Store(e)),
                        })?;
                    if any {
                        return Err(OpenError::Corrupt {
                            path: shown,
                            reason: format!(
                                "{:?} holds data but the ledger format marker is missing",
                                tree
                            ),
                        });
                    }
                }
                let init = store::transact(&*store, |txn| {
                    txn.insert(TreeId::Meta, VERSION_KEY, &FORMAT_VERSION.to_be_bytes())?;
                    txn.insert(TreeId::Meta, OWNER_KEY, owner.as_bytes())?;
                    // The marker last, in the same transaction: it is all or nothing anyway.
                    txn.insert(TreeId::Meta, FORMAT_KEY, FORMAT)
                })
                .map_err(refused)
                .and_then(|()| store.make_durable().map_err(LedgerError::Store));
                if let Err(e) = init {
                    return Err(OpenError::Init {
                        path: shown,
                        source: Box::new(e),
                    });
                }
            }
        }
        Ok(Self {
            store,
            owner,
            commit: GroupCommit::default(),
            path,
        })
    }

    /// The node whose books these are.
    pub fn owner(&self) -> PublicKey {
        self.owner
    }

    /// The folder, for a sled-backed ledger.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub(crate) fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Builds an operation from the state inside one transaction (so what it reads cannot
    /// change before it is applied), applies it, appends it to the log, and waits until it is
    /// durable. `build` may run more than once if the store retries a conflict.
    fn commit_built<R>(
        &self,
        build: impl Fn(&dyn store::Txn) -> Result<(Op, R), Abort>,
    ) -> Result<R, LedgerError> {
        let out = store::transact(&*self.store, |txn| {
            let (op, out) = build(txn)?;
            books::apply(txn, &self.owner, &op)?;
            log::append(txn, &self.owner, &op)?;
            Ok(out)
        })
        .map_err(refused)?;
        self.commit.wait_durable(&*self.store)?;
        Ok(out)
    }

    /// Applies `op`, appends it to the log, and waits until it is durable.
    fn commit(&self, op: &Op) -> Result<(), LedgerError> {
        store::transact(&*self.store, |txn| {
            books::apply(txn, &self.owner, op)?;
            log::append(txn, &self.owner, op)?;
            Ok(())
        })
        .map_err(refused)?;
        self.commit.wait_durable(&*self.store)?;
        Ok(())
    }

    /// Sets the credit given to a peer the first time it is seen (default 0). Peers already
    /// in the books keep the limit they have.
    pub fn set_default_credit(&self, amount: MicroTokens) -> Result<(), LedgerError> {
        self.commit(&Op::SetDefaultCredit { amount })
    }

    pub fn default_credit(&self) -> Result<MicroTokens, LedgerError> {
        match self.store.get(TreeId::Settings, DEFAULT_CREDIT_KEY)? {
            None => Ok(MicroTokens::ZERO),
            Some(b) => decode(TreeId::Settings, DEFAULT_CREDIT_KEY, &b),
        }
    }

    /// Records a signed deposit note. Signed by this node: the peer `note.account` prepaid me
    /// (provider side). Signed by a provider for this node: what I prepaid there (requester
    /// mirror). A note is counted once.
    pub fn deposit(&self, note: &Signed<DepositNote>) -> Result<(), LedgerError> {
        self.commit(&Op::Deposit { note: note.clone() })
    }

    /// Records what this node prepaid the provider `note.account` (requester side): a note
    /// signed by this node, counted once, that raises the mirror's deposits. A provider's own
    /// signed deposit note for the same payment ([`Ledger::deposit`]) would count it again:
    /// record the one or the other.
    pub fn prepaid(&self, note: &Signed<DepositNote>) -> Result<(), LedgerError> {
        self.commit(&Op::Prepaid { note: note.clone() })
    }

    /// Sets what `peer` may owe me beyond its deposits. Refused if below what it already uses.
    pub fn set_credit_limit(
        &self,
        peer: PublicKey,
        amount: MicroTokens,
    ) -> Result<(), LedgerError> {
        self.set_credit_limit_as(Role::Provider, peer, amount)
    }

    /// Sets a credit limit on either side; on the requester side it records what `peer` (a
    /// provider) told me it lets me owe.
    pub fn set_credit_limit_as(
        &self,
        role: Role,
        peer: PublicKey,
        amount: MicroTokens,
    ) -> Result<(), LedgerError> {
        self.commit(&Op::SetCreditLimit { role, peer, amount })
    }

    /// Sets aside `max_cost` of the requester's available credit for a job, before it runs.
    /// Refused with [`LedgerError::InsufficientCredit`], [`LedgerError::DuplicateJob`] (a job id
    /// is accepted once, ever) or [`LedgerError::Expired`] (`terms.expires_at_ms <= now_ms`).
    pub fn hold(&self, terms: HoldTerms, now_ms: u64) -> Result<(), LedgerError> {
        self.commit(&Op::Hold { terms, now_ms })
    }

    /// [`Ledger::hold`] for a signed request: checks its signature, that it is addressed to
    /// this node, and holds its `max_cost` until it expires. The receipt must then name it.
    pub fn hold_request(
        &self,
        request: &Signed<JobRequest>,
        now_ms: u64,
    ) -> Result<(), LedgerError> {
        let body = request
            .verify()
            .map_err(|source| LedgerError::BadSignature {
                what: "job request",
                source,
            })?;
        if body.provider != self.owner {
            return Err(LedgerError::Mismatch {
                field: "request provider",
                expected: self.owner.to_peer_id().to_string(),
                got: body.provider.to_peer_id().to_string(),
            });
        }
        self.hold(
            HoldTerms {
                job: body.job_id,
                requester: request.signer(),
                max_cost: body.max_cost,
                expires_at_ms: body.expires_at_ms,
                request_hash: Some(request.digest()),
            },
            now_ms,
        )
    }

    /// What the next receipt for `requester` must carry (cumulative total, previous receipt).
    /// Settles for one requester must be issued one after another.
    pub fn receipt_link(&self, requester: &PublicKey) -> Result<ReceiptLink, LedgerError> {
        let a = self.account(Role::Provider, requester)?.unwrap_or_default();
        Ok(ReceiptLink {
            charged_so_far: a.charged,
            prev_entry_hash: a.last_entry,
        })
    }

    /// Settles a held job with a receipt built from the pair's link *inside* the settle
    /// transaction, so concurrent settles for one requester cannot both link to the same
    /// head: `build` gets the link and returns the receipt body, which is signed with `key`
    /// (this ledger's owner) and settled as [`Ledger::settle`] does. Returns the signed
    /// receipt, durable.
    pub fn settle_with(
        &self,
        job: JobId,
        key: &SecretKey,
        build: impl Fn(ReceiptLink) -> Receipt,
    ) -> Result<Signed<Receipt>, LedgerError> {
        if key.public() != self.owner {
            return Err(LedgerError::NotOwnerKey);
        }
        self.commit_built(|txn| {
            let Some(hold) = books::get::<Hold>(txn, TreeId::Holds, &job.0)? else {
                // As `settle` answers: what became of the job, so a retry can tell.
                let outcome = books::get::<JobOutcome>(
                    txn,
                    TreeId::Jobs,
                    &books::job_key(Role::Provider, job),
                )?;
                return Err(match outcome {
                    Some(outcome) => LedgerError::AlreadyFinished { job, outcome },
                    None => LedgerError::UnknownHold { job },
                }
                .into());
            };
            let a = books::account(txn, Role::Provider, &hold.requester)?;
            let receipt = build(ReceiptLink {
                charged_so_far: a.charged,
                prev_entry_hash: a.last_entry,
            });
            let signed = Signed::sign(key, &receipt).map_err(LedgerError::Encode)?;
            Ok((
                Op::Settle {
                    job,
                    receipt: signed.clone(),
                },
                signed,
            ))
        })
    }

    /// As provider: takes back the charge of a settled receipt that was never acknowledged,
    /// with a credit note signed by `key` (this ledger's owner) that extends the pair's chain.
    /// Refused, changing nothing, for an acknowledged receipt ([`LedgerError::AlreadyAcked`]),
    /// one credited already ([`LedgerError::Refunded`]) and a job not settled
    /// ([`LedgerError::NotSettled`]). Returns the signed note, durable.
    pub fn credit(
        &self,
        job: JobId,
        key: &SecretKey,
        reason: &str,
        now_ms: u64,
    ) -> Result<Signed<CreditNote>, LedgerError> {
        if key.public() != self.owner {
            return Err(LedgerError::NotOwnerKey);
        }
        let reason: String = reason.chars().take(books::MAX_REASON_CHARS).collect();
        self.commit_built(|txn| {
            let outcome =
                books::get::<JobOutcome>(txn, TreeId::Jobs, &books::job_key(Role::Provider, job))?;
            let Some(JobOutcome::Settled { peer, index }) = outcome else {
                return Err(match outcome {
                    Some(
                        JobOutcome::Credited { reason, .. } | JobOutcome::Refunded { reason, .. },
                    ) => LedgerError::Refunded { job, reason },
                    _ => LedgerError::NotSettled { job },
                }
                .into());
            };
            let rkey = books::receipt_key(Role::Provider, &peer, index);
            let stored = books::get::<StoredReceipt>(txn, TreeId::Receipts, &rkey)?
                .ok_or(LedgerError::NotSettled { job })?;
            let body = stored
                .receipt
                .verify()
                .map_err(|source| LedgerError::BadSignature {
                    what: "receipt",
                    source,
                })?;
            let a = books::account(txn, Role::Provider, &peer)?;
            let note = CreditNote {
                job_id: job,
                receipt_hash: stored.receipt.digest(),
                provider: self.owner,
                requester: peer,
                amount: body.cost,
                cumulative_charged: a.charged.checked_sub(body.cost).ok_or(
                    LedgerError::Overflow {
                        what: "the charged total",
                    },
                )?,
                prev_entry_hash: a.last_entry,
                reason: reason.clone(),
                issued_at_ms: now_ms,
            };
            let signed = Signed::sign(key, &note).map_err(LedgerError::Encode)?;
            Ok((
                Op::Credit {
                    note: signed.clone(),
                },
                signed,
            ))
        })
    }

    /// As requester: records a provider's credit note, with the receipt it credits when this
    /// ledger never stored that receipt. The note must extend the pair's chain here too.
    pub fn record_credit(
        &self,
        receipt: Option<&Signed<Receipt>>,
        note: &Signed<CreditNote>,
    ) -> Result<(), LedgerError> {
        self.commit(&Op::RecordCredit {
            receipt: receipt.cloned(),
            note: note.clone(),
        })
    }

    /// As requester: records that the provider took my acknowledgement for `job` and did not
    /// deliver its images (a signed record against it: its receipt and my ack).
    pub fn mark_undelivered(&self, job: JobId, reason: &str) -> Result<(), LedgerError> {
        self.commit(&Op::Undelivered {
            job,
            reason: reason.chars().take(books::MAX_REASON_CHARS).collect(),
        })
    }

    /// As requester: the images of `job`, marked undelivered, came after all and match its
    /// receipt; the job counts as delivered from now on (a new entry after the mark, which
    /// stays in the log).
    pub fn mark_delivered_late(&self, job: JobId) -> Result<(), LedgerError> {
        self.commit(&Op::DeliveredLate { job })
    }

    /// The credit note that took back a credited job's charge, on `role`'s side.
    pub fn credit_note(
        &self,
        role: Role,
        job: JobId,
    ) -> Result<Option<Signed<CreditNote>>, LedgerError> {
        let Some(JobOutcome::Credited {
            peer, note_index, ..
        }) = self.job(role, job)?
        else {
            return Ok(None);
        };
        let key = books::credit_key(role, &peer, note_index);
        match self.store.get(TreeId::Credits, &key)? {
            None => Ok(None),
            Some(b) => Ok(Some(
                decode::<StoredCredit>(TreeId::Credits, &key, &b)?.note,
            )),
        }
    }

    /// Settled receipts on the provider side that hold no acknowledgement and were not
    /// credited: results whose delivery had not finished (e.g. when the node died).
    pub fn unacknowledged(&self) -> Result<Vec<JobId>, LedgerError> {
        let mut out = Vec::new();
        for r in self.receipts(None)? {
            if r.role == Role::Provider
                && r.ack.is_none()
                && r.refunded.is_none()
                && let Ok(body) = r.receipt.verify()
            {
                out.push(body.job_id);
            }
        }
        Ok(out)
    }

    /// The digest of the last chain entry between this node (in `role`) and `peer`.
    pub fn chain_head(&self, role: Role, peer: &PublicKey) -> Result<Option<Hash>, LedgerError> {
        Ok(self.account(role, peer)?.and_then(|a| a.last_entry))
    }

    /// The pair's chain entries (receipts and credit notes) after the entry `after` (from the
    /// start for `None`), in order, at most [`MAX_CHAIN_ENTRIES`]. Refused with
    /// [`LedgerError::UnknownEntry`] when `after` is not in the chain.
    pub fn chain(
        &self,
        role: Role,
        peer: &PublicKey,
        after: Option<Hash>,
    ) -> Result<Vec<ChainEntry>, LedgerError> {
        let prefix = books::receipt_prefix(role, peer);
        let mut all: BTreeMap<Vec<u8>, ChainEntry> = BTreeMap::new();
        let mut err = None;
        self.store.scan(
            TreeId::Receipts,
            &prefix,
            &mut |k, v| match decode::<StoredReceipt>(TreeId::Receipts, k, v) {
                Ok(r) => {
                    all.insert(k.to_vec(), ChainEntry::Receipt(r.receipt));
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    err = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        self.store.scan(
            TreeId::Credits,
            &prefix,
            &mut |k, v| match decode::<StoredCredit>(TreeId::Credits, k, v) {
                Ok(c) => {
                    all.insert(k.to_vec(), ChainEntry::Credit(c.note));
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    err = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e);
        }
        // The two trees are read one after the other, not in one transaction: an entry
        // appended between the reads may be seen without the one before it. Entries take
        // consecutive indexes, so the answer stops at the first missing one (a consistent
        // prefix; the requester asks again from there).
        let mut entries: Vec<ChainEntry> = Vec::with_capacity(all.len());
        for (i, (k, e)) in all.into_iter().enumerate() {
            let index = k
                .get(33..41)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            if index != u64::try_from(i).ok() {
                break;
            }
            entries.push(e);
        }
        let start = match after {
            None => 0,
            Some(h) => {
                entries
                    .iter()
                    .position(|e| e.digest() == h)
                    .ok_or(LedgerError::UnknownEntry { after: h })?
                    + 1
            }
        };
        Ok(entries
            .into_iter()
            .skip(start)
            .take(MAX_CHAIN_ENTRIES)
            .collect())
    }

    /// Settles a held job with this node's signed receipt: charges `cost` (≤ the hold),
    /// releases the rest, stores the receipt and advances the pair's cumulative total, in one
    /// transaction. The receipt is durable when this returns `Ok`; only then may the result be
    /// sent.
    pub fn settle(&self, job: JobId, receipt: &Signed<Receipt>) -> Result<(), LedgerError> {
        self.commit(&Op::Settle {
            job,
            receipt: receipt.clone(),
        })
    }

    /// Releases a hold whose job failed or was cancelled.
    pub fn void(&self, job: JobId, reason: &str) -> Result<(), LedgerError> {
        self.commit(&Op::Void {
            job,
            reason: reason.to_owned(),
        })
    }

    /// Stores the requester's signed acknowledgement of a settled receipt. Refused for a
    /// credited one ([`LedgerError::Refunded`]).
    pub fn attach_ack(&self, job: JobId, ack: &Signed<ReceiptAck>) -> Result<(), LedgerError> {
        self.commit(&Op::Ack {
            job,
            ack: ack.clone(),
        })
    }

    /// Releases every hold whose `expires_at_ms <= now_ms` (run at start-up: a job that was
    /// running when the node died will never be settled). Returns the jobs expired.
    pub fn expire_holds(&self, now_ms: u64) -> Result<Vec<JobId>, LedgerError> {
        let mut due = Vec::new();
        for (job, hold) in self.holds()? {
            if hold.expires_at_ms <= now_ms {
                due.push(job);
            }
        }
        let mut expired = Vec::with_capacity(due.len());
        for job in due {
            let op = Op::Expire { job, now_ms };
            // A hold settled or voided meanwhile is not an error here.
            match store::transact(&*self.store, |txn| {
                books::apply(txn, &self.owner, &op)?;
                log::append(txn, &self.owner, &op)?;
                Ok(())
            }) {
                Ok(()) => expired.push(job),
                Err(Abort::Refused(
                    LedgerError::AlreadyFinished { .. } | LedgerError::UnknownHold { .. },
                )) => {}
                Err(e) => return Err(refused(e)),
            }
        }
        // One durability barrier for the whole batch.
        self.commit.wait_durable(&*self.store)?;
        Ok(expired)
    }

    /// As requester: stores a provider's receipt with my signed ack, charging the mirror.
    pub fn record_receipt(
        &self,
        receipt: &Signed<Receipt>,
        ack: &Signed<ReceiptAck>,
    ) -> Result<(), LedgerError> {
        self.commit(&Op::RecordReceipt {
            receipt: receipt.clone(),
            ack: ack.clone(),
        })
    }

    // ---- reading ------------------------------------------------------------------------

    /// One counterparty's account, if it was ever touched.
    pub fn account(&self, role: Role, peer: &PublicKey) -> Result<Option<Account>, LedgerError> {
        let tree = role.accounts();
        match self.store.get(tree, peer.as_bytes())? {
            None => Ok(None),
            Some(b) => Ok(Some(decode(tree, peer.as_bytes(), &b)?)),
        }
    }

    /// Every account on one side, ordered by peer key.
    pub fn accounts(&self, role: Role) -> Result<Vec<(PublicKey, Account)>, LedgerError> {
        let tree = role.accounts();
        let mut out = Vec::new();
        let mut err = None;
        self.store.scan(tree, &[], &mut |k, v| {
            let row = <[u8; 32]>::try_from(k)
                .ok()
                .and_then(|b| PublicKey::from_bytes(&b).ok())
                .ok_or_else(|| LedgerError::CorruptRecord {
                    tree,
                    key: hex::encode(k),
                    reason: "not a public key".into(),
                })
                .and_then(|p| Ok((p, decode::<Account>(tree, k, v)?)));
            match row {
                Ok(r) => {
                    out.push(r);
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    err = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        err.map_or(Ok(out), Err)
    }

    /// Every open hold, ordered by job id.
    pub fn holds(&self) -> Result<Vec<(JobId, Hold)>, LedgerError> {
        let mut out = Vec::new();
        let mut err = None;
        self.store.scan(TreeId::Holds, &[], &mut |k, v| {
            let row = <[u8; 16]>::try_from(k)
                .map_err(|_| LedgerError::CorruptRecord {
                    tree: TreeId::Holds,
                    key: hex::encode(k),
                    reason: "not a job id".into(),
                })
                .and_then(|j| Ok((JobId(j), decode::<Hold>(TreeId::Holds, k, v)?)));
            match row {
                Ok(r) => {
                    out.push(r);
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    err = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        err.map_or(Ok(out), Err)
    }

    /// What became of a job id on one side, if it was ever accepted.
    pub fn job(&self, role: Role, job: JobId) -> Result<Option<JobOutcome>, LedgerError> {
        let key = books::job_key(role, job);
        match self.store.get(TreeId::Jobs, &key)? {
            None => Ok(None),
            Some(b) => Ok(Some(decode(TreeId::Jobs, &key, &b)?)),
        }
    }

    /// The stored receipt of a settled job, or of a refunded one (then with
    /// `refunded: Some(reason)`).
    pub fn receipt(&self, role: Role, job: JobId) -> Result<Option<StoredReceipt>, LedgerError> {
        let Some(outcome) = self.job(role, job)? else {
            return Ok(None);
        };
        let Some((peer, index)) = outcome.receipt_at() else {
            return Ok(None);
        };
        let key = books::receipt_key(role, &peer, index);
        match self.store.get(TreeId::Receipts, &key)? {
            None => Ok(None),
            Some(b) => {
                let mut stored: StoredReceipt = decode(TreeId::Receipts, &key, &b)?;
                match outcome {
                    JobOutcome::Refunded { reason, .. } | JobOutcome::Credited { reason, .. } => {
                        stored.refunded = Some(reason);
                    }
                    JobOutcome::Undelivered { reason, .. } => stored.undelivered = Some(reason),
                    _ => {}
                }
                Ok(Some(stored))
            }
        }
    }

    /// Receipts that no longer charge (credited, or refunded by a legacy rewind) or were never
    /// delivered, by receipt key: `(refunded, undelivered)` reasons.
    fn refunds(&self) -> Result<BTreeMap<Vec<u8>, ReceiptMarks>, LedgerError> {
        let mut out = BTreeMap::new();
        let mut err = None;
        self.store.scan(TreeId::Jobs, &[], &mut |k, v| {
            // The key's first byte is the role.
            let role = if k.first() == Some(&Role::Provider.byte()) {
                Role::Provider
            } else {
                Role::Requester
            };
            match decode::<JobOutcome>(TreeId::Jobs, k, v) {
                Ok(
                    JobOutcome::Refunded {
                        peer,
                        index,
                        reason,
                    }
                    | JobOutcome::Credited {
                        peer,
                        index,
                        reason,
                        ..
                    },
                ) => {
                    out.insert(
                        books::receipt_key(role, &peer, index).to_vec(),
                        (Some(reason), None),
                    );
                    ControlFlow::Continue(())
                }
                Ok(JobOutcome::Undelivered {
                    peer,
                    index,
                    reason,
                }) => {
                    out.insert(
                        books::receipt_key(role, &peer, index).to_vec(),
                        (None, Some(reason)),
                    );
                    ControlFlow::Continue(())
                }
                Ok(_) => ControlFlow::Continue(()),
                Err(e) => {
                    err = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        err.map_or(Ok(out), Err)
    }

    /// Receipts in order: all of them, or one pair's (on both sides). Credited receipts are
    /// included, with `refunded: Some(reason)`; undelivered ones with `undelivered`.
    pub fn receipts(&self, peer: Option<&PublicKey>) -> Result<Vec<StoredReceipt>, LedgerError> {
        let mut refunds = self.refunds()?;
        let mut prefixes = Vec::new();
        match peer {
            None => prefixes.push(Vec::new()),
            Some(p) => {
                for role in [Role::Provider, Role::Requester] {
                    prefixes.push(books::receipt_prefix(role, p).to_vec());
                }
            }
        }
        let mut out = Vec::new();
        let mut err = None;
        for prefix in prefixes {
            self.store.scan(
                TreeId::Receipts,
                &prefix,
                &mut |k, v| match decode::<StoredReceipt>(TreeId::Receipts, k, v) {
                    Ok(mut r) => {
                        if let Some((refunded, undelivered)) = refunds.remove(k) {
                            r.refunded = refunded;
                            r.undelivered = undelivered;
                        }
                        out.push(r);
                        ControlFlow::Continue(())
                    }
                    Err(e) => {
                        err = Some(e);
                        ControlFlow::Break(())
                    }
                },
            )?;
        }
        err.map_or(Ok(out), Err)
    }

    /// The log's length and last hash.
    pub fn head(&self) -> Result<Head, LedgerError> {
        match self.store.get(TreeId::Meta, log::HEAD_KEY)? {
            None => Ok(Head {
                len: 0,
                hash: log::genesis(&self.owner),
            }),
            Some(b) => decode(TreeId::Meta, log::HEAD_KEY, &b),
        }
    }

    /// How many flush + fsync rounds this handle has run: fewer than operations when group
    /// commit shares them.
    pub fn durable_syncs(&self) -> u64 {
        self.commit.syncs()
    }
}
