//! Step 4: optimising the virtual embeddings. Adam (no weight decay) moves
//! only the embeddings; the model is frozen. The loss is the objective of
//! [`crate::objective`] at every layer: V, or K + V. Optionally the run
//! stops early once the loss plateaus, and optionally it saves its state
//! as it goes ([`crate::checkpoint`]) so that a killed run resumes.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adam::Adam;
use crate::cache::KvCache;
use crate::checkpoint::{Checkpoint, Checkpointing, RunState};
use crate::model::{ForwardOutput, Logits, Qwen2};
use crate::objective::objective_loss;
use crate::{Error, Result};

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
    /// Stop before the budget once the loss plateaus; `None` (the
    /// published setting) always runs the whole budget.
    pub early_stop: Option<EarlyStop>,
    /// Save the run's state as it goes and resume from it; where files go
    /// is the caller's business, so it is not part of a config file.
    #[serde(skip)]
    pub checkpoint: Option<Checkpointing>,
}

/// When a loss has plateaued: the best loss of the last `patience` steps
/// is less than `min_improvement` (relative) below the best before them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStop {
    /// Steps without enough improvement before stopping.
    pub patience: usize,
    /// Relative improvement that counts (0.01 = 1%).
    pub min_improvement: f64,
}

impl Default for EarlyStop {
    /// 25 steps without a 1% improvement.
    fn default() -> Self {
        Self { patience: 25, min_improvement: 0.01 }
    }
}

impl EarlyStop {
    /// Whether a run whose losses so far are `losses` should stop.
    pub fn plateaued(&self, losses: &[f32]) -> bool {
        if self.patience == 0 || losses.len() <= self.patience {
            return false;
        }
        let (before, recent) = losses.split_at(losses.len() - self.patience);
        let best = |xs: &[f32]| xs.iter().copied().fold(f32::INFINITY, f32::min) as f64;
        best(recent) > best(before) * (1.0 - self.min_improvement)
    }
}

impl Default for OptimizerConfig {
    /// The published settings: lr 0.003, default betas, step count by span length.
    fn default() -> Self {
        Self { lr: 0.003, steps: None, beta1: 0.9, beta2: 0.999, eps: 1e-8, early_stop: None, checkpoint: None }
    }
}

impl OptimizerConfig {
    /// Steps for a span of `n_tokens`.
    pub fn steps_for(&self, n_tokens: usize) -> usize {
        self.steps.unwrap_or_else(|| default_steps(n_tokens))
    }

    /// Refuses settings under which Adam's update is not a finite number
    /// (a NaN loss would otherwise run the whole budget and be recorded).
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::Invalid(format!("optimizer: {reason}")));
        // lr 0 is allowed: the start itself, unoptimised, is a baseline.
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return invalid(format!("lr {} must be a finite number >= 0", self.lr));
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            // beta = 1 divides by zero in the bias correction.
            if !(0.0..1.0).contains(&beta) {
                return invalid(format!("{name} {beta} must be in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return invalid(format!("eps {} must be a finite number > 0", self.eps));
        }
        if self.steps == Some(0) {
            return invalid("steps must be >= 1".into());
        }
        if let Some(rule) = self.early_stop.filter(|rule| !(rule.min_improvement.is_finite() && rule.min_improvement >= 0.0)) {
            return invalid(format!("early_stop.min_improvement {} must be a finite number >= 0", rule.min_improvement));
        }
        Ok(())
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
    /// Steps allowed (more than `steps` when the run stopped early).
    #[serde(default)]
    pub budget: usize,
    /// Wall time of the optimisation, seconds (before a resume included).
    pub seconds: f64,
    /// Steps restored from a checkpoint rather than run by this process.
    #[serde(default)]
    pub resumed_steps: usize,
    /// The part of `seconds` spent before the resume.
    #[serde(default)]
    pub resumed_seconds: f64,
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
/// the Values (and optionally Keys) they must produce.
#[derive(Debug, Clone, Copy)]
pub struct Objective<'a> {
    /// The cache the virtual tokens follow.
    pub prefix: &'a KvCache,
    /// (n_virtual) positions.
    pub positions: &'a [f32],
    /// Per layer, (1, kv_heads, n_virtual, head_dim): the V targets.
    pub targets: &'a [Tensor],
    /// The K targets, for the K + V objective.
    pub keys: Option<KeyTargets<'a>>,
}

/// Keys to match: the virtual tokens' keys, un-rotated at their own
/// positions, against pooled un-rotated keys of the span.
#[derive(Debug, Clone, Copy)]
pub struct KeyTargets<'a> {
    /// Per layer, (1, kv_heads, n_virtual, head_dim) f32, RoPE undone.
    pub targets: &'a [Tensor],
    /// The K term's weight against the V term's 1.
    pub weight: f64,
}

