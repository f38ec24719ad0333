//! The published recipe's pieces on a small random model: pooling, positions,
//! surprisal targets, optimization, and the compressors.

mod common;

use std::time::Duration;

use candle_core::{Tensor, D};
use common::{candle_transformers_logits, cpu, max_abs_diff, positions, prefix_cache};
use cram::recipe::objective::Objective;
use cram::recipe::optimize::{optimize, optimize_together};
use cram::recipe::pooling::{chunk_bounds, pool, pooling_matrix, token_weights};
use cram::recipe::positions::virtual_positions;
use cram::recipe::settings::default_steps;
use cram::{
    budget, compress_together, synthetic, Anchors, Checkpointing, Compressor, EarlyStop, Init, KvCache, Logits, Model, OptimizerConfig,
    Pooling, PositionMode, RawSpan, Recipe, SpanTargets,
};

const PREFIX: [u32; 4] = [5, 9, 14, 2];
const SPAN: [u32; 12] = [30, 31, 8, 8, 44, 17, 63, 1, 12, 40, 41, 7];

/// The targets of `SPAN` placed right after `PREFIX`, at its original positions.
fn span_after_prefix(model: &cram::Qwen2, prefix: &cram::KvCache) -> cram::Result<SpanTargets> {
    SpanTargets::compute(model, prefix, &SPAN, &positions(PREFIX.len(), SPAN.len()))
}

#[test]
fn chunk_bounds_are_a_truncated_linspace() {
    assert_eq!(chunk_bounds(10, 3).unwrap(), vec![0, 3, 6, 10]);
    assert_eq!(chunk_bounds(7, 7).unwrap(), (0..=7).collect::<Vec<_>>());
    assert_eq!(chunk_bounds(242, 76).unwrap().len(), 77);
    // numpy's linspace computes j * (n / k): 39 * (248 / 78) lands just under 124.
    assert_eq!(chunk_bounds(248, 78).unwrap()[39], 123);
    assert!(chunk_bounds(5, 6).is_err(), "more virtual tokens than tokens");
    assert!(chunk_bounds(5, 0).is_err());
}

/// Anchors the test chooses itself.
#[derive(Debug)]
struct FixedAnchors(Vec<usize>);

impl Anchors for FixedAnchors {
    fn name(&self) -> String {
        "fixed".into()
    }

    fn anchors(&self, _: &Model, _: &KvCache, _: &SpanTargets, _: usize) -> cram::Result<Vec<usize>> {
        Ok(self.0.clone())
    }
}

/// Each virtual token of an anchored start sits at its anchor's position,
/// starts as its embedding, and targets the surprisal-weighted Values of
/// the tokens nearer its anchor than any other (ties to the later one),
/// found here by measuring every distance.
#[test]
fn an_anchored_start_sits_at_its_anchors_and_pools_their_nearest_tokens() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 53, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let span = span_after_prefix(&model.qwen2, &prefix)?;
    let anchors = vec![1, 2, 6, 11];
    let recipe = Recipe { init: Init::Anchored(std::rc::Rc::new(FixedAnchors(anchors.clone()))), ..Recipe::published(3.0) };
    assert_eq!(recipe.name(), "surprisal+fixed-init");
    let start = recipe.virtual_start(&model, &prefix, &span)?;
    assert_eq!(start.positions, anchors.iter().map(|&i| span.positions[i]).collect::<Vec<_>>());
    assert_eq!(max_abs_diff(&start.init, &span.select(&anchors)?.embeddings), 0.0);

    let nearest = |token: usize| (0..anchors.len()).min_by_key(|&j| (token.abs_diff(anchors[j]), std::cmp::Reverse(j))).unwrap();
    for (j, _) in anchors.iter().enumerate() {
        let members: Vec<usize> = (0..SPAN.len()).filter(|&i| nearest(i) == j).collect();
        let top = members.iter().map(|&i| span.surprisal[i]).fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = members.iter().map(|&i| (span.surprisal[i] - top).exp()).collect();
        let total: f32 = weights.iter().sum();
        for layer in [0, span.values.len() - 1] {
            let mut expected = span.values[layer].narrow(2, members[0], 1)?.zeros_like()?;
            for (&i, w) in members.iter().zip(&weights) {
                expected = (expected + (span.values[layer].narrow(2, i, 1)? * (*w / total) as f64)?)?;
            }
            let got = start.targets[layer].narrow(2, j, 1)?;
            assert!(max_abs_diff(&got, &expected) <= 1e-5, "virtual token {j}, layer {layer}");
        }
    }

    // Anchors that are not ascending, or not as many as asked, are refused.
    for wrong in [vec![2, 1, 6, 11], vec![1, 2, 6], vec![1, 2, 6, 12]] {
        let recipe = Recipe { init: Init::Anchored(std::rc::Rc::new(FixedAnchors(wrong))), ..Recipe::published(3.0) };
        assert!(recipe.virtual_start(&model, &prefix, &span).is_err());
    }
    Ok(())
}

