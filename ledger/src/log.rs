//! The hash-chained, append-only log. Entry `n` is stored under key `n` (big-endian) as the
//! canonical (postcard) bytes of [`LogEntry`] `{ seq: n, prev, op }`, where `prev` is the hash of
//! entry `n − 1`, and for entry 0 the genesis hash, which commits to the ledger's owner so a log
//! cannot be passed off as another node's. An entry's hash is
//! `blake3(len(domain) ‖ domain ‖ bytes)` with the domain [`ENTRY_DOMAIN`].
//!
//! The head (entry count and last hash) lives in the meta tree and is written in the same
//! transaction as the entry.

use pixmarket_protocol::{Hash, PublicKey};
use serde::{Deserialize, Serialize};

use crate::books::{Op, decode, encode};
use crate::error::LedgerError;
use crate::store::{Abort, TreeId, Txn};

/// The domain tag of entry hashes.
pub const ENTRY_DOMAIN: &str = "pixmarket/v1/ledger-entry";
const GENESIS_DOMAIN: &str = "pixmarket/v1/ledger-genesis";
pub(crate) const HEAD_KEY: &[u8] = b"head";

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub prev: Hash,
    pub op: Op,
}

/// How many entries the log has and the hash of the last (the genesis hash when empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub len: u64,
    pub hash: Hash,
}

fn tagged(domain: &str, bytes: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    // Both domains are short constants, so the length fits a byte.
    h.update(&[u8::try_from(domain.len()).unwrap_or(u8::MAX)]);
    h.update(domain.as_bytes());
    h.update(bytes);
    h.finalize().into()
}

/// The hash of an entry's canonical bytes.
pub fn entry_hash(bytes: &[u8]) -> Hash {
    tagged(ENTRY_DOMAIN, bytes)
}

/// The `prev` of entry 0 in `owner`'s ledger.
pub fn genesis(owner: &PublicKey) -> Hash {
    tagged(GENESIS_DOMAIN, owner.as_bytes())
}

pub(crate) fn read_head(txn: &dyn Txn, owner: &PublicKey) -> Result<Head, Abort> {
    match txn.get(TreeId::Meta, HEAD_KEY)? {
        None => Ok(Head {
            len: 0,
            hash: genesis(owner),
        }),
        Some(b) => Ok(decode(TreeId::Meta, HEAD_KEY, &b)?),
    }
}

/// Appends `op` after the current head, inside the caller's transaction. Returns the entry's
/// sequence number.
pub(crate) fn append(txn: &dyn Txn, owner: &PublicKey, op: &Op) -> Result<u64, Abort> {
    let head = read_head(txn, owner)?;
    let entry = LogEntry {
        seq: head.len,
        prev: head.hash,
        op: op.clone(),
    };
    let bytes = encode(&entry)?;
    let next = Head {
        len: head.len.checked_add(1).ok_or(LedgerError::Overflow {
            what: "the log length",
        })?,
        hash: entry_hash(&bytes),
    };
    txn.insert(TreeId::Log, &entry.seq.to_be_bytes(), &bytes)?;
    txn.insert(TreeId::Meta, HEAD_KEY, &encode(&next)?)?;
    Ok(entry.seq)
}
