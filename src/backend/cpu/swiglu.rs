//! The SwiGLU activation of the MLP: silu(gate) · up.

use rayon::prelude::*;

/// gate, up, out: [M, I].
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "swiglu_forward: size mismatch"
    );
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (g, u))| {
            *o = g / (1.0 + (-g).exp()) * u;
        });
}
