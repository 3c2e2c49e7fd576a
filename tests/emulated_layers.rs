//! The layer kernels' real source (kernels/rmsnorm.cu, kernels/elementwise.cu,
//! kernels/kv_cache.cu), run on the CPU by the emulator in tests/cuda_emulator through
//! thinkshort's own launchers (src/cuda/ops/{rmsnorm,elementwise,kv_cache}.rs: the kernel each
//! picks, its grid and block, argument order and kinds, the partial-sum scratch), against the CPU
//! reference (`backend::cpu`): the 16-byte vector paths and their scalar fallbacks (lengths not a
//! multiple of 8, misaligned pointers, RMSNorm rows beyond the vector kernel), the n % 8 tails of
//! the flat kernels, RMSNorm backward blocks of several rows, both `GradWrite` modes, and the
//! fixed-order dweight / dbias reduction (per-block partial sums, then add_column_sums) end to end.
//! The kernels choose their vector path themselves; each test also checks that the launcher sized
//! the grid for the path the test means to take.
//!
//! Outputs start as NaN (0xffff in bf16) and are followed by GUARD more, so an element left
//! unwritten or written past the end shows. Copies, additions and conversions must match the
//! reference (rounded once to bf16) bit for bit, SwiGLU to one bf16 unit in the last place (an
//! fma or another expf may flip a rounding); RMSNorm within TOL (the kernel rounds twice, as
//! transformers does) and the f32 parameter gradients within F32_TOL (sums in another order).

mod emulation_support;

use cudarc::driver::LaunchConfig;
use emulation_support::{
    assert_close, assert_launches, ptr, ptr_mut, rel_err, run_recorded, to_bits, to_f32, Rand,
};
use half::bf16;
use thinkshort::backend::{cpu, GradWrite, TokenPlacement};
use thinkshort::cuda::launch::grid_1d;
use thinkshort::cuda::ops::elementwise::{
    self as ew, flat_config, rows_config, BF16_VEC, BLOCK_THREADS,
};
use thinkshort::cuda::ops::kv_cache;
use thinkshort::cuda::ops::rmsnorm as rn;

const EPS: f32 = 1e-6;
/// bf16 NaN, the fill of bf16 outputs.
const NAN16: u16 = 0xffff;
/// Values after each output that the kernel must leave alone.
const GUARD: usize = 8;
/// Relative error of f32 sums taken in another order than the reference's (whose own sums of
/// thousands of terms are good to about 1e-6).
const F32_TOL: f64 = 1e-4;

/// The bits of an output value, to compare fills (NaN included) exactly.
trait Bits: Copy {
    fn bits(self) -> u32;
}
impl Bits for u16 {
    fn bits(self) -> u32 {
        self.into()
    }
}
impl Bits for u32 {
    fn bits(self) -> u32 {
        self
    }
}
impl Bits for f32 {
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

/// `values` followed by GUARD copies of `fill`.
fn guarded<T: Copy>(mut values: Vec<T>, fill: T) -> Vec<T> {
    values.extend([fill; GUARD]);
    values
}

/// `buf` without its guard, after checking that the guard still holds `fill`.
fn unguarded<'a, T: Bits>(what: &str, buf: &'a [T], fill: T) -> &'a [T] {
    let n = buf.len() - GUARD;
    assert!(
        buf[n..].iter().all(|v| v.bits() == fill.bits()),
        "{what}: written past its end"
    );
    &buf[..n]
}

fn assert_bits_eq<T: Bits + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let wrong: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].bits() != want[i].bits())
        .collect();
    if let Some(&i) = wrong.first() {
        panic!(
            "{what}: {} of {} values differ, the first at {i}: {:?}, expected {:?}",
            wrong.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Each bf16 of `got` is `want` rounded to bf16, give or take one unit in the last place.
fn assert_rounded(what: &str, got: &[u16], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = bf16::from_bits(g).to_f32();
        let ulp = f32::from_bits(w.abs().to_bits() & 0x7f80_0000) / 128.0;
        assert!(
            (g - w).abs() <= ulp,
            "{what}[{i}]: {g}, expected {w} rounded to bf16"
        );
    }
}

fn assert_f32_close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    assert!(
        e < F32_TOL,
        "{what}: relative error {e:.3e} (tolerance {F32_TOL:.0e})"
    );
}

/// An input copied `offset` elements into its buffer: offset 1 puts it 2 bytes off the 16-byte
/// alignment of a fresh buffer, which sends the kernels down their scalar path.
struct Shifted {
    buf: Vec<u16>,
    offset: usize,
}

