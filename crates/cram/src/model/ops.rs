//! Differentiable building blocks: candle ops that have a backward pass, or
//! custom ops that bring their own. Stock candle's fused `softmax_last_dim`, `rms_norm`, `rope*` and
//! `sdpa` have none: a gradient through them silently vanishes, and the
//! virtual embeddings would never move.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Div, Exp, ReduceOp, Sub};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

use rayon::prelude::*;

use crate::error::Result;

/// Softmax over the last dimension, with a backward pass.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    masked_softmax_last_dim(xs, None)
}

/// Softmax over the last dimension of `scores + mask`, with a backward pass.
/// `mask` is any shape that broadcasts to `scores` ((rows, columns) over
/// the leading dimensions, or one per batch row); it holds -inf where a
/// score is hidden and 0 or a finite logit bias elsewhere; every row must
/// keep one entry.
///
/// One op rather than a chain of candle ops: autograd then keeps only the
/// scores and the probabilities for the backward, not the masked, shifted
/// and exponentiated copies in between. On attention over a long cache
/// those copies were most of an optimization step's memory.
pub fn masked_softmax_last_dim(scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let mask = mask.map(|mask| mask.to_dtype(scores.dtype())).transpose()?;
    Ok(scores.apply_op1(MaskedSoftmax { mask })?)
}

/// The op behind [`masked_softmax_last_dim`]; the mask is a constant.
struct MaskedSoftmax {
    mask: Option<Tensor>,
}

