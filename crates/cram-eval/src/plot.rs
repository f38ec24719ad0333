//! A sweep's report: `summary.csv` (one row per cell, then facts recalled per
//! method and ratio with a Wilson 95% interval), `comparisons.csv` (every
//! two methods at a ratio on the same facts, with McNemar's p),
//! `breakdown.csv` (by fact kind, placement and span length), with
//! `calibrate = true` `calibration.csv`, and SVG plots, all derived from
//! `results.jsonl` (and the generated cases' labels).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::breakdown;
use crate::calibration::Calibration;
use crate::cases::load_case_file;
use crate::results::{read_results, CellResult};
use crate::stats::{self, Paired, Verdicts};
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
    /// Facts recalled and facts asked, pooled over cases and seeds.
    pub recalled: usize,
    pub asked: usize,
    /// The seeds pooled.
    pub seeds: usize,
    /// Mean seconds of one cell (one case, one seed) run alone
    /// ([`crate::results::CellResult::seconds_alone`]).
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
        costs.entry(key.clone()).or_default().push((result.seconds_alone(), result.steps));
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
                recalled: corrects.iter().sum(),
                asked: seeds.values().map(|(_, t)| *t).sum(),
                seeds: seeds.len(),
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
    /// How many facts calibration kept and why it dropped the rest, when
    /// the sweep calibrates (`calibrate = true`).
    pub calibration: Option<String>,
}

/// How a report names the build of a line written before lines carried one.
pub const UNRECORDED_BUILD: &str = "unrecorded";

impl RatioPoint {
    /// The share of facts recalled, pooled over cases and seeds (0 when none were asked).
    pub fn share(&self) -> f64 {
        if self.asked == 0 {
            0.0
        } else {
            self.recalled as f64 / self.asked as f64
        }
    }

    /// The Wilson 95% interval of [`RatioPoint::share`], its seeds
    /// counted as one draw of facts ([`stats::pooled_wilson_interval`]).
    pub fn interval(&self) -> (f64, f64) {
        stats::pooled_wilson_interval(self.recalled, self.asked, self.seeds, stats::Z_95)
    }
}

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

/// Two methods' verdicts on the facts both were asked at one ratio.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// None when both are baselines.
    pub ratio: Option<f64>,
    pub method_a: String,
    pub method_b: String,
    pub paired: Paired,
}

/// At each ratio, every two methods asked the same facts, the baselines
/// (asked once, for every ratio) included; then the baselines against each
/// other. Facts pair by case, seed and question, so a seeded method meets
/// an unseeded one on the first seed only.
pub fn comparisons(results: &[CellResult]) -> Vec<Comparison> {
    let mut by_method: BTreeMap<MethodRatio, Verdicts> = BTreeMap::new();
    for result in results {
        let key = (result.cell.method.clone(), result.cell.ratio.map(f64::to_bits));
        by_method.entry(key).or_default().extend(stats::verdicts([result]));
    }
    let baselines: Vec<(&str, &Verdicts)> =
        by_method.iter().filter(|((_, ratio), _)| ratio.is_none()).map(|((method, _), verdicts)| (method.as_str(), verdicts)).collect();
    let ratios: BTreeSet<u64> = by_method.keys().filter_map(|(_, ratio)| *ratio).collect();
    let mut out = Vec::new();
    for ratio in ratios {
        let baselines_here: Vec<(&str, Verdicts)> = baselines.iter().map(|(method, verdicts)| (*method, at_ratio(verdicts, ratio))).collect();
        let methods_here = by_method.iter().filter(|((_, r), _)| *r == Some(ratio)).map(|((method, _), verdicts)| (method.as_str(), verdicts));
        let group: Vec<(&str, &Verdicts)> = baselines_here.iter().map(|(method, verdicts)| (*method, verdicts)).chain(methods_here).collect();
        let first_method = baselines_here.len();
        out.extend(pairs(Some(f64::from_bits(ratio)), &group, first_method));
    }
    out.extend(pairs(None, &baselines, 0));
    out
}