impl Shifted {
    fn new(values: &[u16], offset: usize) -> Self {
        let mut buf = vec![0x3f80; offset]; // 1.0
        buf.extend_from_slice(values);
        Shifted { buf, offset }
    }

    fn ptr(&self) -> u64 {
        ptr(&self.buf[self.offset..])
    }
}

// ----------------------------------------------------------------------------------------------
// RMSNorm forward

/// rmsnorm_forward's grid: a block per row, about one vector (or one column on the scalar path)
/// per thread.
fn forward_config(rows: usize, dim: usize, vector_path: bool) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (rn::row_block_size(dim, BF16_VEC, vector_path), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `rmsnorm::rmsnorm_forward` of [rows, dim] (into x itself when `in_place`); `vector_path`:
/// whether the launcher must size the grid for the 128-bit path.
fn check_rmsnorm_forward(seed: u64, rows: usize, dim: usize, in_place: bool, vector_path: bool) {
    let mut r = Rand(seed);
    let (x_bits, x) = r.bf16s(rows * dim, 2.0);
    let weight = r.bf16s(dim, 1.0); // [dim]
    let mut x_dev = guarded(x_bits, NAN16); // [rows, dim]
    let mut out = guarded(vec![NAN16; rows * dim], NAN16); // [rows, dim]
    let xp = ptr_mut(&mut x_dev);
    let op = if in_place { xp } else { ptr_mut(&mut out) };
    let launches = run_recorded(|k| rn::rmsnorm_forward(k, op, xp, ptr(&weight.0), rows, dim, EPS));
    assert_launches(
        &launches,
        &["rmsnorm_forward"],
        forward_config(rows, dim, vector_path),
    );
    let mut want = vec![0.0; rows * dim];
    cpu::rmsnorm_forward(&mut want, &x, &weight.1, dim, EPS);
    let got = if in_place { &x_dev } else { &out };
    assert_close(
        &format!("rmsnorm_forward [{rows}, {dim}]"),
        &to_f32(unguarded("rmsnorm_forward", got, NAN16)),
        &want,
    );
}

/// 896 (Qwen2.5-0.5B): 112 vectors on 128 threads, 16 of them idle; 40 rows, 40 blocks.
#[test]
fn rmsnorm_forward_vector_path_matches_the_cpu() {
    check_rmsnorm_forward(1, 40, 896, false, true);
}

/// Qwen3's norm over each head of q: rows of head_dim 128 (16 vectors, half a warp) and 64, one
/// row per head of every token.
#[test]
fn rmsnorm_forward_over_heads_matches_the_cpu() {
    check_rmsnorm_forward(4, 3 * 16, 128, false, true);
    check_rmsnorm_forward(5, 7 * 4, 64, false, true);
}

/// 897 columns (not a multiple of 8): scalar loads on 928 threads, one column each.
#[test]
fn rmsnorm_forward_scalar_path_matches_the_cpu() {
    check_rmsnorm_forward(2, 12, 897, false, false);
}

/// out = x, which the kernel allows: [8, 904] on the vector path.
#[test]
fn rmsnorm_forward_in_place_matches_the_cpu() {
    check_rmsnorm_forward(3, 8, 904, true, true);
}

/// x += residual (stored in x, rounded once), then out = rmsnorm(x); `shift` misaligns residual
/// alone (the scalar path).
fn check_add_rmsnorm_forward(seed: u64, rows: usize, dim: usize, shift: bool, vector_path: bool) {
    let mut r = Rand(seed);
    let (x_bits, x) = r.bf16s(rows * dim, 2.0);
    let residual = r.bf16s(rows * dim, 2.0); // [rows, dim]
    let residual_dev = Shifted::new(&residual.0, shift as usize);
    let weight = r.bf16s(dim, 1.0); // [dim]
    let mut x_dev = guarded(x_bits, NAN16); // [rows, dim]
    let mut out = guarded(vec![NAN16; rows * dim], NAN16); // [rows, dim]
    let launches = run_recorded(|k| {
        rn::add_rmsnorm_forward(
            k,
            ptr_mut(&mut out),
            ptr_mut(&mut x_dev),
            residual_dev.ptr(),
            ptr(&weight.0),
            rows,
            dim,
            EPS,
        )
    });
    assert_launches(
        &launches,
        &["add_rmsnorm_forward"],
        forward_config(rows, dim, vector_path),
    );
    let mut sum = x;
    cpu::residual_add(&mut sum, &residual.1);
    let sum_bits = to_bits(&sum);
    assert_bits_eq(
        &format!("add_rmsnorm_forward x + residual [{rows}, {dim}]"),
        unguarded("add_rmsnorm_forward x", &x_dev, NAN16),
        &sum_bits,
    );
    // the norm of the sum as stored (bf16)
    let mut want = vec![0.0; rows * dim];
    cpu::rmsnorm_forward(&mut want, &to_f32(&sum_bits), &weight.1, dim, EPS);
    assert_close(
        &format!("add_rmsnorm_forward out [{rows}, {dim}]"),
        &to_f32(unguarded("add_rmsnorm_forward out", &out, NAN16)),
        &want,
    );
}

/// [24, 896] on the vector path; [10, 300] on the scalar one, and [24, 896] with only residual
/// misaligned.
#[test]
fn add_rmsnorm_forward_stores_the_sum_and_normalises_it_like_the_cpu() {
    check_add_rmsnorm_forward(4, 24, 896, false, true);
    check_add_rmsnorm_forward(5, 10, 300, false, false);
    check_add_rmsnorm_forward(6, 24, 896, true, false);
}

// ----------------------------------------------------------------------------------------------
// RMSNorm backward: dx, and dweight through the blocks' partial sums and add_column_sums

/// `rmsnorm::rmsnorm_backward` on [rows, dim]: the kernel the launcher picks (`vec_kernel` says
/// which one that must be), on its grid of rows_per_block(rows) rows per block, then
/// add_column_sums into a dweight that starts from random values.
fn check_rmsnorm_backward(seed: u64, rows: usize, dim: usize, write: GradWrite, vec_kernel: bool) {
    let mut r = Rand(seed);
    let x = r.bf16s(rows * dim, 2.0); // [rows, dim]
    let dout = r.bf16s(rows * dim, 1.0); // [rows, dim]
    let weight = r.bf16s(dim, 1.0); // [dim]
    let dx_start = r.bf16s(rows * dim, 1.0);
    let dweight_start: Vec<f32> = (0..dim).map(|_| r.next()).collect();
    let accumulate = write == GradWrite::Add;

    let per_block = rn::rows_per_block(rows);
    let blocks = rows.div_ceil(per_block);
    let scratch = rn::rmsnorm_backward_scratch(rows, dim);
    assert_eq!(scratch, blocks * dim);
    let mut dx = guarded(
        if accumulate {
            dx_start.0.clone()
        } else {
            vec![NAN16; rows * dim]
        },
        NAN16,
    ); // [rows, dim]
    let mut partials = guarded(vec![f32::NAN; scratch], f32::NAN); // [blocks, dim]
    let mut dweight = guarded(dweight_start.clone(), f32::NAN); // [dim]
    let launches = run_recorded(|k| {
        rn::rmsnorm_backward(
            k,
            (ptr_mut(&mut dx), accumulate),
            ptr_mut(&mut dweight),
            ptr(&dout.0),
            ptr(&x.0),
            ptr(&weight.0),
            rows,
            dim,
            EPS,
            ptr_mut(&mut partials),
        )
    });
    // a thread per vector, or per column with the block's dweight sums in shared memory
    let (kernel, block, shared) = if vec_kernel {
        let block = rn::row_block_size(dim, BF16_VEC, true);
        ("rmsnorm_backward_vec", block, 0)
    } else {
        (
            "rmsnorm_backward",
            rn::row_block_size(dim, 1, false),
            dim * 4,
        )
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    assert_launches(&launches, &[kernel, "add_column_sums"], cfg);
    unguarded("partials", &partials, f32::NAN);

    let mut dx_want = if accumulate {
        dx_start.1
    } else {
        vec![f32::NAN; rows * dim]
    };
    let mut dweight_want = dweight_start;
    cpu::rmsnorm_backward(
        &mut dx_want,
        write,
        &mut dweight_want,
        &dout.1,
        &x.1,
        &weight.1,
        dim,
        EPS,
    );
    let what = format!("{kernel} [{rows}, {dim}] ({write:?}, {per_block} rows per block)");
    assert_close(
        &format!("{what} dx"),
        &to_f32(unguarded("dx", &dx, NAN16)),
        &dx_want,
    );
    assert_f32_close(
        &format!("{what} dweight"),
        unguarded("dweight", &dweight, f32::NAN),
        &dweight_want,
    );
}

/// [40, 896]: 112 vectors on 128 threads, one row per block, 40 partial sums.
#[test]
fn rmsnorm_backward_vec_overwrites_dx_and_adds_dweight_like_the_cpu() {
    check_rmsnorm_backward(10, 40, 896, GradWrite::Overwrite, true);
}

/// The same shape, dx added to (GradWrite::Add).
#[test]
fn rmsnorm_backward_vec_adds_to_dx_and_dweight_like_the_cpu() {
    check_rmsnorm_backward(11, 40, 896, GradWrite::Add, true);
}

/// 2049 rows: two per block (1025 blocks, the last with one row), so dweight sums rows in
/// registers, the reduction scratch is reused row after row, and add_column_sums sums 1025
/// partials (33 per lane); dim 392: 49 vectors on two warps, the second with 15 idle lanes.
#[test]
fn rmsnorm_backward_vec_with_several_rows_per_block_matches_the_cpu() {
    check_rmsnorm_backward(12, 2049, 392, GradWrite::Overwrite, true);
}

/// Qwen3's per-head norms backward: 3000 rows of head_dim 128 (many rows per block, dweight
/// summed over every head of every token) and 1100 of 64, overwriting dx (the projection's
/// gradient).
#[test]
fn rmsnorm_backward_vec_over_heads_matches_the_cpu() {
    check_rmsnorm_backward(18, 3000, 128, GradWrite::Overwrite, true);
    check_rmsnorm_backward(19, 1100, 64, GradWrite::Overwrite, true);
}

/// dim 8192, the vector kernel's widest row: 1024 threads.
#[test]
fn rmsnorm_backward_vec_at_its_widest_row_matches_the_cpu() {
    check_rmsnorm_backward(13, 3, rn::VEC_KERNEL_MAX_DIM, GradWrite::Overwrite, true);
}

/// dim 897 (not a multiple of 8): the scalar kernel, 928 threads, in both modes.
#[test]
fn rmsnorm_backward_scalar_matches_the_cpu_in_both_modes() {
    check_rmsnorm_backward(14, 12, 897, GradWrite::Overwrite, false);
    check_rmsnorm_backward(15, 12, 897, GradWrite::Add, false);
}

/// 2049 rows of 36 (two warps): two rows per block through the shared dweight sums, the two
/// reductions' scratch reused row after row.
#[test]
fn rmsnorm_backward_scalar_with_several_rows_per_block_matches_the_cpu() {
    check_rmsnorm_backward(16, 2049, 36, GradWrite::Add, false);
}

/// dim 8200 (a multiple of 8 past the vector kernel): the scalar kernel on 1024 threads, 8 or 9
/// columns each.
#[test]
fn rmsnorm_backward_scalar_beyond_the_vector_kernel_matches_the_cpu() {
    check_rmsnorm_backward(17, 3, rn::VEC_KERNEL_MAX_DIM + 8, GradWrite::Add, false);
}

// ----------------------------------------------------------------------------------------------
// bias backward: bias_backward_partial, then add_column_sums

/// `elementwise::bias_backward` on dout [m, n] into a dbias that starts from random values.
fn check_bias_backward(seed: u64, m: usize, n: usize) {
    let mut r = Rand(seed);
    let dout = r.bf16s(m * n, 1.0); // [m, n]
    let dbias_start: Vec<f32> = (0..n).map(|_| r.next()).collect();
    let chunks = m.div_ceil(ew::BIAS_ROWS_PER_THREAD);
    let scratch = ew::bias_backward_scratch(m, n);
    assert_eq!(scratch, chunks * n);
    let mut partials = guarded(vec![f32::NAN; scratch], f32::NAN); // [chunks, n]
    let mut dbias = guarded(dbias_start.clone(), f32::NAN); // [n]
    let launches = run_recorded(|k| {
        ew::bias_backward(
            k,
            ptr_mut(&mut dbias),
            ptr(&dout.0),
            m,
            n,
            ptr_mut(&mut partials),
        )
    });
    // a thread per (column, chunk of rows)
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK_THREADS as usize) as u32, chunks as u32, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    assert_launches(
        &launches,
        &["bias_backward_partial", "add_column_sums"],
        cfg,
    );
    unguarded("partials", &partials, f32::NAN);

    let mut want = dbias_start;
    cpu::bias_backward(&mut want, &dout.1);
    assert_f32_close(
        &format!("bias_backward [{m}, {n}] ({chunks} chunks)"),
        unguarded("dbias", &dbias, f32::NAN),
        &want,
    );
}

/// [8455, 300]: 34 chunks of 256 rows (the last of 7), so two lanes of add_column_sums take two
/// chunks; two blocks of columns, the second with 44. [100, 40]: one chunk.
#[test]
fn bias_backward_adds_the_column_sums_like_the_cpu() {
    check_bias_backward(20, 33 * ew::BIAS_ROWS_PER_THREAD + 7, 300);
    check_bias_backward(21, 100, 40);
}

// ----------------------------------------------------------------------------------------------
// flat kernels

/// residual_add on n values; `shift` misaligns y (the scalar path).
fn check_residual_add(seed: u64, n: usize, shift: bool) {
    let mut r = Rand(seed);
    let (x_bits, x) = r.bf16s(n, 1.0);
    let (y_bits, y) = r.bf16s(n, 1.0);
    let y_dev = Shifted::new(&y_bits, shift as usize);
    let mut x_dev = guarded(x_bits, NAN16);
    let launches = run_recorded(|k| ew::residual_add(k, ptr_mut(&mut x_dev), y_dev.ptr(), n));
    assert_launches(&launches, &["residual_add"], flat_config(n, !shift));
    let mut want = x;
    cpu::residual_add(&mut want, &y);
    assert_bits_eq(
        &format!("residual_add (n {n}, shifted {shift})"),
        unguarded("residual_add", &x_dev, NAN16),
        &to_bits(&want),
    );
}

/// 3587 = 448 vectors (two blocks) + a tail of 3; 1001 misaligned: all scalar.
#[test]
fn residual_add_matches_the_cpu_bit_for_bit() {
    check_residual_add(30, 3587, false);
    check_residual_add(31, 1001, true);
}

/// n gates of scale 4, with the extremes the kernels' comments name: −100 (exp(100) overflows
/// to inf, so sigmoid is 0) in the vectors and the tail, +100 (sigmoid 1) in the tail.
fn gates(r: &mut Rand, n: usize) -> (Vec<u16>, Vec<f32>) {
    let (mut bits, mut values) = r.bf16s(n, 4.0);
    for (i, g) in [(3, -100.0f32), (n - 2, 100.0), (n - 1, -100.0)] {
        bits[i] = bf16::from_f32(g).to_bits();
        values[i] = g;
    }
    (bits, values)
}

/// The gate and up projections' one product for `rows` rows of `width`: gates from [`gates`]
/// (extremes included), ups of scale 1, each row gate's then up's: [rows, 2 width].
fn gate_up(r: &mut Rand, rows: usize, width: usize) -> (Vec<u16>, Vec<f32>) {
    let (gate, up) = (gates(r, rows * width), r.bf16s(rows * width, 1.0));
    let rows_of = |x: &[u16]| x.chunks(width).map(<[u16]>::to_vec).collect::<Vec<_>>();
    let bits: Vec<u16> = rows_of(&gate.0)
        .into_iter()
        .zip(rows_of(&up.0))
        .flat_map(|(g, u)| [g, u].concat())
        .collect();
    let values = to_f32(&bits);
    (bits, values)
}

/// The SwiGLU cases: (seed, rows, width, shift, vector path). 7 rows of 512: 448 vectors on two
/// blocks; rows of 7 (not whole vectors) and the last operand 2 bytes off alignment: scalar.
const SWIGLU_CASES: [(u64, usize, usize, bool, bool); 3] = [
    (32, 7, 512, false, true),
    (33, 5, 7, false, false),
    (34, 3, 64, true, false),
];

/// swiglu_forward from gate_up [rows, 2 width] (shifted off alignment when `shift`).
#[test]
fn swiglu_forward_matches_the_cpu_to_a_bf16_ulp() {
    for (seed, rows, width, shift, vector_path) in SWIGLU_CASES {
        let n = rows * width;
        let gate_up = gate_up(&mut Rand(seed), rows, width);
        let gate_up_dev = Shifted::new(&gate_up.0, shift as usize);
        let mut out = guarded(vec![NAN16; n], NAN16);
        let launches =
            run_recorded(|k| ew::swiglu_forward(k, ptr_mut(&mut out), gate_up_dev.ptr(), n, width));
        assert_launches(&launches, &["swiglu_forward"], flat_config(n, vector_path));
        let mut want = vec![0.0; n];
        cpu::swiglu_forward(&mut want, &gate_up.1, width);
        let what = format!("swiglu_forward ({rows} x {width}, shifted {shift})");
        assert_rounded(&what, unguarded(&what, &out, NAN16), &want);
    }
}

/// swiglu_backward into d_gate_up [rows, 2 width] from dout [rows, width] and gate_up (shifted off
/// alignment when `shift`).
#[test]
fn swiglu_backward_matches_the_cpu_to_a_bf16_ulp() {
    for (seed, rows, width, shift, vector_path) in SWIGLU_CASES {
        let n = rows * width;
        let mut r = Rand(seed);
        let gate_up = gate_up(&mut r, rows, width);
        let dout = r.bf16s(n, 1.0);
        let gate_up_dev = Shifted::new(&gate_up.0, shift as usize);
        let mut d_gate_up = guarded(vec![NAN16; 2 * n], NAN16);
        let launches = run_recorded(|k| {
            ew::swiglu_backward(
                k,
                ptr_mut(&mut d_gate_up),
                ptr(&dout.0),
                gate_up_dev.ptr(),
                n,
                width,
            )
        });
        assert_launches(&launches, &["swiglu_backward"], flat_config(n, vector_path));
        let mut want = vec![0.0; 2 * n];
        cpu::swiglu_backward(&mut want, &dout.1, &gate_up.1, width);
        let what = format!("swiglu_backward ({rows} x {width}, shifted {shift})");
        assert_rounded(&what, unguarded(&what, &d_gate_up, NAN16), &want);
    }
}

/// f32 -> bf16 on 1003 values (125 vectors + a tail of 3), aligned or with src 4 bytes off:
/// round to nearest even (ties both ways), overflow to inf, infinities, NaN and a subnormal
/// among random values, in the vectors and the tail.
fn check_convert_f32_to_bf16(seed: u64, shift: bool) {
    let n = 1003;
    let mut r = Rand(seed);
    let mut src: Vec<f32> = (0..=n).map(|_| r.next() * 4.0).collect();
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,                    // above the largest bf16: inf
        f32::from_bits(0x3f80_8000), // halfway between 1 and its successor: to 1 (even)
        f32::from_bits(0x3f81_8000), // halfway again: up to the even 0x3f82
        f32::from_bits(0xbf80_8000),
        1e-40, // subnormal
    ];
    let src_at = shift as usize;
    for (j, &v) in specials.iter().enumerate() {
        src[src_at + j] = v;
        src[src_at + n - 1 - j % 3] = v;
    }
    let mut dst = guarded(vec![NAN16; n], NAN16);
    let launches =
        run_recorded(|k| ew::convert_f32_to_bf16(k, ptr_mut(&mut dst), ptr(&src[src_at..]), n));
    assert_launches(&launches, &["convert_f32_to_bf16"], flat_config(n, !shift));
    let got = unguarded("convert_f32_to_bf16", &dst, NAN16);
    for (i, (&g, &s)) in got.iter().zip(&src[src_at..]).enumerate() {
        let want = bf16::from_f32(s);
        assert!(
            g == want.to_bits() || (want.is_nan() && bf16::from_bits(g).is_nan()),
            "convert_f32_to_bf16 (shifted {shift})[{i}]: {s:e} gave {g:#06x}, expected {:#06x}",
            want.to_bits()
        );
    }
}

