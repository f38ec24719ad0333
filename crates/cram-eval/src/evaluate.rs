//! Asking a case's questions over a context and scoring the answers.

use cram::{generate, KvCache, Logits, Model};
use serde::Serialize;

use crate::cases::{Case, Question};
use crate::render::Rendering;
use crate::Result;

/// What the model sees before the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Context {
    /// Prefix, the span, suffix: the upper bound.
    Full,
    /// Prefix and suffix, the span left out: the lower bound.
    None,
}

/// One question's answer and its facts' scores.
#[derive(Debug, Clone, Serialize)]
pub struct Answered {
    pub question_id: String,
    pub question: String,
    pub answer: String,
    /// (fact id, recalled)
    pub facts: Vec<(String, bool)>,
}

/// Facts recalled over a list of answers: (correct, total).
pub fn facts_score(answers: &[Answered]) -> (usize, usize) {
    let facts = answers.iter().flat_map(|a| &a.facts);
    (facts.clone().filter(|(_, ok)| *ok).count(), facts.count())
}

/// Asks every question of `case` (one fact at a time when `per_fact`) after
/// the case's context rendered with `rendering`, greedily, and scores.
pub fn answer_case(
    model: &Model,
    case: &Case,
    rendering: Rendering,
    context: Context,
    per_fact: bool,
    max_new_tokens: usize,
) -> Result<Vec<Answered>> {
    let messages = &case.transcript.messages;
    let mut text = rendering.messages(messages, &case.split.prefix);
    if context == Context::Full {
        text.push_str(&rendering.messages(messages, &case.split.compress));
    }
    text.push_str(&rendering.messages(messages, &case.split.suffix));
    let context_ids = model.tokenizer.encode(&text)?;
    let context_cache = prefill(model, &context_ids)?;
    let questions: Vec<Question> =
        if per_fact { case.questions.iter().flat_map(Question::per_fact).collect() } else { case.questions.clone() };
    questions
        .iter()
        .map(|question| {
            let prompt = model.tokenizer.encode(&rendering.question(&question.question))?;
            let mut cache = context_cache.clone();
            let first_position = cache.next_position();
            let stop = model.tokenizer.stop_ids();
            let ids = generate::greedy(&model.qwen2, &mut cache, &prompt, first_position, max_new_tokens, &stop)?;
            let answer = model.tokenizer.decode(&ids)?;
            let facts = question.facts.iter().map(|f| (f.id.clone(), f.is_recalled(&answer))).collect();
            Ok(Answered { question_id: question.id.clone(), question: question.question.clone(), answer, facts })
        })
        .collect()
}

/// The cache of `ids` at positions 0.. (empty for no ids).
fn prefill(model: &Model, ids: &[u32]) -> Result<KvCache> {
    let mut cache = KvCache::new();
    if ids.is_empty() {
        return Ok(cache);
    }
    let positions: Vec<f32> = (0..ids.len()).map(|i| i as f32).collect();
    let output = model.qwen2.forward(&model.qwen2.embed(ids)?, &positions, None, Logits::None)?;
    cache.append(&output.keys, &output.values, &positions)?;
    Ok(cache)
}
