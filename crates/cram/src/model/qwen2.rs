//! A Qwen2 decoder whose forward pass backpropagates to its input embeddings.
//!
//! Unlike candle-transformers' `qwen2`, the forward takes input embeddings
//! (not only token ids) at arbitrary float positions over an explicit
//! [`KvCache`], returns every layer's K (post-RoPE) and V for the new tokens,
//! and computes logits only when asked. Every op on the path has a backward
//! (see [`crate::ops`]); the frozen weights get no gradient buffers.

use candle_core::{DType, Device, Tensor, D};

use super::config::Qwen2Config;
use crate::cache::KvCache;
use crate::ops::{masked_softmax_last_dim, rms_norm, Linear, WeightGrad};
use crate::rope::Rotation;
use crate::{Error, Result};

/// Which logits a forward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: the last layer then stops right after its K/V projections,
    /// since nothing downstream of them is used.
    None,
    /// Only the last position's (for decoding).
    Last,
    /// Every position's (for surprisal).
    All,
}

/// What one forward returns for the `n` new tokens.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Per layer, (batch, kv_heads, n, head_dim), RoPE applied at the tokens' positions.
    pub keys: Vec<Tensor>,
    /// Per layer, (batch, kv_heads, n, head_dim); position-independent.
    pub values: Vec<Tensor>,
    /// (batch, n, vocab) for [`Logits::All`], (batch, 1, vocab) for [`Logits::Last`].
    pub logits: Option<Tensor>,
}

/// Where a forward's new tokens sit: made by [`Qwen2::placement`].
#[derive(Debug, Clone)]
pub struct Placement {
    rotation: Rotation,
    /// (n_new, cached + n_new) in the softmax dtype; None for one token.
    mask: Option<Tensor>,
    n_new: usize,
    cached: usize,
}

/// One decoder block's frozen weights.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_norm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// The frozen Qwen2 weights and the differentiable forward over them.
#[derive(Debug, Clone)]
pub struct Qwen2 {
    config: Qwen2Config,
    /// (vocab, hidden)
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Tensor,
    lm_head: Linear,
    weight_grad: WeightGrad,
    dtype: DType,
    device: Device,
}

