//! The KV cache a compressed context lives in: per layer K (post-RoPE) and V,
//! plus the logical position every entry sits at. Physical length (entries)
//! and logical positions are separate on purpose: a compressed span holds
//! fewer entries than the positions it covers, and a dropped span none, so
//! the cache also keeps the position the next token goes to.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Per-layer keys and values of a batch-1 sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer, (1, kv_heads, len, head_dim), RoPE applied.
    keys: Vec<Tensor>,
    /// Per layer, (1, kv_heads, len, head_dim).
    values: Vec<Tensor>,
    /// (len): the RoPE position of each entry.
    positions: Vec<f32>,
    /// Per layer, (1, kv_heads, len) f32: a logit bias per entry and KV
    /// head, added to the scaled scores of every query head of the group
    /// (fitted by attention matching); `None` while every bias is 0, so a
    /// cache of ordinary tokens computes exactly as it would without.
    biases: Option<Vec<Tensor>>,
    /// Where a continuation starts: after every position the cache has
    /// covered, entries or not (a span dropped or evicted to fewer entries
    /// still took its positions).
    next_position: f32,
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

    /// Whether the cache holds no entries.
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

    /// Where a continuation starts: after the last position the cache
    /// covers, including spans that left fewer entries than positions.
    pub fn next_position(&self) -> f32 {
        self.next_position
    }

    /// Moves the next position to `position` if it is further on: what a
    /// span that took positions without keeping entries for all of them does.
    pub fn advance_to(&mut self, position: f32) {
        self.next_position = self.next_position.max(position);
    }

    /// Keys and values of one layer, if the cache holds any.
    pub fn layer(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        Some((self.keys.get(index)?, self.values.get(index)?))
    }

    /// A cache from per-layer keys and values (1, kv_heads, len, head_dim)
    /// and the position of each entry: how caller code hands over a cache
    /// it built or loaded itself.
    pub fn from_parts(keys: Vec<Tensor>, values: Vec<Tensor>, positions: Vec<f32>) -> Result<Self> {
        let mut cache = Self::new();
        cache.append(&keys, &values, &positions)?;
        Ok(cache)
    }

    /// Per layer, (1, kv_heads, len) f32: the entries' logit biases, if any is not 0.
    pub fn biases(&self) -> Option<&[Tensor]> {
        self.biases.as_deref()
    }

    /// Keys of every layer, (1, kv_heads, len, head_dim) each.
    pub fn keys(&self) -> &[Tensor] {
        &self.keys
    }

    /// Values of every layer, (1, kv_heads, len, head_dim) each.
    pub fn values(&self) -> &[Tensor] {
        &self.values
    }

    /// Appends per-layer keys and values (1, kv_heads, n, head_dim) of `n`
    /// entries at `positions`. They are detached: a cache never holds a graph.
    /// Appending no entries (a span dropped whole) changes nothing.
    pub fn append(&mut self, keys: &[Tensor], values: &[Tensor], positions: &[f32]) -> Result<()> {
        self.append_biased(keys, values, None, positions)
    }

    /// [`KvCache::append`] with a logit bias per entry and KV head: per
    /// layer (1, kv_heads, n) f32; `None` is 0.
    pub fn append_biased(&mut self, keys: &[Tensor], values: &[Tensor], biases: Option<&[Tensor]>, positions: &[f32]) -> Result<()> {
        if positions.is_empty() && keys.iter().chain(values).all(|t| t.dims().get(2) == Some(&0)) {
            return Ok(());
        }
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
        if let Some(biases) = biases {
            if biases.len() != keys.len() || biases.iter().zip(keys).any(|(b, k)| b.dims() != &k.dims()[..3]) {
                return Err(Error::Invalid("biases must be (1, kv_heads, n) per layer, like the keys".into()));
            }
        }
        self.append_biases(keys, biases)?;
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
        if let Some(last) = positions.iter().copied().reduce(f32::max) {
            self.advance_to(last.floor() + 1.0);
        }
        Ok(())
    }
}

