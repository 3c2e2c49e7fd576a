//! Philox4x32-10, a counter-based random number generator (Salmon et al., SC'11).
//!
//! A draw is a pure function of (key, counter), so the sampler can ask for "the uniform of
//! sequence s at step t under seed k" in any order, on any device, and get the same number: runs
//! are reproducible whatever the batch composition, and a GPU kernel can draw the same values.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Ten Philox rounds of `counter` under `key`.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

fn split(x: u64) -> [u32; 2] {
    [x as u32, (x >> 32) as u32]
}

/// Two 32-bit words to a uniform double in [0, 1) with 53 random bits.
fn to_unit(a: u32, b: u32) -> f64 {
    (((a as u64) << 21) ^ ((b as u64) >> 11)) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The stream of `uniform` that picks a training step's prompts (index: step · P + i). It is
/// kept clear of the sampler's streams, which generation numbers from 0 (a training step's
/// completions take step · N + r), so no completion draws the numbers that chose its prompts.
pub const PROMPT_PICK_STREAM: u64 = u64::MAX;

/// The uniform in [0, 1) for (seed, stream, index): e.g. stream = sequence, index = decode step.
pub fn uniform(seed: u64, stream: u64, index: u64) -> f64 {
    let [i0, i1] = split(index);
    let [s0, s1] = split(stream);
    let r = philox4x32([i0, i1, s0, s1], split(seed));
    to_unit(r[0], r[1])
}

/// A sequential stream of draws (for weight initialisation and other bulk randomness).
pub struct Philox {
    seed: u64,
    stream: u64,
    index: u64,
    spare_normal: Option<f32>,
}

impl Philox {
    pub fn new(seed: u64, stream: u64) -> Self {
        Philox {
            seed,
            stream,
            index: 0,
            spare_normal: None,
        }
    }

    pub fn next_uniform(&mut self) -> f64 {
        let u = uniform(self.seed, self.stream, self.index);
        self.index += 1;
        u
    }

    /// A standard normal draw (Box–Muller; the second value of each pair is kept for the next call).
    pub fn next_normal(&mut self) -> f32 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.next_uniform(); // (0, 1]: ln is finite
        let u2 = self.next_uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare_normal = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32_10).
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox4x32([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniforms_are_in_range_and_roughly_uniform() {
        let n = 100_000;
        let mean = (0..n)
            .map(|i| uniform(7, 3, i))
            .inspect(|u| assert!((0.0..1.0).contains(u)))
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut rng = Philox::new(1, 0);
        let xs: Vec<f64> = (0..100_000).map(|_| rng.next_normal() as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "mean {mean} var {var}"
        );
    }
}