#[test]
fn convert_f32_to_bf16_rounds_to_nearest_even_like_half() {
    check_convert_f32_to_bf16(36, false);
    check_convert_f32_to_bf16(37, true);
}

/// bf16 -> f32 on 1003 values (vectors and a tail of 3) with infinities, NaN and a subnormal;
/// src shifted by one element or not.
fn check_convert_bf16_to_f32(seed: u64, shift: bool) {
    let n = 1003;
    let mut r = Rand(seed);
    let (mut src, _) = r.bf16s(n, 4.0);
    for (j, v) in [0x7f80, 0xff80, 0x7fc0, 0x0001].into_iter().enumerate() {
        src[j] = v;
        src[n - 1 - j % 3] = v;
    }
    let src_dev = Shifted::new(&src, shift as usize);
    let mut dst = guarded(vec![f32::NAN; n], f32::NAN);
    let launches =
        run_recorded(|k| ew::convert_bf16_to_f32(k, ptr_mut(&mut dst), src_dev.ptr(), n));
    assert_launches(&launches, &["convert_bf16_to_f32"], flat_config(n, !shift));
    let want: Vec<f32> = src.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    assert_bits_eq(
        &format!("convert_bf16_to_f32 (shifted {shift})"),
        unguarded("convert_bf16_to_f32", &dst, f32::NAN),
        &want,
    );
}

