//! The case files that say how a transcript is split and what is asked
//! about its compressed span.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::questions::Question;
use crate::render::Rendering;
use crate::transcript::{Split, Transcript};
use crate::{EvalError, Result};

/// A transcript, how it is split, and what is asked about the compressed span.
#[derive(Debug, Clone)]
pub struct Case {
    pub id: String,
    pub transcript: Transcript,
    pub split: Split,
    pub questions: Vec<Question>,
    /// The rendering the case file names (`chatml` if it names none).
    pub rendering: Rendering,
    /// Whether the span is compressed whole or turn by turn.
    pub kind: CaseKind,
    /// Keep only the suffix's first tokens (the published sequential case
    /// cuts its last turn to 38 tokens).
    pub suffix_max_tokens: Option<usize>,
}

/// How a case's span is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaseKind {
    /// All compressed messages as one span.
    #[default]
    SingleTurn,
    /// Each compressed message in turn, against the running compressed cache.
    Sequential,
}

impl Case {
    /// The message indices of each span compressed in turn: one span of all
    /// of them for a single-turn case, one per message for a sequential one.
    pub fn turns(&self) -> Vec<Vec<usize>> {
        match self.kind {
            CaseKind::SingleTurn => vec![self.split.compress.clone()],
            CaseKind::Sequential => self.split.compress.iter().map(|&i| vec![i]).collect(),
        }
    }
}

/// Reads the cases of a file: a case file (`bearing-questions.json` form: a
/// transcript path relative to it and cases with their splits), or a
/// transcript in our JSON format carrying its own questions (one case).
pub fn load_case_file(path: &Path) -> Result<Vec<Case>> {
    let text = crate::bundled::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let is_case_file = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| EvalError::Transcript { path: path.into(), reason: e.to_string() })?
        .get("cases")
        .is_some();
    if is_case_file {
        load_cases_of_case_file(path, &text)
    } else {
        Ok(vec![case_of_transcript(path)?])
    }
}

/// A transcript of our JSON format as one case: its own split, or the
/// default (system prompt kept, last user turn onward kept, the rest compressed).
fn case_of_transcript(path: &Path) -> Result<Case> {
    let text = crate::bundled::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    case_of_transcript_text(&text, path)
}

/// [`case_of_transcript`] of a transcript already read (or generated);
/// `path` names it in errors.
pub(crate) fn case_of_transcript_text(text: &str, path: &Path) -> Result<Case> {
    let transcript = Transcript::from_text(text, path)?;
    if transcript.questions.is_empty() {
        return Err(EvalError::Transcript { path: path.into(), reason: "the transcript has no questions".into() });
    }
    let split = match &transcript.split {
        Some(split) => split.clone(),
        None => {
            let count = transcript.messages.len();
            let last_user = transcript.messages.iter().rposition(|m| m.role == "user").unwrap_or(count);
            Split { prefix: vec![0], compress: (1..last_user).collect(), suffix: (last_user..count).collect() }
        }
    };
    check_split(&transcript, &split, path)?;
    Ok(Case {
        id: transcript.id.clone(),
        questions: transcript.questions.clone(),
        transcript,
        split,
        rendering: Rendering::Chatml,
        kind: CaseKind::SingleTurn,
        suffix_max_tokens: None,
    })
}

