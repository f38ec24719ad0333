//! A sweep's report: `summary.csv` (one row per cell, then facts recalled per
//! method and ratio) and SVG plots, all derived from `results.jsonl`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::results::{read_results, CellResult};
use crate::{EvalError, Result};

/// Facts recalled by one method at one ratio, summed over cases.
#[derive(Debug, Clone, PartialEq)]
pub struct RatioPoint {
    pub method: String,
    /// None for baselines.
    pub ratio: Option<f64>,
    /// Mean over seeds of facts recalled (summed over cases).
    pub correct: f64,
    /// Smallest and largest over seeds.
    pub spread: (usize, usize),
    pub total: usize,
    /// Mean wall time of one cell (one case, one seed), seconds.
    pub seconds_per_cell: f64,
    /// Mean optimization steps of one cell.
    pub steps_per_cell: f64,
}

/// (method, ratio as bits, None for baselines)
type MethodRatio = (String, Option<u64>);
/// (facts correct, facts total)
type FactCount = (usize, usize);

/// Aggregates results per (method, ratio): facts summed over cases, then
/// mean and range over seeds.
pub fn facts_by_ratio(results: &[CellResult]) -> Vec<RatioPoint> {
    let mut grouped: BTreeMap<MethodRatio, BTreeMap<u64, FactCount>> = BTreeMap::new();
    let mut costs: BTreeMap<MethodRatio, Vec<(f64, usize)>> = BTreeMap::new();
    for result in results {
        let key = (result.cell.method.clone(), result.cell.ratio.map(f64::to_bits));
        costs.entry(key.clone()).or_default().push((result.seconds, result.steps));
        let per_seed = grouped.entry(key).or_default().entry(result.cell.seed).or_default();
        per_seed.0 += result.facts_correct;
        per_seed.1 += result.facts_total;
    }
    grouped
        .into_iter()
        .map(|(key, seeds)| {
            let cells = &costs[&key];
            let (method, ratio) = key;
            let corrects: Vec<usize> = seeds.values().map(|(c, _)| *c).collect();
            RatioPoint {
                seconds_per_cell: cells.iter().map(|(seconds, _)| seconds).sum::<f64>() / cells.len() as f64,
                steps_per_cell: cells.iter().map(|(_, steps)| *steps as f64).sum::<f64>() / cells.len() as f64,
                method,
                ratio: ratio.map(f64::from_bits),
                correct: corrects.iter().sum::<usize>() as f64 / corrects.len() as f64,
                spread: (*corrects.iter().min().unwrap_or(&0), *corrects.iter().max().unwrap_or(&0)),
                total: seeds.values().map(|(_, t)| *t).max().unwrap_or(0),
            }
        })
        .collect()
}

/// What a written report tells its reader beyond its files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// The builds that wrote the results, sorted; [`UNRECORDED_BUILD`] for
    /// lines older than the build stamp.
    pub builds: Vec<String>,
}

/// How a report names the build of a line written before lines carried one.
pub const UNRECORDED_BUILD: &str = "unrecorded";

impl Report {
    /// A warning when more than one build wrote the results: builds may
    /// differ in the last bits of a loss curve, and a marginal answer with
    /// them, so their cells are not one run.
    pub fn mixed_builds_warning(&self) -> Option<String> {
        (self.builds.len() > 1).then(|| {
            format!(
                "results.jsonl mixes {} builds ({}); compare cells within one build (summary.csv's last column)",
                self.builds.len(),
                self.builds.join(", ")
            )
        })
    }
}

/// Writes `summary.csv`, `facts_vs_ratio.svg` and `loss_curves.svg` into `dir`.
pub fn write_report(dir: &Path) -> Result<Report> {
    let results = read_results(&dir.join("results.jsonl"))?;
    let points = facts_by_ratio(&results);
    let csv = dir.join("summary.csv");
    std::fs::write(&csv, summary_csv(&results, &points)).map_err(|e| EvalError::io(&csv, e))?;
    let report = Report { builds: builds(&results) };
    if results.is_empty() {
        return Ok(report);
    }
    plot_facts(&dir.join("facts_vs_ratio.svg"), &points)?;
    plot_losses(&dir.join("loss_curves.svg"), &results)?;
    Ok(report)
}

fn builds(results: &[CellResult]) -> Vec<String> {
    let builds: BTreeSet<&str> = results.iter().map(|r| r.build.as_deref().unwrap_or(UNRECORDED_BUILD)).collect();
    builds.into_iter().map(String::from).collect()
}

