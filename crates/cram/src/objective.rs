//! The compression objective: how far the virtual tokens' Values are from
//! their targets, at every layer.

use candle_core::{DType, Tensor};

use crate::Result;

/// Σ over layers of MSE(V_virtual, V_target) / mean(V_target²), in f32.
///
/// Normalising each layer by its target's mean square keeps layers whose
/// Values are large from drowning out the rest. `values` and `targets`:
/// per layer, (batch, kv_heads, n_virtual, head_dim).
pub fn value_loss(values: &[Tensor], targets: &[Tensor]) -> Result<Tensor> {
    let per_layer = values
        .iter()
        .zip(targets)
        .map(|(value, target)| {
            let value = value.to_dtype(DType::F32)?;
            let target = target.to_dtype(DType::F32)?.detach();
            let target_power = target.sqr()?.mean_all()?;
            Ok((value - &target)?.sqr()?.mean_all()?.div(&target_power)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&per_layer, 0)?.sum_all()?)
}
