//! Writing a report to disk: JSON, text and chart files, and the typed error naming the path.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::chart::{draw, experiment_chart, run_chart};
use super::font::font;
use super::summary::{Summary, summarize};
use super::text::{experiment_table, table};
use crate::record::{ExperimentRecord, RunRecord};

/// What [`write_run`] or [`write_experiment`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub json: PathBuf,
    pub text: PathBuf,
    pub chart: PathBuf,
    /// Set when the chart is missing something a reader would expect (no font: no text).
    pub chart_note: Option<String>,
}

/// Writing a report failed; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("could not create the report directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not encode {} as JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not draw the chart {}", path.display())]
    Chart {
        path: PathBuf,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

/// Writes `report.json` (`{ "record": .., "summary": .. }`), `report.txt` ([`table`]) and
/// `report.png` (the chart) into `dir`, creating it if needed.
pub fn write_run(record: &RunRecord, dir: &Path) -> Result<Written, ReportError> {
    #[derive(Serialize)]
    struct RunReport<'a> {
        record: &'a RunRecord,
        summary: &'a Summary,
    }
    create_dir(dir)?;
    let summary = summarize(record);
    let json = dir.join("report.json");
    write_json(
        &json,
        &RunReport {
            record,
            summary: &summary,
        },
    )?;
    let text = dir.join("report.txt");
    write_text(&text, &table(record))?;
    let chart = dir.join("report.png");
    let font = font();
    draw(&chart, |root| run_chart(root, record, font.ready))?;
    Ok(Written {
        json,
        text,
        chart,
        chart_note: font.note.clone(),
    })
}

/// Writes `experiment.json` (`{ "record": .., "arms": [summary, ..] }`), `experiment.txt`
/// ([`experiment_table`]) and `experiment.png` into `dir`, creating it if needed.
pub fn write_experiment(record: &ExperimentRecord, dir: &Path) -> Result<Written, ReportError> {
    #[derive(Serialize)]
    struct ExperimentReport<'a> {
        record: &'a ExperimentRecord,
        arms: Vec<Summary>,
    }
    create_dir(dir)?;
    let json = dir.join("experiment.json");
    let arms = record.arms.iter().map(summarize).collect();
    write_json(&json, &ExperimentReport { record, arms })?;
    let text = dir.join("experiment.txt");
    write_text(&text, &experiment_table(record))?;
    let chart = dir.join("experiment.png");
    let font = font();
    draw(&chart, |root| experiment_chart(root, record, font.ready))?;
    Ok(Written {
        json,
        text,
        chart,
        chart_note: font.note.clone(),
    })
}

fn create_dir(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ReportError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_text(path, &text)
}
