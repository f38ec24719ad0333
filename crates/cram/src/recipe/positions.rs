//! Step 3: where the virtual tokens sit. Spread over the span's original
//! positions so the suffix keeps its own and relative distances stay natural.

use serde::{Deserialize, Serialize};

/// Whether virtual positions are rounded to integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PositionMode {
    /// Rounded to the nearest integer, ties to even as numpy and torch do (the published choice).
    #[default]
    Rounded,
    /// Exact fractional positions.
    Fractional,
}

/// `linspace(first, last, n_virtual)` over the span's first and last
/// original positions, as numpy computes it (the last point exactly `last`).
pub fn virtual_positions(first: f32, last: f32, n_virtual: usize, mode: PositionMode) -> Vec<f32> {
    let step = if n_virtual > 1 { (last as f64 - first as f64) / (n_virtual - 1) as f64 } else { 0.0 };
    (0..n_virtual)
        .map(|i| {
            let position = if i + 1 == n_virtual && n_virtual > 1 { last as f64 } else { first as f64 + i as f64 * step };
            match mode {
                PositionMode::Rounded => position.round_ties_even() as f32,
                PositionMode::Fractional => position as f32,
            }
        })
        .collect()
}
