//! The self-test's checks, one function each and one line each in [`CHECKS`].
//!
//! Cross-device checks compare the device with the CPU f32 reference; the
//! others compare two ways of computing one thing on the device itself, at
//! the device's tolerance for its dtype ([`super::compare`]).

use candle_core::{DType, Device, Tensor, Var, D};
use cram::recipe::objective::objective_loss;
use cram::recipe::optimize::{optimize, optimize_together};
use cram::registry::{MethodOptions, METHODS};
use cram::{generate, Checkpointing, Compressor, KvCache, Logits, OptimizerConfig, Qwen2, Recipe, Session, SpanTargets};
use serde_json::json;

use super::compare::{all_finite, top1_agreement, Closeness, BF16_TOP1_AGREEMENT, FORWARD_TOLERANCE, GRADIENT_TOLERANCE};
use super::{Fixture, Verdict};
use crate::bench::{prefix_cache, synthetic_ids};
use crate::Result;

/// Every check, by name.
pub const CHECKS: &[(&str, fn(&Fixture) -> Result<Verdict>)] = &[
    ("forward", forward),
    ("prefix-continuation", prefix_continuation),
    ("groups-in-one-placement", groups_in_one_placement),
    ("one-token-forwards", one_token_forwards),
    ("gradient-v", gradient_v),
    ("gradient-kv", gradient_kv),
    ("recipe-compression", recipe_compression),
    ("together-equals-alone", together_equals_alone),
    ("checkpoint-resume", checkpoint_resume),
    ("session-save-load", session_save_load),
    ("compressors", compressors),
    ("greedy-over-cache", greedy_over_cache),
    ("answers-together", answers_together),
];

/// Ratio of the compressions checked.
const RATIO: f64 = 3.0;
/// Optimization steps of the compressions checked: enough to see the loss fall.
const STEPS: usize = 12;
/// The learning rate of the checked optimizations: large, so a few steps move.
const LEARNING_RATE: f64 = 0.05;

impl Fixture {
    fn qwen(&self) -> &Qwen2 {
        &self.model.qwen2
    }

    fn ids(&self, count: usize) -> Vec<u32> {
        synthetic_ids(self.reference.config().vocab_size, count)
    }

    /// Passes `closeness` at this fixture's dtype.
    fn passes(&self, closeness: &Closeness, f32_tolerance: f64) -> bool {
        closeness.passes(self.dtype, f32_tolerance)
    }

    /// In bf16 the top token must agree on most positions; f32 is held to its tolerance instead.
    fn top1_passes(&self, agreement: f64) -> bool {
        self.dtype == DType::F32 || agreement >= BF16_TOP1_AGREEMENT
    }
}

/// `n` positions from `start`, with fractional steps and a gap, as virtual tokens have.
fn uneven_positions(start: f32, n: usize) -> Vec<f32> {
    (0..n).map(|i| start + i as f32 * 1.5 + if i % 3 == 2 { 0.25 } else { 0.0 }).collect()
}

fn consecutive(start: usize, n: usize) -> Vec<f32> {
    (start..start + n).map(|p| p as f32).collect()
}

fn logits(output: &cram::model::ForwardOutput) -> Result<&Tensor> {
    output.logits.as_ref().ok_or_else(|| crate::EvalError::Model(cram::Error::Invalid("self-test: a forward asked for logits returned none".into())))
}

/// Logits and every layer's K and V of one forward, device against CPU.
fn forward(fixture: &Fixture) -> Result<Verdict> {
    let ids = fixture.ids(20);
    let positions = uneven_positions(0.0, ids.len());
    let run = |model: &Qwen2| model.forward(&model.embed(&ids)?, &positions, None, Logits::All);
    let (reference, ours) = (run(&fixture.reference)?, run(fixture.qwen())?);
    let logits_closeness = Closeness::of(logits(&ours)?, logits(&reference)?)?;
    let keys = Closeness::worst_of(&ours.keys, &reference.keys)?;
    let values = Closeness::worst_of(&ours.values, &reference.values)?;
    let top1 = top1_agreement(logits(&ours)?, logits(&reference)?)?;
    let passed = [logits_closeness, keys, values].iter().all(|c| fixture.passes(c, FORWARD_TOLERANCE)) && fixture.top1_passes(top1);
    Ok(Verdict { passed, detail: json!({ "logits": logits_closeness, "keys": keys, "values": values, "top1_agreement": top1 }) })
}