/// A baseline's verdicts as if asked at `ratio`, to pair with the methods there.
fn at_ratio(verdicts: &Verdicts, ratio: u64) -> Verdicts {
    verdicts.iter().map(|(key, recalled)| (stats::FactKey { ratio: Some(ratio), ..key.clone() }, *recalled)).collect()
}

/// Every two of `group` that share a fact, the second at `first_method` or
/// later (the ones before are baselines, compared among themselves once).
fn pairs(ratio: Option<f64>, group: &[(&str, &Verdicts)], first_method: usize) -> Vec<Comparison> {
    let mut out = Vec::new();
    for (j, (method_b, b)) in group.iter().enumerate().skip(first_method) {
        for (method_a, a) in &group[..j] {
            let paired = stats::compare(a, b);
            if paired.facts > 0 {
                out.push(Comparison { ratio, method_a: method_a.to_string(), method_b: method_b.to_string(), paired });
            }
        }
    }
    out
}

/// Writes `summary.csv`, `comparisons.csv`, `facts_vs_ratio.svg` and
/// `loss_curves.svg` into `dir`.
pub fn write_report(dir: &Path) -> Result<Report> {
    let mut results = read_results(&dir.join("results.jsonl"))?;
    let mut calibration = None;
    if calibrates(dir)? {
        // The config was checked to hold both baselines: one missing here is
        // a partial folder (a shard, a stopped run), reported uncalibrated.
        match Calibration::of(&results) {
            Ok(calibrated) => {
                let csv = dir.join("calibration.csv");
                std::fs::write(&csv, calibrated.csv()).map_err(|e| EvalError::io(&csv, e))?;
                results = calibrated.apply(&results);
                calibration = Some(calibrated.summary());
            }
            Err(error) => calibration = Some(format!("not calibrated, every fact scored ({error}: a shard or a stopped run; the merged report calibrates)")),
        }
    }
    let points = facts_by_ratio(&results);
    let csv = dir.join("summary.csv");
    std::fs::write(&csv, summary_csv(&results, &points)).map_err(|e| EvalError::io(&csv, e))?;
    let csv = dir.join("comparisons.csv");
    std::fs::write(&csv, comparisons_csv(&comparisons(&results))).map_err(|e| EvalError::io(&csv, e))?;
    let csv = dir.join("breakdown.csv");
    std::fs::write(&csv, breakdown::csv(&results, &case_labels(dir)?)).map_err(|e| EvalError::io(&csv, e))?;
    let report = Report { builds: builds(&results), calibration };
    if results.is_empty() {
        return Ok(report);
    }
    plot_facts(&dir.join("facts_vs_ratio.svg"), &points)?;
    plot_losses(&dir.join("loss_curves.svg"), &results)?;
    Ok(report)
}

/// The kinds and placements of the facts of the cases a sweep wrote to
/// `dir/cases/` (none where its cases carry no labels). A transcript that a
/// case file there names is part of that case file, not a case.
fn case_labels(dir: &Path) -> Result<breakdown::FactLabels> {
    let cases_dir = dir.join("cases");
    if !cases_dir.is_dir() {
        return Ok(breakdown::FactLabels::new());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&cases_dir).map_err(|e| EvalError::io(&cases_dir, e))? {
        let path = entry.map_err(|e| EvalError::io(&cases_dir, e))?.path();
        if path.extension().is_some_and(|ext| ext == "json") {
            files.push(path);
        }
    }
    let mut named_transcripts = BTreeSet::new();
    for path in &files {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        if let Some(transcript) = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|json| json.get("transcript")?.as_str().map(String::from)) {
            named_transcripts.insert(cases_dir.join(transcript));
        }
    }
    let mut cases = Vec::new();
    for path in files.iter().filter(|path| !named_transcripts.contains(*path)) {
        cases.extend(load_case_file(path)?);
    }
    Ok(breakdown::labels(&cases))
}

