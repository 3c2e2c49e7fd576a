//! The optimizer's ops: the sum of squares behind the global gradient norm, the AdamW update of
//! the f32 master weights that also writes the weights the model computes with, and the
//! fixed-order column sums that reduce the loss statistics.

use crate::optim::AdamWStep;

/// Σ x² accumulated in f64 in index order, returned as two f32 whose sum is the f64 total to
/// ~48 bits (a backend buffer holds f32): out = [hi, lo].
pub fn sum_squares(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), 2, "sum_squares: out must hold [hi, lo]");
    let total: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    split_f64(out, total);
}

/// out[2j..2j + 2] = [hi, lo] of Σ_r x[r, j], accumulated in f64 in row order.
/// x: [R, cols]; out: [cols, 2].
pub fn column_sums(out: &mut [f32], x: &[f32], cols: usize) {
    assert!(
        cols > 0 && out.len() == 2 * cols && x.len().is_multiple_of(cols),
        "column_sums: x is not [R, {cols}] or out is not [{cols}, 2]"
    );
    for (j, o) in out.chunks_exact_mut(2).enumerate() {
        let total: f64 = x.iter().skip(j).step_by(cols).map(|&v| v as f64).sum();
        split_f64(o, total);
    }
}

/// Writes `value` as hi = f32(value), lo = f32(value − hi).
pub fn split_f64(out: &mut [f32], value: f64) {
    let hi = value as f32;
    out[0] = hi;
    out[1] = (value - hi as f64) as f32;
}

/// One AdamW update of every element (see [`AdamWStep::update`]); params receive the new master
/// weights (the CPU computes in f32, so they are equal).  All [N].
pub fn adamw_step(
    params: &mut [f32],
    master: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grads: &[f32],
    step: &AdamWStep,
) {
    let n = master.len();
    assert!(
        params.len() == n && m.len() == n && v.len() == n && grads.len() == n,
        "adamw_step: params, master, m, v and grads must have the same length"
    );
    for ((((p, w), &g), m), v) in params
        .iter_mut()
        .zip(master.iter_mut())
        .zip(grads)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
    {
        step.update(w, g, m, v);
        *p = *w;
    }
}
