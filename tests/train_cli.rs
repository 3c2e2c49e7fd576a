//! `thinkshort train` end to end on the checked-in demo model: a shortened demo run, resume that
//! reproduces an uninterrupted run bit for bit, and config errors that name the key.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use thinkshort::backend::cpu::CpuBackend;
use thinkshort::grpo::{has_answer, has_think, length_reward, LengthShape};
use thinkshort::prompt::PromptTemplate;
use thinkshort::tokenizer::Tokenizer;
use thinkshort::train::{answer_is_correct, train_on, Example, RunControl, TrainInputs};

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    train_command(out, extra).output().unwrap()
}

/// `thinkshort train` on the CPU into `out`: the demo, shortened, with `extra` arguments.
fn train_command(out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinkshort"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--backend", "cpu", "--out"])
        .arg(out)
        .args([
            "--set",
            "prompts_per_step=2",
            "--set",
            "group_size=4",
            "--set",
            "eval_size=4",
            "--set",
            "eval_max_tokens=16",
        ]);
    cmd.args(extra);
    cmd
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every metric except the timings.
fn without_timings(mut m: Value) -> Value {
    for k in ["tokens_per_s", "step_s", "rollout_s", "update_s"] {
        m.as_object_mut().unwrap().remove(k);
    }
    m
}

