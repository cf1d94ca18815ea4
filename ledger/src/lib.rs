//! The node's books (issue 3): per-counterparty deposits, credit limits, holds and charges,
//! doubly signed receipts, and a hash-chained log that `verify` replays, stored in sled.
//!
//! - [`Ledger`]: the typed API (open, deposit, hold, settle, void, ack, expire, credit, read,
//!   verify, export); every operation is one transaction, durable when it returns.
//!
//! A provider settles a job durably *before* it sends the receipt (DESIGN.md "A job, end to
//! end"), and releases the images only once the requester's signed ack is stored. If no ack
//! comes, [`Ledger::credit`] takes the charge back with a signed credit note that extends the
//! pair's chain: the books are append-only on both sides, and a requester that learns the note
//! ([`Ledger::record_credit`]) has the same chain head as its provider.
//! - [`books`]: records, key layouts, the logged operations and the one function that applies
//!   them (shared by live operations and replay).
//! - [`log`]: the hash chain.
//! - [`store`]: the narrow storage trait, with [`MemStore`]; [`SledStore`] is the real store.
//! - [`audit`]: verify, export and [`import`].
//!
//! `ledger/README.md` says exactly what is durable when.

pub mod audit;
pub mod books;
pub mod error;
mod group_commit;
mod ledger;
pub mod log;
pub mod sled_store;
pub mod store;

pub use audit::{AuditReport, ExportError, import};
pub use books::{Account, Hold, HoldTerms, JobOutcome, Op, Role, StoredCredit, StoredReceipt};
pub use error::{Inconsistency, LedgerError, OpenError};
pub use ledger::{FORMAT_VERSION, Ledger, ReceiptLink};
pub use log::{Head, LogEntry};
pub use sled_store::SledStore;
pub use store::{MemStore, Store, StoreError, TreeId};
