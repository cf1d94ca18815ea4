//! [`EngineError`]: every way loading a model or generating an image can fail, as the node and
//! the CLI see it. Component loaders keep their own error types; they are wrapped here with the
//! component's name and kept as the source.

use std::path::PathBuf;

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Bytes per MiB, for messages.
const MIB: u64 = 1024 * 1024;

/// Why a model could not be loaded or a generation could not finish.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model folder does not exist.
    #[error("model folder {} does not exist", .0.display())]
    ModelNotFound(PathBuf),
    /// `model_index.json` is missing or not a Qwen-Image pipeline's.
    #[error("{} is not a Qwen-Image model folder: {reason}", dir.display())]
    NotAModel {
        /// The folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// One component (`transformer`, `vae`, ...) could not be loaded.
    #[error("cannot load the {component} from {}", dir.display())]
    Component {
        /// The component's name in `model_index.json`.
        component: &'static str,
        /// Its folder.
        dir: PathBuf,
        /// The loader's error (names the tensor, shapes and file where relevant).
        #[source]
        source: Source,
    },
    /// The components do not fit together (e.g. text width vs the transformer's joint width).
    #[error("the model's components do not fit together: {0}")]
    Mismatch(String),
    /// The requested device cannot be used.
    #[error("cannot use device {name}: {reason}")]
    Device {
        /// `cpu`, `cuda`, `cuda:1`, ...
        name: String,
        /// Why.
        reason: String,
    },
    /// A request's parameters are out of range or inconsistent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The requests need more working memory than the device has free: refused before any of it
    /// is allocated (an allocation failure would abort the process).
    #[error(
        "a {width}×{height} image needs about {} MiB of working memory; {} MiB are available \
         (choose a smaller size, or a device with more memory)",
        needed / MIB,
        available / MIB
    )]
    TooLarge {
        /// The largest request's width.
        width: u32,
        /// The largest request's height.
        height: u32,
        /// The estimate, in bytes ([`crate::pipeline::QwenImage::memory_estimate`]).
        needed: u64,
        /// What the device reports free, in bytes.
        available: u64,
    },
    /// A latents file could not be read or holds the wrong tensor.
    #[error("bad latents file {}: {reason}", path.display())]
    BadLatents {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An input image or mask could not be decoded.
    #[error("cannot decode the {what} (PNG or JPEG expected)")]
    BadImage {
        /// `init image` or `mask`.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// The caller's progress callback asked to stop.
    /// The transformer's last reload (another LoRA) failed; the model cannot generate until
    /// one succeeds.
    #[error("the transformer is not loaded: its last reload failed")]
    TransformerMissing,
    #[error("generation cancelled")]
    Cancelled,
    /// A model computation failed (out of memory, a kernel error, ...).
    #[error("model computation failed")]
    Compute(#[from] candle_core::Error),
    /// Writing the PNG failed.
    #[error("cannot encode the PNG")]
    Png(#[from] png::EncodingError),
    /// A file could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub(crate) fn component(
        component: &'static str,
        dir: impl Into<PathBuf>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Component {
            component,
            dir: dir.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
