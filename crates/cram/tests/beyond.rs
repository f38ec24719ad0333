//! Beyond the published recipe, on a small random model: keys matched
//! before RoPE, the eviction and summary baselines, other starting points,
//! and early stopping.

mod common;

use std::rc::Rc;

use candle_core::{Device, Tensor, D};
use common::{cpu, max_abs_diff, positions, prefix_cache};
use cram::model::rope::Rotation;
use cram::recipe::objective::normalised_loss;
use cram::recipe::optimize::optimize;
use cram::recipe::pooling::chunk_bounds;
use cram::registry::MethodOptions;
use cram::{
    budget, synthetic, Compressor, EarlyStop, Evict, Init, KeyNorm, KvCache, Logits, Model, OptimizerConfig, Qwen2, Recipe, Scorer, SnapKv,
    SpanTargets, Streaming, Summarize, SummarySettings,
};

const PREFIX: [u32; 4] = [5, 9, 14, 2];
const SPAN: [u32; 20] = [30, 31, 8, 8, 44, 17, 63, 1, 12, 40, 41, 7, 22, 23, 50, 3, 36, 36, 11, 60];

fn span_after_prefix(model: &Qwen2, prefix: &KvCache) -> SpanTargets {
    SpanTargets::compute(model, prefix, &SPAN, &positions(PREFIX.len(), SPAN.len())).unwrap()
}

#[test]
fn rope_then_inverse_rope_is_the_identity() -> anyhow::Result<()> {
    let head_dim = 64;
    let positions = [0.0f32, 1.0, 17.4, 250.0, 1579.5, 30_000.0];
    // Fixed, varied entries (no unseeded draw).
    let keys = (Tensor::arange(0u32, (2 * positions.len() * head_dim) as u32, &Device::Cpu)?.to_dtype(candle_core::DType::F32)? * 0.37)?
        .sin()?
        .reshape((1, 2, positions.len(), head_dim))?;
    let rotation = Rotation::new(&positions, head_dim, 1_000_000.0, candle_core::DType::F32, &Device::Cpu)?;
    let rotated = rotation.apply(&keys)?;
    assert!(max_abs_diff(&rotated, &keys) > 0.1, "a real rotation");
    let back = rotation.invert(&rotated)?;
    let error = max_abs_diff(&back, &keys);
    assert!(error <= 1e-5, "inverse RoPE error {error}");
    Ok(())
}

#[test]
fn unrotated_keys_do_not_depend_on_position() -> anyhow::Result<()> {
    // Layer 0's key is a projection of the token's embedding alone: with
    // RoPE undone it must be the same wherever the span sits.
    let model = synthetic::model(&synthetic::tiny_config(), 41, &cpu())?;
    let prefix = prefix_cache(&model, &PREFIX);
    let here = span_after_prefix(&model, &prefix);
    let elsewhere = SpanTargets::compute(&model, &prefix, &SPAN, &positions(PREFIX.len() + 37, SPAN.len()))?;
    assert!(max_abs_diff(&here.keys[0], &elsewhere.keys[0]) > 1e-2, "rotated keys differ by position");
    let (a, b) = (here.unrotated_keys(&model)?, elsewhere.unrotated_keys(&model)?);
    assert!(max_abs_diff(&a[0], &b[0]) <= 1e-5);
    Ok(())
}

fn quick(recipe: Recipe, steps: usize) -> Recipe {
    Recipe { optimizer: OptimizerConfig { lr: 0.05, steps: Some(steps), ..Default::default() }, ..recipe }
}

#[test]
fn the_key_value_objective_fits_keys_and_values() -> anyhow::Result<()> {
    let full = synthetic::full_model(&synthetic::tiny_config(), 43, &cpu())?;
    let model = &full.qwen2;
    let prefix = prefix_cache(model, &PREFIX);
    let span = span_after_prefix(model, &prefix);
    let key_value = quick(Recipe { key_weight: 1.0, ..Recipe::published(3.0) }, 80);
    assert_eq!(key_value.name(), "surprisal-kv");
    let start = key_value.virtual_start(&full, &prefix, &span)?;
    assert_eq!(start.key_targets.len(), model.config().num_hidden_layers);
    assert!(quick(Recipe::published(3.0), 1).virtual_start(&full, &prefix, &span)?.key_targets.is_empty());

    let key_term = |keys: &[Tensor], positions: &[f32]| -> anyhow::Result<f32> {
        let rotation = model.rotation_f32(positions)?;
        let unrotated = keys.iter().map(|k| rotation.invert(k)).collect::<cram::Result<Vec<_>>>()?;
        Ok(normalised_loss(&unrotated, &start.key_targets)?.to_scalar::<f32>()?)
    };
    let before = model.forward(&start.init, &start.positions, Some(&prefix), Logits::None)?;
    let compressed = key_value.compress(&full, &prefix, &span, &mut |_, _| {})?;
    let v_only = quick(Recipe::published(3.0), 80).compress(&full, &prefix, &span, &mut |_, _| {})?;
    let (k_before, k_after) = (key_term(&before.keys, &start.positions)?, key_term(&compressed.keys, &compressed.positions)?);
    let k_v_only = key_term(&v_only.keys, &v_only.positions)?;
    assert!(k_after < 0.7 * k_before, "K term {k_before} -> {k_after}");
    assert!(k_after < k_v_only, "matching keys fits them better than V only: {k_after} vs {k_v_only}");
    let curve = &compressed.report.optimization.as_ref().unwrap().loss_curve;
    assert!(curve.last().unwrap() < &(0.7 * curve[0]), "{curve:?}");
    Ok(())
}

