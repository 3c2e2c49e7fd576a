//! `sample_tokens` against the CPU's `sampling::sample`: the same draws must give the same token
//! ids (exact), greedy and at two temperatures, for vocabularies below, near and far above the
//! kernel's 32 warps × 32 lanes, with ties for the argmax and draws at both ends of [0, 1).

use super::{get, put_f32, Checker, TOL_EXACT};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, TrainBackend};
use anyhow::Result;

pub(super) fn checks<D: TrainBackend>(c: &mut Checker<D>) -> Result<()> {
    let cpu = CpuBackend;
    for (rows, vocab) in [(5, 7), (64, 1001), (64, 151_936)] {
        for temperature in [0.0f32, 0.7, 1.0] {
            let shape = format!("R={rows} V={vocab} T={temperature}");
            c.check("sample_tokens", shape, TOL_EXACT, |dev, rand| {
                // Logits of std 3 (peaked, as a trained model's); row 0 holds integers, so its
                // maximum is tied between many entries and argmax must take the first.
                let mut host = rand.normal(rows * vocab, 3.0);
                host[..vocab]
                    .iter_mut()
                    .for_each(|x| *x = x.round().min(4.0));
                let (logits, logits_h) = put_f32(dev, &host)?;
                let mut uniforms = rand.uniform(rows);
                uniforms[0] = 0.0;
                uniforms[rows - 1] = 1.0 - f64::EPSILON / 2.0;
                let (mut out, _) = put_f32(dev, &rand.normal(rows, 1.0))?; // overwritten
                dev.sample_tokens(
                    dev.full_mut(&mut out),
                    dev.full(&logits),
                    &uniforms,
                    vocab,
                    temperature,
                );
                let mut reference = vec![0.0; rows];
                cpu.sample_tokens(&mut reference, &logits_h, &uniforms, vocab, temperature);
                Ok(vec![("", get(dev, &out)?, reference)])
            })?;
        }
    }
    Ok(())
}
