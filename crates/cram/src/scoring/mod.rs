//! How much each of a span's tokens is worth keeping: one small unit per
//! policy behind [`Scorer`], kvpress-style. A scorer only scores;
//! [`crate::select::keep_top`] decides which entries survive, once for all.
//! Eviction ([`crate::methods::evict`]) keeps the top-scored real entries;
//! the recipe can start from their embeddings ([`crate::recipe::init`]).

mod key_norm;
mod scorer;
mod snapkv;
mod streaming;
mod value_uniqueness;

pub use key_norm::KeyNorm;
pub(crate) use scorer::attention_received;
pub use scorer::Scorer;
pub use snapkv::SnapKv;
pub use streaming::Streaming;
pub use value_uniqueness::ValueUniqueness;
