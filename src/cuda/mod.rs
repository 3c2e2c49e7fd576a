//! The CUDA side: driver probing, the kernels embedded by build.rs, module loading and launchers.
//!
//! Nothing here may panic on a machine without a GPU or without a driver: [`probe`] checks that
//! libcuda can be loaded before calling into it (cudarc panics otherwise) and catches panics as a
//! second line of defence; [`require_cuda`] turns "no driver / no device / no kernels" into one
//! clear error line for `--backend cuda`.
//!
//! The kernels (`kernels/*.cu`) are compiled by build.rs into one fatbin per file, with SASS for
//! sm_80 and sm_90 and compute_80 PTX, and embedded in the binary (see [`kernels`]).

pub mod attention_plan;
pub mod backend;
pub mod device;
pub mod launch;
pub mod ops;

pub use backend::CudaBackend;

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, sys, CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;

/// What build.rs produced: `KERNELS_BUILT`, `KERNELS_STATUS`, `NVCC_PATH`, `NVCC_VERSION`,
/// `KERNEL_FATBINS` (file stem → fatbin bytes) and `PTXAS_REPORT`.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The oldest GPU generation the embedded SASS/PTX can run on (Ampere, sm_80).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// What the machine's CUDA driver reports. Never obtained by panicking: see [`probe`].
#[derive(Debug, Clone, Default)]
pub struct CudaProbe {
    /// libcuda could be loaded.
    pub driver_present: bool,
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub driver_version: Option<i32>,
    pub devices: Vec<CudaDeviceInfo>,
    /// Why the driver (or a device) could not be queried; None when everything answered.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_mem_bytes: u64,
    /// (major, minor), e.g. (9, 0) for H100/H200.
    pub compute_capability: (i32, i32),
}

/// Queries the CUDA driver: presence, version, devices. Never panics: without libcuda it returns
/// `driver_present: false`; any driver error lands in `error`.
pub fn probe() -> CudaProbe {
    // cudarc's dynamic loading panics when libcuda is missing, so look before calling anything.
    if !unsafe { sys::is_culib_present() } {
        return CudaProbe {
            driver_present: false,
            error: Some("no CUDA driver found (libcuda.so could not be loaded)".into()),
            ..Default::default()
        };
    }
    match std::panic::catch_unwind(probe_driver) {
        Ok(probe) => probe,
        Err(payload) => CudaProbe {
            driver_present: true,
            error: Some(format!(
                "the CUDA driver query panicked: {}",
                panic_message(&*payload)
            )),
            ..Default::default()
        },
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// The driver queries proper; only called once libcuda is known to load.
fn probe_driver() -> CudaProbe {
    let mut probe = CudaProbe {
        driver_present: true,
        ..Default::default()
    };

    let mut version = 0i32;
    if unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .is_ok()
    {
        probe.driver_version = Some(version);
    }

    if let Err(e) = result::init() {
        // A driver without any GPU (e.g. a container without devices) answers NO_DEVICE: that is
        // "zero devices", not a broken driver.
        if e.0 != sys::CUresult::CUDA_ERROR_NO_DEVICE {
            probe.error = Some(format!("cuInit failed: {e}"));
        }
        return probe;
    }
    let count = match result::device::get_count() {
        Ok(n) => n.max(0),
        Err(e) => {
            probe.error = Some(format!("cuDeviceGetCount failed: {e}"));
            return probe;
        }
    };
    for ordinal in 0..count {
        match device_info(ordinal) {
            Ok(info) => probe.devices.push(info),
            Err(e) => {
                probe
                    .error
                    .get_or_insert_with(|| format!("querying CUDA device {ordinal} failed: {e}"));
            }
        }
    }
    probe
}

fn device_info(ordinal: i32) -> std::result::Result<CudaDeviceInfo, result::DriverError> {
    use sys::CUdevice_attribute_enum::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
    };
    let dev = result::device::get(ordinal)?;
    let name = result::device::get_name(dev)?;
    // SAFETY: `dev` was returned by cuDeviceGet above.
    let (total_mem, major, minor) = unsafe {
        (
            result::device::total_mem(dev)?,
            result::device::get_attribute(dev, MAJOR)?,
            result::device::get_attribute(dev, MINOR)?,
        )
    };
    Ok(CudaDeviceInfo {
        ordinal: ordinal as usize,
        name,
        total_mem_bytes: total_mem as u64,
        compute_capability: (major, minor),
    })
}

/// Whether build.rs compiled and embedded the kernels (false when nvcc was missing).
pub fn kernels_built() -> bool {
    kernels::KERNELS_BUILT
}

/// One line from build.rs: how the kernels were built (nvcc path and version), or why not.
pub fn kernels_status() -> &'static str {
    kernels::KERNELS_STATUS
}

/// The embedded kernel modules, by file stem (`kernels/rmsnorm.cu` → "rmsnorm").
pub fn kernel_names() -> Vec<&'static str> {
    kernels::KERNEL_FATBINS
        .iter()
        .map(|(name, _)| *name)
        .collect()
}

