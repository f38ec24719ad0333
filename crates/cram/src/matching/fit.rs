//! The attention-matching fit of one KV head, in closed form (Zweiger et
//! al., "Fast KV Compaction via Attention Matching", 2026): from the span's
//! keys and values and reference queries, keep `t` of the keys, give each a
//! logit bias, and fit new values, so that for every reference query the
//! compacted block draws the same attention mass as the span and returns
//! the same attention output. Mass and output of a block compose with any
//! other block by the softmax's own algebra, so matching both inside the
//! span matches attention over the whole cache.
//!
//! Everything here is one head's small dense problem, in f64: queries
//! (m, d), keys and values (n, d). Linear algebra is nalgebra's.

use nalgebra::{DMatrix, DVector};

use crate::error::{Error, Result};

/// How the kept keys are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySelection {
    /// The `t` keys with the largest root mean square attention weight
    /// (softmax over the span) across the reference queries.
    HighestAttention,
    /// Orthogonal matching pursuit on the attention mass: greedily the key
    /// whose mass column best explains what the chosen ones miss, the
    /// weights refitted after each pick.
    Omp,
}

/// The fit's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitSettings {
    /// How keys are chosen.
    pub keys: KeySelection,
    /// Bounds on each bias (natural log of the weight): keeps one key from
    /// soaking up a block's mass, and a weight from reaching 0.
    pub bias_bounds: (f64, f64),
    /// Ridge added to the normal equations, relative to their mean diagonal.
    pub ridge: f64,
    /// Keys orthogonal matching pursuit picks per round (1: the classic
    /// one at a time).
    pub omp_picks: usize,
}

/// What the fit gives one head: the kept keys, their biases and new values.
#[derive(Debug, Clone)]
pub struct HeadFit {
    /// Indices of the kept span entries, ascending (empty when the keys
    /// were given: [`HeadProblem::fit_to_keys`]).
    pub kept: Vec<usize>,
    /// (t): each kept entry's logit bias.
    pub biases: Vec<f64>,
    /// (t, d): the fitted values.
    pub values: DMatrix<f64>,
    /// Relative error of the block's attention output on the reference
    /// queries: |X C - Y|_F / |Y|_F.
    pub output_error: f64,
}

/// One head's span and its reference queries.
#[derive(Debug, Clone)]
pub struct HeadProblem {
    /// (m, d) post-RoPE queries.
    pub queries: DMatrix<f64>,
    /// (n, d) post-RoPE keys of the span.
    pub keys: DMatrix<f64>,
    /// (n, d) values of the span.
    pub values: DMatrix<f64>,
    /// The attention scale, 1 / sqrt(d).
    pub scale: f64,
}

impl HeadProblem {
    /// (m, n): exp(s - rowmax) of the scaled scores, and the span's own
    /// attention output (m, d): what the compacted block must reproduce.
    fn targets(&self) -> (DMatrix<f64>, DMatrix<f64>) {
        let scores = &self.queries * self.keys.transpose() * self.scale;
        let mass = shifted_exp(&scores);
        let output = normalise_rows(&mass) * &self.values;
        (mass, output)
    }

    /// (m, n): each reference query's softmax over the span's keys.
    pub fn attention(&self) -> DMatrix<f64> {
        normalise_rows(&self.targets().0)
    }

    /// Fits `t` entries (1 <= t <= n): keeps `t` of the span's keys, fits
    /// their biases and values.
    pub fn fit(&self, t: usize, settings: &FitSettings) -> Result<HeadFit> {
        let n = self.keys.nrows();
        if t == 0 || t > n || self.queries.nrows() == 0 {
            return Err(Error::Invalid(format!("cannot fit {t} of {n} entries from {} queries", self.queries.nrows())));
        }
        let (mass, output) = self.targets();
        let row_mass: DVector<f64> = mass.column_sum();
        let kept = match settings.keys {
            KeySelection::HighestAttention => highest_attention(&mass, t),
            KeySelection::Omp => omp(&mass, &row_mass, t, settings)?,
        };
        let (biases, values, output_error) = fit_block(&columns(&mass, &kept), &row_mass, &output, settings)?;
        Ok(HeadFit { kept, biases, values, output_error })
    }

    /// Biases and values for keys chosen elsewhere (t, d), post-RoPE (the
    /// recipe's virtual tokens): `kept` is then empty.
    pub fn fit_to_keys(&self, keys: &DMatrix<f64>, settings: &FitSettings) -> Result<HeadFit> {
        let span_scores = &self.queries * self.keys.transpose() * self.scale;
        let block_scores = &self.queries * keys.transpose() * self.scale;
        // One shift per query for both, so their masses compare: the larger row maximum.
        let shifts: Vec<f64> = (0..span_scores.nrows()).map(|i| span_scores.row(i).max().max(block_scores.row(i).max())).collect();
        let (mass, block_mass) = (exp_shifted_by(&span_scores, &shifts), exp_shifted_by(&block_scores, &shifts));
        let output = normalise_rows(&mass) * &self.values;
        let (biases, values, output_error) = fit_block(&block_mass, &mass.column_sum(), &output, settings)?;
        Ok(HeadFit { kept: Vec::new(), biases, values, output_error })
    }
}

