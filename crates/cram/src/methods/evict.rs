//! Eviction: keep a subset of the span's real KV entries, at their real
//! positions, chosen by a [`Scorer`]. The prefix is never evicted: only the
//! span's tokens compete.

use std::rc::Rc;

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::model::Model;
use crate::scoring::Scorer;
use crate::span::SpanTargets;
use crate::error::Result;

/// Keeps the [`budget`] of the span's real KV entries that `scorer` ranks highest.
#[derive(Debug, Clone)]
pub struct Evict {
    /// The scoring policy.
    pub scorer: Rc<dyn Scorer>,
    /// Span tokens / entries kept.
    pub ratio: f64,
}

impl Evict {
    /// Eviction by `scorer` at `ratio`.
    pub fn new(scorer: impl Scorer + 'static, ratio: f64) -> Self {
        Self { scorer: Rc::new(scorer), ratio }
    }
}

impl Compressor for Evict {
    fn name(&self) -> String {
        self.scorer.name()
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let kept = self.scorer.keep(&model.qwen2, prefix, span, budget(span.len(), self.ratio)?)?;
        CompressedSpan::real_entries(self.name(), span).select(&kept)
    }
}
