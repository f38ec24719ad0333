//! Step 4: optimising the virtual embeddings. Adam (no weight decay) moves
//! only the embeddings; the model is frozen. The loss is the V objective of
//! [`crate::objective`] at every layer.

use std::time::Instant;

use candle_core::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::model::{Logits, Qwen2};
use crate::objective::value_loss;
use crate::Result;

/// Adam's settings and the step budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Adam's learning rate.
    pub lr: f64,
    /// Fixed step count; `None` uses [`default_steps`].
    pub steps: Option<usize>,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Adam's denominator epsilon.
    pub eps: f64,
}

impl Default for OptimizerConfig {
    /// The published settings: lr 0.003, default betas, step count by span length.
    fn default() -> Self {
        Self { lr: 0.003, steps: None, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

impl OptimizerConfig {
    /// Steps for a span of `n_tokens`.
    pub fn steps_for(&self, n_tokens: usize) -> usize {
        self.steps.unwrap_or_else(|| default_steps(n_tokens))
    }
}

/// `max(round(300 * n / 250), 100)`: the published budget, 300 steps for a
/// 250-token turn, scaled with length.
pub fn default_steps(n_tokens: usize) -> usize {
    ((300.0 * n_tokens as f64 / 250.0).round_ties_even() as usize).max(100)
}

/// What an optimisation did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OptimizationReport {
    /// The loss before each step, then the final loss.
    pub loss_curve: Vec<f32>,
    /// Steps taken.
    pub steps: usize,
    /// Wall time of the optimisation, seconds.
    pub seconds: f64,
}

impl OptimizationReport {
    /// The loss after the last step.
    pub fn final_loss(&self) -> Option<f32> {
        self.loss_curve.last().copied()
    }
}

/// The virtual tokens' keys and values, and their loss, after optimisation.
#[derive(Debug, Clone)]
pub struct Optimized {
    /// (1, n_virtual, hidden) f32
    pub embeddings: Tensor,
    /// Per layer, (1, kv_heads, n_virtual, head_dim), RoPE at the virtual positions.
    pub keys: Vec<Tensor>,
    /// Per layer, (1, kv_heads, n_virtual, head_dim).
    pub values: Vec<Tensor>,
    /// The loss curve and timing.
    pub report: OptimizationReport,
}

/// What the virtual tokens are fitted to: where they sit, after what, and
/// the Values they must produce.
#[derive(Debug, Clone, Copy)]
pub struct Objective<'a> {
    /// The cache the virtual tokens follow.
    pub prefix: &'a KvCache,
    /// (n_virtual) positions.
    pub positions: &'a [f32],
    /// Per layer, (1, kv_heads, n_virtual, head_dim).
    pub targets: &'a [Tensor],
}

/// Runs Adam for `steps` steps from `init` (1, n_virtual, hidden) toward the
/// objective. `on_step(step, loss)` is called after every step (progress
/// bars, logging).
pub fn optimise(
    model: &Qwen2,
    objective: Objective<'_>,
    init: &Tensor,
    config: &OptimizerConfig,
    steps: usize,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Optimized> {
    let Objective { prefix, positions, targets } = objective;
    let started = Instant::now();
    let embeddings = Var::from_tensor(&init.detach())?;
    let params = ParamsAdamW { lr: config.lr, beta1: config.beta1, beta2: config.beta2, eps: config.eps, weight_decay: 0.0 };
    let mut adam = AdamW::new(vec![embeddings.clone()], params)?;
    let mut loss_curve = Vec::with_capacity(steps + 1);
    for step in 0..steps {
        let output = model.forward(embeddings.as_tensor(), positions, Some(prefix), Logits::None)?;
        let loss = value_loss(&output.values, targets)?;
        adam.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        loss_curve.push(loss);
        on_step(step, loss);
    }
    // One more forward: the cache entries of the final embeddings, and their loss.
    let embeddings = embeddings.as_tensor().detach();
    let output = model.forward(&embeddings, positions, Some(prefix), Logits::None)?;
    loss_curve.push(value_loss(&output.values, targets)?.to_scalar::<f32>()?);
    let report = OptimizationReport { loss_curve, steps, seconds: started.elapsed().as_secs_f64() };
    Ok(Optimized { embeddings, keys: output.keys, values: output.values, report })
}
