//! The binary end to end: `doctor`, `logprobs` on a fixture (text and id lines), `generate`.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn thinkshort(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .args(args)
        .output()
        .unwrap()
}

/// Output into a pipe whose reader is gone ends the process by SIGPIPE, quietly, as it ends
/// `cat` or `grep`: no panic message, no error line.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_process_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_thinkshort"))
        .arg("doctor")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn doctor_reports_kernels_as_built_or_not() {
    let out = thinkshort(&["doctor", "--verbose"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("thinkshort {}", env!("CARGO_PKG_VERSION"))));
    assert!(text.contains("backend cpu:  usable"));
    assert!(
        text.contains("host memory:  ") && text.contains(" GiB available"),
        "{text}"
    );
    if thinkshort::cuda::kernels_built() {
        assert!(
            text.contains("cuda kernels: built") && text.contains("rmsnorm"),
            "{text}"
        );
        assert!(
            text.contains("rmsnorm_forward") && text.contains("spill"),
            "ptxas report missing: {text}"
        );
    } else {
        assert!(text.contains("cuda kernels: not built"), "{text}");
    }
}

#[test]
fn logprobs_command_matches_transformers_on_text_and_ids() {
    let dir = fixture("qwen2_tied");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let text_case = &expected["text_cases"][0];
    let id_case = &expected["logprob_cases"][1];
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let output = tmp.path().join("out.jsonl");
    let lines = [
        serde_json::json!({"prompt": text_case["prompt"], "completion": text_case["completion"]}),
        serde_json::json!({"prompt_ids": id_case["prompt_ids"], "completion_ids": id_case["completion_ids"]}),
    ];
    std::fs::write(
        &input,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let out = thinkshort(&[
        "logprobs",
        "--model",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 2);
    for (g, want) in got
        .iter()
        .zip([&text_case["logprobs"], &id_case["logprobs"]])
    {
        let (g, want) = (g["logprobs"].as_array().unwrap(), want.as_array().unwrap());
        assert_eq!(g.len(), want.len());
        for (a, b) in g.iter().zip(want) {
            assert!(
                (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-4,
                "{a} vs {b}"
            );
        }
    }
}

#[test]
fn generate_command_respects_the_cap_and_the_seed() {
    let dir = fixture("llama_untied_bf16");
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "What is 2+3?",
        "--budget",
        "4",
        "--temperature",
        "1.0",
        "--seed",
        "9",
        "--num-samples",
        "3",
        "--json",
    ];
    let a = thinkshort(&args);
    let b = thinkshort(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout, "same seed, different samples");
    let samples: Vec<Value> = String::from_utf8_lossy(&a.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 3);
    for s in samples {
        let n = s["tokens"].as_array().unwrap().len();
        assert!(n <= 8, "cap is 2 × budget = 8, got {n}");
        let logprobs = s["logprobs"].as_array().unwrap();
        assert_eq!(logprobs.len(), n);
        assert!(logprobs.iter().all(|lp| lp.as_f64().unwrap() < 0.0));
        assert_eq!(
            s["truncated"].as_bool().unwrap(),
            n == 8 && !s["finished"].as_bool().unwrap()
        );
    }
}