impl Qwen2 {
    /// Builds the model from weights named as in HF checkpoints
    /// (`model.layers.0.self_attn.q_proj.weight`, ...). `fetch` returns
    /// `None` for a weight that is absent; only `lm_head.weight` may be
    /// (tied embeddings).
    pub fn from_named_weights(
        config: Qwen2Config,
        mut fetch: impl FnMut(&str) -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let mut require = |name: &str| fetch(name)?.ok_or_else(|| Error::MissingWeight(name.to_string()));
        let embed_tokens = require("model.embed_tokens.weight")?;
        let (vocab, hidden) = embed_tokens.dims2()?;
        if hidden != config.hidden_size || vocab < config.vocab_size {
            return Err(Error::Config(format!(
                "embedding matrix is {vocab}x{hidden}, config says {}x{}",
                config.vocab_size, config.hidden_size
            )));
        }
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let prefix = format!("model.layers.{index}");
            let mut linear = |name: &str, bias: bool| -> Result<Linear> {
                let weight = require(&format!("{prefix}.{name}.weight"))?;
                let bias = if bias { Some(require(&format!("{prefix}.{name}.bias"))?) } else { None };
                Ok(Linear::new(weight, bias))
            };
            let q_proj = linear("self_attn.q_proj", true)?;
            let k_proj = linear("self_attn.k_proj", true)?;
            let v_proj = linear("self_attn.v_proj", true)?;
            let o_proj = linear("self_attn.o_proj", false)?;
            let gate_proj = linear("mlp.gate_proj", false)?;
            let up_proj = linear("mlp.up_proj", false)?;
            let down_proj = linear("mlp.down_proj", false)?;
            layers.push(DecoderLayer {
                input_norm: require(&format!("{prefix}.input_layernorm.weight"))?,
                post_attention_norm: require(&format!("{prefix}.post_attention_layernorm.weight"))?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let final_norm = require("model.norm.weight")?;
        let lm_head_weight = match fetch("lm_head.weight")? {
            Some(weight) => weight,
            None => embed_tokens.clone(),
        };
        Ok(Self {
            dtype: embed_tokens.dtype(),
            device: embed_tokens.device().clone(),
            config,
            embed_tokens,
            layers,
            final_norm,
            lm_head: Linear::new(lm_head_weight, None),
            weight_grad: WeightGrad::default(),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights (and of activations inside the forward).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Chooses how frozen weights behave in backward (see [`WeightGrad`]).
    pub fn set_weight_grad(&mut self, weight_grad: WeightGrad) {
        self.weight_grad = weight_grad;
    }

    /// A fingerprint of the network a cache was computed with: its
    /// architecture and a digest of some embedding rows, so two checkpoints
    /// of one architecture are told apart. The rows are rounded to bf16
    /// first, so the same model in f32 (CPU) and bf16 (GPU) agrees.
    pub fn identity(&self) -> Result<String> {
        let c = &self.config;
        let rows = self.embed_tokens.narrow(0, 0, 64.min(c.vocab_size))?;
        let values = rows.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // FNV-1a over the bits: a digest, not a security measure.
        let digest = values.iter().flat_map(|v| v.to_bits().to_le_bytes()).fold(0xcbf29ce484222325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3)
        });
        Ok(format!(
            "qwen2 layers={} hidden={} heads={} kv_heads={} vocab={} rope_theta={} embed_digest={digest:016x}",
            c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.rope_theta
        ))
    }

    /// Token embeddings, (1, n, hidden) in f32: the input the forward takes.
    pub fn embed(&self, token_ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(token_ids, &self.device)?;
        let embeddings = self.embed_tokens.index_select(&ids, 0)?;
        Ok(embeddings.to_dtype(DType::F32)?.unsqueeze(0)?)
    }

    /// Runs `embeddings` (batch, n, hidden) at `positions` (n) after the
    /// tokens already in `cache` (batch 1, shared by the whole batch).
    ///
    /// The causal mask is built from the cache length, never from positions:
    /// positions may be fractional or leave gaps, attention order may not.
    pub fn forward(
        &self,
        embeddings: &Tensor,
        positions: &[f32],
        cache: Option<&KvCache>,
        logits: Logits,
    ) -> Result<ForwardOutput> {
        let placement = self.placement(positions, &[positions.len()], cache.map_or(0, KvCache::len))?;
        self.forward_placed(embeddings, &placement, cache, logits)
    }

    /// Where new tokens go, prepared once for many forwards (an optimisation
    /// runs thousands over the same positions): their RoPE tables and their
    /// attention mask. The new tokens form consecutive `groups` (lengths
    /// summing to `positions.len()`), independent sequences that all see the
    /// `cached` entries and, causally, their own group only: several spans'
    /// virtual tokens then share one forward without seeing each other.
    pub fn placement(&self, positions: &[f32], groups: &[usize], cached: usize) -> Result<Placement> {
        if groups.iter().sum::<usize>() != positions.len() || groups.contains(&0) {
            return Err(Error::Invalid(format!("groups {groups:?} do not partition {} positions", positions.len())));
        }
        let rotation = Rotation::new(positions, self.config.head_dim(), self.config.rope_theta, self.dtype, &self.device)?;
        let mask = attention_mask(groups, cached, &self.device)?;
        let mask = mask.map(|mask| mask.to_dtype(self.softmax_dtype())).transpose()?;
        Ok(Placement { rotation, mask, n_new: positions.len(), cached })
    }

    /// This model's RoPE at `positions`, in f32 (to rotate or un-rotate keys
    /// outside the forward).
    pub fn rotation_f32(&self, positions: &[f32]) -> Result<Rotation> {
        Rotation::new(positions, self.config.head_dim(), self.config.rope_theta, DType::F32, &self.device)
    }

    /// [`Qwen2::forward`] at a prepared [`Placement`]; `cache` must hold the
    /// number of entries the placement was made for.
    pub fn forward_placed(
        &self,
        embeddings: &Tensor,
        placement: &Placement,
        cache: Option<&KvCache>,
        logits: Logits,
    ) -> Result<ForwardOutput> {
        Ok(self.run(embeddings, placement, cache, logits, false)?.0)
    }

    /// Every layer's attention probabilities of the new tokens over the
    /// cache and themselves, (batch, heads, n, cached + n) in f32: what
    /// attention-based eviction scores cache entries by.
    pub fn attention_probabilities(
        &self,
        embeddings: &Tensor,
        positions: &[f32],
        cache: Option<&KvCache>,
    ) -> Result<Vec<Tensor>> {
        let placement = self.placement(positions, &[positions.len()], cache.map_or(0, KvCache::len))?;
        Ok(self.run(embeddings, &placement, cache, Logits::Last, true)?.1)
    }

    /// Softmax in at least f32 whatever the weights' dtype: bf16 rows of
    /// thousands of logits lose too much.
    fn softmax_dtype(&self) -> DType {
        if self.dtype == DType::F64 { DType::F64 } else { DType::F32 }
    }

    /// The forward; with `keep_attention`, also each layer's attention probabilities.
    fn run(
        &self,
        embeddings: &Tensor,
        placement: &Placement,
        cache: Option<&KvCache>,
        logits: Logits,
        keep_attention: bool,
    ) -> Result<(ForwardOutput, Vec<Tensor>)> {
        let (batch, n_new, hidden) = embeddings.dims3()?;
        if n_new != placement.n_new || hidden != self.config.hidden_size {
            return Err(Error::Invalid(format!(
                "embeddings {:?} do not fit {} positions and hidden size {}",
                embeddings.dims(),
                placement.n_new,
                self.config.hidden_size
            )));
        }
        let cached = cache.map_or(0, KvCache::len);
        if cached != placement.cached {
            return Err(Error::Invalid(format!("cache holds {cached} entries, placement was made for {}", placement.cached)));
        }
        if let Some(cache) = cache {
            if cache.num_layers() != self.layers.len() && !cache.is_empty() {
                return Err(Error::Invalid(format!(
                    "cache has {} layers, model {}",
                    cache.num_layers(),
                    self.layers.len()
                )));
            }
        }

        let mut hidden_states = embeddings.to_dtype(self.dtype)?;
        let mut keys = Vec::with_capacity(self.layers.len());
        let mut values = Vec::with_capacity(self.layers.len());
        let mut attention = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&hidden_states, &layer.input_norm, self.config.rms_norm_eps)?;
            let (query, key, value) = self.project_qkv(layer, &normed, &placement.rotation, batch, n_new)?;
            keys.push(key.clone());
            values.push(value.clone());
            let is_last = index + 1 == self.layers.len();
            if is_last && logits == Logits::None {
                break;
            }
            let cached_kv = cache.and_then(|c| c.layer(index));
            let (all_keys, all_values) = match cached_kv {
                Some((cached_keys, cached_values)) => (
                    Tensor::cat(&[&expand_batch(cached_keys, batch)?, &key], 2)?,
                    Tensor::cat(&[&expand_batch(cached_values, batch)?, &value], 2)?,
                ),
                None => (key, value),
            };
            let (attended, probabilities) = self.attention(&query, &all_keys, &all_values, placement.mask.as_ref())?;
            if keep_attention {
                attention.push(probabilities.detach());
            }
            hidden_states = (hidden_states + layer.o_proj.forward(&attended, self.weight_grad)?)?;
            let normed = rms_norm(&hidden_states, &layer.post_attention_norm, self.config.rms_norm_eps)?;
            hidden_states = (hidden_states + self.mlp(layer, &normed)?)?;
        }
        let logits = match logits {
            Logits::None => None,
            Logits::Last => Some(self.logits(&hidden_states.narrow(1, n_new - 1, 1)?)?),
            Logits::All => Some(self.logits(&hidden_states)?),
        };
        Ok((ForwardOutput { keys, values, logits }, attention))
    }

    /// Q (batch, heads, n, d), K and V (batch, kv_heads, n, d), RoPE on Q and K.
    fn project_qkv(
        &self,
        layer: &DecoderLayer,
        normed: &Tensor,
        rotation: &Rotation,
        batch: usize,
        n_new: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let head_dim = self.config.head_dim();
        let split_heads = |projected: Tensor, heads: usize| -> Result<Tensor> {
            Ok(projected.reshape((batch, n_new, heads, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let query = split_heads(layer.q_proj.forward(normed, self.weight_grad)?, self.config.num_attention_heads)?;
        let key = split_heads(layer.k_proj.forward(normed, self.weight_grad)?, self.config.num_key_value_heads)?;
        let value = split_heads(layer.v_proj.forward(normed, self.weight_grad)?, self.config.num_key_value_heads)?;
        Ok((rotation.apply(&query)?, rotation.apply(&key)?, value))
    }

    /// Grouped-query attention without copying K/V per query head: the query
    /// heads that share a KV head are stacked along the sequence axis.
    /// query (b, heads, n, d); keys, values (b, kv, L, d) -> (b, n, hidden),
    /// and the probabilities (b, heads, n, L) in f32.
    fn attention(
        &self,
        query: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (batch, heads, n_new, head_dim) = query.dims4()?;
        let kv_heads = self.config.num_key_value_heads;
        let groups = heads / kv_heads;
        let total = keys.dim(2)?;
        // Scaling the (small) query rather than the (large) scores.
        let grouped_query = (query / (head_dim as f64).sqrt())?.reshape((batch, kv_heads, groups * n_new, head_dim))?;
        let scores = grouped_query.matmul(&keys.t()?)?;
        let scores = scores.to_dtype(self.softmax_dtype())?.reshape((batch, kv_heads, groups, n_new, total))?;
        let probabilities = masked_softmax_last_dim(&scores, mask)?;
        let grouped = probabilities.to_dtype(self.dtype)?.reshape((batch, kv_heads, groups * n_new, total))?;
        let attended = grouped.matmul(values)?; // (b, kv, groups * n, d)
        let attended = attended.reshape((batch, heads, n_new, head_dim))?.transpose(1, 2)?;
        // Query head h shares KV head h / groups: kv-major order is head order.
        let probabilities = probabilities.reshape((batch, heads, n_new, total))?;
        Ok((attended.reshape((batch, n_new, heads * head_dim))?, probabilities))
    }

    fn mlp(&self, layer: &DecoderLayer, normed: &Tensor) -> Result<Tensor> {
        let gate = layer.gate_proj.forward(normed, self.weight_grad)?.silu()?;
        let up = layer.up_proj.forward(normed, self.weight_grad)?;
        layer.down_proj.forward(&(gate * up)?, self.weight_grad)
    }

    /// hidden (b, n, hidden) -> logits (b, n, vocab) in f32
    fn logits(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let normed = rms_norm(hidden_states, &self.final_norm, self.config.rms_norm_eps)?;
        let logits = self.lm_head.forward(&normed, self.weight_grad)?;
        let logits = logits.narrow(D::Minus1, 0, self.config.vocab_size)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// (n, cached + n), f32: 0 where new token i may attend, -inf where it may
/// not (a later token, or one of another group). None for a single new
/// token, which sees everything.
fn attention_mask(groups: &[usize], cached: usize, device: &Device) -> Result<Option<Tensor>> {
    let n_new: usize = groups.iter().sum();
    if n_new == 1 {
        return Ok(None);
    }
    let total = cached + n_new;
    let mut mask = Vec::with_capacity(n_new * total);
    let mut group_start = 0;
    for &length in groups {
        for i in group_start..group_start + length {
            let visible = |j: usize| j < cached || (cached + group_start..=cached + i).contains(&j);
            mask.extend((0..total).map(|j| if visible(j) { 0.0 } else { f32::NEG_INFINITY }));
        }
        group_start += length;
    }
    Ok(Some(Tensor::from_vec(mask, (n_new, total), device)?))
}

/// A batch-1 cache tensor (1, kv, L, d) seen by a batch of `batch` sequences.
fn expand_batch(cached: &Tensor, batch: usize) -> Result<Tensor> {
    if batch == 1 {
        return Ok(cached.clone());
    }
    let (_, kv_heads, len, head_dim) = cached.dims4()?;
    Ok(cached.broadcast_as((batch, kv_heads, len, head_dim))?.contiguous()?)
}