fn load_cases_of_case_file(path: &Path, text: &str) -> Result<Vec<Case>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CaseFile {
        transcript: PathBuf,
        render: Option<Rendering>,
        #[allow(dead_code)]
        notes: Option<String>,
        cases: Vec<CaseEntry>,
    }
    #[derive(Deserialize)]
    struct CaseEntry {
        id: String,
        prefix: Vec<usize>,
        compress: Vec<usize>,
        #[serde(default)]
        suffix: Vec<usize>,
        #[serde(default)]
        kind: CaseKind,
        suffix_max_tokens: Option<usize>,
        questions: Vec<Question>,
    }
    let file: CaseFile =
        serde_json::from_str(text).map_err(|e| EvalError::Transcript { path: path.into(), reason: e.to_string() })?;
    let transcript_path = path.parent().unwrap_or(Path::new(".")).join(&file.transcript);
    let transcript = Transcript::load(&transcript_path)?;
    let rendering = file.render.unwrap_or(Rendering::Chatml);
    let cases = file
        .cases
        .into_iter()
        .map(|entry| {
            let split = Split { prefix: entry.prefix, compress: entry.compress, suffix: entry.suffix };
            check_split(&transcript, &split, path)?;
            Ok(Case {
                id: entry.id,
                transcript: transcript.clone(),
                split,
                questions: entry.questions,
                rendering,
                kind: entry.kind,
                suffix_max_tokens: entry.suffix_max_tokens,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(cases)
}

fn check_split(transcript: &Transcript, split: &Split, path: &Path) -> Result<()> {
    let count = transcript.messages.len();
    let out_of_range = split.prefix.iter().chain(&split.compress).chain(&split.suffix).find(|&&i| i >= count);
    if let Some(index) = out_of_range {
        return Err(EvalError::Transcript {
            path: path.into(),
            reason: format!("message index {index} is past the transcript's {count} messages"),
        });
    }
    if split.compress.is_empty() {
        return Err(EvalError::Transcript { path: path.into(), reason: "no turn left to compress".into() });
    }
    Ok(())
}

impl Case {
    /// Refuses a case whose answers can be read outside the compressed span:
    /// a fact leaks when the kept prefix and suffix, or the question, would
    /// on their own score it as recalled. A question that names an answer
    /// only as one of the options it offers ("a library or regex?") does not
    /// give it away, so such a mention does not count. Questions are checked
    /// as they will be asked: whole, or one fact at a time with `per_fact`.
    ///
    /// A suffix cut to its first tokens can only be checked as cut once it is
    /// tokenized: [`crate::evaluate::run_case`] does that with
    /// [`Case::check_kept_text`].
    pub fn check_leaks(&self, rendering: Rendering, per_fact: bool) -> Result<()> {
        let messages = &self.transcript.messages;
        let mut kept = rendering.messages(messages, &self.split.prefix);
        if self.suffix_max_tokens.is_none() {
            kept.push('\n');
            kept.push_str(&rendering.messages(messages, &self.split.suffix));
        }
        self.check_kept_text(&kept, per_fact)
    }

    /// Refuses the case if `kept` (text the model reads besides the span),
    /// or a question, would on its own score a fact as recalled.
    pub fn check_kept_text(&self, kept: &str, per_fact: bool) -> Result<()> {
        let asked: Vec<Question> =
            if per_fact { self.questions.iter().flat_map(Question::per_fact).collect() } else { self.questions.clone() };
        for question in &asked {
            for fact in &question.facts {
                let expected: Vec<String> = fact.groups().into_iter().flatten().collect();
                let asked = mask_offered_options(&question.question, &expected);
                for (place, text) in [("the kept prefix or suffix", kept), ("the question", asked.as_str())] {
                    if fact.is_recalled(text) {
                        let lower = text.to_lowercase();
                        let answer = expected.iter().find(|e| lower.contains(&e.to_lowercase())).cloned().unwrap_or_default();
                        return Err(EvalError::Leak { case: self.id.clone(), fact: fact.id.clone(), answer, place: place.into() });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The question, lower-cased, with every mention of an expected answer
/// that is one side of an "A or B" choice blanked out.
fn mask_offered_options(question: &str, expected: &[String]) -> String {
    let mut text = question.to_lowercase();
    for needle in expected.iter().map(|e| e.to_lowercase()).filter(|e| !e.is_empty()) {
        let offered: Vec<usize> =
            text.match_indices(&needle).map(|(at, _)| at).filter(|&at| offered_as_option(&text, at, needle.len())).collect();
        for at in offered {
            text.replace_range(at..at + needle.len(), &" ".repeat(needle.len()));
        }
    }
    text
}

/// Whether the text at `at..at + len` is one side of an "A or B" choice.
fn offered_as_option(text: &str, at: usize, len: usize) -> bool {
    let before = text[..at].trim_end();
    let after = text[at + len..].trim_start();
    before.ends_with(" or") || after.starts_with("or ")
}