#[test]
fn shortened_demo_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(&out, &["--set", "steps=3", "--set", "eval_every=3"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let m = metrics(&out);
    assert_eq!(m.len(), 3);
    let keys = [
        "step",
        "budget",
        "reward",
        "reward_correct",
        "reward_length",
        "reward_format",
        "accuracy",
        "mean_len",
        "p50_len",
        "p90_len",
        "truncated_frac",
        "kl",
        "clip_frac",
        "entropy",
        "grad_norm",
        "tokens_per_s",
        "step_s",
        "rollout_s",
        "update_s",
    ];
    for k in keys {
        assert!(m[0].get(k).is_some(), "metrics.jsonl lacks `{k}`");
    }
    for line in &m {
        let t = |k: &str| line[k].as_f64().unwrap();
        assert!(t("rollout_s") > 0.0 && t("update_s") > 0.0, "{line}");
        assert!(t("rollout_s") + t("update_s") <= t("step_s"), "{line}");
        // correctness is 0 or 1: its population variance is acc · (1 − acc)
        let acc = t("accuracy");
        assert!((t("reward_correct_std").powi(2) - acc * (1.0 - acc)).abs() < 1e-12);
        for part in ["length", "format"] {
            let sd = t(&format!("reward_{part}_std"));
            assert!((0.0..=1.0).contains(&sd), "reward_{part}_std {sd}");
        }
    }
    let b0 = thinkshort::commands::train::demo_config()
        .curriculum()
        .unwrap()
        .budget_at(0);
    assert_eq!(m[0]["budget"].as_u64().unwrap() as usize, b0);
    assert!(out.join("training.png").is_file());
    assert!(
        out.join("step-000003/model.safetensors").is_file()
            && out.join("step-000003/trainer_state.json").is_file()
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| before |") && stdout.contains("| after |"),
        "{stdout}"
    );
    // eval.jsonl: the evaluations before and after; completions.jsonl: step 0's 2 × 4
    // completions (completions_every = 10) and both evaluations' 4 responses each
    let evals = log_lines(&out, "eval.jsonl");
    assert_eq!(evals.len(), 2);
    let lines = log_lines(&out, "completions.jsonl");
    let train_lines: Vec<&Value> = lines.iter().filter(|l| l["split"] == "train").collect();
    assert_eq!(train_lines.len(), 8);
    assert_eq!(lines.len() - train_lines.len(), 8);
    let tok = Tokenizer::from_model_dir(Path::new("models/demo")).unwrap();
    for l in &train_lines {
        assert_eq!(l["step"], 0);
        let f = |k: &str| l[k].as_f64().unwrap();
        let c = l["correct"].as_bool().unwrap() as u8 as f64;
        // the demo's weights: 0.6 correctness, 0.3 length, 0.1 format
        let total = 0.6 * c + 0.3 * f("reward_length") + 0.1 * f("reward_format");
        assert!((f("reward") - total).abs() < 1e-12, "{l}");
        // each term from the logged text, length and budget (METHOD.md §3): ℓ counts the
        // completion's tokens without its EOS (those of its text), L is the step's budget B(t)
        // (not the cap), c is the verifier's judgement of the text against the gold answer
        let text = l["text"].as_str().unwrap();
        let len = l["len"].as_u64().unwrap() as usize;
        assert_eq!(tok.encode(text).unwrap().len(), len, "{l}");
        let budget = l["budget"].as_u64().unwrap() as usize;
        let shape = LengthShape::Triangular;
        assert_eq!(f("reward_length"), length_reward(len, budget, shape), "{l}");
        let format = 0.5 * (has_think(text) as u8 as f64) + 0.5 * (has_answer(text) as u8 as f64);
        assert_eq!(f("reward_format"), format, "{l}");
        let gold = l["gold"].as_str().unwrap();
        assert_eq!(c == 1.0, answer_is_correct(text, gold), "{l}");
    }
    for group in train_lines.chunks(4) {
        let sum: f64 = group.iter().map(|l| l["advantage"].as_f64().unwrap()).sum();
        assert!(sum.abs() < 1e-9, "a group's advantages add up to {sum}");
    }
    // the evaluation's accuracy is its responses' share of correct ones
    for e in &evals {
        let step = &e["step"];
        let responses: Vec<&Value> = lines
            .iter()
            .filter(|l| l["split"] == "eval" && &l["step"] == step)
            .collect();
        assert_eq!(responses.len(), 4);
        let correct = responses.iter().filter(|l| l["correct"] == true).count();
        assert_eq!(e["accuracy"].as_f64().unwrap(), correct as f64 / 4.0);
    }
    // the paired line counts the problems whose verdict moved between the two evaluations
    let verdict = |step: u64, group: u64| {
        lines
            .iter()
            .find(|l| l["split"] == "eval" && l["step"] == step && l["group"] == group)
            .map(|l| l["correct"] == true)
            .unwrap()
    };
    let last = evals[1]["step"].as_u64().unwrap();
    let moved = |from: bool| {
        (0..4)
            .filter(|&g| verdict(0, g) == from && verdict(last, g) != from)
            .count()
    };
    let paired = match (moved(false), moved(true)) {
        (0, 0) => "problem by problem: none of the 4 changed its verdict".to_string(),
        (gained, lost) => format!(
            "problem by problem: {gained} of 4 became right, {lost} became wrong; the accuracy \
             change's 95 % interval is"
        ),
    };
    assert!(stdout.contains(&paired), "{paired}\n{stdout}");
}

/// An update in passes of 3 completions (3 + 3 + 2 of the 8) takes the same first step as one
/// pass of all 8 (up to the order of f32 sums), and the run folder's config records the
/// micro-batch each run used (the CPU's automatic choice: all of them).
#[test]
fn micro_batched_run_takes_the_one_pass_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, parts) = (tmp.path().join("whole"), tmp.path().join("parts"));
    for (out, micro) in [(&whole, "micro_batch=0"), (&parts, "micro_batch=3")] {
        let o = train(out, &["--set", "steps=1", "--set", micro]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let config = |out: &Path| std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config(&whole).contains("micro_batch = 8"),
        "{}",
        config(&whole)
    );
    assert!(
        config(&parts).contains("micro_batch = 3"),
        "{}",
        config(&parts)
    );
    let (a, b) = (&metrics(&whole)[0], &metrics(&parts)[0]);
    for k in ["loss", "grad_norm", "kl", "entropy"] {
        let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-6), "{k}: {x} vs {y}");
    }
    assert_eq!(a["reward"], b["reward"]);
}

