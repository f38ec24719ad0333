//! The span as the model saw it, what every method compresses: one forward
//! of the span over the prefix cache gives every layer's K and V and each
//! token's surprisal (the recipe's targets and pooling weights).

use candle_core::{DType, Tensor, D};

use crate::cache::{select_entries, KvCache};
use crate::model::{Logits, Qwen2};
use crate::error::{Error, Result};

/// The span as the model saw it, and what the compression is judged against.
#[derive(Debug, Clone)]
pub struct SpanTargets {
    /// (n): the span's token ids (what text-level methods rewrite).
    pub ids: Vec<u32>,
    /// (1, n, hidden) f32: the span's input embeddings.
    pub embeddings: Tensor,
    /// (n): the span's original positions.
    pub positions: Vec<f32>,
    /// Per layer, (1, kv_heads, n, head_dim), RoPE applied: the span's real keys.
    pub keys: Vec<Tensor>,
    /// Per layer, (1, kv_heads, n, head_dim): the span's real values.
    pub values: Vec<Tensor>,
    /// (n): -log p(token | everything before it); 0 for the span's first token.
    pub surprisal: Vec<f32>,
    /// Per layer, (1, heads, n, head_dim), RoPE applied: the span's own
    /// queries from the same forward, when asked for (attention
    /// matching's context-prefill reference queries, which then cost no
    /// second forward).
    pub queries: Option<Vec<Tensor>>,
}

impl SpanTargets {
    /// Runs `span_ids` at `positions` after `prefix`.
    pub fn compute(model: &Qwen2, prefix: &KvCache, span_ids: &[u32], positions: &[f32]) -> Result<Self> {
        Self::compute_for(model, prefix, span_ids, positions, true, false)
    }

    /// [`SpanTargets::compute`] without the surprisal, which is then all 0:
    /// no logits (over a 150k vocabulary, most of the forward's cost), for
    /// methods that do not pool by surprisal ([`crate::compressor::Compressor::needs_surprisal`]).
    pub fn compute_without_surprisal(model: &Qwen2, prefix: &KvCache, span_ids: &[u32], positions: &[f32]) -> Result<Self> {
        Self::compute_for(model, prefix, span_ids, positions, false, false)
    }

    /// The targets with the surprisal or not, and the span's own queries
    /// or not ([`crate::compressor::Compressor::needs_span_queries`]).
    pub fn compute_for(model: &Qwen2, prefix: &KvCache, span_ids: &[u32], positions: &[f32], with_surprisal: bool, with_queries: bool) -> Result<Self> {
        if span_ids.is_empty() || span_ids.len() != positions.len() {
            return Err(Error::Invalid(format!(
                "a span needs tokens and one position per token (got {} and {})",
                span_ids.len(),
                positions.len()
            )));
        }
        let embeddings = model.embed(span_ids)?;
        let logits = if with_surprisal { Logits::All } else { Logits::None };
        let (output, queries) = if with_queries {
            let (output, queries) = model.forward_with_queries(&embeddings, positions, Some(prefix), logits)?;
            (output, Some(queries))
        } else {
            (model.forward(&embeddings, positions, Some(prefix), logits)?, None)
        };
        let surprisal = match output.logits {
            Some(logits) => surprisal(&logits, span_ids)?,
            None if !with_surprisal => vec![0.0; span_ids.len()],
            None => return Err(Error::Invalid("forward returned no logits".into())),
        };
        Ok(Self {
            ids: span_ids.to_vec(),
            embeddings,
            positions: positions.to_vec(),
            keys: output.keys,
            values: output.values,
            surprisal,
            queries,
        })
    }

    /// The tokens at `indices` (ascending), with their targets as computed
    /// over the whole span: what is left to compress once some tokens are
    /// kept verbatim.
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        if indices.is_empty() || indices.iter().any(|&i| i >= self.len()) {
            return Err(Error::Invalid(format!("cannot select {indices:?} from a span of {} tokens", self.len())));
        }
        let ids = Tensor::new(indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), self.embeddings.device())?;
        Ok(Self {
            ids: indices.iter().map(|&i| self.ids[i]).collect(),
            embeddings: self.embeddings.index_select(&ids, 1)?,
            positions: indices.iter().map(|&i| self.positions[i]).collect(),
            keys: select_entries(&self.keys, indices)?,
            values: select_entries(&self.values, indices)?,
            surprisal: indices.iter().map(|&i| self.surprisal[i]).collect(),
            queries: self.queries.as_ref().map(|queries| select_entries(queries, indices)).transpose()?,
        })
    }

    /// Per layer, (1, kv_heads, n, head_dim) f32: the span's keys with RoPE
    /// undone at their real positions. Position-free, so they can be pooled
    /// across a chunk like the Values (the K + V objective's targets).
    pub fn unrotated_keys(&self, model: &Qwen2) -> Result<Vec<Tensor>> {
        let rotation = model.rotation_f32(&self.positions)?;
        self.keys.iter().map(|key| rotation.invert(&key.to_dtype(DType::F32)?)).collect()
    }

    /// The position right after the span's last token.
    pub fn next_position(&self) -> f32 {
        self.positions.last().map_or(0.0, |last| last.floor() + 1.0)
    }

    /// Number of tokens in the span.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the span has no tokens.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Token i's surprisal from the logits at i - 1; the first token, whose
/// prediction lies outside the span, gets 0.
/// logits: (1, n, vocab) f32
fn surprisal(logits: &Tensor, span_ids: &[u32]) -> Result<Vec<f32>> {
    let n = span_ids.len();
    let mut surprisal = vec![0.0f32; n];
    if n == 1 {
        return Ok(surprisal);
    }
    let predicting = logits.squeeze(0)?.narrow(0, 0, n - 1)?.to_dtype(DType::F32)?; // (n-1, vocab)
    let log_probs = log_softmax(&predicting)?;
    let next_ids = Tensor::new(&span_ids[1..], logits.device())?.unsqueeze(1)?; // (n-1, 1)
    let picked: Vec<f32> = log_probs.gather(&next_ids, 1)?.squeeze(1)?.to_vec1()?;
    for (slot, log_prob) in surprisal[1..].iter_mut().zip(picked) {
        *slot = -log_prob;
    }
    Ok(surprisal)
}

fn log_softmax(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?;
    let shifted = xs.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}