/// The fatbin of one kernel file, if it was built.
pub fn kernel_fatbin(name: &str) -> Option<&'static [u8]> {
    kernels::KERNEL_FATBINS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

/// ptxas's register / spill / shared-memory report for every kernel and architecture.
pub fn ptxas_report() -> &'static str {
    kernels::PTXAS_REPORT
}

/// For `--backend cuda`: Ok with the probe when a driver, at least one usable device (compute
/// capability 8.0 or newer) and the embedded kernels are all there; otherwise an error of one
/// line that says which is missing.
pub fn require_cuda() -> Result<CudaProbe> {
    const HINT: &str = "use --backend cpu or auto";
    let probe = probe();
    if !probe.driver_present {
        bail!("no CUDA driver found (libcuda.so could not be loaded); {HINT}");
    }
    if probe.devices.is_empty() {
        match &probe.error {
            Some(e) => {
                bail!("the CUDA driver is present but unusable: {e}; {HINT}")
            }
            None => bail!("no CUDA device (the driver reports no GPU); {HINT}"),
        }
    }
    if !probe
        .devices
        .iter()
        .any(|d| d.compute_capability >= MIN_COMPUTE_CAPABILITY)
    {
        let found: Vec<String> = probe
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{} (sm_{}{})",
                    d.name, d.compute_capability.0, d.compute_capability.1
                )
            })
            .collect();
        bail!(
            "--backend cuda: no CUDA device with compute capability {}.{} or newer (found {}); {HINT}",
            MIN_COMPUTE_CAPABILITY.0,
            MIN_COMPUTE_CAPABILITY.1,
            found.join(", ")
        );
    }
    if !kernels::KERNELS_BUILT {
        bail!(
            "--backend cuda: this binary was {}; rebuild with NVCC=/path/to/nvcc, or {HINT}",
            kernels::KERNELS_STATUS
        );
    }
    Ok(probe)
}

/// Loads the embedded fatbin of `kernels/<name>.cu` into `ctx` (the driver picks the sm_80/sm_90
/// SASS, or JIT-compiles the compute_80 PTX on newer GPUs).
pub fn load_kernel_module(ctx: &Arc<CudaContext>, name: &str) -> Result<Arc<CudaModule>> {
    let bytes = kernel_fatbin(name).ok_or_else(|| {
        if kernels::KERNELS_BUILT {
            anyhow!(
                "no CUDA kernel module {name:?} in this binary (have: {})",
                kernel_names().join(", ")
            )
        } else {
            anyhow!(
                "cannot load CUDA kernel module {name:?}: this binary was {}",
                kernels::KERNELS_STATUS
            )
        }
    })?;
    // from_binary copies into a Vec: its heap allocation is suitably aligned for cuModuleLoadData.
    ctx.load_module(Ptx::from_binary(bytes.to_vec())).with_context(|| {
        format!("loading CUDA kernel module {name:?} (fatbin with sm_80, sm_90 SASS and compute_80 PTX) failed")
    })
}

// ---------------------------------------------------------------------------------------------
// fatbin inspection (for tests and `doctor`: what is inside an embedded fatbin)

/// The fatbin container magic, as nvcc writes it (little-endian on disk: 50 ED 55 BA).
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;

/// One image inside a fatbin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatbinImage {
    /// SASS for `sm_<arch>`, e.g. Sass(80).
    Sass(u32),
    /// PTX for `compute_<arch>`, e.g. Ptx(80).
    Ptx(u32),
}

