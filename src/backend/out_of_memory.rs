//! The one device error work can recover from: an allocation refused for lack of free memory.
//! The device stays usable after it, so a caller that drops the failed work's buffers may try
//! again with less at a time (`train` halves an automatic micro-batch, `train::update`).

use std::fmt;

/// A device allocation of `bytes` refused because the device had no room for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfDeviceMemory {
    pub bytes: usize,
}

impl fmt::Display for OutOfDeviceMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: usize = 1 << 20;
        if self.bytes >= MIB {
            let mib = self.bytes as f64 / MIB as f64;
            write!(f, "out of memory on the device ({mib:.1} MiB asked for)")
        } else {
            write!(
                f,
                "out of memory on the device ({} bytes asked for)",
                self.bytes
            )
        }
    }
}

impl std::error::Error for OutOfDeviceMemory {}

/// The allocation failure inside `e`, whatever context was added to it on the way up.
pub fn out_of_device_memory(e: &anyhow::Error) -> Option<OutOfDeviceMemory> {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<OutOfDeviceMemory>())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    /// Found under layers of context; other errors are not it.
    #[test]
    fn is_found_under_context() {
        let e = Err::<(), _>(OutOfDeviceMemory { bytes: 3 << 20 })
            .context("allocating the logits")
            .context("update pass 2")
            .unwrap_err();
        assert_eq!(
            out_of_device_memory(&e),
            Some(OutOfDeviceMemory { bytes: 3 << 20 })
        );
        assert!(format!("{e:#}").contains("out of memory on the device (3.0 MiB asked for)"));
        let small = OutOfDeviceMemory { bytes: 4096 }.to_string();
        assert!(small.ends_with("(4096 bytes asked for)"), "{small}");
        let other = anyhow::anyhow!("out of memory on the device (3.0 MiB asked for)");
        assert_eq!(out_of_device_memory(&other), None);
    }
}
