//! Gradients of the compression loss with respect to the virtual
//! embeddings, on a tiny random model: in f64 against central finite
//! differences at every coordinate, for the V and the K + V objective; and
//! through the f32 <-> bf16 casts of a bf16 model against the f64 gradient.
//! Everything is seeded: the weights, and inputs made of token embeddings.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use common::cpu;
use cram::model::ops::WeightGrad;
use cram::model::rope::Rotation;
use cram::recipe::objective::objective_loss;
use cram::{synthetic, KvCache, Logits, Qwen2};

const SEED: u64 = 11;
const PREFIX: [u32; 3] = [3, 17, 42];
/// The virtual tokens start from these tokens' embeddings...
const START: [u32; 2] = [8, 60];
/// ...and must produce these tokens' K/V at the virtual positions.
const TARGET: [u32; 2] = [1, 33];
/// Fractional, as interpolated positions can be.
const VIRTUAL_POSITIONS: [f32; 2] = [3.0, 5.5];
const KEY_WEIGHT: f64 = 0.5;

/// The tiny model's weights in `dtype`; `round_to_bf16` first rounds them
/// to bf16, so an f64 model can be the exact-arithmetic twin of a bf16 one.
fn model_in(dtype: DType, round_to_bf16: bool) -> Qwen2 {
    let config = synthetic::tiny_config();
    let weights: HashMap<String, Tensor> = synthetic::named_weights(&config, SEED, &cpu()).unwrap();
    let mut weights: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(name, t)| {
            let t = if round_to_bf16 { t.to_dtype(DType::BF16).unwrap() } else { t };
            (name, t.to_dtype(dtype).unwrap())
        })
        .collect();
    Qwen2::from_named_weights(config, |name| Ok(weights.remove(name))).unwrap()
}

/// What the virtual tokens are fitted to, after the prefix.
struct Setup {
    cache: KvCache,
    /// (1, 2, hidden) in the model's dtype (f32 below f64).
    start: Tensor,
    value_targets: Vec<Tensor>,
    /// Un-rotated.
    key_targets: Vec<Tensor>,
}

fn setup(model: &Qwen2) -> Setup {
    let dtype = if model.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let prefix_at: Vec<f32> = (0..PREFIX.len()).map(|p| p as f32).collect();
    let prefix = model.forward(&model.embed(&PREFIX).unwrap(), &prefix_at, None, Logits::None).unwrap();
    let mut cache = KvCache::new();
    cache.append(&prefix.keys, &prefix.values, &prefix_at).unwrap();
    let target = model.forward(&model.embed(&TARGET).unwrap(), &VIRTUAL_POSITIONS, Some(&cache), Logits::None).unwrap();
    let rotation = rotation(model, dtype);
    Setup {
        start: model.embed(&START).unwrap().to_dtype(dtype).unwrap(),
        value_targets: target.values.iter().map(|v| v.to_dtype(dtype).unwrap()).collect(),
        key_targets: target.keys.iter().map(|k| rotation.invert(&k.to_dtype(dtype).unwrap()).unwrap()).collect(),
        cache,
    }
}

fn rotation(model: &Qwen2, dtype: DType) -> Rotation {
    let c = model.config();
    Rotation::new(&VIRTUAL_POSITIONS, c.head_dim(), c.rope_theta, dtype, &cpu()).unwrap()
}

/// The objective written out in f64 (every cast a no-op, unlike the
/// library's f32 loss): Σ_l MSE(V_l, T_l) / mean(T_l²), plus `key_weight`
/// times the same on the un-rotated keys.
fn loss_f64(model: &Qwen2, setup: &Setup, embeddings: &Tensor, key_weight: f64) -> Tensor {
    let output = model.forward(embeddings, &VIRTUAL_POSITIONS, Some(&setup.cache), Logits::None).unwrap();
    let term = |xs: &[Tensor], targets: &[Tensor]| -> Tensor {
        let layers: Vec<Tensor> = xs
            .iter()
            .zip(targets)
            .map(|(x, t)| ((x - t).unwrap().sqr().unwrap().mean_all().unwrap() / t.sqr().unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap()).unwrap())
            .collect();
        Tensor::stack(&layers, 0).unwrap().sum_all().unwrap()
    };
    let value_term = term(&output.values, &setup.value_targets);
    if key_weight == 0.0 {
        return value_term;
    }
    let rotation = rotation(model, DType::F64);
    let unrotated: Vec<Tensor> = output.keys.iter().map(|k| rotation.invert(k).unwrap()).collect();
    (value_term + (term(&unrotated, &setup.key_targets) * key_weight).unwrap()).unwrap()
}

/// The analytic gradient of [`loss_f64`] at `at`, flattened.
fn gradient_f64(model: &Qwen2, setup: &Setup, at: &Tensor, key_weight: f64) -> Vec<f64> {
    let embeddings = Var::from_tensor(at).unwrap();
    let grads = loss_f64(model, setup, embeddings.as_tensor(), key_weight).backward().unwrap();
    grads.get(embeddings.as_tensor()).expect("the gradient reaches the embeddings").flatten_all().unwrap().to_vec1().unwrap()
}

