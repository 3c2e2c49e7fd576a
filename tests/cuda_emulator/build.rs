//! Compiles every `kernels/*.cu` of thinkshort as host C++ with include/cuda_emulation.h
//! force-included, together with the emulator's runtime, into one static library.

use std::fs;
use std::path::PathBuf;

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kernels = here.join("../../kernels");
    let include = here.join("include");
    let prelude = include.join("cuda_emulation.h");

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels)
        .expect("reading kernels/")
        .map(|e| e.expect("reading kernels/").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .include(&include)
        .include(&kernels)
        .flag("-x")
        .flag("c++")
        .flag("-include")
        .flag(prelude.to_str().expect("a UTF-8 path"))
        // the kernels read bf16 arrays through uint32_t / int4 pointers, as CUDA allows
        .flag("-fno-strict-aliasing")
        // CUDA idioms: #pragma unroll, threadIdx (unsigned) against int bounds
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-sign-compare")
        .file(here.join("src/runtime.cpp"));
    for s in &sources {
        build.file(s);
    }
    build.compile("thinkshort_cuda_emulator");

    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", include.display());
    for p in sources.iter().chain([
        &include.join("ptx_emulation.h"),
        &prelude,
        &here.join("src/runtime.cpp"),
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