/// The lines of a run folder's JSONL log.
fn log_lines(out: &Path, file: &str) -> Vec<Value> {
    std::fs::read_to_string(out.join(file))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `advantage.filter_groups` (METHOD.md §5) drops the groups whose completions all got the same
/// correctness, judged on correctness and not on the length-shaped totals: when the verifier
/// finds every completion wrong, no completion is left in the loss and the step's gradient is 0,
/// although the totals still differ by length (without the filter the gradient is not 0).
#[test]
fn filter_groups_drops_the_groups_that_are_all_wrong() {
    let grad_norm = |filter: &str| {
        let mut cfg = thinkshort::commands::train::demo_config();
        let settings = [
            ("steps", "1"),
            ("prompts_per_step", "2"),
            ("group_size", "4"),
            ("eval_every", "0"),
            ("advantage.filter_groups", filter),
        ];
        cfg.set_all(&settings).unwrap();
        let problems = thinkshort::demo::task::problems(2, 20).into_iter();
        let inputs = TrainInputs {
            model_dir: thinkshort::commands::train::DEMO_MODEL.into(),
            template: PromptTemplate::plain(thinkshort::demo::task::PROMPT_TEMPLATE).unwrap(),
            train: problems
                .map(|p| Example {
                    gold: p.gold(),
                    question: p.question,
                })
                .collect(),
            eval: vec![],
            is_correct: |_, _| false,
        };
        let out = tempfile::tempdir().unwrap();
        let control = RunControl {
            out: &out.path().join("run"),
            resume: None,
            stop_after: None,
            dry_run: false,
            interrupt: None,
        };
        let summary = train_on(CpuBackend, &cfg, &inputs, &control).unwrap();
        let m = &summary.metrics[0];
        assert!(!m.skipped && m.reward_length_std > 0.0, "{m:?}");
        m.grad_norm
    };
    assert_eq!(grad_norm("true"), 0.0);
    assert!(grad_norm("false") > 0.0);
}

#[test]
fn resume_reproduces_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let split = tmp.path().join("split");
    let logged = [
        "--set",
        "steps=4",
        "--set",
        "eval_every=1",
        "--set",
        "completions_every=1",
    ];
    assert!(train(&straight, &logged).status.success());
    // The split run: stop after 2 steps (checkpoint), then resume for the rest.
    let o = train(
        &split,
        &[
            &logged[..],
            &["--set", "checkpoint_every=2", "--stop-after", "2"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics(&split).len(), 2);
    let checkpoint = split.join("step-000002");
    let o = train(
        &split,
        &[
            &logged[..],
            &[
                "--set",
                "checkpoint_every=2",
                "--resume",
                checkpoint.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (metrics(&straight), metrics(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for (x, y) in a.into_iter().zip(b) {
        assert_eq!(without_timings(x), without_timings(y));
    }
    // the evaluations (before, after each step, at the end) and every completion: the same
    let evals = log_lines(&straight, "eval.jsonl");
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 1, 2, 3, 4]);
    assert_eq!(evals, log_lines(&split, "eval.jsonl"));
    let completions = log_lines(&straight, "completions.jsonl");
    assert_eq!(
        completions.len(),
        4 * 8 + 5 * 4,
        "4 steps of 2 × 4, 5 evaluations of 4"
    );
    assert_eq!(completions, log_lines(&split, "completions.jsonl"));
    let w1 = std::fs::read(straight.join("step-000004/model.safetensors")).unwrap();
    let w2 = std::fs::read(split.join("step-000004/model.safetensors")).unwrap();
    assert!(w1 == w2, "final weights differ");
    // The moments are binary, beside a trainer state of a few hundred bytes.
    let state = std::fs::read_to_string(split.join("step-000002/trainer_state.json")).unwrap();
    assert!(state.len() < 2000 && !state.contains("\"m\""), "{state}");
    assert!(split.join("step-000002/optimizer.safetensors").is_file());

    // A fresh run in a folder of an earlier run starts its logs anew and says that the
    // earlier checkpoints stay.
    let o = train(&split, &["--set", "steps=1", "--set", "eval_every=0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics(&split).len(), 1);
    assert!(log_lines(&split, "eval.jsonl").is_empty());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("holds checkpoints of an earlier run (step-000002, step-000004)"),
        "{stderr}"
    );
}

/// A checkpoint written before optimizer.safetensors existed (the moments inside
/// trainer_state.json) still resumes to the same run; a checkpoint that lost its moments file
/// is an error naming it.
#[test]
fn resume_reads_moments_from_an_older_trainer_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let steps = ["--set", "steps=3", "--set", "checkpoint_every=1"];
    assert!(train(&straight, &steps).status.success());
    let o = train(&split, &[&steps[..], &["--stop-after", "1"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = split.join("step-000001");
    let moments = ckpt.join("optimizer.safetensors");
    // trainer_state.json kept the moments as flat lists in the order the file keeps them
    let st = std::fs::read(&moments).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let flat =
        |name: &str| -> Vec<f32> { bytemuck::pod_collect_to_vec(st.tensor(name).unwrap().data()) };
    let (m, v) = (flat("exp_avg"), flat("exp_avg_sq"));
    let state_path = ckpt.join("trainer_state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["optimizer"]["m"] = serde_json::json!(m);
    state["optimizer"]["v"] = serde_json::json!(v);
    std::fs::remove_file(&moments).unwrap();
    let new_format = std::fs::read_to_string(&state_path).unwrap();
    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    let resume = ["--resume", ckpt.to_str().unwrap()];
    let o = train(&split, &[&steps[..], &resume].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w1 = std::fs::read(straight.join("step-000003/model.safetensors")).unwrap();
    let w2 = std::fs::read(split.join("step-000003/model.safetensors")).unwrap();
    assert!(w1 == w2, "final weights differ");

    std::fs::write(&state_path, new_format).unwrap();
    let o = train(&split, &[&steps[..], &resume].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("optimizer.safetensors is missing"),
        "{stderr}"
    );
}

/// `old_logp = "sampler"` is accepted and trains; both modes log `logp_gap`, which on the CPU
/// (decode path and training forward in f32 from the same weights) is tiny. That the update then
/// uses the sampler's log-probs as logπold is tested in train::update.
#[test]
fn both_old_logp_modes_train_and_log_a_small_gap() {
    let tmp = tempfile::tempdir().unwrap();
    for mode in ["sampler", "recompute"] {
        let out = tmp.path().join(mode);
        let set = format!("loss.old_logp={mode}");
        let o = train(&out, &["--set", "steps=2", "--set", &set]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for m in metrics(&out) {
            let gap = m["logp_gap"].as_f64().unwrap();
            assert!((0.0..1e-3).contains(&gap), "{mode}: gap {gap}");
        }
    }
}

/// With the optimizer offloaded to host memory the CPU run is the same run bit for bit (the same
/// AdamW arithmetic; on the CPU the device is the host), and it resumes from its checkpoint.
#[test]
fn offloaded_optimizer_trains_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, offloaded) = (tmp.path().join("plain"), tmp.path().join("offloaded"));
    let steps = ["--set", "steps=3", "--set", "checkpoint_every=1"];
    assert!(train(&plain, &steps).status.success());
    let offload = ["--set", "optim.offload=true"];
    let o = train(
        &offloaded,
        &[&steps[..], &offload, &["--stop-after", "2"]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in host memory (the offloaded optimizer)"));
    let checkpoint = offloaded.join("step-000002");
    let resume = ["--resume", checkpoint.to_str().unwrap()];
    let o = train(&offloaded, &[&steps[..], &offload, &resume].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (x, y) in metrics(&plain).into_iter().zip(metrics(&offloaded)) {
        assert_eq!(without_timings(x), without_timings(y));
    }
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(plain.join("step-000003").join(file)).unwrap();
        let b = std::fs::read(offloaded.join("step-000003").join(file)).unwrap();
        assert!(a == b, "{file} differs");
    }
}

/// With activation checkpointing the CPU run is the same run bit for bit (the layers' forward
/// recomputed in the backward gives the same values), and the memory estimate is smaller.
#[test]
fn activation_checkpointing_trains_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, checkpointed) = (tmp.path().join("plain"), tmp.path().join("checkpointed"));
    let steps = ["--set", "steps=2"];
    let o = train(&plain, &steps);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o2 = train(
        &checkpointed,
        &[&steps[..], &["--set", "activation_checkpointing=true"]].concat(),
    );
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    for (x, y) in metrics(&plain).into_iter().zip(metrics(&checkpointed)) {
        assert_eq!(without_timings(x), without_timings(y));
    }
    let a = std::fs::read(plain.join("step-000002/model.safetensors")).unwrap();
    let b = std::fs::read(checkpointed.join("step-000002/model.safetensors")).unwrap();
    assert!(a == b, "the weights differ");
    // "update pass X GiB" of the estimate line
    let update_gib = |o: &std::process::Output| -> f64 {
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        let at = stderr.find("update pass ").expect("estimate line") + "update pass ".len();
        stderr[at..]
            .split([',', ')'])
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(
        update_gib(&o2) < update_gib(&o),
        "{} vs {}",
        update_gib(&o2),
        update_gib(&o)
    );
    let o = train(
        &checkpointed,
        &["--dry-run", "--set", "activation_checkpointing=true"],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("activation checkpointing: the update recomputes"),
        "{stdout}"
    );
}

/// `keep_checkpoints = 2` leaves the two newest checkpoint folders of the run and nothing else
/// of the older ones; a later step's folder left by an earlier attempt, and folders that are not
/// checkpoints, stay.
#[test]
fn keep_checkpoints_deletes_the_older_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for stale in ["step-000009", "step-notes"] {
        std::fs::create_dir_all(out.join(stale)).unwrap();
    }
    let sets = ["steps=4", "checkpoint_every=1", "keep_checkpoints=2"];
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    let o = train(&out, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["step-000003", "step-000004", "step-000009", "step-notes"]
    );
}

/// `sampling.stop` ends the rollouts and the held-out evaluation's responses: every demo
/// completion starts with the token "<think>", so with that stop string each is one token long.
#[test]
fn stop_strings_end_rollouts_and_evaluations() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(
        &out,
        &[
            "--set",
            "steps=2",
            "--set",
            "eval_every=2",
            "--set",
            "sampling.stop=[\"<think>\"]",
        ],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for line in metrics(&out) {
        assert_eq!(line["mean_len"].as_f64(), Some(1.0), "{line}");
        assert_eq!(line["truncated_frac"].as_f64(), Some(0.0), "{line}");
    }
    for model in ["before", "after"] {
        assert!(
            stdout.contains(&format!("| {model} | 0.0 % | 1.0 | 0.0 % |")),
            "{stdout}"
        );
    }
}

/// `--dry-run` prints the demo's budgets with their caps and first steps and the memory plan,
/// and stops before the weights: the run folder is never made.
#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(&out, &["--dry-run"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("budgets: 48 (cap 96) from step 0, 31 (cap 62) from step 100, 20 (cap 40) from step 200"),
        "{stdout}"
    );
    assert!(stdout.contains("2 prompts × 4 samples"), "{stdout}");
    assert!(
        stdout.contains("completions end at EOS, or at the cap"),
        "{stdout}"
    );
    assert!(
        stderr.contains("memory estimate (cpu)") && stderr.contains("updated 8 at a time"),
        "{stderr}"
    );
    assert!(!out.exists(), "a dry run made {}", out.display());
    // the demo task takes another prompt template when given one ("compute : … . budget : …
    // tokens ." is 17 tokens for the longest problem; its question alone and " ." is 10)
    let o = train(&out, &["--dry-run", "--set", "prompt={question} ."]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("longest prompt: 10 tokens"), "{stdout}");
    // every sequence must fit the model's positions (the demo model has 512)
    let o = train(&out, &["--dry-run", "--set", "schedule.b0=1000"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("2000 new tokens exceed the model's max_position_embeddings of 512"),
        "{stderr}"
    );
    // the estimate holds the largest cap ahead: a list schedule that raises the budget at
    // step 5 (it sized step 0's sequences of ≤ 37 tokens)
    let rising = [
        "--dry-run",
        "--set",
        "schedule.kind=list",
        "--set",
        "schedule.budgets=[[0,10],[5,200]]",
    ];
    let o = train(&out, &rising);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("8 sequences of ≤ 417 tokens"), "{stderr}");
    // on the CPU the whole estimate must fit the host's available memory (it said "fits")
    let o = train(&out, &["--dry-run", "--set", "prompts_per_step=1000000000"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("GiB available"),
        "{stderr}"
    );
}

/// A stand-in for a real model in the plans of the paper's setting: the tiny fixture with the
/// tokenizer it has, given Qwen2.5's 32768 positions (its own 512 cannot hold the paper's 512-token
/// caps after its long prompts).
fn planning_model(dir: &Path) -> String {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_tied");
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(fixture.join("config.json")).unwrap();
    let mut json: Value = serde_json::from_str(&config).unwrap();
    json["max_position_embeddings"] = 32768.into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    format!("model={}", dir.display())
}

/// The paper's configs in tools/train_configs/ plan the budgets of METHOD.md §6 (their data
/// file is ../shared/data's GSM8K train); without a model they stop with an error naming it.
#[test]
fn paper_configs_plan_the_papers_budgets() {
    let tmp = tempfile::tempdir().unwrap();
    let model = planning_model(&tmp.path().join("model"));
    for (file, budgets) in [
        (
            "paper_curriculum",
            "budgets: 256 (cap 512) from step 0, 179 (cap 358) from step 150, 125 (cap 250) from step 300, 87 (cap 174) from step 450\n",
        ),
        ("paper_fixed_budget", "budgets: 87 (cap 174) from step 0\n"),
    ] {
        let config = format!("tools/train_configs/{file}.toml");
        let o = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--backend", "cpu", "--dry-run", "--config", &config, "--set", &model])
            .arg("--out")
            .arg(tmp.path().join(file))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{file}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains(budgets), "{file}: {stdout}");
        assert!(stdout.contains("steps 0 to 600 of 16 prompts × 8 samples"), "{file}: {stdout}");
        let o = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--backend", "cpu", "--dry-run", "--config", &config])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains("set `model`"), "{file}: {stderr}");
    }
}

#[test]
fn bad_settings_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, key) in [
        ("schedule.gamma=1.5", "gamma"),
        ("group_size=1", "group_size"),
        ("nonsense=3", "nonsense"),
    ] {
        let o = train(&tmp.path().join("x"), &["--set", set]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{set} was accepted");
        assert!(
            stderr.contains(key) && !stderr.contains("panicked"),
            "{set}: {stderr}"
        );
    }
}

/// Without a settings file, `--set model=…` and `--set data=…` start from the documented
/// defaults (the paper's budgets, 600 steps of 16 × 8), not from the demo's settings.
#[test]
fn a_model_set_without_config_takes_the_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let model = planning_model(&tmp.path().join("model"));
    let o = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .current_dir(root)
        .args(["train", "--backend", "cpu", "--dry-run", "--set", &model])
        .arg("--set")
        .arg(format!("data={root}/../shared/data/gsm8k/train.jsonl"))
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("steps 0 to 600 of 16 prompts × 8 samples")
            && stdout.contains("budgets: 256 (cap 512) from step 0, 179 (cap 358) from step 150"),
        "{stdout}"
    );
    // no evaluation (eval_every = 0 by default): every example of the file trains; with one,
    // the last eval_size are held out
    assert!(
        stdout.contains("problems: 7473 to train on; no held-out evaluation"),
        "{stdout}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .current_dir(root)
        .args(["train", "--backend", "cpu", "--dry-run", "--set", &model])
        .arg("--set")
        .arg(format!("data={root}/../shared/data/gsm8k/train.jsonl"))
        .args(["--set", "eval_every=150", "--out"])
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("problems: 7273 to train on; 200 held-out problems evaluated"),
        "{stdout}"
    );
    // training data whose line has an empty gold answer: the file and line are named
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"question\": \"1 + 1?\", \"answer\": \"#### 2\"}\n{\"question\": \"2 + 2?\", \"answer\": \"####  \"}\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .current_dir(root)
        .args(["train", "--backend", "cpu", "--dry-run", "--set"])
        .arg(format!("model={root}/tests/fixtures/qwen2_tied"))
        .arg("--set")
        .arg(format!("data={}", data.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("line 2") && stderr.contains("gold answer is empty"),
        "{stderr}"
    );
}

/// A resumed run continues its checkpoint's curriculum and AdamW settings: settings that
/// differ (which it would ignore) are an error naming the key.
#[test]
fn resume_refuses_settings_the_checkpoint_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(
        &out,
        &[
            "--set",
            "steps=2",
            "--set",
            "eval_every=0",
            "--stop-after",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let checkpoint = out.join("step-000001");
    // the run's settings resuming from its checkpoint, then `extra`
    let resumed = |extra: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["--set", "steps=2", "--set", "eval_every=0", "--resume"];
        args.push(checkpoint.to_str().unwrap());
        args.extend_from_slice(extra);
        args
    };
    for (change, named) in [
        ("steps=3", "steps = 2, the settings 3"),
        (
            "optim.weight_decay=0.1",
            "optim.weight_decay is 0 in the checkpoint, 0.1",
        ),
        ("schedule.gamma=0.5", "the checkpoint's schedule"),
        ("seed=3", "seed = 0, the settings 3"),
    ] {
        let mut args = vec![
            "--set",
            "eval_every=0",
            "--resume",
            checkpoint.to_str().unwrap(),
        ];
        if !change.starts_with("steps") {
            args.extend(["--set", "steps=2"]);
        }
        args.extend(["--set", change]);
        let o = train(&out, &args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(named),
            "{change}: {stderr}"
        );
    }
    // a state whose step was changed by hand (its optimizer has stepped more often than the
    // step allows): refused, where it retrained step 0 over the real step-000001
    let edited = tmp.path().join("edited");
    std::fs::create_dir(&edited).unwrap();
    for entry in std::fs::read_dir(&checkpoint).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, edited.join(path.file_name().unwrap())).unwrap();
    }
    let state_path = edited.join("trainer_state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["step"], 1);
    state["step"] = 0.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let before = std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    let args = ["--set", "steps=2", "--set", "eval_every=0", "--resume"];
    let o = train(&out, &[&args[..], &[edited.to_str().unwrap()]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("trainer_state.json is damaged"),
        "{stderr}"
    );
    assert!(std::fs::read(checkpoint.join("model.safetensors")).unwrap() == before);
    // --stop-after at the checkpoint's step has nothing to do (it cut the logs back): refused
    let o = train(&out, &resumed(&["--stop-after", "1"]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("leaves no step to take"),
        "{stderr}"
    );
    // a checkpoint folder the run would write holding a file of the user's: refused at start
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(busy.join("step-000001")).unwrap();
    std::fs::write(busy.join("step-000001/precious.txt"), "mine").unwrap();
    let o = train(&busy, &["--set", "steps=1", "--set", "eval_every=0"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("holds precious.txt"),
        "{stderr}"
    );
    assert!(
        !busy.join("metrics.jsonl").exists(),
        "the refused run wrote its logs"
    );
    // resumed into another folder: the run goes on and says its logs are partial
    let o = train(&tmp.path().join("elsewhere"), &resumed(&[]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stderr.contains("holds the metrics of 0 of the 1 steps"),
        "{stderr}"
    );
    // --set keys that constrain each other are checked together: b0 below the default bf (87)
    // is fine when bf follows
    let o = train(
        &out,
        &[
            "--dry-run",
            "--set",
            "schedule.kind=generalised",
            "--set",
            "schedule.b0=48",
            "--set",
            "schedule.bf=20",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the preset takes the final budget of the steps as set (48 within 6 steps, not 20)
    let o = train(
        &out,
        &["--preset", "fixed-budget", "--set", "steps=6", "--dry-run"],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("budgets: 48 (cap 96) from step 0\n"),
        "{stdout}"
    );
    // the same settings resume
    let o = train(&out, &resumed(&[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The held-out evaluation decodes P × G problems at a time: the evaluation before training
/// (10 problems) is the same in chunks of 3 (3 + 3 + 3 + 1) as in one batch of 16.
#[test]
fn the_evaluation_in_chunks_equals_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, group: &str| {
        let out = tmp.path().join(name);
        let o = train(
            &out,
            &[
                "--set",
                "eval_size=10",
                "--set",
                "eval_every=1",
                "--set",
                "completions_every=1",
                "--set",
                "prompts_per_step=1",
                "--set",
                &format!("group_size={group}"),
                "--stop-after",
                "1",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // the evaluation before training (the one after step 1 follows different updates)
        let responses: Vec<Value> = log_lines(&out, "completions.jsonl")
            .into_iter()
            .filter(|l| l["split"] == "eval" && l["step"] == 0)
            .collect();
        (log_lines(&out, "eval.jsonl")[0].clone(), responses)
    };
    let (chunked, one) = (run("chunked", "3"), run("one", "16"));
    assert_eq!(chunked.1.len(), 10);
    let groups: Vec<u64> = chunked
        .1
        .iter()
        .map(|l| l["group"].as_u64().unwrap())
        .collect();
    assert_eq!(groups, (0..10).collect::<Vec<u64>>());
    assert_eq!(chunked, one);
}

/// A checkpoint from before trainer_state.json kept `train_examples` comes from a run that held
/// out eval_size examples of its data file even without evaluation: resumed, the run holds them
/// out again (the problems the uninterrupted run drew from), and its own checkpoints go on
/// without the count, so they resume the same way.
#[test]
fn a_checkpoint_without_train_examples_resumes_with_its_held_out_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let model = planning_model(&tmp.path().join("model"));
    let data = tmp.path().join("train.jsonl");
    let lines: String = (0..12)
        .map(|i| {
            format!(
                "{{\"question\": \"What is {i} + 1?\", \"answer\": \"#### {}\"}}\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let data = format!("data={}", data.display());
    let settings = [
        "--set",
        model.as_str(),
        "--set",
        data.as_str(),
        "--set",
        "steps=3",
        "--set",
        "eval_every=0",
        "--set",
        "schedule.kind=\"constant\"",
        "--set",
        "schedule.b=4",
    ];
    let run = |out: &Path, extra: &[&str]| {
        let o = train(out, &[&settings[..], extra].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = tmp.path().join("run");
    run(&out, &["--stop-after", "1"]);
    let state_of = |step: usize| out.join(format!("step-{step:06}/trainer_state.json"));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(state_of(1)).unwrap()).unwrap();
    assert_eq!(state["train_examples"], 12);
    let checkpoint = out.join("step-000001");
    let plan = |out: &Path| {
        let resume = ["--resume", checkpoint.to_str().unwrap(), "--dry-run"];
        run(out, &resume)
    };
    assert!(plan(&tmp.path().join("plan")).contains("problems: 12 to train on"));

    // as the older version wrote it: no count
    let mut legacy = state.clone();
    legacy.as_object_mut().unwrap().remove("train_examples");
    std::fs::write(state_of(1), legacy.to_string()).unwrap();
    let planned = plan(&tmp.path().join("plan"));
    assert!(planned.contains("problems: 8 to train on"), "{planned}");
    run(
        &out,
        &[
            "--resume",
            checkpoint.to_str().unwrap(),
            "--stop-after",
            "2",
        ],
    );
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(state_of(2)).unwrap()).unwrap();
    assert!(state["train_examples"].is_null(), "{state}");
    run(
        &out,
        &["--resume", out.join("step-000002").to_str().unwrap()],
    );
}

/// Ctrl-C (SIGINT; SIGTERM takes the same handler) ends a run after the step in progress with a
/// checkpoint and an error naming it for --resume; the resumed run goes on from there.
#[test]
fn ctrl_c_stops_after_the_step_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // far more steps than run before the signal arrives
    let settings = ["--set", "steps=1000", "--set", "eval_every=0"];
    let child = train_command(&out, &settings)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // interrupt once the first step is logged
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() == 0) {
        assert!(started.elapsed().as_secs() < 120, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: a signal to the child this test started and has not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!((1..1000).contains(&steps), "{steps} steps\n{stderr}");
    let checkpoint = out.join(format!("step-{steps:06}"));
    assert!(
        stderr.contains(&format!(
            "interrupted after step {steps} of 1000: continue the run with --resume {}",
            checkpoint.display()
        )),
        "{stderr}"
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], steps);
    let resume = ["--resume", checkpoint.to_str().unwrap()];
    let stop = (steps + 1).to_string();
    let o = train(
        &out,
        &[&settings[..], &resume, &["--stop-after", &stop]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(resumed, steps + 1);
}

/// A second interrupt of the other kind (a scheduler's SIGTERM after a user's Ctrl-C) ends the
/// run at once, as a second Ctrl-C does: the process dies of the signal, without finishing the
/// step or writing its checkpoint.
#[cfg(unix)]
#[test]
fn sigterm_after_ctrl_c_ends_the_run_at_once() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let settings = ["--set", "steps=1000", "--set", "eval_every=0"];
    let mut child = train_command(&out, &settings)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the stderr lines, as they come
    let (lines, stderr_lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if lines.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| loop {
        let line = stderr_lines
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("no stderr line containing {what:?}: {e}"));
        if line.contains(what) {
            break;
        }
    };
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() == 0) {
        assert!(started.elapsed().as_secs() < 120, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id() as i32;
    // SAFETY: signals to the child this test started and has not yet waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    wait_for("interrupted: the run stops after this step");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    // the demo saves no checkpoint before the end (checkpoint_every = 0) but the interrupt's
    let checkpoints = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("step-")
        })
        .count();
    assert_eq!(checkpoints, 0);
}
