//! Fair-share decay without floating-point transcendental functions.
//!
//! `apply` must give every replica the same bits, on every CPU. `powf` comes
//! from the platform's maths library, whose last-bit rounding differs
//! between architectures and library versions, so two replicas decaying
//! the same usage could disagree and diverge. The decay factor
//! `2^(-elapsed/half_life)` is computed here in integers instead: the
//! exponent in 32.32 fixed point, its whole part a shift, its fraction a
//! product of the constants `2^(-2^-i)` (Q0.64, computed once with 80-digit
//! decimal arithmetic). Only then is it turned into an `f64`, and the only
//! floating-point operations left in `apply` (conversion, `*`, `+`, `/`) are
//! the IEEE 754 basic ones, correctly rounded and so the same everywhere
//! (Rust never fuses them into FMAs on its own).
//!
//! The factor is within about 2.5e-10 (relative) of the exact value.

/// `2^(-2^-i)` for `i` in `1..=32`, as Q0.64 fixed point (rounded).
const HALVING_ROOTS: [u64; 32] = [
    0xB504F333F9DE6484,
    0xD744FCCAD69D6AF4,
    0xEAC0C6E7DD24392F,
    0xF5257D152486CC2C,
    0xFA83B2DB722A033A,
    0xFD3E0C0CF486C175,
    0xFE9E115C7B8F884C,
    0xFF4ECB59511EC8A5,
    0xFFA756521C8DAED2,
    0xFFD3A751C0F7E10C,
    0xFFE9D2B2F7DB2756,
    0xFFF4E91BFF1B8C3E,
    0xFFFA747EA0040664,
    0xFFFD3A3B7814EB54,
    0xFFFE9D1CC60DDAB1,
    0xFFFF4E8E25879BFA,
    0xFFFFA7470363F451,
    0xFFFFD3A37DDA0313,
    0xFFFFE9D1BDF703AF,
    0xFFFFF4E8DEBE025E,
    0xFFFFFA746F4FA150,
    0xFFFFFD3A37A3F8B0,
    0xFFFFFE9D1BD1065A,
    0xFFFFFF4E8DE845AE,
    0xFFFFFFA746F41377,
    0xFFFFFFD3A37A05E4,
    0xFFFFFFE9D1BD01FC,
    0xFFFFFFF4E8DE80C0,
    0xFFFFFFFA746F4051,
    0xFFFFFFFD3A37A025,
    0xFFFFFFFE9D1BD011,
    0xFFFFFFFF4E8DE808,
];

/// `2^(-elapsed_ms / (half_life_secs * 1000))`; 1 when `half_life_secs` is 0
/// (no decay) or nothing elapsed, 0 once 64 half-lives have passed.
pub fn decay_factor(elapsed_ms: u64, half_life_secs: u64) -> f64 {
    let half_life_ms = u128::from(half_life_secs) * 1000;
    if half_life_ms == 0 {
        return 1.0;
    }
    // The exponent in 32.32 fixed point (truncated).
    let exponent = (u128::from(elapsed_ms) << 32) / half_life_ms;
    let halvings = exponent >> 32;
    if halvings >= 64 {
        return 0.0;
    }
    let fraction = exponent as u32;
    let mut acc: u128 = 1 << 64;
    for (i, root) in HALVING_ROOTS.iter().enumerate() {
        if fraction & (1 << (31 - i)) != 0 {
            acc = (acc * u128::from(*root)) >> 64;
        }
    }
    acc >>= halvings;
    acc as f64 / 18_446_744_073_709_551_616.0
}

#[cfg(test)]
mod tests {
    use super::decay_factor;

    #[test]
    fn whole_half_lives_are_exact() {
        assert_eq!(decay_factor(0, 3600), 1.0);
        assert_eq!(decay_factor(5_000, 0), 1.0, "no half-life: no decay");
        assert_eq!(decay_factor(3_600_000, 3600), 0.5);
        assert_eq!(decay_factor(7_200_000, 3600), 0.25);
        assert_eq!(decay_factor(64 * 3_600_000, 3600), 0.0);
        assert_eq!(decay_factor(u64::MAX, 1), 0.0);
        let f = decay_factor(u64::MAX, u64::MAX);
        assert!(f > 0.999 && f < 1.0, "no overflow at the extremes: {f}");
    }

    /// Known bits (from the same integer algorithm run with exact
    /// arithmetic elsewhere): a platform that computed them differently
    /// would diverge from its peers, and fails here first.
    #[test]
    fn known_values_are_bit_exact() {
        let cases: [(u64, u64, u64); 4] = [
            (30_000, 3600, 0x3fefd0d14b17fb5a),
            (1, 86_400, 0x3feffffffbc1252d),
            (12_345_678, 7 * 86_400, 0x3fef8ce822823f54),
            (3 * 3_600_000 + 1, 3600, 0x3fbfffff98a26a71),
        ];
        for (dt, hl, bits) in cases {
            let f = decay_factor(dt, hl);
            assert_eq!(f.to_bits(), bits, "{dt} ms, half-life {hl} s: {f}");
        }
        assert_eq!(
            decay_factor(1_800_000, 3600).to_bits(),
            (0xB504F333F9DE6484u64 as f64 / 18_446_744_073_709_551_616.0).to_bits()
        );
    }

    #[test]
    fn close_to_the_exact_half_life_decay() {
        for dt in [1u64, 999, 30_000, 123_456, 1_800_000, 5_000_000, 86_400_000] {
            for hl in [1u64, 60, 3600, 86_400, 7 * 86_400] {
                let exact = 0.5f64.powf(dt as f64 / (hl as f64 * 1000.0));
                let got = decay_factor(dt, hl);
                assert!(
                    // Relative error of the 32-bit exponent, plus what
                    // 64-bit fixed point can resolve (and the cut-off at
                    // 64 half-lives).
                    (got - exact).abs() <= 3e-10 * exact + 1e-17,
                    "{dt} ms, half-life {hl} s: {got} vs {exact}"
                );
            }
        }
    }
}
