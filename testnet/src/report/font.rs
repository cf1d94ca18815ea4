//! Finding a TrueType font at run time and registering it with plotters, once per process.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

/// The family name the found font is registered under.
pub(super) const FONT_FAMILY: &str = "sans-serif";
/// Fonts larger than this are not read (a TTF for Latin text is well under 10 MiB).
pub(super) const MAX_FONT_BYTES: u64 = 64 * 1024 * 1024;
/// How deep the font directory scan goes.
pub(super) const MAX_FONT_SCAN_DEPTH: usize = 5;

pub(super) struct FontStatus {
    /// A font is registered under [`FONT_FAMILY`].
    pub(super) ready: bool,
    /// What the reader should know about the chart's text.
    pub(super) note: Option<String>,
}

/// Finds, reads and registers a font once per process.
pub(super) fn font() -> &'static FontStatus {
    static FONT: OnceLock<FontStatus> = OnceLock::new();
    FONT.get_or_init(find_and_register_font)
}

pub(super) fn find_and_register_font() -> FontStatus {
    let mut env_problem = None;
    if let Some(path) = std::env::var_os("PIXMARKET_FONT").map(PathBuf::from) {
        match register(&path) {
            Ok(()) => {
                return FontStatus {
                    ready: true,
                    note: None,
                };
            }
            Err(why) => {
                env_problem = Some(format!("PIXMARKET_FONT={} {why}", path.display()));
            }
        }
    }
    let common = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
        "/usr/share/fonts/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
        "/Library/Fonts/Arial.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
    ];
    let mut candidates: Vec<PathBuf> = common.iter().map(PathBuf::from).collect();
    for root in ["/usr/share/fonts", "/usr/local/share/fonts"] {
        scan_ttf(Path::new(root), 0, &mut candidates);
    }
    // A few tries at most: each registration attempt leaks its bytes.
    for path in candidates.iter().filter(|p| p.is_file()).take(4) {
        if register(path).is_ok() {
            let note = env_problem.map(|p| format!("{p}; used {} instead", path.display()));
            return FontStatus { ready: true, note };
        }
    }
    let mut note = String::from(
        "no TrueType font found, so the chart has no text (axes and lines only); \
         set PIXMARKET_FONT to the path of a .ttf file (e.g. DejaVuSans.ttf) to label it",
    );
    if let Some(p) = env_problem {
        let _ = write!(note, " ({p})");
    }
    FontStatus {
        ready: false,
        note: Some(note),
    }
}

/// Appends the `*.ttf` files under `dir` (sorted, depth-bounded) to `out`.
pub(super) fn scan_ttf(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > MAX_FONT_SCAN_DEPTH || out.len() > 256 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            scan_ttf(&path, depth + 1, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
        {
            out.push(path);
        }
    }
}

/// Why a font file could not be registered; displayed after the file's path.
#[derive(Debug, thiserror::Error)]
pub(super) enum FontError {
    /// The file could not be read.
    #[error("cannot be read: {0}")]
    Read(#[from] std::io::Error),
    /// The file is over [`MAX_FONT_BYTES`].
    #[error("is larger than {MAX_FONT_BYTES} bytes")]
    TooLarge,
    /// plotters refused the bytes.
    #[error("is not a font plotters can use")]
    NotAFont,
}

/// Reads a font file, leaks it (plotters' `ab_glyph` backend keeps `&'static` fonts; this runs
/// at most a few times per process) and registers it under [`FONT_FAMILY`].
pub(super) fn register(path: &Path) -> Result<(), FontError> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_FONT_BYTES {
        return Err(FontError::TooLarge);
    }
    let bytes = std::fs::read(path)?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| FontError::NotAFont)
}
