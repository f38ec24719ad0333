//! SnapKV: tokens scored by the attention an observation window pays them.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::scorer::{attention_received, Scorer};
use crate::cache::KvCache;
use crate::model::Qwen2;
use crate::select::max_pool;
use crate::span::SpanTargets;
use crate::error::Result;

/// The attention the span's last `window` tokens pay each span token in the
/// span's own forward, summed over layers, heads and observers, then
/// max-pooled over `kernel` neighbours so that kept tokens come in runs (a
/// name is several tokens). All tokens compete for the budget, the window
/// included, since the budget can be smaller than the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapKv {
    /// Observing tokens: the span's last.
    pub window: usize,
    /// Width of the max-pool over neighbouring scores (odd; 1 = none).
    pub kernel: usize,
}

impl Default for SnapKv {
    /// A 32-token window and a 5-wide pool.
    fn default() -> Self {
        Self { window: 32, kernel: 5 }
    }
}

impl Scorer for SnapKv {
    fn name(&self) -> String {
        "snapkv".into()
    }

    /// Refuses an even kernel, which has no centre.
    fn validate(&self) -> Result<()> {
        if self.kernel % 2 == 0 {
            return Err(crate::error::Error::Invalid(format!("kernel {} must be odd (a window centred on the token)", self.kernel)));
        }
        Ok(())
    }

    /// Causal, so a token is observed only by the observers at or after it.
    fn score(&self, model: &Qwen2, prefix: &KvCache, span: &SpanTargets, _budget: usize) -> Result<Vec<f32>> {
        self.validate()?;
        let observers = span.len().min(self.window.max(1));
        let probabilities = model.attention_probabilities(&span.embeddings, &span.positions, Some(prefix))?;
        let rows: Vec<Tensor> =
            probabilities.iter().map(|layer| layer.narrow(2, span.len() - observers, observers)).collect::<candle_core::Result<_>>()?;
        Ok(max_pool(&attention_received(&rows, prefix.len(), span.len())?, self.kernel))
    }
}