#[test]
fn convert_bf16_to_f32_is_exact() {
    check_convert_bf16_to_f32(38, false);
    check_convert_bf16_to_f32(39, true);
}

/// `elementwise::bias_add` on [m, n], bf16 and f32 out (starting from random values), against
/// add_bias_rows; `vector_path`: whether the launcher must size the grid for the 128-bit path.
fn check_bias_add(seed: u64, m: usize, n: usize, vector_path: bool) {
    let mut r = Rand(seed);
    let bias = r.bf16s(n, 1.0); // [n]
    let cfg = rows_config(m, n, vector_path);

    let (start_bits, start) = r.bf16s(m * n, 1.0);
    let mut out = guarded(start_bits, NAN16); // bf16 [m, n]
    let launches = run_recorded(|k| ew::bias_add(k, ptr_mut(&mut out), ptr(&bias.0), m, n, false));
    assert_launches(&launches, &["bias_add_bf16"], cfg);
    let mut want = start;
    cpu::add_bias_rows(&mut want, &bias.1);
    assert_bits_eq(
        &format!("bias_add_bf16 [{m}, {n}]"),
        unguarded("bias_add_bf16", &out, NAN16),
        &to_bits(&want),
    );

    let start: Vec<f32> = (0..m * n).map(|_| r.next()).collect();
    let mut out = guarded(start.clone(), f32::NAN); // f32 [m, n]
    let launches = run_recorded(|k| ew::bias_add(k, ptr_mut(&mut out), ptr(&bias.0), m, n, true));
    assert_launches(&launches, &["bias_add_f32"], cfg);
    let mut want = start;
    cpu::add_bias_rows(&mut want, &bias.1);
    assert_bits_eq(
        &format!("bias_add_f32 [{m}, {n}]"),
        unguarded("bias_add_f32", &out, f32::NAN),
        &want,
    );
}