impl KvCache {
    /// Extends the biases by those of `n` new entries (zeros when `None`),
    /// first giving the held entries zeros if the cache had none.
    fn append_biases(&mut self, keys: &[Tensor], biases: Option<&[Tensor]>) -> Result<()> {
        let zeros = |key: &Tensor| -> Result<Tensor> {
            let (_, kv_heads, n, _) = key.dims4()?;
            Ok(Tensor::zeros((1, kv_heads, n), DType::F32, key.device())?)
        };
        if self.biases.is_none() && biases.is_none() {
            return Ok(());
        }
        let held = match self.biases.take() {
            Some(held) => held,
            None if self.is_empty() => Vec::new(),
            None => self.keys.iter().map(zeros).collect::<Result<_>>()?,
        };
        let new: Vec<Tensor> = match biases {
            Some(biases) => biases.iter().map(|b| Ok(b.to_dtype(DType::F32)?.detach())).collect::<Result<_>>()?,
            None => keys.iter().map(zeros).collect::<Result<_>>()?,
        };
        self.biases = Some(if held.is_empty() { new } else { held.iter().zip(&new).map(|(h, n)| Ok(Tensor::cat(&[h, n], 2)?)).collect::<Result<_>>()? });
        Ok(())
    }
}

/// Tensor names in a saved cache file: `keys.{layer}`, `values.{layer}`,
/// `biases.{layer}` (only when some bias is not 0), `positions`.
const POSITIONS: &str = "positions";
/// The header key of the next position.
const NEXT_POSITION_KEY: &str = "next_position";

impl KvCache {
    /// Writes the cache as a safetensors file any candle (or numpy) code can
    /// read: `keys.{layer}` and `values.{layer}` (1, kv_heads, len,
    /// head_dim), `positions` (len) in f32, and `metadata` in the header,
    /// with the next position under `next_position`.
    pub fn save(&self, path: &Path, mut metadata: HashMap<String, String>) -> Result<()> {
        metadata.insert(NEXT_POSITION_KEY.into(), self.next_position.to_string());
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.num_layers() + 1);
        for (layer, (key, value)) in self.keys.iter().zip(&self.values).enumerate() {
            tensors.push((format!("keys.{layer}"), key.contiguous()?));
            tensors.push((format!("values.{layer}"), value.contiguous()?));
        }
        for (layer, bias) in self.biases.iter().flatten().enumerate() {
            tensors.push((format!("biases.{layer}"), bias.contiguous()?));
        }
        tensors.push((POSITIONS.into(), Tensor::new(self.positions.as_slice(), &Device::Cpu)?));
        safetensors::serialize_to_file(tensors, Some(metadata), path)
            .map_err(|e| Error::Invalid(format!("writing cache {}: {e}", path.display())))
    }

    /// Reads a file written by [`KvCache::save`] onto `device`, keys and
    /// values in `dtype` (a cache saved from bf16 GPU weights loads into an
    /// f32 CPU model); returns the cache and the header's metadata.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<(Self, HashMap<String, String>)> {
        if !path.exists() {
            return Err(Error::MissingFile(path.to_path_buf()));
        }
        let bad = |reason: String| Error::Invalid(format!("cache file {}: {reason}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        let positions = tensors.remove(POSITIONS).ok_or_else(|| bad("no `positions` tensor".into()))?.to_vec1::<f32>()?;
        let layers = tensors.keys().filter(|name| name.starts_with("keys.")).count();
        let mut take = |name: String| -> Result<Tensor> {
            Ok(tensors.remove(&name).ok_or_else(|| bad(format!("no `{name}` tensor")))?.to_dtype(dtype)?)
        };
        let keys = (0..layers).map(|layer| take(format!("keys.{layer}"))).collect::<Result<Vec<_>>>()?;
        let values = (0..layers).map(|layer| take(format!("values.{layer}"))).collect::<Result<Vec<_>>>()?;
        // A file without biases (all 0, or older than biases) loads with none.
        let biases = (0..layers).map(|layer| tensors.remove(&format!("biases.{layer}"))).collect::<Option<Vec<_>>>();
        let biases = biases.map(|b| b.iter().map(|t| Ok(t.to_dtype(DType::F32)?)).collect::<Result<Vec<_>>>()).transpose()?;
        let mut cache = Self::new();
        cache.append_biased(&keys, &values, biases.as_deref(), &positions)?;
        // Files written before the key existed continue after their last entry.
        if let Some(next) = metadata.get(NEXT_POSITION_KEY) {
            cache.advance_to(next.parse().map_err(|_| bad(format!("`{NEXT_POSITION_KEY}` {next} is not a number")))?);
        }
        Ok((cache, metadata))
    }
}

/// The entries at `indices` of per-layer (1, kv_heads, len, head_dim) tensors.
pub(crate) fn select_entries(per_layer: &[Tensor], indices: &[usize]) -> Result<Vec<Tensor>> {
    let Some(first) = per_layer.first() else { return Ok(Vec::new()) };
    let ids = Tensor::new(indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), first.device())?;
    per_layer.iter().map(|t| Ok(t.index_select(&ids, 2)?)).collect()
}
