//! The compression methods besides the recipe, each a small unit behind
//! [`crate::compressor::Compressor`]: the baselines that keep or drop the span whole,
//! eviction by any [`crate::scoring::Scorer`], the hybrid (verbatim tokens
//! plus the recipe), compress-then-evict, the model's own summary,
//! attention matching, KVzip, and the recipe with fitted values.

pub mod attention_matching;
pub mod baselines;
pub mod compress_evict;
pub mod evict;
pub mod fitted_recipe;
pub mod hybrid;
pub mod kvzip;
pub mod summary;
