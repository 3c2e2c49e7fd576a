//! Curriculum GRPO (METHOD.md): per step, sample G completions for each of P prompts under the
//! current budget, score them (correctness, length, format), normalise rewards within each group,
//! and take clipped policy-gradient steps; the budget tightens on the configured schedule.

mod checkpoints;
mod evaluate;
pub mod halving;
pub mod memory;
pub mod metrics;
pub mod optimizer;
pub mod progress;
pub mod run_log;
pub mod update;

use crate::backend::cpu::CpuBackend;
use crate::backend::{BackendKind, TrainBackend};
use crate::checkpoint::load_moments;
use crate::config::ModelConfig;
use crate::cuda::CudaBackend;
use crate::grpo::reward::reward;
use crate::model::Model;
use crate::optim::AdamW;
use crate::params::ParamLayout;
use crate::prompt::PromptTemplate;
use crate::rollout::{sample_groups, RolloutSettings};
use crate::tokenizer::Tokenizer;
use crate::train_config::{OldLogp, TrainConfig};
use anyhow::{bail, Context, Result};
use halving::halving_on_out_of_memory;
use metrics::{mean, quantile, std, StepMetrics};
use optimizer::DeviceOptimizer;
use rayon::prelude::*;
use run_log::{CompletionLine, EvalLine, RunLog};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use update::{completion_logprobs, policy_update, UpdateBatch, UpdateOptions};

use checkpoints::{
    check_checkpoint_folder, check_resumed_settings, read_state, remove_old_checkpoints,
    warn_of_earlier_checkpoints, writes_checkpoint,
};
pub use checkpoints::{save_checkpoint, TrainerState};
pub use evaluate::{evaluate, EvalResult, Evaluation};

/// A training or evaluation problem: the question and its gold answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub question: String,
    pub gold: String,
}

/// Everything a run needs besides its configuration.
pub struct TrainInputs {
    pub model_dir: PathBuf,
    pub template: PromptTemplate,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    /// Decides correctness of a completion's text against a gold answer.
    pub is_correct: fn(&str, &str) -> bool,
}

/// The training reward's correctness: the first well-formed `<answer>…</answer>` span only (no
/// fallbacks), judged by the answer verifier.
pub fn answer_is_correct(text: &str, gold: &str) -> bool {
    let strict = crate::verify::ExtractOptions {
        boxed_fallback: false,
        number_fallback: false,
    };
    crate::verify::verify(text, gold, &strict).correct
}

/// Loads training problems from JSONL (`{question, answer}`; GSM8K answers end in `#### N`).
pub fn load_examples(path: &Path, format: crate::train_config::DataFormat) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read training data {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let field = |k: &str| -> Result<String> {
            match v.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(x)) => Ok(x.to_string()),
                _ => bail!("{}: missing string key `{k}`", at()),
            }
        };
        let (question, answer) = (field("question")?, field("answer")?);
        let gold = match format {
            crate::train_config::DataFormat::Gsm8k => match answer.rsplit_once("####") {
                Some((_, g)) => g.trim().replace(',', ""),
                None => bail!("{}: GSM8K answer has no `#### N` gold answer", at()),
            },
            crate::train_config::DataFormat::Generic => answer.trim().to_string(),
        };
        if gold.is_empty() {
            bail!("{}: the gold answer is empty", at());
        }
        out.push(Example { question, gold });
    }
    if out.is_empty() {
        bail!("training data {} holds no examples", path.display());
    }
    Ok(out)
}

fn render_prompts(
    tok: &Tokenizer,
    template: &PromptTemplate,
    examples: &[Example],
    budget: usize,
) -> Result<Vec<Vec<u32>>> {
    examples
        .iter()
        .map(|e| tok.encode(&template.render(&e.question, Some(budget), tok)?))
        .collect()
}

