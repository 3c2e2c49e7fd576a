//! Build script: compiles every `kernels/*.cu` with nvcc into one fatbin per file and embeds them.
//!
//! Each `kernels/<stem>.cu` becomes `$OUT_DIR/<stem>.fatbin` holding SASS for sm_80 and sm_90 plus
//! compute_80 PTX (DESIGN.md: the GPU machines' driver 580 cannot JIT PTX from a newer nvcc, so the
//! SASS must be in the binary; the PTX is there for newer GPUs). `$OUT_DIR/kernels.rs` (included by
//! `src/cuda/mod.rs`) lists them:
//!
//! ```text
//! pub const KERNELS_BUILT: bool
//! pub const KERNELS_STATUS: &str            // one line: why the kernels were (not) built
//! pub const NVCC_PATH: &str                 // "" when not built
//! pub const NVCC_VERSION: &str              // e.g. "Cuda compilation tools, release 13.0, V13.0.88"
//! pub const KERNEL_FATBINS: &[(&str, &[u8])] // (file stem, fatbin bytes)
//! pub const PTXAS_REPORT: &str              // parsed `ptxas -v` output, one line per function and arch
//! ```
//!
//! nvcc is searched for in `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `$PATH`,
//! `/usr/local/cuda/bin/nvcc`. Without nvcc the crate still builds (a cargo warning, and a CUDA
//! backend that reports "built without CUDA kernels" at run time). With `REQUIRE_CUDA_KERNELS=1`
//! (CI) a missing nvcc, a failed compile, a compiler warning or any register spill fails the build;
//! without it, warnings and spills are cargo warnings.
//!
//! Only std is used here, so the script needs no `[build-dependencies]`.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// nvcc flags shared by every kernel file (the output and input paths are added per file).
const NVCC_FLAGS: &[&str] = &[
    "--fatbin",
    "-std=c++17",
    "-O3",
    // line tables for Nsight Compute source view; does not change the generated code
    "-lineinfo",
    "-Xptxas",
    "-v",
    "-gencode",
    "arch=compute_80,code=[sm_80,compute_80]",
    "-gencode",
    "arch=compute_90,code=sm_90",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let kernels_dir = manifest_dir.join("kernels");

    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "REQUIRE_CUDA_KERNELS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // Watching the directory catches added and removed files; each file is listed as well.
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    let sources = list_kernel_sources(&kernels_dir);
    for path in sources.cu.iter().chain(sources.headers.iter()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let require = env::var("REQUIRE_CUDA_KERNELS")
        .map(|v| v == "1")
        .unwrap_or(false);
    let outcome = build_kernels(&sources.cu, &kernels_dir, &out_dir, require);

    let report_path = out_dir.join("ptxas_report.txt");
    fs::write(&report_path, &outcome.report).expect("writing ptxas_report.txt");
    let kernels_rs = generate_kernels_rs(&outcome, &report_path);
    fs::write(out_dir.join("kernels.rs"), kernels_rs).expect("writing kernels.rs");
}

// ---------------------------------------------------------------------------------------------
// finding the sources and nvcc

struct KernelSources {
    cu: Vec<PathBuf>,
    headers: Vec<PathBuf>,
}

fn list_kernel_sources(dir: &Path) -> KernelSources {
    let mut cu = Vec::new();
    let mut headers = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_file() {
                continue;
            }
            match path.extension().and_then(|e| e.to_str()) {
                Some("cu") => cu.push(path),
                Some("cuh") | Some("h") => headers.push(path),
                _ => {}
            }
        }
    }
    cu.sort();
    headers.sort();
    KernelSources { cu, headers }
}

fn is_executable_file(path: &Path) -> bool {
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                meta.permissions().mode() & 0o111 != 0
            }
            #[cfg(not(unix))]
            {
                true
            }
        }
        _ => false,
    }
}

/// Why no nvcc could be used: a short reason for run-time messages and the details for the build log.
struct NoNvcc {
    /// e.g. "nvcc was not found at build time"
    short: String,
    /// e.g. "nvcc not found (looked in ...)"
    detail: String,
}