/// Tokens run over a cache of the tokens before them give the logits of one forward over all.
fn prefix_continuation(fixture: &Fixture) -> Result<Verdict> {
    let model = fixture.qwen();
    let (ids, split) = (fixture.ids(20), 12);
    let whole = model.forward(&model.embed(&ids)?, &consecutive(0, ids.len()), None, Logits::All)?;
    let whole_rest = logits(&whole)?.narrow(1, split, ids.len() - split)?;
    let prefix = prefix_cache(model, &ids[..split], &consecutive(0, split))?;
    let continued = model.forward(&model.embed(&ids[split..])?, &consecutive(split, ids.len() - split), Some(&prefix), Logits::All)?;
    let closeness = Closeness::of(logits(&continued)?, &whole_rest)?;
    let top1 = top1_agreement(logits(&continued)?, &whole_rest)?;
    let passed = fixture.passes(&closeness, FORWARD_TOLERANCE) && fixture.top1_passes(top1);
    Ok(Verdict { passed, detail: json!({ "logits": closeness, "top1_agreement": top1 }) })
}

/// Two groups of embeddings in one placement, kept apart by the mask, give
/// each group's K and V alone (what batched optimization relies on).
fn groups_in_one_placement(fixture: &Fixture) -> Result<Verdict> {
    let model = fixture.qwen();
    let ids = fixture.ids(16);
    let prefix = prefix_cache(model, &ids[..8], &consecutive(0, 8))?;
    let groups = [(&ids[8..13], uneven_positions(8.0, 5)), (&ids[13..16], uneven_positions(8.5, 3))];
    let embeddings = Tensor::cat(&[model.embed(groups[0].0)?, model.embed(groups[1].0)?], 1)?;
    let positions: Vec<f32> = groups.iter().flat_map(|(_, at)| at.iter().copied()).collect();
    let placement = model.placement(&positions, &[5, 3], prefix.len())?;
    let together = model.forward_placed(&embeddings, &placement, Some(&prefix), Logits::None)?;
    let mut worst: Option<Closeness> = None;
    let mut offset = 0;
    for (group_ids, at) in &groups {
        let alone = model.forward(&model.embed(group_ids)?, at, Some(&prefix), Logits::None)?;
        let own = |tensors: &[Tensor]| tensors.iter().map(|t| t.narrow(2, offset, at.len())).collect::<candle_core::Result<Vec<_>>>();
        let keys = Closeness::worst_of(&own(&together.keys)?, &alone.keys)?;
        let values = Closeness::worst_of(&own(&together.values)?, &alone.values)?;
        let group_worst = keys.worst(values);
        worst = Some(worst.map_or(group_worst, |w| w.worst(group_worst)));
        offset += at.len();
    }
    let worst = worst.expect("two groups");
    Ok(Verdict { passed: fixture.passes(&worst, FORWARD_TOLERANCE), detail: json!({ "keys_and_values": worst }) })
}

