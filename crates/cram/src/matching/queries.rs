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
    if matches!(source, QuerySource::Context | QuerySource::Both) {
        // The targets' own forward kept them when the method asked; else run the span again.
        match &span.queries {
            Some(queries) => sets.push(queries.clone()),
            None => sets.push(model.qwen2.queries(&span.embeddings, &span.positions, Some(prefix))?),
        }
    }
    if matches!(source, QuerySource::Repeat | QuerySource::Both) {
        sets.push(repeat_queries(model, prefix, span)?);
    }
    // Per layer (1, heads, tokens, d): the sets side by side along the tokens.
    let layers = sets[0].len();
    let per_layer: Vec<Tensor> =
        (0..layers).map(|layer| Tensor::cat(&sets.iter().map(|set| &set[layer]).collect::<Vec<_>>(), 2)).collect::<candle_core::Result<_>>()?;
    let groups = model.qwen2.config().num_attention_heads / model.qwen2.config().num_key_value_heads;
    let tokens = per_layer[0].dim(2)?;
    let kept = sample_tokens(tokens, cap.div_ceil(groups).max(1), seed);
    let ids = Tensor::new(kept.iter().map(|&i| i as u32).collect::<Vec<_>>(), per_layer[0].device())?;
    per_layer.iter().map(|queries| group_by_kv_head(&queries.index_select(&ids, 2)?, groups)).collect()
}

/// Per layer (1, heads, tokens, d): the queries of the repeat prompt and the
/// span fed again, after the prefix and the span, at the positions that follow.
fn repeat_queries(model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<Vec<Tensor>> {
    let mut context = prefix.clone();
    context.append(&span.keys, &span.values, &span.positions)?;
    let prompt = model.tokenizer.encode(REPEAT_PROMPT)?;
    let ids: Vec<u32> = prompt.iter().chain(&span.ids).copied().collect();
    let first = context.next_position();
    let positions: Vec<f32> = (0..ids.len()).map(|i| first + i as f32).collect();
    model.qwen2.queries(&model.qwen2.embed(&ids)?, &positions, Some(&context))
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
