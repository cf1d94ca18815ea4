//! The PNG charts of a run and of the experiment, drawn with plotters.

use std::error::Error as StdError;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::files::ReportError;
use super::font::FONT_FAMILY;
use super::summary::{bucket_bounds, bucket_of, count_f64, ms_f64, summarize, utilization_series};
use super::text::{opt_secs, percent, secs};
use crate::record::{ExperimentRecord, JobOutcome, RunRecord};

/// Chart size in pixels.
pub const CHART_WIDTH: u32 = 1200;
/// Chart size in pixels.
pub const CHART_HEIGHT: u32 = 900;
/// Above this many providers the run chart draws a heatmap instead of one line per provider.
pub const MAX_PROVIDER_LINES: usize = 12;
/// Time buckets in the charts (fewer when the run is shorter than this many milliseconds).
pub(super) const CHART_BUCKETS: usize = 60;

type DrawResult = Result<(), Box<dyn StdError + Send + Sync>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

pub(super) fn draw(
    path: &Path,
    paint: impl FnOnce(&Area<'_>) -> DrawResult,
) -> Result<(), ReportError> {
    let fail = |source| ReportError::Chart {
        path: path.to_path_buf(),
        source,
    };
    let root = BitMapBackend::new(path, (CHART_WIDTH, CHART_HEIGHT)).into_drawing_area();
    paint(&root).map_err(fail)?;
    root.present().map_err(|e| fail(Box::new(e)))
}

/// The unit the time axis is labelled in.
struct TimeUnit {
    ms: f64,
    name: &'static str,
}

fn time_unit(duration_ms: u64) -> TimeUnit {
    if duration_ms <= 120_000 {
        TimeUnit {
            ms: 1000.0,
            name: "s",
        }
    } else if duration_ms <= 7_200_000 {
        TimeUnit {
            ms: 60_000.0,
            name: "min",
        }
    } else {
        TimeUnit {
            ms: 3_600_000.0,
            name: "h",
        }
    }
}

/// Buckets for a chart of a run this long: [`CHART_BUCKETS`], fewer for a very short run.
pub(super) fn chart_buckets(duration_ms: u64) -> usize {
    usize::try_from(duration_ms.max(1)).map_or(CHART_BUCKETS, |d| d.min(CHART_BUCKETS))
}

/// The middle of each bucket, in `unit`.
fn bucket_mids(bounds: &[u64], unit: &TimeUnit) -> Vec<f64> {
    bounds
        .windows(2)
        .map(|w| (ms_f64(w[0]) + ms_f64(w[1])) / 2.0 / unit.ms)
        .collect()
}

/// The fleet's busy fraction per bucket: the mean over providers (0 without providers).
pub(super) fn fleet_series(series: &[Vec<f64>], buckets: usize) -> Vec<f64> {
    let n = count_f64(series.len());
    (0..buckets)
        .map(|b| {
            if series.is_empty() {
                0.0
            } else {
                series.iter().filter_map(|p| p.get(b)).sum::<f64>() / n
            }
        })
        .collect()
}

/// A plot area: a caption and labelled axes when there is a font, bare otherwise.
fn plot<'a, 'b>(
    area: &'a Area<'b>,
    text: bool,
    caption: &str,
    x_max: f64,
    y_max: f64,
) -> Result<Chart<'a, 'b>, Box<dyn StdError + Send + Sync>> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(caption, (FONT_FAMILY, 18))
            .x_label_area_size(36)
            .y_label_area_size(64);
    }
    let x_max = if x_max > 0.0 && x_max.is_finite() {
        x_max
    } else {
        1.0
    };
    let y_max = if y_max > 0.0 && y_max.is_finite() {
        y_max
    } else {
        1.0
    };
    Ok(builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?)
}

