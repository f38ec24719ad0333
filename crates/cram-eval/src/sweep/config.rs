//! A sweep's config, as written in `configs/NAME.toml`: the model, the
//! cases, the methods (by their registry names, with their own knobs) and
//! the settings they share. Every problem is an error naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cram::registry::{self, MethodOptions};
use cram::{Compressor, OptimizerConfig, PositionMode, Recipe};
use serde::{Deserialize, Serialize};

use crate::bundled;
use crate::cases::{load_case_file, Case};
use crate::evaluate::AskSettings;
use crate::generator::{self, GeneratedCase, GeneratorSettings};
use crate::render::Rendering;
use crate::{EvalError, Result};

/// A sweep, as written in `configs/NAME.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// A known model name, a `.gguf` path, a safetensors directory or an hf-hub repo id.
    pub model: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Case files and, optionally, which of their cases to run.
    pub cases: Vec<CaseSource>,
    /// Compression methods, each run at every ratio (its own, if it names
    /// them: `{ method = "hybrid", ratios = [2.0] }`) and, when its result
    /// depends on the seed (a random init), at every seed.
    pub methods: Vec<MethodEntry>,
    /// Reference conditions run once per case.
    #[serde(default = "default_baselines")]
    pub baselines: Vec<Baseline>,
    /// The ratios of every method entry that does not name its own.
    #[serde(default)]
    pub ratios: Vec<f64>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub positions: PositionMode,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub ask: AskConfig,
    /// When set, the recipe cells of one single-turn case (its ratios,
    /// poolings and random-start seeds) are optimized together, in batches
    /// of at most this many virtual tokens in all: one forward and one
    /// backward a step for the batch. This pays on a GPU, which one span
    /// under-fills; on a CPU the step is compute-bound and a batch costs
    /// about the sum of its cells. Cells with early stopping run alone.
    #[serde(default)]
    pub batch_virtual_tokens: Option<usize>,
    /// How often, in seconds, an optimization in progress saves its state
    /// under `OUT/checkpoints/` (0: after every step); a sweep killed
    /// mid-cell resumes the cell from there.
    #[serde(default = "default_checkpoint_seconds")]
    pub checkpoint_seconds: f64,
    /// Score every cell only on the facts the `full` baseline recalls and
    /// the `none` baseline misses (`crate::calibration`); needs both.
    #[serde(default)]
    pub calibrate: bool,
}

/// `[ask]`: how questions are put and answered. A rendering left out is
/// the one the case file names (`"render"`), so a case file written for
/// `turn-markers` is asked that way unless the config says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AskConfig {
    pub rendering: Option<Rendering>,
    /// Ask one fact at a time when a question is a run of `?` sentences.
    pub per_fact: bool,
    pub max_new_tokens: usize,
    /// Decode a case's answers together (see [`AskSettings::together`]);
    /// `false` decodes them one after another, as every build before
    /// 49399ab did (the runs recorded before answers were decoded together).
    pub together: bool,
}

impl Default for AskConfig {
    fn default() -> Self {
        let AskSettings { per_fact, max_new_tokens, together, .. } = AskSettings::default();
        Self { rendering: None, per_fact, max_new_tokens, together }
    }
}

impl AskConfig {
    /// The settings `case` is asked with.
    pub fn for_case(&self, case: &Case) -> AskSettings {
        AskSettings {
            rendering: self.rendering.unwrap_or(case.rendering),
            per_fact: self.per_fact,
            max_new_tokens: self.max_new_tokens,
            together: self.together,
        }
    }
}

/// Five minutes: at most a few minutes of work lost, for a few MB written.
fn default_checkpoint_seconds() -> f64 {
    300.0
}

fn default_device() -> String {
    "cpu".into()
}

fn default_baselines() -> Vec<Baseline> {
    vec![Baseline::Full, Baseline::None]
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// Where a sweep's cases come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum CaseSource {
    /// A case file (any path: users bring their own transcripts) and the ids
    /// to run from it (all when absent): `{ file = "...", ids = [...] }`.
    File { file: PathBuf, ids: Option<Vec<String>> },
    /// Cases made by the generator: `{ generate = { seed = 1, count = 50,
    /// span_tokens = 250, facts = 3, placement = "spread" } }`. The sweep
    /// writes them under its output folder (`cases/`) to inspect or reuse.
    Generated { generate: GeneratorSettings },
}

