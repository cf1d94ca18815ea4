//! The node's books (issue 3): per-counterparty deposits, credit limits, holds and charges,
//! doubly signed receipts, and a hash-chained log that `verify` replays, stored in sled.
