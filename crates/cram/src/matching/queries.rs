//! Reference queries: the post-RoPE queries an attention-matching fit (and
//! KVzip's scores) are judged on. A compacted span must look the same to
//! the queries that will read it; which queries those are is unknown at
//! compaction time, so two stand-ins: the model repeating the span
//! ("repeat-prefill": after the cache holding the prefix and the span, a
//! user turn asking for the previous context verbatim, then the span's own
//! tokens fed in), and the span's own queries ("context-prefill").

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::error::Result;
use crate::model::ops::softmax_last_dim;
use crate::model::Model;
use crate::rng::normal_samples;
use crate::span::SpanTargets;

/// Which queries stand in for the future readers of a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuerySource {
    /// The model asked to repeat the span, the span fed in.
    Repeat,
    /// The span's own queries.
    Context,
    /// Both sets together.
    Both,
}

/// The user turn that asks for the span again (ChatML, Qwen's template).
pub const REPEAT_PROMPT: &str = "<|im_start|>user\nRepeat the previous context verbatim.<|im_end|>\n<|im_start|>assistant\n";

/// Per layer, (kv_heads, m, head_dim) f32: each KV head's reference
/// queries, the query heads of its group pooled (head-major), at most
/// `cap` per KV head (the same tokens, drawn with `seed`, at every layer).
pub fn reference_queries(model: &Model, prefix: &KvCache, span: &SpanTargets, source: QuerySource, cap: usize, seed: u64) -> Result<Vec<Tensor>> {
    let mut sets = Vec::new();
    if uses_context(source) {
        sets.push(context_queries(model, prefix, span)?);
    }
    if uses_repeat(source) {
        let repeat = RepeatPass::new(model, prefix, span)?;
        sets.push(model.qwen2.queries(&repeat.embeddings, &repeat.positions, Some(&repeat.context))?);
    }
    let tokens = sets.iter().map(|set| set[0].dim(2)).sum::<candle_core::Result<usize>>()?;
    let sample = QuerySample::new(model, tokens, cap, seed, span.embeddings.device())?;
    (0..sets[0].len()).map(|layer| sample.pool(&sets.iter().map(|set| &set[layer]).collect::<Vec<_>>())).collect()
}

/// Whether `source` includes the span's own queries.
pub fn uses_context(source: QuerySource) -> bool {
    matches!(source, QuerySource::Context | QuerySource::Both)
}

/// Whether `source` includes the repeat pass.
pub fn uses_repeat(source: QuerySource) -> bool {
    matches!(source, QuerySource::Repeat | QuerySource::Both)
}

/// Per layer (1, heads, n, d): the span's own queries, from the targets'
/// forward when it kept them, else from a second forward of the span.
pub fn context_queries(model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Vec<Tensor>> {
    match &span.queries {
        Some(queries) => Ok(queries.clone()),
        None => model.qwen2.queries(&span.embeddings, &span.positions, Some(prefix)),
    }
}

/// The repeat pass's input: the repeat prompt and the span's tokens, at
/// the positions after the span, over the prefix and the span.
pub struct RepeatPass {
    /// (1, prompt + n, hidden)
    pub embeddings: Tensor,
    /// (prompt + n)
    pub positions: Vec<f32>,
    /// The prefix, then the span's own entries.
    pub context: KvCache,
}

impl RepeatPass {
    /// The repeat pass of `span` after `prefix`.
    pub fn new(model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Self> {
        let mut context = prefix.clone();
        context.append(&span.keys, &span.values, &span.positions)?;
        let prompt = model.tokenizer.encode(REPEAT_PROMPT)?;
        let ids: Vec<u32> = prompt.iter().chain(&span.ids).copied().collect();
        let first = context.next_position();
        let positions = (0..ids.len()).map(|i| first + i as f32).collect();
        Ok(Self { embeddings: model.qwen2.embed(&ids)?, positions, context })
    }
}

/// Which query tokens a fit sees, and how a KV head's query heads pool:
/// the same sample at every layer.
pub struct QuerySample {
    /// Ascending indices of the kept tokens, into the query sets side by side.
    ids: Tensor,
    /// Query heads per KV head.
    groups: usize,
}

impl QuerySample {
    /// `cap / groups` of `tokens` query tokens (all when there are fewer),
    /// drawn with `seed`.
    pub fn new(model: &Model, tokens: usize, cap: usize, seed: u64, device: &candle_core::Device) -> Result<Self> {
        let config = model.qwen2.config();
        let groups = config.num_attention_heads / config.num_key_value_heads;
        let kept = sample_tokens(tokens, cap.div_ceil(groups).max(1), seed);
        Ok(Self { ids: Tensor::new(kept.iter().map(|&i| i as u32).collect::<Vec<_>>(), device)?, groups })
    }

    /// One layer's query sets (1, heads, tokens_i, d), side by side along
    /// the tokens -> (kv_heads, groups * m, d) f32 of the sampled tokens.
    pub fn pool(&self, sets: &[&Tensor]) -> Result<Tensor> {
        group_by_kv_head(&Tensor::cat(sets, 2)?.index_select(&self.ids, 2)?, self.groups)
    }
}

/// One layer's (kv_heads, m, d) reference queries against the span's
/// (1, kv_heads, n, d) keys: (kv_heads, m, n) f32, each query's softmax
/// over the span's entries alone (what KVzip scores and spread budgets
/// weigh heads by).
pub fn attention_over_span(queries: &Tensor, span_keys: &Tensor, scale: f64) -> Result<Tensor> {
    let keys = span_keys.squeeze(0)?.to_dtype(candle_core::DType::F32)?;
    softmax_last_dim(&(queries.matmul(&keys.t()?)? * scale)?)
}

/// (1, heads, m, d) -> (kv_heads, groups * m, d) f32: the query heads that
/// share a KV head (heads kv * groups .. (kv + 1) * groups) side by side.
fn group_by_kv_head(queries: &Tensor, groups: usize) -> Result<Tensor> {
    let (_, heads, m, d) = queries.dims4()?;
    Ok(queries.to_dtype(candle_core::DType::F32)?.reshape((heads / groups, groups * m, d))?)
}

/// `count` of `total` token indices (all of them when there are fewer),
/// ascending, drawn without replacement from `seed`.
fn sample_tokens(total: usize, count: usize, seed: u64) -> Vec<usize> {
    if count >= total {
        return (0..total).collect();
    }
    // Rank by a seeded key: a permutation that does not depend on the platform.
    let keys = normal_samples(seed, total);
    let mut order: Vec<usize> = (0..total).collect();
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]).then(a.cmp(&b)));
    let mut kept = order[..count].to_vec();
    kept.sort_unstable();
    kept
}