/// For a block whose unweighted mass is `block_mass` (m, t): the weights
/// that restore each query's `row_mass` (as biases, their logs), the values
/// that restore the span's `output` (m, d), and the relative output error.
fn fit_block(block_mass: &DMatrix<f64>, row_mass: &DVector<f64>, output: &DMatrix<f64>, settings: &FitSettings) -> Result<(Vec<f64>, DMatrix<f64>, f64)> {
    let weights = fit_weights(block_mass, row_mass, settings)?;
    let biases: Vec<f64> = weights.iter().map(|w| w.ln()).collect();
    // X: the compacted block's attention, its mass reweighted and normalised.
    let block = normalise_rows(&scale_columns(block_mass, &weights));
    let values = least_squares(&block, output, settings.ridge)?;
    let output_error = (&block * &values - output).norm() / output.norm().max(f64::MIN_POSITIVE);
    Ok((biases, values, output_error))
}

/// exp(s - shift of its row). Column-major storage: walked column by
/// column, which is several times faster than row by row.
fn exp_shifted_by(scores: &DMatrix<f64>, shifts: &[f64]) -> DMatrix<f64> {
    let mut shifted = scores.clone();
    for mut column in shifted.column_iter_mut() {
        column.iter_mut().zip(shifts).for_each(|(x, shift)| *x = (*x - shift).exp());
    }
    shifted
}

/// exp(s - max of its row).
fn shifted_exp(scores: &DMatrix<f64>) -> DMatrix<f64> {
    let mut row_max = vec![f64::NEG_INFINITY; scores.nrows()];
    for column in scores.column_iter() {
        row_max.iter_mut().zip(column.iter()).for_each(|(max, &x)| *max = max.max(x));
    }
    exp_shifted_by(scores, &row_max)
}

/// Each row divided by its sum.
fn normalise_rows(matrix: &DMatrix<f64>) -> DMatrix<f64> {
    let sums = matrix.column_sum();
    let mut normalised = matrix.clone();
    for mut column in normalised.column_iter_mut() {
        column.component_div_assign(&sums);
    }
    normalised
}

/// Column j multiplied by `weights[j]`: `matrix * diag(weights)` without
/// the t x t product.
fn scale_columns(matrix: &DMatrix<f64>, weights: &DVector<f64>) -> DMatrix<f64> {
    let mut scaled = matrix.clone();
    for (mut column, &weight) in scaled.column_iter_mut().zip(weights.iter()) {
        column *= weight;
    }
    scaled
}

/// The columns at `indices`, in that order.
fn columns(matrix: &DMatrix<f64>, indices: &[usize]) -> DMatrix<f64> {
    matrix.select_columns(indices)
}

/// The `t` columns of largest root mean square softmax weight, ascending.
fn highest_attention(mass: &DMatrix<f64>, t: usize) -> Vec<usize> {
    let weights = normalise_rows(mass);
    let rms: Vec<f32> = weights.column_iter().map(|column| (column.norm_squared() / column.len() as f64).sqrt() as f32).collect();
    crate::select::keep_top(&rms, t)
}

/// Orthogonal matching pursuit: picks the key whose mass column
/// correlates most with the mass the picked keys still miss (or the
/// `settings.omp_picks` best at once, which cuts the refits that
/// dominate its cost), and refits their weights after each round.
fn omp(mass: &DMatrix<f64>, row_mass: &DVector<f64>, t: usize, settings: &FitSettings) -> Result<Vec<usize>> {
    let mut kept: Vec<usize> = Vec::with_capacity(t);
    let mut residual = row_mass.clone();
    while kept.len() < t {
        let correlation = mass.transpose() * &residual;
        let mut candidates: Vec<usize> = (0..mass.ncols()).filter(|j| !kept.contains(j)).collect();
        // Largest correlation first, ties to the earlier key.
        candidates.sort_by(|&a, &b| correlation[b].total_cmp(&correlation[a]).then(a.cmp(&b)));
        let round = settings.omp_picks.max(1).min(t - kept.len());
        if candidates.len() < round {
            return Err(Error::Invalid("no key left to pick".into()));
        }
        kept.extend_from_slice(&candidates[..round]);
        let picked = columns(mass, &kept);
        residual = row_mass - &picked * fit_weights(&picked, row_mass, settings)?;
    }
    kept.sort_unstable();
    Ok(kept)
}

