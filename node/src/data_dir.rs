//! The node's data folder: `identity.key` (mode 0600), `config.toml`, and the ledger and model
//! folders beneath it. Every command that touches state takes `--data-dir`; without it, the
//! platform's data folder (e.g. `~/.local/share/pixmarket` on Linux).

use std::path::{Path, PathBuf};

use pixmarket_protocol::{IdentityError, SecretKey};

use crate::config::{ConfigError, NodeConfig};

pub const IDENTITY_FILE: &str = "identity.key";
pub const CONFIG_FILE: &str = "config.toml";
/// The `provider.new_peer_credit` of `config.toml` that the ledger's default credit last
/// followed. The ledger's value is set from the config only when the config's value differs
/// from this one, so `pixmarket ledger default-credit` (which records the config's value here)
/// is not undone at the next start; editing the config later still takes effect.
pub const APPLIED_CREDIT_FILE: &str = "applied-new-peer-credit";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("no platform data folder is known here; pass --data-dir")]
    NoDefault,
    #[error("{path} is already initialised (it has {IDENTITY_FILE}); nothing was changed")]
    AlreadyInitialised { path: PathBuf },
    #[error(
        "{path} is not a pixmarket data folder (no {IDENTITY_FILE}); run `pixmarket init --data-dir {path}`"
    )]
    NotInitialised { path: PathBuf },
    #[error("cannot create data folder {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// An opened, initialised data folder.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The platform's default data folder.
    pub fn default_path() -> Result<PathBuf, DataDirError> {
        directories::ProjectDirs::from("", "", "pixmarket")
            .map(|d| d.data_dir().to_owned())
            .ok_or(DataDirError::NoDefault)
    }

    /// Creates the folder (mode 0700), a fresh identity and the default config.
    /// Refuses a folder that already holds an identity.
    pub fn init(root: &Path) -> Result<(Self, SecretKey), DataDirError> {
        if root.join(IDENTITY_FILE).exists() {
            return Err(DataDirError::AlreadyInitialised {
                path: root.to_owned(),
            });
        }
        let create = |source| DataDirError::Create {
            path: root.to_owned(),
            source,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(root).map_err(create)?;
        let key = SecretKey::generate();
        key.save_new(&root.join(IDENTITY_FILE))?;
        let config = root.join(CONFIG_FILE);
        if !config.exists() {
            std::fs::write(&config, NodeConfig::default_toml()).map_err(create)?;
        }
        Ok((
            Self {
                root: root.to_owned(),
            },
            key,
        ))
    }

    /// Opens an initialised folder.
    pub fn open(root: &Path) -> Result<Self, DataDirError> {
        if !root.join(IDENTITY_FILE).exists() {
            return Err(DataDirError::NotInitialised {
                path: root.to_owned(),
            });
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn identity(&self) -> Result<SecretKey, DataDirError> {
        Ok(SecretKey::load(&self.root.join(IDENTITY_FILE))?)
    }

    pub fn config(&self) -> Result<NodeConfig, DataDirError> {
        Ok(NodeConfig::load(&self.root.join(CONFIG_FILE))?)
    }

    /// The config value of `provider.new_peer_credit` the ledger last followed (or was told to
    /// ignore by `ledger default-credit`); see [`APPLIED_CREDIT_FILE`].
    pub fn applied_peer_credit(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join(APPLIED_CREDIT_FILE))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Records `value` as the config value the ledger's default credit has dealt with.
    pub fn set_applied_peer_credit(&self, value: &str) -> Result<(), DataDirError> {
        std::fs::write(
            self.root.join(APPLIED_CREDIT_FILE),
            format!("{}\n", value.trim()),
        )
        .map_err(|source| DataDirError::Write {
            path: self.root.join(APPLIED_CREDIT_FILE),
            source,
        })
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.root.join("ledger")
    }

    pub fn models_path(&self) -> PathBuf {
        self.root.join("models")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_open_gives_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("node");
        let (_, key) = DataDir::init(&root).unwrap();
        let opened = DataDir::open(&root).unwrap();
        assert_eq!(opened.identity().unwrap().public(), key.public());
        assert_eq!(opened.config().unwrap(), NodeConfig::default());
        assert!(matches!(
            DataDir::init(&root),
            Err(DataDirError::AlreadyInitialised { .. })
        ));
        // The refused second init left the identity untouched.
        assert_eq!(opened.identity().unwrap().public(), key.public());
    }

    #[test]
    fn open_of_empty_folder_says_how_to_init() {
        let dir = tempfile::tempdir().unwrap();
        let err = DataDir::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("pixmarket init"), "{err}");
    }
}