/// Runs Adam for `steps` steps from `init` (1, n_virtual, hidden) toward the
/// objective. `on_step(step, loss)` is called after every step (progress
/// bars, logging); a run resumed from a checkpoint first calls it at once
/// for the steps it restored.
pub fn optimise(
    model: &Qwen2,
    objective: Objective<'_>,
    init: &Tensor,
    config: &OptimizerConfig,
    steps: usize,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Optimized> {
    let mut optimized = optimise_together(model, &[objective], &[init.clone()], config, steps, on_step)?;
    Ok(optimized.remove(0))
}

/// Optimises several sets of virtual tokens that follow the same prefix
/// (say, one span at several ratios, or several seeds) in one forward and
/// one backward per step: the sets sit side by side in the sequence and
/// the attention mask keeps them from seeing each other, so each set's
/// gradient, and Adam's elementwise update, is what it would be alone. One
/// span under-fills a GPU; several fill it for little more time.
///
/// `on_step(step, loss)` gets the sum of the sets' losses; early stopping
/// watches that sum. Each result's report has its own loss curve and the
/// batch's wall time.
pub fn optimise_together(
    model: &Qwen2,
    objectives: &[Objective<'_>],
    inits: &[Tensor],
    config: &OptimizerConfig,
    steps: usize,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Vec<Optimized>> {
    config.validate()?;
    let prefix = shared_prefix(objectives, inits)?;
    let started = Instant::now();
    let lengths: Vec<usize> = objectives.iter().map(|objective| objective.positions.len()).collect();
    let positions: Vec<f32> = objectives.iter().flat_map(|objective| objective.positions.iter().copied()).collect();
    // Built once: no per-step RoPE tables or mask to upload.
    let placement = model.placement(&positions, &lengths, prefix.len())?;
    // The K + V objective compares keys before RoPE: built once, like the placement.
    let unrotation = objectives.iter().any(|o| o.keys.is_some()).then(|| model.rotation_f32(&positions)).transpose()?;
    let group_losses = |output: &ForwardOutput| -> Result<Vec<Tensor>> {
        let unrotated_keys = match &unrotation {
            Some(rotation) => output.keys.iter().map(|k| rotation.invert(&k.to_dtype(DType::F32)?)).collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let mut offset = 0;
        objectives
            .iter()
            .map(|objective| {
                let length = objective.positions.len();
                let own = |tensors: &[Tensor]| tensors.iter().map(|t| t.narrow(2, offset, length)).collect::<candle_core::Result<Vec<_>>>();
                let values = own(&output.values)?;
                let keys = own(&unrotated_keys)?;
                offset += length;
                let key_term = objective.keys.map(|k| (keys.as_slice(), k.targets, k.weight));
                objective_loss(&values, objective.targets, key_term)
            })
            .collect()
    };

    let init = Tensor::cat(&inits.iter().map(Tensor::detach).collect::<Vec<_>>(), 1)?;
    let mut checkpoint = config.checkpoint.as_ref().map(|settings| Checkpoint::for_run(settings, config, steps, objectives, &init)).transpose()?;
    let mut state = starting_state(checkpoint.as_ref(), init, config, objectives.len(), steps)?;
    let (resumed_steps, resumed_seconds) = (state.adam.steps, state.seconds);
    let embeddings = Var::from_tensor(&state.embeddings)?;
    // The restored steps' summed losses, as `record` summed them.
    let mut totals: Vec<f32> = (0..resumed_steps).map(|step| state.loss_curves.iter().map(|curve| curve[step]).sum()).collect();
    totals.iter().enumerate().for_each(|(step, total)| on_step(step, *total));
    let mut save = |state: &mut RunState, when: Save| -> Result<()> {
        let Some(checkpoint) = &mut checkpoint else { return Ok(()) };
        state.embeddings = embeddings.as_tensor().clone();
        state.seconds = resumed_seconds + started.elapsed().as_secs_f64();
        match when {
            Save::IfDue => checkpoint.save_if_due(state),
            Save::Now => checkpoint.save(state),
        }
    };
    let mut steps_taken = resumed_steps;
    while steps_taken < steps && !config.early_stop.is_some_and(|rule| rule.plateaued(&totals)) {
        let output = model.forward_placed(embeddings.as_tensor(), &placement, Some(prefix), Logits::None)?;
        let losses = group_losses(&output)?;
        let total = losses.iter().skip(1).try_fold(losses[0].clone(), |sum, loss| sum.add(loss))?;
        state.adam.step(&embeddings, &total.backward()?)?;
        // Checked before a checkpoint can save it.
        let total = finite(record(&losses, &mut state.loss_curves)?, steps_taken)?;
        totals.push(total);
        steps_taken += 1;
        // Saved before `on_step`, so a process killed there resumes after this step.
        save(&mut state, Save::IfDue)?;
        on_step(steps_taken - 1, total);
    }
    // The final state, whatever `every` says: a process killed while
    // answering then resumes with nothing left to optimise.
    save(&mut state, Save::Now)?;
    // One more forward: the cache entries of the final embeddings, and their loss.
    let embeddings = embeddings.as_tensor().detach();
    let output = model.forward_placed(&embeddings, &placement, Some(prefix), Logits::None)?;
    let mut loss_curves = state.loss_curves;
    finite(record(&group_losses(&output)?, &mut loss_curves)?, steps_taken)?;
    let seconds = resumed_seconds + started.elapsed().as_secs_f64();

    let mut offset = 0;
    let mut optimized = Vec::with_capacity(objectives.len());
    for (length, loss_curve) in lengths.into_iter().zip(loss_curves) {
        let own = |tensors: &[Tensor]| tensors.iter().map(|t| t.narrow(2, offset, length)).collect::<candle_core::Result<Vec<_>>>();
        optimized.push(Optimized {
            embeddings: embeddings.narrow(1, offset, length)?,
            keys: own(&output.keys)?,
            values: own(&output.values)?,
            report: OptimizationReport { loss_curve, steps: steps_taken, budget: steps, seconds, resumed_steps, resumed_seconds },
        });
        offset += length;
    }
    Ok(optimized)
}

/// The state a checkpoint saved, or a fresh start from `init`.
fn starting_state(checkpoint: Option<&Checkpoint>, init: Tensor, config: &OptimizerConfig, n_objectives: usize, steps: usize) -> Result<RunState> {
    if let Some(saved) = checkpoint.map(|checkpoint| checkpoint.load(&init, config, n_objectives)).transpose()?.flatten() {
        return Ok(saved);
    }
    Ok(RunState { adam: Adam::new(&init, config)?, embeddings: init, loss_curves: vec![Vec::with_capacity(steps + 1); n_objectives], seconds: 0.0 })
}

/// Whether a checkpoint is written only once its interval has passed.
enum Save {
    IfDue,
    Now,
}

/// Appends each set's loss to its curve (one device read for all); returns their sum.
fn record(losses: &[Tensor], curves: &mut [Vec<f32>]) -> Result<f32> {
    let losses = Tensor::stack(losses, 0)?.to_vec1::<f32>()?;
    curves.iter_mut().zip(&losses).for_each(|(curve, loss)| curve.push(*loss));
    Ok(losses.iter().sum())
}

/// `total`, the loss before step `step`, if it is a finite number. Adam
/// cannot come back from a NaN and JSON cannot hold one, so a run whose
/// loss is not finite ends with an error instead of spending its budget.
fn finite(total: f32, step: usize) -> Result<f32> {
    if total.is_finite() {
        Ok(total)
    } else {
        Err(Error::Diverged { step, loss: total })
    }
}

/// The one prefix every objective follows; an init per objective, sized to it.
fn shared_prefix<'a>(objectives: &[Objective<'a>], inits: &[Tensor]) -> Result<&'a KvCache> {
    let Some(first) = objectives.first() else {
        return Err(Error::Invalid("nothing to optimise".into()));
    };
    if objectives.iter().any(|objective| !std::ptr::eq(objective.prefix, first.prefix)) {
        return Err(Error::Invalid("optimised together, objectives must follow the same prefix cache".into()));
    }
    if inits.len() != objectives.len() {
        return Err(Error::Invalid(format!("{} inits for {} objectives", inits.len(), objectives.len())));
    }
    for (objective, init) in objectives.iter().zip(inits) {
        let n_init = init.dim(1)?;
        if n_init != objective.positions.len() || objective.positions.is_empty() {
            return Err(Error::Invalid(format!("{n_init} initial embeddings for {} positions", objective.positions.len())));
        }
    }
    Ok(first.prefix)
}
