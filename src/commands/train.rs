//! `thinkshort train`: curriculum GRPO. With no arguments it runs the built-in demo: the demo
//! model (models/demo, built by `thinkshort sft --demo`) on the synthetic arithmetic task.

use crate::backend::BackendKind;
use crate::demo::task;
use crate::prompt::PromptTemplate;
use crate::train::{
    load_examples, train, EvalResult, Example, RunControl, RunSummary, TrainInputs,
};
use crate::train_config::TrainConfig;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML file with the training settings (every key has a default; see README).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. `--set loss.beta=0` or `--set schedule.kind=constant`
    /// (repeatable, applied after --config and before --preset).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run folder: metrics.jsonl, config.toml, checkpoints, plot.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Continue from a checkpoint folder written by an earlier run (its step-NNNNNN folder).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop after this many steps in total (writing a checkpoint), to be continued with --resume.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Print the plan (steps, budgets, memory estimate, micro-batch) and stop before loading the
    /// weights; writes nothing, and fails as the run would when it does not fit.
    #[arg(long)]
    pub dry_run: bool,
    /// `fixed-budget`: the demo with the final budget from step 0 (the paper's baseline).
    #[arg(long)]
    pub preset: Option<String>,
    /// Device of the whole run (rollouts, update, evaluation); auto takes the GPU when there is one.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
}

/// The folder of the checked-in demo model.
pub const DEMO_MODEL: &str = "models/demo";
/// Seeds of the demo's training and held-out problems (the SFT data used seed 1).
const DEMO_TRAIN_SEED: u64 = 2;
const DEMO_EVAL_SEED: u64 = 3;

/// The demo's settings: 8 prompts × 8 samples per step, budgets 48 → 31 → 20 tokens (the SFT
/// model writes ~45), sampling at temperature 0.7 (the tiny model's arithmetic is brittle at 1.0),
/// a k3 KL penalty β = 0.1 to the SFT model (it keeps the arithmetic while the checks go: with
/// β = 0 the same run lost 9 points of accuracy, with 0.05 2.5, with 0.1 0.5).
pub fn demo_config() -> TrainConfig {
    let text = r#"
steps = 300
prompts_per_step = 8
group_size = 8
eval_every = 150
eval_size = 200
eval_max_tokens = 128
checkpoint_every = 0
prompt = "compute : {question} . budget : {budget} tokens ."
seed = 0

[sampling]
temperature = 0.7

[loss]
beta = 0.1

[optim]
lr = 1e-4
warmup = 10

[schedule]
kind = "exponential-step"
b0 = 48
gamma = 0.65
interval = 100
"#;
    TrainConfig::from_toml_str(text).expect("the demo config is valid")
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let device = super::resolve_backend(args.backend)?;
    // Without a settings file: the demo's settings, or the paper's defaults when `--set` names
    // a model or data (the demo's prompt, budgets and learning rate suit only the demo).
    let sets_key = |key: &str| {
        args.sets
            .iter()
            .any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key))
    };
    let mut cfg = match &args.config {
        Some(path) => TrainConfig::from_file(path)?,
        None if sets_key("model") || sets_key("data") => TrainConfig::default(),
        None => demo_config(),
    };
    let sets = args
        .sets
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .with_context(|| format!("--set {s}: expected KEY=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    cfg.set_all(&sets).context("--set")?;
    // The preset last: the final budget of the schedule and steps as set.
    match args.preset.as_deref() {
        None => {}
        Some("fixed-budget") => {
            let final_budget = cfg.curriculum()?.final_budget();
            cfg.set("schedule.kind", "\"constant\"")?;
            cfg.set("schedule.b", &final_budget.to_string())?;
        }
        Some(other) => bail!("--preset: unknown preset {other:?} (known: fixed-budget)"),
    }

    if let (Some(data), None) = (&cfg.data, &cfg.model) {
        bail!(
            "data = {} is set but model is not: set `model` to a Hugging Face model folder \
             (the demo model knows only the synthetic task)",
            data.display()
        );
    }
    let model_dir = cfg
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEMO_MODEL));
    if !model_dir.join("config.json").is_file() {
        bail!(
            "model folder {} has no config.json{}",
            model_dir.display(),
            if cfg.model.is_none() {
                " (the demo model is built with `thinkshort sft --demo --out models/demo`, see README)"
            } else {
                ""
            }
        );
    }
    let inputs = match &cfg.data {
        Some(path) => {
            let mut all = load_examples(path, cfg.data_format)?;
            // the held-out evaluation's problems, when there is one, are the file's last ones;
            // a run from before checkpoints kept `train_examples` held them out in any case
            let legacy = resumes_a_legacy_run(args.resume.as_deref());
            let held_out = if cfg.eval_every > 0 || legacy {
                cfg.eval_size
            } else {
                0
            };
            if all.len() <= held_out {
                bail!(
                    "{}: {} examples cannot hold out eval_size = {}",
                    path.display(),
                    all.len(),
                    cfg.eval_size
                );
            }
            let eval = all.split_off(all.len() - held_out);
            TrainInputs {
                model_dir,
                template: cfg.prompt_template()?,
                train: all,
                eval,
                is_correct: crate::train::answer_is_correct,
            }
        }
        None => TrainInputs {
            model_dir,
            // the paper's template is the default for real data; the demo model reads its own
            template: if cfg.prompt == TrainConfig::default().prompt {
                PromptTemplate::plain(task::PROMPT_TEMPLATE)?
            } else {
                cfg.prompt_template()?
            },
            train: demo_examples(DEMO_TRAIN_SEED, 5000),
            eval: demo_examples(DEMO_EVAL_SEED, cfg.eval_size as u64),
            is_correct: crate::train::answer_is_correct,
        },
    };
    let run = RunControl {
        out: &args.out,
        resume: args.resume.as_deref(),
        stop_after: args.stop_after,
        dry_run: args.dry_run,
        interrupt: Some(&INTERRUPTED),
    };
    stop_after_the_step_on_interrupt();
    let summary = train(&cfg, &inputs, &run, device)?;
    if args.dry_run {
        return Ok(());
    }
    report(&summary, &args.out)
}