/// Lists the images in a fatbin (None when the bytes are not a well-formed fatbin).
///
/// Layout: a 16-byte header {magic u32, version u16, header_size u16, payload_size u64}, then
/// entries of {kind u16 (1 = PTX, 2 = ELF), version u16, header_size u32, payload_size u64, ..,
/// arch u32 at offset 28, ..} followed by their payloads.
pub fn fatbin_images(bytes: &[u8]) -> Option<Vec<FatbinImage>> {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if u32_at(0)? != FATBIN_MAGIC {
        return None;
    }
    let header = u16_at(6)? as usize;
    let end = header.checked_add(usize::try_from(u64_at(8)?).ok()?)?;
    if end > bytes.len() {
        return None;
    }
    let mut images = Vec::new();
    let mut off = header;
    while off < end {
        let kind = u16_at(off)?;
        let entry_header = u32_at(off + 4)? as usize;
        let payload = usize::try_from(u64_at(off + 8)?).ok()?;
        let arch = u32_at(off + 28)?;
        images.push(match kind {
            1 => FatbinImage::Ptx(arch),
            2 => FatbinImage::Sass(arch),
            _ => return None,
        });
        let next = off.checked_add(entry_header)?.checked_add(payload)?;
        if entry_header == 0 || next > end {
            return None;
        }
        off = next;
    }
    Some(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_agrees_with_libcuda_presence() {
        let p = probe();
        let present = unsafe { sys::is_culib_present() };
        assert_eq!(p.driver_present, present);
        if !present {
            assert!(p.devices.is_empty());
            assert!(p.driver_version.is_none());
            assert!(p.error.as_deref().unwrap_or("").contains("libcuda"));
        }
        for (i, d) in p.devices.iter().enumerate() {
            assert_eq!(d.ordinal, i);
            assert!(d.total_mem_bytes > 0, "{d:?}");
        }
    }

    #[test]
    fn require_cuda_errs_with_one_line_mentioning_cuda_when_unusable() {
        match require_cuda() {
            Ok(p) => {
                // a GPU machine with the kernels built
                assert!(!p.devices.is_empty());
                assert!(kernels_built());
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.to_lowercase().contains("cuda"), "{msg}");
                assert!(!msg.contains('\n'), "not one line: {msg}");
                let p = probe();
                if !p.driver_present {
                    assert!(msg.contains("no CUDA driver"), "{msg}");
                }
            }
        }
    }

    #[test]
    fn embedded_kernels_are_fatbins_with_sm80_sm90_and_compute80() {
        let names = kernel_names();
        if !kernels_built() {
            assert!(names.is_empty());
            assert!(
                kernels_status().contains("without CUDA kernels"),
                "{}",
                kernels_status()
            );
            return;
        }
        assert!(names.contains(&"rmsnorm"), "{names:?}");
        for (name, bytes) in kernels::KERNEL_FATBINS {
            assert!(!bytes.is_empty(), "{name}: empty fatbin");
            assert_eq!(
                &bytes[..4],
                &[0x50, 0xED, 0x55, 0xBA],
                "{name}: not a fatbin"
            );
            let images = fatbin_images(bytes).unwrap_or_else(|| panic!("{name}: malformed fatbin"));
            for want in [
                FatbinImage::Sass(80),
                FatbinImage::Sass(90),
                FatbinImage::Ptx(80),
            ] {
                assert!(
                    images.contains(&want),
                    "{name}: {want:?} missing from {images:?}"
                );
            }
        }
        assert_eq!(kernel_fatbin("rmsnorm").map(|b| b.is_empty()), Some(false));
        assert!(kernel_fatbin("no_such_kernel").is_none());
    }

    /// An entry-point name written inside a `#define M(P)` macro as `prefix##P` becomes one
    /// name per invocation `M(value)` at the start of a line; other names stay as they are.
    fn expand_macro_name(src: &str, name: &str) -> Vec<String> {
        let Some((prefix, param)) = name.split_once("##") else {
            return vec![name.to_string()];
        };
        let define = src[..src.find(name).unwrap()].rfind("#define ").unwrap();
        let macro_name = src[define + 8..].split('(').next().unwrap();
        let values: Vec<String> = src
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{macro_name}(")))
            .map(|rest| rest.trim_end().trim_end_matches(')').to_string())
            .collect();
        assert!(
            !values.is_empty(),
            "{name}: no invocation of {macro_name}({param})"
        );
        values.iter().map(|v| format!("{prefix}{v}")).collect()
    }

    #[test]
    fn ptxas_report_covers_every_entry_point_without_spills() {
        let report = ptxas_report();
        if !kernels_built() {
            return;
        }
        // Every `extern "C" __global__` entry point written in kernels/*.cu.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut functions = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cu") {
                let src = std::fs::read_to_string(&path).unwrap();
                for decl in src.split("extern \"C\" __global__").skip(1) {
                    // skip `__launch_bounds__(...)`: the name is the word before the next '('
                    let decl = match decl.find("__launch_bounds__") {
                        Some(at) if at < decl.find('(').unwrap() => {
                            &decl[at + decl[at..].find(')').unwrap() + 1..]
                        }
                        _ => decl,
                    };
                    let open = decl.find('(').unwrap();
                    let name = decl[..open].split_whitespace().last().unwrap();
                    functions.extend(expand_macro_name(&src, name));
                }
            }
        }
        assert!(functions.len() >= 10, "found only {functions:?}");
        for function in &functions {
            let function = function.as_str();
            for arch in ["sm_80", "sm_90"] {
                let line = report
                    .lines()
                    .find(|l| {
                        l.split_whitespace().nth(1) == Some(function)
                            && l.contains(&format!(" {arch} "))
                    })
                    .unwrap_or_else(|| panic!("no ptxas line for {function} {arch} in:\n{report}"));
                assert!(
                    line.contains("spill_stores=0B") && line.contains("spill_loads=0B"),
                    "{line}"
                );
                assert!(!line.contains("registers=-"), "{line}");
            }
        }
    }

    #[test]
    fn fatbin_parser_rejects_garbage() {
        assert_eq!(fatbin_images(&[]), None);
        assert_eq!(fatbin_images(b"not a fatbin at all"), None);
        // right magic, payload size pointing past the end
        let mut bytes = FATBIN_MAGIC.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 0, 16, 0]);
        bytes.extend_from_slice(&1000u64.to_le_bytes());
        assert_eq!(fatbin_images(&bytes), None);
        // an empty but well-formed container
        let mut empty = FATBIN_MAGIC.to_le_bytes().to_vec();
        empty.extend_from_slice(&[1, 0, 16, 0]);
        empty.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(fatbin_images(&empty), Some(vec![]));
    }
}
