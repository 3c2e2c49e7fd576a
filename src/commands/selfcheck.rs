//! `thinkshort selfcheck`: every forward op and the attention backward of a device backend
//! against the CPU reference, then a whole tiny model (see `crate::selfcheck`). Exits non-zero when any check fails.

use crate::backend::{cpu::CpuBackend, BackendKind, TrainBackend};
use crate::cuda::CudaBackend;
use crate::selfcheck::{self, CheckRow, Coverage, Report};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SelfcheckArgs {
    /// The backend under test (`cpu` compares the CPU backend with itself).
    #[arg(long, value_enum, default_value_t = BackendKind::Cuda)]
    pub backend: BackendKind,
    /// Seed of the random inputs and of the tiny model's weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the long attention sequences (1000 and 2048 tokens): a quicker run.
    #[arg(long)]
    pub quick: bool,
    /// Also write every row (op, shape, error, tolerance, pass) to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: &SelfcheckArgs) -> Result<()> {
    if let Some(path) = &args.json {
        super::check_output_file(path, "--json")?;
    }
    let report = match super::resolve_backend(args.backend)? {
        BackendKind::Cuda => {
            let dev = CudaBackend::new(0)?;
            let device = format!("cuda ({})", dev.device_name());
            check(&device, &|| CudaBackend::new(0), args)?
        }
        _ => check(
            "cpu (compared with itself: this checks the selfcheck, not a device)",
            &|| Ok(CpuBackend),
            args,
        )?,
    };
    let failed = report.failures();
    let total = report.rows.len();
    println!(
        "selfcheck: {total} checks, {} PASS, {failed} FAIL",
        total - failed
    );
    if failed > 0 {
        bail!("selfcheck: {failed} of {total} checks failed");
    }
    Ok(())
}

/// Runs the checks on devices made by `make`, printing one line per row as it comes, then the
/// information lines; writes `--json`.
fn check<D: TrainBackend>(
    device: &str,
    make: &dyn Fn() -> Result<D>,
    args: &SelfcheckArgs,
) -> Result<Report> {
    println!(
        "selfcheck: {device} against the cpu reference, seed {}",
        args.seed
    );
    println!(
        "{:<28} {:<62} {:>10} {:>8}  result",
        "op", "shape", "error", "tol"
    );
    let coverage = if args.quick {
        Coverage::Quick
    } else {
        Coverage::Full
    };
    let report = selfcheck::run(make, args.seed, coverage, &mut print_row)?;
    for line in &report.info {
        println!("info: {line}");
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "device": device,
            "seed": args.seed,
            "passed": report.rows.len() - report.failures(),
            "failed": report.failures(),
            "rows": report.rows,
            "info": report.info,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

fn print_row(row: &CheckRow) {
    println!(
        "{:<28} {:<62} {:>10.3e} {:>8.1e}  {}{}",
        row.op,
        row.shape,
        row.error,
        row.tolerance,
        if row.pass { "PASS" } else { "FAIL" },
        row.message
            .as_ref()
            .map_or(String::new(), |m| format!("  ({m})")),
    );
}
