//! Ratio sweeps from config files. Every cell (case x method x ratio x seed)
//! appends one JSON line to `results.jsonl` the moment it finishes; a rerun
//! skips the cells already there. The cell in progress (or the batch of
//! cells optimised together) saves its optimisation under `checkpoints/`
//! every few minutes, so a crash loses minutes of it, not hours; the files
//! go once the cell's line is written. `summary.csv` and the plots are
//! derived from the results.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cram::optimize::OptimizationReport;
use cram::{
    Checkpointing, CompressThenEvict, Compressor, Evict, Eviction, Hybrid, Init, Model, OptimizerConfig, Pooling, PositionMode, RawSpan,
    Recipe, Summarize, Tokenizer, Truncate,
};
use serde::{Deserialize, Serialize};

use crate::cases::{load_case_file, Case};
use crate::evaluate::{facts_score, run_case, run_case_together, Answered, AskSettings, CaseRun, Condition};
use crate::render::Rendering;
use crate::{memory, models};
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
    #[serde(default)]
    pub hybrid: HybridSettings,
    #[serde(default)]
    pub evict: EvictSettings,
    /// When set, the recipe cells of one single-turn case (its ratios,
    /// poolings and random-start seeds) are optimised together, in batches
    /// of at most this many virtual tokens in all: one forward and one
    /// backward a step for the batch. This pays on a GPU, which one span
    /// under-fills; on a CPU the step is compute-bound and a batch costs
    /// about the sum of its cells. Cells with early stopping run alone.
    #[serde(default)]
    pub batch_virtual_tokens: Option<usize>,
    /// How often, in seconds, an optimisation in progress saves its state
    /// under `OUT/checkpoints/` (0: after every step); a sweep killed
    /// mid-cell resumes the cell from there.
    #[serde(default = "default_checkpoint_seconds")]
    pub checkpoint_seconds: f64,
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
}

impl Default for AskConfig {
    fn default() -> Self {
        let AskSettings { per_fact, max_new_tokens, .. } = AskSettings::default();
        Self { rendering: None, per_fact, max_new_tokens }
    }
}

impl AskConfig {
    /// The settings `case` is asked with.
    pub fn for_case(&self, case: &Case) -> AskSettings {
        AskSettings { rendering: self.rendering.unwrap_or(case.rendering), per_fact: self.per_fact, max_new_tokens: self.max_new_tokens }
    }
}

/// Five minutes: at most a few minutes of work lost, for a few MB written.
fn default_checkpoint_seconds() -> f64 {
    300.0
}

/// The hybrid's knob.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridSettings {
    /// Share of a span's tokens kept verbatim.
    pub verbatim_share: f64,
}

impl Default for HybridSettings {
    fn default() -> Self {
        Self { verbatim_share: 0.15 }
    }
}

/// The eviction methods' knobs (and compress-then-evict's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvictSettings {
    /// The ratio the recipe compresses at before compress-evict's eviction.
    pub first_ratio: f64,
    /// Observing tokens (the span's last) that score the entries.
    pub window: usize,
    /// SnapKV's max-pool width.
    pub kernel: usize,
    /// StreamingLLM's sink tokens.
    pub sinks: usize,
}

impl Default for EvictSettings {
    fn default() -> Self {
        Self { first_ratio: 2.0, window: 32, kernel: 5, sinks: 4 }
    }
}

impl EvictSettings {
    fn snapkv(&self) -> Eviction {
        Eviction::SnapKv { window: self.window, kernel: self.kernel }
    }

    fn streaming(&self) -> Eviction {
        Eviction::Streaming { sinks: self.sinks }
    }
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

/// A case file (any path: users bring their own transcripts) and the ids to
/// run from it (all when absent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSource {
    pub file: PathBuf,
    pub ids: Option<Vec<String>>,
}

