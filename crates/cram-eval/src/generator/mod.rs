//! Generated coding-agent transcripts with planted exact facts, as many as a
//! comparison needs, deterministic from a seed (issue 27).
//!
//! A case is a system prompt, a task, then tool calls and their outputs
//! (manifests, compose and env files, schemas, logs, test output, stack
//! traces, git log, CLI help, source), then a last user turn. The tool
//! calls and outputs are the span to compress; the rest is kept. Each planted fact is one entry of a
//! document of the kind that would hold it, among filler entries of the
//! same kind, placed in the part of the span the settings ask for; each is
//! asked by a question whose no-context answer is wrong by construction.
//! Cases are written in the project's JSON transcript format, and loaded
//! through the same code as any transcript.

pub mod documents;
pub mod facts;
pub mod rng;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cases::{case_of_transcript_text, Case};
use crate::{EvalError, Result};
use documents::{filler_entry, DocKind, Document, ALL_DOCS};
use facts::{FactKind, PlantedFact, ALL_KINDS};
pub use rng::Rng;

/// Characters of a generated span, rendered with the chat template, per
/// Qwen2.5 token: 2.5 to 3.7 (median 3.0) on ten generated spans of 1,000
/// and 4,000 tokens (experiments/benchmark/README.md). It turns a span
/// length asked in tokens into text; the sweeps record the true count.
pub const CHARS_PER_TOKEN: f64 = 3.0;

/// Where a case's facts sit in its span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// In the first third.
    Early,
    Middle,
    /// In the last third.
    Late,
    /// Evenly over the span, one per equal share.
    #[default]
    Spread,
    /// Each fact in a third drawn at random.
    Mixed,
}

/// What to generate; a sweep config's `generate = { ... }` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorSettings {
    pub seed: u64,
    /// Cases to generate.
    pub count: usize,
    /// About how many tokens each span has: at least about 110 a fact,
    /// which each come in a tool call and output of their own.
    pub span_tokens: usize,
    /// Facts planted per case.
    pub facts: usize,
    pub placement: Placement,
    /// The kinds of fact drawn from (each case cycles through them).
    pub kinds: Vec<FactKind>,
    /// Also plant a near miss of a fact where its kind has one (`5434`
    /// elsewhere when `5433` is asked), rejected in answers.
    pub distractors: bool,
}

impl Default for GeneratorSettings {
    fn default() -> Self {
        Self { seed: 0, count: 10, span_tokens: 250, facts: 2, placement: Placement::Spread, kinds: ALL_KINDS.to_vec(), distractors: false }
    }
}

impl GeneratorSettings {
    /// Refuses settings that cannot make a case.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.count == 0 || self.facts == 0 || self.kinds.is_empty() {
            return Err("generate: count, facts and kinds must not be empty".into());
        }
        if !(50..=20_000).contains(&self.span_tokens) {
            return Err(format!("generate: span_tokens {} must be between 50 and 20000", self.span_tokens));
        }
        if self.facts > 12 {
            return Err(format!("generate: at most 12 facts a case, asked {}", self.facts));
        }
        Ok(())
    }

    /// The case ids' stem: the settings that make a case, so cases of two
    /// generate entries in one sweep do not share ids.
    fn stem(&self) -> String {
        format!("gen-s{}-t{}-f{}-{}", self.seed, self.span_tokens, self.facts, placement_name(self.placement))
    }
}

/// One generated case: its id and its transcript in our JSON format.
#[derive(Debug, Clone)]
pub struct GeneratedCase {
    pub id: String,
    pub json: serde_json::Value,
}

impl GeneratedCase {
    /// The case as the evaluator loads it (leak-checked like any other).
    pub fn to_case(&self) -> Result<Case> {
        let text = serde_json::to_string(&self.json).expect("generated JSON serialises");
        case_of_transcript_text(&text, Path::new(&format!("{}.json", self.id)))
    }
}

/// The cases `settings` describes, the same for the same settings.
pub fn generate(settings: &GeneratorSettings) -> Result<Vec<GeneratedCase>> {
    settings.check().map_err(|reason| EvalError::Model(cram::Error::Invalid(reason)))?;
    (0..settings.count).map(|index| generate_case(settings, index)).collect()
}

