//! Attention matching (Zweiger et al., 2026): a compacted KV cache in
//! closed form. Per layer and KV head, the span entries that reference
//! queries attend to most (`n / ratio` a head on average, shared among the
//! heads by their budgets) keep their keys, get a logit bias that
//! restores the span's attention mass, and get values fitted by least
//! squares to the span's attention output ([`crate::matching::fit`]).

use candle_core::Tensor;
use nalgebra::DMatrix;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::error::{Error, Result};
use crate::matching::budgets::{self, BudgetWeights, Budgets};
use crate::matching::fit::{FitSettings, HeadFit, HeadProblem, KeySelection};
use crate::matching::queries::{attention_over_span, context_queries, reference_queries, uses_context, uses_repeat, QuerySample, QuerySource, RepeatPass};
use crate::matching::{compacted, head_matrix, layer_entries, mean_error, HeadChoice};
use crate::model::Model;
use crate::recipe::init::Anchors;
use crate::select::keep_top;
use crate::span::SpanTargets;

/// Attention matching at `ratio`.
#[derive(Debug, Clone)]
pub struct AttentionMatching {
    /// The fit's knobs.
    pub settings: MatchingSettings,
    /// Span tokens / entries kept per head (on average, with spread budgets).
    pub ratio: f64,
}

/// Attention matching's own knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Entries per head: the same total spread by how widely each head
    /// attends (the default), or `n / ratio` each. On 250-token spans
    /// spread kept 57 of 70 facts at 3.2x against 47 uniform (+10/-0) and
    /// 35 against 23 at 4.8x (+15/-3), level at 1.6x and 6.4x
    /// (experiments/attention-matching/README.md, budgets-250).
    pub budgets: Budgets,
    /// What spread budgets weigh the heads by, when not the fit's own
    /// reference queries: another query set (`"context"`: the span's own,
    /// kept by the targets' forward) or a fixed profile (`[w, ...]`, one
    /// per layer and KV head, from `cram budget-profile`). On-policy
    /// fitting otherwise weighs them by an ordinary repeat pass before its
    /// own, layer-by-layer one; a profile or the span's own queries spare
    /// it that pass. The span's own
    /// queries weighed them badly: 35 of 70 facts at 4.8x against 48
    /// (experiments/benchmark/README.md, on-policy-by-context-250).
    pub budget_weights: Option<BudgetWeights>,
    /// Keys OMP picks per round (with `keys = "omp"`).
    pub omp_picks: usize,
    /// Fit layer by layer, each layer's repeat queries computed with the
    /// layers below already compacted (one pass; spread budgets then
    /// weigh heads by a first, ordinary repeat pass, unless
    /// `budget_weights` says otherwise). On 250-token spans
    /// with spread budgets it kept 48 of 70 facts at 4.8x against 35
    /// off-policy, 28 against 21 at 6.4x, the same 67 at 1.6x and 59
    /// against 57 at 3.2x; on ~900-token spans 27 against 26 of 33 at 4.8x
    /// (experiments/benchmark/README.md). Off by default: it helped on short
    /// spans at high ratios only, and costs about twice the seconds (3.3 s
    /// against 1.8 s for a 250-token span; experiments/attention-matching/speed/);
    /// with a budget profile (`budget_weights`) it takes 1.67 s and kept 45
    /// and 27 of those 70 facts at 4.8x and 6.4x.
    pub on_policy: bool,
    /// Share of the `n / ratio` entries a head holds on average spent on
    /// the span's last tokens, kept verbatim in every head (their own keys
    /// and values, bias 0); the rest of the span is fitted into the other
    /// entries, shared among the heads by their budgets. Eviction that keeps the recent
    /// tokens recalls late facts that attention matching loses
    /// (experiments/benchmark/README.md, eviction-4.8-250); but on
    /// 250-token spans a share of 0.25 or 0.5 lost more older facts than
    /// it gained late ones (recent-250), so it is off by default.
    pub recent_share: f64,
}

