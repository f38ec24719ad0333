//! The differentiable forward on a small random-weight Qwen2: agreement with
//! candle-transformers, position behaviour, prefix caching, and gradients.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use common::{cpu, max_abs_diff, write_safetensors_dir};
use cram::ops::WeightGrad;
use cram::{generate, random, KvCache, Logits, Model, ModelSource, Qwen2};

const TOKENS: [u32; 9] = [3, 17, 42, 8, 8, 60, 1, 33, 21];

fn positions(start: f32, n: usize) -> Vec<f32> {
    (0..n).map(|i| start + i as f32).collect()
}

#[test]
fn logits_match_candle_transformers_qwen2() -> anyhow::Result<()> {
    let config = random::tiny_config();
    let weights = random::named_weights(&config, 7, &cpu())?;

    // Ours, loaded through the safetensors-directory path.
    let dir = tempfile::tempdir()?;
    write_safetensors_dir(dir.path(), &config, &weights);
    let ours = Model::load(&ModelSource::safetensors_dir(dir.path()), &cpu())?;
    let embeddings = ours.qwen2.embed(&TOKENS)?;
    let our_logits = ours.qwen2.forward(&embeddings, &positions(0.0, TOKENS.len()), None, Logits::All)?.logits.unwrap();

    // candle-transformers' reference implementation on the same weights.
    let reference_config = candle_transformers::models::qwen2::Config {
        vocab_size: config.vocab_size,
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        num_hidden_layers: config.num_hidden_layers,
        num_attention_heads: config.num_attention_heads,
        num_key_value_heads: config.num_key_value_heads,
        max_position_embeddings: 4096,
        sliding_window: 4096,
        max_window_layers: config.num_hidden_layers,
        tie_word_embeddings: false,
        rope_theta: config.rope_theta,
        rms_norm_eps: config.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &cpu());
    let mut reference = candle_transformers::models::qwen2::Model::new(&reference_config, vb)?;
    let ids = Tensor::new(&TOKENS, &cpu())?.unsqueeze(0)?;
    let hidden = reference.forward(&ids, 0, None)?;
    let reference_logits = hidden.broadcast_matmul(&weights["lm_head.weight"].t()?)?;

    let diff = max_abs_diff(&our_logits, &reference_logits);
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    Ok(())
}