#[test]
fn the_budget_rounds_like_python_and_refuses_ratios_of_one_or_less() {
    assert_eq!(budget(242, 3.2).unwrap(), 76); // 75.625
    assert_eq!(budget(240, 1.6).unwrap(), 150);
    assert_eq!(budget(10, 4.0).unwrap(), 2); // 2.5 -> 2, ties to even
    assert_eq!(budget(3, 100.0).unwrap(), 1);
    for bad in [1.0, 0.5, -2.0, f64::NAN, f64::INFINITY] {
        assert!(budget(100, bad).is_err(), "ratio {bad}");
    }
}

#[test]
fn surprisal_weights_are_a_softmax_within_each_chunk() {
    let surprisal = [0.0f32, 2.0, 1.0, 5.0, 5.0];
    let bounds = chunk_bounds(5, 2).unwrap(); // [0, 2, 5]
    let weights = token_weights(&surprisal, &bounds, Pooling::Surprisal);
    // Chunk 0: softmax(0, 2); chunk 1: softmax(1, 5, 5).
    let e = std::f32::consts::E;
    let expected = [1.0 / (1.0 + e * e), e * e / (1.0 + e * e), 1.0 / (1.0 + 2.0 * e.powi(4)), e.powi(4) / (1.0 + 2.0 * e.powi(4)), e.powi(4) / (1.0 + 2.0 * e.powi(4))];
    for (w, x) in weights.iter().zip(expected) {
        assert!((w - x).abs() < 1e-6, "{weights:?} vs {expected:?}");
    }
    for chunk in bounds.windows(2) {
        let sum: f32 = weights[chunk[0]..chunk[1]].iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
    let uniform = token_weights(&surprisal, &bounds, Pooling::Uniform);
    assert_eq!(uniform, vec![0.5, 0.5, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]);
}

#[test]
fn pooling_takes_the_weighted_mean_of_each_chunk() -> anyhow::Result<()> {
    let values = Tensor::new(&[[[[1.0f32, 0.0], [3.0, 2.0], [10.0, 4.0]]]], &cpu())?; // (1, 1, 3, 2)
    let bounds = chunk_bounds(3, 2)?; // [0, 1, 3]
    let matrix = pooling_matrix(&[1.0, 0.25, 0.75], &bounds, &cpu())?;
    let pooled = pool(&matrix, &values)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
    assert_eq!(pooled, vec![vec![1.0, 0.0], vec![0.25 * 3.0 + 0.75 * 10.0, 0.25 * 2.0 + 0.75 * 4.0]]);
    Ok(())
}

#[test]
fn virtual_positions_spread_over_the_span() {
    assert_eq!(virtual_positions(10.0, 19.0, 4, PositionMode::Fractional), vec![10.0, 13.0, 16.0, 19.0]);
    assert_eq!(virtual_positions(10.0, 20.0, 4, PositionMode::Fractional)[1], 10.0 + 10.0 / 3.0);
    // 10, 13.33, 16.67, 20 -> rounded; 12.5 ties to even (12).
    assert_eq!(virtual_positions(10.0, 20.0, 4, PositionMode::Rounded), vec![10.0, 13.0, 17.0, 20.0]);
    assert_eq!(virtual_positions(10.0, 15.0, 3, PositionMode::Rounded), vec![10.0, 12.0, 15.0]);
    assert_eq!(virtual_positions(7.0, 30.0, 1, PositionMode::Rounded), vec![7.0]);
}

#[test]
fn default_steps_scale_with_the_span() {
    assert_eq!(default_steps(250), 300);
    assert_eq!(default_steps(242), 290);
    assert_eq!(default_steps(1231), 1477);
    assert_eq!(default_steps(20), 100);
}

/// The targets against independent computations: surprisal from
/// candle-transformers' logits over prefix + span, K/V from one forward of
/// prefix + span from scratch (not over the prefix cache).
#[test]
fn targets_hold_the_span_kv_and_its_surprisal() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let model = synthetic::model(&config, 17, &cpu())?;
    let prefix = prefix_cache(&model, &PREFIX);
    let targets = span_after_prefix(&model, &prefix)?;
    assert_eq!(targets.surprisal[0], 0.0, "the first token's prediction lies outside the span");

    let whole: Vec<u32> = PREFIX.iter().chain(&SPAN).copied().collect();
    let logits = candle_transformers_logits(&config, &synthetic::named_weights(&config, 17, &cpu())?, &whole);
    let log_probs = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?.to_vec2::<f32>()?;
    for i in 1..SPAN.len() {
        let expected = -log_probs[PREFIX.len() + i - 1][SPAN[i] as usize];
        assert!((targets.surprisal[i] - expected).abs() < 1e-4, "token {i}: {} vs {expected}", targets.surprisal[i]);
    }
    assert!(targets.surprisal[1..].iter().any(|&s| s > 1.0), "a real surprisal");
    assert_span_kv(&model, &targets.keys, &targets.values);
    Ok(())
}