/// A compression method of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The published recipe with surprisal pooling.
    Surprisal,
    /// The recipe with uniform pooling (the ablation).
    Uniform,
    /// The most unique tokens verbatim, the rest through the recipe.
    Hybrid,
    /// The recipe at `evict.first_ratio`, then attention eviction to the ratio.
    CompressEvict,
    /// SnapKV-style eviction of the span's real KV.
    Snapkv,
    /// Key-norm eviction of the span's real KV.
    KeyNorm,
    /// StreamingLLM-style eviction: sinks and recent tokens.
    Streaming,
    /// A summary by the same model, within the token budget.
    Summary,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Surprisal => "surprisal",
            Method::Uniform => "uniform",
            Method::Hybrid => "hybrid",
            Method::CompressEvict => "compress-evict",
            Method::Snapkv => "snapkv",
            Method::KeyNorm => "key-norm",
            Method::Streaming => "streaming",
            Method::Summary => "summary",
        }
    }

    /// Whether the method runs the recipe (and so takes recipe options).
    fn optimises(self) -> bool {
        matches!(self, Method::Surprisal | Method::Uniform | Method::Hybrid | Method::CompressEvict)
    }
}

/// Where a recipe's virtual embeddings start, as a config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitChoice {
    ChunkMean,
    /// Seeded by the cell's seed.
    Random,
    /// The embeddings of the tokens that method would keep.
    Snapkv,
    KeyNorm,
    Streaming,
}

/// A method at the sweep's ratios, or with its own settings.
///
/// Read through [`TryFrom<toml::Value>`] rather than as a plain untagged
/// enum, so that a mistyped key inside a table is named in the error
/// instead of serde's "did not match any variant".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, try_from = "toml::Value")]
pub enum MethodEntry {
    Method(Method),
    Spec(MethodSpec),
}

/// A method with its own ratios or recipe options:
/// `{ method = "surprisal", key_weight = 1.0, init = "random", early_stop = false }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    pub method: Method,
    pub ratios: Option<Vec<f64>>,
    /// Weight of the K term (0: V only, the published objective).
    pub key_weight: Option<f64>,
    pub init: Option<InitChoice>,
    /// Overrides whether `optimizer.early_stop` applies (true with no
    /// `optimizer.early_stop` uses the default rule).
    pub early_stop: Option<bool>,
}

impl TryFrom<toml::Value> for MethodEntry {
    type Error = String;

    fn try_from(value: toml::Value) -> std::result::Result<Self, String> {
        match value {
            toml::Value::String(_) => value.try_into().map(Self::Method).map_err(|e| e.to_string()),
            toml::Value::Table(_) => value.try_into().map(Self::Spec).map_err(|e| format!("in a method table: {e}")),
            other => Err(format!("a method entry is a name or a table, not {}", other.type_str())),
        }
    }
}

impl MethodEntry {
    fn spec(&self) -> MethodSpec {
        match self {
            Self::Method(method) => MethodSpec { method: *method, ratios: None, key_weight: None, init: None, early_stop: None },
            Self::Spec(spec) => spec.clone(),
        }
    }

    fn method(&self) -> Method {
        self.spec().method
    }

    fn ratios<'a>(&'a self, sweep_ratios: &'a [f64]) -> &'a [f64] {
        match self {
            Self::Spec(MethodSpec { ratios: Some(ratios), .. }) => ratios,
            _ => sweep_ratios,
        }
    }

