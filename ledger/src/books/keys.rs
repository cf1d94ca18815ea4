//! Key layouts and typed access to the trees (all integers big-endian, so a scan runs in
//! numeric order).

use pixmarket_protocol::codec;
use pixmarket_protocol::{JobId, MicroTokens, PublicKey};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::records::{Account, MAX_RECORD, Role};
use crate::error::LedgerError;
use crate::store::{Abort, TreeId, Txn};

// ---- keys -------------------------------------------------------------------------------

pub(crate) fn job_key(role: Role, job: JobId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = role.byte();
    k[1..].copy_from_slice(&job.0);
    k
}

pub(crate) fn receipt_key(role: Role, peer: &PublicKey, index: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = role.byte();
    k[1..33].copy_from_slice(peer.as_bytes());
    k[33..].copy_from_slice(&index.to_be_bytes());
    k
}

pub(crate) fn receipt_prefix(role: Role, peer: &PublicKey) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = role.byte();
    k[1..].copy_from_slice(peer.as_bytes());
    k
}

pub(crate) fn deposit_key(signer: &PublicKey, id: &[u8; 16]) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[..32].copy_from_slice(signer.as_bytes());
    k[32..].copy_from_slice(id);
    k
}

/// A credit note's place in the Credits tree: the same role ‖ peer ‖ index as the receipts,
/// so a pair's chain is the merge of both trees by index.
pub(crate) fn credit_key(role: Role, peer: &PublicKey, index: u64) -> [u8; 41] {
    receipt_key(role, peer, index)
}

pub(crate) const DEFAULT_CREDIT_KEY: &[u8] = b"default_credit";

// ---- typed access -----------------------------------------------------------------------

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, LedgerError> {
    Ok(codec::encode("ledger record", value, MAX_RECORD)?)
}

pub(crate) fn decode<T: Serialize + DeserializeOwned>(
    tree: TreeId,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, LedgerError> {
    codec::decode("ledger record", bytes, MAX_RECORD).map_err(|e| LedgerError::CorruptRecord {
        tree,
        key: hex::encode(key),
        reason: e.to_string(),
    })
}

pub(crate) fn get<T: Serialize + DeserializeOwned>(
    txn: &dyn Txn,
    tree: TreeId,
    key: &[u8],
) -> Result<Option<T>, Abort> {
    match txn.get(tree, key)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(decode(tree, key, &bytes)?)),
    }
}

pub(crate) fn put<T: Serialize>(
    txn: &dyn Txn,
    tree: TreeId,
    key: &[u8],
    value: &T,
) -> Result<(), Abort> {
    txn.insert(tree, key, &encode(value)?)
}

pub(crate) fn default_credit(txn: &dyn Txn) -> Result<MicroTokens, Abort> {
    Ok(get(txn, TreeId::Settings, DEFAULT_CREDIT_KEY)?.unwrap_or(MicroTokens::ZERO))
}

/// The peer's account, or a new one with the ledger's current default credit. The default is
/// copied into the account when it is first touched, so changing the default later never
/// changes what an existing peer may use.
pub(crate) fn account(txn: &dyn Txn, role: Role, peer: &PublicKey) -> Result<Account, Abort> {
    match get(txn, role.accounts(), peer.as_bytes())? {
        Some(a) => Ok(a),
        None => Ok(Account {
            credit_limit: match role {
                Role::Provider => default_credit(txn)?,
                Role::Requester => MicroTokens::ZERO,
            },
            ..Account::default()
        }),
    }
}

pub(crate) fn put_account(
    txn: &dyn Txn,
    role: Role,
    peer: &PublicKey,
    a: &Account,
) -> Result<(), Abort> {
    put(txn, role.accounts(), peer.as_bytes(), a)
}
