//! The sled 0.34 implementation of [`Store`]: one sled tree per [`TreeId`], opening checks
//! (lock, corruption, foreign folders), and the durability barrier that makes a commit survive
//! power loss, which sled's own `flush` does not promise on Linux.
//!
//! Durability, precisely (also in `ledger/README.md`): sled appends every committed
//! transaction to its log in the file `db`. `Db::flush` writes the log buffers and calls
//! `sync_file_range`, which starts and waits for write-back of those pages but neither flushes
//! the drive's volatile write cache nor persists file metadata (a grown file size). After it we
//! call `fdatasync` on `db` ourselves, which does both, and then `fsync` on the folder, so the
//! names of files sled created, renamed or removed since (its snapshots) are durable as well.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use crate::error::OpenError;
use crate::store::{Abort, ScanFn, Store, StoreError, TreeId, TxnBody};

/// The files a sled 0.34 folder holds; anything else in the ledger folder makes it foreign.
const SLED_FILES: [&str; 4] = ["conf", "db", "blobs", "snap."];

/// How long opening waits for a lock to go. After the last handle in a process is dropped,
/// sled's background threads (buffer writes, snapshots) can keep the database file, and so its
/// lock, open for a few milliseconds; reopening in the same process must not fail on that. A
/// lock held longer than this is another live process.
const LOCK_GRACE: Duration = Duration::from_millis(500);
const LOCK_POLL: Duration = Duration::from_millis(5);

/// A sled database opened as a ledger store.
#[derive(Debug)]
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    trees: Vec<sled::Tree>,
    /// A second handle on sled's log file, used only to fsync it.
    db_file: File,
    /// The folder, fsynced at each barrier so that sled's snapshot renames and removals
    /// (which sled does not fsync the folder for) are durable too.
    dir: File,
    /// Set when a flush or fsync failed: after a failed fsync the kernel may have dropped the
    /// dirty pages, so nothing more is promised until the ledger is reopened.
    poisoned: AtomicBool,
}

/// Whether [`SledStore::open`] found an existing database or made a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    Existing,
    Created,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

impl SledStore {
    /// Opens (or, when `path` is missing or an empty folder, creates) a sled database.
    ///
    /// Refuses, writing nothing: a folder holding files sled does not make
    /// ([`OpenError::Foreign`]), a database another process holds ([`OpenError::Locked`]), and
    /// one sled finds corrupt ([`OpenError::Corrupt`]). The caller checks the ledger marker.
    pub fn open(path: &Path) -> Result<(Self, Opened), OpenError> {
        let fresh = check_folder(path)?;
        if !fresh {
            remove_unfinished_snapshots(path)?;
        }
        let started = Instant::now();
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
                Err(e) => match map_open_error(path, e) {
                    OpenError::Locked { .. } if started.elapsed() < LOCK_GRACE => {
                        std::thread::sleep(LOCK_POLL);
                    }
                    other => return Err(other),
                },
            }
        };
        // A sled database that holds anything other than the ledger's trees is someone
        // else's: refuse it before creating a single tree in it.
        let ours: Vec<&str> = TreeId::ALL.iter().map(|t| t.name()).collect();
        let stranger = db
            .tree_names()
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .find(|n| n != "__sled__default" && !ours.contains(&n.as_str()));
        if let Some(name) = stranger {
            return Err(OpenError::Foreign {
                path: path.to_owned(),
                reason: format!("its sled database has a tree {name:?}"),
            });
        }
        if !db.is_empty() {
            return Err(OpenError::Foreign {
                path: path.to_owned(),
                reason: "its sled database has data in the default tree".into(),
            });
        }
        let mut trees = Vec::with_capacity(TreeId::ALL.len());
        for id in TreeId::ALL {
            // Opening a tree that does not exist creates it; the caller has already checked
            // the folder is new or ours, or will refuse it before writing anything else.
            trees.push(
                db.open_tree(id.name())
                    .map_err(|e| map_open_error(path, e))?,
            );
        }
        let db_file = File::open(path.join("db")).map_err(io(path))?;
        let dir = File::open(path).map_err(io(path))?;
        if fresh {
            // Make the new files' directory entries durable.
            dir.sync_all().map_err(io(path))?;
        }
        Ok((
            Self {
                path: path.to_owned(),
                db,
                trees,
                db_file,
                dir,
                poisoned: AtomicBool::new(false),
            },
            if fresh {
                Opened::Created
            } else {
                Opened::Existing
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tree(&self, id: TreeId) -> &sled::Tree {
        // `trees` is built from `TreeId::ALL` in index order.
        &self.trees[id.index()]
    }

    /// Direct access to the sled database, for tests that tamper with it.
    #[doc(hidden)]
    pub fn raw_tree(&self, id: TreeId) -> &sled::Tree {
        self.tree(id)
    }
}

/// Whether `path` is missing or an empty folder, so a ledger may be created there.
pub(crate) fn is_new(path: &Path) -> Result<bool, OpenError> {
    check_folder(path)
}

/// Returns whether `path` is a new ledger folder. Refuses files that sled would not have made.
fn check_folder(path: &Path) -> Result<bool, OpenError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(io(path)(e)),
        Ok(m) if !m.is_dir() => {
            return Err(OpenError::Foreign {
                path: path.to_owned(),
                reason: "it is a file, not a folder".into(),
            });
        }
        Ok(_) => {}
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io(path))? {
        let entry = entry.map_err(io(path))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    if names.is_empty() {
        return Ok(true);
    }
    if let Some(stranger) = names.iter().find(|n| {
        !SLED_FILES
            .iter()
            .any(|s| n.as_str() == *s || (s.ends_with('.') && n.starts_with(s)))
    }) {
        return Err(OpenError::Foreign {
            path: path.to_owned(),
            reason: format!("it holds {stranger:?}, which a pixmarket ledger never does"),
        });
    }
    if !names.iter().any(|n| n == "db") || !names.iter().any(|n| n == "conf") {
        return Err(OpenError::Corrupt {
            path: path.to_owned(),
            reason: "the database files `db` or `conf` are missing".into(),
        });
    }
    Ok(false)
}

/// The suffix of a snapshot sled 0.34 is still writing; it renames the file without it once
/// the file is complete and fsynced.
const UNFINISHED_SNAPSHOT: &str = ".generating";

/// Removes the snapshots a killed process left half-written, which sled 0.34 would otherwise
/// read as its newest (its reader does not skip `snap.<lsn>.generating`, and that name sorts
/// after the finished `snap.<lsn>` and every older one) and refuse as corrupt. A snapshot only
/// summarises the log in `db`: without the unfinished one sled starts from the newest finished
/// snapshot, or from the log's start, and replays the log from there, so nothing is lost.
///
/// Only while no live sled holds the folder: this takes the lock sled itself takes (`flock`
/// on `db`) and, when a live process has it, leaves its snapshot alone and the opening below
/// reports the folder locked. The lock is let go before sled opens, since a second `flock` in
/// this process would conflict with it.
fn remove_unfinished_snapshots(path: &Path) -> Result<(), OpenError> {
    let db = File::open(path.join("db")).map_err(io(path))?;
    match db.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
        Err(std::fs::TryLockError::Error(e)) => return Err(io(path)(e)),
    }
    let mut removed = false;
    for entry in std::fs::read_dir(path).map_err(io(path))? {
        let entry = entry.map_err(io(path))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(UNFINISHED_SNAPSHOT) {
            std::fs::remove_file(entry.path()).map_err(io(path))?;
            removed = true;
        }
    }
    if removed {
        File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(io(path))?;
    }
    drop(db); // closing the file lets the lock go
    Ok(())
}

