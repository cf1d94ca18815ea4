//! The narrow storage trait the ledger is written against, and an in-memory implementation.
//!
//! The ledger needs very little from a store: named trees of byte keys and byte values, a
//! serializable read-write transaction across all of them, an ordered scan, and a durability
//! barrier. [`SledStore`](crate::SledStore) is the real one; [`MemStore`] backs `verify`'s replay
//! and tests, and shows the store can be swapped.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{Mutex, PoisonError};

use crate::error::LedgerError;

/// The trees (tables) of a ledger. The discriminant is stable: it is part of sled tree names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TreeId {
    /// Format marker, version, owner and the log head. Not replayed by `verify`.
    Meta,
    /// Ledger-wide settings (the default credit for unknown peers).
    Settings,
    /// As provider: what each requester deposited, may owe, was charged, has held.
    ProviderAccounts,
    /// As requester: the mirror of what I deposited at and was charged by each provider.
    RequesterAccounts,
    /// Open holds by job id.
    Holds,
    /// Every job id ever accepted (role byte ‖ job id) and what became of it.
    Jobs,
    /// Receipts by role ‖ peer ‖ index (big-endian), so a pair's receipts scan in order.
    Receipts,
    /// Deposit notes seen (signer ‖ deposit id), so none is counted twice.
    Deposits,
    /// Credit notes by role ‖ peer ‖ index: the same index space as the receipts (one chain).
    Credits,
    /// The hash-chained log: sequence number (big-endian) → entry bytes.
    Log,
}

impl TreeId {
    /// Every tree, in a fixed order.
    pub const ALL: [TreeId; 10] = [
        TreeId::Meta,
        TreeId::Settings,
        TreeId::ProviderAccounts,
        TreeId::RequesterAccounts,
        TreeId::Holds,
        TreeId::Jobs,
        TreeId::Receipts,
        TreeId::Deposits,
        TreeId::Log,
        TreeId::Credits,
    ];

    /// The trees that are a pure function of the log, which `verify` recomputes and compares.
    pub const DERIVED: [TreeId; 8] = [
        TreeId::Settings,
        TreeId::ProviderAccounts,
        TreeId::RequesterAccounts,
        TreeId::Holds,
        TreeId::Jobs,
        TreeId::Receipts,
        TreeId::Deposits,
        TreeId::Credits,
    ];

    /// The tree's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            TreeId::Meta => "pixmarket/meta",
            TreeId::Settings => "pixmarket/settings",
            TreeId::ProviderAccounts => "pixmarket/accounts/provider",
            TreeId::RequesterAccounts => "pixmarket/accounts/requester",
            TreeId::Holds => "pixmarket/holds",
            TreeId::Jobs => "pixmarket/jobs",
            TreeId::Receipts => "pixmarket/receipts",
            TreeId::Deposits => "pixmarket/deposits",
            TreeId::Log => "pixmarket/log",
            TreeId::Credits => "pixmarket/credits",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            TreeId::Meta => 0,
            TreeId::Settings => 1,
            TreeId::ProviderAccounts => 2,
            TreeId::RequesterAccounts => 3,
            TreeId::Holds => 4,
            TreeId::Jobs => 5,
            TreeId::Receipts => 6,
            TreeId::Deposits => 7,
            TreeId::Log => 8,
            TreeId::Credits => 9,
        }
    }
}

/// A failure inside the store itself (I/O, corruption, a bug in the engine).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed")]
    Io(#[source] std::io::Error),
    #[error("the storage engine failed: {0}")]
    Engine(String),
    #[error(
        "an earlier flush or fsync failed, so what is on disk is unknown; reopen the ledger to recover"
    )]
    Poisoned,
}

/// Why a transaction body stopped: a conflict the store retries, a store failure, or a ledger
/// rule that refuses the operation (the whole transaction is then discarded).
#[derive(Debug)]
pub enum Abort {
    /// Another transaction touched the same data; the store runs the body again.
    Conflict,
    Store(StoreError),
    Refused(LedgerError),
}

impl From<LedgerError> for Abort {
    fn from(e: LedgerError) -> Self {
        Abort::Refused(e)
    }
}

