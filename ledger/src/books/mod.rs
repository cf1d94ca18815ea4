//! The books: record types, key layouts, the logged operations ([`Op`]) and the one function
//! that applies an operation to the state (`apply`).
//!
//! `apply` is the only code that changes balances. Live operations run it inside a store
//! transaction; `verify` and `import` run the very same function over the log into a fresh
//! in-memory store, so what is checked is what was done. It reads nothing but its arguments
//! and the transaction (no clock, no randomness, no `HashMap` order), so a replay is exact.
//!
//! [`Op::Refund`] is the one operation that lowers `charged`: it undoes the settle of the
//! pair's latest, unacknowledged receipt whose image never reached the requester, rewinding
//! `last_receipt` to that receipt's `prev_entry_hash` (see `Ledger::refund_undelivered`).
//!
//! Key layouts (all integers big-endian, so a scan runs in numeric order):
//! - accounts: peer key (32 bytes), one tree per [`Role`]
//! - holds: job id (16)
//! - jobs: role (1) ‖ job id (16)
//! - receipts: role (1) ‖ peer (32) ‖ index (8)
//! - deposits: signer (32) ‖ deposit id (16)

mod keys;
mod records;
mod rules;

pub(crate) use keys::*;
pub use records::*;
pub(crate) use rules::apply;
