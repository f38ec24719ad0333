//! The recipe's keys with fitted values: the recipe optimises its virtual
//! tokens as published, then their keys stay (at their interpolated
//! positions) while their values and logit biases are refitted by
//! attention matching against the original span
//! ([`crate::matching::fit::HeadProblem::fit_to_keys`]):
//! the optimisation places the keys, the closed form makes the block read
//! like the span.

use candle_core::Tensor;
use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::error::Result;
use crate::matching::fit::HeadFit;
use crate::matching::{head_matrix, head_tensor, mean_error};
use crate::methods::attention_matching::MatchingSettings;
use crate::model::Model;
use crate::recipe::Recipe;
use crate::span::SpanTargets;

/// The recipe, then values and biases fitted to its keys.
#[derive(Debug, Clone)]
pub struct FittedRecipe {
    /// The reference queries and the fit's bounds (its key selection,
    /// budgets, `on_policy` and `recent_share` are unused: the keys are the
    /// recipe's).
    pub settings: MatchingSettings,
    /// The recipe whose virtual tokens give the keys.
    pub recipe: Recipe,
}

impl Compressor for FittedRecipe {
    /// `fitted-recipe`, then the recipe's [`Recipe::variant`].
    fn name(&self) -> String {
        format!("fitted-recipe{}", self.recipe.variant())
    }

    fn needs_span_queries(&self) -> bool {
        self.settings.queries != crate::matching::queries::QuerySource::Repeat
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        self.settings.validate()?;
        let mut compressed = self.recipe.compress_sized(self.name(), model, prefix, span, budget(span.len(), self.recipe.ratio)?, on_step)?;
        let queries = self.settings.reference_queries(model, prefix, span)?;
        let problems = self.settings.head_problems(model, span, &queries)?;
        let virtual_keys: Vec<Vec<DMatrix<f64>>> =
            compressed.keys.iter().zip(&problems).map(|(keys, heads)| (0..heads.len()).map(|head| head_matrix(keys, head)).collect()).collect::<Result<_>>()?;
        // The heads in parallel, as attention matching fits them.
        let settings = self.settings.fit();
        let fits: Vec<Vec<HeadFit>> = problems
            .par_iter()
            .zip(&virtual_keys)
            .map(|(heads, keys)| heads.par_iter().zip(keys).map(|(problem, keys)| problem.fit_to_keys(keys, &settings)).collect())
            .collect::<Result<_>>()?;
        let (mut biases, mut errors) = (Vec::with_capacity(fits.len()), Vec::new());
        for (layer, heads) in fits.iter().enumerate() {
            let device = span.keys[layer].device();
            let (mut values, mut layer_biases) = (Vec::new(), Vec::new());
            for fit in heads {
                errors.push(fit.output_error);
                values.push(head_tensor(&fit.values, span.values[layer].dtype(), device)?);
                layer_biases.extend(fit.biases.iter().map(|&b| b as f32));
            }
            compressed.values[layer] = Tensor::cat(&values, 1)?;
            biases.push(Tensor::from_vec(layer_biases, (1, values.len(), compressed.len()), device)?);
        }
        compressed.biases = Some(biases);
        compressed.report.fit_error = Some(mean_error(&errors));
        Ok(compressed)
    }
}
