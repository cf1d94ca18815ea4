//! Metering: the price of a job, computed identically by every node.
//!
//! `cost = base × (W·H / 1024²) × (steps / 50) × √(prompt_tokens / 100) × images × price_factor`
//! with `base` = 100 tokens. Everything is integer micro-tokens (1 token = 1,000,000). With
//! `W = 16·w`, `H = 16·h` and the price factor in parts per million (`f`), the formula reduces to
//!
//! `cost_µ = ⌈ √(A² · p) / 20480 ⌉`, where `A = w·h·steps·images·f`,
//!
//! because `100·10⁶ · (256·w·h / 1024²) · (steps/50) · (√p / 10) · images · (f / 10⁶)
//!  = w·h·steps·images·f·√p / 20480`. The square root is the integer ceiling square root, and
//! `⌈⌈√N⌉ / D⌉ = ⌈√N / D⌉` for any integer `D`, so the result is the exact real cost rounded up to
//! the micro-token. Within the validated ranges `A² · p < 2¹¹⁹`, so u128 never overflows; the
//! arithmetic is checked anyway.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::validate::{self, ValidationError};

/// Micro-tokens per token.
pub const MICRO_PER_TOKEN: u64 = 1_000_000;
/// Parts per million that make a price factor of 1.0.
pub const PPM: u64 = 1_000_000;
/// `20480 = 100·1024²·50·10·10⁶ / (10⁸·256·10⁶)`: the denominator left after the reduction above.
const DENOMINATOR: u128 = 20_480;

/// An amount of money in micro-tokens. Displays as tokens with six decimals.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct MicroTokens(pub u64);

impl MicroTokens {
    pub const ZERO: MicroTokens = MicroTokens(0);

    pub fn from_tokens(tokens: u64) -> Option<Self> {
        tokens.checked_mul(MICRO_PER_TOKEN).map(Self)
    }
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }
    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).map(Self)
    }
}

impl fmt::Display for MicroTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:06}",
            self.0 / MICRO_PER_TOKEN,
            self.0 % MICRO_PER_TOKEN
        )
    }
}

/// A token amount written by a person could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenAmountError {
    #[error("'{0}' is not an amount: allowed is a non-negative decimal such as 15 or 0.25")]
    Malformed(String),
    #[error("'{0}' has more than 6 decimal places; the smallest unit is 0.000001")]
    TooPrecise(String),
    #[error("'{0}' is too large; the largest amount is 18446744073709.551615")]
    TooLarge(String),
}

/// Parses a non-negative decimal with at most `decimals` fraction digits into an integer scaled
/// by `10^decimals`, without floating point.
pub(crate) fn parse_fixed(text: &str, decimals: u32) -> Result<u64, TokenAmountError> {
    let malformed = || TokenAmountError::Malformed(text.to_owned());
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i, f),
        None => (text, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty()
        || !all_digits(int)
        || !all_digits(frac)
        || (text.contains('.') && frac.is_empty())
    {
        return Err(malformed());
    }
    if frac.len() > decimals as usize {
        return Err(TokenAmountError::TooPrecise(text.to_owned()));
    }
    let scale = 10u64.pow(decimals);
    let too_large = || TokenAmountError::TooLarge(text.to_owned());
    let int: u64 = int.parse().map_err(|_| too_large())?;
    let mut frac_value: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| malformed())?
    };
    for _ in frac.len()..decimals as usize {
        frac_value *= 10;
    }
    int.checked_mul(scale)
        .and_then(|v| v.checked_add(frac_value))
        .ok_or_else(too_large)
}

impl FromStr for MicroTokens {
    type Err = TokenAmountError;
    /// Parses tokens, e.g. `15`, `0.25`, `100.000001`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_fixed(s.trim(), 6).map(Self)
    }
}

/// A provider's price schedule: part of its signed advert and of every quote and receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PriceSchedule {
    /// Multiplier on the base price, in parts per million (1,000,000 = 1.0).
    pub price_factor_ppm: u64,
    /// Prompts shorter than this are billed as this many tokens.
    pub min_prompt_tokens: u32,
}

impl Default for PriceSchedule {
    fn default() -> Self {
        Self {
            price_factor_ppm: PPM,
            min_prompt_tokens: 0,
        }
    }
}

impl PriceSchedule {
    /// Parses a price factor written as a decimal (`1`, `1.5`, `0.8`) into parts per million.
    pub fn parse_factor(text: &str) -> Result<u64, TokenAmountError> {
        parse_fixed(text.trim(), 6)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::range(
            "price_factor",
            self.price_factor_ppm,
            0,
            validate::MAX_PRICE_FACTOR_PPM,
        )?;
        validate::range(
            "min_prompt_tokens",
            u64::from(self.min_prompt_tokens),
            0,
            u64::from(validate::MAX_PROMPT_TOKENS),
        )
    }
}

