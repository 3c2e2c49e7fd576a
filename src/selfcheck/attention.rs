//! selfcheck rows for attention: the forward (with its log-sum-exp) on every shape family a device
//! may route to a different kernel (prefill tiles, decode steps with and without key splits,
//! head dims without a fused kernel), and the backward.
//!
//! Inputs are random everywhere, the cache included (positions after a token's own must not be
//! read). The backward's gradient caches start at zero except in one case that starts them
//! random, for the accumulate (+=) semantics: a random start of the same size as the gradients
//! would hide their errors in long sequences, where dK is small.

use super::{get, placement, put, Checker, Coverage, Rand, TOL_BF16, TOL_EXACT};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, TokenPlacement, TrainBackend};
use anyhow::Result;

/// One attention problem: heads, KV heads, head dim, and per sequence (slot) its first position
/// and token count.
#[derive(Clone)]
struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    starts: Vec<usize>,
    lens: Vec<usize>,
}

impl Case {
    fn prefill(heads: usize, kv_heads: usize, head_dim: usize, lens: &[usize]) -> Self {
        Case::chunks(heads, kv_heads, head_dim, &vec![0; lens.len()], lens)
    }

    /// Prefill chunks after a prefix: sequence i's tokens at positions starts[i] .. + lens[i],
    /// the cache holding (random) keys before them.
    fn chunks(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        starts: &[usize],
        lens: &[usize],
    ) -> Self {
        Case {
            heads,
            kv_heads,
            head_dim,
            starts: starts.to_vec(),
            lens: lens.to_vec(),
        }
    }

    /// One new token per sequence at the given positions.
    fn decode(heads: usize, kv_heads: usize, head_dim: usize, positions: &[usize]) -> Self {
        Case {
            heads,
            kv_heads,
            head_dim,
            starts: positions.to_vec(),
            lens: vec![1; positions.len()],
        }
    }

    /// Room for every position plus a few never attended to.
    fn capacity(&self) -> usize {
        let end = self.starts.iter().zip(&self.lens).map(|(s, l)| s + l);
        end.max().unwrap_or(1) + 3
    }

    fn cache_len(&self) -> usize {
        self.starts.len() * self.capacity() * self.kv_heads * self.head_dim
    }

    fn label(&self) -> String {
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        if self.lens.iter().all(|&l| l == 1) {
            format!(
                "decode heads={h}/{kv} head_dim={d} positions={:?}",
                self.starts
            )
        } else if self.starts.iter().all(|&s| s == 0) {
            format!("prefill heads={h}/{kv} head_dim={d} lens={:?}", self.lens)
        } else {
            format!(
                "prefill heads={h}/{kv} head_dim={d} lens={:?} from positions {:?}",
                self.lens, self.starts
            )
        }
    }
}

pub(super) fn checks<D: TrainBackend>(c: &mut Checker<D>, coverage: Coverage) -> Result<()> {
    let mut forward = vec![
        // assorted shapes: ragged prefills, decode steps at scattered positions
        Case::prefill(2, 2, 64, &[1, 7, 64, 300]),
        Case::prefill(8, 2, 128, &[5, 100]),
        Case::prefill(14, 2, 64, &[1000, 33]),
        Case::decode(14, 2, 64, &[0, 17, 511, 999]),
        Case::decode(8, 2, 128, &[3, 260]),
        Case::decode(4, 4, 64, &[10, 700]),
        // long prefixes with few sequences: the keys are split across blocks
        Case::decode(14, 2, 64, &[4095]),
        Case::decode(7, 1, 128, &[2047, 5, 3000]),
        // head dims without a fused kernel, and a GQA group of 16
        Case::prefill(7, 1, 40, &[3, 50, 17]),
        Case::decode(7, 1, 40, &[0, 99, 5]),
        Case::prefill(4, 2, 36, &[20, 9]),
        Case::decode(4, 2, 36, &[0, 130]),
        Case::decode(16, 1, 64, &[300, 7]),
        // the demo model's shape (head_dim 32)
        Case::prefill(4, 2, 32, &[60, 3]),
    ];
    forward.extend(fused_matrix(coverage));
    for case in &forward {
        forward_check(c, case)?;
    }
    backward_checks(
        c,
        coverage,
        c.dev.attention_backward_variants().first().copied(),
    )
}

