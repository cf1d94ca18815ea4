//! The language every pixmarket node speaks: ed25519 identities (which are also libp2p peer
//! ids), the domain-separated [`Signed`] envelope, every versioned wire message, the validation
//! limits a message must meet, and the integer metering function that requester and provider
//! must both compute to the same micro-token.
//!
//! This crate does no I/O beyond reading and writing the identity key file.

pub mod codec;
pub mod exchange;
pub mod identity;
pub mod messages;
pub mod metering;
pub mod preview;
pub mod signed;
pub mod validate;

pub use codec::{DecodeError, EncodeError};
pub use exchange::{ChainEntry, ChainLink, CreditNote, JobStatus, JobVoid, ReceiptRefusal};
pub use identity::{Hash, IdentityError, KeyError, PublicKey, SecretKey, Signature};
pub use messages::{
    CapacityAdvert, CostMismatch, DepositNote, DeviceCapacity, FailReason, JobEvent, JobEventKind,
    JobId, JobParams, JobRequest, LoraChoice, LoraOffer, Mode, Quote, QuoteId, QuoteRequest,
    Receipt, ReceiptAck, StepCaching, effective_steps,
};
pub use metering::{MeterError, MeteredUnits, MicroTokens, PriceSchedule, TokenAmountError};
pub use preview::Preview;
pub use signed::{Message, Signed, VerifyError};
pub use validate::ValidationError;

/// The protocol version carried in every domain tag. A node refuses messages of another version.
pub const PROTOCOL_VERSION: u16 = 1;