/// Axes: a labelled mesh with a font, two plain axis lines without.
fn axes(
    chart: &mut Chart<'_, '_>,
    text: bool,
    x_desc: &str,
    y_desc: &str,
    y_percent: bool,
) -> DrawResult {
    if text {
        let fmt_pct = |v: &f64| format!("{:.0}%", v * 100.0);
        let fmt_num = |v: &f64| format!("{v}");
        // About one y label per 40 pixels, so a short strip is not crowded.
        let height = chart.plotting_area().dim_in_pixel().1;
        let y_labels = usize::try_from(height / 40).map_or(11, |n| n.clamp(2, 11));
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_desc)
            .y_labels(y_labels)
            .y_desc(y_desc)
            .label_style((FONT_FAMILY, 13))
            .light_line_style(WHITE.mix(0.0));
        if y_percent {
            mesh.y_label_formatter(&fmt_pct).draw()?;
        } else {
            mesh.y_label_formatter(&fmt_num).draw()?;
        }
    } else {
        let (x, y) = (chart.x_range(), chart.y_range());
        chart.draw_series(LineSeries::new(
            [(x.start, y.end), (x.start, y.start), (x.end, y.start)],
            BLACK.stroke_width(1),
        ))?;
    }
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, text: bool) -> DrawResult {
    if text {
        chart
            .configure_series_labels()
            .label_font((FONT_FAMILY, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

pub(super) fn run_chart(root: &Area<'_>, record: &RunRecord, text: bool) -> DrawResult {
    root.fill(&WHITE)?;
    let root = if text {
        let title = format!(
            "{}{} | engine {} | seed {} | selection {}",
            if record.engine.simulated {
                format!(
                    "SIMULATION (model time at {}x wall time) | ",
                    record.speedup
                )
            } else {
                String::new()
            },
            record.name,
            record.engine.kind,
            record.seed,
            record.selection
        );
        root.titled(&title, (FONT_FAMILY, 22))?
    } else {
        root.clone()
    };
    let (top, bottom) = root.split_vertically(560);
    let d = record.duration_ms;
    let unit = time_unit(d);
    let buckets = chart_buckets(d);
    let bounds = bucket_bounds(d, buckets);
    let mids = bucket_mids(&bounds, &unit);
    let series = utilization_series(record, buckets);
    let fleet = fleet_series(&series, buckets);
    let x_max = ms_f64(d) / unit.ms;
    let x_desc = format!("model time ({})", unit.name);
    let s = summarize(record);
    let fleet_label = format!("fleet average ({})", percent(s.fleet_utilization));

    if record.providers.len() <= MAX_PROVIDER_LINES {
        let mut chart = plot(&top, text, "utilization per provider", x_max, 1.05)?;
        axes(&mut chart, text, &x_desc, "busy", true)?;
        for (i, (p, ys)) in record.providers.iter().zip(&series).enumerate() {
            let color = Palette99::pick(i);
            chart
                .draw_series(LineSeries::new(
                    mids.iter().copied().zip(ys.iter().copied()),
                    color.stroke_width(1),
                ))?
                .label(format!("{} ({})", p.name, p.gpu))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], Palette99::pick(i).stroke_width(2))
                });
        }
        chart
            .draw_series(LineSeries::new(
                mids.iter().copied().zip(fleet.iter().copied()),
                BLACK.stroke_width(4),
            ))?
            .label(fleet_label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(4)));
        legend(&mut chart, text)?;
    } else {
        let (avg_area, heat_area) = top.split_vertically(170);
        let mut avg = plot(&avg_area, text, "fleet utilization", x_max, 1.05)?;
        axes(&mut avg, text, "", "busy", true)?;
        avg.draw_series(LineSeries::new(
            mids.iter().copied().zip(fleet.iter().copied()),
            BLACK.stroke_width(4),
        ))?
        .label(fleet_label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(4)));
        legend(&mut avg, text)?;

        let n = count_f64(record.providers.len());
        let caption = format!(
            "utilization per provider ({} providers; light = idle, dark = busy)",
            record.providers.len()
        );
        let mut heat = plot(&heat_area, text, &caption, x_max, n)?;
        axes(&mut heat, text, &x_desc, "provider", false)?;
        let cells = series.iter().enumerate().flat_map(|(i, ys)| {
            let y0 = count_f64(i);
            let bounds = &bounds;
            let unit = &unit;
            ys.iter().enumerate().filter_map(move |(b, &v)| {
                let (x0, x1) = (bounds.get(b)?, bounds.get(b + 1)?);
                let lightness = 0.97 - 0.72 * v.clamp(0.0, 1.0);
                Some(Rectangle::new(
                    [
                        (ms_f64(*x0) / unit.ms, y0),
                        (ms_f64(*x1) / unit.ms, y0 + 1.0),
                    ],
                    HSLColor(0.6, 0.75, lightness).filled(),
                ))
            })
        });
        heat.draw_series(cells)?;
    }

    let mut submitted = vec![0u32; buckets];
    let mut completed = vec![0u32; buckets];
    for job in &record.jobs {
        if let Some(c) = submitted.get_mut(bucket_of(&bounds, job.submitted_ms)) {
            *c = c.saturating_add(1);
        }
        let finished = job.finished_ms.map(|f| bucket_of(&bounds, f));
        if let (JobOutcome::Completed, Some(c)) =
            (&job.outcome, finished.and_then(|b| completed.get_mut(b)))
        {
            *c = c.saturating_add(1);
        }
    }
    let y_max = submitted
        .iter()
        .chain(&completed)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let width_ms = bounds.get(1).copied().unwrap_or(0);
    let width = if width_ms < 1_000 {
        format!("{width_ms} ms")
    } else {
        format!("{} s", secs(width_ms))
    };
    let caption = format!("jobs submitted and completed per {width} bucket");
    let mut jobs = plot(&bottom, text, &caption, x_max, f64::from(y_max) * 1.1)?;
    axes(&mut jobs, text, &x_desc, "jobs", false)?;
    for (label, counts, color) in [
        ("submitted", &submitted, BLUE),
        ("completed", &completed, RGBColor(0, 140, 60)),
    ] {
        jobs.draw_series(LineSeries::new(
            mids.iter()
                .copied()
                .zip(counts.iter().map(|&c| f64::from(c))),
            color.stroke_width(2),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    legend(&mut jobs, text)?;
    Ok(())
}

pub(super) fn experiment_chart(
    root: &Area<'_>,
    record: &ExperimentRecord,
    text: bool,
) -> DrawResult {
    root.fill(&WHITE)?;
    let root = if text {
        let simulated = record.arms.iter().any(|a| a.engine.simulated);
        let title = format!(
            "{}utilization experiment: {} arms",
            if simulated {
                "SIMULATION (model time) | "
            } else {
                ""
            },
            record.arms.len()
        );
        root.titled(&title, (FONT_FAMILY, 22))?
    } else {
        root.clone()
    };
    let (top, bottom) = root.split_vertically(540);
    let end_ms = record
        .arms
        .iter()
        .map(|a| a.duration_ms)
        .chain(record.offered.iter().map(|o| o.0))
        .max()
        .unwrap_or(0);
    let unit = time_unit(end_ms);
    let x_max = ms_f64(end_ms) / unit.ms;
    let x_desc = format!("model time ({})", unit.name);

    let mut util = plot(&top, text, "fleet utilization per arm", x_max, 1.05)?;
    axes(&mut util, text, &x_desc, "busy", true)?;
    for (i, arm) in record.arms.iter().enumerate() {
        let buckets = chart_buckets(arm.duration_ms);
        let bounds = bucket_bounds(arm.duration_ms, buckets);
        let mids = bucket_mids(&bounds, &unit);
        let fleet = fleet_series(&utilization_series(arm, buckets), buckets);
        let s = summarize(arm);
        let color = Palette99::pick(i);
        util.draw_series(LineSeries::new(
            mids.into_iter().zip(fleet),
            color.stroke_width(2),
        ))?
        .label(format!(
            "{} ({} providers, {}): {} busy, p99 wait {} s",
            arm.name,
            arm.providers.len(),
            arm.selection,
            percent(s.fleet_utilization),
            opt_secs(s.wait_ms.p99)
        ))
        .legend(move |(x, y)| {
            PathElement::new([(x, y), (x + 18, y)], Palette99::pick(i).stroke_width(2))
        });
    }
    legend(&mut util, text)?;

    let y_max = record.offered.iter().map(|o| o.1).max().unwrap_or(0).max(1);
    let mut offered = plot(
        &bottom,
        text,
        "offered load (jobs submitted per bucket)",
        x_max,
        f64::from(y_max) * 1.1,
    )?;
    axes(&mut offered, text, &x_desc, "jobs", false)?;
    let mut points: Vec<(f64, f64)> = record
        .offered
        .iter()
        .map(|&(t, n)| (ms_f64(t) / unit.ms, f64::from(n)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    offered.draw_series(
        AreaSeries::new(points, 0.0, BLUE.mix(0.25)).border_style(BLUE.stroke_width(2)),
    )?;
    Ok(())
}
