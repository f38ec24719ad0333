//! The differentiable forward on a small random-weight Qwen2, against two
//! independent implementations (candle-transformers' qwen2 for logits, a
//! naive f64 reference for every layer's K, V and attention), position
//! behaviour, prefix caching and decoding. Gradients: `gradient.rs`.

mod common;

use candle_core::{Tensor, Var, D};
use common::reference::{heads_of, max_diff_3, Reference};
use common::{candle_transformers_logits, cpu, max_abs_diff, write_safetensors_dir};
use cram::{generate, synthetic, KvCache, Logits, Model, ModelSource};

const TOKENS: [u32; 9] = [3, 17, 42, 8, 8, 60, 1, 33, 21];

fn positions(start: f32, n: usize) -> Vec<f32> {
    (0..n).map(|i| start + i as f32).collect()
}

#[test]
fn logits_match_candle_transformers_qwen2() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 7, &cpu())?;

    // Ours, loaded through the safetensors-directory path.
    let dir = tempfile::tempdir()?;
    write_safetensors_dir(dir.path(), &config, &weights);
    let ours = Model::load(&ModelSource::safetensors_dir(dir.path()), &cpu())?;
    let embeddings = ours.qwen2.embed(&TOKENS)?;
    let our_logits = ours.qwen2.forward(&embeddings, &positions(0.0, TOKENS.len()), None, Logits::All)?.logits.unwrap();

    let diff = max_abs_diff(&our_logits, &candle_transformers_logits(&config, &weights, &TOKENS));
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    Ok(())
}

/// Every layer's K and V, stopping after the last K/V projection (no
/// logits) or running to the logits, against the naive reference; the
/// logits too. Fractional positions with gaps, as virtual tokens have.
#[test]
fn every_layer_matches_a_naive_reference() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 9, &cpu())?;
    let model = synthetic::model(&config, 9, &cpu())?;
    let reference = Reference::new(&config, &weights);
    let at = [0.0f32, 1.0, 2.5, 4.0, 4.5, 9.0, 10.0, 11.25, 30.0];
    let expected = reference.forward(&TOKENS, &at);
    for logits in [Logits::None, Logits::All] {
        let output = model.forward(&model.embed(&TOKENS)?, &at, None, logits)?;
        assert_eq!(output.logits.is_some(), logits == Logits::All);
        for layer in 0..config.num_hidden_layers {
            let key_diff = max_diff_3(&heads_of(&output.keys[layer]), &expected.keys[layer], 0);
            let value_diff = max_diff_3(&heads_of(&output.values[layer]), &expected.values[layer], 0);
            assert!(key_diff <= 1e-4 && value_diff <= 1e-4, "{logits:?} layer {layer}: K {key_diff}, V {value_diff}");
        }
        if let Some(ours) = output.logits {
            let ours = ours.squeeze(0)?.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
            let diff = ours.iter().flatten().zip(expected.logits.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(diff <= 1e-4, "logits differ by {diff}");
        }
    }
    Ok(())
}

/// The cache a forward without logits leaves (its last layer stops at the
/// K/V projections) is what the model needs to go on: continued over it,
/// the next tokens' logits are candle-transformers' over the whole sequence.
#[test]
fn a_cache_filled_without_logits_continues_as_candle_transformers_does() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 11, &cpu())?;
    let model = synthetic::model(&config, 11, &cpu())?;
    let split = 5;
    let prefix = model.forward(&model.embed(&TOKENS[..split])?, &positions(0.0, split), None, Logits::None)?;
    assert!(prefix.logits.is_none());
    let mut cache = KvCache::new();
    cache.append(&prefix.keys, &prefix.values, &positions(0.0, split))?;
    let rest = &TOKENS[split..];
    let continued = model.forward(&model.embed(rest)?, &positions(split as f32, rest.len()), Some(&cache), Logits::All)?;
    let expected = candle_transformers_logits(&config, &weights, &TOKENS).narrow(1, split, rest.len())?;
    let diff = max_abs_diff(&continued.logits.unwrap(), &expected);
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    Ok(())
}

/// Each layer's attention rows of new tokens over a prefix cache against
/// the reference's softmax over the whole sequence (cache columns first):
/// distributions, causal, and the right ones.
#[test]
fn attention_probabilities_are_the_reference_softmax_rows() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 13, &cpu())?;
    let model = synthetic::model(&config, 13, &cpu())?;
    let at = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 9.25, 10.0];
    let split = 4;
    let prefix = model.forward(&model.embed(&TOKENS[..split])?, &at[..split], None, Logits::None)?;
    let mut cache = KvCache::new();
    cache.append(&prefix.keys, &prefix.values, &at[..split])?;
    let probabilities = model.attention_probabilities(&model.embed(&TOKENS[split..])?, &at[split..], Some(&cache))?;
    let expected = Reference::new(&config, &weights).forward(&TOKENS, &at).probabilities;
    assert_eq!(probabilities.len(), config.num_hidden_layers);
    for (layer, ours) in probabilities.iter().enumerate() {
        assert_eq!(ours.dims(), &[1, config.num_attention_heads, TOKENS.len() - split, TOKENS.len()]);
        let ours = heads_of(ours);
        let diff = max_diff_3(&ours, &expected[layer], split);
        assert!(diff <= 1e-5, "layer {layer}: {diff}");
        for (head, rows) in ours.iter().enumerate() {
            for (i, row) in rows.iter().enumerate() {
                assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-5, "layer {layer} head {head} row {i}");
                assert!(row[split + i + 1..].iter().all(|&p| p == 0.0), "row {i} sees the future");
            }
        }
    }
    Ok(())
}