/// `keys` and `values` are SPAN's after PREFIX, by one forward of both from position 0.
fn assert_span_kv(model: &cram::Qwen2, keys: &[Tensor], values: &[Tensor]) {
    let whole: Vec<u32> = PREFIX.iter().chain(&SPAN).copied().collect();
    let scratch = model.forward(&model.embed(&whole).unwrap(), &positions(0, whole.len()), None, Logits::None).unwrap();
    for layer in 0..scratch.keys.len() {
        let span_part = |t: &Tensor| t.narrow(2, PREFIX.len(), SPAN.len()).unwrap();
        assert!(max_abs_diff(&keys[layer], &span_part(&scratch.keys[layer])) <= 1e-5, "layer {layer} keys");
        assert!(max_abs_diff(&values[layer], &span_part(&scratch.values[layer])) <= 1e-5, "layer {layer} values");
    }
}

#[test]
fn the_raw_span_compressor_gives_the_span_kv_at_its_own_positions() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 19, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let targets = span_after_prefix(&model.qwen2, &prefix)?;
    let raw = RawSpan.compress(&model, &prefix, &targets, &mut |_, _| {})?;
    assert_eq!(raw.positions, positions(PREFIX.len(), SPAN.len()));
    assert_eq!((raw.report.method.as_str(), raw.report.n_kept, raw.next_position), ("raw", SPAN.len(), 16.0));
    assert_span_kv(&model.qwen2, &raw.keys, &raw.values);
    Ok(())
}

#[test]
fn optimization_lowers_the_value_loss() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 23, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let targets = span_after_prefix(&model.qwen2, &prefix)?;
    for pooling in [Pooling::Surprisal, Pooling::Uniform] {
        let recipe = Recipe {
            pooling,
            positions: PositionMode::Rounded,
            optimizer: OptimizerConfig { lr: 0.05, steps: Some(60), ..Default::default() },
            ..Recipe::published(3.0)
        };
        let mut steps_seen = 0;
        let compressed = recipe.compress(&model, &prefix, &targets, &mut |_, _| steps_seen += 1)?;
        let report = compressed.report.optimization.unwrap();
        assert_eq!((steps_seen, report.steps, report.loss_curve.len()), (60, 60, 61));
        let (first, last) = (report.loss_curve[0], *report.loss_curve.last().unwrap());
        assert!(last < 0.5 * first, "{pooling:?}: loss {first} -> {last}");
        assert_eq!(compressed.report.n_kept, 4);
        assert_eq!(compressed.positions, vec![4.0, 8.0, 11.0, 15.0]);
        assert_eq!(compressed.keys[0].dims(), &[1, 2, 4, 8]);
    }
    Ok(())
}

