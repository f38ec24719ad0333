//! Greedy decoding over a KV cache with explicit positions.

use candle_core::D;

use crate::cache::KvCache;
use crate::model::{Logits, Qwen2};
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
    if prompt.is_empty() {
        return Err(Error::Invalid("greedy decoding needs a non-empty prompt".into()));
    }
    let mut answer = Vec::new();
    let mut feed = prompt.to_vec();
    let mut position = first_position;
    while answer.len() < max_new_tokens {
        let positions: Vec<f32> = (0..feed.len()).map(|i| position + i as f32).collect();
        let output = model.forward(&model.embed(&feed)?, &positions, Some(cache), Logits::Last)?;
        cache.append(&output.keys, &output.values, &positions)?;
        position += feed.len() as f32;
        let logits = output.logits.ok_or_else(|| Error::Invalid("forward returned no logits".into()))?;
        let next = logits.squeeze(0)?.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if stop.contains(&next) {
            break;
        }
        answer.push(next);
        feed = vec![next];
    }
    Ok(answer)
}
