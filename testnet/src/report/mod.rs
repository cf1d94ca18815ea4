//! Turns a [`RunRecord`] or an [`ExperimentRecord`] into what a person reads: a [`Summary`]
//! (plain numbers, also written as JSON), the terminal [`table`], and a PNG chart.
//!
//! All times are model-time milliseconds (see [`crate::record`]); a simulated run says so in
//! every table and chart title. Money is integer micro-tokens throughout and is printed with
//! integer formatting only (`12.345678` tokens), never through a float.
//!
//! Charts are drawn with plotters' `ab_glyph` text backend, which has no system font lookup:
//! [`write_run`] finds a TrueType font at run time (`PIXMARKET_FONT` first, then common system
//! paths, then a bounded scan of the font directories). Without one the chart is still drawn,
//! with axes and lines but no text, and [`Written::chart_note`] says how to provide a font.

mod chart;
mod files;
mod font;
mod network;
mod summary;
mod text;

pub use chart::{CHART_HEIGHT, CHART_WIDTH, MAX_PROVIDER_LINES};
pub use files::{ReportError, Written, write_experiment, write_run};
pub use network::{Connections, NetworkSummary, summarize_network};
pub use summary::{
    Percentiles, ProviderSummary, Summary, nearest_rank, summarize, utilization_series,
};
pub use text::{experiment_table, table};

#[cfg(test)]
mod tests;
