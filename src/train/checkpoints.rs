//! A run's checkpoints: what a checkpoint folder holds besides the weights (the trainer state),
//! writing and pruning checkpoint folders, and the checks that let a resumed run continue its
//! checkpoint's run exactly.

use super::optimizer::{DeviceOptimizer, OptimizerPart};
use super::TrainInputs;
use crate::backend::TrainBackend;
use crate::checkpoint::{save_moments, write_folder_atomically, write_model_files, OPTIMIZER_FILE};
use crate::curriculum::{Curriculum, Schedule};
use crate::optim::AdamW;
use crate::params::ParamLayout;
use crate::train_config::TrainConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The trainer state saved next to the weights of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    pub curriculum: Curriculum,
    pub optimizer: AdamW,
    /// What each step's problems were drawn from: the training set's size and the seed (absent
    /// in checkpoints written before they were saved). A resume that would draw from others is
    /// refused. A run without `train_examples` held out eval_size examples of its data file even
    /// without evaluation: resumed, it holds them out again and its checkpoints go on without
    /// the count.
    #[serde(default)]
    pub train_examples: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Fails unless `dir` is a checkpoint folder (it has a trainer_state.json); a run folder's
/// error names one of its checkpoints.
pub(super) fn check_checkpoint_folder(dir: &Path) -> Result<()> {
    if dir.join("trainer_state.json").is_file() {
        return Ok(());
    }
    let hint = match checkpoint_folders(dir).unwrap_or_default().last() {
        Some((_, last)) => format!(
            " (a run folder: give one of its checkpoints, e.g. {})",
            last.display()
        ),
        None => String::new(),
    };
    bail!(
        "--resume {}: not a checkpoint folder, it has no trainer_state.json{hint}",
        dir.display()
    );
}

/// The trainer state of checkpoint folder `dir` for a model of `n` parameters, and its moments
/// file; None when an older checkpoint keeps the moments inside trainer_state.json.
pub(super) fn read_state(
    dir: &Path,
    layout: &ParamLayout,
) -> Result<(TrainerState, Option<PathBuf>)> {
    let n = layout.total_len();
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--resume: cannot read {}", path.display()))?;
    let mut state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("--resume: {} is not a trainer state", path.display()))?;
    let moments = dir.join(OPTIMIZER_FILE);
    let (m, v) = (&state.optimizer.m, &state.optimizer.v);
    if moments.is_file() {
        Ok((state, Some(moments)))
    } else if m.is_empty() {
        bail!(
            "--resume: {} is missing (the optimizer's moments)",
            moments.display()
        );
    } else if m.len() != n || v.len() != n {
        bail!(
            "--resume: {} holds optimizer moments for {} parameters, the model has {n}",
            path.display(),
            m.len()
        );
    } else {
        // kept tensor after tensor in list order, as optimizer.safetensors keeps them
        let opt = &mut state.optimizer;
        (opt.m, opt.v) = (
            layout.from_list_order(&opt.m),
            layout.from_list_order(&opt.v),
        );
        Ok((state, None))
    }
}