/// The nvcc to use and where it came from, or an explanation of where we looked.
fn find_nvcc() -> Result<(PathBuf, String), NoNvcc> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let mut looked = Vec::new();

    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&nvcc);
        if is_executable_file(&path) {
            return Ok((path, "$NVCC".into()));
        }
        // An explicit setting that points nowhere is a mistake worth stopping for, rather than
        // silently falling back to some other nvcc.
        return Err(NoNvcc {
            short: "NVCC did not point to an executable at build time".into(),
            detail: format!("NVCC={} is not an executable file", path.display()),
        });
    }
    looked.push("$NVCC (unset)".to_string());

    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(root).join("bin").join(exe);
            if is_executable_file(&path) {
                return Ok((path, format!("${var}")));
            }
            looked.push(format!("{}", path.display()));
        } else {
            looked.push(format!("${var} (unset)"));
        }
    }

    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            let path = dir.join(exe);
            if is_executable_file(&path) {
                return Ok((path, "$PATH".into()));
            }
        }
    }
    looked.push("$PATH".to_string());

    let default = PathBuf::from("/usr/local/cuda/bin").join(exe);
    if is_executable_file(&default) {
        return Ok((default, "/usr/local/cuda".into()));
    }
    looked.push(default.display().to_string());

    Err(NoNvcc {
        short: "nvcc was not found at build time".into(),
        detail: format!("nvcc not found (looked in {})", looked.join(", ")),
    })
}

/// First line of `nvcc --version` that names the release, e.g.
/// "Cuda compilation tools, release 13.0, V13.0.88".
fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let output = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("could not run {} --version: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            nvcc.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains("release"))
        .or_else(|| text.lines().last())
        .unwrap_or("")
        .trim()
        .to_string())
}

// ---------------------------------------------------------------------------------------------
// compiling

struct Outcome {
    built: bool,
    status: String,
    nvcc_path: String,
    nvcc_version: String,
    /// (stem, absolute fatbin path)
    fatbins: Vec<(String, PathBuf)>,
    report: String,
}

/// Print a failure and stop the build (used only with REQUIRE_CUDA_KERNELS=1).
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn warn(message: &str) {
    for line in message.lines() {
        println!("cargo:warning={line}");
    }
}

fn not_built(status: String, report: String) -> Outcome {
    Outcome {
        built: false,
        status,
        nvcc_path: String::new(),
        nvcc_version: String::new(),
        fatbins: Vec::new(),
        report,
    }
}