/// A method at the sweep's ratios, or with its own settings:
/// `"snapkv"`, or `{ method = "snapkv", ratios = [2.0], window = 16 }`.
/// Besides `method` and `ratios`, a recipe-based method takes the recipe's
/// options (`key_weight`, `init`, `early_stop`); every other key is the
/// method's own knob, checked by the method (an unknown key is an error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "toml::Value", into = "toml::Value")]
pub struct MethodEntry {
    /// The registry name (`surprisal`, `snapkv`, ...).
    pub method: String,
    pub ratios: Option<Vec<f64>>,
    /// Weight of the K term (0: V only, the published objective).
    pub key_weight: Option<f64>,
    /// `chunk-mean`, `random` (seeded by the cell's seed),
    /// `attention-matching` (the tokens its fits keep, at their own
    /// positions) or an eviction method's name (the embeddings of the
    /// tokens it keeps).
    pub init: Option<String>,
    /// Overrides whether `optimizer.early_stop` applies (true with no
    /// `optimizer.early_stop` uses the default rule).
    pub early_stop: Option<bool>,
    /// The method's own settings.
    pub knobs: toml::Table,
}

/// The keys of a method table that are not the method's own knobs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryKeys {
    method: String,
    ratios: Option<Vec<f64>>,
    key_weight: Option<f64>,
    init: Option<String>,
    early_stop: Option<bool>,
}

impl TryFrom<toml::Value> for MethodEntry {
    type Error = String;

    fn try_from(value: toml::Value) -> std::result::Result<Self, String> {
        match value {
            toml::Value::String(method) => Ok(Self::named(method)),
            toml::Value::Table(mut knobs) => {
                let mut keys = toml::Table::new();
                for key in ["method", "ratios", "key_weight", "init", "early_stop"] {
                    if let Some(value) = knobs.remove(key) {
                        keys.insert(key.into(), value);
                    }
                }
                let keys: EntryKeys = toml::Value::Table(keys).try_into().map_err(|e| format!("in a method table: {e}"))?;
                let EntryKeys { method, ratios, key_weight, init, early_stop } = keys;
                Ok(Self { method, ratios, key_weight, init, early_stop, knobs })
            }
            other => Err(format!("a method entry is a name or a table, not {}", other.type_str())),
        }
    }
}

impl From<MethodEntry> for toml::Value {
    fn from(entry: MethodEntry) -> Self {
        if entry == MethodEntry::named(entry.method.clone()) {
            return toml::Value::String(entry.method);
        }
        let mut table = toml::Table::new();
        table.insert("method".into(), entry.method.into());
        if let Some(ratios) = entry.ratios {
            table.insert("ratios".into(), ratios.into());
        }
        if let Some(key_weight) = entry.key_weight {
            table.insert("key_weight".into(), key_weight.into());
        }
        if let Some(init) = entry.init {
            table.insert("init".into(), init.into());
        }
        if let Some(early_stop) = entry.early_stop {
            table.insert("early_stop".into(), early_stop.into());
        }
        table.extend(entry.knobs);
        toml::Value::Table(table)
    }
}

impl MethodEntry {
    /// The method with every setting at its default.
    pub fn named(method: String) -> Self {
        Self { method, ratios: None, key_weight: None, init: None, early_stop: None, knobs: toml::Table::new() }
    }

    /// The ratios this entry runs at: its own, or the sweep's.
    pub fn ratios<'a>(&'a self, sweep_ratios: &'a [f64]) -> &'a [f64] {
        self.ratios.as_deref().unwrap_or(sweep_ratios)
    }

    /// Whether cells differ by seed (only a random start does).
    pub fn seeded(&self) -> bool {
        self.init.as_deref() == Some("random")
    }

    /// The registry line of the entry's method.
    pub fn registered(&self) -> cram::Result<&'static registry::Method> {
        registry::method(&self.method)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let method = self.registered().map_err(|e| e.to_string())?;
        let recipe_options = self.key_weight.is_some() || self.init.is_some() || self.early_stop.is_some();
        if recipe_options && !method.optimizes() {
            return Err(format!("method {} does not optimize: key_weight, init and early_stop do not apply", self.method));
        }
        if let Some(weight) = self.key_weight.filter(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(format!("key_weight {weight} must be >= 0"));
        }
        Ok(())
    }
}

/// A reference condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// The span verbatim.
    Full,
    /// No span.
    None,
    /// The span's own embeddings through the compressed path.
    Raw,
    /// The span dropped; what follows keeps its original positions.
    Truncated,
}

impl Baseline {
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Full => "full",
            Baseline::None => "none",
            Baseline::Raw => "raw",
            Baseline::Truncated => "truncated",
        }
    }
}