fn evicted(model: &Model, prefix: &KvCache, span: &SpanTargets, scorer: Rc<dyn Scorer>, ratio: f64) -> cram::CompressedSpan {
    Evict { scorer, ratio }.compress(model, prefix, span, &mut |_, _| {}).unwrap()
}

#[test]
fn eviction_keeps_n_over_ratio_of_the_span_and_never_the_prefix() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 47, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let span = span_after_prefix(&model.qwen2, &prefix);
    let scorers: [Rc<dyn Scorer>; 3] = [Rc::new(SnapKv { window: 6, kernel: 3 }), Rc::new(KeyNorm {}), Rc::new(Streaming { sinks: 2 })];
    for scorer in scorers {
        for ratio in [1.6, 2.4, 3.2, 4.8, 6.4, 25.0] {
            let kept = evicted(&model, &prefix, &span, scorer.clone(), ratio);
            let count = budget(SPAN.len(), ratio)?;
            assert_eq!(kept.len(), count, "{} at {ratio}x", scorer.name());
            assert_eq!(kept.report.method, scorer.name());
            assert_eq!(kept.report.n_kept, count);
            // Real entries of the span, at their own positions, in order.
            let indices: Vec<usize> = kept.positions.iter().map(|p| *p as usize - PREFIX.len()).collect();
            assert!(indices.windows(2).all(|w| w[0] < w[1]) && indices.iter().all(|&i| i < SPAN.len()));
            for layer in 0..kept.keys.len() {
                let expected = span.select(&indices)?;
                assert!(max_abs_diff(&kept.keys[layer], &expected.keys[layer]) == 0.0);
                assert!(max_abs_diff(&kept.values[layer], &expected.values[layer]) == 0.0);
            }
            // Appended to the cache, the prefix is all there, untouched.
            let mut cache = prefix.clone();
            kept.append_to(&mut cache)?;
            assert_eq!(cache.len(), PREFIX.len() + count);
            assert_eq!(cache.next_position(), (PREFIX.len() + SPAN.len()) as f32, "after the span, kept or not");
            assert_eq!(&cache.positions()[..PREFIX.len()], &positions(0, PREFIX.len())[..]);
            for layer in 0..cache.keys().len() {
                let head = cache.keys()[layer].narrow(2, 0, PREFIX.len())?;
                assert!(max_abs_diff(&head, &prefix.keys()[layer]) == 0.0);
            }
        }
    }
    Ok(())
}

