//! The entries of sequences decoded together after a cache they share:
//! each row's own (its prompt, then its answer so far), side by side. The
//! shared cache is not among them: [`super::Qwen2::forward_rows`] reads it
//! once for every row, so memory grows with the rows' own entries only.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Per layer (rows, kv_heads, entries, head_dim), each row's own entries
/// first and padding after them where it holds fewer than the longest row.
#[derive(Debug, Clone)]
pub struct RowEntries {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// (rows, entries) f32: 0 over a row's entries, -inf over its padding.
    padding: Tensor,
}

impl RowEntries {
    /// Stacked entries, per layer (rows, kv_heads, entries, head_dim), and
    /// the `padding` (rows, entries) f32 that masks what is not a row's own
    /// (0 where a row may attend, -inf where it may not).
    pub fn new(keys: Vec<Tensor>, values: Vec<Tensor>, padding: Tensor) -> Result<Self> {
        let (rows, entries) = padding.dims2()?;
        let fits = |tensor: &Tensor| tensor.dims4().is_ok_and(|(r, _, e, _)| r == rows && e == entries);
        if keys.len() != values.len() || !keys.iter().chain(&values).all(fits) {
            return Err(Error::Invalid(format!(
                "row entries: {} layers of keys and {} of values, each ({rows}, kv_heads, {entries}, head_dim) as the padding {:?} says",
                keys.len(),
                values.len(),
                padding.dims()
            )));
        }
        Ok(Self { keys, values, padding: padding.to_dtype(DType::F32)? })
    }

    /// Each row's own entries, per row and layer (1, kv_heads, n_i,
    /// head_dim) (a forward's keys and values for the row's prompt), padded
    /// with zeros to the longest row and stacked. At least one row, each
    /// with at least one entry and as many layers as the others.
    pub fn side_by_side(rows: &[(Vec<Tensor>, Vec<Tensor>)], device: &Device) -> Result<Self> {
        let held = |keys: &[Tensor]| keys.first().map_or(Ok(0), |layer| layer.dim(2));
        let lengths = rows.iter().map(|(keys, _)| held(keys)).collect::<candle_core::Result<Vec<_>>>()?;
        let entries = lengths.iter().copied().max().unwrap_or(0);
        let layers = rows.first().map_or(0, |(keys, _)| keys.len());
        if entries == 0 || lengths.contains(&0) || rows.iter().any(|(keys, values)| keys.len() != layers || values.len() != layers) {
            return Err(Error::Invalid(format!("rows decoded together need one entry or more each over {layers} layers; they hold {lengths:?}")));
        }
        let pad = |tensor: &Tensor| -> Result<Tensor> {
            let (batch, kv_heads, held, head_dim) = tensor.dims4()?;
            if held == entries {
                return Ok(tensor.clone());
            }
            let zeros = Tensor::zeros((batch, kv_heads, entries - held, head_dim), tensor.dtype(), tensor.device())?;
            Ok(Tensor::cat(&[tensor, &zeros], 2)?)
        };
        let stack = |layer: usize, part: fn(&(Vec<Tensor>, Vec<Tensor>)) -> &[Tensor]| -> Result<Tensor> {
            let padded = rows.iter().map(|row| pad(&part(row)[layer])).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&padded, 0)?)
        };
        let keys = (0..layers).map(|layer| stack(layer, |row| &row.0)).collect::<Result<Vec<_>>>()?;
        let values = (0..layers).map(|layer| stack(layer, |row| &row.1)).collect::<Result<Vec<_>>>()?;
        let padding: Vec<f32> =
            lengths.iter().flat_map(|&held| (0..entries).map(move |entry| if entry < held { 0.0 } else { f32::NEG_INFINITY })).collect();
        let padding = Tensor::from_vec(padding, (rows.len(), entries), device)?;
        Ok(Self { keys, values, padding })
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.padding.dims()[0]
    }

    /// Entries per row, padding included.
    pub fn len(&self) -> usize {
        self.padding.dims()[1]
    }

    /// Whether the rows hold no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layers held.
    pub fn layers(&self) -> usize {
        self.keys.len()
    }

    /// Layer `index`'s keys and values, (rows, kv_heads, entries, head_dim).
    pub fn layer(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        Some((self.keys.get(index)?, self.values.get(index)?))
    }

    /// (rows, entries) f32: 0 over a row's entries, -inf over its padding.
    pub fn padding(&self) -> &Tensor {
        &self.padding
    }

    /// Appends one entry per row: per layer (rows, kv_heads, 1, head_dim),
    /// as [`super::Qwen2::forward_rows`] returns them.
    pub fn append(&mut self, keys: &[Tensor], values: &[Tensor]) -> Result<()> {
        if keys.len() != self.keys.len() || values.len() != self.values.len() {
            return Err(Error::Invalid(format!("appending {} layers of keys to row entries of {}", keys.len(), self.keys.len())));
        }
        for (held, new) in self.keys.iter_mut().zip(keys).chain(self.values.iter_mut().zip(values)) {
            *held = Tensor::cat(&[&*held, &new.detach()], 2)?;
        }
        let own_column = Tensor::zeros((self.rows(), 1), DType::F32, self.padding.device())?;
        self.padding = Tensor::cat(&[&self.padding, &own_column], 1)?;
        Ok(())
    }

    /// Keeps the rows at `slots`, in that order.
    pub fn keep(&mut self, slots: &[usize]) -> Result<()> {
        let ids = Tensor::new(slots.iter().map(|&slot| slot as u32).collect::<Vec<_>>(), self.padding.device())?;
        for held in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *held = held.index_select(&ids, 0)?;
        }
        self.padding = self.padding.index_select(&ids, 0)?;
        Ok(())
    }
}
