//! The SwiGLU activation of the MLP: silu(gate) · up.

use super::ELEMENTS_PER_TASK;
use crate::exp::exp_in_place;
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
            // exp(−gate) first, in out.
            o.iter_mut().zip(g).for_each(|(o, g)| *o = -g);
            exp_in_place(o);
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + *o) * u;
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
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(dup.par_chunks_mut(ELEMENTS_PER_TASK))
        .enumerate()
        .for_each(|(chunk, (dg, du))| {
            let at = chunk * ELEMENTS_PER_TASK..chunk * ELEMENTS_PER_TASK + dg.len();
            let (dout, gate, up) = (&dout[at.clone()], &gate[at.clone()], &up[at]);
            // exp(−gate) first, in dgate.
            dg.iter_mut().zip(gate).for_each(|(e, g)| *e = -g);
            exp_in_place(dg);
            for (i, (dg, du)) in dg.iter_mut().zip(du).enumerate() {
                let (g, s) = (gate[i], 1.0 / (1.0 + *dg));
                *dg = dout[i] * up[i] * s * (1.0 + g * (1.0 - s));
                *du = dout[i] * g * s;
            }
        });
}
