//! `thinkshort selfcheck`: a device backend against the CPU reference, op by op and then as a
//! whole model.
//!
//! Every forward op of the `Backend` trait, and the attention backward, runs on the device under
//! test and on `CpuBackend`, on fresh random inputs (seeded, never zeros: zeros hide outputs that
//! were never written) for several shapes, odd sizes included. Inputs are uploaded to the device and downloaded back
//! before the CPU sees them: on a bf16 device both sides then compute from the same bf16-rounded
//! values, and the comparison measures the kernel, not the rounding of its inputs. Outputs that
//! an op must leave alone (a KV cache outside the written positions, a buffer outside a view)
//! start random too and are part of the comparison.
//!
//! Error measure: ‖out − ref‖ / ‖ref‖ over the whole output, summed in f64 ([`rel_error`]); NaN or
//! inf anywhere fails. Tolerances, by what the op's output is:
//! - [`TOL_EXACT`] = 0 for ops that only move stored values (embedding, gather, copy, fill,
//!   KV-cache write): the inputs are already representable, so any difference is a bug.
//! - [`TOL_BF16`] = 1e-2 for ops whose output is stored in bf16: rounding one value to bf16 has a
//!   relative error of at most 2⁻⁹ ≈ 2e-3 (about 1.2e-3 root-mean-square), and fp32 arithmetic in
//!   a different order adds far less, so 1e-2 leaves 4–8× headroom while catching any real
//!   mistake (a wrong index, a missing term, a bad softmax give errors of order 1). The attention
//!   backward rounds twice on the way (P and dS are bf16 operands of its products, as in
//!   FlashAttention): simulating exactly that on the CPU (tests/selfcheck.rs) gives 2.1e-3 to
//!   3.1e-3 for sequences of 1 to 2048 tokens, still 3× inside.
//! - [`TOL_F32`] = 1e-3 for f32 outputs computed from identical inputs (log-probs and entropies,
//!   f32 logits from a matmul): both sides do fp32 arithmetic on the same values, so only the
//!   summation order and `exp`/`log` implementations differ (~1e-6); an output rounded to bf16
//!   on the way (~1e-3) is caught.
//!
//! Then a whole model: a random tiny Qwen2-like model (GQA, qkv bias) with the same bf16-rounded
//! weights on both backends scores prompt+completion pairs (max |Δ log p| against [`TOL_MODEL`])
//! and generates greedily (token agreement, reported as information only: bf16 activations may
//! flip a near-tie), and sampled generation with recorded decode steps (CUDA graphs) against the
//! same generation op by op (selfcheck/decode_graph.rs). Then training: every backward op, the optimizer's ops, the whole model's
//! parameter gradient and one whole GRPO update (loss, gradient norm, AdamW step).

use crate::backend::{Backend, TokenPlacement, TrainBackend};
use crate::config::ModelConfig;
use crate::rng::Philox;
use anyhow::Result;
use serde::Serialize;

mod attention;
mod backward;
mod decode_graph;
mod grpo_step;
mod layer_ops;
mod model;
mod optimizer;
mod out_of_memory;
mod policy_loss;
mod sampling;

pub use backward::TOL_MODEL_GRADIENT;
pub use grpo_step::TOL_GRPO_STEP;
use model::{model_check, tiny_model_weights, TINY_MODEL};

/// Ops that only move stored values: bit-exact.
pub const TOL_EXACT: f64 = 0.0;
/// Ops with a bf16 output (see the module documentation).
pub const TOL_BF16: f64 = 1e-2;
/// Ops with an f32 output computed from identical inputs.
pub const TOL_F32: f64 = 1e-3;
/// Max |Δ log p| in nats between the whole models. Both hold the same bf16 weights, but a bf16
/// device also rounds every activation (some twenty roundings of ~2e-3 through two layers) and
/// the logits (std ~2.5) move with them: simulating exactly that on the CPU (tests/selfcheck.rs)
/// gives 0.06 over the 145 scored tokens, and a real device's different summation order adds a
/// little. A 5 % error in one op's output gives 0.19 (the op rows catch far smaller ones), and
/// the mistakes this check is for (a wrong position, slot or row) move log-probs by whole nats.
pub const TOL_MODEL: f64 = 0.15;

/// Which shapes to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Coverage {
    /// Every shape, including attention over 1000 and 2048 tokens.
    Full,
    /// The same ops without the long attention sequences (for tests on a CPU).
    Quick,
}

