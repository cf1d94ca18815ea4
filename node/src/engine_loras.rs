//! The LoRAs a provider offers ([`OfferedLora`]): each file hashed with blake3 at start (the
//! hash is what adverts list and jobs name), and which of them, at which scale, the engine has
//! merged now ([`Applied`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use pixmarket_engine::lora::LoraSpec;
use pixmarket_protocol::{Hash, LoraChoice, LoraOffer};

use crate::generator::GenError;

/// Bytes read from a LoRA file at a time while hashing it (files are 10 MB–1 GB).
const HASH_CHUNK_BYTES: usize = 1 << 20;

/// One offered LoRA: what the advert says and where the file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedLora {
    /// Its name and the blake3 hash of the file.
    pub offer: LoraOffer,
    /// The file.
    pub path: PathBuf,
    /// Its jobs run on the Lightning scheduler config.
    pub lightning: bool,
}

impl OfferedLora {
    /// Hashes `file` (blake3 of its bytes) into an offer named `name`.
    pub fn open(name: &str, file: &Path, lightning: bool) -> Result<Self, GenError> {
        let hash = hash_file(file).map_err(|e| {
            GenError::Failed(format!(
                "cannot read LoRA {name:?} at {}: {e}",
                file.display()
            ))
        })?;
        Ok(Self {
            offer: LoraOffer {
                name: name.to_owned(),
                hash,
            },
            path: file.to_path_buf(),
            lightning,
        })
    }

    /// The engine's spec of this LoRA at `scale_permille` thousandths.
    pub fn spec(&self, scale_permille: u16) -> LoraSpec {
        LoraSpec {
            path: self.path.clone(),
            scale: f32::from(scale_permille) / 1000.0,
        }
    }
}

/// blake3 of a file's bytes, read in [`HASH_CHUNK_BYTES`] pieces.
pub fn hash_file(path: &Path) -> std::io::Result<Hash> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK_BYTES];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// The LoRA merged into the engine's transformer now (`None`: its own weights).
pub type Applied = Option<LoraChoice>;
