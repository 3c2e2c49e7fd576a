//! The optimizer's ops against the CPU: `sum_squares` (the global gradient norm) and the fused
//! `adamw_step`, at sizes below, at and well above the kernels' fixed grids.

use super::{get, put, put_f32, Checker, TOL_F32};
use crate::backend::cpu::CpuBackend;
use crate::backend::TrainBackend;
use crate::optim::AdamW;
use anyhow::Result;

/// Sums accumulated in f64 on both sides (as [hi, lo] pairs): only the order of the additions
/// differs (~1e-15 relative); a lost partial sum or an f32 accumulator gives 1e-7 or more.
pub const TOL_F64_SUM: f64 = 1e-9;

pub(super) fn checks<D: TrainBackend>(c: &mut Checker<D>) -> Result<()> {
    let cpu = CpuBackend;
    // 3_000_001 elements: eleven grid-stride rounds of the 1024 × 256 threads and a ragged end.
    for n in [1, 1000, 3_000_001] {
        c.check("sum_squares", format!("n={n}"), TOL_F64_SUM, |dev, rand| {
            let (x, x_h) = put_f32(dev, &rand.normal(n, 1e-3))?;
            let (mut out, _) = put_f32(dev, &rand.normal(2, 1.0))?; // overwritten
            dev.sum_squares(dev.full_mut(&mut out), dev.full(&x));
            let mut reference = vec![0.0; 2];
            cpu.sum_squares(&mut reference, &x_h);
            Ok(vec![("", get(dev, &out)?, reference)])
        })?;
    }

    // adamw_step at step t = 5 with clipping (grad_scale 0.5) and weight decay. The update
    // (master after − before, ~lr) gets its own row: it is ~1e-3 of the weights, so an error in
    // it would hide inside the weights' relative error.
    for n in [1, 1000, 3_000_001] {
        c.check(
            "adamw_step",
            format!("n={n} t=5 lr=1e-3 wd=0.1 grad_scale=0.5"),
            TOL_F32,
            |dev, rand| {
                let mut opt = AdamW::new(n, 0.9, 0.999, 1e-8, 0.1);
                opt.t = 4;
                let step = opt.next_step(1e-3, 0.5);
                let (mut params, _) = put(dev, &rand.normal(n, 1.0))?; // overwritten
                let (mut master, before) = put_f32(dev, &rand.normal(n, 0.05))?;
                let (mut m, mut m_ref) = put_f32(dev, &rand.normal(n, 1e-3))?;
                let v_h: Vec<f32> = rand.normal(n, 1e-3).iter().map(|x| x * x).collect();
                let (mut v, mut v_ref) = put_f32(dev, &v_h)?;
                let (grads, grads_h) = put_f32(dev, &rand.normal(n, 2e-3))?;
                dev.adamw_step(
                    dev.full_mut(&mut params),
                    dev.full_mut(&mut master),
                    dev.full_mut(&mut m),
                    dev.full_mut(&mut v),
                    dev.full(&grads),
                    &step,
                );
                let (mut params_ref, mut master_ref) = (vec![0.0; n], before.clone());
                cpu.adamw_step(
                    &mut params_ref,
                    &mut master_ref,
                    &mut m_ref,
                    &mut v_ref,
                    &grads_h,
                    &step,
                );
                let master_out = get(dev, &master)?;
                let delta = |after: &[f32]| -> Vec<f32> {
                    after.iter().zip(&before).map(|(a, b)| a - b).collect()
                };
                let (update, update_ref) = (delta(&master_out), delta(&master_ref));
                // Stored as bf16 on a bf16 device: the reference rounds the same way.
                let params_ref = {
                    let (b, _) = put(dev, &params_ref)?;
                    get(dev, &b)?
                };
                Ok(vec![
                    ("master", master_out, master_ref),
                    ("update", update, update_ref),
                    ("m", get(dev, &m)?, m_ref),
                    ("v", get(dev, &v)?, v_ref),
                    ("params", get(dev, &params)?, params_ref),
                ])
            },
        )?;
    }
    Ok(())
}
