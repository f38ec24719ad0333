//! Attention matching (Zweiger et al., 2026): a compacted KV cache in
//! closed form. Per layer and KV head, the span's `n / ratio` entries that
//! reference queries attend to most keep their keys, get a logit bias that
//! restores the span's attention mass, and get values fitted by least
//! squares to the span's attention output ([`crate::matching::fit`]).

use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::error::{Error, Result};
use crate::matching::budgets::{self, Budgets};
use crate::matching::fit::{FitSettings, HeadProblem, KeySelection};
use crate::matching::queries::{reference_queries, QuerySource};
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
        Ok(())
    }

    /// What the per-head fit takes of these settings.
    pub fn fit(&self) -> FitSettings {
        FitSettings { keys: self.keys, bias_bounds: self.bias_bounds, ridge: self.ridge }
    }

    /// Per layer, per KV head: the span against its reference queries.
    pub fn head_problems(&self, model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Vec<Vec<HeadProblem>>> {
        let queries = reference_queries(model, prefix, span, self.queries, self.query_cap, self.seed)?;
        let scale = 1.0 / (model.qwen2.config().head_dim() as f64).sqrt();
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

impl AttentionMatching {
    /// The per-head fits of a span at `t` entries per head on average, and
    /// their mean output error.
    pub fn choices(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, t: usize) -> Result<(Vec<Vec<HeadChoice>>, f64)> {
        self.settings.validate()?;
        let problems = self.settings.head_problems(model, prefix, span)?;
        let budgets = head_budgets(&problems, t, self.settings.budgets)?;
        let (mut choices, mut errors) = (Vec::with_capacity(problems.len()), Vec::new());
        for (layer, layer_budgets) in problems.iter().zip(&budgets) {
            let mut heads = Vec::new();
            for (problem, &head_t) in layer.iter().zip(layer_budgets) {
                let fit = problem.fit(head_t, &self.settings.fit())?;
                errors.push(fit.output_error);
                heads.push(HeadChoice { kept: fit.kept, values: Some(fit.values), biases: Some(fit.biases) });
            }
            choices.push(heads);
        }
        Ok((choices, errors.iter().sum::<f64>() / errors.len().max(1) as f64))
    }
}

/// Entries per layer and head: `t` each, or `t` times the head count
/// shared by how widely each head attends ([`budgets::allocate`]).
fn head_budgets(problems: &[Vec<HeadProblem>], t: usize, budgets: Budgets) -> Result<Vec<Vec<usize>>> {
    let shape: Vec<usize> = problems.iter().map(Vec::len).collect();
    let flat: Vec<usize> = match budgets {
        Budgets::Uniform => vec![t; shape.iter().sum()],
        Budgets::Spread => {
            let weights: Vec<f64> = problems.iter().flatten().map(|problem| budgets::effective_keys(&problem.attention())).collect();
            let span_len = problems.first().and_then(|layer| layer.first()).map_or(0, |problem| problem.keys.nrows());
            budgets::allocate(t * weights.len(), &weights, span_len)?
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
    /// `-context` or `-both` queries, `-omp` keys, `-spread` budgets.
    fn name(&self) -> String {
        let mut name = String::from("attention-matching");
        match self.settings.queries {
            QuerySource::Repeat => {}
            QuerySource::Context => name.push_str("-context"),
            QuerySource::Both => name.push_str("-both"),
        }
        if self.settings.keys == KeySelection::Omp {
            name.push_str("-omp");
        }
        if self.settings.budgets == Budgets::Spread {
            name.push_str("-spread");
        }
        name
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let (choices, fit_error) = self.choices(model, prefix, span, budget(span.len(), self.ratio)?)?;
        let mut compressed = compacted(self.name(), span, &choices)?;
        compressed.report.fit_error = Some(fit_error);
        Ok(compressed)
    }
}