/// [5, 904]: 113 vectors on 128 threads; [3, 2056]: 257 vectors, two blocks of columns;
/// [4, 300]: scalar, two blocks of columns.
#[test]
fn bias_add_bf16_and_f32_match_the_cpu_bit_for_bit() {
    check_bias_add(40, 5, 904, true);
    check_bias_add(41, 3, 2056, true);
    check_bias_add(42, 4, 300, false);
}

// ----------------------------------------------------------------------------------------------
// KV cache

const CACHE_SLOTS: usize = 3;
const CAPACITY: usize = 16;

/// Six tokens scattered over three slots of 16 positions (first and last positions included).
fn placement() -> TokenPlacement {
    TokenPlacement {
        slots: vec![2, 0, 1, 2, 0, 1],
        positions: vec![5, 0, 15, 6, 9, 3],
    }
}

/// kv_cache_write of six tokens into caches of random values; only their rows may change.
fn check_kv_cache_write(seed: u64, kv_dim: usize, vector_path: bool) {
    let place = placement();
    let m = place.slots.len();
    let mut r = Rand(seed);
    let cache_len = CACHE_SLOTS * CAPACITY * kv_dim;
    // [CACHE_SLOTS, CAPACITY, kv_dim]
    let (cache_k_start, cache_v_start) = (r.bf16s(cache_len, 1.0), r.bf16s(cache_len, 1.0));
    let (key, value) = (r.bf16s(m * kv_dim, 1.0), r.bf16s(m * kv_dim, 1.0)); // [m, kv_dim]
    let (mut cache_k, mut cache_v) = (cache_k_start.0, cache_v_start.0);
    let launches = run_recorded(|k| {
        kv_cache::kv_cache_write(
            k,
            ptr_mut(&mut cache_k),
            ptr_mut(&mut cache_v),
            ptr(&key.0),
            ptr(&value.0),
            ptr(&place.slots),
            ptr(&place.positions),
            m,
            CAPACITY,
            kv_dim,
        )
    });
    assert_launches(
        &launches,
        &["kv_cache_write"],
        rows_config(m, kv_dim, vector_path),
    );
    let (mut k_want, mut v_want) = (cache_k_start.1, cache_v_start.1);
    cpu::kv_cache_write(&mut k_want, &key.1, &place, CAPACITY, kv_dim);
    cpu::kv_cache_write(&mut v_want, &value.1, &place, CAPACITY, kv_dim);
    let what = format!("kv_cache_write (kv_dim {kv_dim})");
    assert_bits_eq(&format!("{what} keys"), &cache_k, &to_bits(&k_want));
    assert_bits_eq(&format!("{what} values"), &cache_v, &to_bits(&v_want));
}

