//! Greedy decoding over a KV cache with explicit positions: one prompt, or
//! several over one shared cache with their decoding steps batched.

use candle_core::{DType, Device, Tensor, D};

use crate::cache::KvCache;
use crate::model::{Context, Logits, Qwen2};
use crate::error::{Error, Result};

/// Feeds `prompt` at positions `first_position, first_position + 1, ...`
/// after what `cache` holds, then decodes greedily until a token of `stop`
/// or `max_new_tokens`. The prompt and the answer are appended to `cache`;
/// clone it first (tensors are shared, not copied) to keep the original.
/// Returns the answer's ids, without the stop token.
pub fn greedy(
    model: &Qwen2,
    cache: &mut KvCache,
    prompt: &[u32],
    first_position: f32,
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    check_prompt(prompt)?;
    let mut answer = Vec::new();
    let mut feed = prompt.to_vec();
    let mut position = first_position;
    while answer.len() < max_new_tokens {
        let next = feed_tokens(model, cache, &feed, position)?;
        position += feed.len() as f32;
        if stop.contains(&next) {
            break;
        }
        answer.push(next);
        feed = vec![next];
    }
    Ok(answer)
}

/// [`greedy`] for each of `prompts`, all after `cache` (left as it is):
/// each prompt is fed alone, as [`greedy`] feeds it, and the answers are
/// then decoded together, one token of every unfinished answer a step.
/// Decoding one token reads every weight of the model for one row; a step
/// for all rows reads them once (for the 0.5B on a 2-core CPU, 8 answers
/// together decode 1.8 times the tokens a second of one alone, a step for
/// 8 rows costing 4-5 times a step for one). The answers agree with
/// [`greedy`]'s to rounding: a batched product may sum in another order,
/// which can flip a near-tie between two tokens. Each row holds its own
/// copy of the shared cache: memory grows with the rows.
pub fn greedy_together(
    model: &Qwen2,
    cache: &KvCache,
    prompts: &[Vec<u32>],
    first_position: f32,
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    prompts.iter().try_for_each(|prompt| check_prompt(prompt))?;
    let mut answers = vec![Vec::new(); prompts.len()];
    if max_new_tokens == 0 || prompts.is_empty() {
        return Ok(answers);
    }
    // Each prompt alone, as `greedy` feeds it; the rows still decoding after.
    let mut rows = Vec::with_capacity(prompts.len());
    let mut row_caches = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        let mut own = cache.clone();
        let first = feed_tokens(model, &mut own, prompt, first_position)?;
        if stop.contains(&first) {
            continue;
        }
        answers[index].push(first);
        if max_new_tokens > 1 {
            rows.push(Row { index, next_input: first, position: first_position + prompt.len() as f32 });
            row_caches.push(own);
        }
    }
    let Some(mut together) = RowCaches::side_by_side(&row_caches, model.device())? else { return Ok(answers) };
    drop(row_caches);
    while !rows.is_empty() {
        let inputs: Vec<u32> = rows.iter().map(|row| row.next_input).collect();
        let positions: Vec<f32> = rows.iter().map(|row| row.position).collect();
        let hidden = model.config().hidden_size;
        let embeddings = model.embed(&inputs)?.reshape((rows.len(), 1, hidden))?;
        let output = model.forward_rows(&embeddings, &positions, &together, &together.padding, Logits::Last)?;
        let logits = output.logits.ok_or_else(|| Error::Invalid("forward returned no logits".into()))?;
        let next = logits.squeeze(1)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let mut unfinished = Vec::with_capacity(rows.len());
        for (slot, (row, token)) in rows.iter_mut().zip(next).enumerate() {
            if stop.contains(&token) {
                continue;
            }
            let answer = &mut answers[row.index];
            answer.push(token);
            (row.next_input, row.position) = (token, row.position + 1.0);
            if answer.len() < max_new_tokens {
                unfinished.push(slot);
            }
        }
        if unfinished.is_empty() {
            break;
        }
        together.append(&output.keys, &output.values)?;
        if unfinished.len() < rows.len() {
            together.keep(&unfinished)?;
        }
        rows = unfinished.iter().map(|&slot| rows[slot]).collect();
    }
    Ok(answers)
}

fn check_prompt(prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::Invalid("greedy decoding needs a non-empty prompt".into()));
    }
    Ok(())
}

