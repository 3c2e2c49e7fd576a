//! out = x · wᵀ + bias, with weights in the PyTorch `Linear` layout [N, K].

use super::product::{product_into, Strided, Threads};
use crate::backend::GradWrite;

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
    assert_shape(x, m, k, "matmul_forward: x is not [M, K]");
    assert_shape(w, n, k, "matmul_forward: w is not [N, K]");
    assert_shape(out, m, n, "matmul_forward: out is not [M, N]");
    if few_rows_kernel(m) {
        #[cfg(target_arch = "x86_64")]
        super::matmul_few_rows::matmul_few_rows(out, x, w, m, k, n);
    } else {
        let (x, w) = (Strided::rows(x, m, k), Strided::rows(w, n, k));
        product_into(out, false, 1.0, x, w.t(), Threads::Pool);
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "matmul_forward: bias is not [N]");
        add_bias_rows(out, b);
    }
}

/// Panics with `what` unless t holds exactly [rows, cols]; the product is checked, since a
/// wrapped size would let a wrong shape pass.
fn assert_shape(t: &[f32], rows: usize, cols: usize, what: &str) {
    assert_eq!(Some(t.len()), rows.checked_mul(cols), "{what}");
}

/// Whether `matmul_few_rows` takes a product with m rows of x on this CPU.
fn few_rows_kernel(m: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        m <= super::matmul_few_rows::MAX_ROWS && super::matmul_few_rows::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = m;
        false
    }
}

/// x[r, :] += bias for every row r of x: [M, bias.len()].
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
}

/// Backward of `matmul_forward` without the bias: dx += dout · w (dx = dout · w with
/// `GradWrite::Overwrite`), dw += doutᵀ · x. dout: [M, N]; x, dx: [M, K]; w, dw: [N, K].
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dx: Option<&mut [f32]>,
    dx_write: GradWrite,
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_shape(dout, m, n, "matmul_backward: dout is not [M, N]");
    assert_shape(x, m, k, "matmul_backward: x is not [M, K]");
    assert_shape(w, n, k, "matmul_backward: w is not [N, K]");
    assert_shape(dw, n, k, "matmul_backward: dw is not [N, K]");
    let (dout, w, x) = (
        Strided::rows(dout, m, n),
        Strided::rows(w, n, k),
        Strided::rows(x, m, k),
    );
    if let Some(dx) = dx {
        assert_shape(dx, m, k, "matmul_backward: dx is not [M, K]");
        // dx[M, K] (+)= dout[M, N] · w[N, K]; overwriting never reads dx.
        product_into(dx, dx_write == GradWrite::Add, 1.0, dout, w, Threads::Pool);
    }
    // dw[N, K] += doutᵀ[N, M] · x[M, K]
    product_into(dw, true, 1.0, dout.t(), x, Threads::Pool);
}

/// The bias part of `matmul_backward`: dbias += Σ_rows dout.  dout: [M, N]; dbias: [N].
pub fn bias_backward(dbias: &mut [f32], dout: &[f32]) {
    let n = dbias.len();
    assert_eq!(dout.len() % n, 0, "bias_backward: dout is not [M, N]");
    for row in dout.chunks_exact(n) {
        dbias.iter_mut().zip(row).for_each(|(d, g)| *d += g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_product_overwrites_dx_with_zeros_and_adds_nothing() {
        let (m, k) = (2, 3);
        let mut dx = vec![f32::NAN; m * k];
        matmul_backward(
            Some(&mut dx),
            GradWrite::Overwrite,
            &mut [],
            &[],
            &[1.0; 6],
            &[],
            m,
            k,
            0,
        );
        assert_eq!(dx, vec![0.0; m * k]);
        let mut dx = vec![0.5; m * k];
        matmul_backward(
            Some(&mut dx),
            GradWrite::Add,
            &mut [],
            &[],
            &[1.0; 6],
            &[],
            m,
            k,
            0,
        );
        assert_eq!(dx, vec![0.5; m * k]);
    }
}