/// Whether the sweep whose folder is `dir` asked for calibration (its
/// `config.toml` as run says `calibrate = true`). Read as plain TOML: the
/// report does not depend on the sweep's types.
fn calibrates(dir: &Path) -> Result<bool> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| EvalError::io(&path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| EvalError::Config { path: path.clone(), reason: e.to_string() })?;
    Ok(table.get("calibrate").and_then(toml::Value::as_bool).unwrap_or(false))
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
    // The pooled counts and the share's interval come last: readers of the
    // older columns find them where they were.
    out.push_str(
        "\nmethod,ratio,facts_correct_mean,facts_correct_min,facts_correct_max,facts_total,seconds_per_cell,steps_per_cell,\
         facts_recalled,facts_asked,share,share_low,share_high\n",
    );
    for p in points {
        let ratio = p.ratio.map_or(String::new(), |x| x.to_string());
        let (low, high) = p.interval();
        let _ = writeln!(
            out,
            "{},{ratio},{:.2},{},{},{},{:.1},{:.1},{},{},{:.4},{low:.4},{high:.4}",
            p.method,
            p.correct,
            p.spread.0,
            p.spread.1,
            p.total,
            p.seconds_per_cell,
            p.steps_per_cell,
            p.recalled,
            p.asked,
            p.share()
        );
    }
    out
}

fn comparisons_csv(comparisons: &[Comparison]) -> String {
    let mut out = String::from("ratio,method_a,method_b,facts,both,only_a,only_b,neither,p_value\n");
    for c in comparisons {
        let p = &c.paired;
        let ratio = c.ratio.map_or(String::new(), |x| x.to_string());
        let _ = writeln!(
            out,
            "{ratio},{},{},{},{},{},{},{},{}",
            c.method_a,
            c.method_b,
            p.facts,
            p.both,
            p.only_a,
            p.only_b,
            p.neither,
            p_value_text(p.p_value)
        );
    }
    out
}

/// Four decimals, or two significant digits below 0.001 (which four decimals would print as 0).
fn p_value_text(p: f64) -> String {
    if p >= 0.001 {
        format!("{p:.4}")
    } else {
        format!("{p:.1e}")
    }
}

fn plot_error(e: impl std::fmt::Display) -> EvalError {
    EvalError::io("plot", std::io::Error::other(e.to_string()))
}

// Ten distinguishable colours (matplotlib's tab10): a side-by-side sweep
// plots about as many methods.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Baselines are dashed lines, each its own colour and dash (pixels on,
/// pixels off), so that two at one height still show as two.
const BASELINE_STYLES: [(RGBColor, (u32, u32)); 4] =
    [(BLACK, (9, 5)), (RGBColor(105, 105, 105), (3, 3)), (RGBColor(139, 69, 19), (14, 7)), (RGBColor(0, 100, 0), (6, 2))];

/// The facts plot's size and the width of its data side: the baselines'
/// labels and the legend sit to the right of the data, never over it.
const FACTS_PLOT_SIZE: (u32, u32) = (960, 520);
const FACTS_DATA_WIDTH: u32 = 680;
/// Pixels from one text line to the next (13 px text).
const LINE_HEIGHT: i32 = 16;
/// The baselines' labels take this many pixels right of the data; the legend follows.
const BASELINE_LABEL_WIDTH: i32 = 105;

type FactsChart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The share of facts each method recalls at each ratio, with its Wilson
/// 95% interval as a bar; the baselines (cells with no ratio) as labelled
/// dashed lines across the plot.
fn plot_facts(path: &Path, points: &[RatioPoint]) -> Result<()> {
    let (baselines, compressed): (Vec<&RatioPoint>, Vec<&RatioPoint>) = points.iter().partition(|p| p.ratio.is_none());
    let ratios: Vec<f64> = compressed.iter().filter_map(|p| p.ratio).collect();
    let (lo, hi) = ratios.iter().copied().reduce(f64::min).zip(ratios.iter().copied().reduce(f64::max)).unwrap_or((1.0, 2.0));
    let pad = ((hi - lo) * 0.08).max(0.2);
    let x_range = (lo - pad, hi + pad);
    let root = SVGBackend::new(path, FACTS_PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (data_side, _) = root.split_horizontally(FACTS_DATA_WIDTH);
    let mut chart = ChartBuilder::on(&data_side)
        .caption("Share of facts recalled vs compression ratio", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // A little below 0 and above 1, so points and bars there are not cut by the frame.
        .build_cartesian_2d(x_range.0..x_range.1, -0.03..1.03)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("compression ratio (span tokens / cache entries)")
        .y_desc("share of facts recalled (bars: Wilson 95%)")
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.15))
        .draw()
        .map_err(plot_error)?;
    draw_baselines(&root, &mut chart, &baselines, x_range)?;
    let mut methods: Vec<&str> = compressed.iter().map(|p| p.method.as_str()).collect();
    methods.dedup();
    draw_methods(&mut chart, &compressed, &methods, &ratios)?;
    let legend_x = chart.plotting_area().get_pixel_range().0.end + if baselines.is_empty() { 20 } else { BASELINE_LABEL_WIDTH };
    draw_legend(&root, &chart, legend_x, &methods, &facts_per_point(points))?;
    root.present().map_err(plot_error)
}