/// The result of a whole run.
pub struct RunSummary {
    pub before: Option<EvalResult>,
    pub after: Option<EvalResult>,
    /// Before against after, problem by problem (a run that evaluated both itself).
    pub paired: Option<crate::paired::PairedChange>,
    pub final_budget: usize,
    pub metrics: Vec<StepMetrics>,
    /// Every held-out evaluation of the run (eval.jsonl).
    pub evals: Vec<EvalLine>,
}

/// Where a run writes and how much of it to do.
pub struct RunControl<'a> {
    /// Run folder: metrics.jsonl, checkpoints, the resolved config.
    pub out: &'a Path,
    /// Checkpoint folder of an earlier run to continue from.
    pub resume: Option<&'a Path>,
    /// End the run after this many steps in total (with a checkpoint), as if interrupted.
    pub stop_after: Option<usize>,
    /// Print the plan (steps, budgets, memory estimate and micro-batch) and stop before loading
    /// the weights; nothing is written. A run that would not fit fails as it would for real.
    pub dry_run: bool,
    /// Once set (the command's Ctrl-C handler sets it), the run ends after the step in progress
    /// with a checkpoint, and returns an error that names it for --resume.
    pub interrupt: Option<&'a AtomicBool>,
}

/// Runs curriculum GRPO from `cfg` on `device` (resolved: CPU or CUDA), resuming from a
/// checkpoint folder when given, writing metrics.jsonl, checkpoints and the resolved config into
/// the run folder. A run stopped by `stop_after` is continued with `resume`.
pub fn train(
    cfg: &TrainConfig,
    inputs: &TrainInputs,
    run: &RunControl,
    device: BackendKind,
) -> Result<RunSummary> {
    match device {
        BackendKind::Cpu => train_on(CpuBackend, cfg, inputs, run),
        BackendKind::Cuda => train_on(CudaBackend::new(0)?, cfg, inputs, run),
        BackendKind::Auto => bail!("train needs a resolved backend, not auto"),
    }
}