#[test]
fn shifting_positions_keeps_values_and_moves_keys() -> anyhow::Result<()> {
    let model = random::model(&random::tiny_config(), 3, &cpu())?;
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
    let model = random::model(&random::tiny_config(), 5, &cpu())?;
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
fn stopping_without_logits_returns_the_same_keys_and_values() -> anyhow::Result<()> {
    let model = random::model(&random::tiny_config(), 9, &cpu())?;
    let embeddings = model.embed(&TOKENS)?;
    let full = model.forward(&embeddings, &positions(0.0, TOKENS.len()), None, Logits::All)?;
    let stopped = model.forward(&embeddings, &positions(0.0, TOKENS.len()), None, Logits::None)?;
    assert!(stopped.logits.is_none());
    for layer in 0..model.config().num_hidden_layers {
        assert_eq!(max_abs_diff(&full.keys[layer], &stopped.keys[layer]), 0.0);
        assert_eq!(max_abs_diff(&full.values[layer], &stopped.values[layer]), 0.0);
    }
    Ok(())
}

/// A random model in f64, so finite differences are exact to many digits.
fn f64_model(seed: u64) -> anyhow::Result<Qwen2> {
    let config = random::tiny_config();
    let mut weights = random::named_weights(&config, seed, &cpu())?;
    Ok(Qwen2::from_named_weights(config, |name| {
        weights.remove(name).map(|t| t.to_dtype(DType::F64)).transpose().map_err(Into::into)
    })?)
}

/// Σ over layers of mean((V - target)²): the shape of the compression loss.
fn value_loss(model: &Qwen2, embeddings: &Tensor, positions: &[f32], cache: &KvCache, targets: &[Tensor]) -> Tensor {
    let output = model.forward(embeddings, positions, Some(cache), Logits::None).unwrap();
    let per_layer: Vec<Tensor> = output
        .values
        .iter()
        .zip(targets)
        .map(|(v, t)| (v - t).unwrap().sqr().unwrap().mean_all().unwrap())
        .collect();
    Tensor::stack(&per_layer, 0).unwrap().sum_all().unwrap()
}

fn check_gradient(weight_grad: WeightGrad) -> anyhow::Result<()> {
    let mut model = f64_model(11)?;
    model.set_weight_grad(weight_grad);
    let device = Device::Cpu;
    let prefix = model.embed(&TOKENS[..3])?.to_dtype(DType::F64)?;
    let prefix_out = model.forward(&prefix, &positions(0.0, 3), None, Logits::None)?;
    // The last layer's K/V are computed even without logits: a full cache.
    let mut cache = KvCache::new();
    cache.append(&prefix_out.keys, &prefix_out.values, &positions(0.0, 3))?;

    // Three virtual tokens at fractional positions over a span of six.
    let virtual_positions = [3.0f32, 5.5, 8.0];
    let init = Tensor::randn(0.0f64, 1.0, (1, 3, model.config().hidden_size), &device)?;
    let virtual_embeddings = Var::from_tensor(&init)?;
    let targets: Vec<Tensor> = prefix_out
        .values
        .iter()
        .map(|v| Tensor::randn(0.0f64, 1.0, v.dims4().map(|(b, h, _, d)| (b, h, 3, d)).unwrap(), &device).unwrap())
        .collect();

    let loss = value_loss(&model, virtual_embeddings.as_tensor(), &virtual_positions, &cache, &targets);
    let grads = loss.backward()?;
    let analytic = grads.get(virtual_embeddings.as_tensor()).expect("gradient reaches the embeddings");
    let analytic: Vec<f64> = analytic.flatten_all()?.to_vec1()?;

    let base: Vec<f64> = init.flatten_all()?.to_vec1()?;
    let step = 1e-5;
    let mut worst = 0.0f64;
    for index in (0..base.len()).step_by(7) {
        let at = |delta: f64| -> f64 {
            let mut shifted = base.clone();
            shifted[index] += delta;
            let embeddings = Tensor::from_vec(shifted, init.shape(), &device).unwrap();
            value_loss(&model, &embeddings, &virtual_positions, &cache, &targets).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(step) - at(-step)) / (2.0 * step);
        let relative = (analytic[index] - numeric).abs() / numeric.abs().max(analytic[index].abs()).max(1e-6);
        worst = worst.max(relative);
    }
    assert!(worst <= 1e-2, "{weight_grad:?}: worst relative gradient error {worst}");
    let gradient_norm: f64 = analytic.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!(gradient_norm > 1e-6, "gradient vanished");
    Ok(())
}

#[test]
fn value_loss_gradient_matches_finite_differences() -> anyhow::Result<()> {
    check_gradient(WeightGrad::Skip)
}

#[test]
fn plain_matmul_path_has_the_same_gradient() -> anyhow::Result<()> {
    check_gradient(WeightGrad::Compute)
}

#[test]
fn stock_candle_softmax_drops_the_gradient_that_ours_keeps() -> anyhow::Result<()> {
    // Why crate::ops exists: the fused op has no backward here.
    let x = Var::new(&[[0.3f32, -1.2, 2.0]], &cpu())?;
    let weights = Tensor::new(&[[1.0f32, 2.0, 3.0]], &cpu())?;
    let stock = candle_nn::ops::softmax_last_dim(x.as_tensor())?.mul(&weights)?.sum_all()?;
    let stock_grad = stock.backward().map(|g| g.get(x.as_tensor()).is_some()).unwrap_or(false);
    let ours = cram::ops::softmax_last_dim(x.as_tensor())?.mul(&weights)?.sum_all()?;
    let our_grad = ours.backward()?.get(x.as_tensor()).unwrap().sqr()?.sum_all()?.to_scalar::<f32>()?;
    assert!(!stock_grad, "stock softmax now backpropagates; crate::ops may be simplified");
    assert!(our_grad > 0.0);
    Ok(())
}

#[test]
fn greedy_decoding_over_the_cache_matches_recomputing_from_scratch() -> anyhow::Result<()> {
    let model = random::model(&random::tiny_config(), 13, &cpu())?;
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
