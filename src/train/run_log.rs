//! The run folder's logs: metrics.jsonl (one line per step), eval.jsonl (one line per held-out
//! evaluation) and completions.jsonl (the sampled completions of every `completions_every`-th
//! step and the held-out evaluations' responses). A fresh run starts them empty; a resumed run
//! keeps what was written up to its checkpoint and drops the rest, so the logs continue exactly
//! where the state does.

use super::metrics::StepMetrics;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const EVAL_FILE: &str = "eval.jsonl";
pub const COMPLETIONS_FILE: &str = "completions.jsonl";

/// One held-out evaluation: greedy, at the final budget, after `step` steps of training.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalLine {
    pub step: usize,
    pub budget: usize,
    pub accuracy: f64,
    pub mean_len: f64,
    pub truncated_frac: f64,
}

/// One completion: a rollout of step `step` (split "train"), or a held-out evaluation's
/// response after `step` steps (split "eval").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionLine {
    pub step: usize,
    pub split: String,
    pub budget: usize,
    /// train: the prompt's index within the step (its group); eval: the problem's index.
    pub group: usize,
    /// train: the sample's index within its group; eval: 0.
    pub sample: usize,
    pub question: String,
    pub gold: String,
    /// The completion as decoded (special tokens left out).
    pub text: String,
    /// ℓ: generated tokens without the EOS.
    pub len: usize,
    pub truncated: bool,
    pub correct: bool,
    /// train only: the total reward, its length and format parts, and the group advantage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_length: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_format: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advantage: Option<f64>,
}

/// The open logs of a run.
pub struct RunLog {
    out: PathBuf,
    metrics: BufWriter<File>,
    eval_file: BufWriter<File>,
    completions: BufWriter<File>,
    /// Every evaluation line of the run so far (kept ones included).
    evals: Vec<EvalLine>,
}

impl RunLog {
    /// Opens the logs of the run folder `out`. A fresh run (`resumed_at` None) empties them; a
    /// run resumed from the checkpoint of step S of `steps` keeps the metrics of steps < S, the
    /// rollouts of steps < S and the evaluations before S, and at S unless S = `steps` (that
    /// evaluation, the final one, runs again). Returns the metrics kept.
    pub fn open(
        out: &Path,
        resumed_at: Option<usize>,
        steps: usize,
    ) -> Result<(Self, Vec<StepMetrics>)> {
        let kept_eval = |step: usize| match resumed_at {
            Some(s) => step < s || (step == s && s < steps),
            None => false,
        };
        let metrics: Vec<StepMetrics> = keep_lines(&out.join(METRICS_FILE), |m: &StepMetrics| {
            resumed_at.is_some_and(|s| m.step < s)
        })?;
        let evals = keep_lines(&out.join(EVAL_FILE), |e: &EvalLine| kept_eval(e.step))?;
        keep_lines(&out.join(COMPLETIONS_FILE), |c: &CompletionLine| {
            if c.split == "eval" {
                kept_eval(c.step)
            } else {
                resumed_at.is_some_and(|s| c.step < s)
            }
        })?;
        let log = RunLog {
            out: out.to_path_buf(),
            metrics: append(&out.join(METRICS_FILE))?,
            eval_file: append(&out.join(EVAL_FILE))?,
            completions: append(&out.join(COMPLETIONS_FILE))?,
            evals,
        };
        Ok((log, metrics))
    }

    /// Appends a step's metrics line (flushed: the file is complete after every step).
    pub fn step(&mut self, m: &StepMetrics) -> Result<()> {
        write_line(&mut self.metrics, m, &self.out.join(METRICS_FILE))
    }

    pub fn eval(&mut self, e: &EvalLine) -> Result<()> {
        write_line(&mut self.eval_file, e, &self.out.join(EVAL_FILE))?;
        self.evals.push(e.clone());
        Ok(())
    }

    /// The run's evaluations so far, in order.
    pub fn evals(&self) -> &[EvalLine] {
        &self.evals
    }