    /// Whether cells differ by seed (only a random start does).
    fn seeded(&self) -> bool {
        self.spec().init == Some(InitChoice::Random)
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
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
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
            return Err(format!("method {} has no ratios: set `ratios` at the top or in its entry", entry.method().name()));
        }
        let evicts_at = self.methods.iter().filter(|m| m.method() == Method::CompressEvict).flat_map(|m| m.ratios(&self.ratios));
        if let Some(ratio) = evicts_at.clone().find(|&&r| r <= self.evict.first_ratio) {
            return Err(format!(
                "compress-evict at {ratio}x: eviction must go beyond the first compression's {}x (evict.first_ratio)",
                self.evict.first_ratio
            ));
        }
        for entry in &self.methods {
            let spec = entry.spec();
            let recipe_options = spec.key_weight.is_some() || spec.init.is_some() || spec.early_stop.is_some();
            if recipe_options && !spec.method.optimises() {
                return Err(format!("method {} does not optimise: key_weight, init and early_stop do not apply", spec.method.name()));
            }
            if let Some(weight) = spec.key_weight.filter(|w| !(w.is_finite() && *w >= 0.0)) {
                return Err(format!("key_weight {weight} must be >= 0"));
            }
        }
        let mut labels: Vec<String> = self.methods.iter().map(|entry| self.label(entry)).collect();
        labels.sort();
        if let Some(pair) = labels.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(format!("two method entries run as `{}`: give them different ratios in one entry instead", pair[0]));
        }
        if self.evict.kernel % 2 == 0 {
            return Err(format!("evict.kernel {} must be odd (a window centred on the token)", self.evict.kernel));
        }
        if !(0.0..1.0).contains(&self.hybrid.verbatim_share) {
            return Err(format!("hybrid.verbatim_share {} is not in [0, 1)", self.hybrid.verbatim_share));
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
        let mut case_files: HashMap<String, PathBuf> = HashMap::new();
        for source in &self.cases {
            let beside_config = config_path.parent().unwrap_or(Path::new(".")).join(&source.file);
            let file = if source.file.exists() || source.file.is_absolute() { source.file.clone() } else { beside_config };
            if !file.exists() {
                return Err(EvalError::Config {
                    path: config_path.to_path_buf(),
                    reason: format!("case file {} not found", source.file.display()),
                });
            }
            let all = load_case_file(&file)?;
            let chosen: Vec<Case> = match &source.ids {
                None => all,
                Some(ids) => ids
                    .iter()
                    .map(|id| {
                        all.iter().find(|c| &c.id == id).cloned().ok_or_else(|| EvalError::Config {
                            path: config_path.to_path_buf(),
                            reason: format!("no case `{id}` in {}", file.display()),
                        })
                    })
                    .collect::<Result<_>>()?,
            };
            for case in &chosen {
                if let Some(first) = case_files.insert(case.id.clone(), file.clone()) {
                    return Err(EvalError::Config {
                        path: config_path.to_path_buf(),
                        reason: format!("case id `{}` is named twice ({} and {}): give each case its own id", case.id, first.display(), file.display()),
                    });
                }
                let ask = self.ask.for_case(case);
                case.check_leaks(ask.rendering, ask.per_fact)?;
            }
            cases.extend(chosen);
        }
        Ok(cases)
    }

    /// Every cell of the sweep, baselines first.
    pub fn cells(&self, cases: &[Case]) -> Vec<(Cell, CellKind)> {
        let mut cells = Vec::new();
        for case in cases {
            for &baseline in &self.baselines {
                let cell = Cell { case: case.id.clone(), method: baseline.name().into(), ratio: None, seed: 0 };
                cells.push((cell, CellKind::Baseline(baseline)));
            }
            for (entry_index, entry) in self.methods.iter().enumerate() {
                let seeds = if entry.seeded() { &self.seeds[..] } else { &self.seeds[..1] };
                for &ratio in entry.ratios(&self.ratios) {
                    for &seed in seeds {
                        let cell = Cell { case: case.id.clone(), method: self.label(entry), ratio: Some(ratio), seed };
                        cells.push((cell, CellKind::Compressed { entry: entry_index, ratio, seed }));
                    }
                }
            }
        }
        cells
    }

    /// The recipe an entry runs at `ratio` (seed: for a random start).
    fn recipe(&self, spec: &MethodSpec, ratio: f64, seed: u64) -> Recipe {
        let pooling = if spec.method == Method::Uniform { Pooling::Uniform } else { Pooling::Surprisal };
        let mut optimizer = self.optimizer.clone();
        match spec.early_stop {
            Some(false) => optimizer.early_stop = None,
            Some(true) => optimizer.early_stop = Some(optimizer.early_stop.unwrap_or_default()),
            None => {}
        }
        let init = match spec.init.unwrap_or(InitChoice::ChunkMean) {
            InitChoice::ChunkMean => Init::ChunkMean,
            InitChoice::Random => Init::Random { seed },
            InitChoice::Snapkv => Init::Kept(self.evict.snapkv()),
            InitChoice::KeyNorm => Init::Kept(Eviction::KeyNorm),
            InitChoice::Streaming => Init::Kept(self.evict.streaming()),
        };
        Recipe { ratio, pooling, positions: self.positions, optimizer, key_weight: spec.key_weight.unwrap_or(0.0), init }
    }

    /// The recipe of a cell that may be optimised together with others of
    /// its case: a plain recipe (surprisal or uniform pooling, any start or
    /// key weight) without early stopping, on a single-turn case.
    fn batchable_recipe(&self, kind: CellKind, case: &Case) -> Option<Recipe> {
        let CellKind::Compressed { entry, ratio, seed } = kind else { return None };
        let spec = self.methods[entry].spec();
        let recipe = self.recipe(&spec, ratio, seed);
        let plain = matches!(spec.method, Method::Surprisal | Method::Uniform) && recipe.optimizer.early_stop.is_none();
        (plain && case.turns().len() == 1).then_some(recipe)
    }

    /// The name an entry's cells carry in the results: the method's name,
    /// followed for recipe-based methods by the options that change the
    /// recipe (`surprisal-kv`, `surprisal+random-init`, `hybrid-kv`). An
    /// entry that departs from the config's `[optimizer] early_stop` says
    /// so: `-early` when it turns early stopping on, `-full-budget` when it
    /// turns it off. So plain `surprisal` runs as the config's optimizer
    /// says (early-stopped in a config that sets `early_stop`).
    fn label(&self, entry: &MethodEntry) -> String {
        let spec = entry.spec();
        if !spec.method.optimises() {
            return spec.method.name().into();
        }
        let recipe_name = self.recipe(&spec, 2.0, 0).name();
        let mut label = match spec.method {
            Method::Surprisal | Method::Uniform => recipe_name,
            // The recipe's options after the method's own name: `hybrid-kv`.
            other => format!("{}{}", other.name(), recipe_name.trim_start_matches("surprisal")),
        };
        match spec.early_stop {
            Some(true) if self.optimizer.early_stop.is_none() => label.push_str("-early"),
            Some(false) if self.optimizer.early_stop.is_some() => label.push_str("-full-budget"),
            _ => {}
        }
        label
    }

    /// The compressor a cell runs (`tokenizer`: for the summary baseline).
    pub fn compressor<'a>(&self, entry: &MethodEntry, ratio: f64, seed: u64, tokenizer: &'a Tokenizer) -> Box<dyn Compressor + 'a> {
        let spec = entry.spec();
        let recipe = |ratio| self.recipe(&spec, ratio, seed);
        match spec.method {
            Method::Surprisal | Method::Uniform => Box::new(recipe(ratio)),
            Method::Hybrid => Box::new(Hybrid { verbatim_share: self.hybrid.verbatim_share, recipe: recipe(ratio) }),
            Method::CompressEvict => {
                Box::new(CompressThenEvict { recipe: recipe(self.evict.first_ratio), ratio, window: self.evict.window })
            }
            Method::Snapkv => Box::new(Evict { eviction: self.evict.snapkv(), ratio }),
            Method::KeyNorm => Box::new(Evict { eviction: Eviction::KeyNorm, ratio }),
            Method::Streaming => Box::new(Evict { eviction: self.evict.streaming(), ratio }),
            Method::Summary => Box::new(Summarize { tokenizer, ratio }),
        }
    }
}