fn map_open_error(path: &Path, e: sled::Error) -> OpenError {
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            OpenError::Locked {
                path: path.to_owned(),
            }
        }
        sled::Error::Io(source) => OpenError::Io {
            path: path.to_owned(),
            source,
        },
        sled::Error::Corruption { at, .. } => OpenError::Corrupt {
            path: path.to_owned(),
            reason: format!("sled found corrupt data at {at:?}"),
        },
        other => OpenError::Corrupt {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

fn engine(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => StoreError::Io(io),
        other => StoreError::Engine(other.to_string()),
    }
}

struct SledTxn<'a> {
    trees: &'a [TransactionalTree],
}

fn unabortable(e: UnabortableTransactionError) -> Abort {
    match e {
        UnabortableTransactionError::Conflict => Abort::Conflict,
        UnabortableTransactionError::Storage(e) => Abort::Store(engine(e)),
    }
}

impl crate::store::Txn for SledTxn<'_> {
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, Abort> {
        let v = self.trees[tree.index()].get(key).map_err(unabortable)?;
        Ok(v.map(|v| v.to_vec()))
    }
    fn insert(&self, tree: TreeId, key: &[u8], value: &[u8]) -> Result<(), Abort> {
        self.trees[tree.index()]
            .insert(key, value)
            .map_err(unabortable)?;
        Ok(())
    }
    fn remove(&self, tree: TreeId, key: &[u8]) -> Result<(), Abort> {
        self.trees[tree.index()].remove(key).map_err(unabortable)?;
        Ok(())
    }
}

impl Store for SledStore {
    fn transact(&self, body: &TxnBody<'_>) -> Result<(), Abort> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Abort::Store(StoreError::Poisoned));
        }
        let result = self
            .trees
            .as_slice()
            .transaction(|trees: &Vec<TransactionalTree>| {
                match body(&SledTxn { trees }) {
                    Ok(()) => Ok(()),
                    // sled reruns the body on a conflict.
                    Err(Abort::Conflict) => Err(ConflictableTransactionError::Conflict),
                    Err(other) => Err(ConflictableTransactionError::Abort(other)),
                }
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(a)) => Err(a),
            Err(TransactionError::Storage(e)) => Err(Abort::Store(engine(e))),
        }
    }

    fn scan(&self, tree: TreeId, prefix: &[u8], f: &mut ScanFn<'_>) -> Result<(), StoreError> {
        for row in self.tree(tree).scan_prefix(prefix) {
            let (k, v) = row.map_err(engine)?;
            if f(&k, &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)
            .get(key)
            .map_err(engine)?
            .map(|v| v.to_vec()))
    }

    fn make_durable(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned);
        }
        let result = self
            .db
            .flush()
            .map_err(engine)
            .and_then(|_| self.db_file.sync_data().map_err(StoreError::Io))
            .and_then(|()| self.dir.sync_all().map_err(StoreError::Io));
        if result.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        result
    }
}

use sled::Transactional as _;
