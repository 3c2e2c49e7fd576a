//! Running out of device memory on the device itself: an allocation larger than the device's free
//! memory is refused as out of device memory (the error `train` recovers from by halving its
//! micro-batch), and after `recover_from_out_of_memory` the device runs an op as before. Devices
//! that report no free memory (the CPU) have no row.

use super::{get, put, Checker, TOL_BF16};
use crate::backend::cpu::CpuBackend;
use crate::backend::{out_of_device_memory, Backend};
use anyhow::{bail, Result};

pub(super) fn check<D: Backend>(c: &mut Checker<D>) -> Result<()> {
    if c.dev.free_memory()?.is_none() {
        return Ok(());
    }
    c.check(
        "out_of_memory_recovery",
        "twice the free memory, then residual_add M=64 dim=896".to_string(),
        TOL_BF16,
        |dev, r| {
            // the free memory once the pool's cache is given back: twice it cannot fit
            dev.recover_from_out_of_memory()?;
            let free = dev.free_memory()?.unwrap_or(0);
            let values = free.max(1); // bf16: twice the free bytes
            match dev.empty(values) {
                Ok(_) => bail!("{} bytes were allocated with {free} free", 2 * values),
                Err(e) if out_of_device_memory(&e).is_some() => {}
                Err(e) => bail!("not reported as out of device memory: {e:#}"),
            }
            dev.recover_from_out_of_memory()?;
            let (mut x, mut reference) = put(dev, &r.normal(64 * 896, 1.0))?;
            let (y, y_h) = put(dev, &r.normal(64 * 896, 1.0))?;
            dev.residual_add(dev.full_mut(&mut x), dev.full(&y));
            CpuBackend.residual_add(&mut reference, &y_h);
            Ok(vec![("", get(dev, &x)?, reference)])
        },
    )
}
