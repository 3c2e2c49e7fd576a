//! Compiles every `kernels/*.cu` of thinkshort as host C++ with include/cuda_emulation.h
//! force-included, together with the emulator's runtime, into one static library; and registers
//! each file's `extern "C"` entry points (found by preprocessing the file, so entry points that
//! macros define count too) for launches described as data (include/kernel_registry.h).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// The compiler set up as for the kernels: C++17, the emulation prelude force-included.
fn kernel_build(include: &Path, kernels: &Path, prelude: &Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .include(include)
        .include(kernels)
        .flag("-x")
        .flag("c++")
        .flag("-include")
        .flag(prelude.to_str().expect("a UTF-8 path"))
        // the kernels read bf16 arrays through uint32_t / int4 pointers, as CUDA allows
        .flag("-fno-strict-aliasing")
        // CUDA idioms: #pragma unroll, threadIdx (unsigned) against int bounds
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-sign-compare");
    build
}

/// The names of the entry points in a preprocessed kernel file: `extern "C" __global__ void
/// name(`, whose `__global__` the scan turns into `thinkshort_kernel`.
fn entry_points(preprocessed: &str) -> Vec<String> {
    let text = preprocessed
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    const MARK: &str = "extern \"C\" thinkshort_kernel void ";
    text.match_indices(MARK)
        .map(|(at, _)| {
            text[at + MARK.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .collect()
}

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let kernels = here.join("../../kernels");
    let include = here.join("include");
    let prelude = include.join("cuda_emulation.h");

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels)
        .expect("reading kernels/")
        .map(|e| e.expect("reading kernels/").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    // registry_<module>.cpp: the module's source, then the registration of its entry points
    let mut build = kernel_build(&include, &kernels, &prelude);
    build
        .file(here.join("src/runtime.cpp"))
        .file(here.join("src/launch_kernel.cpp"));
    let mut all = String::from("#include \"kernel_registry.h\"\n\n");
    let mut calls = String::new();
    for s in &sources {
        let module = s
            .file_stem()
            .and_then(|m| m.to_str())
            .expect("a UTF-8 file name");
        let preprocessed = kernel_build(&include, &kernels, &prelude)
            .define("THINKSHORT_KERNEL_SCAN", None)
            .file(s)
            .expand();
        let names = entry_points(&String::from_utf8_lossy(&preprocessed));
        assert!(
            !names.is_empty(),
            "no extern \"C\" __global__ entry point in {}",
            s.display()
        );
        let mut file = format!(
            "#include \"{}\"\n#include \"kernel_registry.h\"\n\nvoid emu_register_{module}(emu::KernelRegistry& r) {{\n",
            s.canonicalize().expect("a kernel file").display()
        );
        for name in &names {
            writeln!(file, "    r.add(\"{module}\", \"{name}\", &{name});").unwrap();
        }
        file.push_str("}\n");
        let path = out.join(format!("registry_{module}.cpp"));
        fs::write(&path, file).expect("writing a registry file");
        build.file(&path);
        writeln!(all, "void emu_register_{module}(emu::KernelRegistry& r);").unwrap();
        writeln!(calls, "        emu_register_{module}(r);").unwrap();
    }
    write!(
        all,
        "\nconst emu::KernelRegistry& emu::kernel_registry() {{\n    static const KernelRegistry registry = [] {{\n        KernelRegistry r;\n{calls}        return r;\n    }}();\n    return registry;\n}}\n"
    )
    .unwrap();
    let registry = out.join("registry.cpp");
    fs::write(&registry, all).expect("writing registry.cpp");
    build.file(&registry);
    build.compile("thinkshort_cuda_emulator");

    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", include.display());
    for p in sources.iter().chain([
        &include.join("ptx_emulation.h"),
        &include.join("kernel_registry.h"),
        &prelude,
        &here.join("src/runtime.cpp"),
        &here.join("src/launch_kernel.cpp"),
    ]) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    for entry in fs::read_dir(&kernels).expect("reading kernels/") {
        let p = entry.expect("reading kernels/").path();
        if p.extension().is_some_and(|x| x == "cuh") {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
