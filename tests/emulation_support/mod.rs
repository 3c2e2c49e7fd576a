//! Shared by the tests/emulated_*.rs files (kernels run on the CPU by tests/cuda_emulator):
//! random bf16 inputs, bf16 conversions and the relative-error check `selfcheck` uses.
#![allow(dead_code)] // each test file uses its own subset

use half::bf16;

/// Relative-error tolerance for bf16 results, as in `selfcheck`.
pub const TOL: f64 = 1e-2;

pub struct Rand(pub u64);

impl Rand {
    /// Uniform in [-1, 1) (splitmix64).
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// n bf16 values of scale `scale`: (bits for the kernel, the same values in f32).
    pub fn bf16s(&mut self, n: usize, scale: f32) -> (Vec<u16>, Vec<f32>) {
        let v: Vec<bf16> = (0..n)
            .map(|_| bf16::from_f32(self.next() * scale))
            .collect();
        (
            v.iter().map(|x| x.to_bits()).collect(),
            v.iter().map(|x| x.to_f32()).collect(),
        )
    }
}

pub fn to_f32(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

pub fn to_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// ‖a − b‖ / ‖b‖; NaN anywhere gives infinity.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    assert!(
        e < TOL,
        "{what}: relative error {e:.3e} (tolerance {TOL:.0e})"
    );
}
