//! The real source of kernels/rope.cu, kernels/embedding.cu, kernels/optimizer.cu and the simple
//! attention kernel of kernels/attention.cu, run on the CPU by the emulator in tests/cuda_emulator
//! through thinkshort's own launchers (src/cuda/ops/{rope,embedding,optimizer,attention}.rs:
//! grids, argument order and kinds, the grid sized for the vector or the scalar path), against
//! the CPU reference (`thinkshort::backend::cpu`): the fused q/k/v bias + RoPE with the Qwen2
//! layout and its backward, on the 128-bit and the scalar paths and with heads sharing a thread's
//! sines, and Qwen3's per-head q/k norms fused with the rotation; row gathers and the grouped
//! scatter-adds; AdamW, the f64 sum of squares and column sums; causal GQA attention for head
//! dims without a fused kernel, prefill and decode placements.
//!
//! Write-only outputs start as NaN (0xffff in bf16) so an unwritten element fails; in-place and
//! accumulating ones start from random values. Copies are compared bit for bit, single-rounding
//! ops element by element, reductions and attention as in `selfcheck`.

mod emulation_support;

use cudarc::driver::LaunchConfig;
use emulation_support::{
    assert_close, assert_launches, assert_same, ptr, ptr_mut, run_recorded, to_bits, to_f32, Rand,
};
use thinkshort::backend::cpu::{self, CpuBackend};
use thinkshort::backend::{Backend, HeadNorms, TokenPlacement, TrainBackend};
use thinkshort::cuda::ops::attention;
use thinkshort::cuda::ops::elementwise::{rows_config, MAX_GRID_Y};
use thinkshort::cuda::ops::embedding::{self, RowGroups};
use thinkshort::cuda::ops::optimizer::{self as opt, SUM_SQUARES_BLOCKS, SUM_SQUARES_THREADS};
use thinkshort::cuda::ops::rope::{self, rope_config};
use thinkshort::optim::AdamW;

/// bf16 values in a buffer that starts 16-byte aligned, or 2 bytes past a 16-byte boundary
/// (`misaligned`), which takes the kernels off their 128-bit path.
struct Bf16Buf {
    storage: Vec<u16>,
    start: usize,
    len: usize,
}

impl Bf16Buf {
    fn new(values: &[u16], misaligned: bool) -> Self {
        let mut storage = vec![0u16; values.len() + 8];
        let addr = storage.as_ptr() as usize;
        let want = if misaligned { 2 } else { 0 };
        let start = (0..8).find(|i| (addr + 2 * i) % 16 == want).unwrap();
        storage[start..start + values.len()].copy_from_slice(values);
        Bf16Buf {
            storage,
            start,
            len: values.len(),
        }
    }

    fn ptr(&self) -> u64 {
        ptr(&self.storage[self.start..])
    }

    fn ptr_mut(&mut self) -> u64 {
        ptr_mut(&mut self.storage[self.start..])
    }

    fn values(&self) -> &[u16] {
        &self.storage[self.start..][..self.len]
    }
}

/// Each element of `got` within `bound(want)` of `want`; NaN fails.
fn assert_each(what: &str, got: &[f32], want: &[f32], bound: impl Fn(f32) -> f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= bound(w),
            "{what}[{i}]: {g} where the reference has {w}"
        );
    }
}

/// Each bf16 element is the f32 reference rounded once: within half a bf16 ulp (≤ |x| / 256),
/// plus 1e-6 for the f32 arithmetic (sines, order of additions) the two sides do differently.
fn assert_rounded(what: &str, got: &[u16], want: &[f32]) {
    assert_each(what, &to_f32(got), want, |w| w.abs() / 256.0 + 1e-6);
}

/// Each bf16 element is exactly the reference (a copy), NaN where the reference is NaN.
fn assert_copied(what: &str, got: &[u16], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in to_f32(got).iter().zip(want).enumerate() {
        let same = if w.is_nan() { g.is_nan() } else { g == w };
        assert!(same, "{what}[{i}]: {g} where the reference has {w}");
    }
}

// ----------------------------------------------------------------------------
// rope.cu

/// Qwen2's inverse frequencies (rope_theta = 1e6), as `ModelConfig::rope_inv_freq` computes them.
fn qwen2_inv_freq(head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / 1e6f64.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect()
}

/// q, k and v as the kernel wrote them against the references rounded once.
fn assert_qkv(got: [&Bf16Buf; 3], want: [&[f32]; 3]) {
    assert_rounded("q", got[0].values(), want[0]);
    assert_rounded("k", got[1].values(), want[1]);
    assert_rounded("v", got[2].values(), want[2]);
}