impl Default for MatchingSettings {
    /// Repeat queries, highest-attention keys, 8,192 queries per KV head
    /// (every repeat query of a span up to about 1,150 tokens, the 7 query
    /// heads of a Qwen2.5-0.5B KV head pooled: at 2,048 a 900-token span's
    /// fit saw a third of its positions and kept 9 of 33 facts at 3.2x,
    /// against 31 of 33 at 8,192; experiments/benchmark/README.md), biases within [-3, 3]
    /// (weights e^-3..e^3), a 1e-6 ridge, spread budgets, every layer fitted
    /// to queries that read the original span (not on-policy).
    fn default() -> Self {
        Self {
            queries: QuerySource::Repeat,
            keys: KeySelection::HighestAttention,
            query_cap: 8192,
            seed: 0,
            bias_bounds: (-3.0, 3.0),
            ridge: 1e-6,
            budgets: Budgets::Spread,
            budget_weights: None,
            omp_picks: 1,
            on_policy: false,
            recent_share: 0.0,
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
        if !(0.0..1.0).contains(&self.recent_share) {
            return Err(Error::Invalid(format!("recent_share {} must be in [0, 1)", self.recent_share)));
        }
        if self.budget_weights.is_some() && self.budgets != Budgets::Spread {
            return Err(Error::Invalid("budget_weights weigh heads for spread budgets only (budgets = \"spread\")".into()));
        }
        if let Some(BudgetWeights::Profile(weights)) = &self.budget_weights {
            if let Some(bad) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
                return Err(Error::Invalid(format!("budget_weights: a head's weight must be finite and >= 0, got {bad}")));
            }
            if weights.iter().sum::<f64>() <= 0.0 {
                return Err(Error::Invalid("budget_weights: a profile needs a weight above 0".into()));
            }
        }
        if self.on_policy && !uses_repeat(self.queries) {
            return Err(Error::Invalid("on_policy needs repeat queries (queries = \"repeat\" or \"both\"): the span's own queries read no compacted layer".into()));
        }
        Ok(())
    }

    /// Entries of a head's `t` kept verbatim from the span's end
    /// (`recent_share` of them, leaving at least one to fit).
    pub fn recent_tokens(&self, t: usize, span_len: usize) -> usize {
        ((self.recent_share * t as f64).floor() as usize).min(t.saturating_sub(1)).min(span_len.saturating_sub(1))
    }

    /// What the per-head fit takes of these settings.
    pub fn fit(&self) -> FitSettings {
        FitSettings { keys: self.keys, bias_bounds: self.bias_bounds, ridge: self.ridge, omp_picks: self.omp_picks }
    }

