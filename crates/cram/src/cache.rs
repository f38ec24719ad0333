//! The KV cache a compressed context lives in: per layer K (post-RoPE) and V,
//! plus the logical position every entry sits at. Physical length (entries)
//! and logical positions are separate on purpose: a compressed span holds
//! fewer entries than the positions it covers.

use candle_core::Tensor;

use crate::{Error, Result};

/// Per-layer keys and values of a batch-1 sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer, (1, kv_heads, len, head_dim), RoPE applied.
    keys: Vec<Tensor>,
    /// Per layer, (1, kv_heads, len, head_dim).
    values: Vec<Tensor>,
    /// (len): the RoPE position of each entry.
    positions: Vec<f32>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries (physical length).
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Layers held (0 while empty).
    pub fn num_layers(&self) -> usize {
        self.keys.len()
    }

    /// The position of every entry, in cache order.
    pub fn positions(&self) -> &[f32] {
        &self.positions
    }

    /// The position after the last entry: where a continuation starts.
    pub fn next_position(&self) -> f32 {
        self.positions.last().map_or(0.0, |last| last.floor() + 1.0)
    }

    /// Keys and values of one layer, if the cache holds any.
    pub fn layer(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        Some((self.keys.get(index)?, self.values.get(index)?))
    }

    /// Appends per-layer keys and values (1, kv_heads, n, head_dim) of `n`
    /// entries at `positions`. They are detached: a cache never holds a graph.
    pub fn append(&mut self, keys: &[Tensor], values: &[Tensor], positions: &[f32]) -> Result<()> {
        if keys.len() != values.len() || (!self.is_empty() && keys.len() != self.num_layers()) {
            return Err(Error::Invalid(format!(
                "appending {} key and {} value layers to a cache of {} layers",
                keys.len(),
                values.len(),
                self.num_layers()
            )));
        }
        for (key, value) in keys.iter().zip(values) {
            let (batch, _, n, _) = key.dims4()?;
            if batch != 1 || n != positions.len() || value.dims() != key.dims() {
                return Err(Error::Invalid(format!(
                    "cache entries must be (1, kv_heads, {}, head_dim), got K {:?} V {:?}",
                    positions.len(),
                    key.dims(),
                    value.dims()
                )));
            }
        }
        if self.is_empty() {
            self.keys = keys.iter().map(Tensor::detach).collect();
            self.values = values.iter().map(Tensor::detach).collect();
        } else {
            for (held, new) in self.keys.iter_mut().zip(keys) {
                *held = Tensor::cat(&[&*held, &new.detach()], 2)?;
            }
            for (held, new) in self.values.iter_mut().zip(values) {
                *held = Tensor::cat(&[&*held, &new.detach()], 2)?;
            }
        }
        self.positions.extend_from_slice(positions);
        Ok(())
    }
}
