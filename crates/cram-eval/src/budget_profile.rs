//! Budget profiles: how attention matching's spread budgets share a
//! compaction's entries among a model's (layer, KV head)s, measured once
//! over sample spans instead of on every span. A head's share hardly moves
//! from span to span (experiments/benchmark/README.md), so a profile gives
//! the budgets an ordinary repeat pass would, and spares on-policy fitting
//! that pass (`budget_weights = [...]`).

use cram::{MatchingSettings, Model, Session};

use crate::cases::Case;
use crate::render::Rendering;
use crate::Result;

/// The mean head shares of some spans.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetProfile {
    /// The model measured.
    pub model: String,
    /// Spans averaged.
    pub spans: usize,
    /// Per (layer, KV head), layer-major: the mean share, summing to 1.
    pub weights: Vec<f64>,
}

impl BudgetProfile {
    /// The profile of `cases`' first compressed turns (each after its
    /// prefix, rendered with `rendering`), the heads weighed as `settings`'
    /// reference queries weigh them. `on_case(index)` reports progress.
    pub fn measure(model: &Model, cases: &[Case], rendering: Rendering, settings: &MatchingSettings, on_case: &mut dyn FnMut(usize)) -> Result<Self> {
        if cases.is_empty() {
            return Err(cram::Error::Invalid("a budget profile needs at least one case".into()).into());
        }
        let mut sum: Vec<f64> = Vec::new();
        for (index, case) in cases.iter().enumerate() {
            let shares = Self::case_shares(model, case, rendering, settings)?;
            sum.resize(shares.len(), 0.0);
            sum.iter_mut().zip(&shares).for_each(|(total, share)| *total += share);
            on_case(index);
        }
        Ok(Self { model: model.name.clone(), spans: cases.len(), weights: sum.iter().map(|total| total / cases.len() as f64).collect() })
    }

    /// One case's head shares ([`MatchingSettings::head_shares`]): its
    /// first compressed turn after its prefix.
    pub fn case_shares(model: &Model, case: &Case, rendering: Rendering, settings: &MatchingSettings) -> Result<Vec<f64>> {
        let messages = &case.transcript.messages;
        let first_turn = case.turns().into_iter().next().unwrap_or_default();
        let shares = (|| {
            let session = Session::new(model, &rendering.messages(messages, &case.split.prefix))?;
            let targets = session.turn_targets(&rendering.messages(messages, &first_turn), false, false)?;
            settings.head_shares(model, session.cache(), targets.span())
        })();
        shares.map_err(|e| cram::Error::Invalid(format!("case `{}`: {e}", case.id)).into())
    }

    /// A sweep config's method option: a comment naming the model and the
    /// span count, then `budget_weights = [...]` (7 significant digits).
    pub fn to_toml(&self) -> String {
        let weights: Vec<String> = self.weights.iter().map(|weight| format!("{weight:.6e}")).collect();
        format!("# budget profile of {} over {} spans\nbudget_weights = [{}]\n", self.model, self.spans, weights.join(", "))
    }
}
