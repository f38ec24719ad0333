//! Attention matching (Zweiger et al., 2026): a compacted KV cache in
//! closed form. Per layer and KV head, the span's `n / ratio` entries that
//! reference queries attend to most keep their keys, get a logit bias that
//! restores the span's attention mass, and get values fitted by least
//! squares to the span's attention output ([`crate::matching::fit`]).

use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::error::{Error, Result};
use crate::matching::budgets::{self, Budgets};
use crate::matching::fit::{FitSettings, HeadFit, HeadProblem, KeySelection};
use crate::matching::queries::{attention_over_span, reference_queries, QuerySource};
use crate::matching::{compacted, head_matrix, HeadChoice};
use crate::model::Model;
use crate::span::SpanTargets;

/// Attention matching at `ratio`.
#[derive(Debug, Clone)]
pub struct AttentionMatching {
    /// The fit's knobs.
    pub settings: MatchingSettings,
    /// Span tokens / entries kept per head.
    pub ratio: f64,
}

/// Attention matching's own knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MatchingSettings {
    /// The reference queries.
    pub queries: QuerySource,
    /// How the kept keys are chosen.
    pub keys: KeySelection,
    /// Reference queries per KV head at most (sampled, the same tokens at every layer).
    pub query_cap: usize,
    /// Seed of that sample.
    pub seed: u64,
    /// Lowest and highest bias (log of the weight).
    pub bias_bounds: (f64, f64),
    /// Ridge of the least-squares solves, relative to their mean diagonal.
    pub ridge: f64,
    /// Entries per head: `n / ratio` each, or the same total spread by
    /// how widely each head attends.
    pub budgets: Budgets,
    /// Keys OMP picks per round (with `keys = "omp"`).
    pub omp_picks: usize,
}

impl Default for MatchingSettings {
    /// Repeat queries, highest-attention keys, 8,192 queries per KV head
    /// (every repeat query of a span up to about 1,150 tokens, the 7 query
    /// heads of a Qwen2.5-0.5B KV head pooled: at 2,048 a 900-token span's
    /// fit saw a third of its positions and kept 9 of 33 facts at 3.2x,
    /// against 31 of 33 at 8,192; experiments/benchmark/README.md), biases within [-3, 3]
    /// (weights e^-3..e^3), a 1e-6 ridge, uniform budgets.
    fn default() -> Self {
        Self {
            queries: QuerySource::Repeat,
            keys: KeySelection::HighestAttention,
            query_cap: 8192,
            seed: 0,
            bias_bounds: (-3.0, 3.0),
            ridge: 1e-6,
            budgets: Budgets::Uniform,
            omp_picks: 1,
        }
    }
}

impl MatchingSettings {
    /// Refuses settings the fit cannot run with.
    pub fn validate(&self) -> Result<()> {
        let (low, high) = self.bias_bounds;
        if !(low.is_finite() && high.is_finite() && low <= high) {
            return Err(Error::Invalid(format!("bias_bounds [{low}, {high}] must be finite with the lower bound first")));
        }
        if !(self.ridge.is_finite() && self.ridge >= 0.0) {
            return Err(Error::Invalid(format!("ridge {} must be a finite number >= 0", self.ridge)));
        }
        if self.query_cap == 0 {
            return Err(Error::Invalid("query_cap must be >= 1".into()));
        }
        if self.omp_picks == 0 {
            return Err(Error::Invalid("omp_picks must be >= 1".into()));
        }
        Ok(())
    }

    /// What the per-head fit takes of these settings.
    pub fn fit(&self) -> FitSettings {
        FitSettings { keys: self.keys, bias_bounds: self.bias_bounds, ridge: self.ridge, omp_picks: self.omp_picks }
    }

    /// Per layer, (kv_heads, m, d): the span's reference queries.
    pub fn reference_queries(&self, model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Vec<Tensor>> {
        reference_queries(model, prefix, span, self.queries, self.query_cap, self.seed)
    }

    /// Per layer, per KV head: the span against its reference queries
    /// (`queries` from [`Self::reference_queries`]).
    pub fn head_problems(&self, model: &Model, span: &SpanTargets, queries: &[Tensor]) -> Result<Vec<Vec<HeadProblem>>> {
        let scale = attention_scale(model);
        let problem = |layer: usize, head: usize| -> Result<HeadProblem> {
            Ok(HeadProblem {
                queries: head_matrix(&queries[layer].unsqueeze(0)?, head)?,
                keys: head_matrix(&span.keys[layer], head)?,
                values: head_matrix(&span.values[layer], head)?,
                scale,
            })
        };
        (0..queries.len()).map(|layer| (0..queries[layer].dim(0)?).map(|head| problem(layer, head)).collect()).collect()
    }
}

/// 1 / sqrt(head_dim).
fn attention_scale(model: &Model) -> f64 {
    1.0 / (model.qwen2.config().head_dim() as f64).sqrt()
}

impl AttentionMatching {
    /// The per-head fits of a span at `t` entries per head on average, and
    /// their mean output error.
    pub fn choices(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, t: usize) -> Result<(Vec<Vec<HeadChoice>>, f64)> {
        self.settings.validate()?;
        let queries = self.settings.reference_queries(model, prefix, span)?;
        self.fit_heads(model, span, &queries, t)
    }

