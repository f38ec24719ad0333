//! The trait every eviction policy implements, and what attention-based
//! policies share.

use std::fmt::Debug;

use candle_core::{DType, Tensor};

use crate::cache::KvCache;
use crate::model::Qwen2;
use crate::select::keep_top;
use crate::span::SpanTargets;
use crate::error::Result;

/// Scores a span's tokens for keeping (higher is kept first).
pub trait Scorer: Debug {
    /// A short name for reports (`snapkv`, `key-norm`, ...).
    fn name(&self) -> String;

    /// Refuses settings the policy cannot score with.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// (n): one score per span token, for a selection of `budget` of them
    /// (some policies, such as StreamingLLM's sinks, depend on it).
    fn score(&self, model: &Qwen2, prefix: &KvCache, span: &SpanTargets, budget: usize) -> Result<Vec<f32>>;

    /// Indices (ascending) of the `count` span tokens this policy keeps.
    fn keep(&self, model: &Qwen2, prefix: &KvCache, span: &SpanTargets, count: usize) -> Result<Vec<usize>> {
        if count == 0 || count > span.len() {
            return Err(crate::error::Error::Invalid(format!("cannot keep {count} of a span's {} tokens", span.len())));
        }
        Ok(keep_top(&self.score(model, prefix, span, count)?, count))
    }
}

/// Attention rows (per layer, (1, heads, observers, columns)) summed onto
/// the `count` columns from `first`, over layers, heads and observers:
/// the attention those columns receive.
pub(crate) fn attention_received(rows: &[Tensor], first: usize, count: usize) -> Result<Vec<f32>> {
    let mut total = Tensor::zeros(count, DType::F32, rows[0].device())?;
    for layer in rows {
        total = (total + layer.narrow(3, first, count)?.sum(2)?.sum(1)?.squeeze(0)?)?;
    }
    Ok(total.to_vec1()?)
}
