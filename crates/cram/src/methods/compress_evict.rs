//! Compress-then-evict: the recipe at a mild ratio, then attention eviction
//! of its virtual tokens down to the final ratio.

use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::model::Model;
use crate::recipe::Recipe;
use crate::scoring::attention_received;
use crate::select::keep_top;
use crate::span::SpanTargets;
use crate::error::{Error, Result};

/// Compresses with the recipe at `settings.first_ratio`, then evicts the
/// virtual tokens that the span's last tokens attend to least, down to `ratio`.
#[derive(Debug, Clone)]
pub struct CompressThenEvict {
    /// The first stage's ratio and the observing window.
    pub settings: CompressEvictSettings,
    /// The first stage (compressing at `settings.first_ratio`, whatever its own ratio).
    pub recipe: Recipe,
    /// The overall ratio: n / entries kept.
    pub ratio: f64,
}

/// Compress-then-evict's own knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressEvictSettings {
    /// The ratio the recipe compresses at first; must be below the final one.
    pub first_ratio: f64,
    /// Observing tokens: the span's last `window` tokens.
    pub window: usize,
}

impl Default for CompressEvictSettings {
    /// The published pairing: the recipe at 2x, observed by the span's last 32 tokens.
    fn default() -> Self {
        Self { first_ratio: 2.0, window: 32 }
    }
}

impl CompressThenEvict {
    /// The published pairing around `recipe`, evicted down to `ratio`.
    pub fn new(recipe: Recipe, ratio: f64) -> Self {
        Self { settings: CompressEvictSettings::default(), recipe, ratio }
    }

    /// Refuses a first stage that would not leave anything to evict.
    pub fn validate(&self) -> Result<()> {
        if self.settings.first_ratio >= self.ratio {
            return Err(Error::Invalid(format!(
                "compress-then-evict compresses at {}x first, which must be below the final {}x",
                self.settings.first_ratio, self.ratio
            )));
        }
        Ok(())
    }
}

impl Compressor for CompressThenEvict {
    /// `compress-evict`, then the recipe's [`Recipe::variant`].
    fn name(&self) -> String {
        format!("compress-evict{}", self.recipe.variant())
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        self.validate()?;
        let first_budget = budget(span.len(), self.settings.first_ratio)?;
        let compressed = self.recipe.compress_sized(self.name(), model, prefix, span, first_budget, on_step)?;
        let n_keep = budget(span.len(), self.ratio)?.min(compressed.len());
        let observers = span.len().min(self.settings.window.max(1));
        let observer_span = span.select(&(span.len() - observers..span.len()).collect::<Vec<_>>())?;
        let importance = attention_importance(model, prefix, &compressed, &observer_span)?;
        compressed.select(&keep_top(&importance, n_keep))
    }
}

/// The attention each of `candidates`' entries draws from `observers`
/// (their own embeddings at their own positions), placed after `prefix` and
/// the candidates: summed over layers, heads and observing tokens.
pub fn attention_importance(model: &Model, prefix: &KvCache, candidates: &CompressedSpan, observers: &SpanTargets) -> Result<Vec<f32>> {
    let mut context = prefix.clone();
    candidates.append_to(&mut context)?;
    // Per layer (1, heads, observers, prefix + candidates + observers): the candidates' columns.
    let probabilities = model.qwen2.attention_probabilities(&observers.embeddings, &observers.positions, Some(&context))?;
    attention_received(&probabilities, prefix.len(), candidates.len())
}