/// Tokens fed one at a time over a growing cache give one forward's logits.
fn one_token_forwards(fixture: &Fixture) -> Result<Verdict> {
    let model = fixture.qwen();
    let ids = fixture.ids(10);
    let whole = model.forward(&model.embed(&ids)?, &consecutive(0, ids.len()), None, Logits::All)?;
    let mut cache = KvCache::new();
    let mut one_by_one = Vec::with_capacity(ids.len());
    for (position, id) in ids.iter().enumerate() {
        let at = [position as f32];
        let output = model.forward(&model.embed(&[*id])?, &at, (!cache.is_empty()).then_some(&cache), Logits::All)?;
        cache.append(&output.keys, &output.values, &at)?;
        one_by_one.push(logits(&output)?.clone());
    }
    let one_by_one = Tensor::cat(&one_by_one, 1)?;
    let closeness = Closeness::of(&one_by_one, logits(&whole)?)?;
    let top1 = top1_agreement(&one_by_one, logits(&whole)?)?;
    let passed = fixture.passes(&closeness, FORWARD_TOLERANCE) && fixture.top1_passes(top1);
    Ok(Verdict { passed, detail: json!({ "logits": closeness, "top1_agreement": top1 }) })
}

fn gradient_v(fixture: &Fixture) -> Result<Verdict> {
    gradient(fixture, None)
}

fn gradient_kv(fixture: &Fixture) -> Result<Verdict> {
    gradient(fixture, Some(0.5))
}

/// The gradient of the compression loss (V, or K + V with `key_weight`)
/// with respect to virtual embeddings over a prefix cache, device against CPU.
fn gradient(fixture: &Fixture, key_weight: Option<f64>) -> Result<Verdict> {
    let ids = fixture.ids(12);
    let virtual_positions = [6.0f32, 7.5, 9.0];
    let gradient_on = |model: &Qwen2| -> Result<Tensor> {
        let prefix = prefix_cache(model, &ids[..6], &consecutive(0, 6))?;
        let target = model.forward(&model.embed(&ids[6..9])?, &virtual_positions, Some(&prefix), Logits::None)?;
        let rotation = model.rotation_f32(&virtual_positions)?;
        let f32_of = |tensors: &[Tensor]| tensors.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>();
        let unrotate = |keys: &[Tensor]| keys.iter().map(|k| rotation.invert(&k.to_dtype(DType::F32)?)).collect::<cram::Result<Vec<_>>>();
        let value_targets = f32_of(&target.values)?;
        let key_targets = unrotate(&target.keys)?;
        let embeddings = Var::from_tensor(&model.embed(&ids[9..12])?.to_dtype(DType::F32)?)?;
        let output = model.forward(embeddings.as_tensor(), &virtual_positions, Some(&prefix), Logits::None)?;
        let keys = unrotate(&output.keys)?;
        let key_term = key_weight.map(|weight| (keys.as_slice(), key_targets.as_slice(), weight));
        let loss = objective_loss(&output.values, &value_targets, key_term)?;
        let gradients = loss.backward()?;
        let gradient = gradients.get(embeddings.as_tensor()).ok_or_else(|| cram::Error::Invalid("self-test: no gradient reached the embeddings".into()))?;
        Ok(gradient.clone())
    };
    let closeness = Closeness::of(&gradient_on(fixture.qwen())?, &gradient_on(&fixture.reference)?)?;
    Ok(Verdict { passed: fixture.passes(&closeness, GRADIENT_TOLERANCE), detail: json!({ "gradient": closeness }) })
}

/// A span after a prefix, as every compression check uses: (prefix cache, span).
fn prefix_and_span(fixture: &Fixture, with_surprisal: bool) -> Result<(KvCache, SpanTargets)> {
    let model = fixture.qwen();
    let ids = fixture.ids(32);
    let prefix = prefix_cache(model, &ids[..8], &consecutive(0, 8))?;
    let compute = if with_surprisal { SpanTargets::compute } else { SpanTargets::compute_without_surprisal };
    let span = compute(model, &prefix, &ids[8..], &consecutive(8, 24))?;
    Ok((prefix, span))
}

fn quick_optimizer() -> OptimizerConfig {
    OptimizerConfig { lr: LEARNING_RATE, steps: Some(STEPS), ..OptimizerConfig::default() }
}

