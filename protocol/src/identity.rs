//! Identities: one ed25519 key pair is both the signer of every message a node sends and its
//! libp2p [`PeerId`]. Owns the key newtypes, the content [`Hash`], and the on-disk key file.
//!
//! Key file format: 64 lowercase hex characters (the 32-byte secret seed) and a newline, in a
//! file created with mode 0600. A file that other users may read is refused, as ssh does.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Errors building a key, signature or hash from bytes or text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("not valid hex")]
    Hex,
    #[error("not a valid ed25519 public key (not a curve point)")]
    InvalidPoint,
    #[error("peer id does not embed an ed25519 public key")]
    NotEd25519PeerId,
}

/// Errors loading or creating the identity key file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity key file {path} does not exist (run `pixmarket init` first)")]
    Missing { path: PathBuf },
    #[error("identity key file {path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    #[error(
        "identity key file {path} has mode {mode:o}; other users may read it. Allowed: 600 or 400 (run `chmod 600 {path}`)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("identity key file {path} is corrupt: {reason}; expected 64 hex characters")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot access identity key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

macro_rules! hex_bytes_serde {
    ($ty:ty, $len:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex::encode(self.to_bytes()))
                } else {
                    serde::Serialize::serialize(&self.to_bytes(), s)
                }
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    text.parse().map_err(serde::de::Error::custom)
                } else {
                    let bytes = <[u8; $len]>::deserialize(d)?;
                    Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
                }
            }
        }
        impl FromStr for $ty {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                let mut buf = [0u8; $len];
                if s.len() != 2 * $len {
                    return Err(KeyError::Length {
                        expected: $len,
                        got: s.len() / 2,
                    });
                }
                hex::decode_to_slice(s, &mut buf).map_err(|_| KeyError::Hex)?;
                Self::from_bytes(&buf)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.to_bytes()))
            }
        }
    };
}

/// A validated ed25519 public key: the identity of a node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Builds a key from its 32 bytes, refusing bytes that are not a curve point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPoint)?;
        Ok(Self(*bytes))
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 10 hex characters, for logs.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..5])
    }

    /// Strict verification (rejects small-order keys and non-canonical signatures).
    pub fn verify_strict(&self, msg: &[u8], sig: &Signature) -> bool {
        let Ok(vk) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        vk.verify_strict(msg, &sig).is_ok()
    }

    /// The libp2p peer id of this identity.
    pub fn to_peer_id(&self) -> PeerId {
        // Invariant: the bytes were checked to be a curve point when `self` was built, and
        // libp2p applies the same check, so this cannot fail.
        #[allow(clippy::expect_used)]
        let pk = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .expect("validated ed25519 point");
        PeerId::from_public_key(&libp2p_identity::PublicKey::from(pk))
    }

    /// Parses a peer id as text (`12D3KooW…`) into the identity it names.
    pub fn from_peer_id_str(text: &str) -> Result<Self, KeyError> {
        let peer: PeerId = text
            .trim()
            .parse()
            .map_err(|_| KeyError::NotEd25519PeerId)?;
        Self::from_peer_id(&peer)
    }

    /// The identity a peer id names. Ed25519 peer ids embed the key (identity multihash).
    pub fn from_peer_id(peer: &PeerId) -> Result<Self, KeyError> {
        let mh = peer.as_ref();
        // 0x00 is the identity multihash: the digest is the protobuf-encoded public key.
        if mh.code() != 0x00 {
            return Err(KeyError::NotEd25519PeerId);
        }
        let pk = libp2p_identity::PublicKey::try_decode_protobuf(mh.digest())
            .map_err(|_| KeyError::NotEd25519PeerId)?;
        let ed = pk
            .try_into_ed25519()
            .map_err(|_| KeyError::NotEd25519PeerId)?;
        Self::from_bytes(&ed.to_bytes())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fmt_short())
    }
}
hex_bytes_serde!(PublicKey, 32);

/// An ed25519 secret key. Zeroized on drop; never printed.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// A key from a 32-byte seed (tests and the deterministic testnet use this).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature(self.0.sign(msg).to_bytes())
    }

    /// The same 32 bytes as a libp2p keypair, so the swarm's peer id is this identity.
    pub fn to_libp2p_keypair(&self) -> libp2p_identity::Keypair {
        let mut seed = Zeroizing::new(self.0.to_bytes());
        // Invariant: `ed25519_from_bytes` fails only on a length other than 32.
        #[allow(clippy::expect_used)]
        libp2p_identity::Keypair::ed25519_from_bytes(&mut *seed).expect("32-byte seed")
    }

    /// Reads the key file, refusing a missing, corrupt or group/world-readable file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io(e)),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        if meta.len() > 256 {
            return Err(IdentityError::Corrupt {
                path: path.to_owned(),
                reason: format!("file is {} bytes long", meta.len()),
            });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                IdentityError::Corrupt {
                    path: path.to_owned(),
                    reason: "not UTF-8 text".into(),
                }
            } else {
                io(e)
            }
        })?);
        let hex_text = text.trim();
        let mut seed = Zeroizing::new([0u8; 32]);
        if hex_text.len() != 64 {
            return Err(IdentityError::Corrupt {
                path: path.to_owned(),
                reason: format!("found {} characters", hex_text.len()),
            });
        }
        hex::decode_to_slice(hex_text, &mut *seed).map_err(|_| IdentityError::Corrupt {
            path: path.to_owned(),
            reason: "not hexadecimal".into(),
        })?;
        Ok(Self::from_seed(&seed))
    }

    /// Writes the key to a new file with mode 0600. Never overwrites an existing file.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(self.0.to_bytes())));
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; 64]);