/// The projections' product for m tokens: [m, (n_heads + 2 n_kv_heads) * head_dim], each row
/// q', k' and v' side by side, of scale `scale`.
fn qkv_product(
    r: &mut Rand,
    m: usize,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    scale: f32,
) -> (Vec<u16>, Vec<f32>) {
    r.bf16s(m * (n_heads + 2 * n_kv_heads) * head_dim, scale)
}

/// Write-only bf16 outputs: NaN (0xffff) until written.
fn nan_buf(n: usize) -> Bf16Buf {
    Bf16Buf::new(&vec![0xffffu16; n], false)
}

/// `rope::qkv_rope_forward` from the product qkv (2 bytes off 16-byte alignment when
/// `qkv_misaligned`) into q [m, n_heads * head_dim], k and v [m, n_kv_heads * head_dim], with
/// biases of scale 0.5 on all three or none; `vector_path`: whether the launcher must size the
/// grid for the 128-bit path. Returns the grid it chose.
fn check_qkv_rope(
    seed: u64,
    positions: &[u32],
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    biases: bool,
    qkv_misaligned: bool,
    vector_path: bool,
) -> LaunchConfig {
    let m = positions.len();
    let mut r = Rand(seed);
    let qkv = qkv_product(&mut r, m, (n_heads, n_kv_heads, head_dim), 1.0);
    let q_bias = r.bf16s(n_heads * head_dim, 0.5); // [n_heads * head_dim]
    let k_bias = r.bf16s(n_kv_heads * head_dim, 0.5); // [n_kv_heads * head_dim]
    let v_bias = r.bf16s(n_kv_heads * head_dim, 0.5);
    let inv_freq = qwen2_inv_freq(head_dim); // [head_dim / 2]

    let qkv_d = Bf16Buf::new(&qkv.0, qkv_misaligned);
    let (mut qd, mut kd, mut vd) = (
        nan_buf(m * n_heads * head_dim),
        nan_buf(m * n_kv_heads * head_dim),
        nan_buf(m * n_kv_heads * head_dim),
    );
    // a null pointer (0): no bias
    let bias_ptr = |b: &(Vec<u16>, Vec<f32>)| if biases { ptr(&b.0) } else { 0 };
    let launches = run_recorded(|launcher| {
        rope::qkv_rope_forward(
            launcher,
            (qd.ptr_mut(), kd.ptr_mut(), vd.ptr_mut()),
            qkv_d.ptr(),
            (bias_ptr(&q_bias), bias_ptr(&k_bias), bias_ptr(&v_bias)),
            ptr(positions),
            ptr(&inv_freq),
            m,
            n_heads,
            n_kv_heads,
            head_dim,
        )
    });
    let cfg = rope_config(m, n_heads + 2 * n_kv_heads, head_dim, vector_path);
    assert_launches(&launches, &["qkv_rope_forward"], cfg);

    let mut refs = [n_heads, n_kv_heads, n_kv_heads].map(|h| vec![f32::NAN; m * h * head_dim]);
    let bias = |b: &(Vec<u16>, Vec<f32>)| biases.then(|| b.1.clone());
    let (qb_ref, kb_ref, vb_ref) = (bias(&q_bias), bias(&k_bias), bias(&v_bias));
    let [q_ref, k_ref, v_ref] = &mut refs;
    CpuBackend.qkv_rope_forward(
        [q_ref, k_ref, v_ref],
        &qkv.1,
        [qb_ref.as_deref(), kb_ref.as_deref(), vb_ref.as_deref()],
        None,
        positions,
        &inv_freq,
        n_heads,
        n_kv_heads,
        head_dim,
    );
    assert_qkv([&qd, &kd, &vd], refs.each_ref().map(|r| &r[..]));
    launches[0].config
}

/// Qwen2 layout (6 query heads, 2 KV heads of 64: 128-bit path) with q, k and v biases: 70
/// tokens of a chunk continuing at position 40 and one at 100000 (400 items: two blocks of x).
#[test]
fn qkv_rope_forward_with_biases_matches_the_cpu() {
    let positions: Vec<u32> = (40..110).chain([100_000]).collect();
    check_qkv_rope(1, &positions, (6, 2, 64), true, false, true);
}

/// No biases and head dim 40 (half 20: the scalar path), GQA of 4:1; and head dim 64 from a
/// product 2 bytes off alignment (the scalar path too).
#[test]
fn qkv_rope_forward_on_the_scalar_path_matches_the_cpu() {
    check_qkv_rope(2, &[7, 8, 9, 300, 4095], (4, 1, 40), false, false, false);
    check_qkv_rope(9, &[0, 1, 2, 3000], (2, 1, 64), true, true, false);
}

