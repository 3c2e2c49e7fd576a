//! The SwiGLU activation of the MLP: silu(gate) · up.

use super::ELEMENTS_PER_TASK;
use rayon::prelude::*;

/// gate, up, out: [M, I].
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "swiglu_forward: size mismatch"
    );
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(
            gate.par_chunks(ELEMENTS_PER_TASK)
                .zip(up.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|(o, (g, u))| {
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
}

/// Backward of `swiglu_forward`: with σ = sigmoid(gate),
/// dgate = dout · up · σ · (1 + gate · (1 − σ)),  dup = dout · gate · σ. Outputs are overwritten.
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    let n = dout.len();
    assert!(
        dgate.len() == n && dup.len() == n && gate.len() == n && up.len() == n,
        "swiglu_backward: size mismatch"
    );
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let g = gate[i];
            let s = 1.0 / (1.0 + (-g).exp());
            *dg = dout[i] * up[i] * s * (1.0 + g * (1.0 - s));
            *du = dout[i] * g * s;
        });
}