/// Set by the first Ctrl-C (SIGINT) or SIGTERM of a run: it ends after the step in progress,
/// with a checkpoint. A second one of either kind ends the process at once (the default actions,
/// put back: a scheduler's SIGTERM after a user's Ctrl-C must not wait for the step).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    let note = b"\ninterrupted: the run stops after this step, with a checkpoint (interrupt \
                 again to stop it now, losing the step)\n";
    // SAFETY: signal and write are async-signal-safe; the buffer outlives the call.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::write(2, note.as_ptr().cast(), note.len());
    }
}

fn stop_after_the_step_on_interrupt() {
    // SAFETY: installs a handler that only stores to an atomic and makes async-signal-safe calls.
    #[cfg(unix)]
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether `--resume` names a checkpoint whose trainer_state.json has no `train_examples`: its
/// run dates from when eval_size examples were held out even without evaluation, and resuming
/// it exactly holds them out too. A missing or unreadable state is left to `train` to report.
fn resumes_a_legacy_run(resume: Option<&Path>) -> bool {
    #[derive(serde::Deserialize)]
    struct Saved {
        train_examples: Option<usize>,
    }
    // read as a stream: an old state holds the optimizer's moments too (gigabytes)
    let Some(file) =
        resume.and_then(|dir| std::fs::File::open(dir.join("trainer_state.json")).ok())
    else {
        return false;
    };
    serde_json::from_reader::<_, Saved>(std::io::BufReader::new(file))
        .is_ok_and(|saved| saved.train_examples.is_none())
}

fn demo_examples(seed: u64, count: u64) -> Vec<Example> {
    task::problems(seed, count)
        .into_iter()
        .map(|p| Example {
            gold: p.gold(),
            question: p.question,
        })
        .collect()
}

/// Prints the before/after table and draws the plot next to metrics.jsonl.
fn report(s: &RunSummary, out: &Path) -> Result<()> {
    // A resumed run did not evaluate before training itself: its run folder's eval.jsonl did.
    let before = s.before.or_else(|| {
        s.evals.iter().find(|e| e.step == 0).map(|e| EvalResult {
            accuracy: e.accuracy,
            mean_len: e.mean_len,
            truncated_frac: e.truncated_frac,
        })
    });
    if let (Some(b), Some(a)) = (before, s.after) {
        println!(
            "\nheld-out greedy evaluation at the final budget ({} tokens):",
            s.final_budget
        );
        println!("| model | accuracy | mean tokens | truncated |");
        println!("|---|---|---|---|");
        let row = |name: &str, e: &EvalResult| {
            println!(
                "| {name} | {:.1} % | {:.1} | {:.1} % |",
                100.0 * e.accuracy,
                e.mean_len,
                100.0 * e.truncated_frac
            )
        };
        row("before", &b);
        row("after", &a);
        println!(
            "mean length change: {:+.1} %, accuracy change: {:+.1} points",
            100.0 * (a.mean_len / b.mean_len - 1.0),
            100.0 * (a.accuracy - b.accuracy)
        );
        if let Some(p) = &s.paired {
            match p.interval95() {
                None => println!(
                    "problem by problem: none of the {} changed its verdict",
                    p.problems
                ),
                Some((lo, hi)) => println!(
                    "problem by problem: {} of {} became right, {} became wrong; the accuracy \
                     change's 95 % interval is {:+.1} to {:+.1} points",
                    p.gained,
                    p.problems,
                    p.lost,
                    100.0 * lo,
                    100.0 * hi
                ),
            }
        }
    }
    let png = out.join("training.png");
    crate::plot::plot_metrics(&s.metrics, &s.evals, &png)?;
    println!(
        "metrics: {}, plot: {}",
        out.join("metrics.jsonl").display(),
        png.display()
    );
    Ok(())
}