fn check_every_coordinate(weight_grad: WeightGrad) {
    let mut model = model_in(DType::F64, false);
    model.set_weight_grad(weight_grad);
    let setup = setup(&model);
    for key_weight in [0.0, KEY_WEIGHT] {
        // The test's loss is the library's objective (which works in f32).
        let output = model.forward(&setup.start, &VIRTUAL_POSITIONS, Some(&setup.cache), Logits::None).unwrap();
        let unrotated: Vec<Tensor> = output.keys.iter().map(|k| rotation(&model, DType::F64).invert(k).unwrap()).collect();
        let keys = (key_weight > 0.0).then_some((unrotated.as_slice(), setup.key_targets.as_slice(), key_weight));
        let library = objective_loss(&output.values, &setup.value_targets, keys).unwrap().to_scalar::<f32>().unwrap() as f64;
        let ours = loss_f64(&model, &setup, &setup.start, key_weight).to_scalar::<f64>().unwrap();
        assert!((library - ours).abs() <= 1e-5 * ours, "key weight {key_weight}: library loss {library}, test's {ours}");

        let analytic = gradient_f64(&model, &setup, &setup.start, key_weight);
        let base: Vec<f64> = setup.start.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(analytic.len(), START.len() * model.config().hidden_size);
        let step = 1e-5;
        let numeric: Vec<f64> = (0..base.len())
            .map(|index| {
                let at = |delta: f64| -> f64 {
                    let mut shifted = base.clone();
                    shifted[index] += delta;
                    let embeddings = Tensor::from_vec(shifted, setup.start.shape(), &cpu()).unwrap();
                    loss_f64(&model, &setup, &embeddings, key_weight).to_scalar::<f64>().unwrap()
                };
                (at(step) - at(-step)) / (2.0 * step)
            })
            .collect();
        let largest = numeric.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(largest > 1e-3, "key weight {key_weight}: the gradient vanished ({largest})");
        for (index, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            assert!(
                (a - n).abs() <= 1e-7 * largest + 1e-6 * n.abs(),
                "{weight_grad:?}, key weight {key_weight}, coordinate {index}: analytic {a}, numeric {n}"
            );
        }
    }
}

#[test]
fn the_gradient_matches_finite_differences_at_every_coordinate() {
    check_every_coordinate(WeightGrad::Skip);
}

#[test]
fn the_plain_matmul_path_has_the_same_gradient() {
    check_every_coordinate(WeightGrad::Compute);
}

/// A bf16 model as the optimizer runs it: f32 embeddings cast to bf16 on
/// the way in, K/V cast to f32 for the loss, the gradient cast back through
/// both. Against the f64 gradient of the same (bf16-rounded) weights, it
/// must point the same way and be about as large, to bf16's precision.
#[test]
fn the_gradient_through_bf16_casts_matches_the_f64_one() {
    let reference_model = model_in(DType::F64, true);
    let reference = setup(&reference_model);
    let model = model_in(DType::BF16, true);
    let setup = setup(&model);
    assert_eq!(setup.start.dtype(), DType::F32);
    // The same start and targets on both sides: only the arithmetic differs.
    let start = reference.start.to_dtype(DType::F32).unwrap();
    let to_f32 = |ts: &[Tensor]| ts.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect::<Vec<_>>();
    let (value_targets, key_targets) = (to_f32(&reference.value_targets), to_f32(&reference.key_targets));
    for key_weight in [0.0, KEY_WEIGHT] {
        let embeddings = Var::from_tensor(&start).unwrap();
        let output = model.forward(embeddings.as_tensor(), &VIRTUAL_POSITIONS, Some(&setup.cache), Logits::None).unwrap();
        assert_eq!(output.values[0].dtype(), DType::BF16);
        let unrotation = model.rotation_f32(&VIRTUAL_POSITIONS).unwrap();
        let unrotated: Vec<Tensor> = output.keys.iter().map(|k| unrotation.invert(&k.to_dtype(DType::F32).unwrap()).unwrap()).collect();
        let keys = (key_weight > 0.0).then_some((unrotated.as_slice(), key_targets.as_slice(), key_weight));
        let grads = objective_loss(&output.values, &value_targets, keys).unwrap().backward().unwrap();
        let ours = grads.get(embeddings.as_tensor()).expect("the gradient crosses the casts");
        assert_eq!(ours.dtype(), DType::F32);
        let ours: Vec<f64> = ours.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();

        let exact = gradient_f64(&reference_model, &reference, &reference.start, key_weight);
        let dot: f64 = ours.iter().zip(&exact).map(|(a, b)| a * b).sum();
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let cosine = dot / (norm(&ours) * norm(&exact));
        let difference: Vec<f64> = ours.iter().zip(&exact).map(|(a, b)| a - b).collect();
        let relative = norm(&difference) / norm(&exact);
        // Measured: cosine 0.99997, relative error 0.6-0.8%; bf16 keeps 8
        // bits of mantissa (0.4% per rounding), compounded over the layers.
        assert!(cosine >= 0.999, "key weight {key_weight}: cosine {cosine}");
        assert!(relative <= 0.05, "key weight {key_weight}: relative error {relative}");
    }
}