/// Non-negative weights w (t) with `mass w ~ target`: the least-squares
/// solution clipped to the bias bounds, then projected gradient steps
/// inside them (the problem is small; a handful of steps settles it).
fn fit_weights(mass: &DMatrix<f64>, target: &DVector<f64>, settings: &FitSettings) -> Result<DVector<f64>> {
    let (low, high) = (settings.bias_bounds.0.exp(), settings.bias_bounds.1.exp());
    let gram = mass.transpose() * mass;
    let pulled = mass.transpose() * target;
    let mut weights: DVector<f64> = solve_normal_equations(gram.clone(), &DMatrix::from_column_slice(pulled.len(), 1, pulled.as_slice()), settings.ridge)?.column(0).into();
    weights.apply(|w| *w = w.clamp(low, high));
    let lipschitz = gram.norm().max(1e-12); // Frobenius >= spectral: a safe step
    for _ in 0..PROJECTED_STEPS {
        let gradient = &gram * &weights - &pulled;
        weights -= gradient / lipschitz;
        weights.apply(|w| *w = w.clamp(low, high));
    }
    Ok(weights)
}

/// Projected gradient steps after the clipped least-squares start.
const PROJECTED_STEPS: usize = 8;

/// argmin_X |A X - B|^2 + ridge * mean(diag(A^T A)) |X|^2, by the normal
/// equations (A^T A is only t x t).
fn least_squares(a: &DMatrix<f64>, b: &DMatrix<f64>, ridge: f64) -> Result<DMatrix<f64>> {
    solve_normal_equations(a.transpose() * a, &(a.transpose() * b), ridge)
}

