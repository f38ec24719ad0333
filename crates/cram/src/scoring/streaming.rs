//! StreamingLLM: attention sinks and the most recent tokens.

use serde::{Deserialize, Serialize};

use super::scorer::Scorer;
use crate::cache::KvCache;
use crate::model::Qwen2;
use crate::span::SpanTargets;
use crate::error::Result;

/// The span's first `sinks` tokens (at most half the budget) and the most
/// recent ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Streaming {
    /// Attention-sink tokens kept from the span's start.
    pub sinks: usize,
}

impl Default for Streaming {
    /// 4 sinks.
    fn default() -> Self {
        Self { sinks: 4 }
    }
}

impl Scorer for Streaming {
    fn name(&self) -> String {
        "streaming".into()
    }

    /// Scores under which the top entries are the sinks, then the latest tokens.
    fn score(&self, _model: &Qwen2, _prefix: &KvCache, span: &SpanTargets, budget: usize) -> Result<Vec<f32>> {
        let (n, sinks) = (span.len(), self.sinks.min(budget / 2));
        Ok((0..n).map(|i| if i < sinks { (2 * n - i) as f32 } else { i as f32 }).collect())
    }
}
