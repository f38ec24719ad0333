//! Rotary position embedding at arbitrary (fractional) positions.
//!
//! Qwen2 rotates the two halves of each head (`rotate_half`, the GPT-NeoX
//! layout). Angles are computed on the host in f64 from float positions, so a
//! virtual token at position 17.4 gets exactly the rotation it should, and
//! the rotation itself is made of plain ops that backpropagate.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// cos and sin tables for a list of positions.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// (n, head_dim): the half-dimension angles repeated for both halves;
    /// (n, 1, 1, head_dim) after [`Rotation::one_per_row`].
    cos: Tensor,
    /// Shaped as `cos`.
    sin: Tensor,
}

impl Rotation {
    /// Tables for `positions` with base `theta` and head dimension `head_dim`.
    pub fn new(positions: &[f32], head_dim: usize, theta: f64, dtype: DType, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inverse_frequencies: Vec<f64> =
            (0..half).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for &position in positions {
            let angles = inverse_frequencies.iter().map(|f| position as f64 * f);
            let row_cos: Vec<f32> = angles.clone().map(|a| a.cos() as f32).collect();
            let row_sin: Vec<f32> = angles.map(|a| a.sin() as f32).collect();
            for _ in 0..2 {
                cos.extend_from_slice(&row_cos);
                sin.extend_from_slice(&row_sin);
            }
        }
        let shape = (positions.len(), head_dim);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    /// The tables as (n, 1, 1, head_dim): row i of a batch of n sequences
    /// of one new token each, (n, heads, 1, head_dim), turns by position i.
    pub fn one_per_row(self) -> Result<Self> {
        let (rows, head_dim) = self.cos.dims2()?;
        let per_row = |table: Tensor| table.reshape((rows, 1, 1, head_dim));
        Ok(Self { cos: per_row(self.cos)?, sin: per_row(self.sin)? })
    }

    /// Rotates x: (batch, heads, n, head_dim) by the table's n positions
    /// (or each of n rows of one token by its own, after `one_per_row`).
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let rotated = rotate_half(xs)?;
        Ok(xs.broadcast_mul(&self.cos)?.add(&rotated.broadcast_mul(&self.sin)?)?)
    }

    /// Undoes [`Rotation::apply`]: the rotation by the opposite angles
    /// (cos unchanged, sin negated). A key rotated at its position and
    /// un-rotated here is the key before RoPE, so keys at different
    /// positions can be compared and pooled.
    pub fn invert(&self, xs: &Tensor) -> Result<Tensor> {
        let rotated = rotate_half(xs)?;
        Ok(xs.broadcast_mul(&self.cos)?.sub(&rotated.broadcast_mul(&self.sin)?)?)
    }
}

/// (x1, x2) -> (-x2, x1) over the two halves of the last dimension.
fn rotate_half(xs: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let first = xs.narrow(D::Minus1, 0, half)?;
    let second = xs.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&second.neg()?, &first], D::Minus1)?)
}
