//! The blocks of a Qwen2 decoder, candle-style: each owns its frozen
//! weights, built by `new` from HF checkpoint names, and its `forward`.
//! Shapes: b batch, n new tokens, L cached + new entries, d head_dim.

use candle_core::{DType, Tensor};

use super::config::Qwen2Config;
use super::ops::{masked_softmax_last_dim, rms_norm, Linear, WeightGrad};
use super::placement::Placement;
use super::rope::Rotation;
use crate::error::{Error, Result};

/// Grouped-query self-attention's frozen projections.
#[derive(Debug, Clone)]
pub(super) struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// The projections of layer `prefix` (`model.layers.N`); Q, K and V carry biases.
    fn new(config: &Qwen2Config, prefix: &str, require: &mut impl FnMut(&str) -> Result<Tensor>) -> Result<Self> {
        let mut linear = |name: &str, bias: bool| -> Result<Linear> {
            let weight = require(&format!("{prefix}.self_attn.{name}.weight"))?;
            let bias = if bias { Some(require(&format!("{prefix}.self_attn.{name}.bias"))?) } else { None };
            Ok(Linear::new(weight, bias))
        };
        Ok(Self {
            q_proj: linear("q_proj", true)?,
            k_proj: linear("k_proj", true)?,
            v_proj: linear("v_proj", true)?,
            o_proj: linear("o_proj", false)?,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim(),
        })
    }

    /// normed (b, n, hidden) -> Q (b, heads, n, d), K and V (b, kv_heads, n, d), RoPE on Q and K.
    fn project(&self, normed: &Tensor, rotation: &Rotation, weight_grad: WeightGrad) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, n_new, _) = normed.dims3()?;
        let split_heads = |projected: Tensor, heads: usize| -> Result<Tensor> {
            Ok(projected.reshape((batch, n_new, heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let query = split_heads(self.q_proj.forward(normed, weight_grad)?, self.heads)?;
        let key = split_heads(self.k_proj.forward(normed, weight_grad)?, self.kv_heads)?;
        let value = split_heads(self.v_proj.forward(normed, weight_grad)?, self.kv_heads)?;
        Ok((rotation.apply(&query)?, rotation.apply(&key)?, value))
    }

    /// query (b, heads, n, d) -> (b, kv, groups * n, d), scaled by
    /// 1/sqrt(d): the query heads that share a KV head stacked along the
    /// sequence axis, so K/V are never copied per query head. Scaling the
    /// (small) query rather than the (large) scores.
    fn grouped_query(&self, query: &Tensor) -> Result<Tensor> {
        let (batch, _, n_new, _) = query.dims4()?;
        let groups = self.heads / self.kv_heads;
        Ok((query / (self.head_dim as f64).sqrt())?.reshape((batch, self.kv_heads, groups * n_new, self.head_dim))?)
    }

    /// Attention probabilities of query (b, heads, n, d) over what it
    /// attends to -> (b, kv, groups, n, L) in `softmax_dtype`.
    fn probabilities(&self, query: &Tensor, attended: &Attended, mask: Option<&Tensor>, softmax_dtype: DType) -> Result<Tensor> {
        let (batch, _, n_new, _) = query.dims4()?;
        let grouped_query = self.grouped_query(query)?;
        let scores = match attended {
            Attended::Joined { keys, .. } => grouped_query.matmul(&keys.t()?)?,
            Attended::AfterShared { shared_keys, own_keys, .. } => {
                let shared = unfold_rows(&fold_rows(&grouped_query)?.matmul(&shared_keys.t()?)?, batch)?;
                Tensor::cat(&[&shared, &grouped_query.matmul(&own_keys.t()?)?], 3)?
            }
        };
        let total = scores.dim(3)?;
        let scores = scores.to_dtype(softmax_dtype)?.reshape((batch, self.kv_heads, self.heads / self.kv_heads, n_new, total))?;
        masked_softmax_last_dim(&scores, mask)
    }

    /// probabilities (b, kv, groups, n, L) over what was attended -> the
    /// output projection of the weighted values, (b, n, hidden).
    fn forward(&self, probabilities: &Tensor, attended: &Attended, weight_grad: WeightGrad) -> Result<Tensor> {
        let (batch, kv_heads, groups, n_new, total) = probabilities.dims5()?;
        let grouped = |values: &Tensor| probabilities.to_dtype(values.dtype())?.reshape((batch, kv_heads, groups * n_new, total));
        let weighted = match attended {
            Attended::Joined { values, .. } => grouped(values)?.matmul(values)?, // (b, kv, groups * n, d)
            Attended::AfterShared { shared_values, own_values, .. } => {
                let grouped = grouped(own_values)?;
                let shared_len = shared_values.dim(2)?;
                let shared = unfold_rows(&fold_rows(&grouped.narrow(3, 0, shared_len)?)?.matmul(shared_values)?, batch)?;
                let own = grouped.narrow(3, shared_len, total - shared_len)?.contiguous()?.matmul(own_values)?;
                (shared + own)?
            }
        };
        let weighted = weighted.reshape((batch, self.heads, n_new, self.head_dim))?.transpose(1, 2)?;
        self.o_proj.forward(&weighted.reshape((batch, n_new, self.heads * self.head_dim))?, weight_grad)
    }
}

/// What a block's new tokens attend to, their own K/V last.
pub(super) enum Attended {
    /// Keys and values (b, kv, L, d), earlier entries and the new tokens' joined.
    Joined { keys: Tensor, values: Tensor },
    /// Keys and values every row shares, (1, kv, S, d), then each row's own
    /// (b, kv, L, d): rows decoded together after one cache read it once
    /// (the rows folded into the query axis), never a copy per row.
    AfterShared { shared_keys: Tensor, shared_values: Tensor, own_keys: Tensor, own_values: Tensor },
}

impl Attended {
    /// What the `before` entries and the new tokens' `key` and `value`
    /// (b, kv, n, d) give a batch of `batch` rows.
    fn new(before: &Before, key: Tensor, value: Tensor, batch: usize) -> Result<Self> {
        let after = |(keys, values): (&Tensor, &Tensor)| -> Result<(Tensor, Tensor)> {
            Ok((Tensor::cat(&[keys, &key], 2)?, Tensor::cat(&[values, &value], 2)?))
        };
        Ok(match (before.shared, before.own) {
            (Some((shared_keys, shared_values)), Some(own)) => {
                let (own_keys, own_values) = after(own)?;
                // The products read them directly (no join copies them any more).
                Self::AfterShared { shared_keys: shared_keys.contiguous()?, shared_values: shared_values.contiguous()?, own_keys, own_values }
            }
            (None, Some(own)) => {
                let (keys, values) = after(own)?;
                Self::Joined { keys, values }
            }
            (Some((keys, values)), None) => {
                let (keys, values) = after((&expand_batch(keys, batch)?, &expand_batch(values, batch)?))?;
                Self::Joined { keys, values }
            }
            (None, None) => Self::Joined { keys: key, values: value },
        })
    }
}

/// What a block's new tokens attend to before themselves.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Before<'a> {
    /// This layer's cached keys and values, (1, kv, S, d), seen by every row.
    pub(super) shared: Option<(&'a Tensor, &'a Tensor)>,
    /// Their logit biases, (1, kv, S) f32; `None` while all are 0.
    pub(super) bias: Option<&'a Tensor>,
    /// For rows decoded together, each row's own entries after the shared
    /// ones, (b, kv, M, d), masked by the placement.
    pub(super) own: Option<(&'a Tensor, &'a Tensor)>,
}

/// (b, kv, x, y) -> (1, kv, b * x, y): the rows stacked along the third
/// axis within each KV head, so one product against a (1, kv, ., .) tensor
/// serves every row.
fn fold_rows(tensor: &Tensor) -> Result<Tensor> {
    let (batch, kv_heads, x, y) = tensor.dims4()?;
    Ok(tensor.transpose(0, 1)?.reshape((1, kv_heads, batch * x, y))?)
}

/// Undoes [`fold_rows`]: (1, kv, b * x, y) -> (b, kv, x, y).
fn unfold_rows(tensor: &Tensor, batch: usize) -> Result<Tensor> {
    let (_, kv_heads, folded, y) = tensor.dims4()?;
    Ok(tensor.reshape((kv_heads, batch, folded / batch, y))?.transpose(0, 1)?)
}

/// The SwiGLU feed-forward block's frozen weights.
#[derive(Debug, Clone)]
pub(super) struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(prefix: &str, require: &mut impl FnMut(&str) -> Result<Tensor>) -> Result<Self> {
        let mut linear = |name: &str| -> Result<Linear> { Ok(Linear::new(require(&format!("{prefix}.mlp.{name}.weight"))?, None)) };
        Ok(Self { gate_proj: linear("gate_proj")?, up_proj: linear("up_proj")?, down_proj: linear("down_proj")? })
    }

    /// normed (b, n, hidden) -> (b, n, hidden)
    fn forward(&self, normed: &Tensor, weight_grad: WeightGrad) -> Result<Tensor> {
        let gate = self.gate_proj.forward(normed, weight_grad)?.silu()?;
        let up = self.up_proj.forward(normed, weight_grad)?;
        self.down_proj.forward(&(gate * up)?, weight_grad)
    }
}