/// What a cell runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CellKind {
    Baseline(Baseline),
    /// `methods[entry]` at `ratio`, with `seed`.
    Compressed { entry: usize, ratio: f64, seed: u64 },
}

/// One unit of work and its identity in `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub case: String,
    pub method: String,
    /// None for baselines.
    pub ratio: Option<f64>,
    pub seed: u64,
}

impl Cell {
    fn key(&self) -> String {
        format!("{}|{}|{}|{}", self.case, self.method, self.ratio.map_or("-".into(), |r| r.to_string()), self.seed)
    }
}

/// One line of `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    #[serde(flatten)]
    pub cell: Cell,
    pub model: String,
    pub n_tokens: usize,
    /// Cache entries standing for the span (virtual tokens for the recipe).
    pub n_virtual: usize,
    pub facts_correct: usize,
    pub facts_total: usize,
    /// The final loss, averaged over compressed turns.
    pub loss_final: Option<f32>,
    /// Optimisation steps, summed over compressed turns.
    pub steps: usize,
    /// Wall time of the whole cell (compression and answers), time before
    /// a resume included.
    pub seconds: f64,
    /// Seconds spent optimising.
    pub optimize_seconds: f64,
    /// Every answer, joined (the full records are in `answers`).
    pub answer: String,
    pub answers: Vec<Answered>,
    /// The loss curves of every compressed turn, one after the other.
    pub loss_curve: Vec<f32>,
    /// Each compressed turn's final loss (one entry for a single-turn case).
    #[serde(default)]
    pub turn_losses: Vec<f32>,
    /// Peak resident memory of the process during the cell (Linux), MiB.
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// The text that replaced each compressed turn, for text-level methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replacement_text: Vec<String>,
    /// Cells optimised together in this cell's batch, itself included (1:
    /// alone). In a batch, `optimize_seconds` and `peak_rss_mib` are the
    /// batch's, and `seconds` is the batch's compression plus this cell's answers.
    #[serde(default = "one")]
    pub batch_cells: usize,
    /// Optimisation steps restored from a checkpoint (summed over turns):
    /// the process that wrote this line resumed after a crash.
    #[serde(default)]
    pub resumed_steps: usize,
    /// Threads of the CPU kernels: the cell's seconds depend on them, its
    /// numbers do not (one and two threads give T8's loss curve to the bit).
    #[serde(default)]
    pub threads: Option<usize>,
    /// The build that wrote the line ([`crate::BUILD`]): builds may differ in
    /// the last bits of a loss curve. Absent in lines older than the field.
    #[serde(default)]
    pub build: Option<String>,
}

