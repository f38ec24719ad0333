//! Where a forward's new tokens sit: their RoPE tables and their attention
//! mask, prepared once for many forwards.

use candle_core::Tensor;

use super::rope::Rotation;

/// Where a forward's new tokens sit: made by [`super::Qwen2::placement`].
#[derive(Debug, Clone)]
pub struct Placement {
    pub(super) rotation: Rotation,
    /// (n_new, cached + n_new) in the softmax dtype, or (batch, 1, 1, 1,
    /// cached + 1) for rows decoded together; None for one token.
    pub(super) mask: Option<Tensor>,
    pub(super) n_new: usize,
    pub(super) cached: usize,
}
