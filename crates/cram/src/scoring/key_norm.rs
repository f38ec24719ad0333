//! Key norm: an attention-free heuristic, low-norm keys draw attention.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::scorer::Scorer;
use crate::cache::KvCache;
use crate::model::Qwen2;
use crate::span::SpanTargets;
use crate::error::Result;

/// Keep the tokens whose keys have the smallest norm, per layer relative to
/// the layer's mean and summed over layers. Needs no attention at all.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyNorm {}

impl Scorer for KeyNorm {
    fn name(&self) -> String {
        "key-norm".into()
    }

    /// Minus each token's key norm (mean over KV heads), relative to its
    /// layer's mean, summed over layers. RoPE is a rotation, so rotated keys
    /// give the same norms.
    fn score(&self, _model: &Qwen2, _prefix: &KvCache, span: &SpanTargets, _budget: usize) -> Result<Vec<f32>> {
        let mut total = vec![0.0f32; span.len()];
        for key in &span.keys {
            // (1, kv_heads, n, head_dim) -> (n)
            let norms: Vec<f32> = key.to_dtype(DType::F32)?.sqr()?.sum(3)?.sqrt()?.mean(1)?.squeeze(0)?.to_vec1()?;
            let mean = norms.iter().sum::<f32>() / span.len() as f32;
            for (slot, norm) in total.iter_mut().zip(norms) {
                *slot -= if mean > 0.0 { norm / mean } else { 0.0 };
            }
        }
        Ok(total)
    }
}