/// Each baseline as a dashed line across the plot, labelled right of the
/// data at its height; labels that would overlap are pushed apart, with a
/// leader line from the label to its line.
fn draw_baselines(root: &DrawingArea<SVGBackend, Shift>, chart: &mut FactsChart, baselines: &[&RatioPoint], x_range: (f64, f64)) -> Result<()> {
    let data_right = chart.plotting_area().get_pixel_range().0.end;
    let mut labels = Vec::new();
    for (index, baseline) in baselines.iter().enumerate() {
        let (color, (dash, gap)) = BASELINE_STYLES[index % BASELINE_STYLES.len()];
        let share = baseline.share();
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart.draw_series(DashedLineSeries::new([(x_range.0, share), (x_range.1, share)], dash, gap, style)).map_err(plot_error)?;
        labels.push((chart.backend_coord(&(x_range.1, share)).1, format!("{} {share:.2}", baseline.method), color));
    }
    labels.sort_by_key(|(line_y, _, _)| *line_y);
    let mut next_free_y = i32::MIN;
    for (line_y, text, color) in labels {
        let label_y = line_y.max(next_free_y);
        next_free_y = label_y + LINE_HEIGHT;
        let label_x = data_right + 14;
        root.draw(&PathElement::new(vec![(data_right, line_y), (label_x - 2, label_y)], color)).map_err(plot_error)?;
        root.draw(&Text::new(text, (label_x, label_y), label_font(color))).map_err(plot_error)?;
    }
    Ok(())
}

/// Each method's shares joined by a line, each point with its interval.
/// Methods at one ratio sit side by side (dodged) so their bars do not hide each other.
fn draw_methods(chart: &mut FactsChart, points: &[&RatioPoint], methods: &[&str], ratios: &[f64]) -> Result<()> {
    let step = dodge_step(ratios, methods.len());
    for (index, method) in methods.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let offset = (index as f64 - (methods.len() - 1) as f64 / 2.0) * step;
        let mine: Vec<&&RatioPoint> = points.iter().filter(|p| p.method == *method).collect();
        let at = |p: &RatioPoint| p.ratio.unwrap_or_default() + offset;
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart.draw_series(LineSeries::new(mine.iter().map(|p| (at(p), p.share())), style)).map_err(plot_error)?;
        chart.draw_series(mine.iter().map(|p| Circle::new((at(p), p.share()), 4, color.filled()))).map_err(plot_error)?;
        for p in &mine {
            let (low, high) = p.interval();
            let bar = ShapeStyle::from(&color).stroke_width(1);
            chart.draw_series([PathElement::new(vec![(at(p), low), (at(p), high)], bar)]).map_err(plot_error)?;
            let caps = [low, high].map(|y| EmptyElement::at((at(p), y)) + PathElement::new(vec![(-4, 0), (4, 0)], bar));
            chart.draw_series(caps).map_err(plot_error)?;
        }
    }
    Ok(())
}

/// How far apart methods sit at one ratio: together they span a third of
/// the smallest gap between ratios.
fn dodge_step(ratios: &[f64], methods: usize) -> f64 {
    let mut distinct = ratios.to_vec();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    let smallest_gap = distinct.windows(2).map(|w| w[1] - w[0]).reduce(f64::min).unwrap_or(1.0);
    smallest_gap / 3.0 / methods.max(1) as f64
}