fn build_kernels(
    cu_files: &[PathBuf],
    kernels_dir: &Path,
    out_dir: &Path,
    require: bool,
) -> Outcome {
    let (nvcc, source) = match find_nvcc() {
        Ok(found) => found,
        Err(NoNvcc { short, detail }) => {
            let status = format!("built without CUDA kernels ({short})");
            if require {
                fail(&format!(
                    "REQUIRE_CUDA_KERNELS=1 but {detail}. Set NVCC to the nvcc binary (.ci/run installs the pinned pip wheels) or unset REQUIRE_CUDA_KERNELS."
                ));
            }
            warn(&format!(
                "{detail}; building without CUDA kernels (the cuda backend will be unavailable). Set NVCC=/path/to/nvcc to build them."
            ));
            return not_built(status.clone(), format!("# ptxas report\n# {status}\n"));
        }
    };
    let version = match nvcc_version(&nvcc) {
        Ok(v) => v,
        Err(why) => {
            if require {
                fail(&format!("REQUIRE_CUDA_KERNELS=1 but {why}"));
            }
            warn(&format!("{why}; building without CUDA kernels"));
            let status =
                "built without CUDA kernels (nvcc could not be run at build time)".to_string();
            return not_built(status.clone(), format!("# ptxas report\n# {status}\n"));
        }
    };

    // Compile the files in parallel, at most NUM_JOBS (cargo's -j) nvcc processes at a time.
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, cu_files.len().max(1));
    let queue = Mutex::new(cu_files.iter().collect::<Vec<_>>());
    let results = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let Some(cu) = queue.lock().unwrap().pop() else {
                    break;
                };
                let result = compile_one(&nvcc, cu, kernels_dir, out_dir);
                results.lock().unwrap().insert(cu.clone(), result);
            });
        }
    });
    let results = results.into_inner().unwrap();

    let mut fatbins = Vec::new();
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for (cu, result) in results {
        match result {
            Ok((stem, fatbin, ptxas)) => {
                fs::write(out_dir.join(format!("ptxas_raw_{stem}.txt")), &ptxas).ok();
                let file_name = cu.file_name().unwrap().to_string_lossy().into_owned();
                warnings.extend(compiler_warnings(&ptxas));
                records.extend(
                    parse_ptxas(&ptxas)
                        .into_iter()
                        .map(|r| (file_name.clone(), r)),
                );
                fatbins.push((stem, fatbin));
            }
            Err(message) => errors.push((
                cu.file_name().unwrap().to_string_lossy().into_owned(),
                message,
            )),
        }
    }

    let report = format_report(&nvcc, &version, &records);

    // Register spills: quiet unless one happens.
    let spills: Vec<String> = records
        .iter()
        .filter(|(_, r)| r.spill_stores > 0 || r.spill_loads > 0 || r.unparsed.is_some())
        .map(|(file, r)| match &r.unparsed {
            Some(line) => format!("could not parse the ptxas report for {file}: {} ({}): {line:?}", r.function, r.arch),
            None => format!(
                "register spill in {file}: {} ({}): {} registers, {} bytes spill stores, {} bytes spill loads",
                r.function,
                r.arch,
                r.registers.map_or("?".into(), |n| n.to_string()),
                r.spill_stores,
                r.spill_loads
            ),
        })
        .collect();
    for line in &spills {
        println!("cargo:warning={line}");
    }

    if !errors.is_empty() {
        let all = errors
            .iter()
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        if require {
            fail(&format!("REQUIRE_CUDA_KERNELS=1 and nvcc failed:\n{all}"));
        }
        warn(&format!(
            "nvcc failed; building without CUDA kernels:\n{}",
            truncate_lines(&all, 40)
        ));
        let failed: Vec<&str> = errors.iter().map(|(file, _)| file.as_str()).collect();
        let status = format!(
            "built without CUDA kernels (nvcc failed on {} at build time)",
            failed.join(", ")
        );
        return not_built(status, report);
    }
    // Compiler warnings (the front end's, ptxas's, nvcc's): printed, and fatal in CI, since a
    // kernel that does not compile cleanly is not done.
    for line in &warnings {
        println!("cargo:warning={line}");
    }
    if require && !warnings.is_empty() {
        fail(&format!(
            "REQUIRE_CUDA_KERNELS=1 and nvcc warned:\n{}",
            warnings.join("\n")
        ));
    }
    if require && !spills.is_empty() {
        fail(&format!(
            "REQUIRE_CUDA_KERNELS=1 and {} kernel(s) spill registers to local memory:\n{}",
            spills.len(),
            spills.join("\n")
        ));
    }

    Outcome {
        built: true,
        status: format!(
            "{} kernel file(s) built with {} ({}, found via {source})",
            fatbins.len(),
            nvcc.display(),
            version
        ),
        nvcc_path: nvcc.display().to_string(),
        nvcc_version: version,
        fatbins,
        report,
    }
}

/// The warning lines of nvcc's output (`file(line): warning #N-D: ...`, `ptxas warning : ...`,
/// `ptxas file.ptx, line N; warning : ...`, `nvcc warning : ...`, a host compiler's
/// `file:line:col: warning: ...`), each once (nvcc repeats the front end's for every
/// architecture). ptxas's `-v` report lines ("ptxas info", byte counts) never say "warning"; the
/// front end's closing "Remark: The warnings can be suppressed ..." is not one itself.
fn compiler_warnings(output: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        let is_warning = line.contains("warning") && !line.starts_with("Remark:");
        if is_warning && !found.iter().any(|f| f == line) {
            found.push(line.to_string());
        }
    }
    found
}