#[test]
fn eviction_policies_choose_as_they_say() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 53, &cpu())?;
    let prefix = prefix_cache(&model, &PREFIX);
    let span = span_after_prefix(&model, &prefix);
    let streaming = Streaming { sinks: 2 }.keep(&model, &prefix, &span, 6)?;
    assert_eq!(streaming, [0, 1, 16, 17, 18, 19], "two sinks and the four most recent");
    // Sinks take at most half the budget.
    assert_eq!(Streaming { sinks: 4 }.keep(&model, &prefix, &span, 2)?, [0, 19]);

    // Key norm keeps the smallest keys: every kept token's summed relative
    // norm is at most every dropped token's.
    let kept = KeyNorm {}.keep(&model, &prefix, &span, 5)?;
    let relative_norms: Vec<f32> = (0..SPAN.len())
        .map(|i| {
            span.keys
                .iter()
                .map(|k| {
                    let norms: Vec<f32> = k.sqr().unwrap().sum(3).unwrap().sqrt().unwrap().mean(1).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
                    norms[i] / (norms.iter().sum::<f32>() / norms.len() as f32)
                })
                .sum()
        })
        .collect();
    let worst_kept = kept.iter().map(|&i| relative_norms[i]).fold(f32::MIN, f32::max);
    let best_dropped = (0..SPAN.len()).filter(|i| !kept.contains(i)).map(|i| relative_norms[i]).fold(f32::MAX, f32::min);
    assert!(worst_kept <= best_dropped, "{worst_kept} > {best_dropped}");

    // SnapKV without pooling keeps the tokens the span's last 4 tokens
    // attend to most, summed over layers and heads.
    let probabilities = model.attention_probabilities(&span.embeddings, &span.positions, Some(&prefix))?;
    let mut attention = vec![0.0f32; SPAN.len()];
    for layer in &probabilities {
        // (1, heads, n, prefix + n): the last 4 rows, the span's columns.
        let rows = layer.narrow(2, SPAN.len() - 4, 4)?.narrow(3, PREFIX.len(), SPAN.len())?;
        let summed: Vec<f32> = rows.sum(2)?.sum(1)?.squeeze(0)?.to_vec1()?;
        attention.iter_mut().zip(summed).for_each(|(total, x)| *total += x);
    }
    let snap = SnapKv { window: 4, kernel: 1 }.keep(&model, &prefix, &span, 5)?;
    let least_kept = snap.iter().map(|&i| attention[i]).fold(f32::MAX, f32::min);
    let most_dropped = (0..SPAN.len()).filter(|i| !snap.contains(i)).map(|i| attention[i]).fold(f32::MIN, f32::max);
    assert!(least_kept >= most_dropped, "{least_kept} < {most_dropped}");
    assert!(SnapKv { window: 4, kernel: 1 }.keep(&model, &prefix, &span, 21).is_err(), "more than the span");
    assert!(SnapKv { window: 4, kernel: 2 }.keep(&model, &prefix, &span, 5).is_err(), "an even kernel");
    Ok(())
}

/// The summary against what the test computes itself: the span cut into
/// `ceil(n / chunk_tokens)` near-equal chunks (no more than the budget),
/// each chunk's prompt decoded greedily with a full forward per token for
/// its share of the budget, the notes joined; and the summary's entries as
/// one forward of prefix + summary from position 0. The random model never
/// stops early, so the notes fill the budget exactly.
#[test]
fn the_summary_is_the_models_chunked_greedy_notes_filling_the_token_budget() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 59, &cpu())?;
    let qwen = &model.qwen2;
    let tokenizer = &model.tokenizer;
    let prefix = prefix_cache(qwen, &PREFIX);
    let span = span_after_prefix(qwen, &prefix);
    assert!(tokenizer.stop_ids().is_empty(), "nothing stops the random model early");
    let settings = SummarySettings { chunk_tokens: 6 };
    // ratio -> (chunks, the budget)
    for (ratio, chunks, budget_expected) in [(1.6, 4, 12), (3.2, 4, 6), (6.4, 3, 3), (30.0, 1, 1)] {
        let compressed = Summarize { ratio, settings }.compress(&model, &prefix, &span, &mut |_, _| {})?;
        let budget = budget(SPAN.len(), ratio)?;
        assert_eq!(budget, budget_expected);
        let mut notes = Vec::new();
        for part in 0..chunks {
            let chunk = &SPAN[part * SPAN.len() / chunks..(part + 1) * SPAN.len() / chunks];
            let chunk_budget = (part + 1) * budget / chunks - part * budget / chunks;
            let words = ((chunk_budget as f64 * 0.6).floor() as usize).max(1);
            let prompt = tokenizer.encode(&Summarize::prompt(&tokenizer.decode(chunk)?, part + 1, chunks, words))?;
            let mut written = prompt.clone();
            for _ in 0..chunk_budget {
                let logits = qwen.forward(&qwen.embed(&written)?, &positions(0, written.len()), None, Logits::Last)?.logits.unwrap();
                written.push(logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?);
            }
            notes.push(tokenizer.decode(&written[prompt.len()..])?.trim().to_string());
        }
        let summary = tokenizer.encode(&notes.join("\n"))?;
        assert_eq!(summary.len(), budget, "{ratio}x: the notes fill the budget");
        assert_eq!(compressed.report.text.as_deref(), Some(tokenizer.decode(&summary)?.as_str()), "{ratio}x");
        assert_eq!((compressed.len(), compressed.report.n_kept), (budget, budget));
        assert_eq!(compressed.positions, positions(PREFIX.len(), budget), "from the span's first position");
        assert_eq!(compressed.next_position, (PREFIX.len() + SPAN.len()) as f32, "what follows keeps its positions");
        let whole: Vec<u32> = PREFIX.iter().chain(&summary).copied().collect();
        let scratch = qwen.forward(&qwen.embed(&whole)?, &positions(0, whole.len()), None, Logits::None)?;
        for layer in 0..scratch.keys.len() {
            let own = |t: &Tensor| t.narrow(2, PREFIX.len(), budget).unwrap();
            assert!(max_abs_diff(&own(&scratch.keys[layer]), &compressed.keys[layer]) <= 1e-5, "layer {layer} keys");
            assert!(max_abs_diff(&own(&scratch.values[layer]), &compressed.values[layer]) <= 1e-5, "layer {layer} values");
        }
    }
    let prompt = Summarize::prompt("SPAN", 2, 3, 12);
    for asked in ["SPAN", "part 2 of 3", "about 12 words", "file paths", "port numbers", "error messages"] {
        assert!(prompt.contains(asked), "the prompt asks for {asked}");
    }
    assert!(cram::registry::method("summary")?.build(&MethodOptions { knobs: serde_json::json!({"chunk_tokens": 0}), ..MethodOptions::new(2.0) }).is_err());
    Ok(())
}

