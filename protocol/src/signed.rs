//! The signed envelope. A [`Signed<T>`] carries the signer's public key, the canonical body
//! bytes of a `T`, and an ed25519 signature over
//! `blake3(len(domain) ‖ domain ‖ body)`, where the domain names the message type and the
//! protocol version. A signature made for one message type or version never verifies as another.
//!
//! Receivers verify first and decode second: [`Signed::verify`] checks the size, then the
//! signature with `verify_strict`, and only then parses the body.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError, EncodeError};
use crate::identity::{Hash, PublicKey, SecretKey, Signature};

/// A message type that travels signed.
pub trait Message: Serialize + DeserializeOwned {
    /// Domain tag: message type and protocol version, e.g. `pixmarket/v1/job-request`.
    const DOMAIN: &'static str;
    /// The largest encoded body accepted, in bytes.
    const MAX_ENCODED: usize;
}

/// Fixed overhead of the envelope around a body: a 32-byte key, a 64-byte signature, and the
/// varint lengths postcard writes before the body and the signature.
const ENVELOPE_OVERHEAD: usize = 32 + 64 + 16;

/// Why a signed message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("signature does not verify for {domain} from {signer}")]
    BadSignature {
        domain: &'static str,
        signer: String,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// A body of type `T` signed by `signer`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    signer: PublicKey,
    body: Vec<u8>,
    signature: Signature,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

/// The digest a signature covers, also the message's identity (e.g. a receipt's request hash).
fn digest(domain: &str, body: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    // Domain tags are short constants; the length byte keeps tag and body unambiguous.
    h.update(&[u8::try_from(domain.len()).unwrap_or(u8::MAX)]);
    h.update(domain.as_bytes());
    h.update(body);
    h.finalize().into()
}

impl<T: Message> Signed<T> {
    /// Encodes `value` canonically and signs it.
    pub fn sign(key: &SecretKey, value: &T) -> Result<Self, EncodeError> {
        let body = codec::encode(T::DOMAIN, value, T::MAX_ENCODED)?;
        let signature = key.sign(digest(T::DOMAIN, &body).as_bytes());
        Ok(Self {
            signer: key.public(),
            body,
            signature,
            _type: PhantomData,
        })
    }

    /// Checks the signature, then decodes the body.
    pub fn verify(&self) -> Result<T, VerifyError> {
        if self.body.len() > T::MAX_ENCODED {
            return Err(DecodeError::TooLarge {
                what: T::DOMAIN,
                len: self.body.len(),
                max: T::MAX_ENCODED,
            }
            .into());
        }
        if !self
            .signer
            .verify_strict(self.digest().as_bytes(), &self.signature)
        {
            return Err(VerifyError::BadSignature {
                domain: T::DOMAIN,
                signer: self.signer.fmt_short(),
            });
        }
        Ok(self.decode_unverified()?)
    }

    /// Decodes the body without checking the signature: only to refuse a message cheaply
    /// before the check (one already superseded, say), never to accept anything.
    pub fn decode_unverified(&self) -> Result<T, DecodeError> {
        codec::decode(T::DOMAIN, &self.body, T::MAX_ENCODED)
    }

    /// The domain-tagged digest of the body: what the signature covers.
    pub fn digest(&self) -> Hash {
        digest(T::DOMAIN, &self.body)
    }

    pub fn signer(&self) -> PublicKey {
        self.signer
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub fn signature(&self) -> Signature {
        self.signature
    }

    /// The largest encoded envelope for this message type.
    pub const fn max_encoded() -> usize {
        T::MAX_ENCODED + ENVELOPE_OVERHEAD
    }

    /// Encodes the whole envelope for the wire or the ledger.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        codec::encode(T::DOMAIN, self, Self::max_encoded())
    }

    /// Decodes an envelope (size-limited). The signature is not checked: call [`Signed::verify`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode(T::DOMAIN, bytes, Self::max_encoded())
    }

    /// Reassembles an envelope from its parts (used by tests and by ledger import).
    pub fn from_parts(signer: PublicKey, body: Vec<u8>, signature: Signature) -> Self {
        Self {
            signer,
            body,
            signature,
            _type: PhantomData,
        }
    }
}

impl<T: Message> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("domain", &T::DOMAIN)
            .field("signer", &self.signer)
            .field("body_len", &self.body.len())
            .finish()
    }
}