/// One decoder block: RMS norm, attention, residual, RMS norm, MLP, residual.
#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    input_norm: Tensor,
    attention: Attention,
    post_attention_norm: Tensor,
    mlp: Mlp,
    rms_norm_eps: f64,
}

/// What one block computed for the new tokens.
pub(super) struct LayerOutput {
    /// (b, heads, n, d), RoPE applied.
    pub(super) query: Tensor,
    /// (b, kv_heads, n, d), RoPE applied.
    pub(super) key: Tensor,
    /// (b, kv_heads, n, d)
    pub(super) value: Tensor,
    /// (b, kv, groups, n, cached + n), when attention ran.
    pub(super) probabilities: Option<Tensor>,
    /// (b, n, hidden), when the whole block ran.
    pub(super) hidden_states: Option<Tensor>,
}

/// How far a block runs: the last layer of a forward often needs less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Depth {
    /// Up to the K/V projections.
    KeysAndValues,
    /// Up to the attention probabilities.
    Attention,
    /// The whole block.
    Full,
}

impl DecoderLayer {
    pub(super) fn new(config: &Qwen2Config, index: usize, require: &mut impl FnMut(&str) -> Result<Tensor>) -> Result<Self> {
        let prefix = format!("model.layers.{index}");
        Ok(Self {
            input_norm: require(&format!("{prefix}.input_layernorm.weight"))?,
            attention: Attention::new(config, &prefix, require)?,
            post_attention_norm: require(&format!("{prefix}.post_attention_layernorm.weight"))?,
            mlp: Mlp::new(&prefix, require)?,
            rms_norm_eps: config.rms_norm_eps,
        })
    }

