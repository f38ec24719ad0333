//! Greedy decoding over a KV cache with explicit positions: one prompt, or
//! several over one shared cache with their decoding steps batched.

use candle_core::D;

use crate::cache::KvCache;
use crate::model::{ForwardOutput, Logits, Qwen2, RowEntries};
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
/// together decoded 1.8 times the tokens a second of one alone;
/// `experiments/speed/`). The rows read `cache` once a step, held once:
/// memory grows with each row's own entries (prompt and answer), not with
/// copies of the cache. The answers agree with [`greedy`]'s to rounding: a
/// batched product may sum in another order, which can flip a near-tie
/// between two tokens.
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
    let mut prompt_entries = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        let (first, output) = run_tokens(model, cache, prompt, first_position)?;
        if stop.contains(&first) {
            continue;
        }
        answers[index].push(first);
        if max_new_tokens > 1 {
            rows.push(Row { index, next_input: first, position: first_position + prompt.len() as f32 });
            prompt_entries.push((output.keys, output.values));
        }
    }
    if rows.is_empty() {
        return Ok(answers);
    }
    let mut own = RowEntries::side_by_side(&prompt_entries, model.device())?;
    drop(prompt_entries);
    while !rows.is_empty() {
        let inputs: Vec<u32> = rows.iter().map(|row| row.next_input).collect();
        let positions: Vec<f32> = rows.iter().map(|row| row.position).collect();
        let hidden = model.config().hidden_size;
        let embeddings = model.embed(&inputs)?.reshape((rows.len(), 1, hidden))?;
        let output = model.forward_rows(&embeddings, &positions, Some(cache), &own, Logits::Last)?;
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
        own.append(&output.keys, &output.values)?;
        if unfinished.len() < rows.len() {
            own.keep(&unfinished)?;
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
    let (next, output) = run_tokens(model, cache, tokens, position)?;
    cache.append(&output.keys, &output.values, &consecutive(position, tokens.len()))?;
    Ok(next)
}

/// Runs `tokens` at `position, position + 1, ...` after `cache`: the most
/// likely next token, and the forward with the tokens' keys and values.
fn run_tokens(model: &Qwen2, cache: &KvCache, tokens: &[u32], position: f32) -> Result<(u32, ForwardOutput)> {
    let output = model.forward(&model.embed(tokens)?, &consecutive(position, tokens.len()), Some(cache), Logits::Last)?;
    let logits = output.logits.as_ref().ok_or_else(|| Error::Invalid("forward returned no logits".into()))?;
    let next = logits.squeeze(0)?.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
    Ok((next, output))
}

/// `count` positions from `first`, one apart.
fn consecutive(first: f32, count: usize) -> Vec<f32> {
    (0..count).map(|i| first + i as f32).collect()
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
