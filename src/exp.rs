//! exp(x) over slices, in f32 for the CPU backend's softmaxes and SiLU and in f64 for the
//! log-probabilities and the sampler (whose sums are in f64).
//!
//! libm's exp is a call per value, each taking as long as a vector of them here (on the 10M
//! bench model's CPU GRPO step, the f32 softmaxes and SwiGLU took the step from 2.58 to 2.33 s;
//! the f64 sums made sampling 1.7× and the policy loss 1.9× faster: bench/results/
//! cpu_exp_2026-11-28.md). Here one scalar function per type is the definition: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r
//! by a polynomial (Cephes' for f32; Taylor's to degree 13 for f64, whose truncation is below
//! 0.05 ulp), times 2ⁿ, with fused multiply-adds. `exp_in_place` and `exp_f64_in_place` compile
//! the same function for AVX-512 and for AVX2 + FMA, where the compiler vectorizes it: every
//! value gets the same operations, so the result is the same bits on every CPU and for every
//! position in the slice. Tested against exp in f64 (f32: within 1 ulp on every 97th f32) and
//! against libm (f64: within 1 ulp). Below MIN_X (f32) or MIN_X_F64 the result is 0; at the
//! bound it is subnormal, just under the smallest normal value.

/// log2(e), and ln 2 split in two so that n · LN2_HI is exact for |n| ≤ 2⁸.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes expf: e^r ≈ 1 + r + r² · P(r), |r| ≤ ln 2 / 2.
const P: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
/// Above this e^x overflows f32; below the other, it is below f32's normal range.
const MAX_X: f32 = 88.722_83;
const MIN_X: f32 = -87.336_55;

/// e^x (see the module doc). NaN gives NaN; x > 88.72 gives +inf; x < −87.34 gives 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(MIN_X, MAX_X);
    // n in [−126, 128]; a NaN x gives a NaN r and e_r, so NaN whatever n's integer becomes.
    let n = (clamped * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, clamped));
    let poly = P.iter().fold(0.0f32, |acc, &c| acc.mul_add(r, c));
    let e_r = poly.mul_add(r * r, r) + 1.0;
    // 2ⁿ in two factors, each a normal f32 (2¹²⁸ alone is not).
    let n = integer_of(n);
    let half = n >> 1;
    let y = e_r * power_of_two(half) * power_of_two(n - half);
    if x > MAX_X {
        f32::INFINITY
    } else if x < MIN_X {
        0.0
    } else {
        y
    }
}

/// The integer-valued n (|n| < 2²²) as an i32, read from the bits of n + 1.5·2²³, whose
/// mantissa holds n exactly. The same value as `n as i32`, but it vectorizes (the saturating
/// cast does not).
#[inline(always)]
fn integer_of(n: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((n + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32)
}

/// 2^k for k in [−126, 127].
#[inline(always)]
fn power_of_two(k: i32) -> f32 {
    f32::from_bits((k.wrapping_add(127) as u32) << 23)
}

/// values[i] = exp(values[i]).
pub fn exp_in_place(values: &mut [f32]) {
    map_in_place(values)
}

/// values[i] = exp_f64(values[i]).
pub fn exp_f64_in_place(values: &mut [f64]) {
    map_in_place(values)
}

/// A type whose `exp` the slices run (generic so each CPU path is written once).
trait Exp: Copy {
    fn exp_of(self) -> Self;
}

impl Exp for f32 {
    #[inline(always)]
    fn exp_of(self) -> f32 {
        exp(self)
    }
}

impl Exp for f64 {
    #[inline(always)]
    fn exp_of(self) -> f64 {
        exp_f64(self)
    }
}

fn map_in_place<T: Exp>(values: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the function's target features.
            return unsafe { map_avx512(values) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { map_avx2(values) };
        }
    }
    map_each(values)
}

#[inline(always)]
fn map_each<T: Exp>(values: &mut [T]) {
    values.iter_mut().for_each(|v| *v = v.exp_of());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn map_avx512<T: Exp>(values: &mut [T]) {
    map_each(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_avx2<T: Exp>(values: &mut [T]) {
    map_each(values)
}

/// ln 2 split in two for f64: n · LN2_HI_F64 is exact for |n| ≤ 2¹¹.
const LN2_HI_F64: f64 = 6.931_471_803_691_238e-1;
const LN2_LO_F64: f64 = 1.908_214_929_270_587_7e-10;
/// 1/k! for k = 13 down to 2: e^r ≈ 1 + r + r²·Σ r^(k−2)/k!.
const INV_FACTORIALS: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];
/// Above this e^x overflows f64; below the other, it is below f64's normal range.
const MAX_X_F64: f64 = 709.782_712_893_384;
const MIN_X_F64: f64 = -708.396_418_532_264_1;

/// e^x in f64 (see the module doc). NaN gives NaN; x > 709.78 gives +inf; x < −708.39 gives 0.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    let clamped = x.clamp(MIN_X_F64, MAX_X_F64);
    // n in [−1022, 1024].
    let n = (clamped * std::f64::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO_F64, n.mul_add(-LN2_HI_F64, clamped));
    let poly = INV_FACTORIALS
        .iter()
        .fold(0.0f64, |acc, &c| acc.mul_add(r, c));
    let e_r = poly.mul_add(r * r, r) + 1.0;
    let n = integer_of_f64(n);
    let half = n >> 1;
    let y = e_r * power_of_two_f64(half) * power_of_two_f64(n - half);
    if x > MAX_X_F64 {
        f64::INFINITY
    } else if x < MIN_X_F64 {
        0.0
    } else {
        y
    }
}

/// The integer-valued n (|n| < 2⁵¹) as an i64, read from the bits of n + 1.5·2⁵² (as
/// `integer_of`).
#[inline(always)]
fn integer_of_f64(n: f64) -> i64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    ((n + MAGIC).to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64)
}

