//! The recipe's keys with fitted values: the recipe optimises its virtual
//! tokens as published, then their keys stay (at their interpolated
//! positions) while their values and logit biases are refitted by
//! attention matching against the original span
//! ([`crate::matching::fit::HeadProblem::fit_to_keys`]):
//! the optimisation places the keys, the closed form makes the block read
//! like the span.

use candle_core::Tensor;

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::error::Result;
use crate::matching::{head_matrix, head_tensor};
use crate::methods::attention_matching::MatchingSettings;
use crate::model::Model;
use crate::recipe::Recipe;
use crate::span::SpanTargets;

/// The recipe, then values and biases fitted to its keys.
#[derive(Debug, Clone)]
pub struct FittedRecipe {
    /// The reference queries and the fit's bounds (its key selection is unused).
    pub settings: MatchingSettings,
    /// The recipe whose virtual tokens give the keys.
    pub recipe: Recipe,
}

impl Compressor for FittedRecipe {
    /// `fitted-recipe`, then the recipe's [`Recipe::variant`].
    fn name(&self) -> String {
        format!("fitted-recipe{}", self.recipe.variant())
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        self.settings.validate()?;
        let mut compressed = self.recipe.compress_sized(self.name(), model, prefix, span, budget(span.len(), self.recipe.ratio)?, on_step)?;
        let problems = self.settings.head_problems(model, prefix, span)?;
        let (mut biases, mut errors) = (Vec::with_capacity(problems.len()), Vec::new());
        for (layer, heads) in problems.iter().enumerate() {
            let (virtual_keys, device) = (&compressed.keys[layer], span.keys[layer].device());
            let (mut values, mut layer_biases) = (Vec::new(), Vec::new());
            for (head, problem) in heads.iter().enumerate() {
                let fit = problem.fit_to_keys(&head_matrix(virtual_keys, head)?, &self.settings.fit())?;
                errors.push(fit.output_error);
                values.push(head_tensor(&fit.values, span.values[layer].dtype(), device)?);
                layer_biases.extend(fit.biases.iter().map(|&b| b as f32));
            }
            compressed.values[layer] = Tensor::cat(&values, 1)?;
            biases.push(Tensor::from_vec(layer_biases, (1, values.len(), compressed.len()), device)?);
        }
        compressed.biases = Some(biases);
        compressed.report.fit_error = Some(errors.iter().sum::<f64>() / errors.len().max(1) as f64);
        Ok(compressed)
    }
}