    /// Appends completion lines (flushed after the last).
    pub fn completions(&mut self, lines: &[CompletionLine]) -> Result<()> {
        let path = self.out.join(COMPLETIONS_FILE);
        for line in lines {
            serde_json::to_writer(&mut self.completions, line)?;
            self.completions
                .write_all(b"\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        self.completions
            .flush()
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

fn append(path: &Path) -> Result<BufWriter<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok(BufWriter::new(file))
}

fn write_line<T: Serialize>(w: &mut BufWriter<File>, value: &T, path: &Path) -> Result<()> {
    let write = |w: &mut BufWriter<File>| -> std::io::Result<()> {
        serde_json::to_writer(&mut *w, value)?;
        w.write_all(b"\n")?;
        w.flush()
    };
    write(w).with_context(|| format!("cannot write {}", path.display()))
}

/// Rewrites the JSONL file at `path` (when it exists) with only the lines `keep` accepts;
/// returns them. A line that does not parse is an error naming the file and line.
fn keep_lines<T, F>(path: &Path, keep: F) -> Result<Vec<T>>
where
    T: Serialize + for<'de> Deserialize<'de>,
    F: Fn(&T) -> bool,
{
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = Vec::new();
    let mut rewritten = String::new();
    for (n, line) in text.lines().enumerate() {
        let value: T = serde_json::from_str(line).with_context(|| {
            format!("{} line {}: not a line of this log", path.display(), n + 1)
        })?;
        if keep(&value) {
            rewritten.push_str(line);
            rewritten.push('\n');
            kept.push(value);
        }
    }
    std::fs::write(path, rewritten)
        .with_context(|| format!("cannot rewrite {}", path.display()))?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval_line(step: usize) -> EvalLine {
        EvalLine {
            step,
            budget: 20,
            accuracy: 0.5,
            mean_len: 10.0,
            truncated_frac: 0.0,
        }
    }

    fn completion(step: usize, split: &str) -> CompletionLine {
        CompletionLine {
            step,
            split: split.to_string(),
            budget: 20,
            group: 0,
            sample: 0,
            question: "q".into(),
            gold: "1".into(),
            text: "t".into(),
            len: 1,
            truncated: false,
            correct: true,
            reward: (split == "train").then_some(0.5),
            reward_length: None,
            reward_format: None,
            advantage: None,
        }
    }

    /// A run of 10 steps that wrote steps 0..6, evaluations at 0, 3 and 6, is resumed from its
    /// checkpoint at step 3: steps 0..3 stay, the evaluations at 0 and 3 stay (the one at 3
    /// preceded the checkpoint and is not repeated). Resumed at the last step, the final
    /// evaluation goes (it runs again); a fresh run empties every log.
    #[test]
    fn resume_keeps_what_the_checkpoint_has_seen() {
        let dir = tempfile::tempdir().unwrap();
        let write_all = || {
            let (mut log, kept) = RunLog::open(dir.path(), None, 10).unwrap();
            assert!(kept.is_empty());
            for step in 0..6 {
                log.step(&StepMetrics {
                    step,
                    ..Default::default()
                })
                .unwrap();
                log.completions(&[completion(step, "train")]).unwrap();
            }
            for step in [0, 3, 6, 10] {
                log.eval(&eval_line(step)).unwrap();
                log.completions(&[completion(step, "eval")]).unwrap();
            }
        };
        write_all();
        let (_, kept) = RunLog::open(dir.path(), Some(3), 10).unwrap();
        assert_eq!(kept.iter().map(|m| m.step).collect::<Vec<_>>(), [0, 1, 2]);
        let evals: Vec<EvalLine> =
            keep_lines(&dir.path().join(EVAL_FILE), |_: &EvalLine| true).unwrap();
        assert_eq!(evals, [eval_line(0), eval_line(3)]);
        let lines: Vec<CompletionLine> =
            keep_lines(&dir.path().join(COMPLETIONS_FILE), |_: &CompletionLine| {
                true
            })
            .unwrap();
        let steps: Vec<(usize, &str)> = lines.iter().map(|c| (c.step, c.split.as_str())).collect();
        assert_eq!(
            steps,
            [
                (0, "train"),
                (1, "train"),
                (2, "train"),
                (0, "eval"),
                (3, "eval")
            ]
        );

        write_all();
        RunLog::open(dir.path(), Some(10), 10).unwrap();
        let evals: Vec<EvalLine> =
            keep_lines(&dir.path().join(EVAL_FILE), |_: &EvalLine| true).unwrap();
        assert_eq!(evals, [eval_line(0), eval_line(3), eval_line(6)]);

        write_all();
        RunLog::open(dir.path(), None, 10).unwrap();
        for file in [METRICS_FILE, EVAL_FILE, COMPLETIONS_FILE] {
            assert_eq!(std::fs::read_to_string(dir.path().join(file)).unwrap(), "");
        }
    }

    #[test]
    fn a_bad_line_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(EVAL_FILE), "{\"step\": 0, \"budget\": 1, \"accuracy\": 0, \"mean_len\": 0, \"truncated_frac\": 0}\nnot json\n").unwrap();
        let err = RunLog::open(dir.path(), Some(1), 10).err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("eval.jsonl line 2"), "{msg}");
    }
}