/// kv_dim 2056: 257 vectors, two blocks of columns; kv_dim 300: scalar, two blocks.
#[test]
fn kv_cache_write_fills_exactly_the_tokens_rows() {
    check_kv_cache_write(50, 2056, true);
    check_kv_cache_write(51, 300, false);
}

/// kv_cache_gather (always scalar) of six tokens' rows from a cache of random values.
fn check_kv_cache_gather(seed: u64, kv_dim: usize) {
    let place = placement();
    let m = place.slots.len();
    let mut r = Rand(seed);
    let dcache = r.bf16s(CACHE_SLOTS * CAPACITY * kv_dim, 1.0); // [CACHE_SLOTS, CAPACITY, kv_dim]
    let mut dx = guarded(vec![NAN16; m * kv_dim], NAN16); // [m, kv_dim]
    let launches = run_recorded(|k| {
        kv_cache::kv_cache_gather(
            k,
            ptr_mut(&mut dx),
            ptr(&dcache.0),
            ptr(&place.slots),
            ptr(&place.positions),
            m,
            CAPACITY,
            kv_dim,
        )
    });
    assert_launches(
        &launches,
        &["kv_cache_gather"],
        rows_config(m, kv_dim, false),
    );
    let mut want = vec![0.0; m * kv_dim];
    cpu::kv_cache_gather(&mut want, &dcache.1, &place, CAPACITY, kv_dim);
    assert_bits_eq(
        &format!("kv_cache_gather (kv_dim {kv_dim})"),
        unguarded("kv_cache_gather", &dx, NAN16),
        &to_bits(&want),
    );
}

