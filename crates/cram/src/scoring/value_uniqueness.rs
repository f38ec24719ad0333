//! V uniqueness: tokens whose Values differ most from their neighbours'.
//! The research notes found it a better pick of what to keep verbatim than
//! surprisal, which picks formatting and sub-word fragments.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::scorer::Scorer;
use crate::cache::KvCache;
use crate::model::Qwen2;
use crate::span::SpanTargets;
use crate::error::Result;

/// Per token, how far its Values are from its neighbours': at each layer
/// the mean distance to the previous and next token's V (all KV heads),
/// divided by that layer's mean so every layer counts alike, summed over layers.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueUniqueness {}

impl Scorer for ValueUniqueness {
    fn name(&self) -> String {
        "value-uniqueness".into()
    }

    fn score(&self, _model: &Qwen2, _prefix: &KvCache, span: &SpanTargets, _budget: usize) -> Result<Vec<f32>> {
        value_uniqueness(&span.values)
    }
}

/// values: per layer (1, kv_heads, n, head_dim) -> (n)
fn value_uniqueness(values: &[Tensor]) -> Result<Vec<f32>> {
    let n = values.first().map_or(Ok(0), |v| v.dim(2))?;
    let mut total = vec![0.0f32; n];
    if n < 2 {
        return Ok(total);
    }
    for value in values {
        let per_token = value.to_dtype(DType::F32)?.squeeze(0)?.transpose(0, 1)?.flatten_from(1)?; // (n, kv * d)
        let steps = (per_token.narrow(0, 1, n - 1)? - per_token.narrow(0, 0, n - 1)?)?;
        let gaps: Vec<f32> = steps.sqr()?.sum(1)?.sqrt()?.to_vec1()?; // gaps[i]: between tokens i and i + 1
        let layer: Vec<f32> = (0..n)
            .map(|i| {
                let neighbours: Vec<f32> = [i.checked_sub(1).map(|j| gaps[j]), gaps.get(i).copied()].into_iter().flatten().collect();
                neighbours.iter().sum::<f32>() / neighbours.len() as f32
            })
            .collect();
        let mean = layer.iter().sum::<f32>() / n as f32;
        for (slot, u) in total.iter_mut().zip(layer) {
            *slot += if mean > 0.0 { u / mean } else { 0.0 };
        }
    }
    Ok(total)
}