fn summary_csv(results: &[CellResult], points: &[RatioPoint]) -> String {
    let mut out = String::from(
        "case,method,ratio,seed,n_tokens,n_virtual,facts_correct,facts_total,loss_final,steps,seconds,optimize_seconds,threads,build\n",
    );
    for r in results {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{},{}",
            r.cell.case,
            r.cell.method,
            r.cell.ratio.map_or(String::new(), |x| x.to_string()),
            r.cell.seed,
            r.n_tokens,
            r.n_virtual,
            r.facts_correct,
            r.facts_total,
            r.loss_final.map_or(String::new(), |x| format!("{x:.4}")),
            r.steps,
            r.seconds,
            r.optimize_seconds,
            // Seconds compare only between lines of one thread count and build.
            r.threads.map_or(String::new(), |x| x.to_string()),
            r.build.as_deref().unwrap_or("")
        );
    }
    out.push_str("\nmethod,ratio,facts_correct_mean,facts_correct_min,facts_correct_max,facts_total,seconds_per_cell,steps_per_cell\n");
    for p in points {
        let ratio = p.ratio.map_or(String::new(), |x| x.to_string());
        let _ = writeln!(
            out,
            "{},{ratio},{:.2},{},{},{},{:.1},{:.1}",
            p.method, p.correct, p.spread.0, p.spread.1, p.total, p.seconds_per_cell, p.steps_per_cell
        );
    }
    out
}

fn plot_error(e: impl std::fmt::Display) -> EvalError {
    EvalError::io("plot", std::io::Error::other(e.to_string()))
}

// Ten distinguishable colours: a side-by-side sweep plots about as many methods.
const PALETTE: [RGBColor; 10] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    BLACK,
    RGBColor(255, 140, 0),
    RGBColor(128, 0, 128),
    RGBColor(139, 69, 19),
    RGBColor(128, 128, 128),
];

fn plot_facts(path: &Path, points: &[RatioPoint]) -> Result<()> {
    let ratios: Vec<f64> = points.iter().filter_map(|p| p.ratio).collect();
    let (lo, hi) = ratios.iter().fold((1.0f64, 2.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let total = points.iter().map(|p| p.total).max().unwrap_or(1).max(1) as f64;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Facts recalled vs compression ratio", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo - 0.2)..(hi + 0.2), 0.0..(total + 0.5))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("compression ratio (tokens / cache entries)")
        .y_desc(format!("facts recalled (of {total})"))
        .draw()
        .map_err(plot_error)?;
    let mut methods: Vec<&str> = points.iter().map(|p| p.method.as_str()).collect();
    methods.dedup();
    for (index, method) in methods.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let mine: Vec<&RatioPoint> = points.iter().filter(|p| p.method == *method).collect();
        let series: Vec<(f64, f64)> = match mine.first().and_then(|p| p.ratio) {
            Some(_) => mine.iter().filter_map(|p| p.ratio.map(|r| (r, p.correct))).collect(),
            None => vec![(lo - 0.2, mine[0].correct), (hi + 0.2, mine[0].correct)], // a baseline: flat
        };
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(series.clone(), style))
            .map_err(plot_error)?
            .label(*method)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if mine.first().is_some_and(|p| p.ratio.is_some()) {
            chart.draw_series(series.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled()))).map_err(plot_error)?;
        }
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(plot_error)?;
    root.present().map_err(plot_error)
}

fn plot_losses(path: &Path, results: &[CellResult]) -> Result<()> {
    let curves: Vec<&CellResult> = results.iter().filter(|r| !r.loss_curve.is_empty()).collect();
    if curves.is_empty() {
        return Ok(());
    }
    let longest = curves.iter().map(|r| r.loss_curve.len()).max().unwrap_or(1);
    let highest = curves.iter().flat_map(|r| r.loss_curve.iter().copied()).fold(0.0f32, f32::max) as f64;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("V loss during optimization", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..longest, 0.0..highest * 1.05)
        .map_err(plot_error)?;
    chart.configure_mesh().x_desc("step").y_desc("Σ_layers MSE / mean(target²)").draw().map_err(plot_error)?;
    for (index, result) in curves.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let label = format!("{} {} {}x s{}", result.cell.case, result.cell.method, result.cell.ratio.unwrap_or(0.0), result.cell.seed);
        chart
            .draw_series(LineSeries::new(result.loss_curve.iter().enumerate().map(|(i, l)| (i, *l as f64)), &color))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(plot_error)?;
    root.present().map_err(plot_error)
}
