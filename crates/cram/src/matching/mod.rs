//! Compaction by attention matching: per layer and KV head, keep some of
//! the span's entries, and fit their biases and values so that reference
//! queries ([`queries`]) see the same attention as over the whole span
//! ([`fit`]). KVzip's eviction shares the queries and the per-head
//! selection. This module turns per-head choices into cache entries.

pub mod budgets;
pub mod fit;
pub mod queries;

use candle_core::{DType, Tensor};
use nalgebra::DMatrix;

use crate::compressor::CompressedSpan;
use crate::error::{Error, Result};
use crate::span::SpanTargets;

/// What one KV head of one layer keeps of the span.
#[derive(Debug, Clone)]
pub struct HeadChoice {
    /// Indices of the kept span entries, ascending.
    pub kept: Vec<usize>,
    /// (t, d): values that replace the kept entries' own; `None` keeps them.
    pub values: Option<DMatrix<f64>>,
    /// (t): the kept entries' logit biases; `None` is 0.
    pub biases: Option<Vec<f64>>,
}

impl From<&fit::HeadFit> for HeadChoice {
    /// The fit's kept entries with its values and biases.
    fn from(fit: &fit::HeadFit) -> Self {
        Self { kept: fit.kept.clone(), values: Some(fit.values.clone()), biases: Some(fit.biases.clone()) }
    }
}

/// The heads' mean relative output error on their reference queries (0
/// for none): a compaction's `fit_error`.
pub fn mean_error(errors: &[f64]) -> f64 {
    errors.iter().sum::<f64>() / errors.len().max(1) as f64
}

/// One head's slice of per-layer (1, kv_heads, n, d) span tensors, as an
/// (n, d) f64 matrix.
pub fn head_matrix(per_layer: &Tensor, head: usize) -> Result<DMatrix<f64>> {
    let head = per_layer.narrow(1, head, 1)?.squeeze(0)?.squeeze(0)?.to_dtype(DType::F64)?;
    let (rows, cols) = head.dims2()?;
    Ok(DMatrix::from_row_slice(rows, cols, &head.flatten_all()?.to_vec1::<f64>()?))
}

/// An (rows, d) f64 matrix as one head's (1, 1, rows, d) tensor in `dtype`.
pub fn head_tensor(matrix: &DMatrix<f64>, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let row_major: Vec<f32> = matrix.transpose().iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(row_major, (1, 1, matrix.nrows(), matrix.ncols()), device)?.to_dtype(dtype)?)
}

/// The cache entries of per-layer, per-head choices (`choices[layer][head]`).
/// Keys keep their original RoPE. Heads may keep different numbers of
/// entries (non-uniform budgets): every head is padded to the most any
/// head keeps with zero keys and values under a bias of minus infinity,
/// which no query attends to; the report's `n_kept` is then the mean
/// number of real entries per head. Heads keep different tokens, so the
/// entries' positions are those of the fullest head of layer 0 (padded
/// with the span's last): labels, since RoPE is already applied.
pub fn compacted(method: String, span: &SpanTargets, choices: &[Vec<HeadChoice>]) -> Result<CompressedSpan> {
    let slots = choices.iter().flatten().map(|choice| choice.kept.len()).max().unwrap_or(0);
    let uniform = choices.iter().flatten().all(|choice| choice.kept.len() == slots);
    let (mut keys, mut values, mut biases) = (Vec::with_capacity(choices.len()), Vec::with_capacity(choices.len()), Vec::with_capacity(choices.len()));
    for (layer, heads) in choices.iter().enumerate() {
        let (layer_keys, layer_values, layer_biases) = layer_entries(span, layer, heads, slots)?;
        keys.push(layer_keys);
        values.push(layer_values);
        biases.push(layer_biases);
    }
    let fullest = choices[0].iter().max_by_key(|choice| choice.kept.len()).ok_or_else(|| Error::Invalid("no head to compact".into()))?;
    let last = *span.positions.last().ok_or_else(|| Error::Invalid("an empty span".into()))?;
    let positions = (0..slots).map(|slot| fullest.kept.get(slot).map_or(last, |&i| span.positions[i])).collect();
    let mut compressed = CompressedSpan::new(method, span, keys, values, positions);
    if !uniform || choices.iter().flatten().any(|choice| choice.biases.is_some()) {
        compressed.biases = Some(biases);
    }
    let heads = choices.iter().map(Vec::len).sum::<usize>().max(1);
    compressed.report.n_kept = choices.iter().flatten().map(|choice| choice.kept.len()).sum::<usize>() / heads;
    Ok(compressed)
}

/// One layer's compacted entries from its heads' choices, each head padded
/// to `slots`: keys and values (1, kv_heads, slots, d), biases (1,
/// kv_heads, slots) f32 (minus infinity on padding).
pub fn layer_entries(span: &SpanTargets, layer: usize, heads: &[HeadChoice], slots: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (span_keys, span_values) = (&span.keys[layer], &span.values[layer]);
    let device = span_keys.device();
    let mut layer_keys = Vec::with_capacity(heads.len());
    let mut layer_values = Vec::with_capacity(heads.len());
    let mut layer_biases = Vec::with_capacity(heads.len() * slots);
    for (head, choice) in heads.iter().enumerate() {
        let ids = Tensor::new(choice.kept.iter().map(|&i| i as u32).collect::<Vec<_>>(), device)?;
        let head_values = match &choice.values {
            Some(fitted) => head_tensor(fitted, span_values.dtype(), device)?,
            None => span_values.narrow(1, head, 1)?.index_select(&ids, 2)?,
        };
        let padding = slots - choice.kept.len();
        layer_keys.push(padded(span_keys.narrow(1, head, 1)?.index_select(&ids, 2)?, padding)?);
        layer_values.push(padded(head_values, padding)?);
        layer_biases.extend(choice.biases.as_ref().map_or(vec![0.0f32; choice.kept.len()], |b| b.iter().map(|&x| x as f32).collect()));
        layer_biases.extend(std::iter::repeat_n(f32::NEG_INFINITY, padding));
    }
    Ok((Tensor::cat(&layer_keys, 1)?, Tensor::cat(&layer_values, 1)?, Tensor::from_vec(layer_biases, (1, heads.len(), slots), device)?))
}

/// (1, 1, t, d) -> (1, 1, t + padding, d), zeros after.
fn padded(entries: Tensor, padding: usize) -> Result<Tensor> {
    if padding == 0 {
        return Ok(entries);
    }
    let (_, _, _, head_dim) = entries.dims4()?;
    let zeros = Tensor::zeros((1, 1, padding, head_dim), entries.dtype(), entries.device())?;
    Ok(Tensor::cat(&[&entries, &zeros], 2)?)
}