#[test]
fn shifting_positions_keeps_values_and_moves_keys() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 3, &cpu())?;
    let embeddings = model.embed(&TOKENS)?;
    let at_zero = model.forward(&embeddings, &positions(0.0, TOKENS.len()), None, Logits::None)?;
    let shifted = model.forward(&embeddings, &positions(37.5, TOKENS.len()), None, Logits::None)?;
    for layer in 0..model.config().num_hidden_layers {
        let value_diff = max_abs_diff(&at_zero.values[layer], &shifted.values[layer]);
        let key_diff = max_abs_diff(&at_zero.keys[layer], &shifted.keys[layer]);
        assert!(value_diff <= 1e-5, "layer {layer}: V moved by {value_diff}");
        assert!(key_diff > 1e-2, "layer {layer}: K did not move ({key_diff})");
    }
    Ok(())
}

#[test]
fn forward_over_a_prefix_cache_equals_one_forward_over_the_whole() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 5, &cpu())?;
    let split = 4;
    let whole = model.forward(&model.embed(&TOKENS)?, &positions(0.0, TOKENS.len()), None, Logits::All)?;

    let prefix = model.forward(&model.embed(&TOKENS[..split])?, &positions(0.0, split), None, Logits::All)?;
    let mut cache = KvCache::new();
    cache.append(&prefix.keys, &prefix.values, &positions(0.0, split))?;
    let rest = &TOKENS[split..];
    let continued =
        model.forward(&model.embed(rest)?, &positions(split as f32, rest.len()), Some(&cache), Logits::All)?;

    for layer in 0..model.config().num_hidden_layers {
        let whole_keys = whole.keys[layer].narrow(2, split, rest.len())?;
        let whole_values = whole.values[layer].narrow(2, split, rest.len())?;
        assert!(max_abs_diff(&whole_keys, &continued.keys[layer]) <= 1e-5);
        assert!(max_abs_diff(&whole_values, &continued.values[layer]) <= 1e-5);
    }
    let whole_logits = whole.logits.unwrap().narrow(1, split, rest.len())?;
    assert!(max_abs_diff(&whole_logits, &continued.logits.unwrap()) <= 1e-4);
    Ok(())
}

#[test]
fn stock_candle_softmax_drops_the_gradient_that_ours_keeps() -> anyhow::Result<()> {
    // Why crate::ops exists: the fused op has no backward here.
    let x = Var::new(&[[0.3f32, -1.2, 2.0]], &cpu())?;
    let weights = Tensor::new(&[[1.0f32, 2.0, 3.0]], &cpu())?;
    let stock = candle_nn::ops::softmax_last_dim(x.as_tensor())?.mul(&weights)?.sum_all()?;
    let stock_grad = stock.backward().map(|g| g.get(x.as_tensor()).is_some()).unwrap_or(false);
    let ours = cram::model::ops::softmax_last_dim(x.as_tensor())?.mul(&weights)?.sum_all()?;
    let our_grad = ours.backward()?.get(x.as_tensor()).unwrap().sqr()?.sum_all()?.to_scalar::<f32>()?;
    assert!(!stock_grad, "stock softmax now backpropagates; crate::ops may be simplified");
    assert!(our_grad > 0.0);
    Ok(())
}

#[test]
fn greedy_decoding_over_the_cache_matches_recomputing_from_scratch() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 13, &cpu())?;
    let mut cache = KvCache::new();
    let answer = generate::greedy(&model, &mut cache, &TOKENS, 0.0, 6, &[])?;
    assert_eq!(answer.len(), 6);
    assert_eq!(cache.len(), TOKENS.len() + 5, "the last token is decoded, not fed");

    let mut sequence = TOKENS.to_vec();
    for expected in &answer {
        let output = model.forward(&model.embed(&sequence)?, &positions(0.0, sequence.len()), None, Logits::Last)?;
        let next = output.logits.unwrap().squeeze(0)?.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        assert_eq!(next, *expected);
        sequence.push(next);
    }
    let stopped = generate::greedy(&model, &mut KvCache::new(), &TOKENS, 0.0, 6, &[answer[0]])?;
    assert!(stopped.is_empty(), "a stop token ends decoding before it is emitted");
    Ok(())
}
