//! Asking a case's questions over a context (full, none, or a compressed
//! span) and scoring the answers.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::Instant;

use cram::{CompressionReport, Compressor, Model, Recipe, Session, TurnTargets};
use serde::{Deserialize, Serialize};

use crate::cases::Case;
use crate::questions::Question;
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
    /// Decode a case's answers together, a batched step for all
    /// ([`Session::ask_together`]), rather than one after another: the
    /// same answers but where rounding flips a near-tie, faster (a 0.5B
    /// sweep cell at 1,000 tokens on a 2-core CPU spent 2.3 times less on
    /// its 8 answers).
    pub together: bool,
}

impl Default for AskSettings {
    /// chatml, one fact per question, 64 new tokens: what small instruct
    /// models answer best (see the research notes); answers decoded together.
    fn default() -> Self {
        Self { rendering: Rendering::Chatml, per_fact: true, max_new_tokens: 64, together: true }
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
    /// A single-turn span through several recipes, optimised together
    /// ([`Session::fork_compressed`]): one run per recipe.
    Together(&'a [Recipe]),
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
    /// Tokens of the span as rendered (all turns).
    pub n_tokens: usize,
    /// Cache entries standing for the span (n_tokens for full, 0 for none).
    pub n_kept: usize,
    /// Each compressed turn's report, in order (empty unless compressed).
    pub compressions: Vec<CompressionReport>,
    /// Seconds spent on the suffix and the questions.
    pub answer_seconds: f64,
}

/// A case's first turn's targets, kept for every condition that compresses
/// it: before the first turn every condition's session holds the same
/// prefix, so the turn's forward is the same for all (a sweep's methods and
/// ratios of one case), and is run once for each set of needs (surprisal,
/// queries). Later turns follow compressed turns, which differ by condition.
/// One model only: the key is the case and its rendered text. Held until
/// another case comes: at 4,000 tokens, several hundred MB for the 0.5B
/// with queries (each layer's), a few GB for the 7B.
#[derive(Default)]
pub struct FirstTurnTargets {
    /// The case, its rendered prefix and first turn they are for.
    case_id: String,
    prefix: String,
    text: String,
    /// By (with surprisal, with queries).
    by_needs: HashMap<(bool, bool), TurnTargets>,
}

impl FirstTurnTargets {
    /// Forgets what it holds unless it is for this case: the next case's
    /// baselines then run without the last case's targets in memory.
    fn forget_other_cases(&mut self, case: &Case) {
        if self.case_id != case.id {
            *self = Self::default();
        }
    }

    /// Forgets what it holds unless it is for this case, prefix and turn.
    fn keep_only(&mut self, case: &Case, prefix: &str, text: &str) {
        if (self.case_id.as_str(), self.prefix.as_str(), self.text.as_str()) != (case.id.as_str(), prefix, text) {
            *self = Self { case_id: case.id.clone(), prefix: prefix.to_string(), text: text.to_string(), by_needs: HashMap::new() };
        }
    }

    /// The first turn's targets with `compressor`'s needs, computed over
    /// `session` (the case's prefix) unless already held.
    fn for_turn(&mut self, session: &Session, text: &str, compressor: &dyn Compressor) -> Result<&TurnTargets> {
        let needs = (compressor.needs_surprisal(), compressor.needs_span_queries());
        Ok(match self.by_needs.entry(needs) {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(slot) => slot.insert(session.turn_targets(text, needs.0, needs.1)?),
        })
    }
}

/// Facts recalled over a list of answers: (correct, total).
pub fn facts_score(answers: &[Answered]) -> (usize, usize) {
    let facts = answers.iter().flat_map(|a| &a.facts);
    (facts.clone().filter(|(_, ok)| *ok).count(), facts.count())
}

/// Builds the context of `case` under `condition`, turn by turn for a
/// sequential case, and asks every question over it: one run, or one per
/// recipe of [`Condition::Together`]. `on_step` reports a compressor's
/// optimisation progress.
pub fn run_case(
    model: &Model,
    case: &Case,
    settings: &AskSettings,
    condition: Condition<'_>,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Vec<CaseRun>> {
    run_case_sharing(model, case, settings, condition, &mut FirstTurnTargets::default(), on_step)
}

/// [`run_case`], the first turn's targets taken from `first_turn` (or
/// computed and kept there): conditions of one case run one after another
/// share the first turn's forward.
pub fn run_case_sharing(
    model: &Model,
    case: &Case,
    settings: &AskSettings,
    condition: Condition<'_>,
    first_turn: &mut FirstTurnTargets,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Vec<CaseRun>> {
    first_turn.forget_other_cases(case);
    let prefix_text = settings.rendering.messages(&case.transcript.messages, &case.split.prefix);
    let prefix = Session::new(model, &prefix_text)?;
    let mut n_tokens = 0;
    let mut sessions = match condition {
        Condition::Together(recipes) => {
            let turns = case.turns();
            let [turn] = turns.as_slice() else {
                return Err(cram::Error::Invalid(format!(
                    "case `{}` compresses {} turns one after another: only a single-turn case's recipes can be optimised together",
                    case.id,
                    turns.len()
                ))
                .into());
            };
            let text = settings.rendering.messages(&case.transcript.messages, turn);
            n_tokens = model.tokenizer.encode(&text)?.len();
            prefix.fork_compressed(&text, recipes, on_step)?
        }
        _ => {
            let mut session = prefix;
            for (index, turn) in case.turns().iter().enumerate() {
                let text = settings.rendering.messages(&case.transcript.messages, turn);
                n_tokens += model.tokenizer.encode(&text)?.len();
                match condition {
                    Condition::Full => session.push_verbatim(&text)?,
                    // Nothing, and what follows closes the gap.
                    Condition::NoContext | Condition::Together(_) => {}
                    Condition::Compressed(compressor) if index == 0 => {
                        first_turn.keep_only(case, &prefix_text, &text);
                        let targets = first_turn.for_turn(&session, &text, compressor)?;
                        session.push_compressed_targets(targets, compressor, on_step)?;
                    }
                    Condition::Compressed(compressor) => {
                        session.push_compressed(&text, compressor, on_step)?;
                    }
                }
            }
            vec![session]
        }
    };
    sessions
        .drain(..)
        .map(|session| {
            let compressions: Vec<CompressionReport> = session.turns().iter().filter_map(|t| t.compression.clone()).collect();
            let n_kept = match condition {
                Condition::Full => n_tokens,
                _ => compressions.iter().map(|c| c.n_kept).sum(),
            };
            answer_after_span(session, case, settings, CaseRun { answers: Vec::new(), n_tokens, n_kept, compressions, answer_seconds: 0.0 })
        })
        .collect()
}

/// Pushes the suffix after the span's context and asks every question;
/// `run` gets the answers and their time.
fn answer_after_span(mut session: Session, case: &Case, settings: &AskSettings, mut run: CaseRun) -> Result<CaseRun> {
    let started = Instant::now();
    let tokenizer = &session.model().tokenizer;
    let mut suffix_ids = tokenizer.encode(&settings.rendering.messages(&case.transcript.messages, &case.split.suffix))?;
    if let Some(max_tokens) = case.suffix_max_tokens {
        suffix_ids.truncate(max_tokens);
        case.check_kept_text(&tokenizer.decode(&suffix_ids)?, settings.per_fact)?;
    }
    session.push_verbatim_ids(&suffix_ids)?;
    run.answers = ask_all(&session, case, settings)?;
    run.answer_seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// Every question of the case over the session (which they leave unchanged).
fn ask_all(session: &Session, case: &Case, settings: &AskSettings) -> Result<Vec<Answered>> {
    let questions: Vec<Question> =
        if settings.per_fact { case.questions.iter().flat_map(Question::per_fact).collect() } else { case.questions.clone() };
    let prompts: Vec<String> = questions.iter().map(|question| settings.rendering.question(&question.question)).collect();
    let answers = if settings.together {
        session.ask_together(&prompts, settings.max_new_tokens)?
    } else {
        prompts.iter().map(|prompt| session.ask(prompt, settings.max_new_tokens)).collect::<cram::Result<Vec<_>>>()?
    };
    Ok(questions
        .iter()
        .zip(answers)
        .map(|(question, answer)| {
            let facts = question.facts.iter().map(|f| (f.id.clone(), f.is_recalled(&answer))).collect();
            Answered { question_id: question.id.clone(), question: question.question.clone(), answer, facts }
        })
        .collect())
}
