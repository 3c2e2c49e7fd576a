//! What `bench step --profile` records of each op call (`Backend::start_op_profile`): its name,
//! its time, and the work it does, so the profile gives each op's rate (TFLOP/s for the products
//! and attention, GB/s for everything) and says which op is far from the device's peak.
//!
//! The work follows from the op's shapes alone, the same on every backend:
//! - FLOPs are model FLOPs, as the MFU counts them (`bench_step::train_flops`): 2 per
//!   multiply-add of a matrix product, 4 · head_dim per (query head, attended key) of an
//!   attention forward and twice that for its backward (what FlashAttention recomputes is not
//!   counted). The ops of one update add up to the MFU's FLOPs (tested).
//! - Bytes are the op's operands at the backend's element sizes, each read or written once (a
//!   buffer an op adds into twice): a lower bound on its memory traffic, so bytes / time is the
//!   op's rate against the device's copy bandwidth.

use super::{GradWrite, TokenPlacement};

/// The work of one op call (module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    /// (m, k, n) of a matrix product out[m, n] = x[m, k] · w[n, k]ᵀ: each shape is a row of its
    /// own in the profile (their rates differ).
    pub shape: Option<[usize; 3]>,
    /// Model FLOPs.
    pub flops: f64,
    /// Operand bytes, each once.
    pub bytes: f64,
}

impl Work {
    /// An op that computes no matrix product, moving `bytes`.
    pub fn moving(bytes: usize) -> Self {
        Work {
            shape: None,
            flops: 0.0,
            bytes: bytes as f64,
        }
    }

    /// A matrix product x[m, k] · w[n, k]ᵀ (`matmul_forward`), moving `bytes`.
    pub fn matmul_forward(m: usize, k: usize, n: usize, bytes: usize) -> Self {
        Work {
            shape: Some([m, k, n]),
            flops: 2.0 * (m * k) as f64 * n as f64,
            bytes: bytes as f64,
        }
    }

    /// The backward of x[m, k] · w[n, k]ᵀ (`matmul_backward`) from its operands' sizes in bytes:
    /// dw added into, dout and x read, and when dx is made (`dx`: its size and how it is
    /// written) w read too.
    pub fn matmul_backward(
        m: usize,
        k: usize,
        n: usize,
        dx: Option<(usize, GradWrite)>,
        [dw, dout, x, w]: [usize; 4],
    ) -> Self {
        let (products, dx_bytes) = match dx {
            None => (1.0, 0),
            Some((dx, write)) => (2.0, gradient_bytes(dx, write) + w),
        };
        Work {
            flops: products * Work::matmul_forward(m, k, n, 0).flops,
            ..Work::matmul_forward(m, k, n, dx_bytes + 2 * dw + dout + x)
        }
    }

    /// Causal attention of the batch `place` over the cache (`attention_forward`, and
    /// `attention_backward` when `backward`: twice the FLOPs), moving `bytes`.
    pub fn attention(
        place: &TokenPlacement,
        n_heads: usize,
        head_dim: usize,
        backward: bool,
        bytes: usize,
    ) -> Self {
        let attended: f64 = place.positions.iter().map(|&p| p as f64 + 1.0).sum();
        let forward = 4.0 * (n_heads * head_dim) as f64 * attended;
        Work {
            shape: None,
            flops: if backward { 2.0 * forward } else { forward },
            bytes: bytes as f64,
        }
    }
}

/// The traffic of a gradient buffer of `bytes`: written, or read and written when `write` adds.
pub fn gradient_bytes(bytes: usize, write: GradWrite) -> usize {
    match write {
        GradWrite::Overwrite => bytes,
        GradWrite::Add => 2 * bytes,
    }
}

/// The cache rows an attention over `place` needs, each counted once: for each slot, its
/// positions up to the largest one a token of the batch sits at.
pub fn attention_keys_read(place: &TokenPlacement) -> usize {
    let slots = place
        .slots
        .iter()
        .map(|&s| s as usize + 1)
        .max()
        .unwrap_or(0);
    let mut rows = vec![0usize; slots]; // per slot: 1 + its largest position in the batch
    for (&slot, &pos) in place.slots.iter().zip(&place.positions) {
        let r = &mut rows[slot as usize];
        *r = (*r).max(pos as usize + 1);
    }
    rows.iter().sum()
}

/// The bytes of `qkv_rope_forward` from its operands' sizes in bytes: the product's q, k and v
/// read once and written apart (`out`), q and k before their norms written too when kept
/// (`raw`), and the biases read.
pub fn qkv_rope_bytes(
    out: [usize; 3],
    raw: Option<[usize; 2]>,
    biases: [Option<usize>; 3],
) -> usize {
    let raw: usize = raw.map_or(0, |r| r.iter().sum());
    2 * out.iter().sum::<usize>() + raw + biases.iter().flatten().sum::<usize>()
}

/// The bytes of `policy_loss_backward` from its operands' sizes in bytes: the logits read, their
/// gradient, the log-probs and statistics written, each row's target and completion index (u32,
/// `rows` of each), the completions' advantages and weights, and logπold and logπref where given.
pub fn policy_loss_bytes(
    [logits, dlogits, logp, stats]: [usize; 4],
    rows: usize,
    [advantages, weights]: [usize; 2],
    [old_logp, ref_logp]: [usize; 2],
) -> usize {
    logits + dlogits + logp + stats + 2 * 4 * rows + advantages + weights + old_logp + ref_logp
}

/// How many different rows `ids` names (an embedding backward reads and writes each once).
pub fn distinct_rows(ids: &[u32]) -> usize {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.len()
}