/// The methods' colours from `x` on, right of the data (and of the
/// baselines' labels), and under them how many facts each point pools.
fn draw_legend(root: &DrawingArea<SVGBackend, Shift>, chart: &FactsChart, x: i32, methods: &[&str], facts_note: &str) -> Result<()> {
    let top = chart.plotting_area().get_pixel_range().1.start + 8;
    for (index, method) in methods.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let y = top + index as i32 * LINE_HEIGHT;
        root.draw(&PathElement::new(vec![(x, y), (x + 22, y)], ShapeStyle::from(&color).stroke_width(2))).map_err(plot_error)?;
        root.draw(&Circle::new((x + 11, y), 4, color.filled())).map_err(plot_error)?;
        root.draw(&Text::new(method.to_string(), (x + 28, y), label_font(BLACK))).map_err(plot_error)?;
    }
    let y = top + (methods.len() as i32 + 1) * LINE_HEIGHT;
    root.draw(&Text::new(facts_note.to_string(), (x, y), label_font(RGBColor(80, 80, 80)))).map_err(plot_error)
}

/// "N facts a point", or "N-M facts a point" when methods pooled different
/// numbers (more seeds, or cells still missing).
fn facts_per_point(points: &[RatioPoint]) -> String {
    let fewest = points.iter().map(|p| p.asked).min().unwrap_or(0);
    let most = points.iter().map(|p| p.asked).max().unwrap_or(0);
    if fewest == most {
        format!("{most} facts a point")
    } else {
        format!("{fewest}-{most} facts a point")
    }
}

