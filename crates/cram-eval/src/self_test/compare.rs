//! How close a device's tensors are to the CPU's, and when that is close
//! enough: f32 within a tolerance relative to the reference's size, bf16
//! pointing the same way (cosine) and, for logits, choosing the same token.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use crate::Result;

/// The distance between a tensor and its reference, both moved to the CPU in f64.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Closeness {
    /// max |ours - reference| / max(1, max |reference|).
    pub relative_diff: f64,
    /// Cosine of the two flattened tensors (1 when both are zero).
    pub cosine: f64,
    /// Every element of ours is finite.
    pub finite: bool,
}

impl Closeness {
    pub fn of(ours: &Tensor, reference: &Tensor) -> Result<Self> {
        let ours = host_values(ours)?;
        let reference = host_values(reference)?;
        if ours.len() != reference.len() {
            return Err(crate::EvalError::Model(cram::Error::Invalid(format!(
                "self-test: comparing {} elements with {}",
                ours.len(),
                reference.len()
            ))));
        }
        let scale = reference.iter().fold(1.0f64, |max, x| max.max(x.abs()));
        let diff = ours.iter().zip(&reference).fold(0.0f64, |max, (a, b)| max.max((a - b).abs()));
        let dot: f64 = ours.iter().zip(&reference).map(|(a, b)| a * b).sum();
        let norms = ours.iter().map(|a| a * a).sum::<f64>().sqrt() * reference.iter().map(|b| b * b).sum::<f64>().sqrt();
        Ok(Self {
            relative_diff: diff / scale,
            cosine: if norms == 0.0 { 1.0 } else { dot / norms },
            finite: ours.iter().all(|x| x.is_finite()),
        })
    }

    /// The worse of two comparisons (largest difference, smallest cosine).
    pub fn worst(self, other: Self) -> Self {
        Self {
            relative_diff: self.relative_diff.max(other.relative_diff),
            cosine: self.cosine.min(other.cosine),
            finite: self.finite && other.finite,
        }
    }

    /// The worst over pairs of tensors (every layer's K, say).
    pub fn worst_of(ours: &[Tensor], references: &[Tensor]) -> Result<Self> {
        let perfect = Self { relative_diff: 0.0, cosine: 1.0, finite: true };
        ours.iter().zip(references).try_fold(perfect, |worst, (a, b)| Ok(worst.worst(Self::of(a, b)?)))
    }

    /// Within `tolerance` in f32; in bf16, finite with cosine at least [`BF16_COSINE`].
    pub fn passes(&self, dtype: DType, f32_tolerance: f64) -> bool {
        self.finite
            && match dtype {
                DType::BF16 | DType::F16 => self.cosine >= BF16_COSINE,
                _ => self.relative_diff <= f32_tolerance,
            }
    }
}

/// Forward outputs (logits, K, V) on the device in f32, against the CPU's.
pub const FORWARD_TOLERANCE: f64 = 1e-4;
/// Gradients on the device in f32, against the CPU's.
pub const GRADIENT_TOLERANCE: f64 = 1e-3;
/// The least cosine of a bf16 result with the f32 reference.
pub const BF16_COSINE: f64 = 0.99;
/// The least share of positions whose top token a bf16 forward must agree on.
pub const BF16_TOP1_AGREEMENT: f64 = 0.9;

/// The share of positions of two (batch, n, vocab) logits whose largest entry is the same token.
pub fn top1_agreement(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    let argmax = |logits: &Tensor| -> Result<Vec<u32>> { Ok(logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?) };
    let (ours, reference) = (argmax(ours)?, argmax(reference)?);
    let agreeing = ours.iter().zip(&reference).filter(|(a, b)| a == b).count();
    Ok(agreeing as f64 / reference.len().max(1) as f64)
}

/// Whether every element of every tensor is finite.
pub fn all_finite(tensors: &[Tensor]) -> Result<bool> {
    for tensor in tensors {
        if !host_values(tensor)?.iter().all(|x| x.is_finite()) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn host_values(tensor: &Tensor) -> Result<Vec<f64>> {
    Ok(tensor.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn closeness_is_relative_to_the_reference_and_catches_what_is_not_finite() -> Result<()> {
        let reference = Tensor::new(&[10.0f32, -20.0, 5.0], &Device::Cpu)?;
        let ours = Tensor::new(&[10.0f32, -19.98, 5.0], &Device::Cpu)?;
        let close = Closeness::of(&ours, &reference)?;
        // 0.02 off, on a reference whose largest magnitude is 20.
        assert!((close.relative_diff - 0.001).abs() < 1e-6, "{close:?}");
        let dot = 100.0 + 20.0 * 19.98 + 25.0;
        let expected_cosine = dot / ((100.0f64 + 400.0 + 25.0).sqrt() * (100.0 + 19.98f64 * 19.98 + 25.0).sqrt());
        assert!((close.cosine - expected_cosine).abs() < 1e-6);
        assert!(close.passes(DType::F32, 2e-3) && !close.passes(DType::F32, 5e-4));
        let broken = Tensor::new(&[10.0f32, f32::NAN, 5.0], &Device::Cpu)?;
        assert!(!Closeness::of(&broken, &reference)?.passes(DType::BF16, 1.0));
        let opposite = Tensor::new(&[-10.0f32, 20.0, -5.0], &Device::Cpu)?;
        assert!(!Closeness::of(&opposite, &reference)?.passes(DType::BF16, 1.0));
        Ok(())
    }

    #[test]
    fn top1_agreement_counts_positions_choosing_the_same_token() -> Result<()> {
        let reference = Tensor::new(&[[[0.0f32, 1.0, 0.0], [2.0, 0.0, 0.0]]], &Device::Cpu)?;
        let ours = Tensor::new(&[[[0.0f32, 1.0, 0.5], [0.0, 0.0, 3.0]]], &Device::Cpu)?;
        assert_eq!(top1_agreement(&ours, &reference)?, 0.5);
        Ok(())
    }
}