/// Writes each case to `dir/ID.json`; returns the paths.
pub fn write_cases(cases: &[GeneratedCase], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    cases
        .iter()
        .map(|case| {
            let path = dir.join(format!("{}.json", case.id));
            let text = serde_json::to_string_pretty(&case.json).expect("generated JSON serialises");
            std::fs::write(&path, text + "\n").map_err(|e| EvalError::io(&path, e))?;
            Ok(path)
        })
        .collect()
}

const SYSTEM_PROMPT: &str = "You are a coding agent working in the user's repository. Read files and run commands with your tools before you change anything.";
const LAST_TURN: &str = "Thanks. Before you go on, answer a few questions about what you have read.";
const TASKS: [&str; 4] = [
    "Add a CSV export to the reports page. Look around the project first.",
    "The nightly job failed. Find out why and propose a fix.",
    "Upgrade the dependencies that are out of date and make sure the tests still pass.",
    "Document how to run the service locally in the README.",
];
/// Characters of a filler document's entries: the span beyond its facts'
/// documents is made of documents of about this size.
const DOCUMENT_CHARS: usize = 480;
/// Draws of a case before its facts' thirds are taken as they fell (a
/// draw that states an answer twice is never taken).
const PLACEMENT_ATTEMPTS: usize = 20;

fn generate_case(settings: &GeneratorSettings, index: usize) -> Result<GeneratedCase> {
    let mut rng = Rng::new(settings.seed.wrapping_mul(0x9E37_79B9).wrapping_add(index as u64));
    let id = format!("{}-{index:03}", settings.stem());
    let task = rng.choose(&TASKS).to_string();
    // Documents vary in size, so a draw can miss a third by a document;
    // another draw usually does not. After the last, the facts' recorded
    // thirds are where they fell.
    let mut attempt = 0;
    loop {
        let facts = draw_facts(settings, &mut rng);
        let asked = asked_thirds(settings.placement, facts.len(), &mut rng);
        let documents = lay_out(settings, &facts, &asked, &mut rng);
        let (json, span) = transcript_json(&id, &task, &documents, &facts);
        attempt += 1;
        // An answer must be stated once: inside a hash or a version by chance it would sit elsewhere too.
        let stated_once = facts.iter().all(|fact| span.matches(fact.answer.as_str()).count() == 1);
        if stated_once && (attempt >= PLACEMENT_ATTEMPTS || placements_met(&json, &asked)) {
            return Ok(GeneratedCase { id, json });
        }
        if attempt == 10 * PLACEMENT_ATTEMPTS {
            return Err(EvalError::Model(cram::Error::Invalid(format!("generate: case {id} states an answer twice in every draw"))));
        }
    }
}

/// The third (0, 1, 2) each fact is asked to sit in; `None` for `spread`,
/// which asks for even spacing, not thirds.
fn asked_thirds(placement: Placement, n: usize, rng: &mut Rng) -> Vec<Option<usize>> {
    match placement {
        Placement::Early => vec![Some(0); n],
        Placement::Middle => vec![Some(1); n],
        Placement::Late => vec![Some(2); n],
        Placement::Spread => vec![None; n],
        Placement::Mixed => (0..n).map(|_| Some(rng.below(3))).collect(),
    }
}

/// Whether every fact landed in the third asked (the questions record where they fell).
fn placements_met(json: &serde_json::Value, asked: &[Option<usize>]) -> bool {
    let questions = json["questions"].as_array().expect("generated questions");
    questions.iter().zip(asked).all(|(question, third)| third.is_none_or(|third| question["placement"] == THIRDS[third]))
}