/// The fused kernels' matrix: head dims 64 and 128, GQA groups 1, 4 and 7, T = 1, 17, 128 in one
/// ragged batch, then 1000 and 2048 alone.
fn fused_matrix(coverage: Coverage) -> Vec<Case> {
    let mut matrix = Vec::new();
    for head_dim in [64, 128] {
        for (heads, kv_heads) in [(2, 2), (8, 2), (7, 1)] {
            matrix.push(Case::prefill(heads, kv_heads, head_dim, &[1, 17, 128]));
            if coverage == Coverage::Full {
                matrix.push(Case::prefill(heads, kv_heads, head_dim, &[1000]));
                matrix.push(Case::prefill(heads, kv_heads, head_dim, &[2048]));
            }
        }
    }
    matrix
}

/// The backward rows with the device's attention backward `variant` (None: its only one): the
/// fused matrix and the demo model's shape, accumulation into gradient caches that hold values,
/// and bit-for-bit repeats. selfcheck runs the device's first variant with the other ops and the
/// others at the end, so a kernel that traps (a sticky device error) spoils only its own rows.
pub(super) fn backward_checks<D: TrainBackend>(
    c: &mut Checker<D>,
    coverage: Coverage,
    variant: Option<&str>,
) -> Result<()> {
    let mut backward = fused_matrix(coverage);
    backward.push(Case::prefill(4, 2, 32, &[60, 3]));
    // chunks after a prefix: query tiles that start mid-sequence, key tiles they all see
    backward.push(Case::chunks(8, 2, 64, &[40, 150], &[100, 30]));
    for case in &backward {
        backward_check(c, case, 0.0, variant)?;
    }
    // accumulation into gradient caches that already hold values
    backward_check(c, &Case::prefill(4, 2, 32, &[20, 5]), 0.1, variant)?;
    // bit-for-bit repeats: many key tiles per query tile, several sequences
    backward_repeat_check(c, &Case::prefill(8, 2, 64, &[300, 130, 17]), variant)?;
    if coverage == Coverage::Full {
        backward_repeat_check(c, &Case::prefill(7, 1, 128, &[2048, 1000]), variant)?;
    }
    Ok(())
}

/// One case's random inputs (q, then the K and V caches), on the device and as the CPU sees them.
struct Inputs<D: Backend> {
    place: TokenPlacement,
    q: (D::Buf, Vec<f32>),
    cache_k: (D::Buf, Vec<f32>),
    cache_v: (D::Buf, Vec<f32>),
}

impl Case {
    fn inputs<D: Backend>(&self, dev: &D, r: &mut Rand) -> Result<Inputs<D>> {
        let place = placement(&self.starts, &self.lens);
        let q_len = place.slots.len() * self.heads * self.head_dim;
        Ok(Inputs {
            q: put(dev, &r.normal(q_len, 1.0))?,
            cache_k: put(dev, &r.normal(self.cache_len(), 1.0))?,
            cache_v: put(dev, &r.normal(self.cache_len(), 1.0))?,
            place,
        })
    }