impl SweepConfig {
    /// Reads and validates a config; every problem is an error naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| EvalError::Config { path: path.to_path_buf(), reason };
        let text = crate::bundled::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        let config: Self = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        config.check(path)?;
        Ok(config)
    }

    /// Validates the config as it stands (say, after command-line
    /// overrides); errors name `path`, the file it came from.
    pub fn check(&self, path: &Path) -> Result<()> {
        self.validate().map_err(|reason| EvalError::Config { path: path.to_path_buf(), reason })
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let all_ratios = self.methods.iter().flat_map(|m| m.ratios(&self.ratios).iter());
        if let Some(ratio) = all_ratios.clone().find(|r| !(r.is_finite() && **r > 1.0)) {
            return Err(format!(
                "ratio {ratio} is not > 1: it would ask for at least as many virtual tokens as the span has tokens"
            ));
        }
        if self.cases.is_empty() {
            return Err("no [[cases]]".into());
        }
        if self.methods.is_empty() && self.baselines.is_empty() {
            return Err("nothing to run: no methods and no baselines".into());
        }
        if let Some(entry) = self.methods.iter().find(|m| m.ratios(&self.ratios).is_empty()) {
            return Err(format!("method {} has no ratios: set `ratios` at the top or in its entry", entry.method));
        }
        for entry in &self.methods {
            entry.validate()?;
            // Building every cell's method checks its knobs (and their fit with the ratio).
            for &ratio in entry.ratios(&self.ratios) {
                self.compressor(entry, ratio, self.seeds.first().copied().unwrap_or(0)).map_err(|error| error.to_string())?;
            }
        }
        let mut labels: Vec<String> = self.methods.iter().map(|entry| self.label(entry)).collect::<std::result::Result<_, _>>()?;
        labels.sort();
        if let Some(pair) = labels.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(format!("two method entries run as `{}`: give them different ratios in one entry instead", pair[0]));
        }
        if Duration::try_from_secs_f64(self.checkpoint_seconds).is_err() {
            return Err(format!("checkpoint_seconds {} must be a number of seconds >= 0", self.checkpoint_seconds));
        }
        if self.batch_virtual_tokens == Some(0) {
            return Err("batch_virtual_tokens must be >= 1".into());
        }
        if self.seeds.is_empty() {
            return Err("seeds is empty".into());
        }
        if self.calibrate && !(self.baselines.contains(&Baseline::Full) && self.baselines.contains(&Baseline::None)) {
            return Err("calibrate needs the `full` and `none` baselines".into());
        }
        self.optimizer.validate().map_err(|error| match error {
            cram::Error::Invalid(reason) => reason,
            other => other.to_string(),
        })
    }

    /// The cases the config names, loaded and leak-checked. Relative paths
    /// are taken from the current directory, then from the config's own.
    pub fn load_cases(&self, config_path: &Path) -> Result<Vec<Case>> {
        let mut cases = Vec::new();
        // Cells are keyed by case id: a second case of the same id would
        // never run, its cells taken for the first's.
        let mut origins: HashMap<String, String> = HashMap::new();
        for source in &self.cases {
            let (chosen, origin) = match source {
                CaseSource::File { file, ids } => {
                    let file = self.case_file(config_path, file)?;
                    (chosen_cases(&file, ids.as_deref(), config_path)?, file.display().to_string())
                }
                CaseSource::Generated { generate } => {
                    let generated = generator::generate(generate)?;
                    (generated.iter().map(GeneratedCase::to_case).collect::<Result<Vec<_>>>()?, "a generate entry".to_string())
                }
            };
            for case in &chosen {
                if let Some(first) = origins.insert(case.id.clone(), origin.clone()) {
                    return Err(EvalError::Config {
                        path: config_path.to_path_buf(),
                        reason: format!("case id `{}` is named twice ({first} and {origin}): give each case its own id", case.id),
                    });
                }
                let ask = self.ask.for_case(case);
                case.check_leaks(ask.rendering, ask.per_fact)?;
            }
            cases.extend(chosen);
        }
        Ok(cases)
    }

    /// Writes every case the config names to `dir`: a `generate` entry's
    /// cases one JSON transcript each, a case file copied whole. The run can
    /// then be inspected and rerun from its own folder, and its report
    /// reads the facts' kinds and placements there.
    pub fn write_cases(&self, config_path: &Path, dir: &Path) -> Result<()> {
        for (index, source) in self.cases.iter().enumerate() {
            match source {
                CaseSource::Generated { generate } => {
                    generator::write_cases(&generator::generate(generate)?, dir)?;
                }
                CaseSource::File { file, .. } => {
                    let resolved = self.case_file(config_path, file)?;
                    let text = bundled::read_to_string(&resolved).map_err(|e| EvalError::io(&resolved, e))?;
                    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
                    let name = resolved.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| format!("cases-{index}.json"));
                    // Another file of the same name (from another folder) keeps both.
                    let mut copy = dir.join(&name);
                    if std::fs::read_to_string(&copy).is_ok_and(|there| there != text) {
                        copy = dir.join(format!("{index}-{name}"));
                    }
                    std::fs::write(&copy, &text).map_err(|e| EvalError::io(&copy, e))?;
                    copy_named_transcript(&resolved, &text, dir)?;
                }
            }
        }
        Ok(())
    }

    /// Where a case file named in the config is: bundled, absolute, or beside the config.
    fn case_file(&self, config_path: &Path, file: &Path) -> Result<PathBuf> {
        let beside_config = config_path.parent().unwrap_or(Path::new(".")).join(file);
        let resolved = if bundled::exists(file) || file.is_absolute() { file.to_path_buf() } else { beside_config };
        if !bundled::exists(&resolved) {
            return Err(EvalError::Config { path: config_path.to_path_buf(), reason: format!("case file {} not found", file.display()) });
        }
        Ok(resolved)
    }

    /// The recipe settings of an entry's cell at `ratio` (seed: for a
    /// random start): the library's published recipe, with the sweep's
    /// positions and optimiser and the entry's options.
    pub fn recipe(&self, entry: &MethodEntry, ratio: f64, seed: u64) -> cram::Result<Recipe> {
        let mut recipe = Recipe::published(ratio);
        recipe.positions = self.positions;
        recipe.optimizer = self.optimizer.clone();
        match entry.early_stop {
            Some(false) => recipe.optimizer.early_stop = None,
            Some(true) => recipe.optimizer.early_stop = Some(recipe.optimizer.early_stop.unwrap_or_default()),
            None => {}
        }
        if let Some(key_weight) = entry.key_weight {
            recipe.key_weight = key_weight;
        }
        if let Some(init) = &entry.init {
            recipe.init = registry::init(init, seed)?;
        }
        Ok(recipe)
    }

    /// What the registry builds an entry's cell at `ratio` from.
    pub fn method_options(&self, entry: &MethodEntry, ratio: f64, seed: u64) -> cram::Result<MethodOptions> {
        let knobs = serde_json::to_value(&entry.knobs).map_err(|e| cram::Error::Invalid(e.to_string()))?;
        Ok(MethodOptions { ratio, recipe: self.recipe(entry, ratio, seed)?, knobs })
    }

    /// The compressor of an entry's cell.
    pub fn compressor(&self, entry: &MethodEntry, ratio: f64, seed: u64) -> cram::Result<Box<dyn Compressor>> {
        entry.registered()?.build(&self.method_options(entry, ratio, seed)?)
    }

    /// The plain recipe of an entry's cell, when the method is one (its
    /// cells of one span can be optimised together).
    pub fn plain_recipe(&self, entry: &MethodEntry, ratio: f64, seed: u64) -> cram::Result<Option<Recipe>> {
        entry.registered()?.recipe(&self.method_options(entry, ratio, seed)?).transpose()
    }

    /// The name an entry's cells carry in the results: the method's own
    /// name (`surprisal-kv`, `hybrid`, `snapkv`, ...). An entry that departs
    /// from the config's `[optimizer] early_stop` says so: `-early` when it
    /// turns early stopping on, `-full-budget` when it turns it off. So plain
    /// `surprisal` runs as the config's optimizer says.
    pub fn label(&self, entry: &MethodEntry) -> std::result::Result<String, String> {
        let ratio = entry.ratios(&self.ratios).first().copied().unwrap_or(2.0);
        let mut label = self.compressor(entry, ratio, 0).map_err(|e| e.to_string())?.name();
        match entry.early_stop {
            Some(true) if self.optimizer.early_stop.is_none() => label.push_str("-early"),
            Some(false) if self.optimizer.early_stop.is_some() => label.push_str("-full-budget"),
            _ => {}
        }
        Ok(label)
    }
}

