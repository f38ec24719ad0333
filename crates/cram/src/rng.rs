//! Seeded standard normal samples, the same on every platform (unlike a
//! device RNG): random starting embeddings, and the test fixtures' weights.

/// `count` standard normal samples, the same for a seed on every platform
/// (random initial embeddings).
pub(crate) fn normal_samples(seed: u64, count: usize) -> Vec<f32> {
    let mut normal = Normal::new(seed);
    (0..count).map(|_| normal.sample()).collect()
}

/// Standard normal samples from SplitMix64 and Box-Muller: reproducible
/// across platforms, unlike a device RNG.
pub(crate) struct Normal {
    state: u64,
}

impl Normal {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub(crate) fn sample(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}