impl Signature {
    pub fn from_bytes(bytes: &[u8; 64]) -> Result<Self, KeyError> {
        Ok(Self(*bytes))
    }
    pub fn to_bytes(&self) -> [u8; 64] {
        self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..5]))
    }
}

// serde's derive does not cover [u8; 64]; write it as a byte string.
impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}
impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = <std::borrow::Cow<'de, [u8]>>::deserialize(d)?;
            let arr: [u8; 64] = bytes.as_ref().try_into().map_err(|_| {
                serde::de::Error::custom(KeyError::Length {
                    expected: 64,
                    got: bytes.len(),
                })
            })?;
            Ok(Self(arr))
        }
    }
}
impl FromStr for Signature {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut buf = [0u8; 64];
        if s.len() != 128 {
            return Err(KeyError::Length {
                expected: 64,
                got: s.len() / 2,
            });
        }
        hex::decode_to_slice(s, &mut buf).map_err(|_| KeyError::Hex)?;
        Ok(Self(buf))
    }
}

/// A blake3 content hash (of an image, a message body, a ledger entry).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash([u8; 32]);

impl Hash {
    pub const ZERO: Hash = Hash([0; 32]);

    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        Ok(Self(*bytes))
    }
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..5])
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.fmt_short())
    }
}
hex_bytes_serde!(Hash, 32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_round_trips_through_public_key() {
        let sk = SecretKey::from_seed(&[7; 32]);
        let pk = sk.public();
        let peer = pk.to_peer_id();
        assert_eq!(PublicKey::from_peer_id(&peer).unwrap(), pk);
        // The libp2p keypair built from the same seed has the same peer id.
        assert_eq!(sk.to_libp2p_keypair().public().to_peer_id(), peer);
    }

    #[test]
    fn non_ed25519_peer_id_is_refused() {
        // An identity-multihash peer id whose digest is not an encoded ed25519 key.
        let peer = PeerId::from_bytes(&[0x00, 0x04, 1, 2, 3, 4]).unwrap();
        assert_eq!(
            PublicKey::from_peer_id(&peer),
            Err(KeyError::NotEd25519PeerId)
        );
        assert_eq!(
            PublicKey::from_peer_id_str("not-a-peer"),
            Err(KeyError::NotEd25519PeerId)
        );
    }

    #[test]
    fn secret_key_never_prints() {
        let sk = SecretKey::from_seed(&[1; 32]);
        assert_eq!(format!("{sk:?}"), "SecretKey(..)");
    }

    #[test]
    fn public_key_text_round_trip_and_bad_text() {
        let pk = SecretKey::from_seed(&[2; 32]).public();
        assert_eq!(pk.to_string().parse::<PublicKey>().unwrap(), pk);
        assert_eq!(
            "zz".parse::<PublicKey>(),
            Err(KeyError::Length {
                expected: 32,
                got: 1
            })
        );
        assert_eq!("g".repeat(64).parse::<PublicKey>(), Err(KeyError::Hex));
        let json = serde_json::to_string(&pk).unwrap();
        assert_eq!(json, format!("\"{pk}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), pk);
    }

    #[test]
    fn key_file_is_created_0600_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let sk = SecretKey::generate();
        sk.save_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(SecretKey::load(&path).unwrap().public(), sk.public());
        assert!(matches!(
            sk.save_new(&path),
            Err(IdentityError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn key_file_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.key");
        assert!(matches!(
            SecretKey::load(&missing),
            Err(IdentityError::Missing { .. })
        ));

        let corrupt = dir.path().join("corrupt.key");
        SecretKey::generate().save_new(&corrupt).unwrap();
        fs::write(&corrupt, "not a key\n").unwrap();
        let err = SecretKey::load(&corrupt).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let open = dir.path().join("open.key");
            SecretKey::generate().save_new(&open).unwrap();
            fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
            let err = SecretKey::load(&open).unwrap_err();
            assert!(
                matches!(err, IdentityError::Permissions { mode: 0o644, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("chmod 600"));
        }
    }
}
