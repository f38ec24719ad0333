//! Differentiable building blocks made only of candle ops that have a backward
//! pass. Stock candle's fused `softmax_last_dim`, `rms_norm`, `rope*` and
//! `sdpa` have none: a gradient through them silently vanishes, and the
//! virtual embeddings would never move.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

use crate::Result;

/// Softmax over the last dimension, written out so that it backpropagates.
/// The row maximum is detached: softmax does not depend on it, and a detached
/// shift keeps its (zero) gradient out of the graph.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let row_max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&row_max)?.exp()?;
    let row_sum = exp.sum_keepdim(D::Minus1)?;
    Ok(exp.broadcast_div(&row_sum)?)
}

/// RMS normalisation over the last dimension, times a (frozen) gain.
/// Computed in at least f32 and cast back once before the gain, as HF's
/// Qwen2RMSNorm does: a bf16 mean of squares drifts.
pub fn rms_norm(xs: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let xs = xs.to_dtype(wide)?;
    let mean_square = xs.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_square + eps)?.sqrt()?.recip()?;
    Ok(xs.broadcast_mul(&inv_rms)?.to_dtype(dtype)?.broadcast_mul(gain)?)
}

/// How a linear layer treats its frozen weight in the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightGrad {
    /// The weight is a constant of a custom op whose backward returns only the
    /// input's gradient (the default: the model is frozen).
    #[default]
    Skip,
    /// A plain candle matmul: its backward also computes and keeps a
    /// weight-sized gradient for every linear layer, doubling memory. Kept to
    /// measure that cost in the benchmarks.
    Compute,
}

/// A linear layer `y = x W^T + b` over frozen weights.
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out_features, in_features)
    weight: Tensor,
    /// (out_features)
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` (out, in) and an optional `bias` (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The (out, in) weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// x: (..., in_features) -> (..., out_features)
    pub fn forward(&self, xs: &Tensor, weight_grad: WeightGrad) -> Result<Tensor> {
        let (out_features, in_features) = self.weight.dims2()?;
        let mut leading_dims = xs.dims().to_vec();
        leading_dims.pop();
        let rows: usize = leading_dims.iter().product();
        let flat = xs.contiguous()?.reshape((rows, in_features))?;
        let ys = match weight_grad {
            WeightGrad::Skip => flat.apply_op1(FrozenMatmul { weight: self.weight.clone() })?,
            WeightGrad::Compute => flat.matmul(&self.weight.t()?)?,
        };
        let ys = match &self.bias {
            Some(bias) => ys.broadcast_add(bias)?,
            None => ys,
        };
        leading_dims.push(out_features);
        Ok(ys.reshape(leading_dims)?)
    }
}

/// `x W^T` with `W` held inside the op: candle sees a one-input op, so its
/// backward computes the input's gradient `g W` and nothing for `W`.
struct FrozenMatmul {
    /// (out_features, in_features), contiguous.
    weight: Tensor,
}

impl FrozenMatmul {
    /// Runs `x (m, k) @ W^T (k, n)` on whichever backend holds the storages.
    fn matmul<S: BackendStorage>(
        &self,
        xs: &S,
        xs_layout: &Layout,
        weight: &S,
        weight_t_layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (m, k) = xs_layout.shape().dims2()?;
        let (n, _) = self.weight.dims2()?;
        let out = xs.matmul(weight, (1, m, n, k), xs_layout, weight_t_layout)?;
        Ok((out, Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let weight_t = self.weight.t()?;
        let (storage, weight_t_layout) = weight_t.storage_and_layout();
        match &*storage {
            Storage::Cpu(weight) => self.matmul(xs, layout, weight, weight_t_layout),
            _ => candle_core::bail!("frozen-matmul: input on cpu, weight elsewhere"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let weight_t = self.weight.t()?;
        let (storage, weight_t_layout) = weight_t.storage_and_layout();
        match &*storage {
            Storage::Cuda(weight) => self.matmul(xs, layout, weight, weight_t_layout),
            _ => candle_core::bail!("frozen-matmul: input on cuda, weight elsewhere"),
        }
    }

    fn bwd(&self, _xs: &Tensor, _ys: &Tensor, grad_ys: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy W: (m, n) @ (n, k) -> (m, k)
        Ok(Some(grad_ys.matmul(&self.weight)?))
    }
}
