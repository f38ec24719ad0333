//! The compression objective: how far the virtual tokens' Values (and,
//! optionally, their un-rotated Keys) are from their targets, at every layer.

use candle_core::{DType, Tensor};

use crate::Result;

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