fn one() -> usize {
    1
}

/// What a sweep reports while it runs.
pub enum SweepEvent<'a> {
    /// Cells in all, and how many `results.jsonl` already held.
    Planned { total: usize, done: usize },
    /// A cell starts; `steps` is its optimisation budget, if it optimises.
    CellStarted { cell: &'a Cell, steps: Option<usize> },
    /// Cells optimised together start; `steps` is their shared budget.
    BatchStarted { cells: Vec<&'a Cell>, steps: usize },
    /// An optimisation step finished.
    Step { step: usize, loss: f32 },
    CellFinished { result: &'a CellResult },
}

/// What a sweep did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepOutcome {
    pub total: usize,
    pub skipped: usize,
    pub ran: usize,
    /// The report written from every line in `results.jsonl`.
    pub report: crate::plot::Report,
}

/// Runs every cell not yet in `out_dir/results.jsonl`, then writes the
/// summary and plots. `on_event` may stop the sweep by returning an error
/// (as after a crash, the next run resumes the cell in progress from its
/// last checkpoint).
pub fn run_sweep(
    config: &SweepConfig,
    config_path: &Path,
    out_dir: &Path,
    on_event: &mut dyn FnMut(&SweepEvent) -> Result<()>,
) -> Result<SweepOutcome> {
    let cases = config.load_cases(config_path)?;
    std::fs::create_dir_all(out_dir).map_err(|e| EvalError::io(out_dir, e))?;
    // The config as run, beside its results (an unserialisable config is an error, not an empty file).
    let as_run = toml::to_string(config).map_err(|e| EvalError::io(out_dir, std::io::Error::other(e)))?;
    std::fs::write(out_dir.join("config.toml"), as_run).map_err(|e| EvalError::io(out_dir, e))?;
    let results_path = out_dir.join("results.jsonl");
    let finished: HashSet<String> = read_results(&results_path)?.iter().map(|r| r.cell.key()).collect();
    let cells = config.cells(&cases);
    let pending: Vec<&(Cell, CellKind)> = cells.iter().filter(|(c, _)| !finished.contains(&c.key())).collect();
    let skipped = cells.len() - pending.len();
    on_event(&SweepEvent::Planned { total: cells.len(), done: skipped })?;

    if !pending.is_empty() {
        let checkpoints = out_dir.join("checkpoints");
        let config = &config.checkpointing_to(&checkpoints);
        let model = load_model(config)?;
        for unit in work_units(&model, config, &cases, &pending)? {
            let results = match unit {
                WorkUnit::Alone(case, (cell, kind)) => vec![run_cell(&model, config, case, cell, *kind, on_event)?],
                WorkUnit::Batch(case, batch) => run_batch(&model, config, case, &batch, on_event)?,
            };
            for result in &results {
                append_result(&results_path, result)?;
                on_event(&SweepEvent::CellFinished { result })?;
            }
            remove_checkpoints(&checkpoints)?;
        }
    }
    let report = crate::plot::write_report(out_dir)?;
    Ok(SweepOutcome { total: cells.len(), skipped, ran: pending.len(), report })
}

impl SweepConfig {
    /// This config with its optimisations saving their state under `dir`.
    fn checkpointing_to(&self, dir: &Path) -> SweepConfig {
        let every = Duration::from_secs_f64(self.checkpoint_seconds);
        let mut config = self.clone();
        config.optimizer.checkpoint = Some(Checkpointing { dir: dir.to_path_buf(), every });
        config
    }
}

/// Drops the checkpoints of the work unit whose lines were just written.
fn remove_checkpoints(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EvalError::io(dir, e)),
        _ => Ok(()),
    }
}

