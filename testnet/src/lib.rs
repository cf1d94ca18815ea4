//! Many real pixmarket nodes on one machine. [`demo`] is the small local market a newcomer runs
//! first: real libp2p on loopback, real sled ledgers on disk, the real engine with the tiny model.

pub mod adversary;
pub mod books;
pub mod demo;
pub mod experiment;
pub mod hostile;
pub mod record;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sim;
