//! `thinkshort doctor`: what this build and this machine can do.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Also print the ptxas register/spill report of every kernel.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    println!("thinkshort {}", env!("CARGO_PKG_VERSION"));
    println!(
        "backend cpu:  usable ({} threads)",
        rayon::current_num_threads()
    );
    // What `optim.offload` can keep in host memory (12 bytes per parameter).
    if let Some(bytes) = crate::train::memory::host_available() {
        println!(
            "host memory:  {:.1} GiB available",
            bytes as f64 / (1u64 << 30) as f64
        );
    }

    if crate::cuda::kernels_built() {
        println!(
            "cuda kernels: built for sm_80, sm_90 (+ compute_80 PTX): {}",
            crate::cuda::kernel_names().join(", ")
        );
    } else {
        println!("cuda kernels: not built (nvcc was not found when this binary was compiled)");
    }
    let probe = crate::cuda::probe();
    match (&probe.error, probe.driver_present) {
        (_, false) => println!("cuda driver:  not found (libcuda.so could not be loaded)"),
        (Some(e), true) => println!("cuda driver:  found, but unusable: {e}"),
        (None, true) => {
            let version = probe.driver_version.map_or("unknown".to_string(), |v| {
                format!("{}.{}", v / 1000, (v % 1000) / 10)
            });
            println!("cuda driver:  found (CUDA {version})");
        }
    }
    if probe.devices.is_empty() {
        println!("gpus:         none");
    }
    for d in &probe.devices {
        println!(
            "gpu {}:        {} (sm_{}{}, {:.1} GiB)",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.total_mem_bytes as f64 / (1u64 << 30) as f64
        );
    }
    // Opening the backend also loads cuBLAS and every kernel module: "usable" means all of it.
    let cuda = match crate::cuda::CudaBackend::new(0) {
        Ok(b) => format!(
            "usable on {} (cuBLAS loaded, {} kernel modules loaded); generate, logprobs, eval, \
             selfcheck, bench and train run on it, sft on the CPU",
            b.device_name(),
            crate::cuda::kernel_names().len()
        ),
        Err(e) => format!("unavailable: {e:#}"),
    };
    println!("backend cuda: {cuda}");
    if args.verbose {
        println!("\nptxas report:\n{}", crate::cuda::ptxas_report());
    }
    Ok(())
}
