//! KVzip (Kim et al., 2025): query-agnostic eviction. The model is asked to
//! repeat the span; each span entry is scored, per layer and KV head, by
//! the largest attention any of those queries (of any query head of the
//! group) pays it, and each head keeps its `n / ratio` best entries with
//! their real keys and values, no bias. The softmax runs over the span's
//! entries only, as the attention-matching paper's KVzip baseline does
//! (kvpress normalises over sinks, the chunk and the repeat tokens).

use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::error::Result;
use crate::matching::queries::{attention_over_span, reference_queries, QuerySource};
use crate::matching::{compacted, HeadChoice};
use crate::model::Model;
use crate::select::keep_top;
use crate::span::SpanTargets;

/// KVzip eviction at `ratio`.
#[derive(Debug, Clone)]
pub struct KvZip {
    /// The knobs.
    pub settings: KvZipSettings,
    /// Span tokens / entries kept per head.
    pub ratio: f64,
}

/// KVzip's own knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvZipSettings {
    /// Repeat queries per KV head at most (sampled with `seed`).
    pub query_cap: usize,
    /// Seed of that sample.
    pub seed: u64,
}

impl Default for KvZipSettings {
    /// Up to 8,192 repeat queries per KV head: on 900-token spans 4,096
    /// (a sample of about 585 of the positions) kept 12 of 33 facts at
    /// 3.2x, 8,192 (all of them) 22 of 33 (experiments/benchmark/README.md).
    fn default() -> Self {
        Self { query_cap: 8192, seed: 0 }
    }
}

impl Compressor for KvZip {
    fn name(&self) -> String {
        "kvzip".into()
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let t = budget(span.len(), self.ratio)?;
        let queries = reference_queries(model, prefix, span, QuerySource::Repeat, self.settings.query_cap, self.settings.seed)?;
        let scale = 1.0 / (model.qwen2.config().head_dim() as f64).sqrt();
        let mut choices = Vec::with_capacity(queries.len());
        for (layer, layer_queries) in queries.iter().enumerate() {
            // (kv, m, n) -> (kv, n): the largest weight any query pays.
            let best: Vec<Vec<f32>> = attention_over_span(layer_queries, &span.keys[layer], scale)?.max(1)?.to_vec2()?;
            choices.push(best.iter().map(|scores| HeadChoice { kept: keep_top(scores, t), values: None, biases: None }).collect());
        }
        compacted(self.name(), span, &choices)
    }
}