/// `train` on `backend` (the tests run the CUDA backend over an emulated device).
pub fn train_on<B: TrainBackend>(
    backend: B,
    cfg: &TrainConfig,
    inputs: &TrainInputs,
    run: &RunControl,
) -> Result<RunSummary> {
    let (out, resume, stop_after) = (run.out, run.resume, run.stop_after);
    cfg.validate()?;
    if inputs.train.is_empty() {
        bail!("no training examples");
    }
    if let Some(dir) = resume {
        check_checkpoint_folder(dir)?;
    }
    let weights_dir = resume.unwrap_or(&inputs.model_dir);
    let tok = Tokenizer::from_model_dir(&inputs.model_dir)?;
    let model_cfg = ModelConfig::from_model_dir(weights_dir)?;
    let layout = ParamLayout::new(&model_cfg);
    let n = layout.total_len();
    // A resumed run's moments are read last (below), after the weights: the host then holds
    // the moments and the master weights, not those and the reference policy's weights too.
    let (state, moments_file) = match resume {
        Some(dir) => read_state(dir, &layout)?,
        None => {
            let o = &cfg.optim;
            let fresh = TrainerState {
                step: 0,
                curriculum: cfg.curriculum()?,
                optimizer: AdamW::new(n, o.beta1, o.beta2, o.eps, o.weight_decay),
                train_examples: Some(inputs.train.len()),
                seed: Some(cfg.seed),
            };
            (fresh, None)
        }
    };
    if resume.is_some() {
        check_resumed_settings(&state, cfg, inputs.train.len())?;
    }
    // what its checkpoints record: None goes on for a run from before the count was kept
    let train_examples = state.train_examples;
    let sequences = cfg.prompts_per_step * cfg.group_size;
    let prompt_len = longest_prompt(&tok, inputs, state.curriculum.budget_at(state.step))?;
    // Every sequence of the run (rollouts, the held-out evaluation) within the model's
    // positions, checked before anything loads.
    let longest_cap = (state.step..cfg.steps)
        .map(|s| cfg.cap_at(&state.curriculum, s))
        .max()
        .unwrap_or(0);
    let longest_new = longest_cap.max(if cfg.eval_every > 0 {
        cfg.eval_max_tokens
    } else {
        0
    });
    if prompt_len + longest_new > model_cfg.max_position_embeddings {
        bail!(
            "prompts of up to {prompt_len} tokens with up to {longest_new} new tokens exceed the \
             model's max_position_embeddings of {}: lower the budgets, sampling.cap_factor or \
             eval_max_tokens",
            model_cfg.max_position_embeddings
        );
    }
    let shape = memory::RunShape {
        sequences,
        prompts: cfg.prompts_per_step,
        micro_batch: 0,
        prompt_len,
        // the largest cap ahead: a `list` schedule may raise the budget later
        cap: longest_cap,
        eval_sequences: if cfg.eval_every > 0 {
            inputs.eval.len().min(sequences)
        } else {
            0
        },
        eval_cap: cfg.eval_max_tokens,
        reference: cfg.loss.beta > 0.0,
        offload: cfg.optim.offload,
        checkpoint_layers: cfg.activation_checkpointing,
    };
    let estimate = |micro_batch| {
        memory::TrainMemory::estimate(
            &model_cfg,
            backend.storage_bytes(),
            crate::model::HEAD_CHUNK_BYTES,
            &memory::RunShape {
                micro_batch,
                ..shape
            },
        )
    };
    let free = backend.free_memory()?;
    // The automatic choice leaves a tenth of the free memory to what the estimate does not
    // count (the pool's fragmentation, cuBLAS workspaces, small buffers).
    let room = free.map(|f| f - f / 10);
    let mut micro_batch = memory::micro_batch(cfg.micro_batch, sequences, room, estimate);
    if run.dry_run {
        print_plan(cfg, inputs, &model_cfg, &state, prompt_len, backend.name());
    }
    let plan = estimate(micro_batch);
    plan.check(backend.name(), free)?;
    plan.check_host(memory::host_available())?;
    if free.is_none() {
        plan.check_cpu(memory::host_available())?;
    }
    // Before anything is loaded or written: a run with steps to take, and checkpoint folders
    // it may write (one holding other files fails here, not after hours of training).
    let last = stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    if last <= state.step {
        bail!(
            "--stop-after {last} leaves no step to take: the run starts at step {} (a resumed \
             run's logs would be cut back to its checkpoint for nothing)",
            state.step
        );
    }
    for step in state.step + 1..=last {
        if writes_checkpoint(cfg, step, last) {
            crate::checkpoint::check_replaceable(&out.join(format!("step-{step:06}")))?;
        }
    }
    if run.dry_run {
        println!("dry run: the run fits; nothing was loaded or written");
        return Ok(RunSummary {
            before: None,
            after: None,
            paired: None,
            final_budget: state.curriculum.final_budget(),
            metrics: Vec::new(),
            evals: Vec::new(),
        });
    }
    // Only a run that fits writes anything.
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run folder {}", out.display()))?;
    // The resolved settings: the micro-batch as chosen, so the folder's config repeats the run.
    let resolved = TrainConfig {
        micro_batch,
        ..cfg.clone()
    };
    std::fs::write(out.join("config.toml"), resolved.to_toml_string())
        .with_context(|| format!("cannot write {}", out.join("config.toml").display()))?;
    if resume.is_none() {
        warn_of_earlier_checkpoints(out);
    }
    let (mut run_log, mut metrics_log) = RunLog::open(out, resume.map(|_| state.step), cfg.steps)?;
    if resume.is_some() && metrics_log.len() < state.step {
        eprintln!(
            "note: {} holds the metrics of {} of the {} steps before the checkpoint (resume into \
             the run's own folder to keep its logs whole); the logs go on from step {}",
            out.join(run_log::METRICS_FILE).display(),
            metrics_log.len(),
            state.step,
            state.step
        );
    }
    let TrainerState {
        step: mut current_step,
        mut curriculum,
        mut optimizer,
        ..
    } = state;
    let host = crate::weights::load_params(weights_dir, &model_cfg, &layout)?;
    let mut model = Model::from_host(model_cfg, &host, backend)?;
    model.checkpoint_layers = cfg.activation_checkpointing;
    // The reference policy is the model at the start of training (β = 0 keeps none): its weights
    // in a second buffer, swapped into the model for its forward pass. A fresh run copies the
    // model's weights on the device; a resumed one reads the start model's folder.
    let mut reference_params = match (cfg.loss.beta > 0.0, resume) {
        (false, _) => None,
        (true, None) => {
            let b = &model.backend;
            let mut start = b.empty(b.len(&model.params))?;
            b.copy(b.full_mut(&mut start), b.full(&model.params));
            Some(start)
        }
        (true, Some(_)) => {
            let start = crate::weights::load_params(&inputs.model_dir, &model.cfg, &model.layout)?;
            Some(model.backend.upload(&start)?)
        }
    };
    if let Some(path) = moments_file {
        let (m, v) = load_moments(&path, &layout).context("--resume")?;
        optimizer.m = m;
        optimizer.v = v;
    }
    // The host vectors become the offloaded optimizer's state, or are dropped once uploaded.
    let mut opt =
        DeviceOptimizer::with_placement(&model.backend, optimizer, host, cfg.optim.offload)?;
    let loss_opts = cfg.loss_options()?;
    let lr_schedule = cfg.lr_schedule();
    let sampling = cfg.sampling_params();
    let final_budget = curriculum.final_budget();
    // Held-out evaluation after `step` steps: greedy, at the final budget, logged.
    let held_out =
        |m: &Model<B>, step: usize, log: &mut RunLog| -> Result<(EvalResult, Vec<bool>)> {
            let e = evaluate(
                m,
                &tok,
                inputs,
                final_budget,
                cfg.eval_max_tokens,
                &cfg.sampling.stop,
                cfg.prompts_per_step * cfg.group_size,
            )?;
            log.eval(&EvalLine {
                step,
                budget: final_budget,
                accuracy: e.result.accuracy,
                mean_len: e.result.mean_len,
                truncated_frac: e.result.truncated_frac,
            })?;
            let verdicts = e.responses.iter().map(|(_, correct)| *correct).collect();
            if cfg.completions_every > 0 {
                let lines: Vec<CompletionLine> = e
                    .responses
                    .into_iter()
                    .map(|(r, correct)| {
                        let example = &inputs.eval[r.group];
                        CompletionLine {
                            step,
                            split: "eval".to_string(),
                            budget: final_budget,
                            group: r.group,
                            sample: 0,
                            question: example.question.clone(),
                            gold: example.gold.clone(),
                            text: r.text,
                            len: r.len,
                            truncated: r.truncated,
                            correct,
                            reward: None,
                            reward_length: None,
                            reward_format: None,
                            advantage: None,
                        }
                    })
                    .collect();
                log.completions(&lines)?;
            }
            Ok((e.result, verdicts))
        };

    let before = if cfg.eval_every > 0 && current_step == 0 {
        Some(held_out(&model, 0, &mut run_log)?)
    } else {
        None
    };
    let progress = progress::Progress::new(cfg.steps);
    let (p, g) = (cfg.prompts_per_step, cfg.group_size);

    while current_step < last {
        let step = current_step;
        let t0 = Instant::now();
        let budget = curriculum.budget_at(step);
        let cap = cfg.cap_at(&curriculum, step);

        // Prompts of this step: drawn by the counter-based RNG from (seed, step) alone.
        let picks: Vec<Example> = (0..p)
            .map(|i| {
                let stream = crate::rng::PROMPT_PICK_STREAM;
                let u = crate::rng::uniform(cfg.seed, stream, (step * p + i) as u64);
                inputs.train[(u * inputs.train.len() as f64) as usize % inputs.train.len()].clone()
            })
            .collect();
        let prompts = render_prompts(&tok, &inputs.template, &picks, budget)?;
        let settings = RolloutSettings {
            group_size: g,
            cap,
            sampling,
            stop: &cfg.sampling.stop,
        };
        let rollouts = sample_groups(&model, &tok, &prompts, &settings, cfg.seed, step as u64)?;
        let rollout_s = t0.elapsed().as_secs_f64();
        let rollout_tokens: usize = rollouts.iter().map(|r| r.completion_ids.len()).sum();

        // Rewards, then advantages within each group of G.
        // The answer verifier parses each completion's text: on the CPU threads (DESIGN.md).
        let correct: Vec<bool> = rollouts
            .par_iter()
            .map(|r| (inputs.is_correct)(&r.text, &picks[r.group].gold))
            .collect();
        let parts: Vec<_> = rollouts
            .iter()
            .zip(&correct)
            .map(|(r, &c)| {
                reward(
                    c,
                    r.len,
                    budget,
                    &r.text,
                    &cfg.reward.weights,
                    cfg.reward.shape,
                )
            })
            .collect();
        let totals: Vec<f64> = parts.iter().map(|x| x.total).collect();
        let keep = if cfg.advantage.filter_groups {
            Some(crate::grpo::advantage::keep_mixed_groups(&correct, g)?)
        } else {
            None
        };

        // The update: advantages within each group of G, then μ epochs over the batch;
        // logπold from the first forward pass.
        let seqs: Vec<(&[u32], &[u32])> = rollouts
            .iter()
            .map(|r| (r.prompt_ids.as_slice(), r.completion_ids.as_slice()))
            .collect();
        let train_tokens: usize = seqs.iter().map(|(p, c)| p.len() + c.len()).sum();
        let truncated: Vec<bool> = rollouts.iter().map(|r| r.truncated).collect();
        let sampler_logp: Vec<f32> = rollouts
            .iter()
            .flat_map(|r| r.logprobs.iter().copied())
            .collect();
        let old_from_sampler = cfg.loss.old_logp == OldLogp::Sampler;
        let temperature = sampling_temperature(cfg);
        let t_update = Instant::now();
        let ref_logp: Option<Vec<f32>> = match &mut reference_params {
            Some(reference) => {
                std::mem::swap(&mut model.params, reference);
                let logp = halving_on_out_of_memory(
                    &model.backend,
                    "the reference log-probs",
                    micro_batch,
                    seqs.len(),
                    true,
                    |size| completion_logprobs(&model, &seqs, size, temperature),
                );
                std::mem::swap(&mut model.params, reference);
                let (logp, ran_with) = logp?;
                micro_batch = ran_with;
                Some(logp)
            }
            None => None,
        };
        let lr = lr_schedule.at(step);
        let update = policy_update(
            &mut model,
            &mut opt,
            &UpdateBatch {
                seqs: &seqs,
                rewards: &totals,
                group_size: g,
                truncated: &truncated,
                keep: keep.as_deref(),
                ref_logp: ref_logp.as_deref(),
                old_logp: old_from_sampler.then_some(sampler_logp.as_slice()),
            },
            &UpdateOptions {
                loss: &loss_opts,
                advantage: &cfg.advantage,
                epochs: cfg.loss.epochs,
                temperature,
                lr,
                grad_clip: cfg.optim.grad_clip,
                micro_batch,
                halve_on_out_of_memory: true,
            },
        )?;
        micro_batch = update.micro_batch;
        let update_s = t_update.elapsed().as_secs_f64();
        if update.skipped {
            eprintln!(
                "\nstep {step}: non-finite loss ({}) or gradient norm ({}); update skipped",
                update.loss, update.grad_norm
            );
        }
        // How far the sampler's log-probs (decode path) are from the trainer's (training forward).
        let logp_gap = mean(
            &update
                .first_logp
                .iter()
                .zip(&sampler_logp)
                .map(|(&t, &s)| (t as f64 - s as f64).abs())
                .collect::<Vec<_>>(),
        );
        let (loss, lo, entropy, grad_norm, skipped) = (
            update.loss,
            update.stats,
            update.entropy,
            update.grad_norm,
            update.skipped,
        );

        let acc = mean(&correct.iter().map(|&c| c as u8 as f64).collect::<Vec<_>>());
        curriculum.observe(step, acc);
        let lens_f: Vec<f64> = rollouts.iter().map(|r| r.len as f64).collect();
        let split = |t: bool| {
            mean(
                &rollouts
                    .iter()
                    .filter(|r| r.truncated == t)
                    .map(|r| r.len as f64)
                    .collect::<Vec<_>>(),
            )
        };
        let (correct_part, length_part, format_part): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            parts.iter().map(|x| x.correct).collect(),
            parts.iter().map(|x| x.length).collect(),
            parts.iter().map(|x| x.format).collect(),
        );
        let step_s = t0.elapsed().as_secs_f64();
        let m = StepMetrics {
            step,
            budget,
            reward: mean(&totals),
            reward_correct: mean(&correct_part),
            reward_length: mean(&length_part),
            reward_format: mean(&format_part),
            accuracy: acc,
            mean_len: mean(&lens_f),
            p50_len: quantile(&lens_f, 0.5),
            p90_len: quantile(&lens_f, 0.9),
            truncated_frac: mean(
                &truncated
                    .iter()
                    .map(|&t| t as u8 as f64)
                    .collect::<Vec<_>>(),
            ),
            kl: lo.kl,
            clip_frac: lo.clip_frac(),
            entropy,
            grad_norm,
            tokens_per_s: (rollout_tokens + train_tokens * cfg.loss.epochs) as f64
                / step_s.max(1e-9),
            step_s,
            reward_std: std(&totals),
            clip_frac_low: lo.clip_frac_low,
            clip_frac_high: lo.clip_frac_high,
            lr,
            loss,
            mean_len_finished: split(false),
            mean_len_truncated: split(true),
            skipped,
            logp_gap,
            rollout_s,
            update_s,
            micro_batch,
            reward_correct_std: std(&correct_part),
            reward_length_std: std(&length_part),
            reward_format_std: std(&format_part),
        };
        run_log.step(&m)?;
        if cfg.completions_every > 0 && step % cfg.completions_every == 0 {
            // the advantages as METHOD.md §4 defines them (the update computes its own, in f32,
            // on the device)
            let advantages = crate::grpo::advantage::advantages(&totals, g, &cfg.advantage)?;
            let lines: Vec<CompletionLine> = rollouts
                .iter()
                .enumerate()
                .map(|(i, r)| CompletionLine {
                    step,
                    split: "train".to_string(),
                    budget,
                    group: r.group,
                    sample: i % g,
                    question: picks[r.group].question.clone(),
                    gold: picks[r.group].gold.clone(),
                    text: r.text.clone(),
                    len: r.len,
                    truncated: r.truncated,
                    correct: correct[i],
                    reward: Some(parts[i].total),
                    reward_length: Some(parts[i].length),
                    reward_format: Some(parts[i].format),
                    advantage: Some(advantages[i]),
                })
                .collect();
            run_log.completions(&lines)?;
        }
        current_step += 1;
        progress.update(
            current_step,
            &format!(
                "budget {budget} | acc {:.2} | len {:.1} | reward {:.3}",
                m.accuracy, m.mean_len, m.reward
            ),
        );
        metrics_log.push(m);

        if cfg.eval_every > 0 && current_step % cfg.eval_every == 0 && current_step < cfg.steps {
            let (e, _) = held_out(&model, current_step, &mut run_log)?;
            eprintln!(
                "\neval at step {}: accuracy {:.3}, mean length {:.1}",
                current_step, e.accuracy, e.mean_len
            );
        }
        let interrupted = run
            .interrupt
            .is_some_and(|flag| flag.load(Ordering::Relaxed));
        let checkpoint = out.join(format!("step-{current_step:06}"));
        if writes_checkpoint(cfg, current_step, last) || interrupted {
            let state = TrainerState {
                step: current_step,
                curriculum: curriculum.clone(),
                optimizer: opt.hyper().clone(),
                train_examples,
                seed: Some(cfg.seed),
            };
            save_checkpoint(
                &checkpoint,
                inputs,
                &model.layout,
                &opt,
                &model.backend,
                &state,
            )?;
            if cfg.keep_checkpoints > 0 {
                remove_old_checkpoints(out, cfg.keep_checkpoints, current_step);
            }
        }
        if interrupted && current_step < last {
            bail!(
                "interrupted after step {current_step} of {steps}: continue the run with \
                 --resume {dir} (and the same settings)",
                steps = cfg.steps,
                dir = checkpoint.display()
            );
        }
    }
    let after = if cfg.eval_every > 0 && current_step == cfg.steps {
        Some(held_out(&model, current_step, &mut run_log)?)
    } else {
        None
    };
    let paired = match (&before, &after) {
        (Some((_, b)), Some((_, a))) => {
            crate::paired::PairedChange::new(b.iter().copied().zip(a.iter().copied()))
        }
        _ => None,
    };
    Ok(RunSummary {
        before: before.map(|(result, _)| result),
        after: after.map(|(result, _)| result),
        paired,
        final_budget,
        metrics: metrics_log,
        evals: run_log.evals().to_vec(),
    })
}

