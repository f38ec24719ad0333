//! `cram self-test`: proves a device in one command, with no download.
//!
//! Two random-weight Qwen2 models are built in the process (a tiny one, and
//! one with the 0.5B's shapes and a small vocabulary), from weights drawn
//! on the host, so the device and the CPU hold the same numbers. Each check
//! ([`checks::CHECKS`]) runs on the device in f32 and in bf16, against the
//! CPU in f32 where it compares across devices ([`compare`] says how close
//! is close enough), or against the device itself where it checks a
//! mechanism (a cache continued equals one forward, say).
//!
//! Each check's record is handed out as it completes, so a crash keeps the
//! earlier ones; a check that errs or panics fails alone and the rest run.

mod checks;
pub mod compare;

use std::time::Instant;

use candle_core::{DType, Device};
use cram::{Model, Qwen2, Qwen2Config};
use serde::Serialize;

use crate::Result;

/// Vocabulary of the model with the 0.5B's shapes: the output projection
/// of the real 151,936 would dwarf the rest on a CPU, and tests nothing more.
const SMALL_VOCABULARY: usize = 512;
/// The seed of the weights.
const SEED: u64 = 5;

/// The models checked: name and configuration.
pub fn models() -> Result<Vec<(&'static str, Qwen2Config)>> {
    let mut half_billion = cram::synthetic::real_shape("qwen2.5-coder-0.5b")?;
    half_billion.vocab_size = SMALL_VOCABULARY;
    Ok(vec![("tiny", cram::synthetic::tiny_config()), ("0.5b-shapes", half_billion)])
}

/// What a check sees: the CPU f32 reference and the model under test.
pub struct Fixture {
    /// On the CPU, in f32.
    pub reference: Qwen2,
    /// On the device under test, in `dtype`, with a word tokenizer.
    pub model: Model,
    pub dtype: DType,
}

/// A check's verdict and the figures it rests on.
pub struct Verdict {
    pub passed: bool,
    pub detail: serde_json::Value,
}

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
    /// The check returned an error or panicked.
    Error,
    Skipped,
}

/// One JSON line of the self-test.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRecord {
    pub check: &'static str,
    pub model: &'static str,
    pub dtype: String,
    pub device: String,
    pub outcome: Outcome,
    /// The figures the verdict rests on, or the error, or why it was skipped.
    pub detail: serde_json::Value,
    pub seconds: f64,
}

/// How many checks ended each way.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub errors: usize,
    pub skipped: usize,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.errors == 0
    }

    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Passed => self.passed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Error => self.errors += 1,
            Outcome::Skipped => self.skipped += 1,
        }
    }
}

/// Runs every check on `device` for each of [`models`] in f32 and bf16,
/// calling `on_record` as each completes.
pub fn run(device: &Device, on_record: &mut dyn FnMut(&CheckRecord)) -> Result<Summary> {
    let mut summary = Summary::default();
    let mut emit = |record: CheckRecord| {
        summary.count(record.outcome);
        on_record(&record);
    };
    for (model_name, config) in models()? {
        let weights = cram::synthetic::named_weights(&config, SEED, &Device::Cpu)?;
        let reference = cram::synthetic::model_from_weights(&config, &weights, &Device::Cpu, DType::F32)?;
        for dtype in [DType::F32, DType::BF16] {
            let record = |check: &'static str, outcome: Outcome, detail: serde_json::Value, seconds: f64| CheckRecord {
                check,
                model: model_name,
                dtype: format!("{dtype:?}").to_lowercase(),
                device: format!("{device:?}"),
                outcome,
                detail,
                seconds,
            };
            if device.is_cpu() && dtype == DType::BF16 {
                // candle's CPU matmul has no bf16 kernel.
                let reason = serde_json::json!("bf16 runs on CUDA only: candle's CPU matmul has no bf16 kernel");
                checks::CHECKS.iter().for_each(|(check, _)| emit(record(*check, Outcome::Skipped, reason.clone(), 0.0)));
                continue;
            }
            let model = cram::synthetic::model_from_weights(&config, &weights, device, dtype)?;
            let fixture = Fixture { reference: reference.clone(), model: cram::synthetic::with_word_tokenizer(model, model_name)?, dtype };
            for (check, run_check) in checks::CHECKS {
                let started = Instant::now();
                let (outcome, detail) = match catch_panic(|| run_check(&fixture)) {
                    Ok(Ok(verdict)) => (if verdict.passed { Outcome::Passed } else { Outcome::Failed }, verdict.detail),
                    Ok(Err(error)) => (Outcome::Error, serde_json::json!({ "error": error.to_string() })),
                    Err(panic) => (Outcome::Error, serde_json::json!({ "panic": panic })),
                };
                emit(record(*check, outcome, detail, started.elapsed().as_secs_f64()));
            }
        }
    }
    Ok(summary)
}

/// Runs `f`, turning a panic into its message.
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture whose model on the "device" holds other weights than the
    /// reference: the cross-device checks must fail, the checks of the
    /// device against itself must still pass.
    #[test]
    fn checks_fail_when_the_device_computes_something_else() -> Result<()> {
        let config = cram::synthetic::tiny_config();
        let reference = cram::synthetic::model(&config, 1, &Device::Cpu)?;
        let other = cram::synthetic::full_model(&config, 2, &Device::Cpu)?;
        let fixture = Fixture { reference, model: other, dtype: DType::F32 };
        let verdict = |name: &str| -> Result<bool> {
            let (_, check) = checks::CHECKS.iter().find(|(check, _)| *check == name).expect("a known check");
            Ok(check(&fixture)?.passed)
        };
        assert!(!verdict("forward")?);
        assert!(!verdict("gradient-v")?);
        assert!(!verdict("gradient-kv")?);
        assert!(verdict("prefix-continuation")?);
        assert!(verdict("greedy-over-cache")?);
        Ok(())
    }
}
