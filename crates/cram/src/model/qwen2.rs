//! A Qwen2 decoder whose forward pass backpropagates to its input embeddings.
//!
//! Unlike candle-transformers' `qwen2`, the forward takes input embeddings
//! (not only token ids) at arbitrary float positions over an explicit
//! [`KvCache`], returns every layer's K (post-RoPE) and V for the new tokens,
//! and computes logits only when asked. Every op on the path has a backward
//! (see [`super::ops`]); the frozen weights get no gradient buffers.

use candle_core::{DType, Device, Tensor, D};

use super::blocks::{Before, DecoderLayer, Depth, Exec};
pub use super::placement::Placement;
use super::config::Qwen2Config;
use crate::cache::KvCache;
use super::ops::{rms_norm, Linear, WeightGrad};
use super::rope::Rotation;
use super::rows::RowEntries;
use crate::error::{Error, Result};

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
        let layers = (0..config.num_hidden_layers).map(|index| DecoderLayer::new(&config, index, &mut require)).collect::<Result<Vec<_>>>()?;
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

    /// Where new tokens go, prepared once for many forwards (an optimization
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
        Ok(self.run(embeddings, placement, cache, None, logits, Keep::Nothing)?.0)
    }

    /// One new token for each of `rows` sequences decoded together:
    /// embeddings (rows, 1, hidden), each row at its own position
    /// (`positions`, rows), after the entries of `shared` (one cache every
    /// row sees, read once for all: never copied per row) and then its own
    /// entries in `own` (its prompt and answer so far, padded). What greedy
    /// decoding of several prompts over one cache needs: each step reads the
    /// weights once for all rows.
    pub fn forward_rows(&self, embeddings: &Tensor, positions: &[f32], shared: Option<&KvCache>, own: &RowEntries, logits: Logits) -> Result<ForwardOutput> {
        let rows = positions.len();
        if embeddings.dims3()?.0 != rows || own.rows() != rows {
            return Err(Error::Invalid(format!(
                "{rows} rows decoded together need embeddings of {rows} rows (got {:?}) and {rows} rows of own entries (got {})",
                embeddings.dims(),
                own.rows()
            )));
        }
        if own.layers() != self.layers.len() {
            return Err(Error::Invalid(format!("row entries have {} layers, model {}", own.layers(), self.layers.len())));
        }
        if let Some((keys, _)) = shared.and_then(|cache| cache.layer(0)) {
            if keys.dim(0)? != 1 {
                return Err(Error::Invalid(format!("the cache rows share holds one sequence, not {}", keys.dim(0)?)));
            }
        }
        let shared_entries = shared.map_or(0, KvCache::len);
        let rotation = Rotation::new(positions, self.config.head_dim(), self.config.rope_theta, self.dtype, &self.device)?.one_per_row()?;
        // Each row sees the shared entries, its own and itself.
        let shared_columns = Tensor::zeros((rows, shared_entries), DType::F32, &self.device)?;
        let own_column = Tensor::zeros((rows, 1), DType::F32, &self.device)?;
        let columns = shared_entries + own.len() + 1;
        let mask = Tensor::cat(&[&shared_columns, own.padding(), &own_column], 1)?.reshape((rows, 1, 1, 1, columns))?.to_dtype(self.softmax_dtype())?;
        let placement = Placement { rotation, mask: Some(mask), n_new: 1, cached: shared_entries + own.len() };
        Ok(self.run(embeddings, &placement, shared, Some(own), logits, Keep::Nothing)?.0)
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
        Ok(self.run(embeddings, &placement, cache, None, Logits::None, Keep::Attention)?.1)
    }

    /// Every layer's post-RoPE queries of the new tokens, (batch, heads, n,
    /// head_dim): what attention matching fits a compacted cache to.
    pub fn queries(&self, embeddings: &Tensor, positions: &[f32], cache: Option<&KvCache>) -> Result<Vec<Tensor>> {
        Ok(self.forward_with_queries(embeddings, positions, cache, Logits::None)?.1)
    }

    /// [`Self::forward`], and every layer's post-RoPE queries of the new
    /// tokens (batch, heads, n, head_dim) from the same pass.
    pub fn forward_with_queries(&self, embeddings: &Tensor, positions: &[f32], cache: Option<&KvCache>, logits: Logits) -> Result<(ForwardOutput, Vec<Tensor>)> {
        let placement = self.placement(positions, &[positions.len()], cache.map_or(0, KvCache::len))?;
        self.run(embeddings, &placement, cache, None, logits, Keep::Queries)
    }

    /// A forward of new tokens whose cache is chosen layer by layer:
    /// before layer l attends, `cache_for(l, queries)` receives its
    /// post-RoPE queries of the new tokens (1, heads, n, d), computed
    /// through the layers below over the caches they were given, and
    /// returns layer l's cache: keys and values (1, kv_heads, `cached`, d)
    /// and their logit biases ((1, kv_heads, `cached`) f32, or `None`).
    /// This is what fitting each layer on-policy needs (its reference
    /// queries see the layers below already compacted) in one pass, where
    /// a forward per layer would rerun every layer below it. The last
    /// layer stops at its queries.
    pub fn forward_layer_by_layer(
        &self,
        embeddings: &Tensor,
        positions: &[f32],
        cached: usize,
        mut cache_for: impl FnMut(usize, &Tensor) -> Result<(Tensor, Tensor, Option<Tensor>)>,
    ) -> Result<()> {
        let placement = self.placement(positions, &[positions.len()], cached)?;
        let exec = Exec { weight_grad: self.weight_grad, softmax_dtype: self.softmax_dtype() };
        let mut hidden_states = embeddings.to_dtype(self.dtype)?;
        for (index, layer) in self.layers.iter().enumerate() {
            // The projections run twice (here and in the full block): a few
            // percent of a block, for not splitting the block's forward.
            let query = layer.forward(&hidden_states, &placement, Before::default(), Depth::KeysAndValues, exec)?.query.detach();
            let (keys, values, bias) = cache_for(index, &query)?;
            if keys.dim(2)? != cached || values.dim(2)? != cached {
                return Err(Error::Invalid(format!("layer {index}'s cache has {} entries, the forward was placed after {cached}", keys.dim(2)?)));
            }
            if index + 1 < self.layers.len() {
                let before = Before { shared: Some((&keys, &values)), bias: bias.as_ref(), own: None };
                let output = layer.forward(&hidden_states, &placement, before, Depth::Full, exec)?;
                hidden_states = output.hidden_states.ok_or_else(|| Error::Invalid("a full block returned no hidden states".into()))?;
            }
        }
        Ok(())
    }

    /// Softmax in at least f32 whatever the weights' dtype: bf16 rows of
    /// thousands of logits lose too much.
    fn softmax_dtype(&self) -> DType {
        if self.dtype == DType::F64 { DType::F64 } else { DType::F32 }
    }

    /// The forward; with `keep`, also each layer's attention probabilities
    /// (batch, heads, n, cached + n) in f32, or its post-RoPE queries
    /// (batch, heads, n, d).
    fn run(
        &self,
        embeddings: &Tensor,
        placement: &Placement,
        cache: Option<&KvCache>,
        own: Option<&RowEntries>,
        logits: Logits,
        keep: Keep,
    ) -> Result<(ForwardOutput, Vec<Tensor>)> {
        let (_, n_new, hidden) = embeddings.dims3()?;
        if n_new != placement.n_new || hidden != self.config.hidden_size {
            return Err(Error::Invalid(format!(
                "embeddings {:?} do not fit {} positions and hidden size {}",
                embeddings.dims(),
                placement.n_new,
                self.config.hidden_size
            )));
        }
        let cached = cache.map_or(0, KvCache::len) + own.map_or(0, RowEntries::len);
        if cached != placement.cached {
            return Err(Error::Invalid(format!("cache holds {cached} entries, placement was made for {}", placement.cached)));
        }
        if let Some(cache) = cache {
            if cache.num_layers() != self.layers.len() && !cache.is_empty() {
                return Err(Error::Invalid(format!("cache has {} layers, model {}", cache.num_layers(), self.layers.len())));
            }
        }
        // Without logits the last layer stops early: at its K/V, or at its
        // attention when that is what the caller wants.
        let last_depth = match (logits, keep) {
            (Logits::None, Keep::Attention) => Depth::Attention,
            (Logits::None, _) => Depth::KeysAndValues,
            _ => Depth::Full,
        };
        let exec = Exec { weight_grad: self.weight_grad, softmax_dtype: self.softmax_dtype() };
        let mut hidden_states = embeddings.to_dtype(self.dtype)?;
        let mut keys = Vec::with_capacity(self.layers.len());
        let mut values = Vec::with_capacity(self.layers.len());
        let mut kept = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let depth = if index + 1 == self.layers.len() { last_depth } else { Depth::Full };
            let before = Before {
                shared: cache.and_then(|c| c.layer(index)),
                bias: cache.and_then(|c| c.biases()).map(|biases| &biases[index]),
                own: own.and_then(|own| own.layer(index)),
            };
            let output = layer.forward(&hidden_states, placement, before, depth, exec)?;
            keys.push(output.key);
            values.push(output.value);
            if keep == Keep::Queries {
                kept.push(output.query.detach());
            }
            if let Some(probabilities) = output.probabilities.filter(|_| keep == Keep::Attention) {
                // Query head h shares KV head h / groups: kv-major order is head order.
                let (batch, kv_heads, groups, n, total) = probabilities.dims5()?;
                kept.push(probabilities.reshape((batch, kv_heads * groups, n, total))?.detach());
            }
            if let Some(next) = output.hidden_states {
                hidden_states = next;
            }
        }
        let logits = match logits {
            Logits::None => None,
            Logits::Last => Some(self.logits(&hidden_states.narrow(1, n_new - 1, 1)?)?),
            Logits::All => Some(self.logits(&hidden_states)?),
        };
        Ok((ForwardOutput { keys, values, logits }, kept))
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

/// What a forward keeps besides its keys and values, per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    /// Attention probabilities.
    Attention,
    /// Post-RoPE queries.
    Queries,
}
