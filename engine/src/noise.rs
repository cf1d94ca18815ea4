//! Seeded Gaussian noise that is bit-identical across runs, machines and backends.
//!
//! Owns the random stream of the pipelines (initial latents) and of the tiny model's weights.
//! candle's own RNGs are backend-specific (the CUDA one is curand), so the noise is drawn here,
//! on the host, and moved to the device afterwards.
//!
//! The stream: SplitMix64 (Steele, Lea, Flood 2014) seeded with the request's seed; each draw is
//! the top 53 bits of one output as a uniform f64 in [0, 1). Normals come from Marsaglia's polar
//! method: two uniforms in (−1, 1), rejected unless `0 < s = u² + v² < 1`, then
//! `u·√(−2 ln s / s)` and `v·√(−2 ln s / s)`, cast to f32. Only IEEE-exact operations (+, −, ×,
//! ÷, √) and our own [`ln`] (a fixed series, no libm) are used, so the bits do not depend on the
//! platform's math library. It does not reproduce torch's `randn`: parity runs pass the latents.

/// SplitMix64: a 64-bit generator with a full period and good equidistribution; tiny and fast.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A stream starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        // 2^-53: the spacing of f64 in [0.5, 1).
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// Natural logarithm of a positive, finite `x` from IEEE arithmetic only: `x = m·2^e` with
/// `m ∈ [√½, √2)`, then `ln m = 2·atanh(s)`, `s = (m−1)/(m+1)`, `|s| < 0.172`, summed to 1e-17.
pub fn ln(x: f64) -> f64 {
    debug_assert!(x > 0.0 && x.is_finite());
    const LN_2: f64 = std::f64::consts::LN_2;
    let bits = x.to_bits();
    // An 11-bit field: always fits.
    let mut exp = i64::from(((bits >> 52) & 0x7ff) as u16) - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if exp == -1023 {
        // Subnormal: normalise through a multiplication by 2^54 (exact).
        let y = x * 18_014_398_509_481_984.0;
        return ln(y) - 54.0 * LN_2;
    }
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        exp += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // atanh(s) = s + s³/3 + s⁵/5 + …; 16 terms leave < 0.172^33 / 33 relative error.
    let mut term = s;
    let mut sum = 0.0;
    for k in 0..16 {
        sum += term / f64::from(2 * k + 1);
        term *= s2;
    }
    exp as f64 * LN_2 + 2.0 * sum
}

/// `n` standard normal f32 values from `seed`, in stream order.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u = 2.0 * rng.next_f64() - 1.0;
        let v = 2.0 * rng.next_f64() - 1.0;
        let s = u * u + v * v;
        if s >= 1.0 || s == 0.0 {
            continue;
        }
        let f = (-2.0 * ln(s) / s).sqrt();
        out.push((u * f) as f32);
        out.push((v * f) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_std_to_an_ulp_or_two() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..10_000 {
            let x = rng.next_f64() + 1e-300;
            let (a, b) = (ln(x), x.ln());
            assert!(
                (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1.0),
                "{x}: {a} {b}"
            );
        }
        assert_eq!(ln(1.0), 0.0);
        assert!((ln(f64::MIN_POSITIVE / 8.0) - (f64::MIN_POSITIVE / 8.0).ln()).abs() < 1e-12);
    }

    #[test]
    fn gaussian_is_fixed_and_standard() {
        // Pinned values: a change here changes every seeded picture.
        let g = gaussian(42, 4);
        let bits: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            bits,
            [1_056_728_071, 3_207_703_131, 3_215_194_712, 3_211_185_268]
        );
        assert_eq!(gaussian(42, 4), g);
        assert_ne!(gaussian(43, 4), g);
        let n = 200_000;
        let v = gaussian(7, n);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        // A prefix of a longer draw is the shorter draw.
        assert_eq!(&gaussian(7, 5)[..], &v[..5]);
    }
}