/// Writes weights (the f32 master weights of `opt`, [N] in `layout`'s storage order), tokenizer files,
/// the optimizer's moments and the trainer state, atomically. The parts come to the host one
/// after the other (the weights, then both moments), so the host holds at most 8 bytes per
/// parameter more than it did (none with the optimizer offloaded or on the CPU, where they are
/// read in place).
pub fn save_checkpoint<B: TrainBackend>(
    dir: &Path,
    inputs: &TrainInputs,
    layout: &ParamLayout,
    opt: &DeviceOptimizer<B>,
    b: &B,
    state: &TrainerState,
) -> Result<()> {
    write_folder_atomically(dir, |tmp| {
        let master = opt.part(b, OptimizerPart::Master)?;
        write_model_files(tmp, &inputs.model_dir, layout, &master)?;
        drop(master);
        let (m, v) = (
            opt.part(b, OptimizerPart::M)?,
            opt.part(b, OptimizerPart::V)?,
        );
        save_moments(&tmp.join(OPTIMIZER_FILE), layout, &m, &v)?;
        let path = tmp.join("trainer_state.json");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&path)?;
            file.write_all(serde_json::to_string(state)?.as_bytes())?;
            file.sync_all()
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Deletes all but the newest `keep` checkpoint folders (`step-NNNNNN`) of `out` up to step
/// `current` (the one just written); folders of later steps, left by an earlier attempt at the
/// run, are not this run's to judge and stay. A folder that cannot be deleted is reported, and
/// the run goes on.
pub(super) fn remove_old_checkpoints(out: &Path, keep: usize, current: usize) {
    let Ok(mut steps) = checkpoint_folders(out) else {
        eprintln!("\nkeep_checkpoints: cannot list {}", out.display());
        return;
    };
    steps.retain(|&(step, _)| step <= current);
    for (_, path) in steps.iter().rev().skip(keep) {
        if let Err(e) = std::fs::remove_dir_all(path) {
            eprintln!("\nkeep_checkpoints: cannot remove {}: {e}", path.display());
        }
    }
}

/// A resumed run continues its checkpoint's curriculum (schedule, steps, adaptive state) and
/// AdamW settings; settings that differ from them would be silently ignored, so they are an
/// error.
pub(super) fn check_resumed_settings(
    state: &TrainerState,
    cfg: &TrainConfig,
    train_examples: usize,
) -> Result<()> {
    let hint = "resume with the settings the run started with (its folder's config.toml)";
    if let Some(was) = state.train_examples.filter(|&was| was != train_examples) {
        bail!(
            "--resume: the checkpoint's run drew its problems from {was} training examples, these \
             settings give {train_examples} (data, eval_size and eval_every decide them: eval_size \
             examples are held out when eval_every > 0); {hint}"
        );
    }
    if let Some(was) = state.seed.filter(|&was| was != cfg.seed) {
        bail!(
            "--resume: the checkpoint's run has seed = {was}, the settings {}; {hint}",
            cfg.seed
        );
    }
    let c = &state.curriculum;
    if state.step > c.total_steps {
        bail!(
            "--resume: the checkpoint is at step {} of a {}-step run: its trainer_state.json is \
             not this run's",
            state.step,
            c.total_steps
        );
    }
    // AdamW steps once per epoch of a step that was not skipped: more than that means the
    // state's step was changed (resuming would redo steps, over their checkpoints)
    let most = state.step as u64 * cfg.loss.epochs.max(1) as u64;
    if state.optimizer.t > most {
        bail!(
            "--resume: the checkpoint says step {} but its optimizer has taken {} steps (at most \
             {most} with loss.epochs = {}): its trainer_state.json is damaged, or the run had \
             more loss.epochs",
            state.step,
            state.optimizer.t,
            cfg.loss.epochs
        );
    }
    if c.total_steps != cfg.steps {
        bail!(
            "--resume: the checkpoint's run has steps = {}, the settings {}; {hint}",
            c.total_steps,
            cfg.steps
        );
    }
    // compared as they act: a generalised or linear schedule without its own steps spreads its
    // drops over the run's
    let acting = |s: &Schedule, total: usize| match s.clone() {
        Schedule::Generalised { b0, bf, n, steps } => Schedule::Generalised {
            b0,
            bf,
            n,
            steps: Some(steps.unwrap_or(total)),
        },
        Schedule::Linear { b0, bf, n, steps } => Schedule::Linear {
            b0,
            bf,
            n,
            steps: Some(steps.unwrap_or(total)),
        },
        other => other,
    };
    if acting(&c.schedule, c.total_steps) != acting(&cfg.schedule, cfg.steps) {
        bail!(
            "--resume: the checkpoint's schedule {} differs from the settings' {}; {hint}",
            serde_json::to_string(&c.schedule)?,
            serde_json::to_string(&cfg.schedule)?
        );
    }
    let (a, o) = (&state.optimizer, &cfg.optim);
    for (key, was, now) in [
        ("beta1", a.beta1, o.beta1),
        ("beta2", a.beta2, o.beta2),
        ("eps", a.eps, o.eps),
        ("weight_decay", a.weight_decay, o.weight_decay),
    ] {
        if was != now {
            bail!(
                "--resume: optim.{key} is {was} in the checkpoint, {now} in the settings; {hint}"
            );
        }
    }
    Ok(())
}

/// Whether the run writes a checkpoint after `step` steps: every `checkpoint_every` and at its
/// `last` step.
pub(super) fn writes_checkpoint(cfg: &TrainConfig, step: usize, last: usize) -> bool {
    (cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every)) || step == last
}

/// The checkpoint folders (`step-NNNNNN`) of a run folder, by step.
fn checkpoint_folders(out: &Path) -> std::io::Result<Vec<(usize, PathBuf)>> {
    let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(out)?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let step: usize = path
                .file_name()?
                .to_str()?
                .strip_prefix("step-")
                .filter(|d| d.len() >= 6 && d.bytes().all(|b| b.is_ascii_digit()))?
                .parse()
                .ok()?;
            path.is_dir().then_some((step, path))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

/// A fresh run in a folder that holds checkpoints of an earlier run leaves them there (its
/// logs start anew): says so, as a later --resume from one of them would mix the two runs.
pub(super) fn warn_of_earlier_checkpoints(out: &Path) {
    let earlier: Vec<String> = checkpoint_folders(out)
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, path)| Some(path.file_name()?.to_string_lossy().into_owned()))
        .collect();
    if !earlier.is_empty() {
        eprintln!(
            "note: {} holds checkpoints of an earlier run ({}); this run starts its logs anew and \
             replaces a checkpoint only when it reaches the same step: delete them or use another --out",
            out.display(),
            earlier.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume that would draw its problems from another training set (other data, or examples
    /// held out or not) or seed is refused; a checkpoint written before they were saved is not
    /// checked for them.
    #[test]
    fn resume_refuses_another_training_set_or_seed() {
        let cfg = TrainConfig::default();
        let state = |train_examples, seed| TrainerState {
            step: 1,
            curriculum: cfg.curriculum().unwrap(),
            optimizer: AdamW::new(1, 0.9, 0.999, 1e-8, 0.0),
            train_examples,
            seed,
        };
        assert!(check_resumed_settings(&state(Some(7473), Some(0)), &cfg, 7473).is_ok());
        let err = check_resumed_settings(&state(Some(7473), Some(0)), &cfg, 7273).unwrap_err();
        assert!(
            err.to_string()
                .contains("from 7473 training examples, these settings give 7273"),
            "{err}"
        );
        let err = check_resumed_settings(&state(Some(7473), Some(5)), &cfg, 7473).unwrap_err();
        assert!(
            err.to_string().contains("seed = 5, the settings 0"),
            "{err}"
        );
        assert!(check_resumed_settings(&state(None, None), &cfg, 10).is_ok());
    }
}
