//! Eviction by attention importance (SnapKV-style): a window of observing
//! tokens attends over the candidate entries, and the entries that draw the
//! most attention, summed over layers, heads and observers, are kept.
//! [`CompressThenEvict`] applies it to the recipe's virtual tokens.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compress::{CompressedSpan, Compressor, Recipe};
use crate::model::Qwen2;
use crate::pooling;
use crate::targets::SpanTargets;
use crate::{Error, Result};

/// Compress with the recipe at a mild ratio, then evict the virtual tokens
/// that the span's last tokens attend to least, down to `ratio`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressThenEvict {
    /// The first stage; its ratio (the published 2x) must be below `ratio`.
    pub recipe: Recipe,
    /// The overall ratio: n / entries kept.
    pub ratio: f64,
    /// Observing tokens: the span's last `window` tokens.
    pub window: usize,
}

impl CompressThenEvict {
    /// The published pairing: the recipe at 2x, evicted down to `ratio`,
    /// observed by the span's last 32 tokens.
    pub fn new(recipe: Recipe, ratio: f64) -> Self {
        Self { recipe, ratio, window: 32 }
    }
}

impl Compressor for CompressThenEvict {
    fn name(&self) -> String {
        "compress-evict".into()
    }

    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        if self.recipe.ratio >= self.ratio {
            return Err(Error::Invalid(format!(
                "compress-then-evict compresses at {}x first, which must be below the final {}x",
                self.recipe.ratio, self.ratio
            )));
        }
        let compressed = self.recipe.compress(model, prefix, span, on_step)?;
        let n_keep = pooling::n_virtual(span.len(), self.ratio)?.min(compressed.len());
        let observers = span.len().min(self.window.max(1));
        let observer_span = span.select(&(span.len() - observers..span.len()).collect::<Vec<_>>())?;
        let importance = attention_importance(model, prefix, &compressed, &observer_span)?;
        let mut kept = most_important(&importance, n_keep);
        kept.sort_unstable();
        let mut evicted = compressed.select(&kept)?;
        evicted.report.method = self.name();
        Ok(evicted)
    }
}

/// The attention each of `candidates`' entries draws from `observers`
/// (their own embeddings at their own positions), placed after `prefix` and
/// the candidates: summed over layers, heads and observing tokens.
pub fn attention_importance(
    model: &Qwen2,
    prefix: &KvCache,
    candidates: &CompressedSpan,
    observers: &SpanTargets,
) -> Result<Vec<f32>> {
    let mut context = prefix.clone();
    candidates.append_to(&mut context)?;
    let probabilities = model.attention_probabilities(&observers.embeddings, &observers.positions, Some(&context))?;
    let mut importance = Tensor::zeros(candidates.len(), DType::F32, model.device())?;
    for layer in probabilities {
        // (1, heads, observers, prefix + candidates + observers) -> the candidates' columns
        let on_candidates = layer.narrow(3, prefix.len(), candidates.len())?;
        importance = (importance + on_candidates.sum(2)?.sum(1)?.squeeze(0)?)?;
    }
    Ok(importance.to_vec1()?)
}

/// Indices of the `count` largest scores (ties: the earlier entry).
pub fn most_important(scores: &[f32], count: usize) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..scores.len()).collect();
    ranked.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    ranked.truncate(count);
    ranked
}