/// What the sweep runs next: one cell, or recipe cells of one case
/// optimised together.
enum WorkUnit<'a> {
    Alone(&'a Case, &'a (Cell, CellKind)),
    Batch(&'a Case, Vec<(&'a Cell, Recipe)>),
}

/// The pending cells in order, those that can be batched gathered (at the
/// place of their case's first) into batches of at most
/// `batch_virtual_tokens` virtual tokens; everything runs alone when that is unset.
fn work_units<'a>(
    model: &Model,
    config: &SweepConfig,
    cases: &'a [Case],
    pending: &[&'a (Cell, CellKind)],
) -> Result<Vec<WorkUnit<'a>>> {
    let mut units = Vec::new();
    let mut batched_cases = HashSet::new();
    for &cell_and_kind in pending {
        let (cell, kind) = cell_and_kind;
        let Some(case) = cases.iter().find(|c| c.id == cell.case) else { continue };
        let Some(max_virtual) = config.batch_virtual_tokens else {
            units.push(WorkUnit::Alone(case, cell_and_kind));
            continue;
        };
        if config.batchable_recipe(*kind, case).is_none() {
            units.push(WorkUnit::Alone(case, cell_and_kind));
        } else if batched_cases.insert(&case.id) {
            let of_case = pending.iter().filter(|(c, _)| c.case == case.id);
            let batchable = of_case.filter_map(|(c, k)| config.batchable_recipe(*k, case).map(|recipe| (c, recipe)));
            let n_tokens = span_tokens(model, config, case)?;
            for batch in fill_batches(batchable.collect(), n_tokens, max_virtual)? {
                units.push(WorkUnit::Batch(case, batch));
            }
        }
    }
    Ok(units)
}

/// Consecutive batches of at most `max_virtual` virtual tokens (a cell
/// larger than that is a batch of its own).
fn fill_batches<'a>(cells: Vec<(&'a Cell, Recipe)>, n_tokens: usize, max_virtual: usize) -> Result<Vec<Vec<(&'a Cell, Recipe)>>> {
    let mut batches: Vec<Vec<(&Cell, Recipe)>> = Vec::new();
    let mut filled = 0;
    for (cell, recipe) in cells {
        let n_virtual = cram::pooling::n_virtual(n_tokens, recipe.ratio)?;
        match batches.last_mut() {
            Some(batch) if filled + n_virtual <= max_virtual => batch.push((cell, recipe)),
            _ => {
                batches.push(vec![(cell, recipe)]);
                filled = 0;
            }
        }
        filled += n_virtual;
    }
    Ok(batches)
}

