//! Bad input gives one clear error naming the file, tensor, key or line, a non-zero exit and no
//! panic. Each case builds a small model folder in a temporary directory and breaks one thing.

use safetensors::{tensor::TensorView, Dtype};
use std::path::Path;
use std::process::Command;
use thinkshort::config::ModelConfig;
use thinkshort::params::ParamLayout;

const CONFIG: &str = r#"{"model_type":"qwen2","vocab_size":50,"hidden_size":16,"intermediate_size":24,
    "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"rope_theta":10000.0,
    "tie_word_embeddings":true}"#;

/// Writes config.json and model.safetensors; `tweak` may change each tensor's (dtype, shape).
fn write_model(dir: &Path, config: &str, tweak: &dyn Fn(&str, &mut Dtype, &mut Vec<usize>)) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let cfg = ModelConfig::from_json_str(CONFIG).unwrap();
    let layout = ParamLayout::new(&cfg);
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = layout
        .specs
        .iter()
        .map(|s| {
            let (mut dtype, mut shape) = (Dtype::F32, s.shape.clone());
            tweak(&s.name, &mut dtype, &mut shape);
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes())
                .collect::<Vec<u8>>();
            let width = if dtype == Dtype::F32 || dtype == Dtype::I32 {
                4
            } else {
                2
            };
            (s.name.clone(), dtype, shape, bytes[..n * width].to_vec())
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

fn no_tweak(_: &str, _: &mut Dtype, _: &mut Vec<usize>) {}

/// Runs `thinkshort logprobs` on the folder with a valid one-line input, or the given input.
fn logprobs(dir: &Path, input: Option<&str>) -> (bool, String) {
    let input_path = dir.join("in.jsonl");
    std::fs::write(
        &input_path,
        input.unwrap_or("{\"prompt_ids\":[1,2,3],\"completion_ids\":[4,5]}\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .args(["logprobs", "--backend", "cpu", "--model"])
        .arg(dir)
        .arg("--input")
        .arg(&input_path)
        .arg("--output")
        .arg(dir.join("out.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.success(), stderr)
}

fn assert_fails_with(dir: &Path, input: Option<&str>, needles: &[&str]) {
    let (ok, stderr) = logprobs(dir, input);
    assert!(!ok, "expected failure, stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "expected {n:?} in: {stderr}");
    }
    assert!(
        !dir.join("out.jsonl").exists(),
        "a failed run left an output file"
    );
}

#[test]
fn a_valid_model_scores() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    let (ok, stderr) = logprobs(tmp.path(), None);
    assert!(ok, "{stderr}");
    let out = std::fs::read_to_string(tmp.path().join("out.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 2);
}

#[test]
fn missing_config_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    assert_fails_with(tmp.path(), None, &["config.json"]);
}

#[test]
fn missing_weights_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    assert_fails_with(tmp.path(), None, &["missing weights", "model.safetensors"]);
}

#[test]
fn missing_tokenizer_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    // Text input needs the tokenizer, which this folder lacks.
    assert_fails_with(
        tmp.path(),
        Some("{\"prompt\":\"a\",\"completion\":\"b\"}\n"),
        &["tokenizer.json", "line 1"],
    );
}

#[test]
fn truncated_and_garbage_safetensors_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    assert_fails_with(
        tmp.path(),
        None,
        &["model.safetensors", "not a valid safetensors"],
    );
    std::fs::write(&file, b"this is not a safetensors file at all").unwrap();
    assert_fails_with(
        tmp.path(),
        None,
        &["model.safetensors", "not a valid safetensors"],
    );
}

#[test]
fn wrong_shape_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &|name, _, shape| {
        if name == "model.layers.0.self_attn.k_proj.weight" {
            *shape = vec![16, 16];
        }
    });
    assert_fails_with(
        tmp.path(),
        None,
        &[
            "model.layers.0.self_attn.k_proj.weight",
            "[16, 16]",
            "[8, 16]",
        ],
    );
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &|name, dtype, _| {
        if name == "model.norm.weight" {
            *dtype = Dtype::I32;
        }
    });
    assert_fails_with(tmp.path(), None, &["model.norm.weight", "I32"]);
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let untied = CONFIG.replace(
        "\"tie_word_embeddings\":true",
        "\"tie_word_embeddings\":false",
    );
    write_model(tmp.path(), &untied, &no_tweak);
    assert_fails_with(tmp.path(), None, &["lm_head.weight", "tie_word_embeddings"]);
}

