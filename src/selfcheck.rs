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

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, TokenPlacement, TrainBackend};
use crate::config::ModelConfig;
use crate::generate::{generate, GenerateConfig, GenerationRequest};
use crate::model::Model;
use crate::params::ParamLayout;
use crate::rng::Philox;
use crate::sampling::SamplingParams;
use crate::score::{completion_logprobs, ScoreItem};
use anyhow::Result;
use serde::Serialize;

mod attention;
mod backward;
mod decode_graph;
mod grpo_step;
mod optimizer;
mod policy_loss;
mod sampling;

pub use backward::TOL_MODEL_GRADIENT;
pub use grpo_step::TOL_GRPO_STEP;

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
    op_checks(&mut c, coverage)?;
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
        place.slots.extend(std::iter::repeat(slot as u32).take(len));
        place.positions.extend(start as u32..(start + len) as u32);
    }
    place
}

fn op_checks<D: TrainBackend>(c: &mut Checker<D>, coverage: Coverage) -> Result<()> {
    let cpu = CpuBackend;

    // embedding_forward: out [M, dim] = table [V, dim] rows.
    for (m, v, dim) in [
        (1, 1001, 896),
        (5, 1001, 7),
        (64, 1001, 33),
        (64, 151936, 64),
    ] {
        c.check(
            "embedding_forward",
            format!("M={m} V={v} dim={dim}"),
            TOL_EXACT,
            |dev, r| {
                let (table, table_h) = put(dev, &r.normal(v * dim, 1.0))?;
                let ids = r.ids(m, v);
                let mut out = dev.zeros(m * dim)?;
                dev.embedding_forward(dev.full_mut(&mut out), dev.full(&table), &ids, dim);
                let mut reference = vec![0.0; m * dim];
                cpu.embedding_forward(&mut reference, &table_h, &ids, dim);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // embedding_forward_sampled: out [M, dim] = table rows of the f32 ids sampled [R] picked by
    // rows [M] (a subset, out of order, one twice).
    for (r_count, v, dim) in [(5, 1001, 7), (64, 151936, 64)] {
        c.check(
            "embedding_forward_sampled",
            format!("R={r_count} V={v} dim={dim}"),
            TOL_EXACT,
            |dev, r| {
                let (table, table_h) = put(dev, &r.normal(v * dim, 1.0))?;
                let ids: Vec<f32> = r.ids(r_count, v).iter().map(|&i| i as f32).collect();
                let (sampled, sampled_h) = put_f32(dev, &ids)?;
                let mut rows: Vec<u32> = (0..r_count as u32).rev().step_by(2).collect();
                rows.push(rows[0]);
                let mut out = dev.zeros(rows.len() * dim)?;
                dev.embedding_forward_sampled(
                    dev.full_mut(&mut out),
                    dev.full(&table),
                    dev.full(&sampled),
                    &rows,
                    dim,
                );
                let mut reference = vec![0.0; rows.len() * dim];
                cpu.embedding_forward_sampled(&mut reference, &table_h, &sampled_h, &rows, dim);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // rmsnorm_forward: x, out [M, dim]; weight [dim].
    for (m, dim) in [(1, 896), (5, 7), (64, 33), (64, 1536)] {
        c.check(
            "rmsnorm_forward",
            format!("M={m} dim={dim}"),
            TOL_BF16,
            |dev, r| {
                let (x, x_h) = put(dev, &r.normal(m * dim, 1.0))?;
                let w_host: Vec<f32> = r.normal(dim, 0.1).iter().map(|d| 1.0 + d).collect();
                let (w, w_h) = put(dev, &w_host)?;
                let mut out = dev.zeros(m * dim)?;
                dev.rmsnorm_forward(
                    dev.full_mut(&mut out),
                    dev.full(&x),
                    dev.full(&w),
                    dim,
                    1e-6,
                );
                let mut reference = vec![0.0; m * dim];
                cpu.rmsnorm_forward(&mut reference, &x_h, &w_h, dim, 1e-6);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // add_rmsnorm_forward: x += residual (the residual stream, compared too), out = rmsnorm(x).
    for (m, dim) in [(1, 896), (5, 7), (64, 1536)] {
        c.check(
            "add_rmsnorm_forward",
            format!("M={m} dim={dim}"),
            TOL_BF16,
            |dev, r| {
                let (mut x, mut x_ref) = put(dev, &r.normal(m * dim, 1.0))?;
                let (residual, residual_h) = put(dev, &r.normal(m * dim, 1.0))?;
                let w_host: Vec<f32> = r.normal(dim, 0.1).iter().map(|d| 1.0 + d).collect();
                let (w, w_h) = put(dev, &w_host)?;
                let mut out = dev.zeros(m * dim)?;
                dev.add_rmsnorm_forward(
                    dev.full_mut(&mut x),
                    dev.full(&residual),
                    dev.full_mut(&mut out),
                    dev.full(&w),
                    dim,
                    1e-6,
                );
                let mut reference = vec![0.0; m * dim];
                cpu.add_rmsnorm_forward(&mut x_ref, &residual_h, &mut reference, &w_h, dim, 1e-6);
                Ok(vec![
                    ("x", get(dev, &x)?, x_ref),
                    ("out", get(dev, &out)?, reference),
                ])
            },
        )?;
    }

    // matmul_forward: out [m, n] = x [m, k] · w [n, k]ᵀ + bias [n]. m = 1 is a decode step; the
    // f32 outputs are logits (zeros_f32), with the vocabulary sizes of real models.
    for (m, k, n, bias, out_f32) in [
        (1, 896, 4864, false, false),
        (1, 896, 128, true, false),
        (5, 33, 7, true, false),
        (64, 896, 896, true, false),
        (64, 4864, 896, false, false),
        (7, 65, 1001, false, true),
        (5, 96, 1001, true, true),
        (1, 896, 32003, false, true),
    ] {
        let out_kind = if out_f32 { "zeros_f32" } else { "zeros" };
        let shape = format!("m={m} k={k} n={n} bias={bias} out={out_kind}");
        let tol = if out_f32 { TOL_F32 } else { TOL_BF16 };
        c.check("matmul_forward", shape, tol, |dev, r| {
            let (x, x_h) = put(dev, &r.normal(m * k, 1.0))?;
            let (w, w_h) = put(dev, &r.normal(n * k, 1.0 / (k as f32).sqrt()))?;
            let (b, b_h) = put(dev, &r.normal(n, 0.5))?;
            let mut out = if out_f32 {
                dev.zeros_f32(m * n)?
            } else {
                dev.zeros(m * n)?
            };
            let bias_view = bias.then(|| dev.full(&b));
            dev.matmul_forward(
                dev.full_mut(&mut out),
                dev.full(&x),
                dev.full(&w),
                bias_view,
                m,
                k,
                n,
            );
            let mut reference = vec![0.0; m * n];
            let bias_h = bias.then_some(b_h.as_slice());
            cpu.matmul_forward(&mut reference, &x_h, &w_h, bias_h, m, k, n);
            Ok(vec![("", get(dev, &out)?, reference)])
        })?;
    }

    // qkv_rope_forward: q [M, heads * head_dim] and k, v [M, kv_heads * head_dim] in place: q and
    // k rotated after their biases, v biased (when the biases are given); positions up to 4000.
    for (m, heads, kv_heads, hd, theta, biased) in [
        (1, 14, 2, 64, 1e6, true),
        (5, 2, 2, 128, 1e4, false),
        (64, 3, 1, 6, 1e4, true),
        (33, 12, 2, 128, 1e6, true),
    ] {
        let shape =
            format!("M={m} heads={heads}/{kv_heads} head_dim={hd} theta={theta:e} bias={biased}");
        c.check("qkv_rope_forward", shape, TOL_BF16, |dev, r| {
            let (mut q, mut q_ref) = put(dev, &r.normal(m * heads * hd, 1.0))?;
            let (mut k, mut k_ref) = put(dev, &r.normal(m * kv_heads * hd, 1.0))?;
            let (mut v, mut v_ref) = put(dev, &r.normal(m * kv_heads * hd, 1.0))?;
            let (q_bias, q_bias_h) = put(dev, &r.normal(heads * hd, 0.5))?;
            let (k_bias, k_bias_h) = put(dev, &r.normal(kv_heads * hd, 0.5))?;
            let (v_bias, v_bias_h) = put(dev, &r.normal(kv_heads * hd, 0.5))?;
            let mut positions = r.ids(m, 4001);
            positions[0] = 4000;
            let inv_freq_host: Vec<f32> = (0..hd / 2)
                .map(|i| (1.0 / f64::powf(theta, (2 * i) as f64 / hd as f64)) as f32)
                .collect();
            let (inv_freq, inv_freq_h) = put_f32(dev, &inv_freq_host)?;
            dev.qkv_rope_forward(
                [
                    dev.full_mut(&mut q),
                    dev.full_mut(&mut k),
                    dev.full_mut(&mut v),
                ],
                [&q_bias, &k_bias, &v_bias].map(|b| biased.then(|| dev.full(b))),
                &positions,
                dev.full(&inv_freq),
                heads,
                kv_heads,
                hd,
            );
            cpu.qkv_rope_forward(
                [&mut q_ref, &mut k_ref, &mut v_ref],
                [&q_bias_h, &k_bias_h, &v_bias_h].map(|b| biased.then_some(&b[..])),
                &positions,
                &inv_freq_h,
                heads,
                kv_heads,
                hd,
            );
            Ok(vec![
                ("q", get(dev, &q)?, q_ref),
                ("k", get(dev, &k)?, k_ref),
                ("v", get(dev, &v)?, v_ref),
            ])
        })?;
    }

    // kv_cache_write: k, v [M, kv_dim] into cache [slots, capacity, kv_dim]. The caches start
    // random, so positions that must stay untouched are compared too.
    let kv_cases: [(&str, usize, usize, Vec<usize>, Vec<usize>); 3] = [
        ("prefill", 128, 37, vec![0, 0, 0], vec![20, 0, 5]),
        ("decode", 256, 1000, vec![0, 17, 500, 999], vec![1, 1, 1, 1]),
        ("odd", 7, 9, vec![3, 0], vec![5, 9]),
    ];
    for (kind, kv_dim, capacity, starts, lens) in kv_cases {
        let slots = starts.len();
        let shape =
            format!("{kind} slots={slots} capacity={capacity} kv_dim={kv_dim} lens={lens:?}");
        c.check("kv_cache_write", shape, TOL_EXACT, |dev, r| {
            let place = placement(&starts, &lens);
            let m = place.slots.len();
            let cache_len = slots * capacity * kv_dim;
            let (mut ck, mut ck_ref) = put(dev, &r.normal(cache_len, 1.0))?;
            let (mut cv, mut cv_ref) = put(dev, &r.normal(cache_len, 1.0))?;
            let (k, k_h) = put(dev, &r.normal(m * kv_dim, 1.0))?;
            let (v, v_h) = put(dev, &r.normal(m * kv_dim, 1.0))?;
            dev.kv_cache_write(
                dev.full_mut(&mut ck),
                dev.full_mut(&mut cv),
                dev.full(&k),
                dev.full(&v),
                &place,
                capacity,
                kv_dim,
            );
            cpu.kv_cache_write(
                &mut ck_ref,
                &mut cv_ref,
                &k_h,
                &v_h,
                &place,
                capacity,
                kv_dim,
            );
            Ok(vec![
                ("k", get(dev, &ck)?, ck_ref),
                ("v", get(dev, &cv)?, cv_ref),
            ])
        })?;
    }

    attention::checks(c, coverage)?;

    // swiglu_forward: out = silu(gate) · up, all [M, I].
    for (m, i) in [(1, 4864), (5, 7), (64, 33), (64, 8960)] {
        c.check(
            "swiglu_forward",
            format!("M={m} I={i}"),
            TOL_BF16,
            |dev, r| {
                let (gate, gate_h) = put(dev, &r.normal(m * i, 2.0))?;
                let (up, up_h) = put(dev, &r.normal(m * i, 1.0))?;
                let mut out = dev.zeros(m * i)?;
                dev.swiglu_forward(dev.full_mut(&mut out), dev.full(&gate), dev.full(&up));
                let mut reference = vec![0.0; m * i];
                cpu.swiglu_forward(&mut reference, &gate_h, &up_h);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // residual_add: x += y, [M, dim].
    for (m, dim) in [(1, 896), (5, 7), (64, 1536)] {
        c.check(
            "residual_add",
            format!("M={m} dim={dim}"),
            TOL_BF16,
            |dev, r| {
                let (mut x, mut reference) = put(dev, &r.normal(m * dim, 1.0))?;
                let (y, y_h) = put(dev, &r.normal(m * dim, 1.0))?;
                dev.residual_add(dev.full_mut(&mut x), dev.full(&y));
                cpu.residual_add(&mut reference, &y_h);
                Ok(vec![("", get(dev, &x)?, reference)])
            },
        )?;
    }

    // gather_rows: out [R, dim] = x [M, dim] rows (repeats allowed).
    for (m, rows_n, dim) in [(64, 5, 7), (64, 1, 33), (300, 8, 896)] {
        c.check(
            "gather_rows",
            format!("M={m} R={rows_n} dim={dim}"),
            TOL_EXACT,
            |dev, r| {
                let (x, x_h) = put(dev, &r.normal(m * dim, 1.0))?;
                let rows = r.below(rows_n, m);
                let mut out = dev.zeros(rows_n * dim)?;
                dev.gather_rows(dev.full_mut(&mut out), dev.full(&x), &rows, dim);
                let mut reference = vec![0.0; rows_n * dim];
                cpu.gather_rows(&mut reference, &x_h, &rows, dim);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // fill_zero and copy, on whole buffers and on windows (what lies outside must survive), in
    // bf16 and f32 buffers.
    for (len, lo, hi, f32_buf) in [
        (4480, 0, 4480, false),
        (1000, 101, 778, false),
        (333, 7, 300, true),
    ] {
        let shape = format!("len={len} window={lo}..{hi} f32={f32_buf}");
        c.check("fill_zero", shape, TOL_EXACT, |dev, r| {
            let host = r.normal(len, 1.0);
            let (mut buf, mut reference) = if f32_buf {
                put_f32(dev, &host)?
            } else {
                put(dev, &host)?
            };
            dev.fill_zero(dev.view_mut(&mut buf, lo..hi));
            cpu.fill_zero(&mut reference[lo..hi]);
            Ok(vec![("", get(dev, &buf)?, reference)])
        })?;
    }
    for (len, lo, hi, src_lo, f32_buf) in [
        (4480, 0, 4480, 0, false),
        (1000, 7, 40, 100, false),
        (333, 1, 300, 20, true),
    ] {
        let shape = format!("len={len} dst={lo}..{hi} src={src_lo}.. f32={f32_buf}");
        c.check("copy", shape, TOL_EXACT, |dev, r| {
            let put_any = |host: &[f32]| {
                if f32_buf {
                    put_f32(dev, host)
                } else {
                    put(dev, host)
                }
            };
            let (mut dst, mut reference) = put_any(&r.normal(len, 1.0))?;
            let (src, src_h) = put_any(&r.normal(len, 1.0))?;
            let src_hi = src_lo + hi - lo;
            dev.copy(
                dev.view_mut(&mut dst, lo..hi),
                dev.view(&src, src_lo..src_hi),
            );
            cpu.copy(&mut reference[lo..hi], &src_h[src_lo..src_hi]);
            Ok(vec![("", get(dev, &dst)?, reference)])
        })?;
    }

    // logprob_forward: logits [R, V] (f32 as the LM head writes them, or bf16), logp and
    // entropy [R] in f32.
    for (rows, vocab, temperature, logits_f32) in [
        (1, 1001, 1.0, true),
        (5, 1001, 0.7, false),
        (64, 32003, 1.0, true),
        (7, 32003, 0.7, false),
        (3, 151936, 1.0, true),
    ] {
        let kind = if logits_f32 { "zeros_f32" } else { "zeros" };
        let shape = format!("R={rows} V={vocab} T={temperature} logits={kind}");
        c.check("logprob_forward", shape, TOL_F32, |dev, r| {
            let host = r.normal(rows * vocab, 3.0);
            let (logits, logits_h) = if logits_f32 {
                put_f32(dev, &host)?
            } else {
                put(dev, &host)?
            };
            let targets = r.ids(rows, vocab);
            let mut logp = dev.zeros_f32(rows)?;
            let mut entropy = dev.zeros_f32(rows)?;
            dev.logprob_forward(
                dev.full_mut(&mut logp),
                dev.full_mut(&mut entropy),
                dev.full(&logits),
                &targets,
                vocab,
                temperature,
            );
            let (mut logp_ref, mut entropy_ref) = (vec![0.0; rows], vec![0.0; rows]);
            cpu.logprob_forward(
                &mut logp_ref,
                &mut entropy_ref,
                &logits_h,
                &targets,
                vocab,
                temperature,
            );
            Ok(vec![
                ("logp", get(dev, &logp)?, logp_ref),
                ("entropy", get(dev, &entropy)?, entropy_ref),
            ])
        })?;
    }
    Ok(())
}

/// The tiny model of the whole-model check: Qwen2 with GQA 4:1, qkv bias, an untied LM head.
const TINY_MODEL: &str = r#"{"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128,
    "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "tie_word_embeddings": false}"#;

/// Random weights scaled so the model is far from uniform (logits of std ~2.5, as a trained
/// model's), rounded to bf16 so both backends hold exactly the same values: embeddings std 1,
/// each projection std 1/√fan_in, the LM head 2.5/√hidden, biases std 0.1, norms 1 ± 0.1.
fn tiny_model_weights(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut rand = Rand(Philox::new(seed, u64::MAX));
    let mut host = vec![0.0f32; layout.total_len()];
    for spec in &layout.specs {
        let n = spec.len();
        let values = if spec.name.ends_with("norm.weight") {
            rand.normal(n, 0.1).iter().map(|d| 1.0 + d).collect()
        } else if spec.name.ends_with(".bias") {
            rand.normal(n, 0.1)
        } else if spec.name == "model.embed_tokens.weight" {
            rand.normal(n, 1.0)
        } else if spec.name == "lm_head.weight" {
            rand.normal(n, 2.5 / (cfg.hidden_size as f32).sqrt())
        } else {
            rand.normal(n, 1.0 / (spec.shape[1] as f32).sqrt())
        };
        host[spec.range()].copy_from_slice(&values);
    }
    host.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
}

/// The whole-model check of `cfg` (the tiny model, or its Qwen3 variant): log-probs of
/// prompt+completion pairs (one packed prefill) as a row, greedy generation (decode steps) as
/// information.
fn model_check<D: Backend>(c: &mut Checker<D>, cfg: ModelConfig) -> Result<Vec<String>> {
    let host = tiny_model_weights(&cfg, c.seed);
    let cpu_model = Model::from_host(cfg.clone(), &host, CpuBackend)?;
    let dev_model = Model::from_host(cfg.clone(), &host, (c.make_device)()?)?;
    let shape = format!(
        "{} layers h={} heads={}/{} V={}{}",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.vocab_size,
        if cfg.qk_norm {
            format!(", qwen3 q/k norms, head dim {}", cfg.head_dim)
        } else {
            String::new()
        }
    );

    let mut rand = c.rand("model logprobs");
    let items: Vec<ScoreItem> = [(1, 15), (17, 40), (100, 60), (250, 30)]
        .iter()
        .map(|&(p, q)| ScoreItem {
            prompt: rand.ids(p, cfg.vocab_size),
            completion: rand.ids(q, cfg.vocab_size),
        })
        .collect();
    let scored: usize = items.iter().map(|it| it.completion.len()).sum();
    let reference: Vec<f32> = completion_logprobs(&cpu_model, &items, 1.0)?.concat();
    let name = "model logprobs".to_string();
    let row_shape = format!(
        "{shape}; {} pairs, {scored} tokens, max |Δ log p|",
        items.len()
    );
    match completion_logprobs(&dev_model, &items, 1.0) {
        Ok(out) => {
            let error = max_abs_diff(&out.concat(), &reference);
            c.push(name, row_shape, "max_abs_nats", error, TOL_MODEL, None);
        }
        Err(e) => {
            let message = Some(format!("{e:#}"));
            c.push(
                name,
                row_shape,
                "max_abs_nats",
                f64::NAN,
                TOL_MODEL,
                message,
            );
        }
    }

    const NEW_TOKENS: usize = 16;
    let requests: Vec<GenerationRequest> = [1, 9, 40]
        .iter()
        .map(|&p| GenerationRequest {
            prompt: rand.ids(p, cfg.vocab_size),
            max_new_tokens: NEW_TOKENS,
        })
        .collect();
    let config = GenerateConfig {
        sampling: SamplingParams::greedy(),
        seed: c.seed,
        first_stream: 0,
        eos_ids: Vec::new(),
        stop_strings: Vec::new(),
        sync_every: None,
        keep_ended_rows: None,
    };
    let want = generate(&cpu_model, &requests, &config, None)?;
    let info = match generate(&dev_model, &requests, &config, None) {
        Ok(got) => {
            let total = requests.len() * NEW_TOKENS;
            let same: usize = got
                .iter()
                .zip(&want)
                .map(|(g, w)| {
                    g.tokens
                        .iter()
                        .zip(&w.tokens)
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .sum();
            format!(
                "greedy generation ({shape}), {} prompts × {NEW_TOKENS} tokens: {same} of {total} \
                 tokens agree before the first difference (information only: bf16 may flip near-ties)",
                requests.len()
            )
        }
        Err(e) => format!("greedy generation failed on the device: {e:#}"),
    };
    Ok(vec![info])
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