/// A prefill of 4100 tokens (20500 items, past SMALL_GRID_ITEMS): 5 heads in 2 slices of grid.y,
/// so each thread rotates several heads with the same sines; the last block is partial.
#[test]
fn qkv_rope_forward_sharing_sines_over_heads_matches_the_cpu() {
    let positions: Vec<u32> = (1..=4100).collect();
    let cfg = check_qkv_rope(3, &positions, (3, 1, 64), true, false, true);
    assert!(
        cfg.grid_dim.1 < 5,
        "the case should give threads several heads"
    );
}

/// `rope::qkv_norm_rope_forward` (Qwen3: each head of the product's q' and k', plus its bias when
/// `biased`, RMS-normalised and scaled, then rotated; v' plus its bias; q' and k' with their biases
/// kept in q_raw and k_raw when `keep_raw`) against two references: the CPU with the kernel's
/// roundings (the biased value to bf16, the normalised value to bf16, then times the weight to
/// bf16, as the bias and rmsnorm kernels and HF round) element by element, and
/// `CpuBackend::qkv_rope_forward` with head norms (the spec, in f32) as `selfcheck` compares.
fn check_qkv_norm_rope(
    seed: u64,
    positions: &[u32],
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    biased: bool,
    keep_raw: bool,
) {
    let m = positions.len();
    let mut r = Rand(seed);
    let shape = (n_heads, n_kv_heads, head_dim);
    let qkv = qkv_product(&mut r, m, shape, 2.0);
    let q_norm = r.bf16s(head_dim, 1.0); // [head_dim]
    let k_norm = r.bf16s(head_dim, 1.0);
    let biases = [n_heads, n_kv_heads, n_kv_heads].map(|h| r.bf16s(h * head_dim, 0.5));
    let inv_freq = qwen2_inv_freq(head_dim);
    let eps = 1e-6;

    let (q_len, kv_len) = (m * n_heads * head_dim, m * n_kv_heads * head_dim);
    let (mut qd, mut kd, mut vd) = (nan_buf(q_len), nan_buf(kv_len), nan_buf(kv_len));
    let (mut q_raw_d, mut k_raw_d) = (nan_buf(q_len), nan_buf(kv_len));
    let bias_ptrs = biases
        .each_ref()
        .map(|b| if biased { ptr(&b.0) } else { 0 });
    let launches = run_recorded(|launcher| {
        rope::qkv_norm_rope_forward(
            launcher,
            (qd.ptr_mut(), kd.ptr_mut(), vd.ptr_mut()),
            if keep_raw {
                (q_raw_d.ptr_mut(), k_raw_d.ptr_mut())
            } else {
                (0, 0)
            },
            ptr(&qkv.0),
            (bias_ptrs[0], bias_ptrs[1], bias_ptrs[2]),
            (ptr(&q_norm.0), ptr(&k_norm.0)),
            ptr(positions),
            ptr(&inv_freq),
            m,
            shape,
            eps,
        )
    });
    let cfg = rope::norm_rope_config(m * (n_heads + 2 * n_kv_heads));
    assert_launches(&launches, &["qkv_norm_rope_forward"], cfg);

    // the kernel's roundings: each part plus its bias rounded; each head normalised, rounded,
    // scaled, rounded; then rotated
    let round = |x: f32| half::bf16::from_f32(x).to_f32();
    let mut parts = [n_heads, n_kv_heads, n_kv_heads].map(|h| vec![f32::NAN; m * h * head_dim]);
    {
        let [q, k, v] = &mut parts;
        cpu::split_qkv([q, k, v], &qkv.1, m);
    }
    if biased {
        for (part, bias) in parts.iter_mut().zip(&biases) {
            cpu::add_bias_rows(part, &bias.1);
            part.iter_mut().for_each(|x| *x = round(*x));
        }
    }
    let normed = |raw: &[f32], weight: &[f32]| -> Vec<f32> {
        raw.chunks(head_dim)
            .flat_map(|x| {
                let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / head_dim as f32;
                let rstd = 1.0 / (mean_sq + eps).sqrt();
                x.iter()
                    .zip(weight)
                    .map(move |(x, w)| round(w * round(x * rstd)))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mut q_ref = normed(&parts[0], &q_norm.1);
    let mut k_ref = normed(&parts[1], &k_norm.1);
    let positions_of =
        |x: &mut [f32], heads: usize| cpu::rope_forward(x, positions, &inv_freq, heads, head_dim);
    positions_of(&mut q_ref, n_heads);
    positions_of(&mut k_ref, n_kv_heads);
    assert_qkv([&qd, &kd, &vd], [&q_ref, &k_ref, &parts[2]]);
    if keep_raw {
        assert_same("q_raw", q_raw_d.values(), &to_bits(&parts[0]));
        assert_same("k_raw", k_raw_d.values(), &to_bits(&parts[1]));
    } else {
        assert_same("q_raw not kept", q_raw_d.values(), &vec![0xffff; q_len]);
    }

    // the spec: CPU f32 throughout
    let mut spec = [n_heads, n_kv_heads, n_kv_heads].map(|h| vec![f32::NAN; m * h * head_dim]);
    let norms = HeadNorms::<CpuBackend> {
        weights: [&q_norm.1, &k_norm.1],
        eps,
        raw: None,
    };
    let bias_refs = biases.each_ref().map(|b| biased.then_some(&b.1[..]));
    let [q_spec, k_spec, v_spec] = &mut spec;
    CpuBackend.qkv_rope_forward(
        [q_spec, k_spec, v_spec],
        &qkv.1,
        bias_refs,
        Some(norms),
        positions,
        &inv_freq,
        n_heads,
        n_kv_heads,
        head_dim,
    );
    assert_close("q against the f32 spec", &to_f32(qd.values()), &spec[0]);
    assert_close("k against the f32 spec", &to_f32(kd.values()), &spec[1]);
}

/// Qwen3's layout (head dim 128, 4 query heads per KV head, no biases) over a decode step's few
/// rows at far positions, and head dims 64 (with biases, q and k kept: one pair per lane), 32
/// (lanes 16–31 rotate nothing), 40 and 256 over prefill-sized chunks whose last block is
/// partial.
#[test]
fn qkv_norm_rope_forward_matches_the_cpu() {
    check_qkv_norm_rope(4, &[5, 900, 4095, 100_000], (8, 2, 128), false, false);
    let chunk: Vec<u32> = (30..131).collect();
    check_qkv_norm_rope(5, &chunk, (3, 1, 64), true, true);
    check_qkv_norm_rope(6, &chunk, (2, 2, 32), true, false);
    // head dims off the warp's width: some lanes sum an extra element or rotate nothing
    check_qkv_norm_rope(7, &chunk, (2, 1, 40), true, true);
    check_qkv_norm_rope(8, &[3, 4, 5], (2, 1, 256), false, true);
}

/// `rope::rope_backward`: 14 heads of 64 (Qwen2.5-0.5B's queries) on the 128-bit path and on
/// the scalar path (dx 2 bytes off alignment), and head dim 6 (half 3: scalar) at position
/// 100000.
#[test]
fn rope_backward_rotates_back_like_the_cpu() {
    for (seed, heads, head_dim, positions, misaligned, vector_path) in [
        (4, 14, 64, vec![0u32, 1, 7, 255, 4095], false, true),
        (5, 14, 64, vec![3, 4, 5, 1000], true, false),
        (6, 3, 6, vec![5, 100_000], false, false),
    ] {
        let m = positions.len();
        // dx: [m, heads * head_dim]
        let (bits, mut reference) = Rand(seed).bf16s(m * heads * head_dim, 1.0);
        let inv_freq = qwen2_inv_freq(head_dim);
        let mut dx = Bf16Buf::new(&bits, misaligned);
        let launches = run_recorded(|k| {
            rope::rope_backward(
                k,
                dx.ptr_mut(),
                ptr(&positions),
                ptr(&inv_freq),
                m,
                heads,
                head_dim,
            )
        });
        let cfg = rope_config(m, heads, head_dim, vector_path);
        assert_launches(&launches, &["rope_backward"], cfg);
        cpu::rope_backward(&mut reference, &positions, &inv_freq, heads, head_dim);
        let what =
            format!("rope_backward heads {heads} head_dim {head_dim} misaligned {misaligned}");
        assert_rounded(&what, dx.values(), &reference);
    }
}

/// `rope::qkv_rope_backward`: dq and dk rotated back and dv into the product's gradient (which
/// starts as NaN: every value must be written): Qwen2.5-0.5B's heads on the 128-bit path, the
/// same from dq 2 bytes off alignment (scalar), and head dim 6 (half 3: scalar).
#[test]
fn qkv_rope_backward_rotates_back_beside_dv_like_the_cpu() {
    for (seed, shape, positions, misaligned, vector_path) in [
        (10, (14, 2, 64), vec![0u32, 1, 7, 255, 4095], false, true),
        (11, (14, 2, 64), vec![3, 4, 5, 1000], true, false),
        (12, (3, 1, 6), vec![5, 100_000], false, false),
    ] {
        let (heads, kv_heads, head_dim) = shape;
        let m = positions.len();
        let mut r = Rand(seed);
        let dq = r.bf16s(m * heads * head_dim, 1.0); // [m, heads * head_dim]
        let dk = r.bf16s(m * kv_heads * head_dim, 1.0); // [m, kv_heads * head_dim]
        let dv = r.bf16s(m * kv_heads * head_dim, 1.0);
        let inv_freq = qwen2_inv_freq(head_dim);
        let dq_d = Bf16Buf::new(&dq.0, misaligned);
        let mut dqkv = nan_buf(m * (heads + 2 * kv_heads) * head_dim);
        let launches = run_recorded(|k| {
            rope::qkv_rope_backward(
                k,
                dqkv.ptr_mut(),
                (dq_d.ptr(), ptr(&dk.0), ptr(&dv.0)),
                ptr(&positions),
                ptr(&inv_freq),
                m,
                heads,
                kv_heads,
                head_dim,
            )
        });
        let cfg = rope_config(m, heads + 2 * kv_heads, head_dim, vector_path);
        assert_launches(&launches, &["qkv_rope_backward"], cfg);
        let mut reference = vec![f32::NAN; dqkv.values().len()];
        CpuBackend.qkv_rope_backward(
            &mut reference,
            [&dq.1, &dk.1, &dv.1],
            &positions,
            &inv_freq,
            heads,
            kv_heads,
            head_dim,
        );
        let what = format!("qkv_rope_backward {shape:?} misaligned {misaligned}");
        assert_rounded(&what, dqkv.values(), &reference);
    }
}

// ----------------------------------------------------------------------------
// embedding.cu

/// (dim, 128-bit path): 2056 is 257 vectors, two blocks of x; 300 is scalar, two blocks of x.
const COPY_DIMS: [(usize, bool); 2] = [(2056, true), (300, false)];

/// `embedding::embedding_forward` of `ids` over a random [vocab, dim] table against the CPU:
/// rows copied bit for bit, on the grid of the vector path when `vector_path`. Returns the grid.
fn check_embedding_forward(
    what: &str,
    ids: &[u32],
    (vocab, dim): (usize, usize),
    vector_path: bool,
    seed: u64,
) -> LaunchConfig {
    let table = Rand(seed).bf16s(vocab * dim, 1.0);
    let mut out = Bf16Buf::new(&vec![0xffff; ids.len() * dim], false); // [ids, dim]
    let launches = run_recorded(|k| {
        embedding::embedding_forward(k, out.ptr_mut(), ptr(&table.0), ptr(ids), ids.len(), dim)
    });
    let cfg = rows_config(ids.len(), dim, vector_path);
    assert_launches(&launches, &["embedding_forward"], cfg);
    let mut reference = vec![0.0; ids.len() * dim];
    cpu::embedding_forward(&mut reference, &table.1, ids, dim);
    assert_copied(what, out.values(), &reference);
    launches[0].config
}

/// embedding_forward over a table of 40 rows, ids repeating and at both ends of the table.
#[test]
fn embedding_forward_copies_the_rows_of_the_ids() {
    for (dim, vector_path) in COPY_DIMS {
        let what = format!("embedding_forward dim {dim}");
        check_embedding_forward(&what, &[3, 39, 3, 0, 17], (40, dim), vector_path, 7);
    }
}

/// embedding_forward_sampled: ids read through `rows` from f32 samples, 0 and vocab − 1 among
/// them; the ids vocab, -1, 1e9 and NaN are not rows of the table and give rows of NaN (out
/// starts finite here so that those show being written).
#[test]
fn embedding_forward_sampled_gives_nan_rows_for_ids_outside_the_table() {
    let vocab = 40;
    let sampled = [2.0f32, 39.0, vocab as f32, -1.0, f32::NAN, 0.0, 1e9];
    let rows = [6u32, 0, 2, 1, 3, 5, 4, 0];
    for (dim, vector_path) in COPY_DIMS {
        let mut r = Rand(8);
        let table = r.bf16s(vocab * dim, 1.0); // [vocab, dim]
        let mut out = Bf16Buf::new(&r.bf16s(rows.len() * dim, 1.0).0, false); // [rows, dim]
        let launches = run_recorded(|k| {
            embedding::embedding_forward_sampled(
                k,
                out.ptr_mut(),
                ptr(&table.0),
                ptr(&sampled),
                ptr(&rows),
                rows.len(),
                dim,
                vocab,
            )
        });
        let cfg = rows_config(rows.len(), dim, vector_path);
        assert_launches(&launches, &["embedding_forward_sampled"], cfg);
        let mut reference = vec![0.0; rows.len() * dim];
        cpu::embedding_forward_sampled(&mut reference, &table.1, &sampled, &rows, dim);
        assert_copied(
            &format!("embedding_forward_sampled dim {dim}"),
            out.values(),
            &reference,
        );
    }
}

/// gather_rows of dim 64 from 9 rows, with out aligned (128-bit path) and 2 bytes off (scalar).
#[test]
fn gather_rows_copies_the_listed_rows() {
    let (dim, rows) = (64, [8u32, 0, 8, 3]);
    let x = Rand(9).bf16s(9 * dim, 1.0); // [9, dim]
    for misaligned in [false, true] {
        let mut out = Bf16Buf::new(&vec![0xffff; rows.len() * dim], misaligned); // [rows, dim]
        let launches = run_recorded(|k| {
            embedding::gather_rows(k, out.ptr_mut(), ptr(&x.0), ptr(&rows), rows.len(), dim)
        });
        let cfg = rows_config(rows.len(), dim, !misaligned);
        assert_launches(&launches, &["gather_rows"], cfg);
        let rows_usize: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
        let mut reference = vec![0.0; rows.len() * dim];
        cpu::gather_rows(&mut reference, &x.1, &rows_usize, dim);
        assert_copied(
            &format!("gather_rows misaligned {misaligned}"),
            out.values(),
            &reference,
        );
    }
}

/// 65538 rows of dim 8 (one vector each): grid.y stops at 65535, the kernel's row loop does the
/// last 3 rows.
#[test]
fn embedding_forward_loops_over_rows_past_the_grid_limit() {
    let (vocab, dim) = (16, 8);
    let ids: Vec<u32> = (0..MAX_GRID_Y as u32 + 3)
        .map(|r| (r * 7) % vocab)
        .collect();
    let what = "embedding_forward past grid.y";
    let cfg = check_embedding_forward(what, &ids, (vocab as usize, dim), true, 19);
    assert_eq!(cfg.grid_dim.1 as usize, MAX_GRID_Y, "grid.y at its limit");
}

/// embedding_backward: dtable (f32 [30, 300]: two blocks of columns, the second partial) +=
/// dout rows of ids with a three-fold repeat; the other rows keep their values.
#[test]
fn embedding_backward_adds_repeated_ids_into_the_f32_table() {
    let (vocab, dim, ids) = (30, 300, [4u32, 29, 4, 0, 4, 17]);
    let mut r = Rand(10);
    let dout = r.bf16s(ids.len() * dim, 1.0); // [ids, dim]
    let start: Vec<f32> = (0..vocab * dim).map(|_| r.next()).collect();
    let g = RowGroups::new(&ids);
    let mut dtable = start.clone(); // [vocab, dim]
    run_recorded(|k| {
        embedding::embedding_backward(
            k,
            ptr_mut(&mut dtable),
            ptr(&dout.0),
            (ptr(&g.offsets), ptr(&g.src_rows), ptr(&g.dst_rows)),
            g.dst_rows.len(),
            dim,
        )
    });
    let mut reference = start;
    cpu::embedding_backward(&mut reference, &dout.1, &ids, dim);
    // f32 sums of at most 4 terms below 4 in another order
    assert_each("embedding_backward", &dtable, &reference, |_| 2e-6);
}

/// scatter_add_rows: dx (bf16 [40, 896]: four blocks of columns) += dout rows at rows with a
/// repeat, rounded once.
#[test]
fn scatter_add_rows_adds_into_the_bf16_rows() {
    let (m, dim, rows) = (40, 896, [39u32, 0, 7, 7]);
    let mut r = Rand(11);
    let dout = r.bf16s(rows.len() * dim, 1.0); // [rows, dim]
    let (mut dx, mut reference) = r.bf16s(m * dim, 1.0); // [m, dim]
    let g = RowGroups::new(&rows);
    run_recorded(|k| {
        embedding::scatter_add_rows(
            k,
            ptr_mut(&mut dx),
            ptr(&dout.0),
            (ptr(&g.offsets), ptr(&g.src_rows), ptr(&g.dst_rows)),
            g.dst_rows.len(),
            dim,
        )
    });
    let rows_usize: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
    cpu::scatter_add_rows(&mut reference, &dout.1, &rows_usize, dim);
    assert_rounded("scatter_add_rows", &dx, &reference);
}

// ----------------------------------------------------------------------------
// optimizer.cu

/// hi + lo of a [hi, lo] pair, in f64.
fn total(pair: &[f32]) -> f64 {
    pair[0] as f64 + pair[1] as f64
}

/// The f64 sums agree to ~1e-15 (only the order differs); a lost partial or an f32 accumulator
/// is off by 1e-7 or more.
fn assert_same_sum(what: &str, got: &[f32], want: &[f32]) {
    let (g, w) = (total(got), total(want));
    assert!(
        (g - w).abs() <= 1e-12 * w.abs(),
        "{what}: {g:e} where the reference has {w:e}"
    );
}

/// Σ x² by `optimizer::sum_squares` for n = 1000 (most blocks empty) and
/// n = 2 · 1024 · 256 + 1001 (three grid-stride rounds, the last one ragged).
#[test]
fn sum_squares_matches_the_cpu_f64_sum() {
    for n in [
        1000,
        2 * SUM_SQUARES_BLOCKS * SUM_SQUARES_THREADS as usize + 1001,
    ] {
        let mut r = Rand(12);
        let x: Vec<f32> = (0..n).map(|_| r.next() * 1e-3).collect();
        let mut partials = vec![f64::NAN; SUM_SQUARES_BLOCKS];
        let mut out = vec![f32::NAN; 2]; // [hi, lo]
        run_recorded(|k| {
            opt::sum_squares(k, ptr_mut(&mut out), ptr(&x), n, ptr_mut(&mut partials))
        });
        let mut reference = vec![0.0; 2];
        cpu::sum_squares(&mut reference, &x);
        assert_same_sum(&format!("sum_squares n {n}"), &out, &reference);
    }
}

/// column_sums of x [600, 5] (each block's 256 threads take 2 or 3 rows).
#[test]
fn column_sums_match_the_cpu_f64_sums() {
    let (rows, cols) = (600, 5);
    let mut r = Rand(13);
    let x: Vec<f32> = (0..rows * cols).map(|_| r.next()).collect();
    let mut out = vec![f32::NAN; 2 * cols]; // [cols, 2]
    run_recorded(|k| opt::column_sums(k, ptr_mut(&mut out), ptr(&x), rows, cols));
    let mut reference = vec![0.0; 2 * cols];
    cpu::column_sums(&mut reference, &x, cols);
    for j in 0..cols {
        let pair = 2 * j..2 * j + 2;
        assert_same_sum(
            &format!("column_sums column {j}"),
            &out[pair.clone()],
            &reference[pair],
        );
    }
}

/// adamw_step at step t = 5 (bias corrections 1/(1 − β^5)) with weight decay 0.1 and clipping
/// (grad_scale 0.5) over n = 1001 (four blocks, the last partial): master, m and v within 2 f32
/// ulps of the CPU (the same f32 expression, FMA-contracted on a GPU), params = bf16(master).
#[test]
fn adamw_step_matches_the_cpu_update_within_f32_rounding() {
    let n = 1001;
    let mut adamw = AdamW::new(n, 0.9, 0.999, 1e-8, 0.1);
    adamw.t = 4;
    let step = adamw.next_step(1e-3, 0.5);
    let mut r = Rand(14);
    let mut uniform = |scale: f32| -> Vec<f32> { (0..n).map(|_| r.next() * scale).collect() };
    let master_start = uniform(0.05);
    let m_start = uniform(1e-3);
    let v_start: Vec<f32> = uniform(1e-3).iter().map(|x| x * x).collect();
    let grads = uniform(2e-3);

    let mut params = vec![0xffffu16; n];
    let (mut master, mut m, mut v) = (master_start.clone(), m_start.clone(), v_start.clone());
    run_recorded(|k| {
        opt::adamw_step(
            k,
            ptr_mut(&mut params),
            ptr_mut(&mut master),
            ptr_mut(&mut m),
            ptr_mut(&mut v),
            ptr(&grads),
            n,
            &step,
        )
    });

    let mut params_ref = vec![0.0; n];
    let (mut master_ref, mut m_ref, mut v_ref) = (master_start, m_start, v_start);
    cpu::adamw_step(
        &mut params_ref,
        &mut master_ref,
        &mut m_ref,
        &mut v_ref,
        &grads,
        &step,
    );
    let two_ulps = |w: f32| 2.0 * f32::EPSILON * w.abs();
    assert_each("master", &master, &master_ref, two_ulps);
    assert_each("m", &m, &m_ref, two_ulps);
    assert_each("v", &v, &v_ref, two_ulps);
    assert_same("params must be bf16(master)", &params, &to_bits(&master));
}

// ----------------------------------------------------------------------------
// attention.cu

/// `attention::attention_forward` on `runs`: (slot, first position, tokens) in batch order;
/// every cache row random, also past the positions a token may see, so a key the causal mask
/// should hide changes the result. V starts 2 bytes off alignment when `misaligned_v` (the value
/// phase's scalar path); lse is not asked for (a null pointer) unless `with_lse`.
fn check_attention(
    seed: u64,
    (heads, kv_heads, d): (usize, usize, usize),
    capacity: usize,
    runs: &[(u32, u32, u32)],
    misaligned_v: bool,
    with_lse: bool,
) {
    let mut place = TokenPlacement::default();
    for &(slot, first, len) in runs {
        place.slots.extend(std::iter::repeat_n(slot, len as usize));
        place.positions.extend(first..first + len);
    }
    let m = place.slots.len();
    let slots = runs.iter().map(|r| r.0 as usize + 1).max().unwrap();
    let mut r = Rand(seed);
    let q = r.bf16s(m * heads * d, 1.0); // [m, heads * d]
    let cache_k = r.bf16s(slots * capacity * kv_heads * d, 1.0); // [slots, capacity, kv_heads * d]
    let cache_v = r.bf16s(slots * capacity * kv_heads * d, 1.0);
    let (kd, vd) = (
        Bf16Buf::new(&cache_k.0, false),
        Bf16Buf::new(&cache_v.0, misaligned_v),
    );
    let mut out = vec![0xffffu16; m * heads * d]; // [m, heads * d]
    let mut lse = vec![f32::NAN; m * heads]; // [m, heads]
    let lse_ptr = if with_lse { ptr_mut(&mut lse) } else { 0 };
    run_recorded(|k| {
        attention::attention_forward(
            k,
            ptr_mut(&mut out),
            lse_ptr,
            ptr(&q.0),
            kd.ptr(),
            vd.ptr(),
            ptr(&place.slots),
            ptr(&place.positions),
            m,
            capacity,
            heads,
            kv_heads,
            d,
        )
    });

    let mut out_ref = vec![0.0; m * heads * d];
    let mut lse_ref = vec![0.0; m * heads];
    cpu::attention_forward(
        &mut out_ref,
        Some(&mut lse_ref),
        &q.1,
        &cache_k.1,
        &cache_v.1,
        &place,
        capacity,
        heads,
        kv_heads,
        d,
    );
    assert_close(&format!("attention d{d} out"), &to_f32(&out), &out_ref);
    if with_lse {
        assert_close(&format!("attention d{d} lse"), &lse, &lse_ref);
    } else {
        assert!(lse.iter().all(|x| x.is_nan()), "lse written though null");
    }
}

/// Prefill, head dim 40 (128-bit path: 25 groups of 5 threads, 3 idle), 6 query heads on 2 KV
/// heads: 20 tokens from position 0 and 20 from 120 (crossing the 128-key chunk), lse asked for.
#[test]
fn attention_prefill_with_gqa_across_key_chunks_matches_the_cpu_d40() {
    check_attention(
        15,
        (6, 2, 40),
        160,
        &[(0, 0, 20), (1, 120, 20)],
        false,
        true,
    );
}

/// Decode (one token per sequence at positions 5, 300, 0 and 129: 1 to 3 key chunks; slots not
/// in batch order), head dim 96 (12 threads per group), 4 query heads on one KV head.
#[test]
fn attention_decode_with_one_kv_head_matches_the_cpu_d96() {
    let runs = [(2, 5, 1), (0, 300, 1), (3, 0, 1), (1, 129, 1)];
    check_attention(16, (4, 1, 96), 320, &runs, false, true);
}

/// Head dim 130 (not a multiple of 8: scalar K and V, each thread owning dims d and d + 128),
/// a 10-token chunk from position 3 beside a decode token at 140; no lse.
#[test]
fn attention_scalar_path_with_two_dims_per_thread_matches_the_cpu_d130() {
    check_attention(
        17,
        (2, 2, 130),
        150,
        &[(1, 3, 10), (0, 140, 1)],
        false,
        false,
    );
}

/// Head dim 40 with V 2 bytes off alignment: 128-bit K loads, scalar V (2 groups of 64 threads).
#[test]
fn attention_with_unaligned_values_matches_the_cpu_d40() {
    check_attention(18, (4, 2, 40), 140, &[(0, 0, 9), (1, 133, 1)], true, true);
}
