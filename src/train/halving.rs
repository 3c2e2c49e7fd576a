//! Work done in passes of a micro-batch of sequences (the update, the reference log-probs, an
//! SFT step) that runs out of device memory runs again at half the micro-batch: the passes' sum
//! is the same up to the order of float sums, and only one pass's activations are held.

use crate::backend::{out_of_device_memory, Backend};
use anyhow::Result;

/// Runs `work(micro_batch)`, a job done `micro_batch` sequences per pass (0: all `sequences`
/// in one). With `halve` set, a job that runs out of device memory runs again,
/// after the backend recovered, at half the size (down to one sequence per pass; `what` names
/// the job in the note this prints). Returns the result and the micro-batch it ran with. The
/// job's buffers are dropped when it returns its error, so the next try has their memory. A job
/// is done when its ops are: the device is waited for before its result counts, as a device
/// backend reports an op's failure (an allocation inside the op) only at the next wait.
pub fn halving_on_out_of_memory<B: Backend, T>(
    backend: &B,
    what: &str,
    micro_batch: usize,
    sequences: usize,
    halve: bool,
    mut work: impl FnMut(usize) -> Result<T>,
) -> Result<(T, usize)> {
    // A failure of the ops before the job (the inputs it reads) is not the job's to retry.
    backend.synchronize()?;
    let all = sequences.max(1);
    let mut size = micro_batch;
    loop {
        let error = match work(size).and_then(|done| backend.synchronize().map(|()| done)) {
            Ok(done) => return Ok((done, size)),
            Err(e) => e,
        };
        if !halve || out_of_device_memory(&error).is_none() {
            return Err(error);
        }
        let per_pass = per_pass_of(size, all);
        if per_pass == 1 {
            let first = per_pass_of(micro_batch, all);
            let halved = if first > 1 {
                format!(" (halved from {first})")
            } else {
                String::new()
            };
            return Err(error.context(format!(
                "{what} ran out of device memory with one sequence per pass{halved}: use shorter \
                 sequences or a smaller model (train: a smaller cap, activation_checkpointing = \
                 true, optim.offload = true)"
            )));
        }
        backend.recover_from_out_of_memory()?;
        size = per_pass.div_ceil(2);
        eprintln!(
            "\nnote: {what} ran out of device memory with {per_pass} sequences per pass \
             ({error:#}); it runs {size} per pass from now on"
        );
    }
}

/// Sequences per pass of `micro_batch` (0: all) over `all` sequences.
fn per_pass_of(micro_batch: usize, all: usize) -> usize {
    if micro_batch == 0 {
        all
    } else {
        micro_batch.min(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// The sizes a job is tried at: halved while it runs out of device memory (from all 8, or
    /// from a micro-batch larger than the job), never for another error or when not allowed,
    /// and given up at one sequence per pass with the error saying what to change.
    #[test]
    fn out_of_memory_halves_the_micro_batch_down_to_one() {
        use crate::backend::OutOfDeviceMemory;
        let oom = || anyhow::Error::new(OutOfDeviceMemory { bytes: 1 << 20 });
        let tries = |micro: usize, halve: bool, fits: usize, fail: &dyn Fn() -> anyhow::Error| {
            let mut sizes = Vec::new();
            let result = halving_on_out_of_memory(&CpuBackend, "the test", micro, 8, halve, |s| {
                sizes.push(s);
                let per_pass = if s == 0 { 8 } else { s };
                if per_pass <= fits {
                    Ok(per_pass)
                } else {
                    Err(fail())
                }
            });
            (result, sizes)
        };
        let (result, sizes) = tries(0, true, 2, &oom);
        assert_eq!((result.unwrap(), sizes), ((2, 2), vec![0, 4, 2]));
        let (result, sizes) = tries(16, true, 4, &oom);
        assert_eq!((result.unwrap(), sizes), ((4, 4), vec![16, 4]));
        let (result, sizes) = tries(3, true, 0, &oom);
        let err = format!("{:#}", result.unwrap_err());
        assert_eq!(sizes, vec![3, 2, 1]);
        assert!(
            err.contains("one sequence per pass (halved from 3)")
                && err.contains("activation_checkpointing")
                && err.contains("out of memory on the device"),
            "{err}"
        );
        let (result, sizes) = tries(0, false, 2, &oom);
        assert!(result.is_err() && sizes == vec![0]);
        let (result, sizes) = tries(0, true, 2, &|| anyhow::anyhow!("a bad shape"));
        assert!(result.is_err() && sizes == vec![0]);
    }
}
