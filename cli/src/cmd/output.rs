//! Where `generate` writes its PNG: checked writable before anything is bought or run, written
//! whole or not at all (a temporary file beside it, renamed over it at the end).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::usage::usage;

/// An output path proven writable: its temporary file exists until [`Output::commit`].
#[derive(Debug)]
pub(crate) struct Output {
    path: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl Output {
    /// Checks that `path` can be written by creating its temporary file now.
    pub(crate) fn prepare(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        if path.is_dir() {
            return Err(usage!(
                "-o {shown} is a folder; give a file name such as {shown}/image.png"
            ));
        }
        let name = path
            .file_name()
            .ok_or_else(|| usage!("-o {shown} has no file name"))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(usage!(
                "cannot write -o {shown}: the folder {} does not exist",
                parent.display()
            ));
        }
        let temp = parent.join(format!(
            ".{}.{}.part",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| usage!("cannot write -o {shown}: {e}"))?;
        Ok(Self {
            path: path.to_path_buf(),
            temp,
            file: Some(file),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` and renames them into place.
    pub(crate) fn commit(mut self, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let mut file = self.file.take().context("the output was already written")?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&self.temp, &self.path))
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(self.path.clone())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Not committed (or failed): leave nothing half-written behind.
        if self.temp.exists() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
