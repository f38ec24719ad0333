//! Adam without weight decay, with its state in the open. candle-nn's
//! `AdamW` does the same arithmetic but keeps its moments private, and a
//! run that resumes from a checkpoint ([`super::checkpoint`]) needs them:
//! restarting Adam's moments would change the trajectory. The operations
//! are candle's, in candle's order, so the two give the same numbers (a
//! test checks it bit for bit).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::settings::OptimizerConfig;
use crate::error::{Error, Result};

/// Adam's state for one parameter tensor.
#[derive(Debug, Clone)]
pub(crate) struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Steps taken so far (the bias corrections depend on it).
    pub(crate) steps: usize,
    /// Same shape as the parameter.
    pub(crate) first_moment: Tensor,
    /// Same shape as the parameter.
    pub(crate) second_moment: Tensor,
}

impl Adam {
    /// A fresh optimizer for a parameter shaped like `parameter`.
    pub(crate) fn new(parameter: &Tensor, config: &OptimizerConfig) -> Result<Self> {
        let zeros = parameter.zeros_like()?;
        Ok(Self::resume(config, 0, zeros.clone(), zeros))
    }

    /// An optimizer that already took `steps` steps and holds these moments.
    pub(crate) fn resume(config: &OptimizerConfig, steps: usize, first_moment: Tensor, second_moment: Tensor) -> Self {
        Self { lr: config.lr, beta1: config.beta1, beta2: config.beta2, eps: config.eps, steps, first_moment, second_moment }
    }

    /// One update of `parameter` from its gradient in `grads`. A missing
    /// gradient is an error: candle's optimizers skip it silently, which
    /// would hide an op that does not backpropagate.
    pub(crate) fn step(&mut self, parameter: &Var, grads: &GradStore) -> Result<()> {
        let grad = grads.get(parameter).ok_or_else(|| Error::Invalid("no gradient reached the virtual embeddings".into()))?;
        // A Var's gradient still carries its backward graph (candle detaches
        // only the intermediate ones); moments built on it would chain every
        // step's graph to the next, growing memory without end.
        let grad = grad.detach();
        self.steps += 1;
        let scale_m = 1.0 / (1.0 - self.beta1.powi(self.steps as i32));
        let scale_v = 1.0 / (1.0 - self.beta2.powi(self.steps as i32));
        let first_moment = ((&self.first_moment * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
        let second_moment = ((&self.second_moment * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
        let m_hat = (&first_moment * scale_m)?;
        let v_hat = (&second_moment * scale_v)?;
        let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
        parameter.set(&(parameter.as_tensor() - (update * self.lr)?)?)?;
        self.first_moment = first_moment;
        self.second_moment = second_moment;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

    /// Five steps on a quartic: the same parameters as candle-nn's AdamW, bit for bit.
    #[test]
    fn matches_candle_adamw_bit_for_bit() -> Result<()> {
        let config = OptimizerConfig { lr: 0.1, ..OptimizerConfig::default() };
        let start = Tensor::new(&[[0.3f32, -1.7, 2.5], [0.01, 4.0, -0.2]], &Device::Cpu)?;
        let loss = |x: &Var| -> Result<Tensor> { Ok(x.as_tensor().sqr()?.sqr()?.sum_all()?) };

        let ours = Var::from_tensor(&start)?;
        let mut adam = Adam::new(&start, &config)?;
        let theirs = Var::from_tensor(&start)?;
        let params = ParamsAdamW { lr: config.lr, beta1: config.beta1, beta2: config.beta2, eps: config.eps, weight_decay: 0.0 };
        let mut adamw = AdamW::new(vec![theirs.clone()], params)?;
        for _ in 0..5 {
            adam.step(&ours, &loss(&ours)?.backward()?)?;
            adamw.backward_step(&loss(&theirs)?)?;
        }
        let (ours, theirs) = (ours.as_tensor().to_vec2::<f32>()?, theirs.as_tensor().to_vec2::<f32>()?);
        assert_ne!(ours, start.to_vec2::<f32>()?, "the parameters moved");
        assert_eq!(ours, theirs);
        Ok(())
    }

    /// The parameter's gradient is built from tracked forward tensors, so
    /// it carries a graph; the moments must not keep it (or the previous
    /// step's moments) alive.
    #[test]
    fn the_moments_hold_no_graph() -> Result<()> {
        let parameter = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?)?;
        let other = Var::from_tensor(&Tensor::new(&[0.5f32, 0.25, 2.0], &Device::Cpu)?)?;
        let mut adam = Adam::new(parameter.as_tensor(), &OptimizerConfig::default())?;
        for _ in 0..2 {
            let grads = (parameter.as_tensor() * other.as_tensor().exp()?)?.sum_all()?.backward()?;
            assert!(grads.get(&parameter).is_some_and(Tensor::track_op), "the gradient carries a graph");
            adam.step(&parameter, &grads)?;
            assert!(!adam.first_moment.track_op() && !adam.second_moment.track_op());
        }
        Ok(())
    }

    #[test]
    fn a_parameter_without_gradient_is_an_error() -> Result<()> {
        let parameter = Var::from_tensor(&Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?)?;
        let unrelated = Var::from_tensor(&Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?)?;
        let grads = unrelated.as_tensor().sum_all()?.backward()?;
        let error = Adam::new(parameter.as_tensor(), &OptimizerConfig::default())?.step(&parameter, &grads).unwrap_err();
        assert!(error.to_string().contains("no gradient"), "{error}");
        Ok(())
    }
}