/// What a run will do from the state it starts in: model size, steps and sequences, every
/// budget of the schedule with the step it starts at, the longest prompt and the problems.
fn print_plan(
    cfg: &TrainConfig,
    inputs: &TrainInputs,
    model_cfg: &ModelConfig,
    state: &TrainerState,
    prompt_len: usize,
    device: &str,
) {
    println!(
        "dry run: {:.1}M parameters on {device}; steps {} to {} of {} prompts × {} samples",
        model_cfg.num_params() as f64 / 1e6,
        state.step,
        cfg.steps,
        cfg.prompts_per_step,
        cfg.group_size
    );
    let c = &state.curriculum;
    let mut budgets: Vec<String> = Vec::new();
    let mut last = None;
    for step in state.step..cfg.steps {
        let b = c.budget_at(step);
        if last != Some(b) {
            budgets.push(format!(
                "{b} (cap {}) from step {step}",
                cfg.cap_at(c, step)
            ));
            last = Some(b);
        }
    }
    let adaptive = if c.adaptive.is_some() {
        "; adaptive: later budgets depend on the training accuracy"
    } else {
        ""
    };
    println!("budgets: {}{adaptive}", budgets.join(", "));
    let stops = if cfg.sampling.stop.is_empty() {
        "EOS".to_string()
    } else {
        format!("EOS or {:?}", cfg.sampling.stop)
    };
    println!("completions end at {stops}, or at the cap");
    println!("longest prompt: {prompt_len} tokens at the first budget");
    let evaluated = if cfg.eval_every > 0 {
        format!("{} held-out problems evaluated", inputs.eval.len())
    } else {
        "no held-out evaluation (eval_every = 0)".to_string()
    };
    println!("problems: {} to train on; {evaluated}", inputs.train.len());
    if cfg.activation_checkpointing {
        println!(
            "activation checkpointing: the update recomputes each layer's forward, up to its \
             MLP's activation, in its backward"
        );
    }
}

/// Log-probs are taken at the sampling temperature (METHOD.md §5); greedy sampling scores at 1.
fn sampling_temperature(cfg: &TrainConfig) -> f32 {
    if cfg.sampling.temperature > 0.0 {
        cfg.sampling.temperature as f32
    } else {
        1.0
    }
}

/// The longest rendered prompt (in tokens) of the training and evaluation problems at `budget`.
fn longest_prompt(tok: &Tokenizer, inputs: &TrainInputs, budget: usize) -> Result<usize> {
    let all: Vec<Example> = inputs.train.iter().chain(&inputs.eval).cloned().collect();
    Ok(render_prompts(tok, &inputs.template, &all, budget)?
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0))
}