/// Feeds `tokens` at `position, position + 1, ...` after `cache`, appends
/// their entries, and returns the most likely next token.
fn feed_tokens(model: &Qwen2, cache: &mut KvCache, tokens: &[u32], position: f32) -> Result<u32> {
    let positions: Vec<f32> = (0..tokens.len()).map(|i| position + i as f32).collect();
    let output = model.forward(&model.embed(tokens)?, &positions, Some(cache), Logits::Last)?;
    cache.append(&output.keys, &output.values, &positions)?;
    let logits = output.logits.ok_or_else(|| Error::Invalid("forward returned no logits".into()))?;
    Ok(logits.squeeze(0)?.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

/// An answer still being decoded by [`greedy_together`].
#[derive(Debug, Clone, Copy)]
struct Row {
    /// Its prompt's index.
    index: usize,
    /// The token to feed next: its answer's last.
    next_input: u32,
    /// Where that token goes.
    position: f32,
}

/// The caches of rows decoded together, one row each: per layer (rows,
/// kv_heads, entries, head_dim), each row's own entries first and zeros
/// after them where its prompt was shorter than the longest; `padding`
/// masks those.
struct RowCaches {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Per layer (1, kv_heads, entries) f32, 0 past the shared cache.
    biases: Option<Vec<Tensor>>,
    /// (rows, entries): 0 over a row's entries, -inf over its padding.
    padding: Tensor,
}

impl RowCaches {
    /// The rows' caches (the shared cache, then the row's own entries),
    /// padded to the longest and stacked; `None` for no rows.
    fn side_by_side(caches: &[KvCache], device: &Device) -> Result<Option<Self>> {
        let Some(longest) = caches.iter().max_by_key(|cache| cache.len()) else { return Ok(None) };
        let entries = longest.len();
        let pad = |tensor: &Tensor| -> Result<Tensor> {
            let (batch, kv_heads, held, head_dim) = tensor.dims4()?;
            if held == entries {
                return Ok(tensor.clone());
            }
            let zeros = Tensor::zeros((batch, kv_heads, entries - held, head_dim), tensor.dtype(), tensor.device())?;
            Ok(Tensor::cat(&[tensor, &zeros], 2)?)
        };
        let stack = |layer: usize, part: fn(&KvCache) -> &[Tensor]| -> Result<Tensor> {
            let padded = caches.iter().map(|cache| pad(&part(cache)[layer])).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&padded, 0)?)
        };
        let layers = longest.num_layers();
        let keys = (0..layers).map(|layer| stack(layer, KvCache::keys)).collect::<Result<Vec<_>>>()?;
        let values = (0..layers).map(|layer| stack(layer, KvCache::values)).collect::<Result<Vec<_>>>()?;
        // Every row's biases are the shared cache's, then zeros: the longest row's serve all.
        let biases = longest.biases().map(<[Tensor]>::to_vec);
        let padding: Vec<f32> = caches
            .iter()
            .flat_map(|cache| (0..entries).map(move |entry| if entry < cache.len() { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let padding = Tensor::from_vec(padding, (caches.len(), entries), device)?;
        Ok(Some(Self { keys, values, biases, padding }))
    }

    /// Appends one entry per row: per layer (rows, kv_heads, 1, head_dim).
    fn append(&mut self, keys: &[Tensor], values: &[Tensor]) -> Result<()> {
        for (held, new) in self.keys.iter_mut().zip(keys).chain(self.values.iter_mut().zip(values)) {
            *held = Tensor::cat(&[&*held, &new.detach()], 2)?;
        }
        for bias in self.biases.iter_mut().flatten() {
            let (_, kv_heads, _) = bias.dims3()?;
            *bias = Tensor::cat(&[&*bias, &Tensor::zeros((1, kv_heads, 1), DType::F32, bias.device())?], 2)?;
        }
        let rows = self.padding.dim(0)?;
        self.padding = Tensor::cat(&[&self.padding, &Tensor::zeros((rows, 1), DType::F32, self.padding.device())?], 1)?;
        Ok(())
    }

    /// Keeps the rows at `slots`, in that order.
    fn keep(&mut self, slots: &[usize]) -> Result<()> {
        let ids = Tensor::new(slots.iter().map(|&slot| slot as u32).collect::<Vec<_>>(), self.padding.device())?;
        for held in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *held = held.index_select(&ids, 0)?;
        }
        self.padding = self.padding.index_select(&ids, 0)?;
        Ok(())
    }
}

impl Context for RowCaches {
    fn entries(&self) -> usize {
        self.padding.dim(1).unwrap_or(0)
    }

    fn layers(&self) -> usize {
        self.keys.len()
    }

    fn layer(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        Some((self.keys.get(index)?, self.values.get(index)?))
    }

    fn bias(&self, index: usize) -> Option<&Tensor> {
        self.biases.as_ref().map(|biases| &biases[index])
    }
}