/// What a job is billed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MeteredUnits {
    pub width: u32,
    pub height: u32,
    /// Denoising steps actually run (image-to-image and inpaint run `⌈steps × strength⌉`).
    pub steps: u32,
    /// Tokens of the user's prompt in the model's tokenizer.
    pub prompt_tokens: u32,
    pub images: u32,
}

impl MeteredUnits {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::dimension("width", self.width)?;
        validate::dimension("height", self.height)?;
        validate::range(
            "steps",
            u64::from(self.steps),
            1,
            u64::from(validate::MAX_STEPS),
        )?;
        validate::range(
            "prompt_tokens",
            u64::from(self.prompt_tokens),
            1,
            u64::from(validate::MAX_PROMPT_TOKENS),
        )?;
        validate::range(
            "images",
            u64::from(self.images),
            1,
            u64::from(validate::MAX_IMAGES),
        )
    }
}

/// Why a cost could not be computed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MeterError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("cost overflows")]
    Overflow,
}

/// The cost of a job, rounded up to the micro-token.
pub fn cost(units: &MeteredUnits, schedule: &PriceSchedule) -> Result<MicroTokens, MeterError> {
    units.validate()?;
    schedule.validate()?;
    let p = u128::from(units.prompt_tokens.max(schedule.min_prompt_tokens));
    let a = [
        u128::from(units.width / 16),
        u128::from(units.height / 16),
        u128::from(units.steps),
        u128::from(units.images),
        u128::from(schedule.price_factor_ppm),
    ]
    .into_iter()
    .try_fold(1u128, |acc, x| acc.checked_mul(x))
    .ok_or(MeterError::Overflow)?;
    let n = a
        .checked_mul(a)
        .and_then(|a2| a2.checked_mul(p))
        .ok_or(MeterError::Overflow)?;
    let micro = ceil_sqrt(n).div_ceil(DENOMINATOR);
    u64::try_from(micro)
        .map(MicroTokens)
        .map_err(|_| MeterError::Overflow)
}