/// Time and work of one op (and product shape) over a profiled stretch of work
/// (`Backend::take_op_profile`): on the device (CUDA), or the calls' wall time (CPU).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    /// (m, k, n) of a matrix product's rows (`Work::shape`); absent for other ops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<[usize; 3]>,
    pub calls: usize,
    pub seconds: f64,
    /// Model FLOPs of all its calls.
    pub flops: f64,
    /// Operand bytes of all its calls, each once.
    pub bytes: f64,
}

impl OpTime {
    /// The op's name, with the product's shape for a matrix product.
    pub fn label(&self) -> String {
        match self.shape {
            Some([m, k, n]) => format!("{} m={m} k={k} n={n}", self.op),
            None => self.op.clone(),
        }
    }
}

/// One timed op call: the op's name, its work and its seconds.
pub type OpSample = (&'static str, Work, f64);

/// Sums samples by op and shape: largest total first, ties by name and shape.
pub fn summarize_ops(samples: &[OpSample]) -> Vec<OpTime> {
    let mut ops: Vec<OpTime> = Vec::new();
    for &(op, work, seconds) in samples {
        match ops.iter_mut().find(|o| o.op == op && o.shape == work.shape) {
            Some(o) => {
                o.calls += 1;
                o.seconds += seconds;
                o.flops += work.flops;
                o.bytes += work.bytes;
            }
            None => ops.push(OpTime {
                op: op.to_string(),
                shape: work.shape,
                calls: 1,
                seconds,
                flops: work.flops,
                bytes: work.bytes,
            }),
        }
    }
    ops.sort_by(|a, b| {
        b.seconds
            .total_cmp(&a.seconds)
            .then(a.op.cmp(&b.op))
            .then(a.shape.cmp(&b.shape))
    });
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarize_adds_calls_of_the_same_op_and_shape_largest_first_ties_by_name() {
        let fwd = |m, seconds| {
            (
                "matmul_forward",
                Work::matmul_forward(m, 3, 5, 100),
                seconds,
            )
        };
        let copy = |seconds| ("copy", Work::moving(8), seconds);
        let norm = |seconds| ("rmsnorm_forward", Work::moving(4), seconds);
        let samples = [
            fwd(2, 1.0),
            norm(0.75),
            copy(0.5),
            fwd(4, 3.0),
            fwd(2, 1.5),
            copy(0.25),
        ];
        let ops = summarize_ops(&samples);
        let rows: Vec<(String, usize, f64, f64, f64)> = ops
            .iter()
            .map(|o| (o.label(), o.calls, o.seconds, o.flops, o.bytes))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "matmul_forward m=4 k=3 n=5".to_string(),
                    1,
                    3.0,
                    120.0,
                    100.0
                ),
                (
                    "matmul_forward m=2 k=3 n=5".to_string(),
                    2,
                    2.5,
                    120.0,
                    200.0
                ),
                ("copy".to_string(), 2, 0.75, 0.0, 16.0),
                ("rmsnorm_forward".to_string(), 1, 0.75, 0.0, 4.0),
            ]
        );
        assert!(summarize_ops(&[]).is_empty());
    }

    /// dw [5, 3] f32 (60 bytes) added into, dout [2, 5] and x [2, 3] read (bf16: 20 + 12), w
    /// [5, 3] (30) read only for dx [2, 3] (12, or 24 when added into).
    #[test]
    fn a_matmul_backward_counts_its_dx_product_only_when_it_makes_dx() {
        let operands = [60, 20, 12, 30];
        let without = Work::matmul_backward(2, 3, 5, None, operands);
        assert_eq!((without.flops, without.bytes), (60.0, 152.0));
        let overwrite = Work::matmul_backward(2, 3, 5, Some((12, GradWrite::Overwrite)), operands);
        assert_eq!((overwrite.flops, overwrite.bytes), (120.0, 194.0));
        let add = Work::matmul_backward(2, 3, 5, Some((12, GradWrite::Add)), operands);
        assert_eq!(
            (add.flops, add.shape, add.bytes),
            (120.0, Some([2, 3, 5]), 206.0)
        );
    }

    #[test]
    fn qkv_rope_counts_the_product_read_its_parts_written_and_the_kept_raws() {
        assert_eq!(qkv_rope_bytes([8, 4, 4], None, [None; 3]), 32);
        assert_eq!(
            qkv_rope_bytes([8, 4, 4], None, [Some(1), Some(2), Some(3)]),
            32 + 6
        );
        assert_eq!(qkv_rope_bytes([8, 4, 4], Some([8, 4]), [None; 3]), 32 + 12);
    }

    /// Two sequences in slots 4 and 1: a prefill of positions 0..3 in slot 4 and a decode token at
    /// position 6 of slot 1. The prefill attends 1 + 2 + 3 keys, the decode token 7; the cache
    /// rows read are slot 4's first 3 and slot 1's first 7.
    #[test]
    fn attention_work_counts_the_attended_keys_and_the_rows_read() {
        let place = TokenPlacement {
            slots: vec![4, 4, 4, 1],
            positions: vec![0, 1, 2, 6],
        };
        let fwd = Work::attention(&place, 2, 8, false, 0);
        assert_eq!(fwd.flops, 4.0 * 16.0 * 13.0);
        let bwd = Work::attention(&place, 2, 8, true, 0);
        assert_eq!(bwd.flops, 2.0 * fwd.flops);
        assert_eq!(attention_keys_read(&place), 10);
    }

    #[test]
    fn distinct_rows_counts_each_id_once() {
        assert_eq!(distinct_rows(&[5, 1, 5, 5, 0, 1]), 3);
        assert_eq!(distinct_rows(&[]), 0);
    }
}