/// The cases of `file` named by `ids` (all when `None`), in that order.
fn chosen_cases(file: &Path, ids: Option<&[String]>, config_path: &Path) -> Result<Vec<Case>> {
    let all = load_case_file(file)?;
    let Some(ids) = ids else { return Ok(all) };
    ids.iter()
        .map(|id| {
            all.iter().find(|c| &c.id == id).cloned().ok_or_else(|| EvalError::Config {
                path: config_path.to_path_buf(),
                reason: format!("no case `{id}` in {}", file.display()),
            })
        })
        .collect()
}

/// A case file of the `bearing-questions.json` form names its transcript
/// relative to itself: the copy in `dir` needs the transcript beside it.
fn copy_named_transcript(case_file: &Path, text: &str, dir: &Path) -> Result<()> {
    let named = serde_json::from_str::<serde_json::Value>(text).ok().and_then(|json| json.get("transcript")?.as_str().map(PathBuf::from));
    let Some(transcript) = named else { return Ok(()) };
    let source = case_file.parent().unwrap_or(Path::new(".")).join(&transcript);
    let target = dir.join(&transcript);
    let content = bundled::read_to_string(&source).map_err(|e| EvalError::io(&source, e))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| EvalError::io(parent, e))?;
    }
    std::fs::write(&target, content).map_err(|e| EvalError::io(&target, e))
}