#[test]
fn spans_optimized_together_match_each_optimized_alone() -> anyhow::Result<()> {
    // Three ratios of one span side by side in one forward: the mask keeps
    // them apart, so each gets the gradients and Adam steps it would alone.
    let model = synthetic::full_model(&synthetic::tiny_config(), 29, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let span = span_after_prefix(&model.qwen2, &prefix)?;
    let config = OptimizerConfig { lr: 0.05, ..Default::default() };
    let starts: Vec<_> = [2.0, 3.0, 6.0].iter().map(|&ratio| Recipe::published(ratio).virtual_start(&model, &prefix, &span)).collect::<Result<_, _>>()?;
    let objectives: Vec<Objective> =
        starts.iter().map(|s| s.objective(&prefix)).collect();
    let inits: Vec<Tensor> = starts.iter().map(|s| s.init.clone()).collect();
    let mut summed_losses = Vec::new();
    let together = optimize_together(&model.qwen2, &objectives, &inits, &config, 15, &mut |_, loss| summed_losses.push(loss))?;
    assert_eq!(together.len(), 3);
    for ((objective, init), joint) in objectives.iter().zip(&inits).zip(&together) {
        let alone = optimize(&model.qwen2, *objective, init, &config, 15, &mut |_, _| {})?;
        assert_eq!(joint.keys[0].dims(), alone.keys[0].dims());
        assert!(max_abs_diff(&joint.embeddings, &alone.embeddings) <= 1e-4);
        for layer in 0..alone.values.len() {
            assert!(max_abs_diff(&joint.values[layer], &alone.values[layer]) <= 1e-4, "layer {layer}");
            assert!(max_abs_diff(&joint.keys[layer], &alone.keys[layer]) <= 1e-4, "layer {layer}");
        }
        let (joint_curve, alone_curve) = (&joint.report.loss_curve, &alone.report.loss_curve);
        assert!(joint_curve.iter().zip(alone_curve).all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0)));
    }
    // The callback gets the sum of the three losses.
    let first_sum: f32 = together.iter().map(|t| t.report.loss_curve[0]).sum();
    assert!((summed_losses[0] - first_sum).abs() <= 1e-4 * first_sum);
    Ok(())
}

#[test]
fn a_killed_optimization_resumes_from_its_checkpoint_to_the_same_result() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 37, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let span = span_after_prefix(&model.qwen2, &prefix)?;
    let start = Recipe::published(3.0).virtual_start(&model, &prefix, &span)?;
    let objective = start.objective(&prefix);
    let plain = OptimizerConfig { lr: 0.05, ..Default::default() };
    let uninterrupted = optimize(&model.qwen2, objective, &start.init, &plain, 8, &mut |_, _| {})?;

    // The process dies in the progress callback after the third step.
    let dir = tempfile::tempdir()?;
    let checkpointing = Checkpointing { dir: dir.path().to_path_buf(), every: Duration::ZERO };
    let saving = OptimizerConfig { checkpoint: Some(checkpointing.clone()), ..plain.clone() };
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        optimize(&model.qwen2, objective, &start.init, &saving, 8, &mut |step, _| assert!(step < 2, "killed"))
    }));
    assert!(killed.is_err());
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 1, "one checkpoint file, no partial one");

    let mut reported = Vec::new();
    let resumed = optimize(&model.qwen2, objective, &start.init, &saving, 8, &mut |step, _| reported.push(step))?;
    assert_eq!(resumed.report.resumed_steps, 3);
    assert_eq!(reported, (0..8).collect::<Vec<_>>(), "the restored steps are reported first");
    // Adam's moments came back too: the same numbers as a run never killed.
    assert_eq!(resumed.embeddings.flatten_all()?.to_vec1::<f32>()?, uninterrupted.embeddings.flatten_all()?.to_vec1::<f32>()?);
    assert_eq!(resumed.report.loss_curve, uninterrupted.report.loss_curve);

    // Another span (another start) does not pick up this run's file.
    let other = Recipe::published(2.0).virtual_start(&model, &prefix, &span)?;
    let fresh = optimize(&model.qwen2, other.objective(&prefix), &other.init, &saving, 2, &mut |_, _| {})?;
    assert_eq!(fresh.report.resumed_steps, 0);
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 2);

    // A file that does not fit the run is an error that names it.
    for entry in std::fs::read_dir(dir.path())? {
        std::fs::write(entry?.path(), b"not a checkpoint")?;
    }
    let error = optimize(&model.qwen2, objective, &start.init, &saving, 8, &mut |_, _| {}).unwrap_err();
    assert!(error.to_string().contains(&dir.path().display().to_string()), "{error}");
    Ok(())
}

