//! Saving an optimization as it runs, so that a killed process resumes
//! where it was instead of starting the span again: on a CPU one long span
//! takes hours. The state is the embeddings, Adam's moments and the loss
//! curves. The file is named for a hash of everything the run depends on
//! (settings, step budget, positions, targets, start), so a changed span,
//! model or setting never resumes a stale run, and several turns of one
//! conversation keep their own files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::adam::Adam;
use super::objective::Objective;
use super::settings::{Checkpointing, OptimizerConfig};
use crate::error::{Error, Result};

/// An optimization's state after some steps.
pub(crate) struct RunState {
    /// (1, n_virtual, hidden) f32
    pub(crate) embeddings: Tensor,
    pub(crate) adam: Adam,
    /// One curve per objective, each with one loss per step taken.
    pub(crate) loss_curves: Vec<Vec<f32>>,
    /// Optimization wall time up to this state.
    pub(crate) seconds: f64,
}

/// The checkpoint file of one run, and when it was last written.
pub(crate) struct Checkpoint {
    path: PathBuf,
    every: Duration,
    last_saved: Instant,
}

impl Checkpoint {
    /// The file for the run described by the arguments (see [`fingerprint`]).
    pub(crate) fn for_run(
        settings: &Checkpointing,
        config: &OptimizerConfig,
        steps: usize,
        objectives: &[Objective<'_>],
        init: &Tensor,
    ) -> Result<Self> {
        let name = format!("{}.safetensors", fingerprint(config, steps, objectives, init)?);
        Ok(Self { path: settings.dir.join(name), every: settings.every, last_saved: Instant::now() })
    }

    /// The saved state, if this run saved one; `init` (1, n_virtual, hidden)
    /// gives the shape it must have and the device to load it on.
    pub(crate) fn load(&self, init: &Tensor, config: &OptimizerConfig, n_objectives: usize) -> Result<Option<RunState>> {
        if !self.path.exists() {
            return Ok(None);
        }
        let mut tensors = candle_core::safetensors::load(&self.path, init.device()).map_err(|e| self.unfit(&e.to_string()))?;
        let mut take = |name: &str| tensors.remove(name).ok_or_else(|| self.unfit(&format!("no `{name}`")));
        let (embeddings, first_moment, second_moment) = (take("embeddings")?, take("first_moment")?, take("second_moment")?);
        let (loss_curves, progress) = (take("loss_curves")?.to_vec2::<f32>()?, take("progress")?.to_vec1::<f64>()?);
        let &[steps, seconds] = progress.as_slice() else { return Err(self.unfit("`progress` is not [steps, seconds]")) };
        let shape = init.shape();
        let curves_fit = loss_curves.len() == n_objectives && loss_curves.iter().all(|curve| curve.len() == steps as usize);
        if [&embeddings, &first_moment, &second_moment].iter().any(|t| t.shape() != shape) || !curves_fit {
            return Err(self.unfit("shapes differ from this run's"));
        }
        let adam = Adam::resume(config, steps as usize, first_moment, second_moment);
        Ok(Some(RunState { embeddings, adam, loss_curves, seconds }))
    }

    /// Saves `state` if `every` has passed since the last save.
    pub(crate) fn save_if_due(&mut self, state: &RunState) -> Result<()> {
        if self.last_saved.elapsed() >= self.every {
            self.save(state)?;
        }
        Ok(())
    }

    /// Saves `state`, replacing the file whole (a kill mid-write leaves the
    /// previous state, never a cut file).
    pub(crate) fn save(&mut self, state: &RunState) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let curve_length = state.loss_curves.first().map_or(0, Vec::len);
        let curves: Vec<f32> = state.loss_curves.concat();
        let tensors = HashMap::from([
            ("embeddings", cpu(&state.embeddings)?),
            ("first_moment", cpu(&state.adam.first_moment)?),
            ("second_moment", cpu(&state.adam.second_moment)?),
            ("loss_curves", Tensor::from_vec(curves, (state.loss_curves.len(), curve_length), &Device::Cpu)?),
            ("progress", Tensor::new(&[state.adam.steps as f64, state.seconds], &Device::Cpu)?),
        ]);
        let partial = self.path.with_extension("partial");
        candle_core::safetensors::save(&tensors, &partial)?;
        std::fs::rename(&partial, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.last_saved = Instant::now();
        Ok(())
    }

    fn unfit(&self, why: &str) -> Error {
        Error::Invalid(format!("checkpoint {} does not fit this run ({why}); delete it to start the run afresh", self.path.display()))
    }
}

/// A hex SHA-256 (128 bits of it) of everything an optimization's result
/// depends on besides the frozen model: the settings, the step budget, and
/// each objective's prefix length, positions and targets, and the start.
fn fingerprint(config: &OptimizerConfig, steps: usize, objectives: &[Objective<'_>], init: &Tensor) -> Result<String> {
    let mut hash = Sha256::new();
    let settings = serde_json::to_vec(config).map_err(|e| Error::Invalid(format!("optimizer settings: {e}")))?;
    hash.update(&settings);
    hash.update(steps.to_le_bytes());
    for objective in objectives {
        hash.update(objective.prefix.len().to_le_bytes());
        hash_floats(&mut hash, &[Tensor::new(objective.positions, &Device::Cpu)?])?;
        hash_floats(&mut hash, objective.targets)?;
        if let Some(keys) = objective.keys {
            hash.update(keys.weight.to_le_bytes());
            hash_floats(&mut hash, keys.targets)?;
        }
    }
    hash_floats(&mut hash, std::slice::from_ref(init))?;
    Ok(hash.finalize()[..16].iter().map(|byte| format!("{byte:02x}")).collect())
}

fn hash_floats(hash: &mut Sha256, tensors: &[Tensor]) -> Result<()> {
    for tensor in tensors {
        let floats = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        hash.update(floats.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    }
    Ok(())
}