    /// Per layer, (kv_heads, m, d): the span's reference queries.
    pub fn reference_queries(&self, model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Vec<Tensor>> {
        reference_queries(model, prefix, span, self.queries, self.query_cap, self.seed)
    }

    /// Entries per layer and head for a fit of `fitted` (the span, or its
    /// older tokens) at `t` a head on average, the heads weighed by
    /// `budget_weights` or else by the fit's own queries (`fit_queries()`,
    /// asked for only then).
    fn head_budgets(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, fitted: &SpanTargets, t: usize, fit_queries: impl FnOnce() -> Result<Vec<Tensor>>) -> Result<Vec<Vec<usize>>> {
        let weights = || match &self.budget_weights {
            Some(BudgetWeights::Queries(source)) if *source != self.queries => {
                head_weights(model, fitted, &reference_queries(model, prefix, span, *source, self.query_cap, self.seed)?)
            }
            None | Some(BudgetWeights::Queries(_)) => head_weights(model, fitted, &fit_queries()?),
            Some(BudgetWeights::Profile(weights)) => Ok(weights.clone()),
        };
        head_budgets(model, fitted, t, self.budgets, weights)
    }

    /// One span's contribution to a budget profile: each (layer, KV
    /// head)'s share, summing to 1, of the weight its reference queries
    /// give it ([`head_weights`]). Their mean over spans is a
    /// `budget_weights` profile (`cram budget-profile`).
    pub fn head_shares(&self, model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Vec<f64>> {
        let weights = head_weights(model, span, &self.reference_queries(model, prefix, span)?)?;
        let total: f64 = weights.iter().sum();
        Ok(weights.iter().map(|weight| weight / total).collect())
    }

    /// Per layer, per KV head: the span against its reference queries
    /// (`queries` from [`Self::reference_queries`]).
    pub fn head_problems(&self, model: &Model, span: &SpanTargets, queries: &[Tensor]) -> Result<Vec<Vec<HeadProblem>>> {
        queries.iter().enumerate().map(|(layer, layer_queries)| layer_problems(model, span, layer, layer_queries)).collect()
    }
}

/// One layer's per-KV-head problems: its (kv_heads, m, d) reference
/// queries against the span's keys and values.
fn layer_problems(model: &Model, span: &SpanTargets, layer: usize, queries: &Tensor) -> Result<Vec<HeadProblem>> {
    let scale = attention_scale(model);
    (0..queries.dim(0)?)
        .map(|head| {
            Ok(HeadProblem {
                queries: head_matrix(&queries.unsqueeze(0)?, head)?,
                keys: head_matrix(&span.keys[layer], head)?,
                values: head_matrix(&span.values[layer], head)?,
                scale,
            })
        })
        .collect()
}

/// 1 / sqrt(head_dim).
fn attention_scale(model: &Model) -> f64 {
    1.0 / (model.qwen2.config().head_dim() as f64).sqrt()
}

impl AttentionMatching {
    /// The per-head fits of a span at `t` entries per head on average, and
    /// their mean output error (of the fitted block: with `recent_share`,
    /// the span before its recent tokens).
    pub fn choices(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, t: usize) -> Result<(Vec<Vec<HeadChoice>>, f64)> {
        self.settings.validate()?;
        if self.settings.on_policy {
            return self.on_policy_choices(model, prefix, span, t);
        }
        let queries = self.settings.reference_queries(model, prefix, span)?;
        // With `recent_share`, the older tokens are one block, the recent
        // ones another: matching the older block's mass and output for
        // every query, and keeping the recent block as it is, matches the
        // whole span.
        let recent = self.settings.recent_tokens(t, span.len());
        let fitted = older_tokens(span, recent)?;
        let budgets = self.settings.head_budgets(model, prefix, span, &fitted, t - recent, || Ok(queries.clone()))?;
        let (mut choices, fitted_error) = self.fit_with_budgets(model, &fitted, &queries, &budgets)?;
        for (layer, heads) in choices.iter_mut().enumerate() {
            keep_recent(heads, span, layer, recent)?;
        }
        Ok((choices, fitted_error))
    }

    /// [`Self::choices`] from reference queries already computed, which
    /// also weigh the heads' budgets (whatever `budget_weights` says: the
    /// fits alone, as the benchmark times them).
    pub fn fit_heads(&self, model: &Model, span: &SpanTargets, queries: &[Tensor], t: usize) -> Result<(Vec<Vec<HeadChoice>>, f64)> {
        let budgets = head_budgets(model, span, t, self.settings.budgets, || head_weights(model, span, queries))?;
        self.fit_with_budgets(model, span, queries, &budgets)
    }

    /// Every head fitted to its reference queries at its budget, in
    /// parallel: each is a small dense problem that nalgebra solves on one
    /// thread.
    fn fit_with_budgets(&self, model: &Model, span: &SpanTargets, queries: &[Tensor], budgets: &[Vec<usize>]) -> Result<(Vec<Vec<HeadChoice>>, f64)> {
        let fits: Vec<Vec<HeadFit>> =
            queries.par_iter().zip(budgets).enumerate().map(|(layer, (layer_queries, layer_budgets))| self.fit_layer(model, span, layer, layer_queries, layer_budgets)).collect::<Result<_>>()?;
        Ok(choices_and_error(fits))
    }

    /// On-policy: one repeat pass, layer by layer; each layer is fitted to
    /// its queries as they come out of the layers below, which read the
    /// prefix and their own compacted entries
    /// ([`crate::model::Qwen2::forward_layer_by_layer`]). The span's own
    /// queries (with `queries = "both"`) join every layer's as they are.
    /// With `recent_share`, each layer keeps its recent tokens verbatim
    /// before the layers above read it, as off-policy.
    fn on_policy_choices(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, t: usize) -> Result<(Vec<Vec<HeadChoice>>, f64)> {
        let settings = &self.settings;
        let recent = settings.recent_tokens(t, span.len());
        let fitted = older_tokens(span, recent)?;
        let budgets = settings.head_budgets(model, prefix, span, &fitted, t - recent, || settings.reference_queries(model, prefix, span))?;
        let slots = budgets.iter().flatten().copied().max().unwrap_or(t) + recent;
        let repeat = RepeatPass::new(model, prefix, span)?;
        let context = if uses_context(settings.queries) { Some(context_queries(model, prefix, span)?) } else { None };
        let tokens = repeat.positions.len() + context.as_ref().map_or(Ok(0), |queries| queries[0].dim(2))?;
        let sample = QuerySample::new(model, tokens, settings.query_cap, settings.seed, span.embeddings.device())?;
        let (mut choices, mut errors) = (Vec::with_capacity(budgets.len()), Vec::new());
        model.qwen2.forward_layer_by_layer(&repeat.embeddings, &repeat.positions, prefix.len() + slots, |layer, repeat_queries| {
            let mut sets: Vec<&Tensor> = context.iter().map(|queries| &queries[layer]).collect();
            sets.push(repeat_queries);
            let layer_fits = self.fit_layer(model, &fitted, layer, &sample.pool(&sets)?, &budgets[layer])?;
            errors.extend(layer_fits.iter().map(|fit| fit.output_error));
            let mut heads: Vec<HeadChoice> = layer_fits.iter().map(HeadChoice::from).collect();
            keep_recent(&mut heads, span, layer, recent)?;
            let (keys, values, biases) = layer_entries(span, layer, &heads, slots)?;
            choices.push(heads);
            after_prefix(prefix, layer, keys, values, biases)
        })?;
        Ok((choices, mean_error(&errors)))
    }

    /// One layer's heads fitted in parallel to its (kv_heads, m, d) queries.
    fn fit_layer(&self, model: &Model, span: &SpanTargets, layer: usize, queries: &Tensor, budgets: &[usize]) -> Result<Vec<HeadFit>> {
        let settings = self.settings.fit();
        layer_problems(model, span, layer, queries)?.par_iter().zip(budgets).map(|(problem, &head_t)| problem.fit(head_t, &settings)).collect()
    }
}

/// The span without its last `recent` tokens: what the fit compacts when
/// they are kept verbatim (the span itself, not copied, when none are).
fn older_tokens(span: &SpanTargets, recent: usize) -> Result<std::borrow::Cow<'_, SpanTargets>> {
    if recent == 0 {
        return Ok(std::borrow::Cow::Borrowed(span));
    }
    Ok(std::borrow::Cow::Owned(span.select(&(0..span.len() - recent).collect::<Vec<_>>())?))
}

/// Appends the span's last `recent` tokens to each of a layer's head
/// choices, verbatim ([`keep_verbatim`]).
fn keep_recent(heads: &mut [HeadChoice], span: &SpanTargets, layer: usize, recent: usize) -> Result<()> {
    if recent == 0 {
        return Ok(());
    }
    for (head, choice) in heads.iter_mut().enumerate() {
        keep_verbatim(choice, &head_matrix(&span.values[layer], head)?, recent);
    }
    Ok(())
}

/// Appends the span's last `recent` entries to a head's choice as they
/// are: their own values (`span_values`, (n, d)), bias 0.
fn keep_verbatim(choice: &mut HeadChoice, span_values: &DMatrix<f64>, recent: usize) {
    let n = span_values.nrows();
    let fitted = choice.values.take().unwrap_or_else(|| span_values.select_rows(&choice.kept));
    let mut values = DMatrix::zeros(fitted.nrows() + recent, fitted.ncols());
    values.rows_mut(0, fitted.nrows()).copy_from(&fitted);
    values.rows_mut(fitted.nrows(), recent).copy_from(&span_values.rows(n - recent, recent));
    choice.values = Some(values);
    choice.biases.get_or_insert_with(|| vec![0.0; choice.kept.len()]).extend(std::iter::repeat_n(0.0, recent));
    choice.kept.extend(n - recent..n);
}

/// Per layer and head, the fits as choices; and their mean output error.
fn choices_and_error(fits: Vec<Vec<HeadFit>>) -> (Vec<Vec<HeadChoice>>, f64) {
    let errors: Vec<f64> = fits.iter().flatten().map(|fit| fit.output_error).collect();
    let choices = fits.iter().map(|layer| layer.iter().map(HeadChoice::from).collect()).collect();
    (choices, mean_error(&errors))
}

/// A layer's cache: the prefix's entries (their biases, or 0), then the
/// compacted ones.
fn after_prefix(prefix: &KvCache, layer: usize, keys: Tensor, values: Tensor, biases: Tensor) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let Some((prefix_keys, prefix_values)) = prefix.layer(layer) else {
        return Ok((keys, values, Some(biases)));
    };
    let prefix_biases = match prefix.biases() {
        Some(all) => all[layer].clone(),
        None => Tensor::zeros((1, prefix_keys.dim(1)?, prefix.len()), biases.dtype(), biases.device())?,
    };
    Ok((Tensor::cat(&[prefix_keys, &keys], 2)?, Tensor::cat(&[prefix_values, &values], 2)?, Some(Tensor::cat(&[&prefix_biases, &biases], 2)?)))
}

