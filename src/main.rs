//! The `thinkshort` command line.

use clap::{Parser, Subcommand};
use thinkshort::block_cache::BlockCache;
use thinkshort::commands::{
    bench, doctor, eval, generate, logprobs, selfcheck, sft, train, verify,
};

/// Freed large buffers are reused instead of unmapped (see block_cache.rs: the CPU backend's
/// steps otherwise spend much of their time faulting in fresh pages); THINKSHORT_BLOCK_CACHE=0
/// turns that off.
#[global_allocator]
static ALLOCATOR: BlockCache = BlockCache::new();

#[derive(Parser)]
#[command(
    name = "thinkshort",
    version,
    about = "Curriculum GRPO: train language models to reason correctly in fewer tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt (greedy or sampled) under a token budget.
    Generate(generate::GenerateArgs),
    /// Per-token log-probabilities of completions given prompts (JSONL in, JSONL out).
    Logprobs(logprobs::LogprobsArgs),
    /// Curriculum GRPO; with no arguments, the built-in demo.
    Train(train::TrainArgs),
    /// Supervised fine-tuning on prompt/completion pairs (or build the demo model with --demo).
    Sft(sft::SftArgs),
    /// Accuracy and mean generated tokens on the math benchmarks, at one or several budgets.
    Eval(eval::EvalArgs),
    /// Judge responses against gold answers (JSONL in, JSONL out).
    Verify(verify::VerifyArgs),
    /// Report the version, backends, CUDA driver, kernels and GPUs.
    Doctor(doctor::DoctorArgs),
    /// Compare every op of a device backend (and a tiny model) with the CPU reference.
    Selfcheck(selfcheck::SelfcheckArgs),
    /// Throughput benchmarks on random-weight models (`bench forward`).
    Bench(bench::BenchArgs),
}

/// Output into a closed pipe (`thinkshort doctor | head -1`) ends the process quietly, as it
/// ends other Unix tools, instead of Rust's default: ignore SIGPIPE, then panic on the failed
/// write.
fn end_quietly_on_closed_pipe() {
    // SAFETY: restores the signal's default disposition at start, before any thread exists.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> std::process::ExitCode {
    end_quietly_on_closed_pipe();
    if std::env::var_os("THINKSHORT_BLOCK_CACHE").is_some_and(|v| v == "0") {
        ALLOCATOR.set_enabled(false);
    }
    let cli = Cli::parse();
    let result = on_a_worker_thread(|| run(&cli));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs `work` on one of rayon's worker threads: the CPU backend's parallel ops then start on
/// the thread that needs them, instead of handing each one from the main thread to the pool and
/// sleeping until it is done (two thread switches per op, a fifth of the demo's time on 2 cores).
fn on_a_worker_thread<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    // the main thread's stack size, which the commands were written for
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .thread_name(|i| format!("thinkshort-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Logprobs(a) => logprobs::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Sft(a) => sft::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Selfcheck(a) => selfcheck::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
