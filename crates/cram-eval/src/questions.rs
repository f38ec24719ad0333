//! Questions and the facts their answers are scored on (keyword matching).

use serde::Deserialize;

/// One fact an answer must state.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fact {
    pub id: String,
    /// Groups of alternatives: every group must match, any string of a group
    /// matches (case-insensitive).
    #[serde(default)]
    pub expect: Vec<Vec<String>>,
    /// Shorthand for `expect: [expect_any]`.
    #[serde(default)]
    pub expect_any: Vec<String>,
    /// Any of these in the answer makes the fact wrong.
    #[serde(default)]
    pub reject_any: Vec<String>,
    /// What the model is expected to say without context (documentation).
    #[serde(default)]
    pub wrong_default: Option<String>,
    /// What the fact is about (a generated case's `port`, `dependency`, ...),
    /// for breaking results down.
    #[serde(default)]
    pub kind: Option<String>,
    /// The third of the span its answer sits in (`early`, `middle`, `late`),
    /// where a generated case records it.
    #[serde(default)]
    pub placement: Option<String>,
}

impl Fact {
    /// All groups, `expect_any` included.
    pub fn groups(&self) -> Vec<Vec<String>> {
        let mut groups = self.expect.clone();
        if !self.expect_any.is_empty() {
            groups.push(self.expect_any.clone());
        }
        groups
    }

    /// Whether `answer` states this fact.
    pub fn is_recalled(&self, answer: &str) -> bool {
        let answer = answer.to_lowercase();
        let contains = |s: &String| answer.contains(&s.to_lowercase());
        let groups = self.groups();
        !groups.is_empty() && groups.iter().all(|group| group.iter().any(contains)) && !self.reject_any.iter().any(contains)
    }
}

/// A question and the facts its answer is scored on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "QuestionEntry")]
pub struct Question {
    pub id: String,
    pub question: String,
    pub facts: Vec<Fact>,
}

/// A question as written: its `facts`, or one fact inline (`expect`,
/// `expect_any`, `reject_any`, `wrong_default` on the question itself, the
/// fact taking the question's id).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuestionEntry {
    id: String,
    question: String,
    facts: Option<Vec<Fact>>,
    #[serde(default)]
    expect: Vec<Vec<String>>,
    #[serde(default)]
    expect_any: Vec<String>,
    #[serde(default)]
    reject_any: Vec<String>,
    #[serde(default)]
    wrong_default: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    placement: Option<String>,
}

impl TryFrom<QuestionEntry> for Question {
    type Error = String;

    fn try_from(entry: QuestionEntry) -> std::result::Result<Self, String> {
        let inline = !entry.expect.is_empty() || !entry.expect_any.is_empty();
        if !inline && (!entry.reject_any.is_empty() || entry.wrong_default.is_some() || entry.kind.is_some() || entry.placement.is_some()) {
            return Err(format!(
                "question `{}`: `reject_any`, `wrong_default`, `kind` and `placement` inline need an inline `expect` or `expect_any`",
                entry.id
            ));
        }
        let facts = match (entry.facts, inline) {
            (Some(facts), false) => facts,
            (None, true) => vec![Fact {
                id: entry.id.clone(),
                expect: entry.expect,
                expect_any: entry.expect_any,
                reject_any: entry.reject_any,
                wrong_default: entry.wrong_default,
                kind: entry.kind,
                placement: entry.placement,
            }],
            (Some(_), true) => return Err(format!("question `{}` has both `facts` and an inline fact: give one", entry.id)),
            (None, false) => return Err(format!("question `{}` has no facts: give `facts` or an inline `expect` / `expect_any`", entry.id)),
        };
        Ok(Self { id: entry.id, question: entry.question, facts })
    }
}

impl Question {
    /// The question asked one fact at a time, when it is a run of as many
    /// `?`-ended sentences as it has facts (the published T8 question asks
    /// three things at once, which small models answer poorly); otherwise
    /// the question whole.
    pub fn per_fact(&self) -> Vec<Question> {
        let sentences: Vec<String> = self
            .question
            .split_inclusive('?')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let splits = sentences.len() == self.facts.len() && sentences.iter().all(|s| s.ends_with('?'));
        if !splits || self.facts.len() == 1 {
            return vec![self.clone()];
        }
        sentences
            .into_iter()
            .zip(&self.facts)
            .map(|(sentence, fact)| Question {
                id: format!("{}/{}", self.id, fact.id),
                question: sentence,
                facts: vec![fact.clone()],
            })
            .collect()
    }
}
