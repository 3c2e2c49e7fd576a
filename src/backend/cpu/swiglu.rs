//! The SwiGLU activation of the MLP: silu(gate) · up, from the gate and up projections' one
//! product (each row gate's, then up's).

use super::ELEMENTS_PER_TASK;
use crate::exp::exp_in_place;
use rayon::prelude::*;

/// Rows of `inter` values one task takes (about ELEMENTS_PER_TASK values, at least one row).
fn rows_per_task(inter: usize) -> usize {
    (ELEMENTS_PER_TASK / inter.max(1)).max(1)
}

/// gate_up: [M, 2 I] (each row gate's, then up's); out: [M, I].
pub fn swiglu_forward(out: &mut [f32], gate_up: &[f32], inter: usize) {
    assert!(
        inter > 0 && out.len().is_multiple_of(inter) && gate_up.len() == 2 * out.len(),
        "swiglu_forward: gate_up is not [M, 2 I] for out: [M, I]"
    );
    let rows = rows_per_task(inter);
    out.par_chunks_mut(rows * inter)
        .zip(gate_up.par_chunks(2 * rows * inter))
        .for_each(|(out, gate_up)| {
            for (o, gu) in out
                .chunks_exact_mut(inter)
                .zip(gate_up.chunks_exact(2 * inter))
            {
                let (g, u) = gu.split_at(inter);
                // exp(−gate) first, in out.
                o.iter_mut().zip(g).for_each(|(o, g)| *o = -g);
                exp_in_place(o);
                for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + *o) * u;
                }
            }
        });
}

/// Backward of `swiglu_forward`: with σ = sigmoid(gate),
/// dgate = dout · up · σ · (1 + gate · (1 − σ)),  dup = dout · gate · σ, into d_gate_up
/// (overwritten) laid out as gate_up: [M, 2 I]; dout: [M, I].
pub fn swiglu_backward(d_gate_up: &mut [f32], dout: &[f32], gate_up: &[f32], inter: usize) {
    assert!(
        inter > 0
            && dout.len().is_multiple_of(inter)
            && gate_up.len() == 2 * dout.len()
            && d_gate_up.len() == gate_up.len(),
        "swiglu_backward: gate_up and d_gate_up are not [M, 2 I] for dout: [M, I]"
    );
    let rows = rows_per_task(inter);
    d_gate_up
        .par_chunks_mut(2 * rows * inter)
        .zip(dout.par_chunks(rows * inter))
        .zip(gate_up.par_chunks(2 * rows * inter))
        .for_each(|((d_gate_up, dout), gate_up)| {
            let rows = d_gate_up
                .chunks_exact_mut(2 * inter)
                .zip(dout.chunks_exact(inter))
                .zip(gate_up.chunks_exact(2 * inter));
            for ((dgu, dout), gu) in rows {
                let ((dg, du), (gate, up)) = (dgu.split_at_mut(inter), gu.split_at(inter));
                // exp(−gate) first, in dgate.
                dg.iter_mut().zip(gate).for_each(|(e, g)| *e = -g);
                exp_in_place(dg);
                for (i, (dg, du)) in dg.iter_mut().zip(du).enumerate() {
                    let (g, s) = (gate[i], 1.0 / (1.0 + *dg));
                    *dg = dout[i] * up[i] * s * (1.0 + g * (1.0 - s));
                    *du = dout[i] * g * s;
                }
            }
        });
}
