//! Step 2: pooling the span into `n_virtual` contiguous chunks. Each chunk's
//! target is a weighted mean of its tokens' Values; surprisal weights (softmax
//! within the chunk) pull the target toward the informative tokens, uniform
//! weights are the ablation.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How tokens are weighted inside a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// softmax(surprisal) within each chunk (the published recipe).
    Surprisal,
    /// Equal weights (the ablation).
    Uniform,
}

/// Chunk boundaries `linspace(0, n, n_virtual + 1)` truncated to integers,
/// computed as numpy does (`j * (n / k)`, last point exactly `n`) so the
/// chunks match the reference's: chunk j covers tokens
/// `bounds[j]..bounds[j + 1]`, never empty.
pub fn chunk_bounds(n_tokens: usize, n_virtual: usize) -> Result<Vec<usize>> {
    if n_virtual == 0 || n_virtual > n_tokens {
        return Err(Error::Invalid(format!("{n_virtual} virtual tokens for a span of {n_tokens} tokens")));
    }
    let step = n_tokens as f64 / n_virtual as f64;
    let mut bounds: Vec<usize> = (0..n_virtual).map(|j| (j as f64 * step) as usize).collect();
    bounds.push(n_tokens);
    Ok(bounds)
}

/// Chunk boundaries around `anchors` (ascending, distinct span token
/// indices): each token joins the chunk of its nearest anchor (the later
/// one on a tie), so virtual token j, sitting at anchor j, stands for the
/// tokens around it. Every chunk holds its anchor, so none is empty.
pub fn bounds_around(anchors: &[usize], n_tokens: usize) -> Result<Vec<usize>> {
    if anchors.is_empty() || anchors.windows(2).any(|pair| pair[0] >= pair[1]) || anchors[anchors.len() - 1] >= n_tokens {
        return Err(Error::Invalid(format!("anchors {anchors:?} are not ascending, distinct tokens of a {n_tokens}-token span")));
    }
    let mut bounds = vec![0];
    // Between anchors a < b, token i is nearer b when i - a >= b - i.
    bounds.extend(anchors.windows(2).map(|pair| pair[0] + (pair[1] - pair[0]).div_ceil(2)));
    bounds.push(n_tokens);
    Ok(bounds)
}

/// Each token's weight within its chunk; the weights of a chunk sum to 1.
pub fn token_weights(surprisal: &[f32], bounds: &[usize], pooling: Pooling) -> Vec<f32> {
    let mut weights = vec![0.0f32; surprisal.len()];
    for chunk in bounds.windows(2) {
        let (start, end) = (chunk[0], chunk[1]);
        let members = &surprisal[start..end];
        let unnormalised: Vec<f64> = match pooling {
            Pooling::Uniform => vec![1.0; members.len()],
            Pooling::Surprisal => {
                let max = members.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s)) as f64;
                members.iter().map(|&s| (s as f64 - max).exp()).collect()
            }
        };
        let total: f64 = unnormalised.iter().sum();
        for (slot, w) in weights[start..end].iter_mut().zip(unnormalised) {
            *slot = (w / total) as f32;
        }
    }
    weights
}

/// The pooling matrix (n_virtual, n): row j holds chunk j's token weights.
pub fn pooling_matrix(weights: &[f32], bounds: &[usize], device: &Device) -> Result<Tensor> {
    let n = weights.len();
    let n_virtual = bounds.len() - 1;
    let mut matrix = vec![0.0f32; n_virtual * n];
    for (j, chunk) in bounds.windows(2).enumerate() {
        for i in chunk[0]..chunk[1] {
            matrix[j * n + i] = weights[i];
        }
    }
    Ok(Tensor::from_vec(matrix, (n_virtual, n), device)?)
}

/// Applies a pooling matrix (n_virtual, n) along the token axis of
/// (1, kv_heads, n, head_dim) or (1, n, hidden) tensors, in f32 whatever
/// their dtype (bf16 weights would no longer sum to 1).
pub fn pool(matrix: &Tensor, per_token: &Tensor) -> Result<Tensor> {
    let matrix = matrix.to_dtype(DType::F32)?;
    let per_token = per_token.to_dtype(DType::F32)?;
    Ok(match per_token.rank() {
        4 => matrix.broadcast_matmul(&per_token)?,
        3 => matrix.unsqueeze(0)?.matmul(&per_token)?,
        rank => return Err(Error::Invalid(format!("cannot pool a rank-{rank} tensor"))),
    })
}
