//! The compression objective: how far the virtual tokens' Values (and,
//! optionally, their un-rotated Keys) are from their targets, at every layer.

use candle_core::{DType, Tensor};

use crate::cache::KvCache;
use crate::error::Result;

/// Σ over layers of MSE(x, target) / mean(target²), in f32: the published
/// loss on the Values, and the same form on the un-rotated Keys.
///
/// Normalising each layer by its target's mean square keeps layers whose
/// entries are large from drowning out the rest. `per_layer` and `targets`:
/// per layer, (batch, kv_heads, n_virtual, head_dim).
pub fn normalised_loss(per_layer: &[Tensor], targets: &[Tensor]) -> Result<Tensor> {
    let per_layer = per_layer
        .iter()
        .zip(targets)
        .map(|(x, target)| {
            let x = x.to_dtype(DType::F32)?;
            let target = target.to_dtype(DType::F32)?.detach();
            let target_power = target.sqr()?.mean_all()?;
            Ok((x - &target)?.sqr()?.mean_all()?.div(&target_power)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&per_layer, 0)?.sum_all()?)
}

/// The V term plus, when keys are matched, `key_weight` times the K term
/// (un-rotated keys against pooled un-rotated targets).
pub fn objective_loss(values: &[Tensor], value_targets: &[Tensor], keys: Option<(&[Tensor], &[Tensor], f64)>) -> Result<Tensor> {
    let value_term = normalised_loss(values, value_targets)?;
    match keys {
        None => Ok(value_term),
        Some((unrotated_keys, key_targets, key_weight)) => {
            Ok((value_term + (normalised_loss(unrotated_keys, key_targets)? * key_weight)?)?)
        }
    }
}

/// What the virtual tokens are fitted to: where they sit, after what, and
/// the Values (and optionally Keys) they must produce.
#[derive(Debug, Clone, Copy)]
pub struct Objective<'a> {
    /// The cache the virtual tokens follow.
    pub prefix: &'a KvCache,
    /// (n_virtual) positions.
    pub positions: &'a [f32],
    /// Per layer, (1, kv_heads, n_virtual, head_dim): the V targets.
    pub targets: &'a [Tensor],
    /// The K targets, for the K + V objective.
    pub keys: Option<KeyTargets<'a>>,
}

/// Keys to match: the virtual tokens' keys, un-rotated at their own
/// positions, against pooled un-rotated keys of the span.
#[derive(Debug, Clone, Copy)]
pub struct KeyTargets<'a> {
    /// Per layer, (1, kv_heads, n_virtual, head_dim) f32, RoPE undone.
    pub targets: &'a [Tensor],
    /// The K term's weight against the V term's 1.
    pub weight: f64,
}
