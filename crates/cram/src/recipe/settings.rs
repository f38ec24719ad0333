//! The recipe's optimization settings in one place: Adam's parameters, the
//! step budget, early stopping, and where a run saves its state.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
        // lr 0 is allowed: the start itself, unoptimized, is a baseline.
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

/// Where, and how often, an optimization saves its state.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpointing {
    /// The folder of the checkpoint files (created when needed).
    pub dir: PathBuf,
    /// The least time between two saves; the final state is always saved.
    pub every: Duration,
}