/// (A^T A + ridge * mean(diag(A^T A)) I) X = A^T B from `normal` = A^T A
/// and `rhs` = A^T B, by Cholesky, with SVD when the normal matrix is not
/// positive definite.
fn solve_normal_equations(mut normal: DMatrix<f64>, rhs: &DMatrix<f64>, ridge: f64) -> Result<DMatrix<f64>> {
    let size = normal.nrows();
    let scale = normal.trace() / size.max(1) as f64;
    for i in 0..size {
        normal[(i, i)] += ridge * scale;
    }
    if let Some(cholesky) = normal.clone().cholesky() {
        return Ok(cholesky.solve(rhs));
    }
    normal.svd(true, true).solve(rhs, 1e-12).map_err(|e| Error::Invalid(format!("least squares: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(m: usize, n: usize, d: usize, seed: u64) -> HeadProblem {
        let samples = crate::rng::normal_samples(seed, (m + 2 * n) * d);
        let take = |from: usize, rows: usize| DMatrix::from_row_slice(rows, d, &samples[from * d..(from + rows) * d].iter().map(|&x| x as f64).collect::<Vec<_>>());
        HeadProblem { queries: take(0, m), keys: take(m, n), values: take(m + n, n), scale: 1.0 / (d as f64).sqrt() }
    }

    fn settings(keys: KeySelection) -> FitSettings {
        FitSettings { keys, bias_bounds: (-3.0, 3.0), ridge: 0.0, omp_picks: 1 }
    }

    /// Keeping every entry keeps the span: weights 1 (bias 0), the original
    /// values, and the original outputs, whatever the queries.
    #[test]
    fn keeping_every_entry_reproduces_the_span() {
        let head = problem(40, 12, 8, 1);
        let fit = head.fit(12, &settings(KeySelection::HighestAttention)).unwrap();
        assert_eq!(fit.kept, (0..12).collect::<Vec<_>>());
        assert!(fit.biases.iter().all(|b| b.abs() < 1e-8), "{:?}", fit.biases);
        assert!((&fit.values - &head.values).norm() < 1e-8 * head.values.norm());
        assert!(fit.output_error < 1e-10);
    }

    /// Given the span's own keys, the fit to keys keeps the span.
    #[test]
    fn fitting_to_the_spans_own_keys_reproduces_the_span() {
        let head = problem(40, 10, 8, 6);
        let fit = head.fit_to_keys(&head.keys, &settings(KeySelection::HighestAttention)).unwrap();
        assert!(fit.biases.iter().all(|b| b.abs() < 1e-8) && fit.output_error < 1e-10);
        assert!((&fit.values - &head.values).norm() < 1e-8 * head.values.norm());
        // Other keys: a real fit, better than those keys with the span's first values.
        let other = problem(40, 4, 8, 7).keys;
        let fit = head.fit_to_keys(&other, &settings(KeySelection::HighestAttention)).unwrap();
        assert!(fit.output_error < 1.0 && fit.values.nrows() == 4);
    }

    /// The weights solve the small system an independent Gaussian
    /// elimination solves, when the solution is inside the bounds.
    #[test]
    fn the_weights_match_an_independent_solve() {
        // Two columns, three rows: the normal equations by hand.
        let mass = DMatrix::from_row_slice(3, 2, &[1.0, 0.5, 0.2, 1.0, 0.7, 0.3]);
        let truth = [1.3, 0.8];
        let target = DVector::from_vec((0..3).map(|i| mass[(i, 0)] * truth[0] + mass[(i, 1)] * truth[1]).collect());
        let w = fit_weights(&mass, &target, &settings(KeySelection::HighestAttention)).unwrap();
        assert!((w[0] - truth[0]).abs() < 1e-9 && (w[1] - truth[1]).abs() < 1e-9, "{w}");
        // Clipped: a weight below e^-3 is raised to it.
        let target = DVector::from_vec((0..3).map(|i| mass[(i, 0)] * 1e-4).collect());
        let w = fit_weights(&mass, &target, &settings(KeySelection::HighestAttention)).unwrap();
        assert!(w.iter().all(|&x| x >= (-3.0f64).exp() - 1e-12));
    }

    /// The fitted values are the least-squares solution: the residual is
    /// orthogonal to the block's attention (the normal equations hold).
    #[test]
    fn fitted_values_satisfy_the_normal_equations() {
        let head = problem(50, 20, 8, 2);
        let fit = head.fit(6, &settings(KeySelection::HighestAttention)).unwrap();
        let (mass, output) = head.targets();
        let weights = DVector::from_vec(fit.biases.iter().map(|b| b.exp()).collect());
        let block = normalise_rows(&(columns(&mass, &fit.kept) * DMatrix::from_diagonal(&weights)));
        let residual = &block * &fit.values - &output;
        assert!((block.transpose() * residual).norm() < 1e-8 * output.norm());
    }

    /// On held-out queries the fitted values beat the kept keys' own values.
    #[test]
    fn fitted_values_beat_the_original_values_on_held_out_queries() {
        for selection in [KeySelection::HighestAttention, KeySelection::Omp] {
            let head = problem(200, 32, 16, 3);
            let fit = head.fit(8, &settings(selection)).unwrap();
            let held_out = HeadProblem { queries: problem(100, 32, 16, 4).queries, ..head.clone() };
            let (mass, output) = held_out.targets();
            let weights = DVector::from_vec(fit.biases.iter().map(|b| b.exp()).collect());
            let block = normalise_rows(&(columns(&mass, &fit.kept) * DMatrix::from_diagonal(&weights)));
            let fitted = (&block * &fit.values - &output).norm();
            let original = (&block * head.values.select_rows(&fit.kept) - &output).norm();
            assert!(fitted < original, "{selection:?}: fitted {fitted} vs original {original}");
        }
    }

    /// OMP's first pick is the key whose mass column correlates most with
    /// the span's row masses; picking all t in one round keeps the t
    /// largest of those correlations, each counted here by hand.
    #[test]
    fn omp_picks_by_correlation_with_what_is_missed() {
        let head = problem(60, 12, 8, 9);
        let (mass, _) = head.targets();
        let correlation = |j: usize| (0..60).map(|i| mass[(i, j)] * (0..12).map(|k| mass[(i, k)]).sum::<f64>()).sum::<f64>();
        let mut order: Vec<usize> = (0..12).collect();
        order.sort_by(|&a, &b| correlation(b).total_cmp(&correlation(a)));
        let one_round = FitSettings { omp_picks: 4, ..settings(KeySelection::Omp) };
        let mut best_four = order[..4].to_vec();
        best_four.sort_unstable();
        assert_eq!(head.fit(4, &one_round).unwrap().kept, best_four);
        let classic = head.fit(4, &settings(KeySelection::Omp)).unwrap();
        assert!(classic.kept.contains(&order[0]), "the first pick is the best correlated key");
        // Rounds of 3 for 4 keys: a round of 3, then one more.
        let rounds = head.fit(4, &FitSettings { omp_picks: 3, ..settings(KeySelection::Omp) }).unwrap();
        assert_eq!(rounds.kept.len(), 4);
        assert!(order[..3].iter().all(|j| rounds.kept.contains(j)));
    }

    /// Highest attention keeps the keys an independent count ranks first.
    #[test]
    fn highest_attention_keeps_the_largest_rms_weights() {
        let head = problem(30, 10, 4, 5);
        let (mass, _) = head.targets();
        let kept = highest_attention(&mass, 3);
        let rms = |j: usize| {
            let mut total = 0.0;
            for i in 0..30 {
                let row_sum: f64 = (0..10).map(|k| mass[(i, k)]).sum();
                total += (mass[(i, j)] / row_sum).powi(2);
            }
            (total / 30.0).sqrt()
        };
        let worst_kept = kept.iter().map(|&j| rms(j)).fold(f64::MAX, f64::min);
        let best_dropped = (0..10).filter(|j| !kept.contains(j)).map(rms).fold(f64::MIN, f64::max);
        assert!(worst_kept >= best_dropped);
    }
}