/// One comparison: an op (or the whole model) on one shape.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub op: String,
    pub shape: String,
    /// `rel` (‖out − ref‖ / ‖ref‖) or `max_abs_nats` (the whole-model log-probs).
    pub metric: &'static str,
    /// NaN (null in JSON) when the outputs could not be compared.
    pub error: f64,
    pub tolerance: f64,
    pub pass: bool,
    /// The device error, when the op failed to run.
    pub message: Option<String>,
}

/// Every row, plus information lines (greedy-generation agreement).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<CheckRow>,
    pub info: Vec<String>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }
}

/// ‖out − ref‖ / ‖ref‖, sums in f64. A zero reference is compared absolutely (‖out‖), so a zero
/// output matches it exactly and anything else fails. NaN when the lengths differ or any value is
/// NaN or infinite: such a comparison never passes.
pub fn rel_error(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() || out.iter().chain(reference).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        diff += (o as f64 - r as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// max |a − b|; NaN when the lengths differ or any value is not finite.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

/// A finite error within the tolerance.
pub fn passes(error: f64, tolerance: f64) -> bool {
    error.is_finite() && error <= tolerance
}

/// One output of a check: a name suffix ("" for single-output ops), the device's values and the
/// CPU reference's.
type Compared = (&'static str, Vec<f32>, Vec<f32>);

/// Runs every op check, then the whole-model check, on devices made by `make_device` (a fresh
/// one after any device error, since a device may refuse all work after its first error).
/// `on_row` sees each row as soon as it is known (for progress output).
pub fn run<D: TrainBackend>(
    make_device: &dyn Fn() -> Result<D>,
    seed: u64,
    coverage: Coverage,
    on_row: &mut dyn FnMut(&CheckRow),
) -> Result<Report> {
    let mut c = Checker {
        make_device,
        dev: make_device()?,
        seed,
        rows: Vec::new(),
        on_row,
    };
    layer_ops::checks(&mut c, coverage)?;
    out_of_memory::check(&mut c)?;
    sampling::checks(&mut c)?;
    backward::checks(&mut c)?;
    optimizer::checks(&mut c)?;
    policy_loss::checks(&mut c)?;
    let mut info = model_check(&mut c, ModelConfig::from_json_str(TINY_MODEL)?)?;
    info.extend(model_check(&mut c, backward::tiny_qk_norm_config()?)?);
    info.extend(decode_graph::decode_graph_check(&mut c)?);
    let variants = c.dev.attention_backward_variants();
    backward::model_gradient_check(&mut c, variants.first().copied())?;
    grpo_step::grpo_step_check(&mut c)?;
    // the device's other attention backward kernels last (see attention::backward_checks)
    for &variant in variants.iter().skip(1) {
        attention::backward_checks(&mut c, coverage, Some(variant))?;
        backward::model_gradient_check(&mut c, Some(variant))?;
    }
    Ok(Report { rows: c.rows, info })
}

pub(crate) struct Checker<'a, D: Backend> {
    make_device: &'a dyn Fn() -> Result<D>,
    dev: D,
    seed: u64,
    rows: Vec<CheckRow>,
    on_row: &'a mut dyn FnMut(&CheckRow),
}

impl<D: Backend> Checker<'_, D> {
    /// Runs one check (`f` gets the device and a fresh random stream) and records one row per
    /// output. A device error becomes a failed row, and the device is made anew.
    pub(crate) fn check(
        &mut self,
        op: &str,
        shape: String,
        tolerance: f64,
        f: impl FnOnce(&D, &mut Rand) -> Result<Vec<Compared>>,
    ) -> Result<()> {
        let mut rand = self.rand(&format!("{op} {shape}"));
        match f(&self.dev, &mut rand) {
            Ok(outputs) => {
                for (suffix, out, reference) in outputs {
                    let error = rel_error(&out, &reference);
                    let name = if suffix.is_empty() {
                        op.to_string()
                    } else {
                        format!("{op}/{suffix}")
                    };
                    self.push(name, shape.clone(), "rel", error, tolerance, None);
                }
            }
            Err(e) => {
                self.push(
                    op.to_string(),
                    shape,
                    "rel",
                    f64::NAN,
                    tolerance,
                    Some(format!("{e:#}")),
                );
                self.dev = (self.make_device)()?;
            }
        }
        Ok(())
    }

    /// The random inputs of the check named `name`: a Philox stream chosen by the name (FNV-1a),
    /// so adding or reordering checks leaves every other check's inputs as they were.
    pub(crate) fn rand(&self, name: &str) -> Rand {
        let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Rand(Philox::new(self.seed, stream))
    }

    fn push(
        &mut self,
        op: String,
        shape: String,
        metric: &'static str,
        error: f64,
        tolerance: f64,
        message: Option<String>,
    ) {
        let row = CheckRow {
            op,
            shape,
            metric,
            error,
            tolerance,
            pass: message.is_none() && passes(error, tolerance),
            message,
        };
        (self.on_row)(&row);
        self.rows.push(row);
    }
}

/// Random inputs from one Philox stream.
pub(crate) struct Rand(Philox);

impl Rand {
    pub(crate) fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| std * self.0.next_normal()).collect()
    }
    /// n draws from [0, 1).
    pub(crate) fn uniform(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.0.next_uniform()).collect()
    }
    /// n integers in 0..below.
    fn below(&mut self, n: usize, below: usize) -> Vec<usize> {
        (0..n)
            .map(|_| ((self.0.next_uniform() * below as f64) as usize).min(below - 1))
            .collect()
    }
    fn ids(&mut self, n: usize, below: usize) -> Vec<u32> {
        self.below(n, below).into_iter().map(|i| i as u32).collect()
    }
}