#[test]
fn unknown_model_type_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), &CONFIG.replace("qwen2", "mamba"), &no_tweak);
    assert_fails_with(tmp.path(), None, &["config.json", "model_type", "mamba"]);
}

#[test]
fn token_id_out_of_range_names_line_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    let input = "{\"prompt_ids\":[1],\"completion_ids\":[2]}\n{\"prompt_ids\":[1],\"completion_ids\":[50]}\n";
    assert_fails_with(
        tmp.path(),
        Some(input),
        &["in.jsonl line 2", "token id 50", "50 tokens"],
    );
}

#[test]
fn invalid_jsonl_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    let item = "{\"prompt_ids\":[1],\"completion_ids\":[2]}";
    let input = format!("{item}\n{item}\n{{\"prompt_ids\":[1],\n");
    assert_fails_with(
        tmp.path(),
        Some(&input),
        &["in.jsonl line 3", "not valid JSON"],
    );
    assert_fails_with(
        tmp.path(),
        Some("{\"prompt_ids\":[1]}\n"),
        &["line 1", "completion_ids"],
    );
    assert_fails_with(
        tmp.path(),
        Some("{\"prompt_ids\":[],\"completion_ids\":[1]}\n"),
        &["line 1", "prompt is empty"],
    );
}

#[test]
fn cuda_backend_without_a_gpu_is_one_clear_line() {
    if thinkshort::cuda::require_cuda().is_ok() {
        return; // this test is about machines without a GPU
    }
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    for args in [
        vec!["generate", "--model", "nowhere", "--prompt", "hi"],
        vec!["train", "--out", out_dir.to_str().unwrap()],
        vec![
            "bench",
            "step",
            "--model-config",
            "tools/bench_model_10m.json",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
            .args(&args)
            .args(["--backend", "cuda"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.to_lowercase().contains("cuda"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!out_dir.exists(), "train wrote a run folder before failing");
}

fn thinkshort(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

/// `sft --out` never replaces a folder of other files (it deleted them): refused before the
/// training, the folder untouched; nonsense sizes and rates are refused too.
#[test]
fn sft_refuses_to_replace_a_folder_of_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("in.jsonl");
    std::fs::write(
        &data,
        r#"{"prompt": "compute : 3 + 4 . budget : 20 tokens .", "completion": " <think> 3 + 4 = 7 . </think> <answer> 7 </answer>"}"#,
    )
    .unwrap();
    let keep = tmp.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("important.txt"), "mine").unwrap();
    let sft = |out: &Path, extra: &[&str]| {
        let mut args = vec!["sft", "--model", "models/demo", "--data"];
        args.push(data.to_str().unwrap());
        args.extend(["--out", out.to_str().unwrap(), "--steps", "1"]);
        // a batch of 1 unless the case gives its own settings
        args.extend(if extra.is_empty() {
            &["--batch-size", "1"][..]
        } else {
            extra
        });
        thinkshort(&args)
    };
    let o = sft(&keep, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr
                .contains("holds important.txt, which a model folder written here would not keep"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(keep.join("important.txt")).unwrap(),
        "mine"
    );
    // a model folder (an earlier output) is replaced; no temporary folder is left beside it
    let model = tmp.path().join("model");
    for _ in 0..2 {
        let o = sft(&model, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    // a model folder with a file of the user's in it is not replaced either
    std::fs::write(model.join("notes.txt"), "mine").unwrap();
    let o = sft(&model, &[]);
    assert!(!o.status.success());
    assert_eq!(
        std::fs::read_to_string(model.join("notes.txt")).unwrap(),
        "mine"
    );
    for (extra, needle) in [
        (&["--batch-size", "0"][..], "--batch-size and --steps"),
        (&["--lr=-1"][..], "--lr must be"),
    ] {
        let o = sft(&tmp.path().join("other"), extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{stderr}");
    }
}

/// A model folder that does not exist, or a file given as one, is said to be so (it was
/// reported as a missing tokenizer file inside it); so is a template that names no file.
#[test]
fn a_missing_model_folder_or_template_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let absent = tmp.path().join("absent");
    let generate = |model: &str, template: &str| {
        let o = thinkshort(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "q",
            "--template",
            template,
            "--backend",
            "cpu",
        ]);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = generate(absent.to_str().unwrap(), "raw");
    assert!(err.contains("absent does not exist"), "{err}");
    let err = generate("models/demo/config.json", "raw");
    assert!(err.contains("config.json is a file"), "{err}");
    let err = generate("models/demo", "papr");
    assert!(
        err.contains("prompt template papr") && err.contains("paper, chat"),
        "{err}"
    );
}

/// `thinkshort sft` on the CPU from models/demo for one step over a data file of `lines`, with
/// `extra` arguments: its output, and whether it left an output folder.
fn sft_once(lines: &[String], extra: &[&str]) -> (std::process::Output, bool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("in.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tmp.path().join("out");
    let mut args = vec![
        "sft",
        "--model",
        "models/demo",
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend([
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--backend",
        "cpu",
    ]);
    args.extend(extra);
    (thinkshort(&args), out.exists())
}

/// On the CPU, a batch far past the host's memory is refused before the weights load (it was
/// killed by the kernel's out-of-memory killer), also where the estimate's products would
/// overflow (2^62 examples wrapped around to a size that fit, then panicked).
#[test]
fn sft_refuses_a_batch_the_host_cannot_hold() {
    let line = r#"{"prompt": "compute : 3 + 4 .", "completion": " 7"}"#.to_string();
    for batch in ["100000000", "4611686018427387904"] {
        let (o, wrote) = sft_once(std::slice::from_ref(&line), &["--batch-size", batch]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.code() == Some(1) && stderr.contains("sft needs about"),
            "{batch}: {stderr}"
        );
        assert!(!wrote);
    }
}

/// An sft example longer than the model's positions is an error naming its file and line.
#[test]
fn sft_names_the_line_of_an_example_too_long_for_the_model() {
    let long = " 7".repeat(600);
    let lines = [
        r#"{"prompt": "compute : 3 + 4 .", "completion": " 7"}"#.to_string(),
        format!(r#"{{"prompt": "compute : 3 + 4 .", "completion": "{long}"}}"#),
    ];
    let (o, wrote) = sft_once(&lines, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("in.jsonl line 2: prompt and completion are")
            && stderr.contains("max_position_embeddings of 512"),
        "{stderr}"
    );
    assert!(!wrote);
}

/// Output line n scores input line n: a blank line before an item is an error naming it
/// (skipping it shifted every later line), blank lines at the end are not; an item longer than
/// the model's positions is an error naming its line.
#[test]
fn logprobs_refuses_blank_lines_between_items_and_items_too_long() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(tmp.path(), CONFIG, &no_tweak);
    let item = "{\"prompt_ids\":[1,2,3],\"completion_ids\":[4,5]}";
    assert_fails_with(
        tmp.path(),
        Some(&format!("{item}\n\n{item}\n")),
        &["in.jsonl line 2 is blank"],
    );
    let (ok, stderr) = logprobs(tmp.path(), Some(&format!("{item}\n{item}\n\n\n")));
    assert!(ok, "{stderr}");
    let out = std::fs::read_to_string(tmp.path().join("out.jsonl")).unwrap();
    assert_eq!(out.lines().count(), 2);
    std::fs::remove_file(tmp.path().join("out.jsonl")).unwrap();
    let short = CONFIG.replace(
        "\"rope_theta\":10000.0",
        "\"rope_theta\":10000.0,\"max_position_embeddings\":4",
    );
    write_model(tmp.path(), &short, &no_tweak);
    assert_fails_with(
        tmp.path(),
        Some(&format!("{item}\n")),
        &[
            "in.jsonl line 1: prompt and completion are 5 tokens",
            "of 4",
        ],
    );
}

/// `logprobs --output LINK` writes the link's target and keeps the link (the rename replaced
/// the link with a file).
#[cfg(unix)]
#[test]
fn logprobs_output_through_a_link_keeps_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        r#"{"prompt": "compute : 3 + 4 .", "completion": " <think> 3 + 4 = 7 . </think>"}"#,
    )
    .unwrap();
    // scores into `link` (a link to `target`): the link stays, the target holds the output
    let score_through = |link: &Path, target: &Path| {
        let o = thinkshort(&[
            "logprobs",
            "--model",
            "models/demo",
            "--input",
            input.to_str().unwrap(),
            "--output",
            link.to_str().unwrap(),
            "--backend",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let meta = std::fs::symlink_metadata(link).unwrap();
        assert!(
            meta.file_type().is_symlink(),
            "{} was replaced",
            link.display()
        );
        let text = std::fs::read_to_string(target).unwrap();
        assert!(text.starts_with("{\"logprobs\":["), "{text}");
    };
    let (real, link) = (tmp.path().join("real.jsonl"), tmp.path().join("link.jsonl"));
    std::fs::write(&real, "").unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    score_through(&link, &real);
    // a link to a file not made yet: the file is made, the link stays
    let (new_target, dangling) = (
        tmp.path().join("new.jsonl"),
        tmp.path().join("dangling.jsonl"),
    );
    std::os::unix::fs::symlink("new.jsonl", &dangling).unwrap();
    score_through(&dangling, &new_target);
}

/// `thinkshort generate` on a copy of the qwen2_tied fixture whose config.json `edit` changed
/// and whose weights hold the `extra` f32 tensors (name, shape) too: whether it succeeded, and
/// its stderr.
fn generate_with_edited_model(
    edit: impl Fn(&mut serde_json::Value),
    extra: &[(&str, &[usize])],
) -> (bool, String) {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_tied");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), tmp.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fixture.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    edit(&mut json);
    std::fs::write(tmp.path().join("config.json"), json.to_string()).unwrap();
    let bytes = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let weights = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros: Vec<Vec<u8>> = extra
        .iter()
        .map(|(_, shape)| vec![0u8; 4 * shape.iter().product::<usize>()])
        .collect();
    let mut views: Vec<(String, TensorView)> = weights
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                TensorView::new(t.dtype(), t.shape().to_vec(), t.data()).unwrap(),
            )
        })
        .collect();
    for ((name, shape), data) in extra.iter().zip(&zeros) {
        views.push((
            name.to_string(),
            TensorView::new(Dtype::F32, shape.to_vec(), data).unwrap(),
        ));
    }
    let written = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), written).unwrap();
    let o = thinkshort(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
        "--backend",
        "cpu",
    ]);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// A config.json with fewer layers than its weights is not this model's config (the extra
/// layers were ignored): an error naming a tensor of the extra layer.
#[test]
fn weights_of_layers_beyond_the_config_are_an_error() {
    let (ok, stderr) = generate_with_edited_model(|json| json["num_hidden_layers"] = 1.into(), &[]);
    assert!(
        !ok && stderr.contains("`model.layers.1.") && stderr.contains("beyond the 1"),
        "{stderr}"
    );
}

/// Qwen2 weights under a Llama config (no attention biases) would run without their q/k/v
/// biases and answer wrongly without a word: a tensor the config has no use for is an error
/// naming it (with the hint about biases only for a bias). A tied model's stored head and the
/// rotary frequencies of older checkpoints are left out, as transformers leaves them.
#[test]
fn weights_the_config_does_not_use_are_an_error() {
    let llama = |json: &mut serde_json::Value| json["model_type"] = "llama".into();
    let (ok, stderr) = generate_with_edited_model(llama, &[]);
    assert!(
        !ok && stderr.contains("_proj.bias`")
            && stderr.contains("has no use for")
            && stderr.contains("need model_type qwen2"),
        "{stderr}"
    );
    let (ok, stderr) = generate_with_edited_model(|_| {}, &[("score.weight", &[2, 2])]);
    assert!(
        !ok && stderr.contains("`score.weight`") && !stderr.contains("model_type qwen2"),
        "{stderr}"
    );
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_tied");
    let cfg = ModelConfig::from_model_dir(&fixture).unwrap();
    let kept = [
        ("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size][..]),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", &[4][..]),
    ];
    let (ok, stderr) = generate_with_edited_model(|_| {}, &kept);
    assert!(ok, "{stderr}");
}

/// Generation longer than the model's positions, or a cache larger than memory, is one clear
/// error (they aborted the process: a wrapped length, a failed allocation).
#[test]
fn oversized_generation_is_an_error_not_an_abort() {
    // the demo model, and a copy that claims 10^15 positions (its cache cannot be allocated)
    let tmp = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    for entry in std::fs::read_dir(&demo).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(demo.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["max_position_embeddings"] = 1_000_000_000_000_000u64.into();
    std::fs::write(tmp.path().join("config.json"), json.to_string()).unwrap();
    let long = tmp.path().to_str().unwrap();
    for (model, new_tokens, needle) in [
        (
            "models/demo",
            "18446744073709551615",
            "exceed the model's max_position_embeddings of 512",
        ),
        ("models/demo", "600", "max_position_embeddings"),
        (long, "10000000000000", "cannot allocate"),
    ] {
        let o = thinkshort(&[
            "generate",
            "--model",
            model,
            "--template",
            "raw",
            "--prompt",
            "compute : 3 + 4 .",
            "--max-new-tokens",
            new_tokens,
            "--backend",
            "cpu",
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{new_tokens}: {stderr}");
        assert!(stderr.contains(needle), "{new_tokens}: {stderr}");
    }
}

/// Smaller input checks from the audit, each one clear line: a rope scaling factor of 0 (it
/// divided the frequencies), an infinite temperature, a shard path out of the model folder,
/// eval with no dataset or --limit 0, a run folder given to --resume, a non-positive peak.
#[test]
fn nonsense_settings_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rope0 = CONFIG.replace(
        "\"rope_theta\":10000.0",
        "\"rope_theta\":10000.0,\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":0.0}",
    );
    write_model(dir, &rope0, &no_tweak);
    let (ok, err) = logprobs(dir, None);
    assert!(!ok && err.contains("rope_scaling.factor"), "{err}");

    let index = tmp.path().join("index");
    std::fs::create_dir(&index).unwrap();
    std::fs::write(index.join("config.json"), CONFIG).unwrap();
    std::fs::write(
        index.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let (ok, err) = logprobs(&index, None);
    assert!(
        !ok && err.contains("not a file of the model folder"),
        "{err}"
    );

    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, r#"{"prompt_ids": [1, 2], "completion_ids": [3]}"#).unwrap();
    let out = tmp.path().join("out.jsonl");
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "logprobs",
                "--model",
                "models/demo",
                "--temperature",
                "1e39",
                "--input",
            ],
            "finite temperature",
        ),
        (
            &["eval", "--model", "models/demo", "--datasets", ","],
            "names no dataset",
        ),
        (
            &["eval", "--model", "models/demo", "--limit", "0"],
            "--limit must be",
        ),
        (
            &["train", "--resume", "models", "--out"],
            "not a checkpoint folder",
        ),
        (
            &[
                "bench",
                "step",
                "--model-config",
                "models/demo/config.json",
                "--peak-tflops",
                "0",
            ],
            "--peak-tflops must be",
        ),
        (
            &[
                "bench",
                "step",
                "--model-config",
                "models/demo/config.json",
                "--peak-tflops",
                "nan",
            ],
            "--peak-tflops must be",
        ),
    ];
    for (args, needle) in cases {
        let mut all: Vec<&str> = args.to_vec();
        if args[0] == "logprobs" {
            all.extend([input.to_str().unwrap(), "--output", out.to_str().unwrap()]);
        }
        if args[0] == "train" {
            all.push(tmp.path().to_str().unwrap());
        }
        all.extend(["--backend", "cpu"]);
        let o = thinkshort(&all);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
