//! Step 4: optimizing the virtual embeddings. Adam (no weight decay) moves
//! only the embeddings; the model is frozen. The loss is the objective of
//! [`super::objective`] at every layer: V, or K + V. Optionally the run
//! stops early once the loss plateaus, and optionally it saves its state
//! as it goes ([`super::checkpoint`]) so that a killed run resumes.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use super::adam::Adam;
use super::checkpoint::{Checkpoint, RunState};
use super::objective::{objective_loss, Objective};
use super::settings::OptimizerConfig;
use crate::compressor::OptimizationReport;
use crate::cache::KvCache;
use crate::model::{ForwardOutput, Logits, Qwen2};
use crate::error::{Error, Result};

/// The virtual tokens' keys and values, and their loss, after optimization.
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

/// Runs Adam for `steps` steps from `init` (1, n_virtual, hidden) toward the
/// objective. `on_step(step, loss)` is called after every step (progress
/// bars, logging); a run resumed from a checkpoint first calls it at once
/// for the steps it restored.
pub fn optimize(
    model: &Qwen2,
    objective: Objective<'_>,
    init: &Tensor,
    config: &OptimizerConfig,
    steps: usize,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Optimized> {
    let mut optimized = optimize_together(model, &[objective], &[init.clone()], config, steps, on_step)?;
    Ok(optimized.remove(0))
}

/// Optimizes several sets of virtual tokens that follow the same prefix
/// (say, one span at several ratios, or several seeds) in one forward and
/// one backward per step: the sets sit side by side in the sequence and
/// the attention mask keeps them from seeing each other, so each set's
/// gradient, and Adam's elementwise update, is what it would be alone. One
/// span under-fills a GPU; several fill it for little more time.
///
/// `on_step(step, loss)` gets the sum of the sets' losses; early stopping
/// watches that sum. Each result's report has its own loss curve and the
/// batch's wall time.
pub fn optimize_together(
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
    // answering then resumes with nothing left to optimize.
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
        return Err(Error::Invalid("nothing to optimize".into()));
    };
    if objectives.iter().any(|objective| !std::ptr::eq(objective.prefix, first.prefix)) {
        return Err(Error::Invalid("optimized together, objectives must follow the same prefix cache".into()));
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