/// Reads and writes inside one transaction. Nothing is visible to others until the body returns
/// `Ok`, and nothing at all is written if it returns `Err`.
pub trait Txn {
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, Abort>;
    fn insert(&self, tree: TreeId, key: &[u8], value: &[u8]) -> Result<(), Abort>;
    fn remove(&self, tree: TreeId, key: &[u8]) -> Result<(), Abort>;
}

/// A transaction body. It may run more than once (on conflict), so it must not have side
/// effects outside the [`Txn`].
pub type TxnBody<'a> = dyn Fn(&dyn Txn) -> Result<(), Abort> + 'a;

/// A scan callback: sees one key and value, says whether to go on.
pub type ScanFn<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// What the ledger needs from a key-value store.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Runs `body` as one serializable transaction across every tree.
    fn transact(&self, body: &TxnBody<'_>) -> Result<(), Abort>;

    /// Calls `f` on each entry of `tree` whose key starts with `prefix`, in key order, until
    /// it returns `Break`. Sees committed data only.
    fn scan(&self, tree: TreeId, prefix: &[u8], f: &mut ScanFn<'_>) -> Result<(), StoreError>;

    /// Reads one committed value outside a transaction.
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Returns once everything committed before the call is durable (see `ledger/README.md`).
    fn make_durable(&self) -> Result<(), StoreError>;
}

/// Runs `body` in a transaction and returns what it computed.
pub(crate) fn transact<R>(
    store: &dyn Store,
    body: impl Fn(&dyn Txn) -> Result<R, Abort>,
) -> Result<R, Abort> {
    let out = RefCell::new(None);
    store.transact(&|txn| {
        let r = body(txn)?;
        *out.borrow_mut() = Some(r);
        Ok(())
    })?;
    out.into_inner()
        .ok_or_else(|| Abort::Store(StoreError::Engine("transaction returned no value".into())))
}

type Key = (TreeId, Vec<u8>);

/// A store in memory: a `BTreeMap` behind a mutex. Transactions hold the mutex, so they are
/// serial; `make_durable` does nothing (nothing here survives the process).
#[derive(Debug, Default)]
pub struct MemStore {
    data: Mutex<BTreeMap<Key, Vec<u8>>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every entry of `tree`, in key order.
    pub fn entries(&self, tree: TreeId) -> Vec<(Vec<u8>, Vec<u8>)> {
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        data.range((tree, Vec::new())..)
            .take_while(|((t, _), _)| *t == tree)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

struct MemTxn<'a> {
    base: &'a BTreeMap<Key, Vec<u8>>,
    /// Pending writes; `None` is a removal.
    writes: RefCell<BTreeMap<Key, Option<Vec<u8>>>>,
}

impl Txn for MemTxn<'_> {
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, Abort> {
        let k = (tree, key.to_vec());
        if let Some(w) = self.writes.borrow().get(&k) {
            return Ok(w.clone());
        }
        Ok(self.base.get(&k).cloned())
    }
    fn insert(&self, tree: TreeId, key: &[u8], value: &[u8]) -> Result<(), Abort> {
        self.writes
            .borrow_mut()
            .insert((tree, key.to_vec()), Some(value.to_vec()));
        Ok(())
    }
    fn remove(&self, tree: TreeId, key: &[u8]) -> Result<(), Abort> {
        self.writes.borrow_mut().insert((tree, key.to_vec()), None);
        Ok(())
    }
}

impl Store for MemStore {
    fn transact(&self, body: &TxnBody<'_>) -> Result<(), Abort> {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        let txn = MemTxn {
            base: &data,
            writes: RefCell::new(BTreeMap::new()),
        };
        body(&txn)?;
        let writes = txn.writes.into_inner();
        for (k, v) in writes {
            match v {
                Some(v) => data.insert(k, v),
                None => data.remove(&k),
            };
        }
        Ok(())
    }

    fn scan(&self, tree: TreeId, prefix: &[u8], f: &mut ScanFn<'_>) -> Result<(), StoreError> {
        // Copy out first so `f` may call back into the store.
        let rows: Vec<(Vec<u8>, Vec<u8>)> = {
            let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
            data.range((tree, prefix.to_vec())..)
                .take_while(|((t, k), _)| *t == tree && k.starts_with(prefix))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in rows {
            if f(&k, &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(data.get(&(tree, key.to_vec())).cloned())
    }

    fn make_durable(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