/// The smallest `s` with `s² ≥ n`.
fn ceil_sqrt(n: u128) -> u128 {
    let s = n.isqrt();
    if s * s < n { s + 1 } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn units(width: u32, height: u32, steps: u32, prompt_tokens: u32) -> MeteredUnits {
        MeteredUnits {
            width,
            height,
            steps,
            prompt_tokens,
            images: 1,
        }
    }

    #[test]
    fn brief_examples_are_exact() {
        let s = PriceSchedule::default();
        assert_eq!(
            cost(&units(1024, 1024, 50, 100), &s).unwrap(),
            MicroTokens(100 * MICRO_PER_TOKEN)
        );
        assert_eq!(
            cost(&units(512, 512, 30, 100), &s).unwrap(),
            MicroTokens(15 * MICRO_PER_TOKEN)
        );
        assert_eq!(
            cost(&units(512, 512, 30, 100), &s).unwrap().to_string(),
            "15.000000"
        );
    }

    #[test]
    fn images_and_factor_multiply() {
        let u = MeteredUnits {
            images: 3,
            ..units(1024, 1024, 50, 100)
        };
        let s = PriceSchedule {
            price_factor_ppm: 1_500_000,
            min_prompt_tokens: 0,
        };
        assert_eq!(cost(&u, &s).unwrap(), MicroTokens(450 * MICRO_PER_TOKEN));
    }

    #[test]
    fn irrational_root_rounds_up_to_the_micro_token() {
        // 1024², 50 steps, 2 tokens: 100·√0.02 = 14.142135623… tokens.
        let c = cost(&units(1024, 1024, 50, 2), &PriceSchedule::default()).unwrap();
        assert_eq!(c, MicroTokens(14_142_136));
    }

    #[test]
    fn min_prompt_tokens_is_a_floor() {
        let s = PriceSchedule {
            price_factor_ppm: PPM,
            min_prompt_tokens: 100,
        };
        assert_eq!(
            cost(&units(1024, 1024, 50, 4), &s).unwrap(),
            MicroTokens(100 * MICRO_PER_TOKEN)
        );
        assert_eq!(
            cost(&units(1024, 1024, 50, 400), &s).unwrap(),
            MicroTokens(200 * MICRO_PER_TOKEN)
        );
    }

    #[test]
    fn out_of_range_inputs_name_the_field() {
        let s = PriceSchedule::default();
        let err = cost(&units(1000, 1024, 50, 100), &s).unwrap_err();
        assert!(err.to_string().contains("width"), "{err}");
        let err = cost(&units(1024, 1024, 0, 100), &s).unwrap_err();
        assert!(err.to_string().contains("steps"), "{err}");
    }

    #[test]
    fn token_amounts_parse_exactly() {
        assert_eq!("15".parse::<MicroTokens>(), Ok(MicroTokens(15_000_000)));
        assert_eq!("0.25".parse::<MicroTokens>(), Ok(MicroTokens(250_000)));
        assert_eq!("0.000001".parse::<MicroTokens>(), Ok(MicroTokens(1)));
        assert!(matches!(
            "-1".parse::<MicroTokens>(),
            Err(TokenAmountError::Malformed(_))
        ));
        assert!(matches!(
            "1e3".parse::<MicroTokens>(),
            Err(TokenAmountError::Malformed(_))
        ));
        assert!(matches!(
            "1.".parse::<MicroTokens>(),
            Err(TokenAmountError::Malformed(_))
        ));
        assert!(matches!(
            "".parse::<MicroTokens>(),
            Err(TokenAmountError::Malformed(_))
        ));
        assert!(matches!(
            "0.0000001".parse::<MicroTokens>(),
            Err(TokenAmountError::TooPrecise(_))
        ));
        assert!(matches!(
            "99999999999999999".parse::<MicroTokens>(),
            Err(TokenAmountError::TooLarge(_))
        ));
    }

    fn dim() -> impl Strategy<Value = u32> {
        (16u32..=128).prop_map(|x| x * 16)
    }
    fn arb_units() -> impl Strategy<Value = MeteredUnits> {
        (
            dim(),
            dim(),
            1u32..=100,
            1u32..=validate::MAX_PROMPT_TOKENS,
            1u32..=4,
        )
            .prop_map(
                |(width, height, steps, prompt_tokens, images)| MeteredUnits {
                    width,
                    height,
                    steps,
                    prompt_tokens,
                    images,
                },
            )
    }
    fn arb_schedule() -> impl Strategy<Value = PriceSchedule> {
        (
            0u64..=validate::MAX_PRICE_FACTOR_PPM,
            0u32..=validate::MAX_PROMPT_TOKENS,
        )
            .prop_map(|(price_factor_ppm, min_prompt_tokens)| PriceSchedule {
                price_factor_ppm,
                min_prompt_tokens,
            })
    }

    proptest! {
        #[test]
        fn never_overflows_in_the_valid_range(u in arb_units(), s in arb_schedule()) {
            prop_assert!(cost(&u, &s).is_ok());
        }

        #[test]
        fn the_extremes_do_not_overflow(p in 1u32..=validate::MAX_PROMPT_TOKENS) {
            let u = MeteredUnits { width: 2048, height: 2048, steps: 100, prompt_tokens: p, images: 4 };
            let s = PriceSchedule { price_factor_ppm: validate::MAX_PRICE_FACTOR_PPM, min_prompt_tokens: 0 };
            prop_assert!(cost(&u, &s).is_ok());
        }

        #[test]
        fn monotonic_in_each_input(u in arb_units(), s in arb_schedule(), which in 0usize..6) {
            let base = cost(&u, &s).unwrap();
            let (mut u2, mut s2) = (u, s);
            match which {
                0 => u2.width = (u.width + 16).min(2048),
                1 => u2.height = (u.height + 16).min(2048),
                2 => u2.steps = (u.steps + 1).min(100),
                3 => u2.prompt_tokens = (u.prompt_tokens + 1).min(validate::MAX_PROMPT_TOKENS),
                4 => u2.images = (u.images + 1).min(4),
                _ => s2.price_factor_ppm = (s.price_factor_ppm + 1).min(validate::MAX_PRICE_FACTOR_PPM),
            }
            prop_assert!(cost(&u2, &s2).unwrap() >= base);
        }

        #[test]
        fn is_the_real_formula_rounded_up(u in arb_units()) {
            let s = PriceSchedule::default();
            let exact = 100.0 * 1e6
                * (f64::from(u.width) * f64::from(u.height) / 1048576.0)
                * (f64::from(u.steps) / 50.0)
                * (f64::from(u.prompt_tokens) / 100.0).sqrt()
                * f64::from(u.images);
            let got = cost(&u, &s).unwrap().0 as f64;
            // Ceiling: never below the real value, less than one micro-token above it
            // (allowing f64's own rounding at these magnitudes).
            prop_assert!(got >= exact - exact * 1e-12 && got < exact + 1.0 + exact * 1e-12, "{} vs {}", got, exact);
        }
    }
}