/// One recipe compression: every loss finite, the last below the first.
fn recipe_compression(fixture: &Fixture) -> Result<Verdict> {
    let (prefix, span) = prefix_and_span(fixture, true)?;
    let recipe = Recipe { optimizer: quick_optimizer(), ..Recipe::published(RATIO) };
    let compressed = recipe.compress(&fixture.model, &prefix, &span, &mut |_, _| {})?;
    let curve = compressed.report.optimization.map(|report| report.loss_curve).unwrap_or_default();
    let (first, last) = (curve.first().copied().unwrap_or(f32::NAN), curve.last().copied().unwrap_or(f32::NAN));
    let entries_finite = all_finite(&compressed.values)? && all_finite(&compressed.keys)?;
    let passed = curve.iter().all(|loss| loss.is_finite()) && last < first && entries_finite;
    Ok(Verdict { passed, detail: json!({ "first_loss": first, "last_loss": last, "steps": curve.len().saturating_sub(1), "entries_finite": entries_finite }) })
}

/// Two ratios of one span optimized together end where each ends alone.
fn together_equals_alone(fixture: &Fixture) -> Result<Verdict> {
    let model = fixture.qwen();
    let (prefix, span) = prefix_and_span(fixture, true)?;
    let config = quick_optimizer();
    let starts = [2.0, 4.0].iter().map(|&ratio| Recipe::published(ratio).virtual_start(&fixture.model, &prefix, &span)).collect::<cram::Result<Vec<_>>>()?;
    let objectives: Vec<_> = starts.iter().map(|start| start.objective(&prefix)).collect();
    let inits: Vec<Tensor> = starts.iter().map(|start| start.init.clone()).collect();
    let together = optimize_together(model, &objectives, &inits, &config, STEPS, &mut |_, _| {})?;
    let mut worst: Option<Closeness> = None;
    for ((objective, init), joint) in objectives.iter().zip(&inits).zip(&together) {
        let alone = optimize(model, *objective, init, &config, STEPS, &mut |_, _| {})?;
        let closeness = Closeness::of(&joint.embeddings, &alone.embeddings)?.worst(Closeness::worst_of(&joint.values, &alone.values)?);
        worst = Some(worst.map_or(closeness, |w| w.worst(closeness)));
    }
    let worst = worst.expect("two ratios");
    Ok(Verdict { passed: fixture.passes(&worst, GRADIENT_TOLERANCE), detail: json!({ "embeddings_and_values": worst }) })
}

/// An optimization killed after a few steps and resumed from its
/// checkpoint ends where one never stopped ends.
fn checkpoint_resume(fixture: &Fixture) -> Result<Verdict> {
    let model = fixture.qwen();
    let (prefix, span) = prefix_and_span(fixture, true)?;
    let start = Recipe::published(RATIO).virtual_start(&fixture.model, &prefix, &span)?;
    let objective = start.objective(&prefix);
    let plain = quick_optimizer();
    let uninterrupted = optimize(model, objective, &start.init, &plain, STEPS, &mut |_, _| {})?;

    let dir = ScratchDir::new("checkpoint")?;
    let saving = OptimizerConfig { checkpoint: Some(Checkpointing { dir: dir.0.clone(), every: std::time::Duration::ZERO }), ..plain };
    // The process "dies" in the progress callback after the third step.
    let killed = quietly(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| optimize(model, objective, &start.init, &saving, STEPS, &mut |step, _| assert!(step < 2, "killed")))));
    if killed.is_ok() {
        return Ok(Verdict { passed: false, detail: json!({ "error": "the run meant to be killed was not" }) });
    }
    let resumed = optimize(model, objective, &start.init, &saving, STEPS, &mut |_, _| {})?;
    let closeness = Closeness::of(&resumed.embeddings, &uninterrupted.embeddings)?;
    let identical = closeness.relative_diff == 0.0 && resumed.report.loss_curve == uninterrupted.report.loss_curve;
    let passed = resumed.report.resumed_steps == 3 && fixture.passes(&closeness, FORWARD_TOLERANCE);
    Ok(Verdict { passed, detail: json!({ "resumed_steps": resumed.report.resumed_steps, "embeddings": closeness, "bit_identical": identical }) })
}