    /// [`Self::choices`] from reference queries already computed. The
    /// heads are fitted in parallel: each is a small dense problem that
    /// nalgebra solves on one thread.
    pub fn fit_heads(&self, model: &Model, span: &SpanTargets, queries: &[Tensor], t: usize) -> Result<(Vec<Vec<HeadChoice>>, f64)> {
        let budgets = head_budgets(model, span, queries, t, self.settings.budgets)?;
        let problems = self.settings.head_problems(model, span, queries)?;
        let settings = self.settings.fit();
        let fits: Vec<Vec<HeadFit>> = problems
            .par_iter()
            .zip(&budgets)
            .map(|(layer, layer_budgets)| layer.par_iter().zip(layer_budgets).map(|(problem, &head_t)| problem.fit(head_t, &settings)).collect())
            .collect::<Result<_>>()?;
        let errors: Vec<f64> = fits.iter().flatten().map(|fit| fit.output_error).collect();
        let choices = fits
            .into_iter()
            .map(|layer| layer.into_iter().map(|fit| HeadChoice { kept: fit.kept, values: Some(fit.values), biases: Some(fit.biases) }).collect())
            .collect();
        Ok((choices, errors.iter().sum::<f64>() / errors.len().max(1) as f64))
    }
}

/// Entries per layer and head: `t` each, or `t` times the head count
/// shared by how widely each head attends ([`budgets::allocate`]).
fn head_budgets(model: &Model, span: &SpanTargets, queries: &[Tensor], t: usize, budgets: Budgets) -> Result<Vec<Vec<usize>>> {
    let shape: Vec<usize> = queries.iter().map(|layer| layer.dim(0)).collect::<candle_core::Result<_>>()?;
    let flat: Vec<usize> = match budgets {
        Budgets::Uniform => vec![t; shape.iter().sum()],
        Budgets::Spread => {
            let mut weights = Vec::with_capacity(shape.iter().sum());
            for (layer, layer_queries) in queries.iter().enumerate() {
                // (kv, m, n) -> (kv, n): each head's mean attention over the span.
                let mean: Vec<Vec<f32>> = attention_over_span(layer_queries, &span.keys[layer], attention_scale(model))?.mean(1)?.to_vec2()?;
                weights.extend(mean.iter().map(|head| budgets::effective_keys(&head.iter().map(|&p| p as f64).collect::<Vec<_>>())));
            }
            budgets::allocate(t * weights.len(), &weights, span.len())?
        }
    };
    let mut rest = flat.as_slice();
    Ok(shape
        .iter()
        .map(|&heads| {
            let (layer, after) = rest.split_at(heads);
            rest = after;
            layer.to_vec()
        })
        .collect())
}

impl Compressor for AttentionMatching {
    /// `attention-matching`, then what departs from the defaults:
    /// `-context` or `-both` queries, `-omp` keys (`-omp4` at 4 picks a
    /// round), `-spread` budgets.
    fn name(&self) -> String {
        let mut name = String::from("attention-matching");
        match self.settings.queries {
            QuerySource::Repeat => {}
            QuerySource::Context => name.push_str("-context"),
            QuerySource::Both => name.push_str("-both"),
        }
        if self.settings.keys == KeySelection::Omp {
            name.push_str("-omp");
            if self.settings.omp_picks > 1 {
                name.push_str(&self.settings.omp_picks.to_string());
            }
        }
        if self.settings.budgets == Budgets::Spread {
            name.push_str("-spread");
        }
        name
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn needs_span_queries(&self) -> bool {
        self.settings.queries != QuerySource::Repeat
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let (choices, fit_error) = self.choices(model, prefix, span, budget(span.len(), self.ratio)?)?;
        let mut compressed = compacted(self.name(), span, &choices)?;
        compressed.report.fit_error = Some(fit_error);
        Ok(compressed)
    }
}