#[test]
fn initial_embeddings_follow_the_chosen_start() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 61, &cpu())?;
    let prefix = prefix_cache(&model, &PREFIX);
    let span = span_after_prefix(&model, &prefix);
    let bounds = chunk_bounds(SPAN.len(), 5)?;

    let chunk_mean = Init::ChunkMean.embeddings(&model, &prefix, &span, &bounds)?;
    let first_chunk = span.embeddings.narrow(1, 0, bounds[1])?.mean_keepdim(1)?;
    assert!(max_abs_diff(&chunk_mean.narrow(1, 0, 1)?, &first_chunk) <= 1e-6);

    let random_start = Init::Random { seed: 1 }.embeddings(&model, &prefix, &span, &bounds)?;
    let norms = |x: &Tensor| x.sqr().unwrap().sum(2).unwrap().sqrt().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mean_norm = norms(&span.embeddings).iter().sum::<f32>() / SPAN.len() as f32;
    assert!(norms(&random_start).iter().all(|n| (n - mean_norm).abs() <= 1e-4 * mean_norm), "scaled to the embeddings' norm");
    let other_seed = Init::Random { seed: 2 }.embeddings(&model, &prefix, &span, &bounds)?;
    assert!(max_abs_diff(&random_start, &other_seed) > 1e-2);
    assert!(max_abs_diff(&random_start, &Init::Random { seed: 1 }.embeddings(&model, &prefix, &span, &bounds)?) == 0.0);

    let kept_start = Init::Kept(Rc::new(KeyNorm {})).embeddings(&model, &prefix, &span, &bounds)?;
    let kept = KeyNorm {}.keep(&model, &prefix, &span, 5)?;
    assert!(max_abs_diff(&kept_start, &span.select(&kept)?.embeddings) == 0.0);
    assert_eq!(Recipe { init: Init::Kept(Rc::new(KeyNorm {})), ..Recipe::published(4.0) }.name(), "surprisal+key-norm-init");
    Ok(())
}

#[test]
fn early_stopping_stops_on_a_plateau_only() -> anyhow::Result<()> {
    let rule = EarlyStop { patience: 3, min_improvement: 0.01 };
    assert!(!rule.plateaued(&[5.0, 4.0, 3.0]), "too few steps to judge");
    assert!(!rule.plateaued(&[5.0, 4.0, 3.0, 2.0, 1.0, 0.5]), "still improving");
    assert!(rule.plateaued(&[5.0, 1.0, 1.0, 0.999, 1.0]), "less than 1% in the last 3");
    assert!(rule.plateaued(&[5.0, 1.0, 2.0, 2.0, 2.0]), "worse");

    let full = synthetic::full_model(&synthetic::tiny_config(), 67, &cpu())?;
    let model = &full.qwen2;
    let prefix = prefix_cache(model, &PREFIX);
    let span = span_after_prefix(model, &prefix);
    let start = Recipe::published(4.0).virtual_start(&full, &prefix, &span)?;
    // lr 0: the loss never moves, so the run stops once the patience is spent.
    let frozen = OptimizerConfig { lr: 0.0, early_stop: Some(EarlyStop { patience: 5, min_improvement: 0.01 }), ..Default::default() };
    let stopped = optimize(model, start.objective(&prefix), &start.init, &frozen, 100, &mut |_, _| {})?;
    assert_eq!((stopped.report.steps, stopped.report.budget), (6, 100));
    assert_eq!(stopped.report.loss_curve.len(), 7);
    // A run that keeps improving uses its whole budget.
    let learning = OptimizerConfig { lr: 0.05, early_stop: Some(EarlyStop { patience: 5, min_improvement: 1e-4 }), ..Default::default() };
    let whole_budget = optimize(model, start.objective(&prefix), &start.init, &learning, 20, &mut |_, _| {})?;
    assert_eq!((whole_budget.report.steps, whole_budget.report.budget), (20, 20));
    Ok(())
}
