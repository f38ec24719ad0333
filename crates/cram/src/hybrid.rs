//! The hybrid: keep the span's most distinctive tokens verbatim (their real
//! KV at their real positions) and compress the rest with the recipe, so
//! that the whole meets the ratio. Distinctive = Values far from their
//! neighbours' at every layer ("V uniqueness"); the research notes found
//! surprisal a poor selector (it picks formatting and sub-word fragments).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compress::{CompressedSpan, Compressor, Recipe};
use crate::evict::most_important;
use crate::model::Qwen2;
use crate::pooling;
use crate::targets::SpanTargets;
use crate::Result;

/// Keeps `verbatim_share` of the span's tokens verbatim, compresses the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hybrid {
    /// Share of the span's tokens kept verbatim (the published 0.15).
    pub verbatim_share: f64,
    /// How the other tokens are compressed; its ratio is the overall one.
    pub recipe: Recipe,
}

impl Hybrid {
    /// The published share, 15%, around `recipe`.
    pub fn new(recipe: Recipe) -> Self {
        Self { verbatim_share: 0.15, recipe }
    }

    /// Indices (ascending) of the tokens kept verbatim for a span: the most
    /// unique, at most the budget less one (one virtual token at least).
    pub fn verbatim_tokens(&self, span: &SpanTargets) -> Result<Vec<usize>> {
        let budget = pooling::n_virtual(span.len(), self.recipe.ratio)?;
        let wanted = (self.verbatim_share * span.len() as f64).round() as usize;
        let count = wanted.min(budget - 1);
        let mut kept = most_important(&value_uniqueness(&span.values)?, count);
        kept.sort_unstable();
        Ok(kept)
    }
}

impl Compressor for Hybrid {
    fn name(&self) -> String {
        "hybrid".into()
    }

    /// The verbatim tokens come first in the cache (so the virtual tokens
    /// are optimised with them in context), then the virtual tokens.
    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        let budget = pooling::n_virtual(span.len(), self.recipe.ratio)?;
        let verbatim = self.verbatim_tokens(span)?;
        if verbatim.is_empty() {
            let mut compressed = self.recipe.compress_into(model, prefix, span, budget, on_step)?;
            compressed.report.method = self.name();
            return Ok(compressed);
        }
        let kept = CompressedSpan::real_entries(span, self.name()).select(&verbatim)?;
        let mut context = prefix.clone();
        kept.append_to(&mut context)?;
        let rest: Vec<usize> = (0..span.len()).filter(|i| verbatim.binary_search(i).is_err()).collect();
        let virtual_tokens =
            self.recipe.compress_into(model, &context, &span.select(&rest)?, budget - verbatim.len(), on_step)?;
        let mut compressed = kept.followed_by(&virtual_tokens)?;
        compressed.report.optimization = virtual_tokens.report.optimization;
        Ok(compressed)
    }
}

/// Per token, how far its Values are from its neighbours': at each layer
/// the mean distance to the previous and next token's V (all KV heads),
/// divided by that layer's mean so every layer counts alike, summed over layers.
/// values: per layer (1, kv_heads, n, head_dim) -> (n)
pub fn value_uniqueness(values: &[Tensor]) -> Result<Vec<f32>> {
    let n = values.first().map_or(Ok(0), |v| v.dim(2))?;
    let mut total = vec![0.0f32; n];
    if n < 2 {
        return Ok(total);
    }
    for value in values {
        let per_token = value.to_dtype(DType::F32)?.squeeze(0)?.transpose(0, 1)?.flatten_from(1)?; // (n, kv * d)
        let steps = (per_token.narrow(0, 1, n - 1)? - per_token.narrow(0, 0, n - 1)?)?;
        let gaps: Vec<f32> = steps.sqr()?.sum(1)?.sqrt()?.to_vec1()?; // gaps[i]: between tokens i and i + 1
        let layer: Vec<f32> = (0..n)
            .map(|i| {
                let neighbours: Vec<f32> = [i.checked_sub(1).map(|j| gaps[j]), gaps.get(i).copied()].into_iter().flatten().collect();
                neighbours.iter().sum::<f32>() / neighbours.len() as f32
            })
            .collect();
        let mean = layer.iter().sum::<f32>() / n as f32;
        for (slot, u) in total.iter_mut().zip(layer) {
            *slot += if mean > 0.0 { u / mean } else { 0.0 };
        }
    }
    Ok(total)
}