/// 2^k for k in [−1022, 1023].
#[inline(always)]
fn power_of_two_f64(k: i64) -> f64 {
    f64::from_bits((k.wrapping_add(1023) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between f32 values of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// Every 97th f32 bit pattern between −87.34 and 88.72 (about 22 million values, both
    /// signs, every exponent) against exp in f64, rounded to f32.
    #[test]
    fn is_within_1_ulp_of_the_exact_value_over_the_whole_range() {
        let mut worst = (0, 0.0f32);
        let mut check = |x: f32| {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            let d = ulps(got, want);
            if d > worst.0 {
                worst = (d, x);
            }
        };
        for bits in (0..MAX_X.to_bits()).step_by(97) {
            check(f32::from_bits(bits));
        }
        for bits in (0x8000_0000..=MIN_X.to_bits()).step_by(97) {
            check(f32::from_bits(bits));
        }
        assert!(worst.0 <= 1, "{} ulp at x = {:e}", worst.0, worst.1);
    }

    #[test]
    fn integer_of_reads_every_exponent_as_the_cast_does() {
        for n in -(1 << 21)..(1 << 21) {
            assert_eq!(integer_of(n as f32), n, "f32 {n}");
            assert_eq!(integer_of_f64(n as f64), n as i64, "f64 {n}");
        }
        for n in [-(1i64 << 50), -1_234_567_890_123, (1 << 50) - 1] {
            assert_eq!(integer_of_f64(n as f64), n);
        }
    }

    #[test]
    fn limits_and_special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(1.0), std::f32::consts::E);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.34), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(88.73), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // The largest finite result and the smallest normal one.
        assert!(exp(MAX_X).is_finite() && exp(MAX_X) > 3.4e38);
        assert!(exp(MIN_X) >= f32::MIN_POSITIVE * 0.99 && exp(MIN_X) < 1.2e-38);
    }

    /// exp_f64 against libm's exp (itself within 1 ulp of the exact value): values spread over
    /// the whole range by a 64-bit counter hash, and the small arguments near 0 densely.
    #[test]
    fn exp_f64_is_within_1_ulp_of_libm_over_the_whole_range() {
        let ulps64 = |a: f64, b: f64| (a.to_bits() as i128 - b.to_bits() as i128).unsigned_abs();
        let mut rng = crate::rng::Philox::new(7, 0);
        let mut worst = (0, 0.0f64);
        for i in 0..4_000_000u32 {
            let u = rng.next_uniform();
            let x = if i % 2 == 0 {
                MIN_X_F64 + u * (MAX_X_F64 - MIN_X_F64)
            } else {
                (u - 0.5) * 2.0
            };
            let d = ulps64(exp_f64(x), x.exp());
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(worst.0 <= 1, "{} ulp at x = {:e}", worst.0, worst.1);
        assert_eq!(exp_f64(0.0), 1.0);
        assert!(ulps64(exp_f64(1.0), std::f64::consts::E) <= 1);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(-709.0), 0.0);
        assert_eq!(exp_f64(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp_f64(710.0), f64::INFINITY);
        assert!(exp_f64(f64::NAN).is_nan());
        assert!(exp_f64(MAX_X_F64).is_finite() && exp_f64(MAX_X_F64) > 1.79e308);
        assert!(exp_f64(MIN_X_F64) >= f64::MIN_POSITIVE * 0.99);
    }

    #[test]
    fn exp_f64_in_place_gives_the_scalar_functions_bits() {
        let mut values: Vec<f64> = (0..1000).map(|i| (i as f64 - 500.0) * 1.37).collect();
        values.extend([
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            709.7,
            -708.3,
        ]);
        let want: Vec<u64> = values.iter().map(|&x| exp_f64(x).to_bits()).collect();
        for len in [0, 1, 7, 8, 9, 17, values.len()] {
            let mut got = values[..len].to_vec();
            exp_f64_in_place(&mut got);
            let got: Vec<u64> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want[..len], "len {len}");
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let mut avx2 = values[..len].to_vec();
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { map_avx2(&mut avx2) };
                let avx2: Vec<u64> = avx2.iter().map(|v| v.to_bits()).collect();
                assert_eq!(avx2, want[..len], "AVX2, len {len}");
            }
        }
    }

    /// The vectorized slices give the scalar function's bits at every position (the whole
    /// vectors and the tail), special values included.
    #[test]
    fn every_cpu_path_gives_the_scalar_functions_bits() {
        let mut values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        values.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            88.72,
            -87.3,
        ]);
        let want: Vec<u32> = values.iter().map(|&x| exp(x).to_bits()).collect();
        for len in [0, 1, 7, 15, 16, 17, 33, values.len()] {
            let mut got = values[..len].to_vec();
            exp_in_place(&mut got);
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want[..len], "len {len}");
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let mut avx2 = values[..len].to_vec();
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { map_avx2(&mut avx2) };
                let avx2: Vec<u32> = avx2.iter().map(|v| v.to_bits()).collect();
                assert_eq!(avx2, want[..len], "AVX2, len {len}");
            }
        }
    }
}
