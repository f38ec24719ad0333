//! Asking a case's questions over a context (full, none, or a compressed
//! span) and scoring the answers.

use cram::{generate, CompressionReport, Compressor, KvCache, Logits, Model, SpanTargets};
use serde::{Deserialize, Serialize};

use crate::cases::{Case, Question};
use crate::render::Rendering;
use crate::Result;

/// How questions are put and answered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskSettings {
    pub rendering: Rendering,
    /// Ask one fact at a time when a question is a run of `?` sentences.
    pub per_fact: bool,
    pub max_new_tokens: usize,
}

impl Default for AskSettings {
    /// chatml, one fact per question, 64 new tokens: what small instruct
    /// models answer best (see the research notes).
    fn default() -> Self {
        Self { rendering: Rendering::Chatml, per_fact: true, max_new_tokens: 64 }
    }
}

/// What stands between the prefix and the suffix.
pub enum Condition<'a> {
    /// The span verbatim: the upper bound.
    Full,
    /// Nothing: the lower bound.
    NoContext,
    /// The span through a compressor.
    Compressed(&'a dyn Compressor),
}

/// One question's answer and its facts' scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answered {
    pub question_id: String,
    pub question: String,
    pub answer: String,
    /// (fact id, recalled)
    pub facts: Vec<(String, bool)>,
}

/// A case answered under one condition.
#[derive(Debug, Clone)]
pub struct CaseRun {
    pub answers: Vec<Answered>,
    /// Tokens of the span as rendered.
    pub n_tokens: usize,
    /// Cache entries standing for the span (n_tokens for full, 0 for none).
    pub n_kept: usize,
    pub compression: Option<CompressionReport>,
}

/// Facts recalled over a list of answers: (correct, total).
pub fn facts_score(answers: &[Answered]) -> (usize, usize) {
    let facts = answers.iter().flat_map(|a| &a.facts);
    (facts.clone().filter(|(_, ok)| *ok).count(), facts.count())
}

/// Builds the context of `case` under `condition` and asks every question
/// over it. `on_step` reports a compressor's optimisation progress.
pub fn run_case(
    model: &Model,
    case: &Case,
    settings: &AskSettings,
    condition: Condition<'_>,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<CaseRun> {
    let rendering = settings.rendering;
    let messages = &case.transcript.messages;
    let encode = |indices: &[usize]| model.tokenizer.encode(&rendering.messages(messages, indices));
    let (prefix_ids, span_ids, suffix_ids) = (encode(&case.split.prefix)?, encode(&case.split.compress)?, encode(&case.split.suffix)?);

    let mut cache = KvCache::new();
    prefill(model, &mut cache, &prefix_ids, 0.0)?;
    let span_start = prefix_ids.len() as f32;
    let span_positions: Vec<f32> = (0..span_ids.len()).map(|i| span_start + i as f32).collect();
    let (n_kept, compression, suffix_start) = match condition {
        Condition::Full => {
            prefill(model, &mut cache, &span_ids, span_start)?;
            (span_ids.len(), None, span_start + span_ids.len() as f32)
        }
        Condition::NoContext => (0, None, span_start),
        Condition::Compressed(compressor) => {
            let targets = SpanTargets::compute(&model.qwen2, &cache, &span_ids, &span_positions)?;
            let compressed = compressor.compress(&model.qwen2, &cache, &targets, on_step)?;
            compressed.append_to(&mut cache)?;
            // The suffix continues where the original span ended.
            (compressed.report.n_kept, Some(compressed.report), span_start + span_ids.len() as f32)
        }
    };
    prefill(model, &mut cache, &suffix_ids, suffix_start)?;
    let answers = ask_all(model, case, settings, &cache, suffix_start + suffix_ids.len() as f32)?;
    Ok(CaseRun { answers, n_tokens: span_ids.len(), n_kept, compression })
}

/// Every question of the case over (a copy of) `cache`, the question's
/// tokens starting at `first_position`.
fn ask_all(model: &Model, case: &Case, settings: &AskSettings, cache: &KvCache, first_position: f32) -> Result<Vec<Answered>> {
    let questions: Vec<Question> =
        if settings.per_fact { case.questions.iter().flat_map(Question::per_fact).collect() } else { case.questions.clone() };
    let stop = model.tokenizer.stop_ids();
    questions
        .iter()
        .map(|question| {
            let prompt = model.tokenizer.encode(&settings.rendering.question(&question.question))?;
            let mut cache = cache.clone();
            let ids = generate::greedy(&model.qwen2, &mut cache, &prompt, first_position, settings.max_new_tokens, &stop)?;
            let answer = model.tokenizer.decode(&ids)?;
            let facts = question.facts.iter().map(|f| (f.id.clone(), f.is_recalled(&answer))).collect();
            Ok(Answered { question_id: question.id.clone(), question: question.question.clone(), answer, facts })
        })
        .collect()
}

/// Appends `ids` at positions `start..` to the cache (nothing for no ids).
fn prefill(model: &Model, cache: &mut KvCache, ids: &[u32], start: f32) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let positions: Vec<f32> = (0..ids.len()).map(|i| start + i as f32).collect();
    let output = model.qwen2.forward(&model.qwen2.embed(ids)?, &positions, Some(cache), Logits::None)?;
    cache.append(&output.keys, &output.values, &positions)?;
    Ok(())
}