/// Uploads `host` and returns the buffer with the values the device really holds (bf16-rounded
/// on a bf16 device): the CPU reference computes from those.
pub(crate) fn put<D: Backend>(dev: &D, host: &[f32]) -> Result<(D::Buf, Vec<f32>)> {
    let buf = dev.upload(host)?;
    let held = dev.download(dev.full(&buf))?;
    Ok((buf, held))
}

/// `put` into a buffer that stays f32.
pub(crate) fn put_f32<D: Backend>(dev: &D, host: &[f32]) -> Result<(D::Buf, Vec<f32>)> {
    let buf = dev.upload_f32(host)?;
    let held = dev.download(dev.full(&buf))?;
    Ok((buf, held))
}

/// Waits for the device and reads `buf` back.
pub(crate) fn get<D: Backend>(dev: &D, buf: &D::Buf) -> Result<Vec<f32>> {
    dev.synchronize()?;
    dev.download(dev.full(buf))
}

/// `batch` sequences placed in slots 0.., sequence s at positions starts[s]..starts[s] + lens[s].
pub(crate) fn placement(starts: &[usize], lens: &[usize]) -> TokenPlacement {
    let mut place = TokenPlacement::default();
    for (slot, (&start, &len)) in starts.iter().zip(lens).enumerate() {
        place.slots.extend(std::iter::repeat_n(slot as u32, len));
        place.positions.extend(start as u32..(start + len) as u32);
    }
    place
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_error_is_the_relative_norm_of_the_difference() {
        assert_eq!(rel_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        // ‖(0, 0.1)‖ / ‖(3, 4)‖ = 0.1 / 5
        assert!((rel_error(&[3.0, 4.1], &[3.0, 4.0]) - 0.02).abs() < 1e-6);
        assert!(passes(0.01, TOL_BF16));
        assert!(!passes(0.0101, TOL_BF16));
        assert!(passes(0.0, TOL_EXACT));
        assert!(!passes(1e-9, TOL_EXACT));
    }

    #[test]
    fn non_finite_values_and_size_mismatches_never_pass() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(rel_error(&[1.0, bad], &[1.0, 2.0]).is_nan());
            assert!(rel_error(&[1.0, 2.0], &[bad, 2.0]).is_nan());
            assert!(max_abs_diff(&[bad], &[0.0]).is_nan());
        }
        assert!(rel_error(&[1.0], &[1.0, 2.0]).is_nan());
        assert!(!passes(f64::NAN, f64::INFINITY));
        assert!(!passes(f64::INFINITY, f64::INFINITY));
    }

    #[test]
    fn a_zero_reference_is_compared_absolutely() {
        assert_eq!(rel_error(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
        assert_eq!(rel_error(&[0.0, -0.0], &[0.0, 0.0]), 0.0);
        assert_eq!(rel_error(&[0.0, 1e-3], &[0.0, 0.0]), 1e-3f32 as f64);
        assert_eq!(rel_error(&[], &[]), 0.0);
    }

    #[test]
    fn max_abs_diff_takes_the_largest_difference() {
        assert_eq!(max_abs_diff(&[1.0, -2.0, 3.0], &[1.5, -2.0, 2.75]), 0.5);
    }
}