    /// hidden_states (b, n, hidden) after what comes `before` them, up to `depth`.
    pub(super) fn forward(&self, hidden_states: &Tensor, placement: &Placement, before: Before, depth: Depth, exec: Exec) -> Result<LayerOutput> {
        let batch = hidden_states.dim(0)?;
        let normed = rms_norm(hidden_states, &self.input_norm, self.rms_norm_eps)?;
        let (query, key, value) = self.attention.project(&normed, &placement.rotation, exec.weight_grad)?;
        let mut output = LayerOutput { query: query.clone(), key: key.clone(), value: value.clone(), probabilities: None, hidden_states: None };
        if depth == Depth::KeysAndValues {
            return Ok(output);
        }
        let attended = Attended::new(&before, key, value, batch)?;
        let mask = match (before.bias, before.shared) {
            (Some(bias), Some((keys, _))) if bias.dim(2)? != keys.dim(2)? => {
                return Err(Error::Invalid(format!("{} logit biases for {} cached entries", bias.dim(2)?, keys.dim(2)?)));
            }
            (Some(bias), _) => Some(biased_mask(placement, bias, exec.softmax_dtype)?),
            (None, _) => placement.mask.clone(),
        };
        let probabilities = self.attention.probabilities(&query, &attended, mask.as_ref(), exec.softmax_dtype)?;
        if depth == Depth::Attention {
            output.probabilities = Some(probabilities);
            return Ok(output);
        }
        let attended = self.attention.forward(&probabilities, &attended, exec.weight_grad)?;
        output.probabilities = Some(probabilities);
        let hidden_states = (hidden_states + attended)?;
        let normed = rms_norm(&hidden_states, &self.post_attention_norm, self.rms_norm_eps)?;
        output.hidden_states = Some((&hidden_states + self.mlp.forward(&normed, exec.weight_grad)?)?);
        Ok(output)
    }
}

/// The placement's mask with the cached entries' logit biases added:
/// bias (1, kv, L) -> (1, kv, 1, n_new or 1, L + n_new), or (rows, kv, 1,
/// 1, L + M + 1) with the per-row mask of rows decoded together, broadcast
/// over the query heads of each KV head's group (the columns after the
/// biased entries, the rows' own and the new tokens', get 0).
fn biased_mask(placement: &Placement, bias: &Tensor, dtype: DType) -> Result<Tensor> {
    let (_, kv_heads, biased) = bias.dims3()?;
    let total = placement.cached + placement.n_new;
    let unbiased = total.checked_sub(biased).ok_or_else(|| Error::Invalid(format!("{biased} biases for {} cached entries", placement.cached)))?;
    let unbiased = Tensor::zeros((1, kv_heads, unbiased), bias.dtype(), bias.device())?;
    let bias = Tensor::cat(&[bias, &unbiased], 2)?.reshape((1, kv_heads, 1, 1, total))?.to_dtype(dtype)?;
    Ok(match &placement.mask {
        Some(mask) => bias.broadcast_add(mask)?,
        None => bias,
    })
}

/// How a forward executes, the same for every block.
#[derive(Debug, Clone, Copy)]
pub(super) struct Exec {
    pub(super) weight_grad: WeightGrad,
    pub(super) softmax_dtype: DType,
}

/// A cache tensor (1, kv, L, d) seen by a batch of `batch` sequences (as
/// it is for a batch of one).
fn expand_batch(cached: &Tensor, batch: usize) -> Result<Tensor> {
    if cached.dim(0)? == batch {
        return Ok(cached.clone());
    }
    let (_, kv_heads, len, head_dim) = cached.dims4()?;
    Ok(cached.broadcast_as((batch, kv_heads, len, head_dim))?.contiguous()?)
}
