//! out = x · wᵀ + bias, with weights in the PyTorch `Linear` layout [N, K].

use gemm::{gemm, Parallelism};

/// x: [M, K]; w: [N, K]; bias: [N]; out: [M, N].
pub fn matmul_forward(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(x.len(), m * k, "matmul_forward: x is not [M, K]");
    assert_eq!(w.len(), n * k, "matmul_forward: w is not [N, K]");
    assert_eq!(out.len(), m * n, "matmul_forward: out is not [M, N]");
    let threads = if m * n * k >= 1 << 15 {
        rayon::current_num_threads()
    } else {
        1
    };
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound every access; strides describe row-major x, out and the
    // transpose of row-major w (element (k, n) of wᵀ is w[n * K + k]).
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,          // out column stride
            n as isize, // out row stride
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize, // wᵀ column stride: next n
            1,          // wᵀ row stride: next k
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "matmul_forward: bias is not [N]");
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
}