fn truncate_lines(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= max {
        return text.to_string();
    }
    format!(
        "{}\n... ({} more lines)",
        lines[..max].join("\n"),
        lines.len() - max
    )
}

/// Compile one .cu file into `$OUT_DIR/<stem>.fatbin`; returns (stem, fatbin path, nvcc output).
fn compile_one(
    nvcc: &Path,
    cu: &Path,
    kernels_dir: &Path,
    out_dir: &Path,
) -> Result<(String, PathBuf, String), String> {
    let stem = cu.file_stem().unwrap().to_string_lossy().into_owned();
    let fatbin = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS)
        .arg("-I")
        .arg(kernels_dir)
        .arg("-o")
        .arg(&fatbin)
        .arg(cu);
    let output = cmd
        .output()
        .map_err(|e| format!("{}: could not run {}: {e}", cu.display(), nvcc.display()))?;
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    if !output.status.success() {
        return Err(format!(
            "{} ({}):\n{}",
            cu.display(),
            output.status,
            text.trim_end()
        ));
    }
    match fs::metadata(&fatbin) {
        Ok(meta) if meta.len() > 0 => {}
        _ => {
            return Err(format!(
                "{}: nvcc succeeded but wrote no {}",
                cu.display(),
                fatbin.display()
            ))
        }
    }
    Ok((stem, fatbin, text))
}

// ---------------------------------------------------------------------------------------------
// ptxas -v parsing
//
// ptxas prints, per function and architecture:
//   ptxas info    : Compiling entry function 'rmsnorm_forward' for 'sm_80'
//   ptxas info    : Function properties for rmsnorm_forward
//       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//   ptxas info    : Used 28 registers, used 1 barriers, 128 bytes smem, 388 bytes cmem[0]
// Non-inlined device functions get a "Function properties for" block of their own (no "Used" line),
// and can spill too, so they are recorded as well.

#[derive(Debug, Default, Clone)]
struct PtxasRecord {
    function: String,
    arch: String,
    entry: bool,
    registers: Option<u32>,
    stack_frame: u64,
    spill_stores: u64,
    spill_loads: u64,
    smem: u64,
    cmem0: u64,
    barriers: u32,
    /// a ptxas line about this function that could not be parsed (treated like a spill)
    unparsed: Option<String>,
}

/// The number right before `suffix` in `text`, e.g. number_before("Used 28 registers", "registers") == Some(28).
fn number_before(text: &str, suffix: &str) -> Option<u64> {
    let idx = text.find(suffix)?;
    text[..idx].split_whitespace().last()?.parse().ok()
}

fn quoted(text: &str, nth: usize) -> Option<String> {
    text.split('\'').nth(2 * nth + 1).map(|s| s.to_string())
}

fn parse_ptxas(output: &str) -> Vec<PtxasRecord> {
    let mut records: Vec<PtxasRecord> = Vec::new();
    let mut arch = String::new();
    let mut current_entry: Option<usize> = None; // index into records
    let mut props_for: Option<usize> = None;
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function").nth(1) {
            let name = quoted(rest, 0).unwrap_or_default();
            arch = quoted(rest, 1).unwrap_or_default();
            records.push(PtxasRecord {
                function: name,
                arch: arch.clone(),
                entry: true,
                ..Default::default()
            });
            current_entry = Some(records.len() - 1);
            props_for = None;
        } else if let Some(rest) = line.split("Function properties for").nth(1) {
            let name = rest.trim().to_string();
            let idx = match current_entry {
                Some(i) if records[i].function == name => i,
                _ => {
                    records.push(PtxasRecord {
                        function: name,
                        arch: arch.clone(),
                        entry: false,
                        ..Default::default()
                    });
                    records.len() - 1
                }
            };
            props_for = Some(idx);
        } else if line.contains("bytes stack frame") {
            if let Some(i) = props_for.take() {
                let r = &mut records[i];
                r.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
                match (
                    number_before(line, "bytes spill stores"),
                    number_before(line, "bytes spill loads"),
                ) {
                    (Some(stores), Some(loads)) => {
                        r.spill_stores = stores;
                        r.spill_loads = loads;
                    }
                    // Never let an unexpected format hide a spill.
                    _ => r.unparsed = Some(line.to_string()),
                }
            }
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(i) = current_entry {
                let r = &mut records[i];
                r.registers = number_before(line, "registers").map(|n| n as u32);
                if r.registers.is_none() {
                    r.unparsed = Some(line.to_string());
                }
                r.barriers = number_before(line, "barriers").unwrap_or(0) as u32;
                r.smem = number_before(line, "bytes smem").unwrap_or(0);
                r.cmem0 = number_before(line, "bytes cmem[0]").unwrap_or(0);
            }
        }
    }
    records
}