    /// `attention_forward` on the device: out, lse.
    fn forward<D: Backend>(&self, dev: &D, x: &Inputs<D>) -> Result<(D::Buf, D::Buf)> {
        let m = x.place.slots.len();
        let mut out = dev.zeros(m * self.heads * self.head_dim)?;
        let mut lse = dev.zeros_f32(m * self.heads)?;
        dev.attention_forward(
            dev.full_mut(&mut out),
            Some(dev.full_mut(&mut lse)),
            dev.full(&x.q.0),
            dev.full(&x.cache_k.0),
            dev.full(&x.cache_v.0),
            &x.place,
            self.capacity(),
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        Ok((out, lse))
    }

    /// `attention_backward` on the device with its backward `variant` (the setting restored
    /// after): dq, with dck and dcv accumulated.
    fn backward<D: TrainBackend>(
        &self,
        dev: &D,
        x: &Inputs<D>,
        variant: Option<&str>,
        (dout, out, lse): (&D::Buf, &D::Buf, &D::Buf),
        (dck, dcv): (&mut D::Buf, &mut D::Buf),
    ) -> Result<D::Buf> {
        let previous = variant
            .map(|v| dev.set_attention_backward_variant(v))
            .transpose()?;
        let mut dq = dev.zeros(x.q.1.len())?;
        dev.attention_backward(
            dev.full_mut(&mut dq),
            dev.full_mut(dck),
            dev.full_mut(dcv),
            dev.full(dout),
            dev.full(out),
            dev.full(lse),
            dev.full(&x.q.0),
            dev.full(&x.cache_k.0),
            dev.full(&x.cache_v.0),
            &x.place,
            self.capacity(),
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        if let Some(previous) = previous {
            dev.set_attention_backward_variant(previous)?;
        }
        Ok(dq)
    }

    /// `attention_forward` on the CPU reference: out, lse.
    fn forward_reference<D: Backend>(&self, x: &Inputs<D>) -> (Vec<f32>, Vec<f32>) {
        let m = x.place.slots.len();
        let mut out = vec![0.0; m * self.heads * self.head_dim];
        let mut lse = vec![0.0; m * self.heads];
        CpuBackend.attention_forward(
            &mut out,
            Some(&mut lse),
            &x.q.1,
            &x.cache_k.1,
            &x.cache_v.1,
            &x.place,
            self.capacity(),
            self.heads,
            self.kv_heads,
            self.head_dim,
        );
        (out, lse)
    }
}

/// out and lse of `attention_forward` on the device and on the CPU.
fn forward_check<D: Backend>(c: &mut Checker<D>, case: &Case) -> Result<()> {
    c.check("attention_forward", case.label(), TOL_BF16, |dev, r| {
        let x = case.inputs(dev, r)?;
        let (out, lse) = case.forward(dev, &x)?;
        let (out_ref, lse_ref) = case.forward_reference(&x);
        Ok(vec![
            ("", get(dev, &out)?, out_ref),
            ("lse", get(dev, &lse)?, lse_ref),
        ])
    })
}

/// dq, dK, dV of `attention_backward`, each side from its own forward (as in training), with the
/// device's backward `variant` where it has several. The gradient caches start as random values
/// of standard deviation `start` (0: zeros).
fn backward_check<D: TrainBackend>(
    c: &mut Checker<D>,
    case: &Case,
    start: f32,
    variant: Option<&str>,
) -> Result<()> {
    let accumulate = if start > 0.0 { " accumulate" } else { "" };
    let label = with_variant(format!("{}{accumulate}", case.label()), variant);
    c.check("attention_backward", label, TOL_BF16, |dev, r| {
        let x = case.inputs(dev, r)?;
        let cache_len = case.cache_len();
        let q_len = x.q.1.len();
        let (dout, dout_h) = put(dev, &r.normal(q_len, 1.0))?;
        let (mut dck, mut dk_ref) = put(dev, &r.normal(cache_len, start))?;
        let (mut dcv, mut dv_ref) = put(dev, &r.normal(cache_len, start))?;

        let (out, lse) = case.forward(dev, &x)?;
        let dq = case.backward(dev, &x, variant, (&dout, &out, &lse), (&mut dck, &mut dcv))?;

        let (out_ref, lse_ref) = case.forward_reference(&x);
        let mut dq_ref = vec![0.0; q_len];
        CpuBackend.attention_backward(
            &mut dq_ref,
            &mut dk_ref,
            &mut dv_ref,
            &dout_h,
            &out_ref,
            &lse_ref,
            &x.q.1,
            &x.cache_k.1,
            &x.cache_v.1,
            &x.place,
            case.capacity(),
            case.heads,
            case.kv_heads,
            case.head_dim,
        );
        Ok(vec![
            ("dq", get(dev, &dq)?, dq_ref),
            ("dk", get(dev, &dck)?, dk_ref),
            ("dv", get(dev, &dcv)?, dv_ref),
        ])
    })
}

/// A row's shape label, followed by the backward variant where the device has several.
fn with_variant(label: String, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{label} {v}"),
        None => label,
    }
}

/// `attention_backward` twice on the same inputs with the device's backward `variant`: the
/// second must repeat the first bit for bit (no sum may depend on how blocks are scheduled, the
/// fused kernel's dq included).
fn backward_repeat_check<D: TrainBackend>(
    c: &mut Checker<D>,
    case: &Case,
    variant: Option<&str>,
) -> Result<()> {
    let label = with_variant(case.label(), variant);
    c.check("attention_backward repeat", label, TOL_EXACT, |dev, r| {
        let x = case.inputs(dev, r)?;
        let dout = put(dev, &r.normal(x.q.1.len(), 1.0))?.0;
        let (out, lse) = case.forward(dev, &x)?;
        let run = || -> Result<[Vec<f32>; 3]> {
            let mut dck = dev.zeros(case.cache_len())?;
            let mut dcv = dev.zeros(case.cache_len())?;
            let dq = case.backward(dev, &x, variant, (&dout, &out, &lse), (&mut dck, &mut dcv))?;
            Ok([get(dev, &dq)?, get(dev, &dck)?, get(dev, &dcv)?])
        };
        let [dq, dk, dv] = run()?;
        let [dq2, dk2, dv2] = run()?;
        Ok(vec![("dq", dq2, dq), ("dk", dk2, dk), ("dv", dv2, dv)])
    })
}