#[test]
fn settings_adam_cannot_use_and_a_diverging_loss_are_errors() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 41, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let span = span_after_prefix(&model.qwen2, &prefix)?;
    let start = Recipe::published(3.0).virtual_start(&model, &prefix, &span)?;
    let objective = start.objective(&prefix);
    for (config, expected) in [
        (OptimizerConfig { beta2: 1.0, ..Default::default() }, "beta2 1 must be in [0, 1)"),
        (OptimizerConfig { lr: f64::NAN, ..Default::default() }, "lr NaN must be"),
        (OptimizerConfig { eps: 0.0, ..Default::default() }, "eps 0 must be"),
    ] {
        let error = optimize(&model.qwen2, objective, &start.init, &config, 2, &mut |_, _| {}).unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
    }
    // A start that is not a number ends the run at its first step.
    let broken = start.init.affine(f64::NAN, 0.0)?;
    let mut steps_reported = 0;
    let error = optimize(&model.qwen2, objective, &broken, &OptimizerConfig::default(), 5, &mut |_, _| steps_reported += 1).unwrap_err();
    assert!(matches!(error, cram::Error::Diverged { step: 0, .. }), "{error}");
    assert_eq!(steps_reported, 0);
    Ok(())
}

#[test]
fn optimizing_together_refuses_different_prefixes() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 31, &cpu())?;
    let (prefix, other_prefix) = (prefix_cache(&model.qwen2, &PREFIX), prefix_cache(&model.qwen2, &PREFIX));
    let span = span_after_prefix(&model.qwen2, &prefix)?;
    let start = Recipe::published(3.0).virtual_start(&model, &prefix, &span)?;
    let objectives = [
        start.objective(&prefix),
        start.objective(&other_prefix),
    ];
    let inits = [start.init.clone(), start.init.clone()];
    let error = optimize_together(&model.qwen2, &objectives, &inits, &OptimizerConfig::default(), 1, &mut |_, _| {}).unwrap_err();
    assert!(error.to_string().contains("same prefix"), "{error}");
    Ok(())
}

#[test]
fn compressing_together_refuses_what_would_change_a_recipe() -> anyhow::Result<()> {
    let model = synthetic::full_model(&synthetic::tiny_config(), 37, &cpu())?;
    let prefix = prefix_cache(&model.qwen2, &PREFIX);
    let span = span_after_prefix(&model.qwen2, &prefix)?;
    let compress = |recipes: &[Recipe]| compress_together(recipes, &model, &prefix, &span, &mut |_, _| {});

    let fast = Recipe { optimizer: OptimizerConfig { lr: 0.1, steps: Some(3), ..Default::default() }, ..Recipe::published(2.0) };
    let slow = Recipe { optimizer: OptimizerConfig { lr: 0.01, ..fast.optimizer.clone() }, ..Recipe::published(3.0) };
    let error = compress(&[fast.clone(), slow]).unwrap_err();
    assert!(error.to_string().contains("share their optimizer settings"), "{error}");

    let early = Recipe { optimizer: OptimizerConfig { early_stop: Some(EarlyStop::default()), ..fast.optimizer.clone() }, ..fast.clone() };
    let error = compress(&[early]).unwrap_err();
    assert!(error.to_string().contains("early stopping"), "{error}");
    assert!(compress(&[]).is_err());

    // What comes back is each recipe's, in order, with the batch's report.
    let uniform = Recipe { pooling: Pooling::Uniform, ratio: 4.0, ..fast.clone() };
    let compressed = compress(&[fast, uniform])?;
    let kept: Vec<_> = compressed.iter().map(|c| (c.report.method.as_str(), c.len(), c.report.optimization.as_ref().unwrap().steps)).collect();
    assert_eq!(kept, [("surprisal", 6, 3), ("uniform", 3, 3)]);
    Ok(())
}