fn format_report(nvcc: &Path, version: &str, records: &[(String, PtxasRecord)]) -> String {
    let mut out = String::new();
    writeln!(out, "# ptxas report ({version}; {})", nvcc.display()).unwrap();
    writeln!(
        out,
        "# file function arch registers spill_stores spill_loads stack smem cmem0 barriers"
    )
    .unwrap();
    let mut sorted: Vec<&(String, PtxasRecord)> = records.iter().collect();
    sorted.sort_by(|a, b| (&a.0, &a.1.function, &a.1.arch).cmp(&(&b.0, &b.1.function, &b.1.arch)));
    for (file, r) in sorted {
        writeln!(
            out,
            "{file} {}{} {} registers={} spill_stores={}B spill_loads={}B stack={}B smem={}B cmem0={}B barriers={}",
            r.function,
            if r.entry { "" } else { " (device function)" },
            r.arch,
            r.registers.map_or("-".into(), |n| n.to_string()),
            r.spill_stores,
            r.spill_loads,
            r.stack_frame,
            r.smem,
            r.cmem0,
            r.barriers
        )
        .unwrap();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// kernels.rs

fn generate_kernels_rs(outcome: &Outcome, report_path: &Path) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "// @generated by build.rs: embedded CUDA kernels. Do not edit."
    )
    .unwrap();
    writeln!(
        s,
        "/// Whether build.rs compiled the kernels (false: no nvcc, or nvcc failed)."
    )
    .unwrap();
    writeln!(s, "pub const KERNELS_BUILT: bool = {};", outcome.built).unwrap();
    writeln!(s, "/// One line: how the kernels were built, or why not.").unwrap();
    writeln!(s, "pub const KERNELS_STATUS: &str = {:?};", outcome.status).unwrap();
    writeln!(
        s,
        "/// The nvcc used at build time (empty when the kernels were not built)."
    )
    .unwrap();
    writeln!(s, "pub const NVCC_PATH: &str = {:?};", outcome.nvcc_path).unwrap();
    writeln!(
        s,
        "/// `nvcc --version` release line (empty when the kernels were not built)."
    )
    .unwrap();
    writeln!(
        s,
        "pub const NVCC_VERSION: &str = {:?};",
        outcome.nvcc_version
    )
    .unwrap();
    writeln!(
        s,
        "/// (kernel file stem, fatbin bytes: SASS sm_80 + sm_90, PTX compute_80)."
    )
    .unwrap();
    writeln!(s, "pub const KERNEL_FATBINS: &[(&str, &[u8])] = &[").unwrap();
    if outcome.built {
        for (stem, path) in &outcome.fatbins {
            let path = path.to_str().expect("OUT_DIR path is not valid UTF-8");
            writeln!(s, "    ({stem:?}, include_bytes!({path:?})),").unwrap();
        }
    }
    writeln!(s, "];").unwrap();
    writeln!(
        s,
        "/// Parsed `ptxas -v` output: registers, spills, shared memory per function and arch."
    )
    .unwrap();
    let report = report_path
        .to_str()
        .expect("OUT_DIR path is not valid UTF-8");
    writeln!(
        s,
        "pub const PTXAS_REPORT: &str = include_str!({report:?});"
    )
    .unwrap();
    s
}
