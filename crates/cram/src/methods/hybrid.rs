//! The hybrid: keep the span's most distinctive tokens verbatim (their real
//! KV at their real positions) and compress the rest with the recipe, so
//! that the whole meets the ratio. Distinctive = [`ValueUniqueness`].

use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::model::Model;
use crate::recipe::Recipe;
use crate::scoring::{Scorer, ValueUniqueness};
use crate::span::SpanTargets;
use crate::error::Result;

/// Keeps `verbatim_share` of the span's tokens verbatim, compresses the rest.
#[derive(Debug, Clone)]
pub struct Hybrid {
    /// The share kept verbatim.
    pub settings: HybridSettings,
    /// How the other tokens are compressed; its ratio is the overall one.
    pub recipe: Recipe,
}

/// The hybrid's own knob.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HybridSettings {
    /// Share of the span's tokens kept verbatim, in [0, 1).
    pub verbatim_share: f64,
}

impl Default for HybridSettings {
    /// The published share, 15%.
    fn default() -> Self {
        Self { verbatim_share: 0.15 }
    }
}

impl HybridSettings {
    /// Refuses a share outside [0, 1).
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.verbatim_share) {
            return Err(crate::error::Error::Invalid(format!("hybrid verbatim_share {} is not in [0, 1)", self.verbatim_share)));
        }
        Ok(())
    }
}

impl Hybrid {
    /// The published share around `recipe`.
    pub fn new(recipe: Recipe) -> Self {
        Self { settings: HybridSettings::default(), recipe }
    }

    /// Indices (ascending) of the tokens kept verbatim for a span: the most
    /// unique, at most the budget less one (one virtual token at least).
    pub fn verbatim_tokens(&self, model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Vec<usize>> {
        let budget = budget(span.len(), self.recipe.ratio)?;
        let wanted = (self.settings.verbatim_share * span.len() as f64).round() as usize;
        let count = wanted.min(budget - 1);
        if count == 0 {
            return Ok(Vec::new());
        }
        ValueUniqueness {}.keep(&model.qwen2, prefix, span, count)
    }
}

impl Compressor for Hybrid {
    /// `hybrid`, then the recipe's [`Recipe::variant`].
    fn name(&self) -> String {
        format!("hybrid{}", self.recipe.variant())
    }

    /// The verbatim tokens come first in the cache (so the virtual tokens
    /// are optimized with them in context), then the virtual tokens.
    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let budget = budget(span.len(), self.recipe.ratio)?;
        let verbatim = self.verbatim_tokens(model, prefix, span)?;
        if verbatim.is_empty() {
            return self.recipe.compress_sized(self.name(), model, prefix, span, budget, on_step);
        }
        let kept = CompressedSpan::real_entries(self.name(), span).select(&verbatim)?;
        let mut context = prefix.clone();
        kept.append_to(&mut context)?;
        let rest: Vec<usize> = (0..span.len()).filter(|i| verbatim.binary_search(i).is_err()).collect();
        let virtual_tokens =
            self.recipe.compress_sized(self.name(), model, &context, &span.select(&rest)?, budget - verbatim.len(), on_step)?;
        let mut compressed = kept.followed_by(&virtual_tokens)?;
        compressed.report.optimization = virtual_tokens.report.optimization;
        Ok(compressed)
    }
}
