//! `reachability.json` in the data folder: a running node rewrites it every
//! [`WRITE_INTERVAL`] with what its network knows about its reachability, and
//! `pixmarket doctor` reads it back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::network::{Client, Reachability};

/// The file's name in the data folder.
pub const FILE_NAME: &str = "reachability.json";
/// How often a running node rewrites the file: a few hundred bytes, so cheap, and often enough
/// that `doctor` sees a reservation or a probe within seconds.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(2);
/// The most bytes `doctor` reads (every list in the snapshot is bounded; this is far above).
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Why the snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReachFileError {
    #[error(
        "{path} does not exist: no node has run from this data folder yet (start `pixmarket node`)"
    )]
    Missing { path: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes; it was not written by a node")]
    TooLarge { path: PathBuf },
    #[error("{path} is not a reachability snapshot")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The snapshot's path in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads the snapshot a node wrote in `data_dir`.
pub fn read(data_dir: &Path) -> Result<Reachability, ReachFileError> {
    let path = path(data_dir);
    let meta = std::fs::metadata(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ReachFileError::Missing { path: path.clone() },
        _ => ReachFileError::Read {
            path: path.clone(),
            source,
        },
    })?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(ReachFileError::TooLarge { path });
    }
    let bytes = std::fs::read(&path).map_err(|source| ReachFileError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ReachFileError::Parse { path, source })
}

/// Rewrites the snapshot every [`WRITE_INTERVAL`] until the node's network stops. Written to a
/// temporary file and renamed, so a reader never sees half of one.
pub async fn keep_written(client: Client, data_dir: PathBuf) {
    let target = path(&data_dir);
    let temp = data_dir.join(format!("{FILE_NAME}.tmp"));
    loop {
        let Ok(snapshot) = client.reachability().await else {
            return;
        };
        match serde_json::to_vec_pretty(&snapshot) {
            Ok(bytes) => {
                let written = tokio::fs::write(&temp, &bytes).await;
                if let Err(e) = match written {
                    Ok(()) => tokio::fs::rename(&temp, &target).await,
                    Err(e) => Err(e),
                } {
                    tracing::warn!(path = %target.display(), error = %e, "cannot write the reachability snapshot");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the reachability snapshot"),
        }
        tokio::time::sleep(WRITE_INTERVAL).await;
    }
}