/// Runs recipe cells of one case as one batched optimisation, then answers
/// each cell's questions.
fn run_batch(
    model: &Model,
    config: &SweepConfig,
    case: &Case,
    batch: &[(&Cell, Recipe)],
    on_event: &mut dyn FnMut(&SweepEvent) -> Result<()>,
) -> Result<Vec<CellResult>> {
    let started = Instant::now();
    memory::reset_peak_rss();
    let steps = total_steps(model, config, case);
    on_event(&SweepEvent::BatchStarted { cells: batch.iter().map(|(cell, _)| *cell).collect(), steps })?;
    let recipes: Vec<Recipe> = batch.iter().map(|(_, recipe)| recipe.clone()).collect();
    let mut step_error = None;
    let mut on_step = step_reporter(on_event, &mut step_error);
    let runs = run_case_together(model, case, &config.ask.for_case(case), &recipes, &mut on_step)?;
    drop(on_step);
    if let Some(error) = step_error {
        return Err(error);
    }
    // The runs answered one after another once the batch was compressed.
    let compression_seconds = started.elapsed().as_secs_f64() - runs.iter().map(|run| run.answer_seconds).sum::<f64>();
    Ok(batch
        .iter()
        .zip(runs)
        .map(|((cell, _), run)| {
            let seconds = compression_seconds + run.answer_seconds;
            CellResult { batch_cells: batch.len(), ..cell_result(model, cell, run, seconds) }
        })
        .collect())
}

fn load_model(config: &SweepConfig) -> Result<Model> {
    let device = models::parse_device(&config.device)?;
    Ok(Model::load(&models::resolve(&config.model)?, &device)?)
}

fn run_cell(
    model: &Model,
    config: &SweepConfig,
    case: &Case,
    cell: &Cell,
    kind: CellKind,
    on_event: &mut dyn FnMut(&SweepEvent) -> Result<()>,
) -> Result<CellResult> {
    let started = Instant::now();
    memory::reset_peak_rss();
    let compressor: Option<Box<dyn Compressor>> = match kind {
        CellKind::Compressed { entry, ratio, seed } => Some(config.compressor(&config.methods[entry], ratio, seed, &model.tokenizer)),
        CellKind::Baseline(Baseline::Raw) => Some(Box::new(RawSpan)),
        CellKind::Baseline(Baseline::Truncated) => Some(Box::new(Truncate)),
        CellKind::Baseline(Baseline::Full | Baseline::None) => None,
    };
    let optimises = matches!(kind, CellKind::Compressed { entry, .. } if config.methods[entry].method().optimises());
    let steps = optimises.then(|| total_steps(model, config, case));
    on_event(&SweepEvent::CellStarted { cell, steps })?;
    let mut step_error = None;
    let mut on_step = step_reporter(on_event, &mut step_error);
    let condition = match (kind, &compressor) {
        (CellKind::Baseline(Baseline::Full), _) => Condition::Full,
        (CellKind::Baseline(Baseline::None), _) => Condition::NoContext,
        (_, Some(compressor)) => Condition::Compressed(compressor.as_ref()),
        (_, None) => Condition::NoContext,
    };
    let run = run_case(model, case, &config.ask.for_case(case), condition, &mut on_step)?;
    drop(on_step);
    if let Some(error) = step_error {
        return Err(error);
    }
    Ok(cell_result(model, cell, run, started.elapsed().as_secs_f64()))
}

/// An optimiser callback that passes each step on as a [`SweepEvent::Step`];
/// the first error the handler returns is kept in `step_error` (the
/// optimiser cannot be stopped mid-run, so the caller returns it after).
fn step_reporter<'a>(
    on_event: &'a mut dyn FnMut(&SweepEvent) -> Result<()>,
    step_error: &'a mut Option<EvalError>,
) -> impl FnMut(usize, f32) + 'a {
    let mut steps_done = 0;
    move |_: usize, loss: f32| {
        if step_error.is_none() {
            *step_error = on_event(&SweepEvent::Step { step: steps_done, loss }).err();
        }
        steps_done += 1;
    }
}

