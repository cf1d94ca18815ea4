//! Canonical binary encoding of every message body: postcard (serde, varint integers, no
//! padding, field order fixed by the type), read through a size limit, with no trailing bytes.
//!
//! The same value always encodes to the same bytes, which is what lets a signature or a hash
//! over those bytes mean something to a stranger.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value could not be encoded within its size limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("encoded {what} is {len} bytes; the limit is {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("cannot encode {what}: {reason}")]
    Serialize { what: &'static str, reason: String },
}

/// Bytes could not be decoded as the expected message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} has {extra} trailing bytes after the message")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what} is not in canonical form (e.g. an over-long integer encoding)")]
    NonCanonical { what: &'static str },
}

/// Encodes `value`, refusing results longer than `max` bytes.
pub fn encode<T: Serialize>(
    what: &'static str,
    value: &T,
    max: usize,
) -> Result<Vec<u8>, EncodeError> {
    let bytes = postcard::to_stdvec(value).map_err(|e| EncodeError::Serialize {
        what,
        reason: e.to_string(),
    })?;
    if bytes.len() > max {
        return Err(EncodeError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    Ok(bytes)
}

/// Decodes exactly one `T` from `bytes`, refusing inputs over `max` bytes, with trailing data,
/// or in a non-canonical form. postcard itself accepts over-long varints (`[0x80, 0x00]` reads
/// as 0), so the value is re-encoded and compared: one value, one byte string.
pub fn decode<T: Serialize + DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    match postcard::to_stdvec(&value) {
        Ok(again) if again == bytes => Ok(value),
        _ => Err(DecodeError::NonCanonical { what }),
    }
}