/// The documents of a span: one per fact (and per distractor), among
/// filler documents that bring the span to its length, in an order that
/// puts each fact at its aimed place.
fn lay_out(settings: &GeneratorSettings, facts: &[PlantedFact], asked: &[Option<usize>], rng: &mut Rng) -> Vec<Document> {
    let n = facts.len();
    // (aimed position in the span, host, entry, place among the host's entries)
    let mut planted: Vec<(f64, DocKind, String, f64)> = Vec::new();
    for (index, (fact, third)) in facts.iter().zip(asked).enumerate() {
        let position = match third {
            // Inside the third, away from its edges.
            Some(third) => (*third as f64 + 0.2 + 0.6 * rng.unit()) / 3.0,
            None => (index as f64 + 0.5) / n as f64,
        };
        planted.push((position, fact.host, fact.entry.clone(), position));
        if let Some(near_miss) = &fact.distractor {
            planted.push(((position + 0.5) % 1.0, near_miss.host, near_miss.entry.clone(), rng.unit()));
        }
    }
    let target_chars = (settings.span_tokens as f64 * CHARS_PER_TOKEN) as usize;
    // The facts' documents with no filler, measured on a copy of the generator.
    let bare: usize = planted.iter().map(|(_, host, entry, within)| hosting(*host, entry.clone(), *within, 0, &mut rng.clone()).size()).sum();
    let room = target_chars.saturating_sub(bare);
    // Where the room would not hold a filler document, the facts' own documents take it all.
    let own_filler = if room < 2 * DOCUMENT_CHARS { room / planted.len().max(1) } else { DOCUMENT_CHARS / 3 };
    let aimed: Vec<(f64, Document)> =
        planted.into_iter().map(|(position, host, entry, within)| (position, hosting(host, entry, within, own_filler, rng))).collect();
    let mut left = target_chars.saturating_sub(aimed.iter().map(|(_, document)| document.size()).sum());
    let mut filler = Vec::new();
    loop {
        let mut document = Document::new(*rng.choose(&ALL_DOCS), rng);
        // The call, the template and the document's frame come with any entries.
        let overhead = document.size();
        if left < overhead + DOCUMENT_CHARS / 8 {
            break;
        }
        fill(&mut document, (left - overhead).min(DOCUMENT_CHARS), rng);
        left = left.saturating_sub(document.size());
        filler.push(document);
    }
    order(aimed, filler)
}

/// A document of kind `host` holding `entry` at relative place `within`
/// among about `filler` characters of filler of its own.
fn hosting(host: DocKind, entry: String, within: f64, filler: usize, rng: &mut Rng) -> Document {
    let mut document = Document::new(host, rng);
    document.planted.push((within, entry));
    fill(&mut document, filler, rng);
    document
}

/// The aimed documents at their places among the filler: each goes where
/// the text before it is closest to its aimed share of the whole.
fn order(mut aimed: Vec<(f64, Document)>, filler: Vec<Document>) -> Vec<Document> {
    aimed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: usize = aimed.iter().map(|(_, document)| document.size()).chain(filler.iter().map(Document::size)).sum();
    let mut documents = Vec::new();
    let mut before = 0;
    let mut filler = filler.into_iter().peekable();
    for (position, document) in aimed {
        let goal = position * total as f64 - document.size() as f64 / 2.0;
        while let Some(next) = filler.peek() {
            // Take the next filler if that brings the text before closer to the goal.
            if ((before + next.size()) as f64 - goal).abs() >= (before as f64 - goal).abs() {
                break;
            }
            before += next.size();
            documents.push(filler.next().expect("peeked"));
        }
        before += document.size();
        documents.push(document);
    }
    documents.extend(filler);
    documents
}

/// `settings.facts` facts, cycling through the kinds from a random start,
/// never two of one template; fewer if the kinds' templates run out.
fn draw_facts(settings: &GeneratorSettings, rng: &mut Rng) -> Vec<PlantedFact> {
    let mut facts: Vec<PlantedFact> = Vec::new();
    let start = rng.below(settings.kinds.len());
    for attempt in 0..settings.facts * settings.kinds.len() {
        if facts.len() == settings.facts {
            break;
        }
        let kind = settings.kinds[(start + attempt) % settings.kinds.len()];
        let used: Vec<&'static str> = facts.iter().map(|fact| fact.template).collect();
        if let Some(fact) = PlantedFact::draw(kind, &used, settings.distractors, rng) {
            // Two values of a case may not contain one another: an answer naming one would count for both.
            let overlaps = facts.iter().any(|other| other.answer.contains(&fact.answer) || fact.answer.contains(&other.answer));
            if !overlaps {
                facts.push(fact);
            }
        }
    }
    facts
}