/// Entries per layer and head: `t` each, or `t` times the head count
/// shared in proportion to the heads' `weights()` ([`budgets::allocate`];
/// asked for only then), one per (layer, KV head), layer-major.
fn head_budgets(model: &Model, span: &SpanTargets, t: usize, budgets: Budgets, weights: impl FnOnce() -> Result<Vec<f64>>) -> Result<Vec<Vec<usize>>> {
    let config = model.qwen2.config();
    let shape = vec![config.num_key_value_heads; config.num_hidden_layers];
    let heads: usize = shape.iter().sum();
    let flat: Vec<usize> = match budgets {
        Budgets::Uniform => vec![t; heads],
        Budgets::Spread => {
            let weights = weights()?;
            if weights.len() != heads {
                return Err(Error::Invalid(format!(
                    "{} budget weights for a model of {} layers x {} KV heads = {heads}: a profile is for one model",
                    weights.len(),
                    config.num_hidden_layers,
                    config.num_key_value_heads
                )));
            }
            budgets::allocate(t * heads, &weights, span.len())?
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

/// Per (layer, KV head), layer-major: how many of the span's keys the
/// head's reference `queries` (per layer, (kv_heads, m, d)) attend to
/// ([`budgets::effective_keys`] of their mean attention over the span):
/// what spread budgets weigh the heads by.
pub fn head_weights(model: &Model, span: &SpanTargets, queries: &[Tensor]) -> Result<Vec<f64>> {
    let mut weights = Vec::new();
    for (layer, layer_queries) in queries.iter().enumerate() {
        // (kv, m, n) -> (kv, n): each head's mean attention over the span,
        // as a product with a row of 1 / m (candle's CPU sum over a middle
        // axis walks it element by element, slower than the attention itself).
        let attention = attention_over_span(layer_queries, &span.keys[layer], attention_scale(model))?;
        let (kv_heads, m, _) = attention.dims3()?;
        let mean_row = Tensor::full(1.0 / m as f32, (kv_heads, 1, m), attention.device())?;
        let mean: Vec<Vec<f32>> = mean_row.matmul(&attention)?.squeeze(1)?.to_vec2()?;
        weights.extend(mean.iter().map(|head| budgets::effective_keys(&head.iter().map(|&p| p as f64).collect::<Vec<_>>())));
    }
    Ok(weights)
}

impl Compressor for AttentionMatching {
    /// `attention-matching`, then what departs from the plain fit (repeat
    /// queries, highest-attention keys, uniform budgets, off-policy, no
    /// verbatim tail): `-context` or `-both` queries, `-omp` keys (`-omp4`
    /// at 4 picks a round), `-spread` budgets (`-by-context` when the span's
    /// own queries weigh them, `-by-profile` for fixed weights), `-on-policy`, `-recent0.5`
    /// for a share of entries kept verbatim from the span's end. The name
    /// says what ran whatever the defaults are, so a default that changes
    /// does not change what a recorded name means.
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
        match &self.settings.budget_weights {
            None => {}
            Some(BudgetWeights::Queries(QuerySource::Repeat)) => name.push_str("-by-repeat"),
            Some(BudgetWeights::Queries(QuerySource::Context)) => name.push_str("-by-context"),
            Some(BudgetWeights::Queries(QuerySource::Both)) => name.push_str("-by-both"),
            Some(BudgetWeights::Profile(_)) => name.push_str("-by-profile"),
        }
        if self.settings.on_policy {
            name.push_str("-on-policy");
        }
        if self.settings.recent_share > 0.0 {
            name.push_str(&format!("-recent{}", self.settings.recent_share));
        }
        name
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn needs_span_queries(&self) -> bool {
        let weighs_by_context = matches!(self.settings.budget_weights, Some(BudgetWeights::Queries(source)) if uses_context(source));
        uses_context(self.settings.queries) || weighs_by_context
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let (choices, fit_error) = self.choices(model, prefix, span, budget(span.len(), self.ratio)?)?;
        let mut compressed = compacted(self.name(), span, &choices)?;
        compressed.report.fit_error = Some(fit_error);
        Ok(compressed)
    }
}

/// The reverse start of the recipe: the span tokens that attention
/// matching keeps in the most (layer, KV head)s, as anchors
/// ([`crate::recipe::init::Init::Anchored`]). Each head's fit at `count`
/// entries votes for the tokens it keeps; ties go to the tokens that carry
/// more of their heads' fitted attention mass.
#[derive(Debug, Clone, Default)]
pub struct MatchedKeys {
    /// The fit whose kept keys vote.
    pub settings: MatchingSettings,
}

impl Anchors for MatchedKeys {
    /// The name of the fit that votes (`attention-matching-spread` by
    /// default), so a recipe started from it says which.
    fn name(&self) -> String {
        AttentionMatching { settings: self.settings.clone(), ratio: 1.0 }.name()
    }

    fn anchors(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, count: usize) -> Result<Vec<usize>> {
        let matching = AttentionMatching { settings: self.settings.clone(), ratio: span.len() as f64 / count as f64 };
        let (choices, _) = matching.choices(model, prefix, span, count)?;
        Ok(keep_top(&votes(&choices, span.len()), count))
    }
}

/// (n): per span token, the number of heads that keep it, plus (always
/// under 1, so only among equal votes) the share of each such head's
/// fitted weights (e^bias) it holds, summed over heads and divided by
/// one more than the head count.
fn votes(choices: &[Vec<HeadChoice>], n_tokens: usize) -> Vec<f32> {
    let heads = choices.iter().map(Vec::len).sum::<usize>();
    let mut votes = vec![0.0f64; n_tokens];
    let mut shares = vec![0.0f64; n_tokens];
    for choice in choices.iter().flatten() {
        let weights: Vec<f64> = match &choice.biases {
            Some(biases) => biases.iter().map(|bias| bias.exp()).collect(),
            None => vec![1.0; choice.kept.len()],
        };
        let total: f64 = weights.iter().sum();
        for (&token, weight) in choice.kept.iter().zip(weights) {
            votes[token] += 1.0;
            shares[token] += weight / total;
        }
    }
    votes.iter().zip(shares).map(|(vote, share)| (vote + share / (heads + 1) as f64) as f32).collect()
}