/// kv_dim 300 (two blocks of 256 columns) and 2056 (nine).
#[test]
fn kv_cache_gather_copies_the_tokens_rows() {
    check_kv_cache_gather(52, 300);
    check_kv_cache_gather(53, 2056);
}

/// 300 positions: two blocks of 256, the second partly idle.
#[test]
fn advance_positions_adds_one_to_each_position() {
    let m = 300;
    let start: Vec<u32> = (0..m as u32).map(|i| (i * 37) % 1000 + 1).collect();
    let mut positions = guarded(start.clone(), u32::MAX);
    let launches = run_recorded(|k| kv_cache::advance_positions(k, ptr_mut(&mut positions), m));
    assert_launches(&launches, &["advance_positions"], grid_1d(m, 256));
    let want: Vec<u32> = start.iter().map(|p| p + 1).collect();
    assert_bits_eq(
        "advance_positions",
        unguarded("advance_positions", &positions, u32::MAX),
        &want,
    );
}

/// The emulator refuses the launches cuLaunchKernel refuses (an empty grid, more than 65535
/// blocks in y or z, a block over 64 threads deep), so a launcher that makes one fails here
/// rather than on the GPU.
#[test]
fn the_emulator_refuses_launch_shapes_cuda_refuses() {
    use cuda_emulator::{launch_kernel, Arg, Launch};
    let (mut x, y) = (vec![0u16; 8], vec![0u16; 8]);
    let args = [
        Arg::Pointer(x.as_mut_ptr() as u64),
        Arg::Pointer(y.as_ptr() as u64),
        Arg::Int32(8),
    ];
    let launch = |grid, block| {
        let cfg = Launch {
            grid,
            block,
            shared_bytes: 0,
        };
        // SAFETY: x and y hold the 8 values the kernel touches.
        unsafe { launch_kernel("elementwise", "residual_add", cfg, &args) }
    };
    assert_eq!(launch((1, 1, 1), (256, 1, 1)), Ok(()));
    for grid in [
        (0, 1, 1),
        (1, 0, 1),
        (1, 1, 0),
        (1, 65536, 1),
        (1, 1, 65536),
    ] {
        let refused = launch(grid, (256, 1, 1)).expect_err("a launch CUDA refuses ran");
        assert!(refused.contains("grid must be"), "{grid:?}: {refused}");
    }
    let refused = launch((1, 1, 1), (1, 1, 65)).expect_err("a block 65 threads deep ran");
    assert!(refused.contains("at most 64 in z"), "{refused}");
}