/// Adds filler entries around the planted ones until the document holds
/// about `chars` characters (none if its planted entries already do); the
/// planted entries sit at their relative places.
fn fill(document: &mut Document, chars: usize, rng: &mut Rng) {
    let mut planted = std::mem::take(&mut document.planted);
    let mut filler = Vec::new();
    let mut length: usize = planted.iter().map(|(_, entry)| entry.len() + 1).sum();
    // Repeated filler reads as a bug: a kind whose variety is spent stops short.
    let mut repeats = 0;
    let mut seen: Vec<String> = planted.iter().map(|(_, entry)| filler_key(document.kind, entry)).collect();
    while length < chars && repeats < 50 {
        let entry = filler_entry(document.kind, rng);
        let key = filler_key(document.kind, &entry);
        if seen.contains(&key) {
            repeats += 1;
            continue;
        }
        seen.push(key);
        length += entry.len() + 1;
        filler.push(entry);
    }
    if document.kind == DocKind::StackTrace {
        // The frame that raised is the last one.
        planted.iter_mut().for_each(|(within, _)| *within = 1.0);
    }
    planted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut entries = Vec::with_capacity(filler.len() + planted.len());
    let mut planted = planted.into_iter().peekable();
    let total = filler.len();
    for (index, entry) in filler.into_iter().enumerate() {
        while planted.peek().is_some_and(|(within, _)| *within * total as f64 <= index as f64) {
            entries.push(planted.next().expect("peeked").1);
        }
        entries.push(entry);
    }
    entries.extend(planted.map(|(_, entry)| entry));
    document.entries = entries;
}

/// What makes two entries of a document the same entry: a manifest lists a
/// package once whatever its version, a log repeats no message whatever its
/// time, a git log no subject whatever its hash.
fn filler_key(kind: DocKind, entry: &str) -> String {
    let text = if kind == DocKind::GitLog { entry.split_once(' ').map_or(entry, |(_, subject)| subject) } else { entry };
    text.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// The transcript in our JSON format, with one question per fact carrying
/// its kind and the third of the span its answer landed in.
/// Returns it with its span as rendered.
fn transcript_json(id: &str, task: &str, documents: &[Document], facts: &[PlantedFact]) -> (serde_json::Value, String) {
    let mut messages = vec![json!({ "role": "system", "content": SYSTEM_PROMPT }), json!({ "role": "user", "content": task })];
    for document in documents {
        messages.push(json!({ "role": "assistant", "content": document.call() }));
        messages.push(json!({ "role": "tool", "content": document.render() }));
    }
    messages.push(json!({ "role": "user", "content": LAST_TURN }));
    // The system prompt and the task are kept, the tool calls and outputs
    // compressed, the last turn kept.
    let last = messages.len() - 1;
    let compressed: Vec<usize> = (2..last).collect();
    let span = chatml_span(&messages, &compressed);
    let questions: Vec<serde_json::Value> = facts
        .iter()
        .enumerate()
        .map(|(index, fact)| {
            let offset = span.find(&fact.entry).map_or(0.5, |at| (at + fact.entry.find(&fact.answer).unwrap_or(0)) as f64 / span.len() as f64);
            json!({
                "id": format!("f{index}-{}", fact.template),
                "question": fact.question,
                "expect_any": [fact.answer],
                "reject_any": fact.reject,
                "wrong_default": fact.wrong_default,
                "kind": fact.kind.name(),
                "placement": third_name(offset),
            })
        })
        .collect();
    let json = json!({
        "id": id,
        "description": "Generated by cram's case generator (cram-eval generator): a coding agent reads tool outputs with planted facts.",
        "messages": messages,
        "prefix": [0, 1],
        "compress": compressed,
        "suffix": [last],
        "questions": questions,
    });
    (json, span)
}

/// The `compressed` messages rendered as the evaluator renders them.
fn chatml_span(messages: &[serde_json::Value], compressed: &[usize]) -> String {
    let text = serde_json::to_string(&json!({ "id": "span", "messages": messages })).expect("messages serialise");
    let transcript = crate::transcript::Transcript::from_text(&text, Path::new("span.json")).expect("generated messages parse");
    crate::render::Rendering::Chatml.messages(&transcript.messages, compressed)
}

/// The thirds of a span, by name.
const THIRDS: [&str; 3] = ["early", "middle", "late"];

/// `early`, `middle` or `late`: the third of the span at `offset` (0 to 1).
pub fn third_name(offset: f64) -> &'static str {
    THIRDS[((offset * 3.0) as usize).min(2)]
}

fn placement_name(placement: Placement) -> &'static str {
    match placement {
        Placement::Early => "early",
        Placement::Middle => "middle",
        Placement::Late => "late",
        Placement::Spread => "spread",
        Placement::Mixed => "mixed",
    }
}