/// A cell's line of `results.jsonl`, from its run.
fn cell_result(model: &Model, cell: &Cell, run: CaseRun, seconds: f64) -> CellResult {
    let (facts_correct, facts_total) = facts_score(&run.answers);
    let optimizations: Vec<&OptimizationReport> = run.compressions.iter().filter_map(|c| c.optimization.as_ref()).collect();
    let turn_losses: Vec<f32> = optimizations.iter().filter_map(|o| o.final_loss()).collect();
    let answer = run.answers.iter().map(|a| a.answer.trim()).collect::<Vec<_>>().join(" | ");
    CellResult {
        cell: cell.clone(),
        model: model.name.clone(),
        n_tokens: run.n_tokens,
        n_virtual: run.n_kept,
        facts_correct,
        facts_total,
        loss_final: (!turn_losses.is_empty()).then(|| turn_losses.iter().sum::<f32>() / turn_losses.len() as f32),
        steps: optimizations.iter().map(|o| o.steps).sum(),
        seconds: seconds + optimizations.iter().map(|o| o.resumed_seconds).sum::<f64>(),
        // A fold from 0.0, not `sum`: an empty f64 sum is -0.0, which the
        // lines of cells that do not optimise would then print.
        optimize_seconds: optimizations.iter().fold(0.0, |total, o| total + o.seconds),
        answer,
        loss_curve: optimizations.iter().flat_map(|o| o.loss_curve.iter().copied()).collect(),
        turn_losses,
        peak_rss_mib: memory::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        replacement_text: run.compressions.iter().filter_map(|c| c.text.clone()).collect(),
        answers: run.answers,
        batch_cells: 1,
        resumed_steps: optimizations.iter().map(|o| o.resumed_steps).sum(),
        threads: Some(candle_core::utils::get_num_threads()),
        build: Some(crate::BUILD.to_string()),
    }
}

/// Optimisation steps of a compressed cell, over all its turns (for progress bars).
fn total_steps(model: &Model, config: &SweepConfig, case: &Case) -> usize {
    turn_tokens(model, config, case).map(|n_tokens| config.optimizer.steps_for(n_tokens.unwrap_or(0))).sum()
}

/// Tokens of a single-turn case's span as rendered.
fn span_tokens(model: &Model, config: &SweepConfig, case: &Case) -> Result<usize> {
    Ok(turn_tokens(model, config, case).sum::<cram::Result<usize>>()?)
}

/// Tokens of each compressed turn of a case, as rendered.
fn turn_tokens<'a>(model: &'a Model, config: &'a SweepConfig, case: &'a Case) -> impl Iterator<Item = cram::Result<usize>> + 'a {
    case.turns().into_iter().map(|turn| {
        let text = config.ask.for_case(case).rendering.messages(&case.transcript.messages, &turn);
        model.tokenizer.encode(&text).map(|ids| ids.len())
    })
}

/// The finished cells of a results file. A last line cut short by a crash
/// is dropped (and removed, so the next append starts on a fresh line).
pub fn read_results(path: &Path) -> Result<Vec<CellResult>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(EvalError::io(path, e)),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    if complete.len() != text.len() {
        std::fs::write(path, complete).map_err(|e| EvalError::io(path, e))?;
    }
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line).map_err(|e| EvalError::Transcript {
                path: path.to_path_buf(),
                reason: format!("line {}: {e}", number + 1),
            })
        })
        .collect()
}

fn append_result(path: &Path, result: &CellResult) -> Result<()> {
    let mut line = serde_json::to_string(result).map_err(|e| EvalError::io(path, e.into()))?;
    line.push('\n');
    let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| EvalError::io(path, e))?;
    file.write_all(line.as_bytes()).and_then(|_| file.sync_data()).map_err(|e| EvalError::io(path, e))
}