/// A session saved and loaded holds the same cache, bit for bit: empty (an
/// empty system prompt saves zero-length tensors), then after a turn.
fn session_save_load(fixture: &Fixture) -> Result<Verdict> {
    let dir = ScratchDir::new("session")?;
    let mut session = Session::new(&fixture.model, "")?;
    let mut checks = Vec::new();
    for (label, text) in [("empty", None), ("one turn", Some("t1 t2 t3 t4 t5 t6"))] {
        if let Some(text) = text {
            session.push_verbatim(text)?;
        }
        let path = dir.0.join(format!("{}.safetensors", label.replace(' ', "-")));
        session.save(&path)?;
        let loaded = Session::load(&fixture.model, &path)?;
        let (saved, restored) = (session.cache(), loaded.cache());
        let same_shape = saved.len() == restored.len() && saved.positions() == restored.positions() && saved.next_position() == restored.next_position();
        let identical = same_shape
            && saved.keys().iter().chain(saved.values()).zip(restored.keys().iter().chain(restored.values())).all(|(a, b)| {
                a.dims() == b.dims() && (a.elem_count() == 0 || Closeness::of(a, b).is_ok_and(|c| c.relative_diff == 0.0))
            });
        checks.push(json!({ "state": label, "entries": restored.len(), "identical": identical }));
    }
    let passed = checks.iter().all(|check| check["identical"] == json!(true));
    Ok(Verdict { passed, detail: json!(checks) })
}