/// 13 px text in `color`, vertically centred on its anchor.
fn label_font(color: RGBColor) -> TextStyle<'static> {
    ("sans-serif", 13).into_font().color(&color).pos(Pos::new(HPos::Left, VPos::Center))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cell's line whose facts f0, f1, ... are recalled as `recalled` says.
    fn line(case: &str, method: &str, ratio: Option<f64>, seed: u64, recalled: &[bool]) -> CellResult {
        let facts: Vec<(String, bool)> = recalled.iter().enumerate().map(|(i, ok)| (format!("f{i}"), *ok)).collect();
        serde_json::from_value(serde_json::json!({
            "case": case, "method": method, "ratio": ratio, "seed": seed, "model": "m", "n_tokens": 100, "n_virtual": 50,
            "facts_correct": recalled.iter().filter(|ok| **ok).count(), "facts_total": recalled.len(),
            "loss_final": null, "steps": 0, "seconds": 1.0, "optimize_seconds": 0.0, "answer": "",
            "answers": [{"question_id": "q", "question": "?", "answer": "", "facts": facts}], "loss_curve": []
        }))
        .unwrap()
    }

    #[test]
    fn a_point_pools_its_cases_and_seeds_with_their_interval() {
        let results = [
            line("a", "snapkv", Some(2.0), 0, &[true, false, true]),
            line("b", "snapkv", Some(2.0), 0, &[false, false]),
            line("a", "snapkv", Some(2.0), 1, &[true, true, true]),
            line("b", "snapkv", Some(2.0), 1, &[true, false]),
            line("a", "full", None, 0, &[true, true, true]),
        ];
        let points = facts_by_ratio(&results);
        let snapkv = points.iter().find(|p| p.method == "snapkv").unwrap();
        assert_eq!((snapkv.recalled, snapkv.asked), (2 + 3 + 1, 3 + 2 + 3 + 2));
        assert_eq!(snapkv.share(), 0.6);
        // Two seeds ask the same 5 facts: the interval of 3 of 5, not of 6 of 10.
        assert_eq!(snapkv.interval(), stats::wilson_interval(3, 5, stats::Z_95));
        // Per seed, as before: 2 and 4 of 5.
        assert_eq!((snapkv.correct, snapkv.spread, snapkv.total), (3.0, (2, 4), 5));

        // summary.csv's new columns agree with its counts.
        let csv = summary_csv(&results, &points);
        let table = csv.split("\n\n").nth(1).unwrap();
        let header: Vec<&str> = table.lines().next().unwrap().split(',').collect();
        let row: Vec<&str> = table.lines().find(|l| l.starts_with("snapkv,")).unwrap().split(',').collect();
        let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!((column("facts_recalled"), column("facts_asked"), column("share")), ("6", "10", "0.6000"));
        let (low, high) = stats::wilson_interval(3, 5, stats::Z_95);
        assert_eq!((column("share_low"), column("share_high")), (format!("{low:.4}").as_str(), format!("{high:.4}").as_str()));
        assert_eq!(header[..8], ["method", "ratio", "facts_correct_mean", "facts_correct_min", "facts_correct_max", "facts_total", "seconds_per_cell", "steps_per_cell"]);
    }

    /// A calibrating sweep's folder without `none` cells (a shard): the
    /// report scores every fact and says so; with them it calibrates.
    #[test]
    fn a_partial_calibrating_folder_is_reported_uncalibrated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "calibrate = true\n").unwrap();
        let mut results = vec![line("a", "full", None, 0, &[true, false]), line("a", "snapkv", Some(2.0), 0, &[true, true])];
        let write = |results: &[CellResult]| {
            let text: String = results.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
            std::fs::write(dir.path().join("results.jsonl"), text).unwrap();
            write_report(dir.path()).unwrap()
        };
        let report = write(&results);
        assert!(report.calibration.unwrap().starts_with("not calibrated"));
        assert!(!dir.path().join("calibration.csv").exists());
        let summary = std::fs::read_to_string(dir.path().join("summary.csv")).unwrap();
        let table = summary.split("\n\n").nth(1).unwrap();
        let header: Vec<&str> = table.lines().next().unwrap().split(',').collect();
        let row: Vec<&str> = table.lines().find(|l| l.starts_with("snapkv,")).unwrap().split(',').collect();
        let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!((column("facts_recalled"), column("facts_asked")), ("2", "2"), "both snapkv facts scored");

        results.push(line("a", "none", None, 0, &[false, false]));
        let report = write(&results);
        assert!(report.calibration.unwrap().starts_with("kept 1 of 2 facts"));
        assert!(dir.path().join("calibration.csv").exists());
    }

    #[test]
    fn comparisons_pair_methods_on_the_facts_both_were_asked() {
        let snapkv = [true, true, false, false, true];
        let streaming = [true, false, true, false, false];
        let full = [true, true, true, true, false];
        let results = [
            line("a", "snapkv", Some(2.0), 0, &snapkv),
            line("a", "streaming", Some(2.0), 0, &streaming),
            // A second seed only one method ran, and another ratio: paired with nothing at 2x.
            line("a", "streaming", Some(2.0), 1, &[true; 5]),
            line("a", "snapkv", Some(4.0), 0, &[false; 5]),
            line("a", "full", None, 0, &full),
            line("a", "none", None, 0, &[false; 5]),
        ];
        let found = comparisons(&results);
        let find = |ratio: Option<f64>, a: &str, b: &str| {
            found.iter().find(|c| c.ratio == ratio && c.method_a == a && c.method_b == b).unwrap_or_else(|| panic!("{ratio:?} {a} {b}: {found:?}"))
        };
        let expected = |a: &[bool], b: &[bool]| {
            let count = |want: (bool, bool)| a.iter().zip(b).filter(|&(x, y)| (*x, *y) == want).count();
            (a.len(), count((true, true)), count((true, false)), count((false, true)), count((false, false)))
        };
        let counts = |c: &Comparison| (c.paired.facts, c.paired.both, c.paired.only_a, c.paired.only_b, c.paired.neither);
        assert_eq!(counts(find(Some(2.0), "snapkv", "streaming")), expected(&snapkv, &streaming));
        assert_eq!(counts(find(Some(2.0), "full", "snapkv")), expected(&full, &snapkv));
        assert_eq!(counts(find(Some(4.0), "full", "snapkv")), expected(&full, &[false; 5]));
        assert_eq!(counts(find(None, "full", "none")), expected(&full, &[false; 5]));
        let at_two = found.iter().filter(|c| c.ratio == Some(2.0)).count();
        assert_eq!(at_two, 5, "full and none against snapkv and streaming, and snapkv against streaming: {found:?}");
        assert!(found.iter().all(|c| c.ratio.is_none() || c.method_a != "full" || c.method_b != "none"), "baselines meet once");
    }
}