impl MaskedSoftmax {
    /// The forward on whichever backend holds the storages, from candle's
    /// own storage-level kernels; the intermediates die inside the op.
    fn softmax<S: BackendStorage>(
        scores: &S,
        layout: &Layout,
        mask: Option<(&S, &Layout)>,
    ) -> candle_core::Result<(S, Shape)> {
        let shape = layout.shape().clone();
        let dense = Layout::contiguous(&shape);
        let masked;
        let (input, input_layout) = match mask {
            Some((mask, mask_layout)) => {
                masked = scores.binary_impl::<Add>(mask, layout, &mask_layout.broadcast_as(&shape)?)?;
                (&masked, &dense)
            }
            None => (scores, layout),
        };
        let last = shape.rank() - 1;
        let mut row_dims = shape.dims().to_vec();
        row_dims[last] = 1;
        let per_row = Layout::contiguous(row_dims.as_slice()).broadcast_as(&shape)?;
        let row_max = input.reduce_op(ReduceOp::Max, input_layout, &[last])?;
        let exp = input.binary_impl::<Sub>(&row_max, input_layout, &per_row)?.unary_impl::<Exp>(&dense)?;
        let row_sum = exp.reduce_op(ReduceOp::Sum, &dense, &[last])?;
        Ok((exp.binary_impl::<Div>(&row_sum, &dense, &per_row)?, shape))
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    /// On the CPU the mask is added in one pass, then each row's max, exp,
    /// sum and division run fused on one thread per row block
    /// ([`softmax_rows`]): the storage-level chain of [`Self::softmax`]
    /// makes four more passes over the scores, single-threaded each.
    fn cpu_fwd(&self, scores: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        let dense = Layout::contiguous(&shape);
        // Scores plus mask, or the scores themselves when dense; else a dense copy.
        let input = match &self.mask {
            Some(mask) => {
                let (storage, mask_layout) = mask.storage_and_layout();
                let Storage::Cpu(mask) = &*storage else { candle_core::bail!("masked-softmax: scores on cpu, mask elsewhere") };
                Some(scores.binary_impl::<Add>(mask, layout, &mask_layout.broadcast_as(&shape)?)?)
            }
            None if layout.is_contiguous() && layout.start_offset() == 0 => None,
            None => Some(scores.affine(layout, 1.0, 0.0)?),
        };
        let row_length = shape.dims().last().copied().unwrap_or(1);
        let probabilities = match input.as_ref().unwrap_or(scores) {
            CpuStorage::F32(rows) => CpuStorage::F32(softmax_rows(&rows[..shape.elem_count()], row_length)),
            CpuStorage::F64(rows) => CpuStorage::F64(softmax_rows(&rows[..shape.elem_count()], row_length)),
            other => return Self::softmax(other, &dense, None),
        };
        Ok((probabilities, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        scores: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let Some(mask) = &self.mask else { return Self::softmax(scores, layout, None) };
        let (storage, mask_layout) = mask.storage_and_layout();
        match &*storage {
            Storage::Cuda(mask) => Self::softmax(scores, layout, Some((mask, mask_layout))),
            _ => candle_core::bail!("masked-softmax: scores on cuda, mask elsewhere"),
        }
    }

    /// dL/dx = p * (g - sum(g * p)) along each row, from the output alone.
    fn bwd(&self, _scores: &Tensor, probabilities: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let along_row = (grad * probabilities)?.sum_keepdim(D::Minus1)?;
        Ok(Some(probabilities.mul(&grad.broadcast_sub(&along_row)?)?))
    }
}

/// Softmax of each `row_length` row of dense `scores`, rows in parallel:
/// one read of the scores and one write, where separate max, subtract,
/// exp, sum and divide ops would make five passes.
fn softmax_rows<T: num_traits::Float + Send + Sync>(scores: &[T], row_length: usize) -> Vec<T> {
    let mut probabilities = vec![T::zero(); scores.len()];
    if row_length == 0 {
        return probabilities;
    }
    probabilities.par_chunks_mut(row_length).zip(scores.par_chunks(row_length)).for_each(|(out, row)| {
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for (p, &x) in out.iter_mut().zip(row) {
            *p = (x - max).exp();
            sum = sum + *p;
        }
        out.iter_mut().for_each(|p| *p = *p / sum);
    });
    probabilities
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
        let threads = candle_core::utils::get_num_threads();
        let ys = if rows == 1 && threads > 1 && flat.device().is_cpu() {
            self.row_split_product(&flat, weight_grad, threads)?
        } else {
            product(&flat, &self.weight, weight_grad)?
        };
        let ys = match &self.bias {
            Some(bias) => ys.broadcast_add(bias)?,
            None => ys,
        };
        leading_dims.push(out_features);
        Ok(ys.reshape(leading_dims)?)
    }
}

impl Linear {
    /// One row times `W^T` on the CPU, `W`'s rows split across `threads`:
    /// the matrix-vector product a decoding step runs is memory-bound, and
    /// the matmul kernel runs it on one thread. Each output is the same dot
    /// product either way (bit for bit), and the pieces are views of `W`,
    /// so gradients flow as through one product.
    /// flat (1, in) -> (1, out)
    fn row_split_product(&self, flat: &Tensor, weight_grad: WeightGrad, threads: usize) -> Result<Tensor> {
        let out_features = self.weight.dim(0)?;
        let rows_per_piece = out_features.div_ceil(threads);
        let pieces: Vec<Tensor> = (0..out_features)
            .step_by(rows_per_piece)
            .map(|first| Ok(self.weight.narrow(0, first, rows_per_piece.min(out_features - first))?))
            .collect::<Result<_>>()?;
        let products: Vec<Tensor> = pieces.par_iter().map(|piece| product(flat, piece, weight_grad)).collect::<Result<_>>()?;
        Ok(Tensor::cat(&products, 1)?)
    }
}

/// flat (m, in) @ weight^T (in, out) -> (m, out); with `WeightGrad::Skip`
/// the weight is held outside the graph.
fn product(flat: &Tensor, weight: &Tensor, weight_grad: WeightGrad) -> Result<Tensor> {
    Ok(match weight_grad {
        WeightGrad::Skip => flat.apply_op1(FrozenMatmul { weight: weight.clone() })?,
        WeightGrad::Compute => flat.matmul(&weight.t()?)?,
    })
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{masked_softmax_last_dim, Linear, WeightGrad};

    /// Each row's softmax of scores plus mask, counted by hand in f64.
    fn softmax_by_hand(scores: &[Vec<f64>], mask: &[Vec<f64>]) -> Vec<Vec<f64>> {
        scores
            .iter()
            .zip(mask.iter().cycle())
            .map(|(row, mask_row)| {
                let shifted: Vec<f64> = row.iter().zip(mask_row).map(|(x, m)| x + m).collect();
                let max = shifted.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = shifted.iter().map(|x| (x - max).exp()).sum();
                shifted.iter().map(|x| (x - max).exp() / total).collect()
            })
            .collect()
    }

    /// The CPU's fused rows against a count by hand: f32 and f64 (and bf16,
    /// which takes the storage-level path), a mask broadcast over the
    /// leading dimension with -inf and finite biases, no mask, and scores
    /// that are a strided view (transposed) or start at an offset (narrowed).
    #[test]
    fn the_fused_cpu_softmax_is_each_rows_softmax() {
        let device = Device::Cpu;
        let samples: Vec<f64> = crate::rng::normal_samples(11, 2 * 6 * 7).iter().map(|&x| 3.0 * x as f64).collect();
        let scores = Tensor::from_vec(samples, (2, 6, 7), &device).unwrap();
        let mut mask = vec![vec![0.0; 7]; 5];
        mask[0][3] = f64::NEG_INFINITY;
        mask[2] = vec![f64::NEG_INFINITY, 1.5, -0.5, 0.0, f64::NEG_INFINITY, 2.0, 0.0];
        let by_row = |t: &Tensor| t.flatten_to(1).unwrap().to_vec2::<f64>().unwrap();
        let mask_tensor = Tensor::new(mask.clone(), &device).unwrap();
        let no_mask = vec![vec![0.0; 7]];
        let narrowed = scores.narrow(1, 1, 5).unwrap(); // (2, 5, 7), starting one row in
        let transposed = scores.narrow(2, 0, 6).unwrap().transpose(1, 2).unwrap(); // (2, 6, 6), strided
        let dense = |t: &Tensor| by_row(&t.contiguous().unwrap());
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 2e-2)] {
            let typed = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let cases = [
                (masked_softmax_last_dim(&typed(&narrowed), Some(&mask_tensor)).unwrap(), softmax_by_hand(&dense(&narrowed), &mask)),
                (masked_softmax_last_dim(&typed(&scores), None).unwrap(), softmax_by_hand(&dense(&scores), &no_mask)),
                (masked_softmax_last_dim(&typed(&transposed), None).unwrap(), softmax_by_hand(&dense(&transposed), &[vec![0.0; 6]])),
                (masked_softmax_last_dim(&typed(&transposed).narrow(1, 1, 5).unwrap(), Some(&mask_tensor.narrow(1, 0, 6).unwrap())).unwrap(), {
                    softmax_by_hand(&dense(&transposed.narrow(1, 1, 5).unwrap()), &mask.iter().map(|row| row[..6].to_vec()).collect::<Vec<_>>())
                }),
            ];
            for (case, (ours, expected)) in cases.iter().enumerate() {
                let ours = by_row(&ours.to_dtype(DType::F64).unwrap());
                assert_eq!(ours.len(), expected.len());
                for (row, expected_row) in ours.iter().zip(expected) {
                    for (p, q) in row.iter().zip(expected_row) {
                        assert!((p - q).abs() <= tolerance, "{dtype:?}, case {case}: {p} against {q}");
                    }
                }
            }
        }
    }

    /// The split product against one plain matmul over the whole weight:
    /// same numbers bit for bit, and the same input gradient, for a row
    /// count the pieces do not divide evenly.
    #[test]
    fn a_row_split_product_equals_one_matmul() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (101, 37), &device).unwrap();
        let xs = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 37), &device).unwrap()).unwrap();
        let reference = xs.matmul(&weight.t().unwrap()).unwrap();
        let reference_grad = reference.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let linear = Linear::new(weight, None);
        for weight_grad in [WeightGrad::Skip, WeightGrad::Compute] {
            for threads in [2, 3, 7] {
                let split = linear.row_split_product(&xs, weight_grad, threads).unwrap();
                let difference = (&split - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(difference, 0.0, "{weight_grad:?}, {threads} threads");
                let grads = split.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let (ours, theirs) = (grads.get(&xs).unwrap(), reference_grad.get(&xs).unwrap());
                // The pieces' gradients are summed in another order: equal to rounding.
                let gap = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(gap <= 1e-5 * scale, "{weight_grad:?}, {threads} threads: input gradients differ by {gap} (largest {scale})");
            }
        }
    }
}