/// Knobs beyond the defaults whose code differs on a device: attention
/// matching on-policy (a forward layer by layer; spread budgets, the
/// default, pad uneven heads), and with the span's own queries (kept by
/// the targets' forward) and uniform budgets (no padding).
const VARIANTS: [(&str, &str); 2] = [
    ("attention-matching", r#"{"on_policy": true}"#),
    ("attention-matching", r#"{"queries": "context", "budgets": "uniform"}"#),
];

/// Every registered method (and [`VARIANTS`]) compresses one turn of a
/// session on the device: finite entries, no more than the span.
fn compressors(fixture: &Fixture) -> Result<Verdict> {
    let span_text: String = (0..24).map(|i| format!("t{}", 3 + (i * 5) % (fixture.reference.config().vocab_size - 3))).collect::<Vec<_>>().join(" ");
    let defaults = METHODS.iter().map(|method| (method, serde_json::Value::Object(Default::default())));
    let variants = VARIANTS.iter().map(|(name, knobs)| (cram::registry::method(name).expect("a registered method"), serde_json::from_str(knobs).expect("JSON knobs")));
    let mut results = serde_json::Map::new();
    let mut passed = true;
    for (method, knobs) in defaults.chain(variants) {
        let mut options = MethodOptions { knobs, ..MethodOptions::new(RATIO) };
        options.recipe.optimizer = quick_optimizer();
        let mut name = method.name.to_string();
        let outcome = (|| -> cram::Result<serde_json::Value> {
            let compressor = method.build(&options)?;
            name = compressor.name();
            let mut session = Session::new(&fixture.model, "t1 t2 t3 t4 t5 t6 t7 t8")?;
            let report = session.push_compressed(&span_text, compressor.as_ref(), &mut |_, _| {})?;
            let cache = session.cache();
            let finite = all_finite(cache.keys()).and_then(|keys| Ok(keys && all_finite(cache.values())?)).map_err(|e| cram::Error::Invalid(e.to_string()))?;
            Ok(json!({ "kept": report.n_kept, "of": report.n_tokens, "finite": finite }))
        })();
        let ok = outcome.as_ref().is_ok_and(|value| value["finite"] == json!(true) && value["kept"].as_u64() <= value["of"].as_u64());
        passed &= ok;
        results.insert(name, outcome.unwrap_or_else(|error| json!({ "error": error.to_string() })));
    }
    Ok(Verdict { passed, detail: serde_json::Value::Object(results) })
}

/// Greedy decoding over a cache picks the tokens that recomputing the
/// whole sequence each time picks. In bf16 a near-tie can break either
/// way, so there the tokens must agree up to the first step whose top two
/// logits are within `BF16_TIE` of the top one's size (bf16 keeps 8 bits).
fn greedy_over_cache(fixture: &Fixture) -> Result<Verdict> {
    const NEW_TOKENS: usize = 8;
    const BF16_TIE: f32 = 0.01;
    let model = fixture.qwen();
    let ids = fixture.ids(13);
    let (prompt_start, prompt) = (10, &ids[10..]);
    let mut cache = prefix_cache(model, &ids[..prompt_start], &consecutive(0, prompt_start))?;
    let cached = generate::greedy(model, &mut cache, prompt, prompt_start as f32, NEW_TOKENS, &[])?;
    let mut sequence = ids.clone();
    let mut recomputed = Vec::new();
    let mut margins = Vec::new();
    for _ in 0..NEW_TOKENS {
        let output = model.forward(&model.embed(&sequence)?, &consecutive(0, sequence.len()), None, Logits::Last)?;
        let last: Vec<f32> = logits(&output)?.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
        let mut sorted = last.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        margins.push((sorted[0] - sorted[1]) / sorted[0].abs().max(1.0));
        let next = logits(&output)?.to_dtype(DType::F32)?.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        recomputed.push(next);
        sequence.push(next);
    }
    let first_difference = cached.iter().zip(&recomputed).position(|(a, b)| a != b);
    let passed = match first_difference {
        None => cached.len() == recomputed.len(),
        Some(step) => fixture.dtype != DType::F32 && margins[step] < BF16_TIE,
    };
    Ok(Verdict { passed, detail: json!({ "cached": cached, "recomputed": recomputed, "first_difference": first_difference, "relative_top2_margins": margins }) })
}

/// Prompts of different lengths answered together over one cache (with
/// logit biases) give the answers each gets alone. The first tokens come from the same per-prompt
/// forward and must be equal in any dtype; later ones from batched steps,
/// which may sum in another order: equal in f32 (a near-tie flip would
/// show here first), reported in bf16, where such a flip is expected.
fn answers_together(fixture: &Fixture) -> Result<Verdict> {
    const NEW_TOKENS: usize = 6;
    let model = fixture.qwen();
    let ids = fixture.ids(16);
    // A prefix whose entries carry logit biases, as a fitted cache does.
    let plain = prefix_cache(model, &ids[..8], &consecutive(0, 8))?;
    let biases = plain.keys().iter().map(|keys| Ok(Tensor::randn(0f32, 1.0, &keys.dims()[..3], keys.device())?)).collect::<Result<Vec<_>>>()?;
    let mut cache = KvCache::new();
    cache.append_biased(plain.keys(), plain.values(), Some(&biases), plain.positions())?;
    let prompts = vec![ids[8..13].to_vec(), ids[13..15].to_vec(), ids[8..16].to_vec()];
    let alone = prompts
        .iter()
        .map(|prompt| generate::greedy(model, &mut cache.clone(), prompt, 8.0, NEW_TOKENS, &[]))
        .collect::<cram::Result<Vec<_>>>()?;
    let together = generate::greedy_together(model, &cache, &prompts, 8.0, NEW_TOKENS, &[])?;
    let first_tokens_equal = alone.iter().zip(&together).all(|(a, t)| a.first() == t.first());
    let passed = first_tokens_equal && (fixture.dtype != DType::F32 || alone == together);
    Ok(Verdict { passed, detail: json!({ "alone": alone, "together": together }) })
}

/// A scratch folder under the system's temporary folder, removed when dropped.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(label: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("cram-self-test-{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| crate::EvalError::io(&dir, e))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `f` with the panic message printer off: the self-test kills a run
/// on purpose, and its message is not a failure.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = f();
    std::panic::set_hook(previous);
    result
}
